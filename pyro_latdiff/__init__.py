"""pyro_latdiff: Pyro models whose latent variable is a diffusion path."""

from .distribution import LatentDiffusion
from .drift import NeuralDrift

__all__ = ["LatentDiffusion", "NeuralDrift"]
__version__ = "0.1.0"
