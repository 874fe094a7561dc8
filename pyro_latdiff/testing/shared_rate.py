"""Many OU paths sharing an unknown rate: a global parameter with an exact posterior."""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from ..distribution import LatentDiffusion
from .linear import ou_terminal_variance

__all__ = ["SharedRateOU"]


@dataclass
class SharedRateOU:
    r"""``theta ~ LogNormal(prior_loc, prior_scale)`` is the rate of ``M`` independent
    OU paths ``dX_i = -theta X_i dt + dW_i``, ``X_i(0) = 0``, each observed at the end
    of ``times`` as ``y_i ~ N(X_i(T), obs_scale^2)``.

    Given theta each ``y_i`` is Gaussian in closed form on the Euler chain, so the
    posterior of theta follows by quadrature (:meth:`exact_posterior`).

    :param torch.Tensor times: the grid (its dtype is the problem's).
    :param float obs_scale: observation noise sd.
    :param float prior_loc: location of the log-normal prior of theta.
    :param float prior_scale: scale of the log-normal prior of theta.
    """

    times: Tensor
    obs_scale: float = 0.1
    prior_loc: float = 0.0
    prior_scale: float = 0.5

    def prior(self) -> dist.LogNormal:
        loc = torch.tensor(self.prior_loc, dtype=self.times.dtype)
        return dist.LogNormal(loc, self.prior_scale)

    def model(self, y: Tensor, num_series: int | None = None) -> None:
        """Sites ``"theta"``, ``"path"`` (plate ``"series"``) and observed ``"y"``.

        With ``num_series`` larger than ``len(y)``, ``y`` is a shard of the data and the
        plate is subsampled (Pyro scales the shard's sites by ``num_series / len(y)``),
        as :class:`~pyro_latdiff.parallel.DataParallelSVI` needs.
        """
        theta = pyro.sample("theta", self.prior())
        rate = theta.unsqueeze(-1)  # (P, 1, 1) under particles: broadcasts over series, state
        size = y.shape[-1]
        with pyro.plate("series", size if num_series is None else num_series, subsample_size=size):
            x0 = torch.zeros(size, 1, dtype=self.times.dtype)
            path = pyro.sample("path", LatentDiffusion(lambda t, x: -rate * x, 1.0, x0, self.times))
            pyro.sample("y", dist.Normal(path[..., -1, 0], self.obs_scale), obs=y)

    def simulate(self, theta: float, num_series: int) -> Tensor:
        """Observations ``y`` (shape ``(num_series,)``) drawn given ``theta``."""
        x0 = torch.zeros(num_series, 1, dtype=self.times.dtype)
        paths = LatentDiffusion(lambda t, x: -theta * x, 1.0, x0, self.times).sample()
        return paths[..., -1, 0] + self.obs_scale * torch.randn_like(paths[..., -1, 0])

    def log_likelihood(self, theta: Tensor, y: Tensor) -> Tensor:
        """``log p(y | theta)`` on the Euler chain, vectorised over ``theta``."""
        variance = ou_terminal_variance(theta, 1.0, self.times) + self.obs_scale**2
        return dist.Normal(0.0, variance.sqrt().unsqueeze(-1)).log_prob(y).sum(-1)

    def exact_posterior(self, y: Tensor, grid_size: int = 4000):
        """Posterior of theta by quadrature on a log-spaced grid.

        :param torch.Tensor y: the observations, ``(num_series,)``.
        :param int grid_size: quadrature points.
        :returns: ``(theta_grid, density, mean, sd)``.
        :rtype: tuple(torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor)
        """
        log_theta = torch.linspace(-6.0, 4.0, grid_size, dtype=self.times.dtype)
        theta = log_theta.exp()
        log_post = self.prior().log_prob(theta) + self.log_likelihood(theta, y)
        weights = torch.softmax(log_post + log_theta, 0)  # d theta = theta d log(theta)
        mean = (weights * theta).sum()
        sd = (weights * (theta - mean) ** 2).sum().sqrt()
        density = weights / (theta * (log_theta[1] - log_theta[0]))
        return theta, density, mean, sd
