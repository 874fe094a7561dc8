"""Reference problems with closed-form answers, shared by tests, examples and users."""

from .benes import (
    benes_drift,
    benes_expectation,
    benes_expectation_cos,
    benes_expectation_sin,
    benes_terminal_distribution,
    benes_terminal_moments,
    benes_transition_density,
)
from .linear import LinearSDE, ou_problem, ou_terminal_variance
from .observed_path import ObservedRateOU
from .ou import ou_drift, ou_expectation_cos, ou_terminal_moments
from .shared_rate import SharedRateOU

__all__ = [
    "LinearSDE",
    "ObservedRateOU",
    "SharedRateOU",
    "benes_drift",
    "benes_expectation",
    "benes_expectation_cos",
    "benes_expectation_sin",
    "benes_terminal_distribution",
    "benes_terminal_moments",
    "benes_transition_density",
    "ou_drift",
    "ou_expectation_cos",
    "ou_problem",
    "ou_terminal_moments",
    "ou_terminal_variance",
]
