"""The exponential integrator for critically damped Langevin diffusion."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..._validation import shape_of
from ._common import (
    CountedCall,
    SampleResult,
    check_process,
    check_samples,
    horizon_of,
    initial_state,
    make_times,
    sampler_dtype,
)

CLD_PROCESS = ("horizon", "drift_matrix", "diffusion_coef", "transition", "prior")


def _psd_sqrt(cov: Tensor) -> Tensor:
    lam, vec = torch.linalg.eigh(0.5 * (cov + cov.transpose(-1, -2)))
    return vec @ torch.diag_embed(lam.clamp(min=0).sqrt()) @ vec.transpose(-1, -2)


def _step_tables(process, times: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per step ``k`` (from ``t_{k+1}`` down to ``t_k``), for all ``k`` at once:
    ``e^{-A h}`` (N, 2, 2), the velocity-score column ``g^2 \\int_0^h e^{-A u} du\\, e_v``
    (N, 2), and a square root of the noise covariance ``E^{-1} \\Sigma E^{-T}`` (N, 2, 2).
    The first two come from one matrix exponential of ``[[-A, I], [0, 0]] h``."""
    dtype = times.dtype
    a = torch.as_tensor(process.drift_matrix(), dtype=dtype)
    g2 = torch.as_tensor(process.diffusion_coef(), dtype=dtype) ** 2
    h = times.diff()[:, None, None]
    block = torch.zeros(times.shape[0] - 1, 4, 4, dtype=dtype)
    block[:, :2, :2] = -a * h
    block[:, :2, 2:] = torch.eye(2, dtype=dtype) * h
    exp = torch.linalg.matrix_exp(block)
    propagate, integral = exp[:, :2, :2], exp[:, :2, 2:]
    mean, cov = process.transition(times[:-1], times[1:])
    inv = torch.linalg.inv(mean.to(dtype))
    noise = _psd_sqrt(inv @ cov.to(dtype) @ inv.transpose(-1, -2))
    return propagate, g2 * integral[:, :, 1], noise


def _apply(matrix: Tensor, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    return matrix[0, 0] * x + matrix[0, 1] * v, matrix[1, 0] * x + matrix[1, 1] * v


def cld_sampler(
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
    r"""Sample critically damped Langevin diffusion (CLD) backwards in time with the
    exponential integrator: the linear part exactly, the velocity score frozen at the
    start of each reverse step (Chen et al., 2023, who show CLD has the same complexity
    as the OU sampler).

    Forward CLD on ``z = (x, v)``, per coordinate: ``dz = A z dt + G dW``,
    ``G G^T = diag(0, g^2)``. A reverse step from ``t_{k+1}`` to ``t_k`` (length ``h``):

    .. math::

        z_k = e^{-A h} z_{k+1} + g^2 \left(\int_0^h e^{-A u} du\right) e_v\,
              s_v(t_{k+1}, z_{k+1}) + \eta_k,
        \qquad \eta_k \sim \mathcal N(0, E^{-1} \Sigma E^{-\top}),

    ``(E, \Sigma)`` the forward transition over the step, ``s_v = \nabla_v \log q_t``.

    **References:** S. Chen et al., *Sampling is as easy as learning the score*, ICLR
    2023; T. Dockhorn, A. Vahdat, K. Kreis, *Score-based generative modeling with
    critically-damped Langevin diffusion*, ICLR 2022.

    Example::

        from pyro_latdiff.score import CriticallyDampedLangevin
        from pyro_latdiff.testing import gaussian_cld_velocity_score

        cld = CriticallyDampedLangevin(horizon=5.0)
        score = gaussian_cld_velocity_score(cld, torch.ones(2), torch.full((2,), 0.5))
        result = cld_sampler(score, cld, 1000, 50, state_dim=2)  # positions (1000, 2)

    :param callable score: ``score(t, z)``, ``z = concat(x, v)`` of shape
        ``(num_samples, 2 state_dim)``; returns the velocity score ``(num_samples,
        state_dim)`` or the full score ``(num_samples, 2 state_dim)`` (velocity half used).
    :param process: CLD with ``horizon``, ``drift_matrix()``, ``diffusion_coef()``,
        ``transition(s, t)`` and ``prior(shape)``, e.g.
        :class:`~pyro_latdiff.score.CriticallyDampedLangevin`.
    :param int num_samples: number of independent samples.
    :param int num_steps: number of steps ``N``.
    :param int state_dim: position dimension ``D``.
    :param schedule: ``"uniform"`` or an increasing tensor of ``N + 1`` times.
    :type schedule: str or torch.Tensor
    :param t_min: the time the sampler stops at, ``>= 0``: a float
        or a 0-d float tensor.
    :param torch.Tensor x_init: optional start ``(num_samples, 2 state_dim)``.
    :returns: positions at ``t_min`` ``(num_samples, state_dim)``, the number of score
        calls and the grid.
    :rtype: SampleResult
    """
    check_process(process, CLD_PROCESS)
    dtype = sampler_dtype(x_init)
    times = make_times(horizon_of(process), num_steps, schedule, t_min, dtype)
    z = initial_state(process, num_samples, 2 * state_dim, x_init, dtype)
    propagate, column, noise = (m.to(z.device) for m in _step_tables(process, times))
    times = times.to(z.device)
    call = CountedCall(score, "score")
    s = call.checked(times[-1], z, any_shape=True)  # it decides which of two shapes
    if isinstance(s, Tensor) and s.shape == z.shape:
        velocity_half = True
    elif isinstance(s, Tensor) and s.shape == (num_samples, state_dim):
        velocity_half = False
        call.out_dim = state_dim  # the later calls are checked against it
    else:
        actual = shape_of(s) if isinstance(s, Tensor) else type(s).__name__
        raise ValueError(
            f"Expected `score(t, z)` to return shape {(num_samples, state_dim)} (velocity "
            f"score) or {shape_of(z)}, actual {actual}"
        )
    if not torch.isfinite(s).all():
        raise ValueError("Expected `score(t, z)` to be finite, actual NaN or inf")
    x, v = z.chunk(2, dim=-1)
    for k in range(num_steps - 1, -1, -1):
        if k < num_steps - 1:
            s = call(times[k + 1], torch.cat([x, v], dim=-1))
        s_v = s[..., state_dim:] if velocity_half else s
        x, v = _apply(propagate[k], x, v)
        eta_x, eta_v = _apply(noise[k], torch.randn_like(x), torch.randn_like(v))
        x = x + column[k, 0] * s_v + eta_x
        v = v + column[k, 1] * s_v + eta_v
    return SampleResult(check_samples(x, "score"), call.count, times)
