r"""Unbiased expectations of diffusion functionals with a random number of layers.

Every Euler-based Monte Carlo estimate of :math:`\mathbb{E}\, g(X_T)` for

.. math::

    dX_t = b(t, X_t)\, dt + \sigma\, dW_t, \qquad X_{t_0} = x_0, \qquad t \in [t_0, t_1],

carries an :math:`O(h)` discretisation bias. This module offers two estimators
whose expectation is the continuous-time value exactly (no bias at all; only a
Monte Carlo error that the returned standard error measures), and the biased
fixed-grid Euler estimator as a baseline. Time is shifted so that ``T = t1 - t0``.

**Random-grid forward parametrix** (:func:`expectation`, :func:`sample_weighted`,
:func:`likelihood`): the estimator of Henry-Labordère, Tan & Touzi (2017) for a
constant diffusion coefficient, which equals the forward parametrix estimator of
Bally & Kohatsu-Higa (2015, §6.1) with the control variate below; Tzen & Raginsky
(2019, last section) read it as a residual network of random depth. Draw a renewal grid
:math:`0 = T_0 < T_1 < \dots < T_N < T` with i.i.d. inter-arrival times
:math:`\tau_k = T_k - T_{k-1}` of density :math:`f` and survival function
:math:`\bar F` (:class:`ArrivalLaw`), :math:`N` the number of arrivals before
:math:`T`, and set :math:`T_{N+1} = T`. Run Euler on that grid,

.. math::

    \hat X_{k+1} = \hat X_k + b_k\, \Delta T_{k+1} + \sigma\, \Delta W_{k+1},
    \qquad b_k = b(T_k, \hat X_k),

give each arrival the Malliavin (Bismut–Elworthy–Li) weight

.. math::

    \mathcal W_k = (b_k - b_{k-1}) \cdot \sigma^{-1} \Delta W_{k+1} / \Delta T_{k+1},
    \qquad k = 1, \dots, N,

and return

.. math::

    \psi = \frac{g(\hat X_{N+1}) - \mathbf 1_{N > 0}\, g(\hat X_N)}{\bar F(\Delta T_{N+1})}
           \prod_{k=1}^{N} \frac{\mathcal W_k}{f(\tau_k)},
    \qquad \mathbb E\, \psi = \mathbb E\, g(X_T).

The subtracted :math:`g(\hat X_N)` has conditional mean zero against the last
weight (which is linear in :math:`\Delta W_{N+1}`); it is what makes the variance
finite, since without it :math:`\mathcal W_N^2 \sim 1 / \Delta T_{N+1}` is not
integrable against :math:`\bar F`. With ``antithetic=True`` (the default) the last
increment is also reflected, :math:`\hat X^\pm_{N+1} = \hat X_N + b_N \Delta T_{N+1}
\pm \sigma \Delta W_{N+1}`, and the two estimators are averaged; :math:`g(\hat X_N)`
then cancels exactly:

.. math::

    \psi^{a} = \frac{g(\hat X^+_{N+1}) - g(\hat X^-_{N+1})}{2\, \bar F(\Delta T_{N+1})}
               \prod_{k=1}^{N} \frac{\mathcal W_k}{f(\tau_k)} \quad (N > 0), \qquad
    \psi^{a} = \frac{g(\hat X^+_1) + g(\hat X^-_1)}{2\, \bar F(T)} \quad (N = 0).

It costs one more evaluation of ``fn`` and no more drift evaluations.

*Finite variance* (Henry-Labordère, Tan & Touzi 2017, constant sigma): ``fn``
Lipschitz, the drift bounded, Lipschitz in x and 1/2-Hölder in t, sigma
non-degenerate, and an inter-arrival density bounded below on :math:`(0, T)` with
:math:`\bar F(T) > 0` (exponential included). Heuristically,
:math:`\mathcal W_k^2 \sim \Delta T_k / \Delta T_{k+1}` and the factors telescope,
so each arrival contributes about :math:`\int_0^T c / f(\tau)\, d\tau` to the
second moment; for the exponential law of rate :math:`\lambda` this gives
:math:`e^{\lambda T} \sum_n (C T / \lambda)^n / n! = e^{\lambda T + C T / \lambda}`
with :math:`C` growing with the drift's Lipschitz constant :math:`L`: a small rate
makes deep paths rare but their weights huge (heavy tails), a large rate makes
the :math:`N = 0` term expensive (:math:`\mathbb E g^2 e^{\lambda T}`). Polynomial
growth of ``fn`` or a linear (unbounded) drift such as Ornstein–Uhlenbeck keeps
the variance finite in practice (Gaussian moments; the tests check it) but is
outside the theorem. The variance grows quickly with :math:`L T`: the estimator
pays off when :math:`L T \lesssim 1`.

Laws with more mass near zero, :math:`f(\tau) \propto \tau^{-\gamma}`
(:class:`PowerArrivals`; the Beta-type laws Andersson & Kohatsu-Higa 2017 use as
importance sampling of the times; their exact parametrisation was not checked),
are *required* when the weights are less regular: a state-dependent diffusion
brings second-order weights :math:`(\Delta W^2 - \Delta T)/\Delta T^2` with
:math:`\mathcal W_k^2 \sim \Delta T_k / \Delta T_{k+1}^2`, whose variance is
infinite for every density bounded near zero (:math:`\int d\tau / (\tau f(\tau))`
diverges) and finite for :math:`\gamma > 0`. A state-dependent (callable) sigma
is not implemented here and raises :class:`NotImplementedError`.

*Choosing the law* (measured, ``benchmarks/unbiased.py``, ``T = 1``, ``g = cos``,
10^6 samples; "work" = variance times mean depth):

=================  =====  =========================  ===========================
law                depth  Beneš (L = 1): var / work  OU a = 1, x0 = 1: var / work
=================  =====  =========================  ===========================
exp(0.5)           1.5    1.32 / 1.97                22.9 / 34.3
exp(1) (default)   2.0    1.14 / 2.27                6.93 / 13.9
exp(2)             3.0    2.05 / 6.16                8.03 / 24.1
exp(4)             5.0    12.5 / 62.3                43.0 / 215
power(0.5, 2)      2.4    1.48 / 3.56                8.26 / 19.9
=================  =====  =========================  ===========================

The default, ``ExponentialArrivals(rate=1 / (t1 - t0))`` (mean depth 2), had the
smallest or near-smallest work on every test problem. Smaller rates bring very
heavy tails (kurtosis 10^3 to 10^5: the standard error itself becomes
unreliable); ``rate = 2 / (t1 - t0)`` costs 1.5 to 3 times more work but gives
the lightest tails (kurtosis 26 to 244): prefer it when the error bar matters
more than the cost. For stiffer drifts (``L T`` of 4 and more) prefer
:func:`rmlmc_expectation`.

**Randomised multilevel Monte Carlo** (:func:`rmlmc_expectation`): Rhee & Glynn
(2015). Level :math:`\ell` is Euler with ``base_steps * 2**l`` steps; fine and
coarse paths share Brownian increments. With :math:`L` drawn from
:math:`P(L \ge \ell) = 2^{-r \ell}` the single-term estimator is
:math:`(g(X^{\ell}) - g(X^{\ell - 1})) / P(L = \ell)` at :math:`\ell = L`, and the
coupled-sum estimator :math:`\sum_{\ell \le L} (g(X^{\ell}) - g(X^{\ell-1})) /
P(L \ge \ell)` (:math:`g(X^{-1}) = 0`). Both have finite variance and finite mean
cost when :math:`\mathbb E (g(X^\ell) - g(X^{\ell-1}))^2 = O(2^{-\beta \ell})` with
:math:`1 < r < \beta`; with additive noise Euler is Milstein, :math:`\beta = 2`,
and the default ``r = 1.5`` sits in the middle of :math:`(1, 2)`.

**Shapes.** ``x0`` is ``batch_shape + (D,)``; each sample is simulated for every
batch element (the random grid is shared across the batch, the Brownian
increments are not). ``drift(t, x)`` receives ``x`` of shape
``(m,) + batch_shape + (D,)`` (``m`` the samples still being simulated) and ``t``
broadcastable to ``x[..., :1]``: shape ``(m,) + (1,) * (len(batch_shape) + 1)``
for the random grid (one time per sample), a 0-d tensor for the Euler grids. It
must return a tensor of ``x``'s shape. ``fn(x)`` (resp. ``log_lik_fn(x)``)
receives states of that shape and returns ``x.shape[:-1] + event_shape``.

**Cost.** One drift evaluation of one sample counts one. The parametrix costs
:math:`N + 1` (its *depth*, the number of Euler steps: :math:`1 + \lambda T` on
average for the exponential law); RMLMC's depth is the number of fine steps.

References:

- P. Henry-Labordère, X. Tan, N. Touzi (2017), *Unbiased simulation of stochastic
  differential equations*, Ann. Appl. Probab. 27(6).
- V. Bally, A. Kohatsu-Higa (2015), *A probabilistic interpretation of the
  parametrix method*, Ann. Appl. Probab. 25(6).
- P. Andersson, A. Kohatsu-Higa (2017), *Unbiased simulation of stochastic
  differential equations using parametrix expansions*, Bernoulli 23(3).
- C.-H. Rhee, P. W. Glynn (2015), *Unbiased estimation with square root
  convergence for SDE models*, Oper. Res. 63(5).
- B. Tzen, M. Raginsky (2019), *Neural stochastic differential equations: deep
  latent Gaussian models in the diffusion limit*, §5.
- A.-M. Lyne et al. (2015), *On Russian roulette estimates for Bayesian inference
  with doubly-intractable likelihoods*, Statist. Sci. 30(4) (signed estimates in
  pseudo-marginal MCMC).

Example::

    >>> import torch
    >>> from pyro_latdiff.unbiased import expectation
    >>> _ = torch.manual_seed(0)
    >>> x0 = torch.tensor([0.5], dtype=torch.float64)
    >>> result = expectation(lambda x: x[..., 0], lambda t, x: torch.tanh(x), x0, 1.0,
    ...                      num_samples=100_000)
    >>> # Beneš SDE: E X_1 = x0 + tanh(x0) = 0.962...
    >>> bool(abs(result.estimate - 0.9621) < 4 * result.stderr)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._validation import check_diffusion

__all__ = [
    "ArrivalLaw",
    "ExponentialArrivals",
    "LikelihoodEstimate",
    "PowerArrivals",
    "UnbiasedEstimate",
    "WeightedSample",
    "euler_expectation",
    "expectation",
    "likelihood",
    "rmlmc_expectation",
    "sample_weighted",
]

Drift = Callable[[Tensor, Tensor], Tensor]
Sigma = float | Tensor

_DEFAULT_CHUNK = 2**17


# --------------------------------------------------------------------------- laws


class ArrivalLaw:
    """Law of the inter-arrival times of the random grid: a positive random variable.

    Subclasses implement :meth:`sample`, :meth:`density` and :meth:`survival`
    (``P(tau > t)``) and :attr:`mean`. The parametrix estimator is unbiased for
    any law whose density is positive on ``(0, T)`` and whose survival function is
    positive on ``(0, T]``, ``T = t1 - t0``; its variance depends on the law.
    """

    def sample(self, shape: tuple[int, ...], dtype: torch.dtype, device=None) -> Tensor:
        """Draw i.i.d. inter-arrival times, strictly positive, of the given shape."""
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


def _check_positive_float(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"Expected `{name}` to be a positive float, actual type {type(value).__name__}"
        )
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"Expected `{name}` to be a positive finite float, actual {value}")
    return float(value)


class ExponentialArrivals(ArrivalLaw):
    r"""Exponential inter-arrival times of rate ``rate`` (a Poisson grid), as in
    Henry-Labordère, Tan & Touzi (2017): :math:`f(t) = \lambda e^{-\lambda t}`,
    :math:`\bar F(t) = e^{-\lambda t}`. The number of arrivals before ``T`` is
    Poisson(:math:`\lambda T`), so the mean depth is :math:`1 + \lambda T`.

    :param float rate: the rate :math:`\lambda > 0`.
    """

    def __init__(self, rate: float):
        self.rate = _check_positive_float("rate", rate)

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
        self.horizon = _check_positive_float("horizon", horizon)

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


def _default_arrivals(duration: float) -> ArrivalLaw:
    return ExponentialArrivals(rate=1.0 / duration)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class UnbiasedEstimate:
    """The result of :func:`expectation`, :func:`rmlmc_expectation` or
    :func:`euler_expectation`.

    :ivar torch.Tensor estimate: the sample mean, shape ``batch_shape + event_shape``.
    :ivar torch.Tensor stderr: its standard error, ``std(values) / sqrt(num_samples)``.
    :ivar torch.Tensor values: the i.i.d. per-sample values, shape
        ``(num_samples,) + batch_shape + event_shape``; their mean is ``estimate``.
    :ivar torch.Tensor depths: per-sample number of Euler steps on the finest path
        (the random depth), shape ``(num_samples,)``.
    :ivar torch.Tensor costs: per-sample number of drift evaluations, ``(num_samples,)``.
    :ivar str method: ``"parametrix"``, ``"rmlmc"`` or ``"euler"``.
    """

    estimate: Tensor
    stderr: Tensor
    values: Tensor
    depths: Tensor
    costs: Tensor
    method: str

    @property
    def num_samples(self) -> int:
        return self.values.shape[0]

    @property
    def variance(self) -> Tensor:
        """The per-sample variance (unbiased sample variance of ``values``)."""
        return self.values.var(0)

    @property
    def mean_depth(self) -> float:
        """Average number of Euler steps (layers) per sample."""
        return self.depths.double().mean().item()

    @property
    def mean_cost(self) -> float:
        """Average number of drift evaluations per sample."""
        return self.costs.double().mean().item()


@dataclass(frozen=True)
class WeightedSample:
    r"""Draws of the random signed measure of the parametrix estimator.

    Sample ``i`` is two weighted terminal states, ``(weights[i, j], states[i, j])``
    for ``j = 0, 1``, such that for every bounded measurable ``phi``

    .. math:: \mathbb E \sum_j w_{ij}\, \varphi(x_{ij}) = \mathbb E\, \varphi(X_T),

    with finite variance for Lipschitz ``phi`` (see the module docstring). Without
    antithetics the atoms are :math:`(w, \hat X_{N+1})` and :math:`(-w, \hat X_N)`
    (weight 0 when ``N = 0``); with antithetics :math:`(w/2, \hat X^+_{N+1})` and
    :math:`(\mp w/2, \hat X^-_{N+1})`. Weights can be negative.

    :ivar torch.Tensor weights: shape ``(num_samples, 2) + batch_shape``.
    :ivar torch.Tensor states: shape ``(num_samples, 2) + batch_shape + (D,)``.
    :ivar torch.Tensor depths: per-sample number of Euler steps ``N + 1``.
    """

    weights: Tensor
    states: Tensor
    depths: Tensor

    @property
    def num_samples(self) -> int:
        return self.weights.shape[0]

    @property
    def mean_depth(self) -> float:
        return self.depths.double().mean().item()

    def values(self, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """Per-sample estimator values ``sum_j w_ij fn(x_ij)``, shape
        ``(num_samples,) + batch_shape + event_shape``."""
        _check_callable("fn", fn)
        out = fn(self.states)
        _check_fn_output("fn", out, self.states)
        w = self.weights.reshape(self.weights.shape + (1,) * (out.dim() - self.weights.dim()))
        return (w * out).sum(1)


@dataclass(frozen=True)
class LikelihoodEstimate:
    r"""An unbiased estimate of ``p(y) = E p(y | X_T)`` (:func:`likelihood`).

    The per-sample values are kept on a shifted scale, ``scaled_values =
    values * exp(-log_scale)``, so that tiny likelihoods do not underflow. The
    estimate is signed (the parametrix weights are): use ``sign`` and
    ``log_abs_estimate`` in a pseudo-marginal sampler (Lyne et al. 2015).

    :ivar torch.Tensor estimate: ``p̂(y)``, shape ``batch_shape``.
    :ivar torch.Tensor stderr: its standard error.
    :ivar torch.Tensor log_abs_estimate: ``log |p̂(y)|``, computed on the shifted scale.
    :ivar torch.Tensor sign: the sign of ``p̂(y)`` (-1, 0 or 1).
    :ivar torch.Tensor log_scale: the shift, ``max log p(y | x)`` over the draws.
    :ivar torch.Tensor scaled_values: per-sample values times ``exp(-log_scale)``.
    :ivar torch.Tensor depths: per-sample number of Euler steps.
    """

    estimate: Tensor
    stderr: Tensor
    log_abs_estimate: Tensor
    sign: Tensor
    log_scale: Tensor
    scaled_values: Tensor
    depths: Tensor

    @property
    def num_samples(self) -> int:
        return self.scaled_values.shape[0]

    @property
    def relative_stderr(self) -> Tensor:
        """``stderr / |estimate|``, computed on the shifted scale."""
        m = self.scaled_values.mean(0).abs()
        return self.scaled_values.std(0) / math.sqrt(self.num_samples) / m

    @property
    def mean_depth(self) -> float:
        return self.depths.double().mean().item()


# --------------------------------------------------------------------------- checks


def _check_callable(name: str, value) -> None:
    if not callable(value):
        raise TypeError(f"Expected `{name}` to be callable, actual type {type(value).__name__}")


def _check_num_samples(num_samples) -> int:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        raise TypeError(
            f"Expected `num_samples` to be a positive int, actual type {type(num_samples).__name__}"
        )
    if num_samples < 2:
        raise ValueError(
            f"Expected `num_samples` >= 2 (for a standard error), actual {num_samples}"
        )
    return num_samples


def _check_chunk_size(chunk_size) -> int:
    if chunk_size is None:
        return _DEFAULT_CHUNK
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(
            f"Expected `chunk_size` to be a positive int, actual type {type(chunk_size).__name__}"
        )
    if chunk_size < 1:
        raise ValueError(f"Expected `chunk_size` >= 1, actual {chunk_size}")
    return chunk_size


def _check_x0(x0) -> None:
    if not isinstance(x0, Tensor):
        raise TypeError(f"Expected `x0` to be a torch.Tensor, actual type {type(x0).__name__}")
    if x0.dim() < 1 or x0.shape[-1] < 1:
        raise ValueError(
            "Expected `x0` of shape batch_shape + (state_dim,) with state_dim >= 1, "
            f"actual shape {tuple(x0.shape)}"
        )
    if not x0.is_floating_point():
        raise ValueError(f"Expected `x0` to be a floating point tensor, actual dtype {x0.dtype}")
    if x0.device.type == "meta":
        raise ValueError("Expected `x0` to hold values, actual a tensor on the meta device")
    if not torch.isfinite(x0).all():
        raise ValueError("Expected `x0` to be finite, actual tensor contains NaN or inf")


def _as_float(value):
    if isinstance(value, Tensor) and value.dim() == 0 and value.is_floating_point():
        return float(value)
    return value


def _check_times(t0, t1) -> float:
    t0, t1 = _as_float(t0), _as_float(t1)
    for name, value in (("t0", t0), ("t1", t1)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"Expected `{name}` to be a float, actual type {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"Expected `{name}` to be finite, actual {value}")
    if not t1 > t0:
        raise ValueError(f"Expected `t1` > `t0`, actual t0 = {t0}, t1 = {t1}")
    return float(t1) - float(t0)


def _check_sigma(sigma, x0: Tensor) -> Tensor:
    """Return sigma as a positive tensor broadcastable to ``x0``."""
    if callable(sigma) and not isinstance(sigma, Tensor):
        raise NotImplementedError(
            "Expected `sigma` to be a constant (positive float or tensor of shape "
            "(..., state_dim)), actual a callable: the estimators here need a constant diffusion "
            "coefficient (a state-dependent one needs second-order parametrix weights, "
            "Andersson & Kohatsu-Higa 2017, which are not implemented)"
        )
    check_diffusion(sigma, x0, name="sigma", callable_allowed=False)
    if not isinstance(sigma, Tensor):
        return torch.tensor(float(sigma), dtype=x0.dtype, device=x0.device)
    try:
        shape = torch.broadcast_shapes(sigma.shape, x0.shape)
    except RuntimeError:
        raise ValueError(
            f"Expected `sigma` broadcastable to x0's shape {tuple(x0.shape)}, "
            f"actual shape {tuple(sigma.shape)}"
        ) from None
    if shape != x0.shape:
        raise ValueError(
            f"Expected `sigma` broadcastable to x0's shape {tuple(x0.shape)} without "
            f"enlarging it, actual shape {tuple(sigma.shape)}"
        )
    return sigma


def _check_drift(drift, x0: Tensor, t0: float) -> None:
    _check_callable("drift", drift)
    x = x0.unsqueeze(0)
    t = torch.full((1,) + (1,) * x0.dim(), t0, dtype=x0.dtype, device=x0.device)
    out = drift(t, x)
    what = "`drift(t, x)`"
    if not isinstance(out, Tensor):
        raise TypeError(f"Expected {what} to return a torch.Tensor, actual {type(out).__name__}")
    if out.shape != x.shape:
        raise ValueError(
            f"Expected {what} to return a tensor of x's shape {tuple(x.shape)}, "
            f"actual shape {tuple(out.shape)}"
        )
    if not torch.isfinite(out).all():
        raise ValueError(f"Expected {what} to be finite at x0, actual output contains NaN or inf")


def _check_fn_output(name: str, out, x: Tensor) -> None:
    if not isinstance(out, Tensor):
        raise TypeError(
            f"Expected `{name}(x)` to return a torch.Tensor, actual {type(out).__name__}"
        )
    lead = x.shape[:-1]
    if out.shape[: len(lead)] != lead:
        raise ValueError(
            f"Expected `{name}(x)` for x of shape {tuple(x.shape)} to return shape "
            f"{tuple(lead)} + event_shape, actual shape {tuple(out.shape)}"
        )


def _check_fn(name: str, fn, x0: Tensor) -> None:
    _check_callable(name, fn)
    x = x0.unsqueeze(0)
    _check_fn_output(name, fn(x), x)


def _check_arrivals(arrivals, duration: float) -> ArrivalLaw:
    if arrivals is None:
        return _default_arrivals(duration)
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


def _check_common(drift, x0, t0, t1, sigma, num_samples, chunk_size):
    _check_x0(x0)
    duration = _check_times(t0, t1)
    sigma_t = _check_sigma(sigma, x0)
    _check_num_samples(num_samples)
    chunk = _check_chunk_size(chunk_size)
    _check_drift(drift, x0, float(t0))
    return duration, sigma_t, chunk


# --------------------------------------------------------------------------- parametrix


def _parametrix_chunk(drift, x0, sigma, t0, t1, num, arrivals, antithetic):
    """Simulate ``num`` random-grid paths; return weights (num, 2, *batch),
    states (num, 2, *batch, D) and depths (num,)."""
    batch = x0.shape[:-1]
    ones = (1,) * (len(batch) + 1)
    dtype, device = x0.dtype, x0.device
    weights_out = torch.empty((num, 2) + batch, dtype=dtype, device=device)
    states_out = torch.empty((num, 2) + x0.shape, dtype=dtype, device=device)
    depths = torch.empty(num, dtype=torch.long, device=device)

    idx = torch.arange(num, device=device)  # samples still being simulated
    t = torch.full((num,), t0, dtype=dtype, device=device)
    x = x0.expand((num,) + x0.shape)
    weight = torch.ones((num,) + batch, dtype=dtype, device=device)
    mu_prev = None
    dens_prev = None
    level = 0
    while idx.numel() > 0:
        m = idx.numel()
        mu = drift(t.view((m,) + ones), x)
        tau = arrivals.sample((m,), dtype, device)
        remaining = t1 - t
        last = tau >= remaining
        dt = torch.where(last, remaining, tau)
        dt_x = dt.view((m,) + ones)
        noise = torch.randn((m,) + x0.shape, dtype=dtype, device=device) * dt_x.sqrt()
        if level > 0:
            # W_k = (b_k - b_{k-1}) . sigma^{-1} dW_{k+1} / dT_{k+1}, divided by f(tau_k)
            malliavin = ((mu - mu_prev) * noise / sigma).sum(-1) / dt.view((m,) + ones[1:])
            weight = weight * malliavin / dens_prev.view((m,) + ones[1:])
        drifted = x + mu * dt_x
        x_plus = drifted + sigma * noise

        if last.any():
            sel = last.nonzero().squeeze(-1)
            out = idx[sel]
            w = weight[sel] / arrivals.survival(remaining[sel]).view((-1,) + ones[1:])
            if antithetic:
                x_minus = drifted[sel] - sigma * noise[sel]
                sign = 1.0 if level == 0 else -1.0
                weights_out[out, 0] = 0.5 * w
                weights_out[out, 1] = sign * 0.5 * w
                states_out[out, 0] = x_plus[sel]
                states_out[out, 1] = x_minus
            else:
                weights_out[out, 0] = w
                weights_out[out, 1] = 0.0 if level == 0 else -w
                states_out[out, 0] = x_plus[sel]
                states_out[out, 1] = x[sel]
            depths[out] = level + 1
        keep = (~last).nonzero().squeeze(-1)
        idx = idx[keep]
        x = x_plus[keep]
        t = t[keep] + tau[keep]
        weight = weight[keep]
        mu_prev = mu[keep]
        dens_prev = arrivals.density(tau[keep])
        level += 1
    return weights_out, states_out, depths


def sample_weighted(
    drift: Drift,
    x0: Tensor,
    t1: float,
    *,
    sigma: Sigma = 1.0,
    num_samples: int,
    t0: float = 0.0,
    arrivals: ArrivalLaw | None = None,
    antithetic: bool = True,
    chunk_size: int | None = None,
) -> WeightedSample:
    r"""Draw the random-depth generative view of the SDE: signed weighted terminal states.

    Each draw runs Euler on a random renewal grid (a residual network of random
    depth ``N + 1``) and returns two weighted terminal states whose weighted sum of
    any bounded ``phi`` has expectation :math:`\mathbb E\, \varphi(X_{t_1})` exactly,
    for the continuous-time SDE :math:`dX = b(t, X) dt + \sigma dW`
    (:class:`WeightedSample`; formula in the module docstring).

    :param callable drift: ``drift(t, x)``, see the module docstring for shapes.
    :param torch.Tensor x0: initial state, ``batch_shape + (D,)``.
    :param float t1: final time.
    :param sigma: constant diffusion: positive float or positive tensor ``(..., D)``
        broadcastable to ``x0``.
    :type sigma: float or torch.Tensor
    :param int num_samples: number of draws.
    :param float t0: initial time.
    :param ArrivalLaw arrivals: inter-arrival law; default
        ``ExponentialArrivals(rate=1 / (t1 - t0))`` (mean depth 2).
    :param bool antithetic: reflect the last Brownian increment and average.
    :param int chunk_size: samples simulated at once (memory bound).
    :rtype: WeightedSample
    """
    duration, sigma_t, chunk = _check_common(drift, x0, t0, t1, sigma, num_samples, chunk_size)
    arrivals = _check_arrivals(arrivals, duration)
    if not isinstance(antithetic, bool):
        raise TypeError(
            f"Expected `antithetic` to be a bool, actual type {type(antithetic).__name__}"
        )
    parts = []
    for start in range(0, num_samples, chunk):
        num = min(chunk, num_samples - start)
        parts.append(
            _parametrix_chunk(drift, x0, sigma_t, float(t0), float(t1), num, arrivals, antithetic)
        )
    weights, states, depths = (torch.cat(p) for p in zip(*parts, strict=True))
    return WeightedSample(weights=weights, states=states, depths=depths)


def _summarise(values: Tensor, depths: Tensor, costs: Tensor, method: str) -> UnbiasedEstimate:
    n = values.shape[0]
    return UnbiasedEstimate(
        estimate=values.mean(0),
        stderr=values.std(0) / math.sqrt(n),
        values=values,
        depths=depths,
        costs=costs,
        method=method,
    )


def expectation(
    fn: Callable[[Tensor], Tensor],
    drift: Drift,
    x0: Tensor,
    t1: float,
    *,
    sigma: Sigma = 1.0,
    num_samples: int,
    t0: float = 0.0,
    arrivals: ArrivalLaw | None = None,
    antithetic: bool = True,
    chunk_size: int | None = None,
) -> UnbiasedEstimate:
    r"""Unbiased estimate of :math:`\mathbb E\, g(X_{t_1})` by the random-grid forward
    parametrix (Henry-Labordère, Tan & Touzi 2017), for
    :math:`dX = b(t, X)\, dt + \sigma\, dW`, :math:`X_{t_0} = x_0`, with constant
    :math:`\sigma`.

    The estimator, its antithetic variant and the conditions for finite variance
    are in the module docstring. The result's ``stderr`` is only meaningful when the
    variance is finite: ``fn`` Lipschitz (or of polynomial growth with a linear
    drift), drift Lipschitz.

    :param callable fn: ``g(x)``; ``x`` is ``(m,) + batch_shape + (D,)``, the output
        ``x.shape[:-1] + event_shape``.
    :param callable drift: ``drift(t, x)`` returning a tensor of ``x``'s shape.
    :param torch.Tensor x0: initial state, ``batch_shape + (D,)``.
    :param float t1: final time (> ``t0``).
    :param sigma: constant diffusion: positive float or positive tensor ``(..., D)``.
        A callable (state-dependent) sigma raises :class:`NotImplementedError`.
    :type sigma: float or torch.Tensor
    :param int num_samples: number of i.i.d. draws (>= 2).
    :param float t0: initial time.
    :param ArrivalLaw arrivals: inter-arrival law of the random grid; default
        ``ExponentialArrivals(rate=1 / (t1 - t0))``, mean depth 2 (see "Choosing the
        law" in the module docstring).
    :param bool antithetic: reflect the last Brownian increment and average (one
        more ``fn`` evaluation, no more drift evaluations).
    :param int chunk_size: samples simulated at once (memory bound), default 131072.
    :rtype: UnbiasedEstimate
    """
    _check_x0(x0)
    _check_fn("fn", fn, x0)
    draws = sample_weighted(
        drift,
        x0,
        t1,
        sigma=sigma,
        num_samples=num_samples,
        t0=t0,
        arrivals=arrivals,
        antithetic=antithetic,
        chunk_size=chunk_size,
    )
    values = draws.values(fn)
    return _summarise(values, draws.depths, draws.depths, "parametrix")


def likelihood(
    log_lik_fn: Callable[[Tensor], Tensor],
    drift: Drift,
    x0: Tensor,
    t1: float,
    *,
    sigma: Sigma = 1.0,
    num_samples: int,
    t0: float = 0.0,
    arrivals: ArrivalLaw | None = None,
    antithetic: bool = True,
    chunk_size: int | None = None,
) -> LikelihoodEstimate:
    r"""Unbiased estimate of the likelihood :math:`p(y) = \mathbb E\, p(y \mid X_{t_1})`
    of the continuous-time latent diffusion, for pseudo-marginal inference.

    Applies the random-grid parametrix estimator to :math:`g = p(y \mid \cdot)`,
    shifted by the largest log-likelihood drawn so that small likelihoods keep
    their precision. The variance is finite when :math:`p(y \mid x)` is Lipschitz
    in x (a Gaussian observation is). The estimate can be negative (rarely, for
    enough samples): pseudo-marginal Metropolis–Hastings then uses
    ``log_abs_estimate`` as the log-likelihood and averages with ``sign``
    (Lyne et al. 2015).

    :param callable log_lik_fn: ``log p(y | x)``; ``x`` is ``(m,) + batch_shape + (D,)``,
        the output ``x.shape[:-1]``.
    :param callable drift: ``drift(t, x)``.
    :param torch.Tensor x0: initial state, ``batch_shape + (D,)``.
    :param float t1: observation time.
    :param sigma: constant diffusion, as in :func:`expectation`.
    :type sigma: float or torch.Tensor
    :param int num_samples: number of draws.
    :param float t0: initial time.
    :param ArrivalLaw arrivals: inter-arrival law, as in :func:`expectation`.
    :param bool antithetic: as in :func:`expectation`.
    :param int chunk_size: as in :func:`expectation`.
    :rtype: LikelihoodEstimate
    """
    _check_x0(x0)
    _check_fn("log_lik_fn", log_lik_fn, x0)
    draws = sample_weighted(
        drift,
        x0,
        t1,
        sigma=sigma,
        num_samples=num_samples,
        t0=t0,
        arrivals=arrivals,
        antithetic=antithetic,
        chunk_size=chunk_size,
    )
    log_lik = log_lik_fn(draws.states)
    _check_fn_output("log_lik_fn", log_lik, draws.states)
    if log_lik.shape != draws.weights.shape:
        raise ValueError(
            f"Expected `log_lik_fn(x)` for x of shape {tuple(draws.states.shape)} to return "
            f"shape {tuple(draws.weights.shape)}, actual shape {tuple(log_lik.shape)}"
        )
    scale = log_lik.amax(dim=(0, 1))
    scale = torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale))
    scaled = (draws.weights * torch.exp(log_lik - scale)).sum(1)
    n = scaled.shape[0]
    mean = scaled.mean(0)
    return LikelihoodEstimate(
        estimate=mean * torch.exp(scale),
        stderr=scaled.std(0) / math.sqrt(n) * torch.exp(scale),
        log_abs_estimate=torch.log(mean.abs()) + scale,
        sign=torch.sign(mean),
        log_scale=scale,
        scaled_values=scaled,
        depths=draws.depths,
    )


# --------------------------------------------------------------------------- Euler, RMLMC


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


def _euler_terminal(drift, x0, sigma, t0, t1, num, num_steps):
    """Plain Euler with ``num_steps`` uniform steps, noise drawn step by step."""
    dtype, device = x0.dtype, x0.device
    h = (t1 - t0) / num_steps
    times = t0 + h * torch.arange(num_steps, dtype=dtype, device=device)
    x = x0.expand((num,) + x0.shape)
    for k in range(num_steps):
        noise = torch.randn((num,) + x0.shape, dtype=dtype, device=device)
        x = x + drift(times[k], x) * h + sigma * math.sqrt(h) * noise
    return x


def euler_expectation(
    fn: Callable[[Tensor], Tensor],
    drift: Drift,
    x0: Tensor,
    t1: float,
    *,
    sigma: Sigma = 1.0,
    num_samples: int,
    num_steps: int,
    t0: float = 0.0,
    chunk_size: int | None = None,
) -> UnbiasedEstimate:
    r"""Plain Euler–Maruyama Monte Carlo on ``num_steps`` uniform steps: the *biased*
    baseline (bias :math:`O(1 / \text{num\_steps})`), same result type.

    :param callable fn: ``g(x)``, as in :func:`expectation`.
    :param callable drift: ``drift(t, x)``; ``t`` is a 0-d tensor here.
    :param torch.Tensor x0: initial state, ``batch_shape + (D,)``.
    :param float t1: final time.
    :param sigma: constant diffusion, as in :func:`expectation`.
    :type sigma: float or torch.Tensor
    :param int num_samples: number of paths.
    :param int num_steps: number of Euler steps.
    :param float t0: initial time.
    :param int chunk_size: samples simulated at once.
    :rtype: UnbiasedEstimate
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int):
        raise TypeError(
            f"Expected `num_steps` to be a positive int, actual type {type(num_steps).__name__}"
        )
    if num_steps < 1:
        raise ValueError(f"Expected `num_steps` >= 1, actual {num_steps}")
    _check_x0(x0)
    _check_fn("fn", fn, x0)
    _, sigma_t, chunk = _check_common(drift, x0, t0, t1, sigma, num_samples, chunk_size)
    parts = []
    for start in range(0, num_samples, chunk):
        num = min(chunk, num_samples - start)
        x = _euler_terminal(drift, x0, sigma_t, float(t0), float(t1), num, num_steps)
        out = fn(x)
        _check_fn_output("fn", out, x)
        parts.append(out)
    values = torch.cat(parts)
    steps = torch.full((num_samples,), num_steps, dtype=torch.long, device=x0.device)
    return _summarise(values, steps, steps, "euler")


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
    the distinct levels, never over samples). See the module docstring for the two
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
    if isinstance(base_steps, bool) or not isinstance(base_steps, int):
        raise TypeError(
            f"Expected `base_steps` to be a positive int, actual type {type(base_steps).__name__}"
        )
    if base_steps < 1:
        raise ValueError(f"Expected `base_steps` >= 1, actual {base_steps}")
    decay = _check_positive_float("decay", decay)
    if estimator not in ("coupled", "single"):
        raise ValueError(f"Expected `estimator` to be 'coupled' or 'single', actual {estimator!r}")
    _check_x0(x0)
    _check_fn("fn", fn, x0)
    _, sigma_t, chunk = _check_common(drift, x0, t0, t1, sigma, num_samples, chunk_size)
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
            _check_fn_output("fn", g, x.reshape((-1,) + x.shape[2:]))
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
    return _summarise(values, depths, costs, "rmlmc")
