"""Reference posteriors by Pyro's NUTS on the same Euler chain a guide is fitted to.

A :class:`~pyro_latdiff.LatentDiffusion` site is an ordinary continuous latent of
``event_shape (N, D)``, so :class:`pyro.infer.NUTS` samples the path states and the
globals jointly, with no special code. :func:`run_nuts` runs independent chains one
after the other (deterministic, no worker processes on a shared machine) and
summarises scalar sites with Pyro's split R-hat and effective sample size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide.initialization import init_to_value
from pyro.ops.stats import effective_sample_size, split_gelman_rubin
from torch import Tensor

__all__ = ["NutsRun", "run_nuts", "summarise_draws"]


@dataclass
class NutsRun:
    """Draws and settings of :func:`run_nuts`.

    :ivar dict samples: site name to draws of shape ``(num_chains, num_samples, ...)``.
    :ivar dict settings: warm-up, samples, chains, tree depth, target acceptance.
    :ivar float seconds: wall-clock time of all chains, warm-up included.
    :ivar list step_sizes: the adapted step size of each chain.
    """

    samples: dict[str, Tensor]
    settings: dict
    seconds: float
    step_sizes: list[float] = field(default_factory=list)

    def summary(self, names) -> dict[str, dict[str, float]]:
        """:func:`summarise_draws` of the scalar sites ``names``."""
        return {name: summarise_draws(self.samples[name]) for name in names}


def summarise_draws(draws: Tensor) -> dict[str, float]:
    """Mean, sd, split R-hat, effective sample size and Monte Carlo standard errors of
    the scalar draws ``(num_chains, num_samples)``. ``mcse_sd`` uses the normal
    approximation ``sd / sqrt(2 ess)``."""
    draws = draws.detach().double().reshape(draws.shape[0], draws.shape[1])
    ess = float(effective_sample_size(draws, chain_dim=0, sample_dim=1))
    mean, sd = float(draws.mean()), float(draws.std())
    return {
        "mean": mean,
        "sd": sd,
        "r_hat": float(split_gelman_rubin(draws, chain_dim=0, sample_dim=1)),
        "ess": ess,
        "mcse_mean": sd / math.sqrt(ess),
        "mcse_sd": sd / math.sqrt(2 * ess),
    }


def run_nuts(
    model: Callable,
    *args,
    inits: list[dict[str, Tensor]],
    num_samples: int = 1000,
    warmup_steps: int = 1000,
    max_tree_depth: int = 10,
    target_accept_prob: float = 0.8,
    seed: int = 0,
    jit_compile: bool = False,
    progress: bool = False,
    **kwargs,
) -> NutsRun:
    """Run one NUTS chain per entry of ``inits`` (initial values of every latent site,
    through :func:`~pyro.infer.autoguide.initialization.init_to_value`), one after the
    other, with seeds ``seed, seed + 1, ...``; diagonal mass matrix and step size
    adapted in warm-up.

    :returns: a :class:`NutsRun`; draws of every latent site stacked over chains.
    """
    chains: list[dict[str, Tensor]] = []
    step_sizes = []
    start = time.perf_counter()
    for index, values in enumerate(inits):
        pyro.set_rng_seed(seed + index)
        kernel = NUTS(
            model,
            init_strategy=init_to_value(values={k: v.detach() for k, v in values.items()}),
            max_tree_depth=max_tree_depth,
            target_accept_prob=target_accept_prob,
            jit_compile=jit_compile,
            ignore_jit_warnings=True,
        )
        mcmc = MCMC(
            kernel, num_samples=num_samples, warmup_steps=warmup_steps, disable_progbar=not progress
        )
        mcmc.run(*args, **kwargs)
        chains.append(mcmc.get_samples())
        step_sizes.append(float(kernel.step_size))
    seconds = time.perf_counter() - start
    samples = {name: torch.stack([c[name] for c in chains]) for name in chains[0]}
    settings = dict(
        num_chains=len(inits),
        warmup_steps=warmup_steps,
        num_samples=num_samples,
        max_tree_depth=max_tree_depth,
        target_accept_prob=target_accept_prob,
        mass_matrix="diagonal, adapted",
        jit_compile=jit_compile,
        seed=seed,
    )
    return NutsRun(samples, settings, seconds, step_sizes)
