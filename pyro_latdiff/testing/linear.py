"""Linear SDEs with Gaussian observations: every quantity in closed form.

The Euler chain of ``dX = (A X + c) dt + diag(sigma) dW`` is a linear Gaussian
state-space model, ``x_{k+1} = F_k x_k + c h_k + S_k xi_k`` with ``F_k = I + A h_k``
and ``S_k = sqrt(h_k) diag(sigma)``; a terminal observation ``y = H x_N + eps``,
``eps ~ N(0, diag(obs_scale^2))``, keeps everything Gaussian.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from ..distribution import LatentDiffusion

__all__ = ["LinearSDE", "ou_problem", "ou_terminal_variance"]


@dataclass
class LinearSDE:
    r"""``dX = (A X + c) dt + diag(sigma) dW`` on ``times`` from ``x0``, with
    ``y = H x_N + N(0, diag(obs_scale^2))``.

    All tensors share one dtype (use float64 where exactness is checked).

    :param torch.Tensor A: the drift matrix, ``(D, D)``.
    :param torch.Tensor c: the drift offset, ``(D,)``.
    :param torch.Tensor sigma: the diffusion, ``(D,)``, positive.
    :param torch.Tensor x0: the initial state, ``(D,)``.
    :param torch.Tensor times: the grid, ``(N + 1,)``, increasing.
    :param torch.Tensor H: the observation matrix, ``(Dy, D)``.
    :param torch.Tensor obs_scale: the observation noise sd, ``(Dy,)``, positive.
    """

    A: Tensor
    c: Tensor
    sigma: Tensor
    x0: Tensor
    times: Tensor
    H: Tensor
    obs_scale: Tensor

    @property
    def state_dim(self) -> int:
        return self.x0.shape[-1]

    @property
    def num_steps(self) -> int:
        return self.times.shape[0] - 1

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        """``A x + c``, for ``x`` of any batch shape."""
        return x @ self.A.T + self.c

    def distribution(self) -> LatentDiffusion:
        """The prior path as a :class:`~pyro_latdiff.LatentDiffusion`."""
        return LatentDiffusion(self.drift, self.sigma, self.x0, self.times)

    def model(self, y: Tensor | None = None) -> Tensor:
        """Pyro model: site ``"path"``, observation site ``"y"`` of ``H x_N``."""
        path = pyro.sample("path", self.distribution())
        terminal = path[..., -1, :] @ self.H.T
        return pyro.sample("y", dist.Normal(terminal, self.obs_scale).to_event(1), obs=y)

    def _steps(self):
        eye = torch.eye(self.state_dim, dtype=self.x0.dtype)
        for h in self.times.diff():
            yield eye + self.A * h, self.c * h, torch.diag(self.sigma * h.sqrt())

    def marginals(self) -> tuple[Tensor, Tensor]:
        """Means ``(N, D)`` and covariances ``(N, D, D)`` of ``x_1, ..., x_N``."""
        mean, cov = self.x0, torch.zeros(self.state_dim, self.state_dim, dtype=self.x0.dtype)
        means, covs = [], []
        for F, shift, S in self._steps():
            mean = F @ mean + shift
            cov = F @ cov @ F.T + S @ S.T
            means.append(mean)
            covs.append(cov)
        return torch.stack(means), torch.stack(covs)

    def path_distribution(self) -> dist.MultivariateNormal:
        """The exact joint law of the flattened path ``(x_1, ..., x_N)`` (length ``N D``).

        Built independently of the transition densities: ``path = mean + G xi`` with
        ``G`` block lower-triangular, ``G[k, j] = F_k ... F_{j+1} S_j``.
        """
        n, d = self.num_steps, self.state_dim
        steps = list(self._steps())
        G = torch.zeros(n * d, n * d, dtype=self.x0.dtype)
        for j, (_, _, S) in enumerate(steps):
            block = S
            for k in range(j, n):
                if k > j:
                    block = steps[k][0] @ block
                G[k * d : (k + 1) * d, j * d : (j + 1) * d] = block
        means, _ = self.marginals()
        return dist.MultivariateNormal(means.reshape(-1), scale_tril=G)

    def _terminal_observation(self):
        means, covs = self.marginals()
        m, P = means[-1], covs[-1]
        R = torch.diag(self.obs_scale.square())
        return m, P, self.H @ m, self.H @ P @ self.H.T + R

    def evidence(self) -> dist.MultivariateNormal:
        """The exact marginal law of ``y`` under the Euler chain."""
        _, _, y_mean, y_cov = self._terminal_observation()
        return dist.MultivariateNormal(y_mean, y_cov)

    def log_evidence(self, y: Tensor) -> Tensor:
        """Exact discrete log-evidence ``log p(y)``."""
        return self.evidence().log_prob(y)

    def terminal_posterior(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Exact posterior mean ``(D,)`` and covariance ``(D, D)`` of ``x_N`` given ``y``."""
        m, P, y_mean, y_cov = self._terminal_observation()
        gain = torch.linalg.solve(y_cov, self.H @ P).T
        return m + gain @ (y - y_mean), P - gain @ self.H @ P


def ou_problem(
    rate: float = 1.0,
    sigma: float = 1.0,
    num_steps: int = 50,
    t_end: float = 1.0,
    obs_scale: float = 0.1,
    x0: float = 0.0,
    dtype: torch.dtype = torch.float64,
) -> LinearSDE:
    """1-D Ornstein–Uhlenbeck ``dX = -rate X dt + sigma dW`` observed at ``t_end``.

    The defaults are bench A of the references: ``y = 1.5`` has exact discrete
    log-evidence -3.028 and terminal posterior mean 1.466, sd 0.0989.

    :param float rate: the mean-reversion rate.
    :param float sigma: the diffusion coefficient.
    :param int num_steps: Euler steps on the uniform grid of ``[0, t_end]``.
    :param float t_end: the observation time.
    :param float obs_scale: the observation noise sd.
    :param float x0: the initial state.
    :param torch.dtype dtype: the dtype of every tensor.
    :rtype: LinearSDE
    """

    def t(values):
        return torch.tensor(values, dtype=dtype)

    return LinearSDE(
        A=t([[-rate]]),
        c=t([0.0]),
        sigma=t([sigma]),
        x0=t([x0]),
        times=torch.linspace(0.0, t_end, num_steps + 1, dtype=dtype),
        H=t([[1.0]]),
        obs_scale=t([obs_scale]),
    )


def ou_terminal_variance(rate: Tensor, sigma: float, times: Tensor) -> Tensor:
    """Variance of ``x_N`` for the Euler chain of ``dX = -rate X dt + sigma dW`` from a
    fixed ``x0``, vectorised over a tensor of ``rate`` values (for quadrature over a
    rate parameter): ``v_{k+1} = (1 - rate h_k)^2 v_k + sigma^2 h_k``.

    :param torch.Tensor rate: rate values, any shape.
    :param float sigma: the diffusion coefficient.
    :param torch.Tensor times: the grid.
    :returns: the variances, of ``rate``'s shape.
    :rtype: torch.Tensor
    """
    variance = torch.zeros_like(rate)
    for h in times.diff():
        variance = (1 - rate * h) ** 2 * variance + sigma**2 * h
    return variance
