"""Score-based diffusion models as latent-diffusion models (Huang, Lim & Courville 2021).

Forward (noising) processes with exact Gaussian kernels live in :mod:`.forward`.
"""

from .forward import (
    CriticallyDampedLangevin,
    ForwardProcess,
    OrnsteinUhlenbeck,
    VarianceExploding,
    VariancePreserving,
)

__all__ = [
    "CriticallyDampedLangevin",
    "ForwardProcess",
    "OrnsteinUhlenbeck",
    "VarianceExploding",
    "VariancePreserving",
]
