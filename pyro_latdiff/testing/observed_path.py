r"""A linear SDE observed at every step with an unknown rate: the shape of PyMC's
Euler–Maruyama example, with the exact posterior of the rate by quadrature.

.. math::

    \lambda \sim \mathcal N(\text{prior\_loc}, \text{prior\_scale}^2), \qquad
    x_{k+1} = x_k + \lambda x_k h + g \sqrt h\, \xi_k, \qquad
    z_k \sim \mathcal N(x_k, r^2), \quad k = 1, \dots, N,

from a known ``x0``. Given :math:`\lambda` the chain and its observations are linear
Gaussian, so a Kalman filter gives :math:`\log p(z \mid \lambda)` exactly, and the
posterior of :math:`\lambda` follows by quadrature on a grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from ..distribution import LatentDiffusion

__all__ = ["ObservedRateOU"]


@dataclass
class ObservedRateOU:
    r"""PyMC's example: ``rate = -0.78``, ``g = 5e-3``, ``dt = 0.1``, 200 steps from
    ``x0 = 0.1``, every step observed with sd ``5e-3`` (the defaults; the prior of the
    rate, ``N(0, 1)``, is ours).

    :param int num_steps: Euler steps ``N``.
    :param float dt: step size ``h``.
    :param float diffusion: ``g``, a standard deviation per unit time.
    :param float obs_scale: ``r``.
    :param float x0: the known initial state.
    """

    num_steps: int = 200
    dt: float = 0.1
    diffusion: float = 5e-3
    obs_scale: float = 5e-3
    x0: float = 0.1
    prior_loc: float = 0.0
    prior_scale: float = 1.0
    dtype: torch.dtype = torch.float64

    @property
    def times(self) -> Tensor:
        return torch.arange(self.num_steps + 1, dtype=self.dtype) * self.dt

    def prior(self) -> dist.Normal:
        return dist.Normal(torch.tensor(self.prior_loc, dtype=self.dtype), self.prior_scale)

    def model(self, z: Tensor) -> None:
        """Sites ``"rate"``, ``"path"`` ``(N, 1)`` and observed ``"z"`` ``(N,)``."""
        rate = pyro.sample("rate", self.prior()).unsqueeze(-1)
        x0 = torch.full((1,), self.x0, dtype=self.dtype)
        path = pyro.sample(
            "path", LatentDiffusion(lambda t, x: rate * x, self.diffusion, x0, self.times)
        )
        pyro.sample("z", dist.Normal(path[..., 0], self.obs_scale).to_event(1), obs=z)

    def simulate(self, rate: float = -0.78) -> Tensor:
        """Observations ``z`` (shape ``(N,)``) of one path drawn given ``rate``."""
        x0 = torch.full((1,), self.x0, dtype=self.dtype)
        path = LatentDiffusion(lambda t, x: rate * x, self.diffusion, x0, self.times).sample()
        return path[:, 0] + self.obs_scale * torch.randn(self.num_steps, dtype=self.dtype)

    def log_likelihood(self, rate: Tensor, z: Tensor) -> Tensor:
        """``log p(z | rate)`` by a Kalman filter, vectorised over a tensor ``rate``."""
        mean = torch.full_like(rate, self.x0)
        var = torch.zeros_like(rate)
        q = self.diffusion**2 * self.dt
        r = self.obs_scale**2
        total = torch.zeros_like(rate)
        for k in range(self.num_steps):
            a = 1 + rate * self.dt
            mean, var = a * mean, a * a * var + q
            s = var + r
            total = total - 0.5 * (math.log(2 * math.pi) + s.log() + (z[k] - mean) ** 2 / s)
            gain = var / s
            mean, var = mean + gain * (z[k] - mean), (1 - gain) * var
        return total

    def exact_posterior(self, z: Tensor, low: float = -5.0, high: float = 3.0, grid_size=4000):
        """Posterior of the rate by quadrature on ``[low, high]``.

        :returns: ``(rate_grid, density, mean, sd)``.
        """
        rate = torch.linspace(low, high, grid_size, dtype=self.dtype)
        log_post = self.prior().log_prob(rate) + self.log_likelihood(rate, z)
        weights = torch.softmax(log_post, 0)
        mean = (weights * rate).sum()
        sd = (weights * (rate - mean) ** 2).sum().sqrt()
        return rate, weights / (rate[1] - rate[0]), mean, sd
