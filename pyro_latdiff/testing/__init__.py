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
from .grid import euler_grid_density
from .linear import LinearSDE, ou_problem, ou_terminal_variance
from .mixture import GaussianMixture
from .nonlinear import DOUBLE_WELL_Y, DoubleWellSSM, double_well_reference
from .ou import ou_drift, ou_expectation_cos, ou_terminal_moments
from .shared_rate import SharedRateOU
from .state_space import (
    EulerMaruyamaExample,
    EulerMaruyamaPosterior,
    LinearGaussianSSM,
    ScalarPosterior,
    SharedParameterSSM,
)

__all__ = [
    "DOUBLE_WELL_Y",
    "DoubleWellSSM",
    "EulerMaruyamaExample",
    "EulerMaruyamaPosterior",
    "GaussianMixture",
    "LinearGaussianSSM",
    "LinearSDE",
    "ScalarPosterior",
    "SharedParameterSSM",
    "SharedRateOU",
    "benes_drift",
    "benes_expectation",
    "benes_expectation_cos",
    "benes_expectation_sin",
    "benes_terminal_distribution",
    "benes_terminal_moments",
    "benes_transition_density",
    "double_well_reference",
    "euler_grid_density",
    "ou_drift",
    "ou_expectation_cos",
    "ou_problem",
    "ou_terminal_moments",
    "ou_terminal_variance",
]
