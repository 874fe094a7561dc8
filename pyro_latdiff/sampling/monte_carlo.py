r"""The training-free Schrödinger–Föllmer sampler: Euler steps with the Monte Carlo
Föllmer drift."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._validation import check_callable, check_positive_float, check_positive_int
from .density import TargetDensity, check_dtype
from .estimate import LogNormalizerEstimate
from .follmer_drift import MonteCarloFollmerDrift

__all__ = ["MonteCarloFollmerSampler", "gaussian_importance_sampling"]


class MonteCarloFollmerSampler:
    r"""Simulates :math:`dX = \hat b(t, X) dt + dW` from :math:`X_0 = 0` on [0, 1] with
    ``num_steps`` Euler steps, :math:`\hat b` a
    :class:`~pyro_latdiff.sampling.MonteCarloFollmerDrift` (or any ``drift(t, x)``, e.g.
    an exact Föllmer drift), no training.

    :meth:`log_normalizer` weights each path by the discretised Girsanov ratio of the
    Brownian-path model to the chain actually simulated,

    .. math::

        \log w = \log \pi(x_N) - \log \mathcal N(x_N; 0, \sigma^2 I)
                 - \sum_k \Big(\sqrt{h}\, u_k \cdot \xi_k + \tfrac12 |u_k|^2 h\Big),
        \quad u_k = \hat b_k / \sigma,

    with the drift values :math:`\hat b_k` of the simulation itself, so :math:`\mathbb E
    w = Z` exactly whatever the drift's bias: given the inner samples of a step, the
    step is the Gaussian kernel whose drift value enters the weight.

    Example::

        sampler = MonteCarloFollmerSampler(target.log_prob, dim=2, num_inner=64)
        x = sampler.sample(1000)
        print(sampler.log_normalizer(1000))

    :param callable log_density: unnormalised :math:`\log \pi(x)`, batch shapes.
    :param int dim: the state dimension.
    :param int num_steps: Euler steps on the uniform grid of [0, 1].
    :param int num_inner: inner samples of the Monte Carlo drift.
    :param str estimator: ``"gradient"`` or ``"stein"``.
    :param callable drift: a drift to use instead of the Monte Carlo one.
    :param float sigma: the noise scale :math:`\sigma` of the reference.
    :param int chunk_size: paths simulated at once (bounds memory).
    :param torch.dtype dtype: dtype of the simulation, a floating point one (default
        torch's default).

    References: Huang, Jiao, Kang, Liao, Liu & Liu (2021), *Schrödinger–Föllmer
    sampler*; Tzen & Raginsky (2019).
    """

    def __init__(
        self,
        log_density: Callable[[Tensor], Tensor],
        dim: int,
        *,
        num_steps: int = 100,
        num_inner: int = 64,
        estimator: str = "gradient",
        drift: Callable[[Tensor, Tensor], Tensor] | None = None,
        sigma: float = 1.0,
        chunk_size: int = 1000,
        dtype: torch.dtype | None = None,
    ):
        self.dtype = check_dtype(dtype)
        self.density = TargetDensity(log_density, dim, dtype=self.dtype)
        self.dim = dim
        self.num_steps = check_positive_int("num_steps", num_steps)
        self.times = torch.linspace(0.0, 1.0, num_steps + 1, dtype=self.dtype)
        self.sigma = check_positive_float("sigma", sigma)
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        if drift is not None:
            check_callable("drift", drift)
        self.drift = drift or MonteCarloFollmerDrift(
            self.density,
            dim,
            num_inner=num_inner,
            estimator=estimator,
            sigma=sigma,
            fixed=False,
            dtype=self.dtype,
        )

    @torch.no_grad()
    def _simulate(self, n: int) -> tuple[Tensor, Tensor]:
        x = torch.zeros(n, self.dim, dtype=self.dtype)
        log_ratio = torch.zeros(n, dtype=self.dtype)
        steps = self.times.diff()
        for k in range(self.num_steps):
            h = steps[k]
            b = self.drift(self.times[k], x)
            xi = torch.randn_like(x)
            u = b / self.sigma
            log_ratio -= h.sqrt() * (u * xi).sum(-1) + 0.5 * h * u.square().sum(-1)
            x = x + b * h + self.sigma * h.sqrt() * xi
        return x, log_ratio

    def _paths(self, num_samples: int):
        check_positive_int("num_samples", num_samples)
        for start in range(0, num_samples, self.chunk_size):
            yield self._simulate(min(self.chunk_size, num_samples - start))

    def sample(self, num_samples: int) -> Tensor:
        """Terminal states :math:`x_N`, shape ``(num_samples, dim)``."""
        return torch.cat([x for x, _ in self._paths(num_samples)])

    def sample_with_log_weights(self, num_samples: int) -> tuple[Tensor, Tensor]:
        """Terminal states and their importance log-weights :math:`\\log w`."""
        xs, lws = [], []
        for x, log_ratio in self._paths(num_samples):
            xs.append(x)
            with torch.no_grad():
                lws.append(self.density.log_ratio(x, self.sigma, floor=False) + log_ratio)
        return torch.cat(xs), torch.cat(lws)

    def log_normalizer(self, num_samples: int = 1000) -> LogNormalizerEstimate:
        """Importance-weighted :math:`\\log Z` (with standard error, ESS and the ELBO)."""
        before = self.density.num_evaluations
        _, log_weights = self.sample_with_log_weights(num_samples)
        return LogNormalizerEstimate.from_log_weights(
            log_weights, self.density.num_evaluations - before
        )


def gaussian_importance_sampling(
    log_density: Callable[[Tensor], Tensor],
    dim: int,
    num_samples: int,
    *,
    scale: float = 1.0,
    dtype: torch.dtype | None = None,
) -> tuple[LogNormalizerEstimate, Tensor]:
    r"""Plain importance sampling from :math:`\mathcal N(0, s^2 I)`: the baseline every
    sampler must beat at an equal budget of target evaluations.

    :returns: the :class:`LogNormalizerEstimate` and the ``(num_samples, dim)`` proposals.
    """
    check_positive_int("num_samples", num_samples)
    check_positive_float("scale", scale)
    density = TargetDensity(log_density, dim, dtype=dtype)
    x = scale * torch.randn(num_samples, dim, dtype=dtype or torch.get_default_dtype())
    with torch.no_grad():
        log_weights = density.log_ratio(x, scale, floor=False)
    return LogNormalizerEstimate.from_log_weights(log_weights, num_samples), x
