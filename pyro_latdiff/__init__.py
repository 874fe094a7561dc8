"""pyro_latdiff: Pyro models whose latent variable is a diffusion path."""

from .distribution import LatentDiffusion
from .drift import NeuralDrift
from .guide import DiffusionGuide
from .infer import fit, log_evidence

__all__ = ["DiffusionGuide", "LatentDiffusion", "NeuralDrift", "fit", "log_evidence"]
__version__ = "0.1.0"
