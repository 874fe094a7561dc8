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
from .ou import ou_drift, ou_expectation_cos, ou_terminal_moments
from .shared_rate import SharedRateOU
from .state_space import (
    EulerMaruyamaExample,
    EulerMaruyamaPosterior,
    LinearGaussianSSM,
    ScalarPosterior,
    SharedParameterSSM,
)
from .targets import (
    FunnelTarget,
    GaussianMixtureTarget,
    GaussianTarget,
    ManyWellTarget,
    gmm9,
    gmm25,
    gmm40,
    mode_coverage,
    mode_masses,
)

__all__ = [
    "EulerMaruyamaExample",
    "EulerMaruyamaPosterior",
    "FunnelTarget",
    "GaussianMixtureTarget",
    "GaussianTarget",
    "LinearGaussianSSM",
    "LinearSDE",
    "ManyWellTarget",
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
    "euler_grid_density",
    "gmm25",
    "gmm40",
    "gmm9",
    "mode_coverage",
    "mode_masses",
    "ou_drift",
    "ou_expectation_cos",
    "ou_problem",
    "ou_terminal_moments",
    "ou_terminal_variance",
]
