r"""The Monte Carlo Föllmer drift: the Schrödinger–Föllmer sampler's drift, training-free.

For a target :math:`\mu` with density :math:`\pi / Z` and the Brownian reference from
0 on [0, 1], let :math:`f = \pi / \mathcal N(0, I)`. The Föllmer drift
(Tzen & Raginsky 2019, §3; Huang, Jiao et al. 2021)

.. math::

    b^*(t, x) = \nabla \log Q_{1-t} f(x)
    = \frac{\mathbb E_Z[\nabla f(x + \sqrt{1-t} Z)]}{\mathbb E_Z[f(x + \sqrt{1-t} Z)]}
    = \frac{\mathbb E_Z[Z f(x + \sqrt{1-t} Z)]}{\sqrt{1-t}\; \mathbb E_Z[f(x + \sqrt{1-t} Z)]}

makes :math:`dX = b^* dt + dW`, :math:`X_0 = 0`, end at :math:`X_1 \sim \mu`. The last
form is Stein's identity and needs no gradient of :math:`\pi`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .density import TargetDensity

__all__ = ["MonteCarloFollmerDrift"]

ESTIMATORS = ("gradient", "stein")
_HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


class MonteCarloFollmerDrift:
    r"""The Föllmer drift :math:`b^*(t, x)` estimated with ``num_inner`` Gaussian
    samples :math:`Z_j`, in log space: with
    :math:`y_j = x + \sqrt{1-t}\, Z_j` and self-normalised weights
    :math:`w_j = \mathrm{softmax}_j \log f(y_j)` (a ``logsumexp``, so neither
    :math:`f` nor the sums overflow),

    - ``estimator="gradient"``: :math:`\hat b = \sum_j w_j \nabla \log f(y_j)`
      (since :math:`\nabla f = f \nabla \log f`);
    - ``estimator="stein"``: :math:`\hat b = \sum_j w_j Z_j / \sqrt{1-t}`, no gradient
      of the target needed.

    The ratio of means is biased at finite ``num_inner`` (by :math:`O(1/K)`; see the
    measured bias in ``benchmarks/README.md``) and consistent as it grows.

    **Reference.** With ``sigma`` the reference is :math:`dX = \sigma dW`, so
    :math:`X_1 \sim \mathcal N(0, \sigma^2 I)`, :math:`f = \pi / \mathcal N(0,
    \sigma^2 I)`, :math:`y_j = x + \sigma \sqrt{1-t} Z_j` and the drift is
    :math:`\sigma^2 \nabla \log Q_{1-t} f`: :math:`\sigma^2 \sum_j w_j \nabla \log
    f(y_j)`, resp. :math:`\sigma \sum_j w_j Z_j / \sqrt{1-t}`. A reference as wide
    as the target (``sigma = 5`` for modes 5 apart) is what lets a moderate ``K``
    see far modes.

    **The drift is a fixed function** (``fixed=True``). The :math:`Z_j` are drawn once,
    at construction
    (and by :meth:`resample`), and shared by every ``(t, x)``: the estimate is then a
    deterministic, smooth function of ``(t, x)``, so a :class:`~pyro_latdiff.LatentDiffusion`
    built on it simulates and scores the same chain, and importance weights through it
    are exact. With ``antithetic=True`` they come in pairs :math:`\pm Z_j`.

    **t → 1.** :math:`\sqrt{1 - t}` is floored at ``min_scale`` (by default the cube
    root of the dtype's epsilon). At that scale the gradient form is
    :math:`\nabla \log f(x)`; the Stein form's antithetic pairs cancel the
    :math:`O(1/\sqrt{1-t})` term, so its variance stays bounded. On an Euler grid the
    drift is evaluated at :math:`t_k \le 1 - h` only.

    ``t`` is 0-d, or of shape ``(N, 1, ..., 1)`` with ``x`` of shape
    ``(N,) + batch + (D,)`` (the layout of ``LatentDiffusion.log_prob``). Memory is
    ``x.numel() * num_inner``.

    Example::

        drift = MonteCarloFollmerDrift(target.log_prob, dim=2, num_inner=64)
        b = drift(torch.tensor(0.3), torch.randn(100, 2))

    :param callable log_density: unnormalised :math:`\log \pi`, or a
        :class:`~pyro_latdiff.sampling.TargetDensity`.
    :param int dim: the state dimension.
    :param int num_inner: the number ``K`` of inner samples (even with ``antithetic``).
    :param str estimator: ``"gradient"`` or ``"stein"``.
    :param bool antithetic: use antithetic pairs :math:`\pm Z_j`.
    :param float min_scale: floor of :math:`\sqrt{1-t}`.
    :param float sigma: the reference's diffusion coefficient :math:`\sigma`
        (see below).
    :param bool fixed: share one draw of inner samples by every ``(t, x)`` (a fixed
        function, see above); with ``False`` every point gets fresh inner samples (an
        unbiased-weight, lower-bias sampler that cannot be scored twice alike).
    :param torch.dtype dtype: dtype of the inner samples.
    :param torch.Generator generator: random source of the inner samples.

    References: Tzen & Raginsky (2019), *Theoretical guarantees for sampling and
    inference in generative models with latent diffusions*; Huang, Jiao, Kang, Liao,
    Liu & Liu (2021), *Schrödinger–Föllmer sampler: sampling without ergodicity*.
    """

    def __init__(
        self,
        log_density: Callable[[Tensor], Tensor] | TargetDensity,
        dim: int,
        *,
        num_inner: int = 64,
        estimator: str = "gradient",
        antithetic: bool = True,
        min_scale: float | None = None,
        sigma: float = 1.0,
        fixed: bool = True,
        dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ):
        if estimator not in ESTIMATORS:
            raise ValueError(f"Expected `estimator` in {ESTIMATORS}, actual {estimator!r}")
        if isinstance(num_inner, bool) or not isinstance(num_inner, int) or num_inner < 1:
            raise ValueError(f"Expected `num_inner` to be an int >= 1, actual {num_inner!r}")
        if antithetic and num_inner % 2:
            raise ValueError(
                f"Expected an even `num_inner` with antithetic=True, actual {num_inner}"
            )
        self.density = (
            log_density
            if isinstance(log_density, TargetDensity)
            else TargetDensity(log_density, dim, dtype=dtype)
        )
        self.dim = dim
        self.num_inner = num_inner
        self.estimator = estimator
        self.antithetic = antithetic
        self.dtype = dtype or torch.get_default_dtype()
        self.min_scale = (
            torch.finfo(self.dtype).eps ** (1 / 3) if min_scale is None else float(min_scale)
        )
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"Expected `sigma` to be a positive float, actual {sigma!r}")
        self.sigma = float(sigma)
        self.fixed = fixed
        self.generator = generator
        self.resample()

    def resample(self) -> None:
        """Draw new shared inner samples :math:`Z_j` (with ``fixed=True``)."""
        self.inner = self._draw(torch.Size()) if self.fixed else None

    def _draw(self, batch: torch.Size, device=None) -> Tensor:
        half = self.num_inner // 2 if self.antithetic else self.num_inner
        shape = batch + (half, self.dim)
        z = torch.randn(shape, generator=self.generator, dtype=self.dtype, device=device)
        return torch.cat([z, -z], -2) if self.antithetic else z

    def log_f(self, y: Tensor) -> Tensor:
        r""":math:`\log f(y) = \log \pi(y) - \log \mathcal N(y; 0, \sigma^2 I)` (a
        constant floor where :math:`\log \pi(y)` is not finite, see
        :meth:`TargetDensity.log_ratio`)."""
        return self.density.log_ratio(y, self.sigma)

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        if self.fixed:
            z = self.inner.to(dtype=x.dtype, device=x.device)
        else:  # fresh inner samples for every point
            z = self._draw(x.shape[:-1], x.device).to(x.dtype)
        remaining = (1 - t).clamp(min=self.min_scale**2).sqrt()
        if t.dim():
            remaining = remaining.unsqueeze(-1)  # (N, 1, ..., 1, 1): the inner axis
        scale = self.sigma * remaining
        y = x.unsqueeze(-2) + scale * z  # batch + (K, D)
        sigma_sq = self.sigma**2
        if self.estimator == "gradient":
            log_f, grad_log_f = self.density.log_ratio_and_grad(y, self.sigma)
            weights = torch.softmax(log_f, -1)
            return sigma_sq * (weights.unsqueeze(-1) * grad_log_f).sum(-2)
        weights = torch.softmax(self.log_f(y), -1)
        return (weights.unsqueeze(-1) * z).sum(-2) * (self.sigma / remaining.squeeze(-1))
