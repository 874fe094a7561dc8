r"""Time grids: uniform, and grids chosen from the MMSE curve through the I-MMSE
relation of the channel ``Y_t = t X + W_t`` (Reeves & Pfister, 2025).

With ``M(t) = E|X - E[X | Y_t]|^2``, the denoiser sampler's discretisation term is
``\Delta_n = \tfrac12 \sum_k e_k``, ``e_k = \delta_k M(t_{k-1}) - \int_{t_{k-1}}^{t_k} M``.
:func:`equalised_times` makes every ``e_k`` equal, which minimises the largest one;
:func:`immse_times` gives equal increments of ``\int_0^t M = 2 I(X; Y_t)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..._validation import check_positive_int, shape_of


def uniform_times(
    horizon: float, num_steps: int, t_min: float = 0.0, dtype: torch.dtype | None = None
) -> Tensor:
    """``num_steps + 1`` equally spaced times from ``t_min`` to ``horizon``.

    :param float horizon: last time. :param int num_steps: number of steps.
    :param float t_min: first time. :param torch.dtype dtype: default torch's default.
    """
    check_positive_int("num_steps", num_steps)
    if not t_min < horizon:
        raise ValueError(f"Expected `t_min` < `horizon`, actual {t_min} >= {horizon}")
    return torch.linspace(t_min, horizon, num_steps + 1, dtype=dtype)


def check_curve(mmse_times, mmse_values) -> tuple[Tensor, Tensor]:
    """The curve in float64, made nonincreasing by its running minimum: the MMSE is, and a
    model's Monte Carlo estimate may wiggle, which would make the step terms
    non-monotone in the step length."""
    if not isinstance(mmse_times, Tensor) or mmse_times.dim() != 1 or mmse_times.shape[0] < 2:
        actual = shape_of(mmse_times) if isinstance(mmse_times, Tensor) else type(mmse_times)
        raise ValueError(f"Expected `mmse_times` to be a 1-D tensor of >= 2 times, actual {actual}")
    if not (mmse_times.diff() > 0).all() or mmse_times[0] != 0:
        raise ValueError(
            "Expected `mmse_times` to increase strictly from 0, actual "
            f"[{mmse_times[0].item()}, ...] with steps {mmse_times.diff().min().item()} min"
        )
    if not isinstance(mmse_values, Tensor) or mmse_values.shape != mmse_times.shape:
        actual = shape_of(mmse_values) if isinstance(mmse_values, Tensor) else type(mmse_values)
        raise ValueError(
            f"Expected `mmse_values` of shape {shape_of(mmse_times)} (as `mmse_times`), "
            f"actual {actual}"
        )
    if not (torch.isfinite(mmse_values).all() and (mmse_values >= 0).all()):
        raise ValueError("Expected `mmse_values` to be finite and >= 0, actual NaN or < 0")
    return mmse_times.double(), mmse_values.double().cummin(0).values


def cumulative_integral(times: Tensor, values: Tensor) -> Tensor:
    """``\\int_0^{t_j}`` of the piecewise linear curve, at every grid point."""
    areas = 0.5 * (values[1:] + values[:-1]) * times.diff()
    return torch.cat([areas.new_zeros(1), areas.cumsum(0)])


def curve_at(t: Tensor, times: Tensor, values: Tensor, cumulative: Tensor) -> tuple[Tensor, Tensor]:
    """The piecewise linear curve and its integral from 0, at ``t`` (any shape)."""
    j = torch.searchsorted(times, t.contiguous(), right=True).clamp(1, times.shape[0] - 1)
    t0, t1 = times[j - 1], times[j]
    v0, v1 = values[j - 1], values[j]
    u = t - t0
    slope = (v1 - v0) / (t1 - t0)
    return v0 + slope * u, cumulative[j - 1] + v0 * u + 0.5 * slope * u**2


def immse_times(mmse_times: Tensor, mmse_values: Tensor, num_steps: int) -> Tensor:
    r"""A grid with equal increments of ``\int_0^t M(s) ds`` (twice the mutual
    information, by the I-MMSE relation): short steps where the MMSE is large.

    :param torch.Tensor mmse_times: increasing from 0 to ``t_max``, ``(G,)``.
    :param torch.Tensor mmse_values: ``M`` at those times, ``(G,)``.
    :param int num_steps: number of steps ``n``.
    :returns: ``(n + 1,)`` float64 times from 0 to ``t_max``.
    """
    check_positive_int("num_steps", num_steps)
    times, values = check_curve(mmse_times, mmse_values)
    cumulative = cumulative_integral(times, values)
    levels = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64) * cumulative[-1]
    # invert the increasing cumulative integral by bisection, all levels at once
    lo, hi = torch.zeros_like(levels), torch.full_like(levels, float(times[-1]))
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        below = curve_at(mid, times, values, cumulative)[1] < levels
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    out = 0.5 * (lo + hi)
    out[0], out[-1] = 0.0, times[-1]
    return out


def _march(eps: Tensor, num_steps: int, times, values, cumulative) -> Tensor:
    """The grids ``(num_steps + 1, B)`` of ``num_steps`` steps that each carry the
    discretisation term ``eps`` (one per entry), stopped at ``t_max``."""
    t = torch.zeros_like(eps)
    grid = [t]
    t_max = float(times[-1])
    for _ in range(num_steps):
        m_t, c_t = curve_at(t, times, values, cumulative)
        lo, hi = t, torch.full_like(t, t_max)
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            err = (mid - t) * m_t - (curve_at(mid, times, values, cumulative)[1] - c_t)
            below = err < eps
            lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
        t = 0.5 * (lo + hi)
        grid.append(t)
    return torch.stack(grid)


def equalised_times(mmse_times: Tensor, mmse_values: Tensor, num_steps: int) -> Tensor:
    r"""The grid whose steps all carry the same discretisation term
    ``e_k = \delta_k M(t_{k-1}) - \int_{t_{k-1}}^{t_k} M`` of Reeves & Pfister's
    identity, for an MMSE curve ``M`` (exact, or a model's held-out curve from
    :func:`~pyro_latdiff.score.bounds.mmse_curve`), piecewise linear between its points
    and made nonincreasing by its running minimum.

    **References:** G. Reeves, H. D. Pfister, *Discrete-time diffusion sampling*, 2025.

    :param torch.Tensor mmse_times: increasing from 0 to ``t_max``, ``(G,)``.
    :param torch.Tensor mmse_values: ``M`` at those times, ``(G,)``.
    :param int num_steps: number of steps ``n``.
    :returns: ``(n + 1,)`` float64 times from 0 to ``t_max``.
    """
    check_positive_int("num_steps", num_steps)
    times, values = check_curve(mmse_times, mmse_values)
    cumulative = cumulative_integral(times, values)
    t_max = float(times[-1])
    # the end point of n equal-term steps grows with the term: bracket it on a batch of
    # candidates, refined a few times
    lo, hi = 1e-16, t_max * float(values.max()) + 1e-12
    for _ in range(5):
        candidates = torch.logspace(math.log10(lo), math.log10(hi), 33, dtype=torch.float64)
        ends = _march(candidates, num_steps, times, values, cumulative)[-1]
        j = int((ends < t_max * (1 - 1e-9)).sum().clamp(1, 32))
        lo, hi = float(candidates[j - 1]), float(candidates[j])
    # the lower end of the bracket stops just short of t_max, so no step is empty; its
    # last point moves to t_max
    grid = _march(torch.tensor([lo], dtype=torch.float64), num_steps, times, values, cumulative)
    grid = grid[:, 0]
    grid[-1] = t_max
    return grid
