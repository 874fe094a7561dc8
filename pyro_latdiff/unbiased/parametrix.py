r"""Random-grid forward parametrix: unbiased expectations with a random number of Euler steps.

The estimator of Henry-Labordère, Tan & Touzi (2017) for a
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

*Choosing the law*: the default ``ExponentialArrivals(rate=1 / (t1 - t0))`` (mean
depth 2) had the smallest or near-smallest work (variance times mean depth) on every
test problem; ``rate = 2 / (t1 - t0)`` gives the lightest tails for more work. The
measured table is in ``benchmarks/README.md`` (Table 3). Shapes and cost are as in
:mod:`pyro_latdiff.unbiased`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._validation import check_fn, check_fn_output, check_sde_arguments, check_x0
from .arrivals import ArrivalLaw, arrivals_or_default
from .results import (
    DEFAULT_SAMPLES_PER_CHUNK,
    Drift,
    LikelihoodEstimate,
    Sigma,
    UnbiasedEstimate,
    WeightedSample,
    summarise,
)

__all__ = ["expectation", "likelihood", "sample_weighted"]


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
    (:class:`WeightedSample`; formula in the module docstring above).

    :param callable drift: ``drift(t, x)``, see :mod:`pyro_latdiff.unbiased` for shapes.
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
    duration, sigma_t, chunk = check_sde_arguments(
        drift, x0, t0, t1, sigma, num_samples, chunk_size, DEFAULT_SAMPLES_PER_CHUNK
    )
    arrivals = arrivals_or_default(arrivals, duration)
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
    are in the module docstring above. The result's ``stderr`` is only meaningful when the
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
        law" in the module docstring above).
    :param bool antithetic: reflect the last Brownian increment and average (one
        more ``fn`` evaluation, no more drift evaluations).
    :param int chunk_size: samples simulated at once (memory bound), default 131072.
    :rtype: UnbiasedEstimate
    """
    check_x0(x0)
    check_fn("fn", fn, x0)
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
    return summarise(values, draws.depths, draws.depths, "parametrix")


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
    check_x0(x0)
    check_fn("log_lik_fn", log_lik_fn, x0)
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
    check_fn_output("log_lik_fn", log_lik, draws.states)
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
