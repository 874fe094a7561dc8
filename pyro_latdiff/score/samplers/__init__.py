"""Samplers for a trained score (or denoiser) network, one algorithm per module; every
sampler is called as ``sampler(score, process, num_samples, num_steps, *, state_dim,
schedule=...)`` and returns a :class:`SampleResult`."""

from ._common import SampleResult
from .cld import cld_sampler
from .denoiser import GaussianChannel, ScoreDenoiser, denoiser_sampler
from .euler_maruyama import reverse_sde_euler
from .exponential import exponential_integrator
from .probability_flow import probability_flow_ode
from .schedules import equalised_times, immse_times, uniform_times

__all__ = [
    "GaussianChannel",
    "SampleResult",
    "ScoreDenoiser",
    "cld_sampler",
    "denoiser_sampler",
    "equalised_times",
    "exponential_integrator",
    "immse_times",
    "probability_flow_ode",
    "reverse_sde_euler",
    "uniform_times",
]
