"""The problem shared by tests/test_parallel.py and its worker processes."""

import pyro
import torch

from pyro_latdiff import DiffusionGuide
from pyro_latdiff.parallel import shard_slice
from pyro_latdiff.testing import SharedRateOU

NUM_SERIES = 8


def make_problem(path_derivative: bool = True):
    """SharedRateOU with 8 series, its guide and optimiser (float64, fixed data)."""
    problem = SharedRateOU(torch.linspace(0.0, 1.0, 11), obs_scale=0.2)
    y = torch.linspace(-1.0, 1.0, NUM_SERIES)
    guide = DiffusionGuide(
        problem.model, hidden_dims=(8,), name="parallel_guide", path_derivative=path_derivative
    )
    return problem, y, guide, pyro.optim.Adam({"lr": 0.05})


def shard_fn(shard, num_shards, y):
    return (y[shard_slice(len(y), shard, num_shards)], len(y)), {}
