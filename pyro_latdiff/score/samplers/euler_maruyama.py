"""Euler-Maruyama on the reverse-time SDE of a scalar-linear forward process."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._common import (
    CountedCall,
    SampleResult,
    as_coef,
    check_process,
    check_samples,
    horizon_of,
    initial_state,
    make_times,
    sampler_dtype,
)


def reverse_sde_euler(
    score: Callable[[Tensor, Tensor], Tensor],
    process,
    num_samples: int,
    num_steps: int,
    *,
    state_dim: int,
    schedule: str | Tensor = "uniform",
    t_min: float | Tensor = 0.0,
    x_init: Tensor | None = None,
) -> SampleResult:
    r"""Sample the reverse-time SDE of ``dX = f(t) X dt + g(t) dW`` by Euler-Maruyama.

    From ``x_N ~ process.prior``, for ``k = N - 1, ..., 0`` with ``h_k = t_{k+1} - t_k``:

    .. math::

        x_k = x_{k+1} - \left[f(t_{k+1}) x_{k+1} - g(t_{k+1})^2 s(t_{k+1}, x_{k+1})\right] h_k
              + g(t_{k+1}) \sqrt{h_k}\, \xi_k,

    the discretisation analysed by Chen et al. (2023) next to their exponential
    integrator (:func:`exponential_integrator`), which integrates the linear part exactly.

    **References:** S. Chen, S. Chewi, J. Li, Y. Li, A. Salim, A. R. Zhang, *Sampling is
    as easy as learning the score*, ICLR 2023.

    Example::

        from pyro_latdiff.score import OrnsteinUhlenbeck
        from pyro_latdiff.testing import GaussianMixture

        process = OrnsteinUhlenbeck(4.0)
        data = GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.5]]), 0.4)
        score = data.score(process)  # or a trained score network
        result = reverse_sde_euler(score, process, 1000, 100, state_dim=2)
        result.samples.shape  # (1000, 2)

    :param callable score: ``score(t, x)``, ``t`` a 0-d tensor, ``x`` of shape
        ``(num_samples, state_dim)``; returns a tensor shaped like ``x``.
    :param process: forward process with ``horizon``, ``drift_coef(t)``,
        ``diffusion_coef(t)``, ``marginal_coefs(t)`` and ``prior(shape)``.
    :param int num_samples: number of independent samples.
    :param int num_steps: number of steps ``N``.
    :param int state_dim: dimension of one sample.
    :param schedule: ``"uniform"`` or an increasing tensor of ``N + 1`` times.
    :type schedule: str or torch.Tensor
    :param t_min: the time the sampler stops at (early stopping), ``>= 0``: a float
        or a 0-d float tensor.
    :param torch.Tensor x_init: optional start ``(num_samples, state_dim)`` instead of
        prior draws.
    :returns: samples at ``t_min``, the number of score calls and the grid.
    :rtype: SampleResult
    """
    check_process(process)
    dtype = sampler_dtype(x_init)
    times = make_times(horizon_of(process), num_steps, schedule, t_min, dtype)
    x = initial_state(process, num_samples, state_dim, x_init, dtype)
    times = times.to(x.device)
    call = CountedCall(score, "score")
    f = as_coef(process.drift_coef(times), times).expand_as(times)
    g = as_coef(process.diffusion_coef(times), times).expand_as(times)
    h = times.diff()
    noise_scale = g[1:] * h.sqrt()
    s = call.checked(times[-1], x)
    for k in range(num_steps - 1, -1, -1):
        if k < num_steps - 1:
            s = call(times[k + 1], x)
        x = x - (f[k + 1] * x - g[k + 1] ** 2 * s) * h[k] + noise_scale[k] * torch.randn_like(x)
    return SampleResult(check_samples(x, "score"), call.count, times)
