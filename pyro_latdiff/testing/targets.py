r"""Unnormalised target densities with known normalising constants, for samplers.

Each target has ``dim``, ``log_prob(x)`` for ``x`` of shape ``batch_shape + (dim,)``
(returning ``batch_shape``; unnormalised where the sampler literature uses it so),
the exact ``log_normalizer`` :math:`\log Z = \log \int e^{\log \pi(x)} dx`, and
``sample(n)`` drawing exact samples for checks (MMD, mode masses).

- :class:`GaussianTarget`: :math:`\mathcal N(m, s^2 I)`, with its exact Föllmer
  drift :meth:`GaussianTarget.follmer_drift`.
- :class:`GaussianMixtureTarget`: equal-weight isotropic 2-D mixtures;
  :func:`gmm9` (Zhang & Chen 2022), :func:`gmm25` (Sendera et al. 2024),
  :func:`gmm40` (Midgley et al. 2023, FAB).
- :class:`FunnelTarget`: Neal's funnel (Neal 2003), 10-d by default.
- :class:`ManyWellTarget`: ManyWell-32 (Midgley et al. 2023), unnormalised,
  :math:`\log Z = 16 (\ln 11784.50927 + \tfrac12 \ln 2\pi) = 164.6957`, with its
  exact Föllmer drift by quadrature, :meth:`ManyWellTarget.follmer_drift`.

:func:`mode_masses` and :func:`mode_coverage` measure how a sampler spreads its mass
over a mixture's modes.

Example::

    >>> import torch
    >>> from pyro_latdiff.testing import gmm9
    >>> target = gmm9()
    >>> x = target.sample(4000, generator=torch.Generator().manual_seed(0))
    >>> masses = mode_masses(target, x)  # each about 1/9

References: Zhang & Chen (2022), *Path integral sampler*; Midgley et al. (2023), *Flow
annealed importance sampling bootstrap*; Sendera et al. (2024), *Improved off-policy
training of diffusion samplers*; Neal (2003), *Slice sampling*.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FunnelTarget",
    "GaussianMixtureTarget",
    "GaussianTarget",
    "ManyWellTarget",
    "gmm25",
    "gmm40",
    "gmm9",
    "mode_coverage",
    "mode_masses",
]

_HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


def _normal_log_prob(x: Tensor, loc, scale) -> Tensor:
    z = (x - loc) / scale
    return -0.5 * z.square() - torch.log(torch.as_tensor(scale, dtype=x.dtype)) - _HALF_LOG_TWO_PI


class GaussianTarget:
    r"""The Gaussian :math:`\mathcal N(m, s^2 I)` in ``dim`` dimensions, normalised.

    Its Föllmer drift (Brownian reference from 0 on [0, 1]) is affine:

    .. math::

        b^*(t, x) = \frac{m + (s^2 - 1) x}{1 + (s^2 - 1) t}.

    :param int dim: dimension.
    :param float mean: :math:`m` (every coordinate).
    :param float scale: :math:`s > 0`.
    :param torch.dtype dtype: dtype of samples.
    """

    def __init__(self, dim: int = 2, mean: float = 1.0, scale: float = 1.5, dtype=None):
        self.dim = dim
        self.mean = float(mean)
        self.scale = float(scale)
        self.dtype = dtype or torch.get_default_dtype()
        self.log_normalizer = 0.0

    def log_prob(self, x: Tensor) -> Tensor:
        return _normal_log_prob(x, self.mean, self.scale).sum(-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, self.dim, generator=generator, dtype=self.dtype)
        return self.mean + self.scale * z

    def follmer_drift(self, t: Tensor, x: Tensor) -> Tensor:
        """The exact Föllmer drift ``b*(t, x)``, for ``t`` 0-d or ``(N, 1, ..., 1)``."""
        a = self.scale**2 - 1.0
        return (self.mean + a * x) / (1.0 + a * t)


class GaussianMixtureTarget:
    r"""Equal-weight mixture of isotropic Gaussians :math:`\frac1M \sum_j
    \mathcal N(\mu_j, s^2 I)`, normalised (:math:`\log Z = 0`).

    :param torch.Tensor means: ``(M, dim)`` component means.
    :param float scale: component standard deviation :math:`s`.
    """

    def __init__(self, means: Tensor, scale: float):
        self.means = means
        self.scale = float(scale)
        self.dim = means.shape[-1]
        self.num_modes = means.shape[0]
        self.log_normalizer = 0.0

    def log_prob(self, x: Tensor) -> Tensor:
        means = self.means.to(x.dtype)
        per_mode = _normal_log_prob(x.unsqueeze(-2), means, self.scale).sum(-1)
        return torch.logsumexp(per_mode, -1) - math.log(self.num_modes)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        index = torch.randint(self.num_modes, (n,), generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=self.means.dtype)
        return self.means[index] + self.scale * z

    def nearest_mode(self, x: Tensor) -> Tensor:
        """Index of the nearest mean to each point, shape ``x.shape[:-1]``."""
        distance = (x.unsqueeze(-2) - self.means.to(x.dtype)).square().sum(-1)
        return distance.argmin(-1)


def gmm9(dtype=None) -> GaussianMixtureTarget:
    """Nine modes at ``{-5, 0, 5}^2``, variance 0.3 (Zhang & Chen 2022)."""
    grid = torch.tensor([-5.0, 0.0, 5.0], dtype=dtype)
    means = torch.cartesian_prod(grid, grid)
    return GaussianMixtureTarget(means, math.sqrt(0.3))


def gmm25(dtype=None) -> GaussianMixtureTarget:
    """25 modes at ``{-10, -5, 0, 5, 10}^2``, variance 0.3 (Sendera et al. 2024)."""
    grid = torch.tensor([-10.0, -5.0, 0.0, 5.0, 10.0], dtype=dtype)
    means = torch.cartesian_prod(grid, grid)
    return GaussianMixtureTarget(means, math.sqrt(0.3))


def gmm40(dtype=None) -> GaussianMixtureTarget:
    """The FAB 40-mode mixture (Midgley et al. 2023): means
    ``(torch.rand(40, 2) - 0.5) * 2 * 40`` after ``torch.manual_seed(0)``, drawn here
    from a local generator seeded 0 (the global random state is untouched), standard
    deviation ``softplus(1.0) = 1.3133``."""
    generator = torch.Generator().manual_seed(0)
    means = (torch.rand(40, 2, generator=generator) - 0.5) * 2 * 40
    scale = F.softplus(torch.tensor(1.0)).item()
    return GaussianMixtureTarget(means.to(dtype or torch.get_default_dtype()), scale)


class FunnelTarget:
    r"""Neal's funnel: :math:`x_0 \sim \mathcal N(0, 3^2)`,
    :math:`x_{1:d-1} \mid x_0 \sim \mathcal N(0, e^{x_0} I)`; normalised.

    :param int dim: dimension ``d`` (10 by default).
    """

    def __init__(self, dim: int = 10, dtype=None):
        self.dim = dim
        self.dtype = dtype or torch.get_default_dtype()
        self.log_normalizer = 0.0

    def log_prob(self, x: Tensor) -> Tensor:
        x0, rest = x[..., 0], x[..., 1:]
        head = _normal_log_prob(x0, 0.0, 3.0)
        tail = -0.5 * rest.square().sum(-1) * torch.exp(-x0) - 0.5 * (self.dim - 1) * (
            x0 + 2 * _HALF_LOG_TWO_PI
        )
        return head + tail

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        x0 = 3.0 * torch.randn(n, 1, generator=generator, dtype=self.dtype)
        rest = torch.randn(n, self.dim - 1, generator=generator, dtype=self.dtype)
        return torch.cat([x0, rest * torch.exp(x0 / 2)], -1)


class ManyWellTarget:
    r"""ManyWell (Midgley et al. 2023): ``dim / 2`` independent copies of the 2-D double
    well :math:`\log \pi(x_1, x_2) = -x_1^4 + 6 x_1^2 + \tfrac12 x_1 - \tfrac12 x_2^2`,
    unnormalised; :math:`\log Z = \tfrac{d}{2} (\ln 11784.50927 + \tfrac12 \ln 2\pi)`
    (164.6957 at ``dim = 32``).

    :param int dim: an even dimension (32 by default).
    """

    #: :math:`\int e^{-x^4 + 6 x^2 + x / 2} dx`.
    WELL_INTEGRAL = 11784.50927

    def __init__(self, dim: int = 32, dtype=None):
        if dim % 2:
            raise ValueError(f"Expected `dim` to be even, actual {dim}")
        self.dim = dim
        self.dtype = dtype or torch.get_default_dtype()
        self.log_normalizer = dim // 2 * (math.log(self.WELL_INTEGRAL) + _HALF_LOG_TWO_PI)
        # Inverse CDF of the double well's first coordinate on a fine grid.
        grid = torch.linspace(-3.5, 3.5, 200_001, dtype=torch.float64)
        density = torch.exp(self._well(grid) - self._well(grid).max())
        cdf = torch.cumsum(density, 0)
        self._grid, self._cdf = grid, cdf / cdf[-1]
        #: Mass of each double well's minor (left, ``x_1 < 0``) well: 0.1557. A
        #: sampler that misses every minor well has :math:`|\Delta \log Z| =
        #: -\tfrac{d}{2} \log(1 - m)` (2.708 at ``dim = 32``).
        self.minor_well_mass = float(
            self._cdf[torch.searchsorted(grid, torch.tensor(0.0, dtype=grid.dtype))]
        )

    @staticmethod
    def _well(x1: Tensor) -> Tensor:
        return -(x1**4) + 6 * x1**2 + 0.5 * x1

    def log_prob(self, x: Tensor) -> Tensor:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return (self._well(x1) - 0.5 * x2.square()).sum(-1)

    def follmer_drift(self, t: Tensor, x: Tensor, num_nodes: int = 4001) -> Tensor:
        r"""The exact Föllmer drift (Brownian reference from 0 on [0, 1], noise 1), by
        quadrature: coordinate-wise, 0 on the Gaussian coordinates and on the double
        wells' first coordinates

        .. math::

            b^*(t, x) = \frac{\mathbb E_w[Y] - x}{1 - t}, \qquad
            w(y) \propto e^{-y^4 + 6 y^2 + y / 2 + y^2 / 2 - (y - x)^2 / (2 (1 - t))},

        on ``num_nodes`` nodes in [-3.5, 3.5] (the posterior of the terminal state given
        :math:`X_t = x`). For ``t`` 0-d or ``(N, 1, ..., 1)`` (``t < 1``); evaluated in
        chunks of states: slow, but it shows what a chain on a given grid can reach.
        """
        nodes = torch.linspace(-3.5, 3.5, num_nodes, dtype=x.dtype, device=x.device)
        log_f = self._well(nodes) + 0.5 * nodes.square()  # log pi_1 - log N(0, 1)
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
        x1 = x[..., 0::2]
        v = (1 - t).expand(x1.shape).reshape(-1, 1)
        flat = x1.reshape(-1, 1)
        means = []
        for start in range(0, flat.shape[0], 4096):
            chunk, var = flat[start : start + 4096], v[start : start + 4096]
            weights = torch.softmax(log_f - (nodes - chunk).square() / (2 * var), dim=-1)
            means.append(((weights * nodes).sum(-1, keepdim=True) - chunk) / var)
        out = x.new_zeros(torch.broadcast_shapes(x.shape, t.shape))
        out[..., 0::2] = torch.cat(means).reshape(x1.shape)
        return out

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        half = self.dim // 2
        u = torch.rand(n, half, generator=generator, dtype=torch.float64)
        index = torch.searchsorted(self._cdf, u).clamp(max=self._grid.shape[0] - 1)
        x1 = self._grid[index].to(self.dtype)
        x2 = torch.randn(n, half, generator=generator, dtype=self.dtype)
        return torch.stack([x1, x2], -1).reshape(n, self.dim)


def mode_masses(
    target: GaussianMixtureTarget, samples: Tensor, weights: Tensor | None = None
) -> Tensor:
    """Mass of each mode: the (weighted) fraction of samples nearest to each mean.

    :param GaussianMixtureTarget target: the mixture.
    :param torch.Tensor samples: ``(n, dim)``.
    :param torch.Tensor weights: optional importance weights ``(n,)`` (unnormalised,
        non-negative).
    :returns: ``(num_modes,)`` masses summing to 1.
    """
    index = target.nearest_mode(samples)
    if weights is None:
        weights = torch.ones(samples.shape[0], dtype=samples.dtype)
    masses = torch.zeros(target.num_modes, dtype=weights.dtype).index_add_(0, index, weights)
    return masses / masses.sum()


def mode_coverage(masses: Tensor, threshold: float | None = None) -> float:
    """Fraction of modes holding mass above ``threshold`` (default: a tenth of the
    equal share, ``0.1 / num_modes``)."""
    threshold = 0.1 / masses.shape[0] if threshold is None else threshold
    return float((masses > threshold).double().mean())
