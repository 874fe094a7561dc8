r"""Continuous-time training objectives for a :class:`~pyro_latdiff.score.ScoreModel`, as
Pyro ELBO objects that :class:`pyro.infer.SVI` and :func:`pyro_latdiff.fit` accept.

For a data point :math:`x` and the forward process :math:`dY = f Y dt + g dW` from it,
Huang, Lim & Courville (2021, Theorem 3) bound the log-density of the plug-in reverse
SDE by

.. math::

    \mathcal E(x) = \mathbb E\Big[\log p_T(Y_T) - \int_\epsilon^T \Big(\tfrac12 g^2
    |s_\theta(t, Y_t)|^2 + g^2\, \nabla\cdot s_\theta(t, Y_t) - D f(t)\Big) dt\Big]

(:math:`\epsilon = 0`: a lower bound on :math:`\log p_\theta(x)`; :math:`\epsilon > 0`,
the truncation every implementation uses, bounds the density of the reverse SDE
stopped at :math:`\epsilon`, averaged over :math:`Y_\epsilon \mid x`).
:class:`ContinuousTimeELBO` estimates it with one random time slice
:math:`t \sim U(\epsilon, T)` per particle and Hutchinson's divergence estimator.

By Stein's lemma, :math:`\mathbb E[\nabla\cdot s(Y_t)] = \mathbb E[s(Y_t) \cdot Z] /
\sigma_t` for :math:`Y_t = a_t x + \sigma_t Z`, and with :math:`d\sigma_t^2/dt = 2 f
\sigma_t^2 + g^2` the time integrals close:

.. math::

    -\mathcal E(x) = \underbrace{\int_\epsilon^T \tfrac12 g^2\,
    \mathbb E\big|s_\theta(t, Y_t) + Z/\sigma_t\big|^2 dt}_{\text{likelihood-weighted
    DSM}} + C(x), \qquad
    C(x) = -\mathbb E \log p_T(Y_T) - \frac D2 \log\frac{\sigma_T^2}{\sigma_\epsilon^2},

with :math:`C` free of :math:`\theta` (and infinite at :math:`\epsilon = 0`: the
truncation is needed for score matching, not for the ELBO).
:class:`DenoisingScoreMatching` is the first term, optionally plus :math:`C(x)` in
closed form, so that its value estimates :math:`-\mathcal E` too.

Both losses sum over the data like a Pyro model's plate: a minibatch of
``score_model.subsample_size`` points drawn without replacement, scaled by
``num_data / batch``. They do not run the model or the guide (which SVI passes): they
evaluate the score network directly, registered as ``pyro.module("score", ...)`` as in
:func:`~pyro_latdiff.score.score_model`, so parameters are shared with the discrete
model.
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro.infer import ELBO
from torch import Tensor, nn

from .._validation import check_positive_int, check_provides
from .model import check_data

__all__ = ["ContinuousTimeELBO", "DenoisingScoreMatching"]

_TIME_SAMPLING = ("uniform", "importance")


def divergence(score, t: Tensor, y: Tensor, *, exact: bool, create_graph: bool) -> Tensor:
    """``div_y score(t, y)`` and ``score(t, y)``: exactly (``D`` backward passes) or by
    Hutchinson's estimator with one Rademacher probe. ``y`` must require grad."""
    s = score(t, y)
    if exact:
        parts = []
        for d in range(y.shape[-1]):
            (grad,) = torch.autograd.grad(
                s[..., d].sum(), y, create_graph=create_graph, retain_graph=True
            )
            parts.append(grad[..., d])
        return torch.stack(parts, -1).sum(-1), s
    probe = torch.randint(0, 2, y.shape, dtype=y.dtype, device=y.device) * 2 - 1
    (grad,) = torch.autograd.grad((s * probe).sum(), y, create_graph=create_graph)
    return (grad * probe).sum(-1), s


class _ContinuousLoss(ELBO):
    """Shared plumbing: minibatch, time slices, Pyro's loss interface."""

    def __init__(
        self,
        score_model,
        *,
        num_particles: int = 1,
        truncation: float = 1e-3,
        time_sampling: str = "uniform",
    ):
        check_positive_int("num_particles", num_particles)
        check_provides(
            "score_model",
            score_model,
            ("process", "score", "state_dim", "subsample_size"),
            TypeError,
        )
        horizon = float(score_model.process.horizon)
        if isinstance(truncation, bool) or not (
            isinstance(truncation, (int, float)) and 0 <= truncation < horizon
        ):
            raise ValueError(
                f"Expected `truncation` in [0, horizon = {horizon}), actual {truncation!r}"
            )
        if time_sampling not in _TIME_SAMPLING:
            raise ValueError(
                f"Expected `time_sampling` to be one of {_TIME_SAMPLING}, actual {time_sampling!r}"
            )
        if time_sampling == "importance" and truncation == 0:
            raise ValueError("Expected `truncation` > 0 with time_sampling='importance', actual 0")
        super().__init__(num_particles=num_particles)
        self.score_model = score_model
        self.truncation = float(truncation)
        self.time_sampling = time_sampling
        self._table = None
        if time_sampling == "importance":
            self._table = self._importance_table()

    def _importance_table(self) -> tuple[Tensor, Tensor]:
        """Inverse CDF of the density proportional to ``g(t)^2 / sigma_t^2`` on
        ``[truncation, T]``, tabulated on a log-spaced grid."""
        process = self.score_model.process
        eps, horizon = self.truncation, float(process.horizon)
        t = torch.logspace(math.log10(eps), math.log10(horizon), 4001, dtype=torch.float64)
        _, std = process.marginal_coefs(t)
        rate = process.diffusion_coef(t).square().expand(t.shape) / std.square()
        cdf = torch.cat([torch.zeros(1, dtype=t.dtype), 0.5 * (rate[1:] + rate[:-1]) * t.diff()])
        cdf = cdf.cumsum(0)
        return t, cdf / cdf[-1]

    def _times(self, shape, like: Tensor) -> tuple[Tensor, Tensor]:
        """Times of shape ``shape + (1,)`` and their weights ``1 / density`` (``T - eps``
        for uniform sampling)."""
        eps, horizon = self.truncation, float(self.score_model.process.horizon)
        u = torch.rand(shape + (1,), dtype=like.dtype, device=like.device)
        if self._table is None:
            return eps + (horizon - eps) * u, torch.full_like(u, horizon - eps)
        t_table, cdf = (v.to(like.device) for v in self._table)
        u64 = u.to(torch.float64)
        index = torch.searchsorted(cdf, u64).clamp(1, cdf.shape[0] - 1)
        low, high = cdf[index - 1], cdf[index]
        w = (u64 - low) / (high - low)
        width = t_table[index] - t_table[index - 1]
        t = t_table[index - 1] + w * width
        # The sampler's density is piecewise constant: (cdf step) / (cell width).
        return t.to(like.dtype), (width / (high - low)).to(like.dtype)

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError(f"{type(self).__name__} does not trace the model")

    def _minibatch(self, data: Tensor) -> tuple[Tensor, float]:
        size = self.score_model.subsample_size
        n = data.shape[0]
        if size is None or size >= n:
            return data, 1.0
        index = torch.randperm(n, device=data.device)[:size]
        return data[index], n / size

    def per_point(self, data: Tensor) -> Tensor:
        """The loss's estimate for each point of ``data`` (all of it, no minibatch),
        averaged over ``num_particles``; shape ``(num_data,)``."""
        raise NotImplementedError

    def differentiable_loss(self, model, guide, data: Tensor, *args, **kwargs) -> Tensor:
        """The loss on a minibatch of ``data``, differentiable in the score network's
        parameters. ``model`` and ``guide`` are accepted for SVI's interface and not run."""
        if hasattr(self.score_model, "check_data"):
            self.score_model.check_data(data)
        else:
            check_data(data, self.score_model.state_dim)
        if isinstance(self.score_model.score, nn.Module):
            pyro.module("score", self.score_model.score)
        batch, scale = self._minibatch(data)
        return scale * self.per_point(batch).sum()

    def loss(self, model, guide, data: Tensor, *args, **kwargs) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, data, *args, **kwargs))

    def loss_and_grads(self, model, guide, data: Tensor, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, data, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return float(loss.detach())


class ContinuousTimeELBO(_ContinuousLoss):
    r"""The negative continuous-time ELBO of Huang, Lim & Courville (2021) (see the
    module), estimated with one random time slice and one divergence probe per particle:

    .. math::

        \hat{\mathcal E}(x) = \log p_T(y_T) - w(t)\big(\tfrac12 g^2 |s_\theta|^2
        + g^2\, \varepsilon^\top \nabla_y (s_\theta \cdot \varepsilon) - D f\big)(t, y_t),

    :math:`y_t = a_t x + \sigma_t z`, :math:`y_T` drawn from the forward kernel given
    :math:`y_t`, :math:`\varepsilon` Rademacher, :math:`w = T - \epsilon` for uniform
    times (or ``1 / density`` under ``time_sampling="importance"``, density
    :math:`\propto g^2 / \sigma_t^2`). Training backpropagates through the divergence
    (second derivatives of the network).

    Example::

        from pyro_latdiff import fit
        sm = ScoreModel(VariancePreserving(), state_dim=2, subsample_size=256)
        fit(sm.model, sm.guide, data, loss=ContinuousTimeELBO(sm), num_steps=2000)

    :param score_model: a :class:`~pyro_latdiff.score.ScoreModel`.
    :param int num_particles: time slices per data point.
    :param float truncation: :math:`\epsilon` (0 is Huang et al.'s bound; the score
        must then be finite at ``t = 0``).
    :param str time_sampling: ``"uniform"`` or ``"importance"``.
    :param bool exact_divergence: the exact divergence (``D`` backward passes) instead of
        Hutchinson's estimator.
    """

    def __init__(
        self,
        score_model,
        *,
        num_particles: int = 1,
        truncation: float = 1e-3,
        time_sampling: str = "uniform",
        exact_divergence: bool = False,
    ):
        super().__init__(
            score_model,
            num_particles=num_particles,
            truncation=truncation,
            time_sampling=time_sampling,
        )
        self.exact_divergence = bool(exact_divergence)

    def per_point(self, data: Tensor) -> Tensor:
        sm = self.score_model
        process, score = sm.process, sm.score
        shape = (self.num_particles, data.shape[0])
        t, weight = self._times(shape, data)
        mean_scale, std = process.marginal_coefs(t)
        y = mean_scale * data + std * torch.randn(shape + data.shape[1:], dtype=data.dtype)
        training = torch.is_grad_enabled()
        with torch.enable_grad():
            y = y.detach().requires_grad_(True)
            div, s = divergence(score, t, y, exact=self.exact_divergence, create_graph=training)
        g2 = process.diffusion_coef(t).square()[..., 0]
        f = process.drift_coef(t)[..., 0]
        integrand = 0.5 * g2 * s.square().sum(-1) + g2 * div - data.shape[-1] * f
        scale_to_end, std_to_end = process.transition_coefs(t, process.horizon)
        y_end = scale_to_end * y.detach() + std_to_end * torch.randn_like(y)
        log_prior = process.prior(y_end.shape, dtype=y.dtype, device=y.device).log_prob(y_end)
        estimate = log_prior - weight[..., 0] * integrand
        return -estimate.mean(0)


class DenoisingScoreMatching(_ContinuousLoss):
    r"""Likelihood-weighted denoising score matching (see the module),

    .. math::

        \hat L(x) = w(t)\, \tfrac12 g(t)^2 \big|s_\theta(t, y_t) + z / \sigma_t\big|^2
        \;\big[+\, C(x)\big], \qquad y_t = a_t x + \sigma_t z,

    with the same time sampling as :class:`ContinuousTimeELBO`. With
    ``include_constant=True`` the closed-form :math:`C(x)` is added, so the loss
    estimates the negative continuous-time ELBO (a value to report); its gradient is the
    same either way. ``time_sampling="importance"`` (density :math:`\propto g^2 /
    \sigma_t^2`, Song et al. 2021) removes the :math:`1/t` spike of the weight at small
    ``t`` and is what training wants.

    :param score_model: a :class:`~pyro_latdiff.score.ScoreModel`.
    :param int num_particles: time slices per data point.
    :param float truncation: :math:`\epsilon > 0`.
    :param str time_sampling: ``"uniform"`` or ``"importance"``.
    :param bool include_constant: add :math:`C(x)`.
    """

    def __init__(
        self,
        score_model,
        *,
        num_particles: int = 1,
        truncation: float = 1e-3,
        time_sampling: str = "importance",
        include_constant: bool = False,
    ):
        if isinstance(truncation, (int, float)) and not isinstance(truncation, bool):
            if truncation == 0:
                raise ValueError(
                    "Expected `truncation` > 0 for score matching (its weight 1/sigma_t^2 "
                    "is not integrable at 0), actual 0"
                )
        super().__init__(
            score_model,
            num_particles=num_particles,
            truncation=truncation,
            time_sampling=time_sampling,
        )
        self.include_constant = bool(include_constant)

    def constant(self, data: Tensor) -> Tensor:
        r""":math:`C(x)` for each point of ``data``, shape ``(num_data,)``."""
        process = self.score_model.process
        d = data.shape[-1]
        horizon = process.horizon
        mean_end, std_end = process.marginal_coefs(torch.tensor(horizon, dtype=data.dtype))
        _, std_eps = process.marginal_coefs(torch.tensor(self.truncation, dtype=data.dtype))
        p2 = float(process.prior_std) ** 2
        expected_log_prior = -0.5 * d * math.log(2 * math.pi * p2) - (
            mean_end.square() * data.square().sum(-1) + d * std_end.square()
        ) / (2 * p2)
        return -expected_log_prior - 0.5 * d * torch.log(std_end.square() / std_eps.square())

    def per_point(self, data: Tensor) -> Tensor:
        sm = self.score_model
        process = sm.process
        shape = (self.num_particles, data.shape[0])
        t, weight = self._times(shape, data)
        mean_scale, std = process.marginal_coefs(t)
        z = torch.randn(shape + data.shape[1:], dtype=data.dtype, device=data.device)
        s = sm.score(t, mean_scale * data + std * z)
        g2 = process.diffusion_coef(t).square()
        estimate = (0.5 * weight * g2 * (s + z / std).square()).sum(-1).mean(0)
        if self.include_constant:
            estimate = estimate + self.constant(data)
        return estimate
