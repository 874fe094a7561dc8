r"""A nonlinear model observed at many times, with a long NUTS run as its reference.

The double well with an unknown drift rate and noise scale,

.. math::

    \theta_1, \theta_2 &\sim \mathrm{LogNormal}(0, 1), \\
    x_{k+1} &= x_k + \theta_1 (x_k - x_k^3)\, h + \theta_2 \sqrt{h}\, \xi_k,
    \quad x_0 = -1,\ h = 0.1,\ k = 0, \dots, 59, \\
    y_j &\sim \mathcal{N}(x_{3j}, 0.2^2), \quad j = 1, \dots, 20,

observed at every third step. The data (:data:`DOUBLE_WELL_Y`) were simulated on this
chain with ``theta = (1.0, 0.6)`` (``torch.Generator().manual_seed(7)``: the 60
increments, then the 20 observation noises); the path crosses from the left well to
the right one near ``t = 2``. No closed form exists: the reference posterior of
``theta`` is a long NUTS run on the same chain (all 60 states and ``theta`` as
latents), made by ``benchmarks/nuts_reference.py`` and stored next to this module in
``double_well_nuts.json`` (:func:`double_well_reference`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from ..distribution import LatentDiffusion

__all__ = ["DOUBLE_WELL_Y", "DoubleWellSSM", "double_well_reference"]

#: The observations of :class:`DoubleWellSSM` at steps 3, 6, ..., 60 (see the module
#: docstring for how they were simulated).
DOUBLE_WELL_Y = (
    -1.0679, -0.9703, -0.9325, -1.2228, -0.4290, 0.0459, 1.0106, 0.5914, 1.2290, 1.3250,
    0.7887, 0.5740, 1.3609, 0.9906, 1.0659, 1.5020, 0.7194, 1.5918, 1.1433, 1.1210,
)  # fmt: skip


@dataclass(frozen=True)
class DoubleWellSSM:
    """The double well of the module docstring: ``"theta1"`` (drift rate),
    ``"theta2"`` (noise scale), ``"path"`` ``(N, 1)`` and the observed ``"y"``
    ``(N // obs_every,)``.

    Example::

        problem = DoubleWellSSM()
        y = problem.observations()
        guide = DiffusionGuide(problem.model)
        fit(problem.model, guide, y)
        reference = double_well_reference()  # reference["theta1"]["mean"], ...

    :param int num_steps: ``N``.
    :param float dt: step.
    :param float x0: initial state.
    :param int obs_every: observe every ``obs_every``-th state.
    :param float obs_scale: observation standard deviation.
    :param torch.dtype dtype: dtype of every tensor.
    """

    num_steps: int = 60
    dt: float = 0.1
    x0: float = -1.0
    obs_every: int = 3
    obs_scale: float = 0.2
    dtype: torch.dtype = torch.float64

    @property
    def times(self) -> Tensor:
        """The grid ``(N + 1,)``: ``k dt``."""
        return torch.arange(self.num_steps + 1, dtype=self.dtype) * self.dt

    @property
    def obs_index(self) -> Tensor:
        """Indices into the path ``(x_1, ..., x_N)`` of the observed states."""
        return torch.arange(self.obs_every - 1, self.num_steps, self.obs_every)

    def observations(self) -> Tensor:
        """:data:`DOUBLE_WELL_Y` as a tensor (for the default grid)."""
        return torch.tensor(DOUBLE_WELL_Y, dtype=self.dtype)

    def model(self, y: Tensor | None = None) -> Tensor:
        """Pyro model; returns the observations (sampled if ``y`` is ``None``)."""
        zero, one = torch.zeros((), dtype=self.dtype), torch.ones((), dtype=self.dtype)
        theta1 = pyro.sample("theta1", dist.LogNormal(zero, one)).unsqueeze(-1)
        theta2 = pyro.sample("theta2", dist.LogNormal(zero, one)).unsqueeze(-1)

        def drift(t, x):
            return theta1 * (x - x**3)

        x0 = torch.tensor([self.x0], dtype=self.dtype)
        path = pyro.sample("path", LatentDiffusion(drift, theta2, x0, self.times))
        states = path[..., self.obs_index, 0]
        return pyro.sample("y", dist.Normal(states, self.obs_scale).to_event(1), obs=y)


def double_well_reference() -> dict:
    """The NUTS reference of :class:`DoubleWellSSM` with :data:`DOUBLE_WELL_Y`:
    ``{"theta1": {"mean", "sd", "mcse_mean", "mcse_sd", "ess", "r_hat"}, "theta2":
    {...}, "settings": {...}}``, as written by ``benchmarks/nuts_reference.py``."""
    text = resources.files(__package__).joinpath("double_well_nuts.json").read_text()
    return json.loads(text)
