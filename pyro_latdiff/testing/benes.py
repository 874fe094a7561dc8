r"""The Beneš SDE: a nonlinear diffusion whose transition law is known in closed form.

.. math::

    dX_t = a \tanh(a X_t)\, dt + dW_t, \qquad X_0 = x_0 \in \mathbb R,

(``a = 1`` is Beneš' classical filter). The drift is :math:`b = (\log\cosh(a x))'`
and :math:`b' + b^2 = a^2` is constant, so Girsanov's theorem gives the transition
density in closed form,

.. math::

    p_t(x \mid x_0) = \frac{\cosh(a x)}{\cosh(a x_0)}\, e^{-a^2 t / 2}\,
    \mathcal N(x;\, x_0,\, t),

which is the two-component Gaussian mixture

.. math::

    X_t \sim w_+\, \mathcal N(x_0 + a t,\, t) + w_-\, \mathcal N(x_0 - a t,\, t),
    \qquad w_\pm = \frac{e^{\pm a x_0}}{2 \cosh(a x_0)}.

Hence :math:`\mathbb E X_t = x_0 + a t \tanh(a x_0)`,
:math:`\operatorname{Var} X_t = t + (a t / \cosh(a x_0))^2`, and Fourier moments in
closed form (:func:`benes_expectation_cos`, :func:`benes_expectation_sin`); any other
:math:`\mathbb E\, g(X_t)` by Gauss–Hermite quadrature (:func:`benes_expectation`).
The drift is bounded and Lipschitz (constant :math:`a^2`): ``a`` sets how hard the
problem is for a discretisation.

Example::

    >>> import torch
    >>> from pyro_latdiff.unbiased import expectation
    >>> from pyro_latdiff.testing import benes_drift, benes_expectation_cos
    >>> exact = benes_expectation_cos(0.5, 1.0)  # E cos X_1 from x0 = 0.5
    >>> result = expectation(lambda x: torch.cos(x[..., 0]), benes_drift(),
    ...                      torch.tensor([0.5], dtype=torch.float64), 1.0,
    ...                      num_samples=10_000)
    >>> bool(abs(result.estimate - exact) < 5 * result.stderr)
    True

References: V. E. Beneš (1981), *Exact finite-dimensional filters for certain
diffusions with nonlinear drift*, Stochastics 5, 65–92.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pyro.distributions as dist
import torch
from torch import Tensor

__all__ = [
    "benes_drift",
    "benes_expectation",
    "benes_expectation_cos",
    "benes_expectation_sin",
    "benes_terminal_distribution",
    "benes_terminal_moments",
    "benes_transition_density",
]

_DTYPE = torch.float64


def benes_drift(a: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
    r"""The drift :math:`b(t, x) = a \tanh(a x)`, elementwise, as ``drift(t, x)``.

    :param float a: the scale (``a = 1``: the classical Beneš SDE).
    :returns: ``drift(t, x)`` returning a tensor of ``x``'s shape.
    :rtype: callable
    """

    def drift(t: Tensor, x: Tensor) -> Tensor:
        return a * torch.tanh(a * x)

    return drift


def _log_cosh(x: Tensor) -> Tensor:
    # stable for large |x| and smooth at 0 (autograd gives the right derivatives there)
    return torch.logaddexp(x, -x) - math.log(2.0)


def benes_transition_density(
    x: Tensor, x0: float | Tensor, t: float | Tensor, a: float = 1.0
) -> Tensor:
    r"""The transition density
    :math:`p_t(x \mid x_0) = \cosh(a x) / \cosh(a x_0)\, e^{-a^2 t / 2}\,
    \mathcal N(x; x_0, t)` of the Beneš SDE, computed in log space (no overflow).

    :param torch.Tensor x: the end point(s).
    :param x0: the starting point(s), broadcast against ``x``.
    :type x0: float or torch.Tensor
    :param t: the elapsed time(s) ``t > 0``, broadcast against ``x``.
    :type t: float or torch.Tensor
    :param float a: the scale of the drift :math:`a \tanh(a x)`.
    :returns: the density, of the broadcast shape of ``x``, ``x0`` and ``t``.
    :rtype: torch.Tensor
    """
    x0 = torch.as_tensor(x0, dtype=x.dtype)
    t = torch.as_tensor(t, dtype=x.dtype)
    log_p = (
        _log_cosh(a * x)
        - _log_cosh(a * x0)
        - a**2 * t / 2.0
        + dist.Normal(x0, t.sqrt()).log_prob(x)
    )
    return log_p.exp()


def benes_terminal_distribution(
    x0: float | Tensor, t: float | Tensor, a: float = 1.0
) -> dist.MixtureSameFamily:
    r"""The exact law of :math:`X_t` given :math:`X_0 = x_0`: the mixture
    :math:`w_+ \mathcal N(x_0 + a t, t) + w_- \mathcal N(x_0 - a t, t)` with
    :math:`w_\pm = e^{\pm a x_0} / (2 \cosh(a x_0))`, for exact sampling.

    :param x0: the starting point(s); a tensor gives a batch of laws.
    :type x0: float or torch.Tensor
    :param t: the elapsed time(s) ``t > 0``.
    :type t: float or torch.Tensor
    :param float a: the scale of the drift :math:`a \tanh(a x)`.
    :returns: a scalar-event distribution with ``batch_shape`` the broadcast shape of
        ``x0`` and ``t`` (float64 unless ``x0`` is a tensor of another dtype).
    :rtype: pyro.distributions.MixtureSameFamily
    """
    dtype = x0.dtype if isinstance(x0, Tensor) else _DTYPE
    x0 = torch.as_tensor(x0, dtype=dtype)
    t = torch.as_tensor(t, dtype=dtype)
    x0, t = torch.broadcast_tensors(x0, t)
    shift = a * t
    logits = torch.stack([a * x0, -a * x0], dim=-1)
    means = torch.stack([x0 + shift, x0 - shift], dim=-1)
    scales = t.sqrt().unsqueeze(-1).expand(means.shape)
    return dist.MixtureSameFamily(dist.Categorical(logits=logits), dist.Normal(means, scales))


def benes_terminal_moments(x0: float, t: float, a: float = 1.0) -> tuple[float, float]:
    r"""Mean and variance of :math:`X_t` given :math:`X_0 = x_0`:
    :math:`x_0 + a t \tanh(a x_0)` and :math:`t + (a t / \cosh(a x_0))^2`.

    :param float x0: the starting point.
    :param float t: the elapsed time.
    :param float a: the scale of the drift :math:`a \tanh(a x)`.
    :returns: ``(mean, variance)``.
    :rtype: tuple(float, float)
    """
    return x0 + a * t * math.tanh(a * x0), t + (a * t / math.cosh(a * x0)) ** 2


def _fourier(x0: float, t: float, a: float, frequency: float, wave) -> float:
    # E[e^{i w Z} cosh(a Z)], Z ~ N(x0, t), from E e^{cZ} = e^{c x0 + c^2 t / 2}
    total = math.exp(a * x0) * wave(frequency * (x0 + a * t)) + math.exp(-a * x0) * wave(
        frequency * (x0 - a * t)
    )
    return total * math.exp(-(frequency**2) * t / 2.0) / (2.0 * math.cosh(a * x0))


def benes_expectation_cos(x0: float, t: float, a: float = 1.0, frequency: float = 1.0) -> float:
    r""":math:`\mathbb E \cos(\omega X_t)` in closed form, :math:`\omega` = ``frequency``:

    .. math::

        \frac{e^{-\omega^2 t / 2}}{2 \cosh(a x_0)} \left( e^{a x_0} \cos(\omega (x_0 + a t))
        + e^{-a x_0} \cos(\omega (x_0 - a t)) \right).

    :param float x0: the starting point, ``|a x0| < 700``.
    :param float t: the elapsed time.
    :param float a: the scale of the drift :math:`a \tanh(a x)`.
    :param float frequency: :math:`\omega`.
    :rtype: float
    """
    return _fourier(x0, t, a, frequency, math.cos)


def benes_expectation_sin(x0: float, t: float, a: float = 1.0, frequency: float = 1.0) -> float:
    r""":math:`\mathbb E \sin(\omega X_t)` in closed form, :math:`\omega` = ``frequency``:

    .. math::

        \frac{e^{-\omega^2 t / 2}}{2 \cosh(a x_0)} \left( e^{a x_0} \sin(\omega (x_0 + a t))
        + e^{-a x_0} \sin(\omega (x_0 - a t)) \right).

    :param float x0: the starting point, ``|a x0| < 700``.
    :param float t: the elapsed time.
    :param float a: the scale of the drift :math:`a \tanh(a x)`.
    :param float frequency: :math:`\omega`.
    :rtype: float
    """
    return _fourier(x0, t, a, frequency, math.sin)


def benes_expectation(
    fn: Callable[[Tensor], Tensor], x0: float, t: float, a: float = 1.0, order: int = 120
) -> Tensor:
    r""":math:`\mathbb E\, g(X_t)` by Gauss–Hermite quadrature of each mixture component,

    .. math::

        \mathbb E\, g(X_t) = \sum_\pm w_\pm\, \mathbb E\, g(x_0 \pm a t + \sqrt t\, \xi),
        \qquad \xi \sim \mathcal N(0, 1),

    with ``order`` probabilists' Hermite nodes per component: exact for polynomials
    of degree below ``2 order``, spectrally accurate for smooth ``g``.

    ``fn`` follows the convention of :func:`pyro_latdiff.unbiased.expectation`, so
    the same function serves both: it is called once, on a float64 tensor ``x`` of
    shape ``(2 order, 1)`` (the state dimension is 1), and returns
    ``(2 order,) + event_shape``.

    :param callable fn: ``g(x)``.
    :param float x0: the starting point.
    :param float t: the elapsed time ``t > 0``.
    :param float a: the scale of the drift :math:`a \tanh(a x)`.
    :param int order: the number of quadrature nodes per component.
    :returns: a float64 tensor of shape ``event_shape``.
    :rtype: torch.Tensor
    """
    nodes, weights = np.polynomial.hermite_e.hermegauss(order)
    nodes = torch.as_tensor(nodes, dtype=_DTYPE)
    weights = torch.as_tensor(weights, dtype=_DTYPE) / math.sqrt(2.0 * math.pi)
    # w_+- = e^{+-a x0} / (2 cosh(a x0)) = sigmoid(+-2 a x0), without overflow
    w_plus, w_minus = torch.sigmoid(torch.tensor([2.0 * a * x0, -2.0 * a * x0], dtype=_DTYPE))
    x = torch.cat([x0 + a * t + math.sqrt(t) * nodes, x0 - a * t + math.sqrt(t) * nodes])
    values = fn(x.unsqueeze(-1))
    weights = torch.cat([w_plus * weights, w_minus * weights])
    return torch.tensordot(weights, values, dims=([0], [0]))
