r"""The Ornstein–Uhlenbeck SDE in continuous time: the exact Gaussian transition law.

.. math::

    dX_t = -\lambda X_t\, dt + \sigma\, dW_t, \qquad X_0 = x_0,
    \qquad X_t \sim \mathcal N\!\left(x_0 e^{-\lambda t},\;
    \sigma^2 \frac{1 - e^{-2 \lambda t}}{2 \lambda}\right),

with :math:`\lambda` = ``rate`` (any sign; :math:`\lambda = 0` is Brownian motion).
These are the continuous-time values that an unbiased estimator must hit; the Euler
chain of the same SDE, with its own closed forms, is
:func:`~pyro_latdiff.testing.ou_problem` and
:func:`~pyro_latdiff.testing.ou_terminal_variance`.

Example::

    >>> from pyro_latdiff.testing import ou_terminal_moments
    >>> mean, variance = ou_terminal_moments(1.0, 1.0, rate=1.0)
    >>> round(mean, 4), round(variance, 4)
    (0.3679, 0.4323)
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import Tensor

__all__ = ["ou_drift", "ou_expectation_cos", "ou_terminal_moments"]


def ou_drift(rate: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
    r"""The drift :math:`b(t, x) = -\lambda x`, elementwise, as ``drift(t, x)``.

    :param float rate: :math:`\lambda`.
    :returns: ``drift(t, x)`` returning a tensor of ``x``'s shape.
    :rtype: callable
    """

    def drift(t: Tensor, x: Tensor) -> Tensor:
        return -rate * x

    return drift


def ou_terminal_moments(
    x0: float, t: float, rate: float = 1.0, sigma: float = 1.0
) -> tuple[float, float]:
    r"""Mean :math:`x_0 e^{-\lambda t}` and variance
    :math:`\sigma^2 (1 - e^{-2 \lambda t}) / (2 \lambda)` (:math:`\sigma^2 t` at
    :math:`\lambda = 0`) of :math:`X_t` given :math:`X_0 = x_0`.

    :param float x0: the starting point.
    :param float t: the elapsed time.
    :param float rate: :math:`\lambda`.
    :param float sigma: the diffusion coefficient.
    :returns: ``(mean, variance)``.
    :rtype: tuple(float, float)
    """
    mean = x0 * math.exp(-rate * t)
    if rate == 0.0:
        return mean, sigma**2 * t
    return mean, sigma**2 * (1.0 - math.exp(-2.0 * rate * t)) / (2.0 * rate)


def ou_expectation_cos(
    x0: float, t: float, rate: float = 1.0, sigma: float = 1.0, frequency: float = 1.0
) -> float:
    r""":math:`\mathbb E \cos(\omega X_t) = e^{-\omega^2 v / 2} \cos(\omega m)`, with
    :math:`(m, v)` from :func:`ou_terminal_moments` and :math:`\omega` = ``frequency``.

    :param float x0: the starting point.
    :param float t: the elapsed time.
    :param float rate: :math:`\lambda`.
    :param float sigma: the diffusion coefficient.
    :param float frequency: :math:`\omega`.
    :rtype: float
    """
    mean, variance = ou_terminal_moments(x0, t, rate, sigma)
    return math.exp(-(frequency**2) * variance / 2.0) * math.cos(frequency * mean)
