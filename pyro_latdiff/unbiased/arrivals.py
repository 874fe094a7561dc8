r"""Laws of the inter-arrival times of the parametrix estimator's random grid.

The renewal grid :math:`0 = T_0 < T_1 < \dots < T_N < T` of
:mod:`~pyro_latdiff.unbiased.parametrix` has i.i.d. inter-arrival times
:math:`\tau_k = T_k - T_{k-1}` of density :math:`f` and survival function
:math:`\bar F`: an :class:`ArrivalLaw`. The estimator is unbiased for any of them; its
variance and cost depend on the law (``benchmarks/README.md`` measures them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._validation import check_positive_float

__all__ = ["ArrivalLaw", "ExponentialArrivals", "PowerArrivals"]


class ArrivalLaw:
    """Law of the inter-arrival times of the random grid: a positive random variable.

    Subclasses implement :meth:`sample`, :meth:`density` and :meth:`survival`
    (``P(tau > t)``) and :attr:`mean`. The parametrix estimator is unbiased for
    any law whose density is positive on ``(0, T)`` and whose survival function is
    positive on ``(0, T]``, ``T = t1 - t0``; its variance depends on the law.
    """

    def sample(self, shape: tuple[int, ...], dtype: torch.dtype, device=None) -> Tensor:
        """Draw i.i.d. inter-arrival times, strictly positive, of the given shape.

        :param tuple shape: the shape of the draws.
        :param torch.dtype dtype: their dtype.
        :param device: their device.
        :rtype: torch.Tensor
        """
        raise NotImplementedError

    def density(self, t: Tensor) -> Tensor:
        """Probability density at ``t > 0``."""
        raise NotImplementedError

    def survival(self, t: Tensor) -> Tensor:
        """``P(tau > t)``."""
        raise NotImplementedError

    @property
    def mean(self) -> float:
        """``E tau``."""
        raise NotImplementedError


class ExponentialArrivals(ArrivalLaw):
    r"""Exponential inter-arrival times of rate ``rate`` (a Poisson grid), as in
    Henry-Labordère, Tan & Touzi (2017): :math:`f(t) = \lambda e^{-\lambda t}`,
    :math:`\bar F(t) = e^{-\lambda t}`. The number of arrivals before ``T`` is
    Poisson(:math:`\lambda T`), so the mean depth is :math:`1 + \lambda T`.

    :param float rate: the rate :math:`\lambda > 0`.
    """

    def __init__(self, rate: float):
        self.rate = check_positive_float("rate", rate)

    def __repr__(self) -> str:
        return f"ExponentialArrivals(rate={self.rate})"

    def sample(self, shape, dtype, device=None) -> Tensor:
        u = torch.rand(shape, dtype=dtype, device=device)
        # u in [0, 1): -log(1 - u) is in [0, inf); 1 - u > 0 keeps tau finite, and
        # tau = 0 needs u = 0 exactly, which we move to the smallest positive draw.
        u = u.clamp_min(torch.finfo(dtype).tiny)
        return -torch.log(u) / self.rate

    def density(self, t: Tensor) -> Tensor:
        return self.rate * torch.exp(-self.rate * t)

    def survival(self, t: Tensor) -> Tensor:
        return torch.exp(-self.rate * t)

    @property
    def mean(self) -> float:
        return 1.0 / self.rate


class PowerArrivals(ArrivalLaw):
    r"""Beta-type inter-arrival times with more mass near zero:
    :math:`f(t) = (1 - \gamma)\, t^{-\gamma} / h^{1 - \gamma}` on :math:`(0, h)`,
    :math:`\bar F(t) = 1 - (t / h)^{1 - \gamma}`; ``tau = h * Beta(1 - gamma, 1)``.
    This is the law Andersson & Kohatsu-Higa (2017) use to make the parametrix
    estimator's variance finite when the weights are singular like
    :math:`1 / \Delta T` (needs :math:`\gamma > 0`); with a constant sigma it is an
    alternative to the exponential law, not a necessity.

    The horizon ``h`` must exceed ``T = t1 - t0`` (otherwise ``P(N = 0) = 0`` and
    the estimator is undefined). ``P(N = 0) = 1 - (T / h)^{1 - gamma}`` and the
    depth has mean about ``1 + T / E tau``, ``E tau = h (1 - gamma) / (2 - gamma)``.

    :param float gamma: exponent in ``[0, 1)``; ``gamma = 0`` is uniform on ``(0, h)``.
    :param float horizon: the support's upper end ``h > 0``.
    """

    def __init__(self, gamma: float, horizon: float):
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
            raise TypeError(
                f"Expected `gamma` to be a float in [0, 1), actual type {type(gamma).__name__}"
            )
        if not 0.0 <= gamma < 1.0:
            raise ValueError(f"Expected `gamma` in [0, 1), actual {gamma}")
        self.gamma = float(gamma)
        self.horizon = check_positive_float("horizon", horizon)

    def __repr__(self) -> str:
        return f"PowerArrivals(gamma={self.gamma}, horizon={self.horizon})"

    def sample(self, shape, dtype, device=None) -> Tensor:
        u = 1.0 - torch.rand(shape, dtype=dtype, device=device)  # in (0, 1]
        return self.horizon * u.pow(1.0 / (1.0 - self.gamma))

    def density(self, t: Tensor) -> Tensor:
        s = (t / self.horizon).clamp_min(torch.finfo(t.dtype).tiny)
        out = (1.0 - self.gamma) / self.horizon * s.pow(-self.gamma)
        return torch.where(t < self.horizon, out, torch.zeros_like(out))

    def survival(self, t: Tensor) -> Tensor:
        s = (t / self.horizon).clamp(0.0, 1.0)
        return 1.0 - s.pow(1.0 - self.gamma)

    @property
    def mean(self) -> float:
        return self.horizon * (1.0 - self.gamma) / (2.0 - self.gamma)


def arrivals_or_default(arrivals, duration: float) -> ArrivalLaw:
    """``arrivals`` checked against the interval's ``duration``, or the default law
    ``ExponentialArrivals(rate=1 / duration)`` (mean depth 2) if it is None."""
    if arrivals is None:
        return ExponentialArrivals(rate=1.0 / duration)
    if not isinstance(arrivals, ArrivalLaw):
        raise TypeError(
            f"Expected `arrivals` to be an ArrivalLaw, actual type {type(arrivals).__name__}"
        )
    p0 = float(arrivals.survival(torch.tensor(duration, dtype=torch.float64)))
    if not p0 > 0:
        raise ValueError(
            f"Expected `arrivals` with P(tau > t1 - t0) > 0, actual P(tau > {duration}) = {p0} "
            f"for {arrivals!r} (for PowerArrivals, choose horizon > t1 - t0)"
        )
    return arrivals
