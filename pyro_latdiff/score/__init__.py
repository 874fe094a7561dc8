"""Score-based diffusion models as latent-diffusion models (Huang, Lim & Courville 2021).

- :mod:`.forward`: forward (noising) processes with exact Gaussian kernels;
- :mod:`.noising`: the forward chain from the data as a distribution (the guide's);
- :mod:`.model`: the reverse-chain Pyro model, its guide, :class:`ScoreModel`;
- :mod:`.network`: the default score network and the contract of a user's;
- :mod:`.grid`: time grids for the reverse chain;
- :mod:`.losses`: continuous-time ELBO and likelihood-weighted score matching;
- :mod:`.likelihood`: the probability-flow ODE's exact log-likelihood;
- :mod:`.evaluation`: ELBO, importance-weighted bound and ODE likelihood on held-out data;
- :mod:`.samplers`: samplers for a trained score or denoiser, one algorithm per module;
- :mod:`.bounds`: the terms of the samplers' error bounds, estimated for a trained model.
"""

from .bounds import ChenBound, DenoiserBound, chen_bound, denoiser_discretisation, mmse_curve
from .evaluation import elbo_per_point, evaluate, importance_weighted_bound
from .forward import (
    CriticallyDampedLangevin,
    ForwardProcess,
    OrnsteinUhlenbeck,
    VarianceExploding,
    VariancePreserving,
)
from .grid import adapted_times
from .likelihood import bits_per_dim, ode_log_likelihood
from .losses import ContinuousTimeELBO, DenoisingScoreMatching
from .model import ScoreModel, check_data, noising_guide, reverse_drift, score_model
from .network import ScoreNetwork, check_score
from .noising import ForwardNoising
from .samplers import (
    GaussianChannel,
    SampleResult,
    ScoreDenoiser,
    cld_sampler,
    denoiser_sampler,
    equalised_times,
    exponential_integrator,
    immse_times,
    probability_flow_ode,
    reverse_sde_euler,
    uniform_times,
)

__all__ = [
    "ChenBound",
    "ContinuousTimeELBO",
    "CriticallyDampedLangevin",
    "DenoiserBound",
    "DenoisingScoreMatching",
    "ForwardNoising",
    "ForwardProcess",
    "GaussianChannel",
    "OrnsteinUhlenbeck",
    "SampleResult",
    "ScoreDenoiser",
    "ScoreModel",
    "ScoreNetwork",
    "VarianceExploding",
    "VariancePreserving",
    "adapted_times",
    "bits_per_dim",
    "check_data",
    "check_score",
    "chen_bound",
    "cld_sampler",
    "denoiser_discretisation",
    "denoiser_sampler",
    "elbo_per_point",
    "equalised_times",
    "evaluate",
    "exponential_integrator",
    "immse_times",
    "importance_weighted_bound",
    "mmse_curve",
    "noising_guide",
    "ode_log_likelihood",
    "probability_flow_ode",
    "reverse_drift",
    "reverse_sde_euler",
    "score_model",
    "uniform_times",
]
