"""Sampling a target known up to its normaliser with Föllmer drifts, learned and
training-free, and estimating its log normaliser.

- :class:`FollmerSampler`: a Brownian-path Pyro model whose terminal state observes
  the target, a :class:`~pyro_latdiff.DiffusionGuide`, SVI (reverse KL or
  :class:`LogVarianceELBO`); ``fit``, ``sample``, ``log_normalizer``.
- :class:`MonteCarloFollmerDrift` and :class:`MonteCarloFollmerSampler`: the
  Schrödinger–Föllmer drift by inner Monte Carlo, and the training-free sampler.
- :class:`ReplayBuffer` and :func:`brownian_bridge`: terminal states kept for
  off-policy training (with local search), and the reference's paths to them.
- :class:`TargetDensity`: the user's log-density, shape-checked, guarded, counted.
"""

from .density import TargetDensity
from .estimate import LogNormalizerEstimate
from .follmer_drift import MonteCarloFollmerDrift
from .follmer_sampler import FollmerSampler
from .log_variance import LogVarianceELBO
from .monte_carlo import MonteCarloFollmerSampler, gaussian_importance_sampling
from .replay import ReplayBuffer, brownian_bridge

__all__ = [
    "FollmerSampler",
    "LogNormalizerEstimate",
    "LogVarianceELBO",
    "MonteCarloFollmerDrift",
    "MonteCarloFollmerSampler",
    "ReplayBuffer",
    "TargetDensity",
    "brownian_bridge",
    "gaussian_importance_sampling",
]
