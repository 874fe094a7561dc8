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
from .observed_path import ObservedRateOU
from .ou import ou_drift, ou_expectation_cos, ou_terminal_moments
from .score_references import (
    binary_denoiser,
    binary_mmse,
    binary_mutual_information,
    binary_path_kl,
    exponential_integrator_density_1d,
    gaussian_cld_law,
    gaussian_cld_velocity_score,
    gaussian_denoiser,
    gaussian_denoiser_law,
    gaussian_kl,
    gaussian_marginal,
    gaussian_sampler_law,
    gaussian_score,
)
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
    "DOUBLE_WELL_Y",
    "DoubleWellSSM",
    "EulerMaruyamaExample",
    "EulerMaruyamaPosterior",
    "FunnelTarget",
    "GaussianMixture",
    "GaussianMixtureTarget",
    "GaussianTarget",
    "LinearGaussianSSM",
    "LinearSDE",
    "ManyWellTarget",
    "ObservedRateOU",
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
    "binary_denoiser",
    "binary_mmse",
    "binary_mutual_information",
    "binary_path_kl",
    "double_well_reference",
    "euler_grid_density",
    "exponential_integrator_density_1d",
    "gaussian_cld_law",
    "gaussian_cld_velocity_score",
    "gaussian_denoiser",
    "gaussian_denoiser_law",
    "gaussian_kl",
    "gaussian_marginal",
    "gaussian_sampler_law",
    "gaussian_score",
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
