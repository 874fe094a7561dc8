"""The exponential integrator of Chen et al. (2023) for scalar-linear forward processes."""

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
    score_step_coefs,
)


def exponential_integrator(
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
    r"""Reverse-time SDE with the linear part integrated exactly and the score frozen at
    the start of each step (Chen et al., 2023).

    For ``dX = f(t) X dt + g(t) dW`` with transition ``X_t | X_s ~ N(a(s, t) X_s,
    \sigma(s, t)^2 I)``, one reverse step from ``t_{k+1}`` to ``t_k`` is

    .. math::

        x_k = \frac{x_{k+1}}{a} + c_k\, s(t_{k+1}, x_{k+1}) + \frac{\sigma}{a} \xi_k,
        \qquad c_k = \frac{1}{a} \int_{t_k}^{t_{k+1}} g(u)^2 a(u, t_{k+1})\, du,

    with ``a = a(t_k, t_{k+1})``, ``\sigma = \sigma(t_k, t_{k+1})``; ``c_k`` from the
    process's ``score_step_weight`` where it has one (variance preserving and exploding
    processes), else by Gauss-Legendre quadrature, once per grid. For the OU process
    ``dX = -X dt + \sqrt{2} dB`` this is Chen et al.'s
    ``x_k = e^h x_{k+1} + 2 (e^h - 1) s + \sqrt{e^{2h} - 1}\, \xi``; for variance
    preserving processes ``c_k = 2 (1 / a - 1)``; for variance exploding ones
    ``a = 1``, ``c_k = \sigma^2``.

    **References:** S. Chen, S. Chewi, J. Li, Y. Li, A. Salim, A. R. Zhang, *Sampling is
    as easy as learning the score*, ICLR 2023.

    Example::

        from pyro_latdiff.score import OrnsteinUhlenbeck
        from pyro_latdiff.testing import GaussianMixture

        process = OrnsteinUhlenbeck(4.0)
        data = GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.5]]), 0.4)
        score = data.score(process)  # or a trained score network
        result = exponential_integrator(score, process, 1000, 40, state_dim=2)

    :param callable score: ``score(t, x)``, ``t`` a 0-d tensor, ``x`` of shape
        ``(num_samples, state_dim)``; returns a tensor shaped like ``x``.
    :param process: forward process with ``horizon``, ``drift_coef(t)``,
        ``diffusion_coef(t)``, ``marginal_coefs(t)``, ``transition_coefs(s, t)`` and
        ``prior(shape)``.
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
    check_process(process, ("horizon", "diffusion_coef", "transition_coefs", "prior"))
    dtype = sampler_dtype(x_init)
    times = make_times(horizon_of(process), num_steps, schedule, t_min, dtype)
    x = initial_state(process, num_samples, state_dim, x_init, dtype)
    times = times.to(x.device)
    call = CountedCall(score, "score")
    scale, std = (as_coef(c, times) for c in process.transition_coefs(times[:-1], times[1:]))
    inv_scale = 1 / scale
    noise_scale = std * inv_scale
    score_coef = score_step_coefs(process, times)
    s = call.checked(times[-1], x)
    for k in range(num_steps - 1, -1, -1):
        if k < num_steps - 1:
            s = call(times[k + 1], x)
        x = inv_scale[k] * x + score_coef[k] * s + noise_scale[k] * torch.randn_like(x)
    return SampleResult(check_samples(x, "score"), call.count, times)
