"""Sampling a target known up to its normaliser with Föllmer drifts, learned and
training-free, and estimating its log normaliser.

- :class:`FollmerSampler`: a Brownian-path Pyro model whose terminal state observes
  the target, a :class:`~pyro_latdiff.DiffusionGuide`, SVI (reverse KL or
  :class:`LogVarianceELBO`); ``fit``, ``sample``, ``log_normalizer``.
- :class:`MonteCarloFollmerDrift` and :class:`MonteCarloFollmerSampler`: the
  Schrödinger–Föllmer drift by inner Monte Carlo, and the training-free sampler.
- :class:`TargetDensity`: the user's log-density, shape-checked, guarded, counted.
"""

from .density import TargetDensity
from .estimate import LogNormalizerEstimate
from .follmer_drift import MonteCarloFollmerDrift
from .follmer_sampler import FollmerSampler
from .log_variance import LogVarianceELBO
from .monte_carlo import MonteCarloFollmerSampler, gaussian_importance_sampling

__all__ = [
    "FollmerSampler",
    "LogNormalizerEstimate",
    "LogVarianceELBO",
    "MonteCarloFollmerDrift",
    "MonteCarloFollmerSampler",
    "TargetDensity",
    "gaussian_importance_sampling",
]
