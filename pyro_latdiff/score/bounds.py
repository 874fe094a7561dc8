r"""Diagnostics that put the samplers' error bounds to work on a user's trained model.

:func:`chen_bound` estimates the three terms of the KL bound behind Chen et al.'s
(2023) theorem for the exponential integrator (:func:`~.samplers.exponential_integrator`)
on a scalar-linear forward process ``dX = f X dt + g dW``. By Girsanov and the data
processing inequality, with ``\hat s`` the model and the score frozen at the upper end
``t_{k+1}`` of each reverse step,

.. math::

    KL(q_{t_0} \| \hat p) \le \underbrace{KL(q_{T} \| \pi)}_{\text{forward}}
    + \sum_k \int_{t_k}^{t_{k+1}} \tfrac{g(u)^2}{2}
      E\big|\nabla \log q_u(X_u) - \hat s(t_{k+1}, X_{t_{k+1}})\big|^2 du
    \le \text{forward} + \big(\sqrt{\text{discretisation}}
      + \sqrt{\text{score error}}\big)^2

(Minkowski), the terms being

- forward: ``KL(q_T \| \pi) \le E_{x_0} KL(N(a_T x_0, \sigma_T^2 I) \| \pi)`` (joint
  convexity; data only), which decays like ``a_T^2 = e^{-2T}`` for the OU process, the
  ``KL(q \| \gamma) e^{-2T}`` of the theorem with the data's second moment in place of
  ``KL(q \| \gamma)`` (finite also for data on a manifold);
- discretisation: the same integral with the model on both sides,
  ``E|\hat s(u, X_u) - \hat s(t_{k+1}, X_{t_{k+1}})|^2``, over forward pairs of held-out
  data (Gauss-Legendre in ``u``, Monte Carlo over the data);
- score error: ``\int \tfrac{g^2}{2} \varepsilon_u^2``, ``\varepsilon_u^2 = E|\hat s -
  \nabla \log q_u|^2`` estimated from the held-out denoising loss: the loss is
  ``\varepsilon_u^2 + d / \sigma_u^2 - J(q_u)``, ``J`` the unknown Fisher information,
  estimated by the model's own ``E|\hat s|^2``, so
  ``\hat\varepsilon_u^2 = 2 E[\hat s \cdot (\hat s + Z / \sigma_u)]`` (antithetic in
  ``Z``; zero in the mean for the exact score, ``2 |e|^2`` for a constant bias ``e``
  whose true ``\varepsilon^2`` is ``|e|^2``; negative when the model's score is
  smoother than the truth, ``E|\hat s|^2 < J``: an estimate, not a bound, clamped at 0
  in ``bound``). The rigorous but loose upper bound (the loss itself, which keeps its
  irreducible part ``d / \sigma_u^2 - J``) is reported as ``score_error_upper``, and
  ``bound_upper`` uses it.

:func:`denoiser_discretisation` evaluates Reeves & Pfister's term
``\Delta_n = \tfrac12 \sum_k [\delta_k M(t_{k-1}) - \int M]`` from a model's MMSE curve
(:func:`mmse_curve`) and the schedule that equalises its steps.

**References:** S. Chen, S. Chewi, J. Li, Y. Li, A. Salim, A. R. Zhang, *Sampling is
as easy as learning the score*, ICLR 2023; G. Reeves, H. D. Pfister, *Discrete-time
diffusion sampling*, 2025.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Distribution

from .._validation import check_positive_int, shape_of
from .samplers._common import (
    CountedCall,
    as_coef,
    check_process,
    gauss_legendre,
    horizon_of,
    make_times,
)
from .samplers.schedules import check_curve, cumulative_integral, curve_at, equalised_times

__all__ = [
    "ChenBound",
    "DenoiserBound",
    "chen_bound",
    "denoiser_discretisation",
    "mmse_curve",
]


def _check_data(data) -> Tensor:
    if not isinstance(data, Tensor) or data.dim() != 2 or data.shape[0] < 2:
        actual = shape_of(data) if isinstance(data, Tensor) else type(data).__name__
        raise ValueError(f"Expected `data` of shape (num_samples >= 2, state_dim), actual {actual}")
    if not torch.isfinite(data).all():
        raise ValueError("Expected `data` to be finite, actual NaN or inf")
    return data


@dataclass
class ChenBound:
    """The terms of :func:`chen_bound`, in nats (KL), with Monte Carlo standard errors.

    :param float forward: ``KL(q_T || prior)`` bound.
    :param float discretisation: the discretisation integral with the model's score.
    :param float score_error: estimated score-error integral.
    :param float score_error_upper: its upper bound from the denoising loss.
    :param float score_error_reference: the integral against a known true score, when
        one was given (``nan`` otherwise): a check of the estimate.
    :param float bound: ``forward + (sqrt(discretisation) + sqrt(score_error))^2``.
    :param float bound_upper: the same with ``score_error_upper``: a bound whatever the
        model, but loose (the denoising loss keeps its irreducible part).
    :param float tv: ``sqrt(bound / 2)`` (Pinsker).
    :param torch.Tensor times: the grid.
    :param torch.Tensor per_step: ``(N, 2)`` discretisation and score-error parts per step.
    """

    forward: float
    discretisation: float
    discretisation_se: float
    score_error: float
    score_error_se: float
    score_error_upper: float
    score_error_reference: float
    bound: float
    bound_upper: float
    tv: float
    times: Tensor
    per_step: Tensor

    def table(self) -> str:
        rows = [
            ("forward  KL(q_T || prior)", self.forward, None),
            ("discretisation", self.discretisation, self.discretisation_se),
            ("score error (estimate)", self.score_error, self.score_error_se),
            ("score error (upper, DSM loss)", self.score_error_upper, None),
            ("score error (against the true score)", self.score_error_reference, None),
            ("bound KL: fwd + (sqrt disc + sqrt score)^2", self.bound, None),
            ("bound TV = sqrt(KL / 2)", self.tv, None),
            ("bound KL with the upper score error", self.bound_upper, None),
        ]
        lines = [
            f"Chen et al. (2023) bound, {self.times.shape[0] - 1} steps on "
            f"[{float(self.times[0]):.3g}, {float(self.times[-1]):.3g}]",
            f"{'term':<44}{'value':>12}{'std err':>12}",
        ]
        for name, value, se in rows:
            if math.isnan(value):  # no true score given
                continue
            se_text = f"{se:>12.3g}" if se is not None else f"{'':>12}"
            lines.append(f"{name:<44}{value:>12.4g}{se_text}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.table()


def _prior_kl(process, data: Tensor, horizon: float) -> float:
    """``E_{x0} KL(N(a x0, std^2 I) || prior)`` for a diagonal Gaussian prior."""
    a, std = (as_coef(c, data) for c in process.marginal_coefs(as_coef(horizon, data)))
    prior = process.prior(torch.Size(data.shape))
    if not isinstance(prior, Distribution):
        raise ValueError(
            f"Expected `process.prior(shape)` to be a distribution, actual {type(prior).__name__}"
        )
    base = getattr(prior, "base_dist", prior)
    loc, scale = as_coef(base.mean, data), as_coef(base.stddev, data)
    ratio = (std / scale) ** 2
    kl = 0.5 * (ratio - 1 - ratio.log() + (a * data - loc) ** 2 / scale**2)
    return float(kl.sum(-1).mean())


def chen_bound(
    score: Callable[[Tensor, Tensor], Tensor],
    process,
    data: Tensor,
    num_steps: int,
    *,
    schedule: str | Tensor = "uniform",
    t_min: float = 0.0,
    num_nodes: int = 4,
    true_score: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> ChenBound:
    r"""Estimate the three terms of Chen et al.'s bound for the exponential integrator
    with ``num_steps`` steps on ``schedule``, from held-out ``data`` and the model
    ``score`` (see the module docstring for the terms).

    Example::

        from pyro_latdiff.score import OrnsteinUhlenbeck
        from pyro_latdiff.testing import GaussianMixture

        process = OrnsteinUhlenbeck(4.0)
        data = GaussianMixture(torch.tensor([[-1.0, 0.0], [1.0, 0.5]]), 0.4)
        held_out = data.sample(1000)
        result = chen_bound(data.score(process), process, held_out, 40)  # or a trained net
        print(result)          # a table of the terms
        result.bound           # nats

    :param callable score: ``score(t, x)``, ``t`` a 0-d tensor, ``x`` of shape
        ``(num_samples, state_dim)``.
    :param process: scalar-linear forward process (``horizon``, ``diffusion_coef``,
        ``marginal_coefs``, ``transition_coefs``, ``prior``).
    :param torch.Tensor data: held-out data ``(num_samples, state_dim)``.
    :param int num_steps: number of sampler steps ``N``.
    :param schedule: ``"uniform"`` or an increasing tensor of ``N + 1`` times.
    :type schedule: str or torch.Tensor
    :param float t_min: where the sampler stops.
    :param int num_nodes: Gauss-Legendre nodes per step.
    :param callable true_score: optional exact score (known only for test problems): the
        score-error integral against it is reported next to the estimate.
    :rtype: ChenBound
    """
    check_process(
        process, ("horizon", "diffusion_coef", "marginal_coefs", "transition_coefs", "prior")
    )
    data = _check_data(data)
    check_positive_int("num_nodes", num_nodes)
    horizon = horizon_of(process)
    times = make_times(horizon, num_steps, schedule, t_min, data.dtype, data.device)
    call = CountedCall(score, "score", dtype_from="`data` of dtype {dtype}")
    num = data.shape[0]
    nodes, weights = gauss_legendre(num_nodes, data.dtype, data.device)
    disc = torch.zeros(num_steps, num, dtype=data.dtype)
    err = torch.zeros(num_steps, num, dtype=data.dtype)
    upper = torch.zeros(num_steps, dtype=data.dtype)
    reference = torch.zeros(num_steps, dtype=data.dtype)
    first = True
    with torch.no_grad():
        for k in range(num_steps):
            lo, hi = times[k], times[k + 1]
            for u_unit, w in zip(nodes, weights, strict=True):
                u = lo + (hi - lo) * u_unit
                a, std = (as_coef(c, data) for c in process.marginal_coefs(u))
                z = torch.randn_like(data)
                x_u = a * data + std * z
                b, s_hi = (as_coef(c, data) for c in process.transition_coefs(u, hi))
                x_hi = b * x_u + s_hi * torch.randn_like(data)
                s_u = call.checked(u, x_u) if first else call(u, x_u)
                first = False
                s_k = call(hi, x_hi)
                g2 = as_coef(process.diffusion_coef(u), data) ** 2
                weight = 0.5 * g2 * w * (hi - lo)
                disc[k] += weight * (s_u - s_k).pow(2).sum(-1)
                # 2 E[s . (s + Z / std)], antithetic in Z: the Z / std term stays bounded
                # as std -> 0 (Gauss-Legendre nodes are interior: u > 0, std > 0)
                s_anti = call(u, a * data - std * z)
                cross = ((s_u - s_anti) * z).sum(-1) / std
                square = s_u.pow(2).sum(-1) + s_anti.pow(2).sum(-1)
                err[k] += weight * (square + cross)
                upper[k] += weight * (s_u + z / std).pow(2).sum(-1).mean()
                if true_score is not None:
                    reference[k] += weight * (s_u - true_score(u, x_u)).pow(2).sum(-1).mean()
    forward = _prior_kl(process, data, horizon)
    d_total, e_total = disc.sum(0), err.sum(0)
    discretisation, score_error = float(d_total.mean()), float(e_total.mean())
    bound = forward + (math.sqrt(discretisation) + math.sqrt(max(score_error, 0.0))) ** 2
    score_error_upper = float(upper.sum())
    bound_upper = forward + (math.sqrt(discretisation) + math.sqrt(score_error_upper)) ** 2
    return ChenBound(
        forward=forward,
        discretisation=discretisation,
        discretisation_se=float(d_total.std() / math.sqrt(num)),
        score_error=score_error,
        score_error_se=float(e_total.std() / math.sqrt(num)),
        score_error_upper=score_error_upper,
        score_error_reference=float(reference.sum()) if true_score is not None else math.nan,
        bound=bound,
        bound_upper=bound_upper,
        tv=math.sqrt(bound / 2),
        times=times,
        per_step=torch.stack([disc.mean(1), err.mean(1)], -1),
    )


def mmse_curve(denoiser: Callable[[Tensor, Tensor], Tensor], data: Tensor, times: Tensor) -> Tensor:
    r"""A denoiser's held-out error ``E|X - f(t, tX + W_t)|^2`` at each of ``times`` on
    the channel ``Y_t = t X + W_t``: the MMSE curve ``M(t)`` for the exact conditional
    mean, an upper bound on it for a trained one.

    :param callable denoiser: ``denoiser(t, y)`` returning ``E[X | Y_t = y]``.
    :param torch.Tensor data: held-out data ``(num_samples, state_dim)``.
    :param torch.Tensor times: increasing times from 0, ``(G,)``.
    :returns: ``(G,)``.
    """
    data = _check_data(data)
    if not isinstance(times, Tensor) or times.dim() != 1:
        raise ValueError(f"Expected `times` to be a 1-D tensor, actual {type(times).__name__}")
    call = CountedCall(denoiser, "denoiser")
    out = []
    with torch.no_grad():
        for j, t in enumerate(times.to(data.dtype)):
            y = t * data + t.sqrt() * torch.randn_like(data)
            f = call.checked(t, y) if j == 0 else call(t, y)
            out.append((data - f).pow(2).sum(-1).mean())
    return torch.stack(out)


@dataclass
class DenoiserBound:
    """Reeves & Pfister's discretisation term for a grid, and for the grid that equalises
    its steps.

    :param torch.Tensor times: the grid evaluated. :param torch.Tensor per_step: the
        terms ``e_k / 2``. :param float delta: ``Delta_n``.
    :param torch.Tensor equalised_times: the equalising grid with as many steps.
    :param float equalised_delta: its ``Delta_n``.
    :param float bound: ``delta_max tr Cov(X) / 2`` is not computed here; instead
        ``delta_max M(0) / 2``, the same bound with ``M(0) = tr Cov(X)``.
    """

    times: Tensor
    per_step: Tensor
    delta: float
    equalised_times: Tensor
    equalised_delta: float
    bound: float

    def table(self) -> str:
        n = self.times.shape[0] - 1
        lines = [
            f"Reeves & Pfister (2025) discretisation term, n = {n} steps on [0, "
            f"{float(self.times[-1]):.3g}]",
            f"{'grid':<28}{'Delta_n':>12}{'max step term':>16}",
            f"{'given':<28}{self.delta:>12.6g}{float(self.per_step.max()):>16.4g}",
            f"{'equalised':<28}{self.equalised_delta:>12.6g}{self.equalised_delta / n:>16.4g}",
            f"{'bound delta_max M(0) / 2':<28}{self.bound:>12.6g}",
        ]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return self.table()


def _delta_terms(times: Tensor, curve_times, values, cumulative) -> Tensor:
    m, c = curve_at(times, curve_times, values, cumulative)
    return 0.5 * (times.diff() * m[:-1] - c.diff())


def denoiser_discretisation(
    mmse_times: Tensor, mmse_values: Tensor, times: Tensor | int
) -> DenoiserBound:
    r"""Reeves & Pfister's ``\Delta_n = \tfrac12 \sum_k [\delta_k M(t_{k-1}) -
    \int_{t_{k-1}}^{t_k} M]`` for the grid ``times`` (or a uniform grid of that many
    steps), from an MMSE curve tabulated on ``mmse_times`` (piecewise linear between),
    and the same for :func:`~.samplers.equalised_times`. With the exact conditional mean
    ``\Delta_n`` is the denoiser sampler's path KL.

    :param torch.Tensor mmse_times: increasing from 0 to ``t_max``, ``(G,)``.
    :param torch.Tensor mmse_values: ``M`` there, ``(G,)`` (e.g. :func:`mmse_curve`).
    :param times: the sampler's grid ``(n + 1,)`` from 0 to ``t_max``, or ``n``.
    :type times: torch.Tensor or int
    :rtype: DenoiserBound
    """
    curve_times, values = check_curve(mmse_times, mmse_values)
    t_max = float(curve_times[-1])
    if isinstance(times, int) and not isinstance(times, bool):
        check_positive_int("times", times)
        times = torch.linspace(0, t_max, times + 1, dtype=torch.float64)
    if not isinstance(times, Tensor) or times.dim() != 1 or times.shape[0] < 2:
        raise ValueError(
            "Expected `times` to be a number of steps or a 1-D tensor of >= 2 times, "
            f"actual {type(times).__name__}"
        )
    times = times.double()
    if (
        times[0] != 0
        or abs(float(times[-1]) - t_max) > 1e-9 * t_max
        or not (times.diff() > 0).all()
    ):
        raise ValueError(
            f"Expected `times` to increase strictly from 0 to t_max = {t_max}, actual "
            f"[{float(times[0])}, {float(times[-1])}]"
        )
    cumulative = cumulative_integral(curve_times, values)
    per_step = _delta_terms(times, curve_times, values, cumulative)
    n = times.shape[0] - 1
    equal = equalised_times(curve_times, values, n)
    equal_terms = _delta_terms(equal, curve_times, values, cumulative)
    return DenoiserBound(
        times=times,
        per_step=per_step,
        delta=float(per_step.sum()),
        equalised_times=equal,
        equalised_delta=float(equal_terms.sum()),
        bound=0.5 * float(times.diff().max()) * float(values[0]),
    )
