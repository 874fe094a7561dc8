r"""Forward (noising) processes with exact Gaussian transition kernels.

A *scalar-coefficient linear process* is the SDE

.. math::

    dX_t = f(t)\, X_t\, dt + g(t)\, dW_t, \qquad t \in [0, T],

acting on each coordinate alike. With :math:`L(t) = \int_0^t f`, its transition
from :math:`s` to :math:`t > s` is Gaussian,

.. math::

    X_t \mid X_s \sim \mathcal N\big(a(s, t)\, X_s,\; \sigma(s, t)^2 I\big),\qquad
    a(s, t) = e^{L(t) - L(s)},\quad
    \sigma(s, t)^2 = \int_s^t a(u, t)^2 g(u)^2\, du,

and its marginal given the data is the transition from 0. Every such process here is an
object with the protocol

- ``horizon``: :math:`T`;
- ``drift_coef(t)``: :math:`f(t)`; ``diffusion_coef(t)``: :math:`g(t)`;
- ``marginal_coefs(t)``: ``(mean_scale, std)``, :math:`X_t \mid X_0 \sim
  \mathcal N(\text{mean\_scale}\, X_0, \text{std}^2 I)`;
- ``transition_coefs(s, t)``: ``(scale, std)``, :math:`X_t \mid X_s \sim
  \mathcal N(\text{scale}\, X_s, \text{std}^2 I)` for :math:`s < t`;
- ``prior(shape)``: the limit law that starts the reverse chain, a Pyro distribution
  with one event dimension (the state);

``t`` and ``s`` may be floats or tensors; results broadcast with them and have their
dtype (the default dtype for floats). Coefficients are computed with ``expm1`` so that
short steps keep their precision.

Critically damped Langevin diffusion acts on position–velocity pairs and is its own
class, :class:`CriticallyDampedLangevin`, with matrix-valued (2x2) kernels.

References:

- Song, Sohl-Dickstein, Kingma, Kumar, Ermon & Poole (2021), *Score-based generative
  modeling through stochastic differential equations* (VP and VE processes).
- Nichol & Dhariwal (2021), *Improved denoising diffusion probabilistic models* (cosine
  schedule).
- Chen, Chewi, Li, Li, Salim & Zhang (2023), *Sampling is as easy as learning the score*
  (the OU process :math:`dX = -X dt + \sqrt 2 dB` and CLD).
- Dockhorn, Vahdat & Kreis (2022), *Score-based generative modeling with critically
  damped Langevin diffusion*.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import Tensor

__all__ = [
    "CriticallyDampedLangevin",
    "ForwardProcess",
    "OrnsteinUhlenbeck",
    "VarianceExploding",
    "VariancePreserving",
]

_SCHEDULES = ("linear", "cosine")


def _as_tensor(t, like: Tensor | None = None) -> Tensor:
    if isinstance(t, Tensor):
        return t if t.is_floating_point() else t.to(torch.get_default_dtype())
    if like is not None:
        return torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return torch.as_tensor(t, dtype=torch.get_default_dtype())


def _times(s, t) -> tuple[Tensor, Tensor]:
    """``s`` and ``t`` as tensors sharing dtype and device (a tensor argument wins)."""
    if isinstance(t, Tensor) or not isinstance(s, Tensor):
        t = _as_tensor(t)
        return _as_tensor(s, t), t
    s = _as_tensor(s)
    return s, _as_tensor(t, s)


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"Expected `{name}` to be a positive float, actual {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"Expected `{name}` to be a positive finite float, actual {value!r}")
    return float(value)


class ForwardProcess:
    r"""Base class of the scalar-coefficient linear processes
    :math:`dX = f(t) X dt + g(t) dW` on ``[0, horizon]``.

    A subclass defines :math:`L(t) = \int_0^t f` (``_log_mean_scale``), ``drift_coef``,
    ``diffusion_coef``, the transition variance ``_transition_variance(s, t)`` and
    ``prior_std``; marginals, transitions and the prior follow here.
    """

    horizon: float
    prior_std: float = 1.0

    def drift_coef(self, t) -> Tensor:
        """:math:`f(t)`."""
        raise NotImplementedError

    def diffusion_coef(self, t) -> Tensor:
        """:math:`g(t)`."""
        raise NotImplementedError

    def _log_mean_scale(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def _transition_variance(self, s: Tensor, t: Tensor) -> Tensor:
        raise NotImplementedError

    def transition_coefs(self, s, t) -> tuple[Tensor, Tensor]:
        """``(scale, std)`` of :math:`X_t \\mid X_s \\sim \\mathcal N(\\text{scale}\\, X_s,
        \\text{std}^2 I)`, for ``s <= t``."""
        s, t = _times(s, t)
        scale = torch.exp(self._log_mean_scale(t) - self._log_mean_scale(s))
        return scale, self._transition_variance(s, t).clamp(min=0).sqrt()

    def marginal_coefs(self, t) -> tuple[Tensor, Tensor]:
        """``(mean_scale, std)`` of :math:`X_t \\mid X_0 \\sim \\mathcal N(\\text{mean\\_scale}
        \\, X_0, \\text{std}^2 I)`."""
        t = _as_tensor(t)
        return self.transition_coefs(torch.zeros_like(t), t)

    def prior(self, shape, *, dtype=None, device=None) -> dist.TorchDistribution:
        """The limit law :math:`\\mathcal N(0, \\text{prior\\_std}^2 I)` with
        ``batch_shape = shape[:-1]`` and ``event_shape = shape[-1:]``."""
        shape = torch.Size(shape)
        if len(shape) < 1:
            raise ValueError(f"Expected `shape` to end with the state dimension, actual {shape}")
        loc = torch.zeros(shape, dtype=dtype or torch.get_default_dtype(), device=device)
        return dist.Normal(loc, self.prior_std).to_event(1)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class VariancePreserving(ForwardProcess):
    r"""The variance-preserving process
    :math:`dX = -\tfrac12 \beta(t) X\, dt + \sqrt{\beta(t)}\, dW`, prior
    :math:`\mathcal N(0, I)`.

    Its transition is :math:`a = e^{-\frac12 \int_s^t \beta}`,
    :math:`\sigma^2 = 1 - a^2`. Schedules:

    - ``"linear"``: :math:`\beta(t) = \beta_{\min} + (\beta_{\max} - \beta_{\min}) t / T`
      (Song et al. 2021: ``beta_min = 0.1``, ``beta_max = 20``, ``T = 1``);
    - ``"cosine"``: :math:`a(0, t) = \cos\phi(t) / \cos\phi(0)` with
      :math:`\phi(t) = \frac\pi2 (c\, t / T + o) / (1 + o)`, offset ``o =
      cosine_offset`` (0.008) and ``c = cosine_end`` (0.9946, so that :math:`\beta`
      stays finite at :math:`T`; then :math:`a(0, T) \approx 0.0084`), Nichol &
      Dhariwal (2021). ``beta_min`` and ``beta_max`` are unused.

    Example::

        >>> vp = VariancePreserving()
        >>> mean_scale, std = vp.marginal_coefs(1.0)
        >>> round(float(mean_scale), 4), round(float(std), 4)
        (0.0066, 1.0)
    """

    def __init__(
        self,
        beta_min: float = 0.1,
        beta_max: float = 20.0,
        horizon: float = 1.0,
        *,
        schedule: str = "linear",
        cosine_offset: float = 0.008,
        cosine_end: float = 0.9946,
    ):
        if schedule not in _SCHEDULES:
            raise ValueError(f"Expected `schedule` to be one of {_SCHEDULES}, actual {schedule!r}")
        self.beta_min = _check_positive("beta_min", beta_min)
        self.beta_max = _check_positive("beta_max", beta_max)
        if self.beta_max < self.beta_min:
            raise ValueError(
                f"Expected `beta_min` <= `beta_max`, actual {beta_min!r} > {beta_max!r}"
            )
        self.horizon = _check_positive("horizon", horizon)
        self.schedule = schedule
        self.cosine_offset = _check_positive("cosine_offset", cosine_offset)
        self.cosine_end = _check_positive("cosine_end", cosine_end)
        if schedule == "cosine" and not cosine_end < 1:
            raise ValueError(f"Expected `cosine_end` in (0, 1), actual {cosine_end!r}")

    def _phi(self, t: Tensor) -> Tensor:
        o = self.cosine_offset
        return (math.pi / 2) * (self.cosine_end * t / self.horizon + o) / (1 + o)

    def beta(self, t) -> Tensor:
        r""":math:`\beta(t) = -2 f(t) = g(t)^2`."""
        t = _as_tensor(t)
        if self.schedule == "linear":
            return self.beta_min + (self.beta_max - self.beta_min) * t / self.horizon
        rate = math.pi * self.cosine_end / (self.horizon * (1 + self.cosine_offset))
        return rate * torch.tan(self._phi(t))

    def drift_coef(self, t) -> Tensor:
        return -0.5 * self.beta(t)

    def diffusion_coef(self, t) -> Tensor:
        return self.beta(t).sqrt()

    def _log_mean_scale(self, t: Tensor) -> Tensor:
        if self.schedule == "linear":
            slope = (self.beta_max - self.beta_min) / self.horizon
            return -0.5 * (self.beta_min * t + 0.5 * slope * t.square())
        phi0 = (math.pi / 2) * self.cosine_offset / (1 + self.cosine_offset)
        return torch.log(torch.cos(self._phi(t))) - math.log(math.cos(phi0))

    def _transition_variance(self, s: Tensor, t: Tensor) -> Tensor:
        return -torch.expm1(2 * (self._log_mean_scale(t) - self._log_mean_scale(s)))

    def score_step_weight(self, s: Tensor, t: Tensor) -> Tensor:
        r""":math:`a^{-1} \int_s^t g(u)^2 a(u, t)\, du = 2 (1 / a - 1)`, ``a = a(s, t)``:
        exact, as :math:`g^2 = \beta` and :math:`\partial_u a(u, t) = \tfrac12 \beta(u)
        a(u, t)` (the exponential integrator's score weight)."""
        return 2 * torch.expm1(self._log_mean_scale(s) - self._log_mean_scale(t))


class OrnsteinUhlenbeck(VariancePreserving):
    r"""The Ornstein–Uhlenbeck process :math:`dX = -X\, dt + \sqrt 2\, dB` of Chen et
    al. (2023), prior :math:`\mathcal N(0, I)`: the variance-preserving process with
    constant :math:`\beta = 2`, so :math:`a(s, t) = e^{-(t - s)}`,
    :math:`\sigma^2 = 1 - e^{-2 (t - s)}`.

    :param float horizon: :math:`T` (the prior error is :math:`O(e^{-T})`).
    """

    def __init__(self, horizon: float = 5.0):
        super().__init__(2.0, 2.0, horizon)

    def __repr__(self) -> str:
        return f"OrnsteinUhlenbeck(horizon={self.horizon!r})"


class VarianceExploding(ForwardProcess):
    r"""The variance-exploding process :math:`dX = g(t)\, dW`, with
    :math:`\sigma(t) = \sigma_{\min} (\sigma_{\max} / \sigma_{\min})^{t / T}` and
    :math:`g(t)^2 = d\sigma(t)^2 / dt = 2 \sigma(t)^2 \log(\sigma_{\max} /
    \sigma_{\min}) / T`.

    Its transition is :math:`a = 1`, :math:`\sigma^2 = \sigma(t)^2 - \sigma(s)^2`
    (exact: the marginal variance at ``t`` is :math:`\sigma(t)^2 - \sigma_{\min}^2`, not
    the :math:`\sigma(t)^2` that Song et al. use as an approximation). The prior is
    :math:`\mathcal N(0, \sigma_{\max}^2 I)`, the limit for data small against
    :math:`\sigma_{\max}`.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, horizon: float = 1.0):
        self.sigma_min = _check_positive("sigma_min", sigma_min)
        self.sigma_max = _check_positive("sigma_max", sigma_max)
        if not self.sigma_min < self.sigma_max:
            raise ValueError(
                f"Expected `sigma_min` < `sigma_max`, actual {sigma_min!r} >= {sigma_max!r}"
            )
        self.horizon = _check_positive("horizon", horizon)
        self.prior_std = self.sigma_max

    @property
    def _log_ratio(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def sigma(self, t) -> Tensor:
        r""":math:`\sigma(t)`, the noise level at ``t``."""
        t = _as_tensor(t)
        return self.sigma_min * torch.exp(self._log_ratio * t / self.horizon)

    def drift_coef(self, t) -> Tensor:
        return torch.zeros_like(_as_tensor(t))

    def diffusion_coef(self, t) -> Tensor:
        return self.sigma(t) * math.sqrt(2 * self._log_ratio / self.horizon)

    def _log_mean_scale(self, t: Tensor) -> Tensor:
        return torch.zeros_like(t)

    def _transition_variance(self, s: Tensor, t: Tensor) -> Tensor:
        # sigma(t)^2 - sigma(s)^2 = sigma(t)^2 (1 - exp(-2 r (t - s) / T)), r = log ratio.
        rate = 2 * self._log_ratio / self.horizon
        return self.sigma(t).square() * -torch.expm1(-rate * (t - s))

    def score_step_weight(self, s: Tensor, t: Tensor) -> Tensor:
        r""":math:`\int_s^t g(u)^2 du = \sigma(t)^2 - \sigma(s)^2` (``a = 1``): the
        exponential integrator's score weight, exact."""
        return self._transition_variance(s, t)


class CriticallyDampedLangevin:
    r"""Critically damped Langevin diffusion on position–velocity pairs
    :math:`z = (x, v)`, each coordinate alike:

    .. math::

        dx = \beta M^{-1} v\, dt, \qquad
        dv = \beta(-x - \Gamma M^{-1} v)\, dt + \sqrt{2 \Gamma \beta}\, dW,
        \qquad \Gamma^2 = 4 M \text{ (critical damping)}.

    ``mass = 1``, ``beta = 1`` is the CLD of Chen et al. (2023),
    :math:`dx = v dt,\ dv = (-x - 2 v) dt + 2 dB`. Its invariant law is
    :math:`\mathcal N(0, I) \otimes \mathcal N(0, M I)` (``prior``).

    Write :math:`z_t = A z\, dt + G\, dW` with
    :math:`A = \beta \begin{pmatrix} 0 & 1/M \\ -1 & -\Gamma/M \end{pmatrix}`. Its
    eigenvalue :math:`\lambda = -\beta / \sqrt M` is double, so
    :math:`e^{A\tau} = e^{\lambda \tau}(I + (A - \lambda I)\tau)` exactly, and the
    transition covariance is
    :math:`\Sigma_\infty - e^{A\tau} \Sigma_\infty e^{A^\top \tau}`,
    :math:`\Sigma_\infty = \mathrm{diag}(1, M)`, computed in float64 with ``expm1`` so
    that short steps keep their precision.

    The state of a ``D``-dimensional problem is ``concat(x, v)``, ``2 D`` values. The
    2x2 kernels act on each pair ``(x_i, v_i)``; :meth:`transition_apply` applies one
    to such a state.

    :param float mass: :math:`M`. :param float beta: time scaling :math:`\beta`.
    :param float horizon: :math:`T`.
    :param float init_velocity_var: variance of :math:`v_0 \sim \mathcal N(0,
        \gamma I)` in :meth:`marginal` (Dockhorn et al. use :math:`\gamma = 0.04 M`;
        0 starts from rest).

    References: Dockhorn, Vahdat & Kreis (2022); Chen et al. (2023).
    """

    def __init__(
        self,
        mass: float = 1.0,
        beta: float = 1.0,
        horizon: float = 5.0,
        *,
        init_velocity_var: float = 0.0,
    ):
        self.mass = _check_positive("mass", mass)
        self.beta = _check_positive("beta", beta)
        self.horizon = _check_positive("horizon", horizon)
        if isinstance(init_velocity_var, bool) or not (
            isinstance(init_velocity_var, (int, float))
            and math.isfinite(init_velocity_var)
            and init_velocity_var >= 0
        ):
            raise ValueError(
                f"Expected `init_velocity_var` to be a float >= 0, actual {init_velocity_var!r}"
            )
        self.init_velocity_var = float(init_velocity_var)

    @property
    def damping(self) -> float:
        r""":math:`\Gamma = 2 \sqrt M`."""
        return 2 * math.sqrt(self.mass)

    def drift_matrix(self, t=None) -> Tensor:
        """:math:`A` (2x2, constant in time), in the default dtype."""
        b, m = self.beta, self.mass
        return torch.tensor([[0.0, b / m], [-b, -b * self.damping / m]])

    def diffusion_coef(self, t=None) -> Tensor:
        r""":math:`\sqrt{2 \Gamma \beta}`, the noise on the velocity (none on position)."""
        return torch.tensor(math.sqrt(2 * self.damping * self.beta))

    def transition(self, s, t) -> tuple[Tensor, Tensor]:
        r"""``(mean_matrix, covariance)`` of :math:`z_t \mid z_s \sim \mathcal N(E z_s,
        \Sigma)`, each of shape ``broadcast(s, t).shape + (2, 2)``, for ``s <= t``."""
        s, t = _times(s, t)
        dtype = s.dtype
        tau = (t - s).to(torch.float64)
        b, m = self.beta, self.mass
        lam = -b / math.sqrt(m)
        # N = A - lam I, nilpotent: N @ N = 0.
        nilpotent = torch.tensor(
            [[-lam, b / m], [-b, -b * self.damping / m - lam]], dtype=torch.float64
        )
        eye = torch.eye(2, dtype=torch.float64)
        tau_ = tau[..., None, None]
        decay = torch.exp(lam * tau_)
        mean = decay * (eye + nilpotent * tau_)
        stationary = torch.diag(torch.tensor([1.0, m], dtype=torch.float64))
        cross = nilpotent @ stationary + stationary @ nilpotent.T
        quad = nilpotent @ stationary @ nilpotent.T
        # Sigma_inf - E Sigma_inf E^T, with the e^{2 lam tau} factor split off exactly.
        cov = -torch.expm1(2 * lam * tau_) * stationary - decay.square() * (
            tau_ * cross + tau_.square() * quad
        )
        cov = 0.5 * (cov + cov.transpose(-1, -2))
        return mean.to(dtype), cov.to(dtype)

    def marginal(self, t) -> tuple[Tensor, Tensor]:
        r"""``(mean_coef, covariance)`` of :math:`z_t` given :math:`x_0` alone, with
        :math:`v_0 \sim \mathcal N(0, \gamma)`: per coordinate
        :math:`z_t \sim \mathcal N(\text{mean\_coef}\, x_0, \Sigma)`; shapes
        ``t.shape + (2,)`` and ``t.shape + (2, 2)``."""
        t = _as_tensor(t)
        mean, cov = self.transition(torch.zeros_like(t), t)
        velocity = mean[..., :, 1]
        cov = cov + self.init_velocity_var * velocity[..., :, None] * velocity[..., None, :]
        return mean[..., :, 0], cov

    @staticmethod
    def transition_apply(matrix: Tensor, z: Tensor) -> Tensor:
        """``matrix`` (2x2, or batched ``(..., 2, 2)`` broadcasting with ``z.shape[:-1]``)
        applied to every pair of ``z = concat(x, v)``, shape ``(..., 2 D)``."""
        x, v = z.chunk(2, dim=-1)
        m = matrix[..., None, :, :]  # (..., 1, 2, 2) against the coordinate axis
        new_x = m[..., 0, 0] * x + m[..., 0, 1] * v
        new_v = m[..., 1, 0] * x + m[..., 1, 1] * v
        return torch.cat([new_x, new_v], dim=-1)

    def prior(self, shape, *, dtype=None, device=None) -> dist.TorchDistribution:
        """The invariant law :math:`\\mathcal N(0, I) \\otimes \\mathcal N(0, M I)` on
        ``concat(x, v)``: ``shape[-1] = 2 D``, event dimension 1."""
        shape = torch.Size(shape)
        if len(shape) < 1 or shape[-1] % 2:
            raise ValueError(
                f"Expected `shape` to end with an even state dimension 2 D, actual {shape}"
            )
        dtype = dtype or torch.get_default_dtype()
        half = shape[-1] // 2
        scale = torch.cat(
            [
                torch.ones(half, dtype=dtype, device=device),
                torch.full((half,), math.sqrt(self.mass), dtype=dtype, device=device),
            ]
        )
        loc = torch.zeros(shape, dtype=dtype, device=device)
        return dist.Normal(loc, scale.expand(shape)).to_event(1)

    def __repr__(self) -> str:
        return (
            f"CriticallyDampedLangevin(mass={self.mass!r}, beta={self.beta!r}, "
            f"horizon={self.horizon!r}, init_velocity_var={self.init_velocity_var!r})"
        )
