"""The probability-flow ODE of a scalar-linear forward process, solved by torchdiffeq."""

from __future__ import annotations

from collections.abc import Callable

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

# torchdiffeq's fixed-grid methods step on the schedule; adaptive ones choose their own
# steps and only report at the grid points.
FIXED_GRID_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4")
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2")


def probability_flow_ode(
    score: Callable[[Tensor, Tensor], Tensor],
    process,
    num_samples: int,
    num_steps: int,
    *,
    state_dim: int,
    schedule: str | Tensor = "uniform",
    t_min: float | Tensor = 0.0,
    x_init: Tensor | None = None,
    method: str = "heun2",
    rtol: float = 1e-6,
    atol: float = 1e-8,
) -> SampleResult:
    r"""Integrate the probability-flow ODE from ``t = horizon`` down to ``t_min``:

    .. math::

        \frac{dx}{dt} = f(t)\, x - \tfrac{1}{2} g(t)^2 s(t, x),

    whose flow carries the forward marginal at ``horizon`` to the one at ``t_min``
    (Song et al., 2021). Deterministic given the start; with the exact score of Gaussian
    data the flow is affine and its law is known exactly
    (:func:`~pyro_latdiff.testing.gaussian_sampler_law`).

    **References:** Y. Song, J. Sohl-Dickstein, D. P. Kingma, A. Kumar, S. Ermon,
    B. Poole, *Score-based generative modeling through stochastic differential
    equations*, ICLR 2021; S. Chen et al., *The probability flow ODE is provably fast*,
    NeurIPS 2023.

    Example::

        from pyro_latdiff.score import OrnsteinUhlenbeck
        from pyro_latdiff.testing import GaussianMixture

        process = OrnsteinUhlenbeck(4.0)
        data = GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.5]]), 0.4)
        score = data.score(process)  # or a trained score network
        result = probability_flow_ode(score, process, 1000, 50, state_dim=2, method="rk4")

    :param callable score: ``score(t, x)``, ``t`` a 0-d tensor, ``x`` of shape
        ``(num_samples, state_dim)``; returns a tensor shaped like ``x``.
    :param process: forward process with ``horizon``, ``drift_coef(t)``,
        ``diffusion_coef(t)``, ``marginal_coefs(t)`` and ``prior(shape)``.
    :param int num_samples: number of independent samples.
    :param int num_steps: number of steps ``N`` of a fixed-grid method; for an adaptive
        method the grid only fixes where the solution is reported.
    :param int state_dim: dimension of one sample.
    :param schedule: ``"uniform"`` or an increasing tensor of ``N + 1`` times.
    :type schedule: str or torch.Tensor
    :param t_min: the time the flow stops at, ``>= 0``: a float
        or a 0-d float tensor.
    :param torch.Tensor x_init: optional start ``(num_samples, state_dim)``.
    :param str method: a torchdiffeq method, one of ``FIXED_GRID_METHODS`` or
        ``ADAPTIVE_METHODS``.
    :param float rtol: relative tolerance of an adaptive method.
    :param float atol: absolute tolerance of an adaptive method.
    :returns: samples at ``t_min``, the number of score calls and the grid.
    :rtype: SampleResult
    """
    from torchdiffeq import odeint

    if method not in FIXED_GRID_METHODS + ADAPTIVE_METHODS:
        raise ValueError(
            f"Expected `method` in {FIXED_GRID_METHODS + ADAPTIVE_METHODS}, actual {method!r}"
        )
    check_process(process)
    dtype = sampler_dtype(x_init)
    times = make_times(horizon_of(process), num_steps, schedule, t_min, dtype)
    x = initial_state(process, num_samples, state_dim, x_init, dtype)
    times = times.to(x.device)
    call = CountedCall(score, "score")
    call.checked(times[-1], x)
    call.count = 0  # the probe is not part of the solve

    def velocity(t: Tensor, y: Tensor) -> Tensor:
        # An adaptive solver's first-step probe and its last step may reach outside the
        # grid, where a process's coefficients need not exist (a VP beta below 0): there
        # the field is held at the grid's end, which leaves the solution on it unchanged.
        t = t.clamp(times[0], times[-1])
        f = as_coef(process.drift_coef(t), y)
        g = as_coef(process.diffusion_coef(t), y)
        return f * y - 0.5 * g**2 * call(t, y)

    options = {} if method in ADAPTIVE_METHODS else None
    path = odeint(velocity, x, times.flip(0), method=method, rtol=rtol, atol=atol, options=options)
    return SampleResult(check_samples(path[-1], "score"), call.count, times)
