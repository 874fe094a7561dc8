"""pyro_latdiff: Pyro models whose latent variable is a diffusion path."""

from .distribution import LatentDiffusion
from .drift import NeuralDrift
from .guide import DiffusionGuide
from .infer import FitDivergedError, fit, log_evidence

__all__ = [
    "DiffusionGuide",
    "FitDivergedError",
    "LatentDiffusion",
    "NeuralDrift",
    "calibrate",
    "fit",
    "importance_mean",
    "log_evidence",
    "psis_diagnostics",
    "to_inference_data",
]
__version__ = "0.1.0"

# The ArviZ-backed names load on first use: importing ArviZ costs seconds.
_LAZY = {
    "calibrate": "calibration",
    "importance_mean": "inference_data",
    "psis_diagnostics": "inference_data",
    "to_inference_data": "inference_data",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
