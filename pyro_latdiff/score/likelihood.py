r"""The exact log-likelihood of the probability-flow ODE.

A score :math:`s_\theta` defines, besides the reverse SDE, the deterministic flow

.. math::

    \frac{dx}{dt} = v(t, x) = f(t)\, x - \tfrac12 g(t)^2 s_\theta(t, x),

which carries the forward marginals into one another when :math:`s_\theta` is the
exact score (Song et al. 2021). Its density follows by the instantaneous change of
variables, integrated from the data at :math:`t = \epsilon` to :math:`T`:

.. math::

    \log p_\epsilon(x) = \log p_T(x_T) + \int_\epsilon^T \nabla\cdot v(t, x_t)\, dt,
    \qquad \nabla\cdot v = D f - \tfrac12 g^2\, \nabla\cdot s_\theta,

solved with ``torchdiffeq.odeint``; the divergence is exact (``D`` backward passes,
the default for small ``D``) or Hutchinson's estimator with a probe fixed along each
solve (Grathwohl et al. 2019, FFJORD), which keeps the estimate of the density unbiased.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchdiffeq import odeint

from .._validation import check_positive_int, check_provides
from .losses import divergence
from .samplers._common import CountedCall
from .samplers.probability_flow import ADAPTIVE_METHODS

__all__ = ["bits_per_dim", "ode_log_likelihood"]


def ode_log_likelihood(
    process,
    score,
    x: Tensor,
    *,
    truncation: float = 1e-5,
    exact_divergence: bool | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    chunk_size: int = 1000,
) -> Tensor:
    r"""Log-density of each row of ``x`` under the probability-flow ODE of ``score``.

    :param process: a scalar-coefficient linear forward process.
    :param score: ``score(t, x)`` (``t`` 0-d).
    :param torch.Tensor x: points, shape ``(n, D)``.
    :param float truncation: the data time :math:`\epsilon \ge 0`.
    :param bool exact_divergence: exact divergence; default: ``D <= 16``.
    :param float rtol: ODE solver tolerance. :param float atol: ODE solver tolerance.
    :param str method: an adaptive torchdiffeq method (``dopri5``, ``bosh3``, ...).
    :param int chunk_size: rows solved together.
    :returns: ``(n,)``, in nats.
    """
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(
            "Expected `x` of shape (n, state_dim), actual "
            f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
        )
    check_positive_int("chunk_size", chunk_size)
    # A scalar-coefficient process (not, e.g., CriticallyDampedLangevin's matrices).
    check_provides("process", process, ("horizon", "drift_coef", "diffusion_coef", "prior"))
    if method not in ADAPTIVE_METHODS:  # a fixed-grid method would take one step
        raise ValueError(
            f"Expected `method` to be an adaptive torchdiffeq method {ADAPTIVE_METHODS} (the "
            f"solve from truncation to the horizon has no grid of its own), actual {method!r}"
        )
    horizon = float(process.horizon)
    if not 0 <= truncation < horizon:
        raise ValueError(f"Expected `truncation` in [0, {horizon}), actual {truncation!r}")
    d = x.shape[-1]
    score = CountedCall(score, "score")  # every call's shape checked
    with torch.no_grad():  # the first call fails clearly on another state dimension
        score.checked(torch.tensor(horizon, dtype=x.dtype, device=x.device), x[:1])
    exact = d <= 16 if exact_divergence is None else bool(exact_divergence)
    times = torch.tensor([truncation, horizon], dtype=x.dtype, device=x.device)
    out = []
    for chunk in x.split(chunk_size):
        probe = torch.randint(0, 2, chunk.shape, dtype=x.dtype, device=x.device) * 2 - 1

        def flow(t: Tensor, state: Tensor, probe: Tensor = probe) -> Tensor:
            t = t.clamp(times[0], times[-1])  # adaptive steps may reach past the ends
            y = state[..., :d]
            with torch.enable_grad():
                y = y.detach().requires_grad_(True)
                if exact:
                    div, s = divergence(score, t, y, exact=True, create_graph=False)
                else:
                    s = score(t, y)
                    (grad,) = torch.autograd.grad((s * probe).sum(), y)
                    div = (grad * probe).sum(-1)
            f = process.drift_coef(t)
            g2 = process.diffusion_coef(t).square()
            velocity = f * y.detach() - 0.5 * g2 * s.detach()
            return torch.cat([velocity, (d * f - 0.5 * g2 * div.detach())[..., None]], -1)

        state = torch.cat([chunk, torch.zeros_like(chunk[..., :1])], -1)
        with torch.no_grad():
            end = odeint(flow, state, times, rtol=rtol, atol=atol, method=method)[-1]
        x_end, integral = end[..., :d], end[..., d]
        prior = process.prior(x_end.shape, dtype=x.dtype, device=x.device)
        out.append(prior.log_prob(x_end) + integral)
    return torch.cat(out)


def bits_per_dim(log_likelihood, state_dim: int) -> float | Tensor:
    r"""Nats per point to bits per dimension: :math:`-\ell / (D \log 2)`."""
    check_positive_int("state_dim", state_dim)
    return -log_likelihood / (state_dim * math.log(2))
