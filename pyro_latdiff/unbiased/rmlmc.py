r"""Randomised multilevel Monte Carlo: unbiased expectations from coupled Euler levels.

Rhee & Glynn (2015). Level :math:`\ell` is Euler with ``base_steps * 2**l`` steps; fine and
coarse paths share Brownian increments. With :math:`L` drawn from
:math:`P(L \ge \ell) = 2^{-r \ell}` the single-term estimator is
:math:`(g(X^{\ell}) - g(X^{\ell - 1})) / P(L = \ell)` at :math:`\ell = L`, and the
coupled-sum estimator :math:`\sum_{\ell \le L} (g(X^{\ell}) - g(X^{\ell-1})) /
P(L \ge \ell)` (:math:`g(X^{-1}) = 0`). Both have finite variance and finite mean
cost when :math:`\mathbb E (g(X^\ell) - g(X^{\ell-1}))^2 = O(2^{-\beta \ell})` with
:math:`1 < r < \beta`; with additive noise Euler is Milstein, :math:`\beta = 2`,
and the default ``r = 1.5`` sits in the middle of :math:`(1, 2)`.

Shapes and cost are as in :mod:`pyro_latdiff.unbiased`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._validation import (
    check_fn,
    check_fn_output,
    check_positive_float,
    check_positive_int,
    check_sde_arguments,
    check_x0,
)
from .results import DEFAULT_SAMPLES_PER_CHUNK, Drift, Sigma, UnbiasedEstimate, summarise

__all__ = ["rmlmc_expectation"]


def _euler_levels(drift, x0, sigma, t0, t1, num, levels, base_steps):
    """Euler with ``base_steps * 2**l`` uniform steps for each ``l`` in ``levels``
    (increasing), all driven by one Brownian path drawn on the finest grid.

    Returns the terminal states ``(len(levels), num) + x0.shape`` and the number of
    drift evaluations per sample.
    """
    top = levels[-1]
    n_fine = base_steps * 2**top
    h_fine = (t1 - t0) / n_fine
    dtype, device = x0.dtype, x0.device
    noise = torch.randn((n_fine, num) + x0.shape, dtype=dtype, device=device)
    noise = noise * math.sqrt(h_fine)
    finals, cost = [], 0
    for lvl in levels:
        span = 2 ** (top - lvl)
        n = n_fine // span
        h = span * h_fine
        increments = noise.view((n, span, num) + x0.shape).sum(1) if span > 1 else noise
        times = t0 + h * torch.arange(n, dtype=dtype, device=device)
        x = x0.expand((num,) + x0.shape)
        for k in range(n):
            x = x + drift(times[k], x) * h + sigma * increments[k]
        finals.append(x)
        cost += n
    return torch.stack(finals), cost


def rmlmc_expectation(
    fn: Callable[[Tensor], Tensor],
    drift: Drift,
    x0: Tensor,
    t1: float,
    *,
    sigma: Sigma = 1.0,
    num_samples: int,
    t0: float = 0.0,
    base_steps: int = 1,
    decay: float = 1.5,
    estimator: str = "coupled",
    chunk_size: int | None = None,
) -> UnbiasedEstimate:
    r"""Unbiased estimate of :math:`\mathbb E\, g(X_{t_1})` by randomised multilevel
    Monte Carlo (Rhee & Glynn 2015) with coupled Euler levels.

    The level :math:`L` has :math:`P(L \ge \ell) = 2^{-r \ell}` (``r = decay``);
    level :math:`\ell` is Euler with ``base_steps * 2**l`` steps, coupled levels
    share Brownian increments. Samples are batched by their drawn level (a loop over
    the distinct levels, never over samples). See the module docstring above for the two
    estimators and the finite-variance condition ``1 < decay < beta`` (``beta = 2``
    for Euler with additive noise and a smooth drift).

    :param callable fn: ``g(x)``, as in :func:`expectation`.
    :param callable drift: ``drift(t, x)``; ``t`` is a 0-d tensor here.
    :param torch.Tensor x0: initial state, ``batch_shape + (D,)``.
    :param float t1: final time.
    :param sigma: constant diffusion, as in :func:`expectation`.
    :type sigma: float or torch.Tensor
    :param int num_samples: number of i.i.d. draws.
    :param float t0: initial time.
    :param int base_steps: Euler steps of level 0.
    :param float decay: ``r`` in ``P(L >= l) = 2**(-r l)``, in ``(1, 2)`` for finite
        variance and finite mean cost.
    :param str estimator: ``"coupled"`` (coupled sum) or ``"single"`` (single term).
    :param int chunk_size: samples simulated at once.
    :rtype: UnbiasedEstimate
    """
    check_positive_int("base_steps", base_steps, strict=True)
    decay = check_positive_float("decay", decay)
    if not decay > 1:  # the expected cost is sum_l P(L >= l) 2**l = sum_l 2**((1 - r) l)
        raise ValueError(
            f"Expected `decay` > 1 (at or below 1 the expected cost, and memory, of a "
            f"sample is infinite; below beta = 2 for a finite variance), actual {decay}"
        )
    if estimator not in ("coupled", "single"):
        raise ValueError(f"Expected `estimator` to be 'coupled' or 'single', actual {estimator!r}")
    check_x0(x0)
    check_fn("fn", fn, x0)
    _, sigma_t, chunk = check_sde_arguments(
        drift, x0, t0, t1, sigma, num_samples, chunk_size, DEFAULT_SAMPLES_PER_CHUNK
    )
    dtype, device = x0.dtype, x0.device
    u = 1.0 - torch.rand(num_samples, dtype=torch.float64)  # (0, 1]
    levels = torch.floor(-torch.log2(u) / decay).long()  # P(L >= l) = 2**(-decay l)

    def p_geq(lvl: int) -> float:
        return 2.0 ** (-decay * lvl)

    values = None
    depths = torch.empty(num_samples, dtype=torch.long)
    costs = torch.empty(num_samples, dtype=torch.long)
    for lvl in torch.unique(levels).tolist():
        where = (levels == lvl).nonzero().squeeze(-1)
        if estimator == "coupled":
            lv = list(range(0, lvl + 1))
        else:
            lv = list(range(max(lvl - 1, 0), lvl + 1))
        for start in range(0, where.numel(), chunk):
            rows = where[start : start + chunk]
            num = rows.numel()
            x, cost = _euler_levels(drift, x0, sigma_t, float(t0), float(t1), num, lv, base_steps)
            g = fn(x.reshape((-1,) + x.shape[2:]))
            check_fn_output("fn", g, x.reshape((-1,) + x.shape[2:]))
            g = g.reshape((len(lv), num) + g.shape[1:])
            if estimator == "coupled":
                diffs = torch.cat([g[:1], g[1:] - g[:-1]])
                scale = torch.tensor([1.0 / p_geq(k) for k in lv], dtype=dtype, device=device)
                val = (diffs * scale.view((-1,) + (1,) * (g.dim() - 1))).sum(0)
            else:
                p_eq = p_geq(lvl) - p_geq(lvl + 1)
                val = (g[-1] - g[0]) / p_eq if lvl > 0 else g[0] / p_eq
            if values is None:
                values = torch.empty((num_samples,) + val.shape[1:], dtype=dtype, device=device)
            values[rows] = val
            depths[rows] = base_steps * 2**lvl
            costs[rows] = cost
    return summarise(values, depths, costs, "rmlmc")
