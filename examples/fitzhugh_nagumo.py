"""NUTS started from a fitted guide, on a noisy FitzHugh–Nagumo-type oscillator.

The 2-D SDE of PyMC's Euler–Maruyama example (its second model), on the Euler chain

    dx = tau (x - x^3 / 3 + y) dt + sigma dW_1,    dy = (a - x) / tau dt + sigma dW_2,

from (x, y) = (0, 1), with dt = 0.1 and 200 steps; each step is observed through a
linear combination of the two states, z_k ~ N(m x_k + (1 - m) y_k, 0.1^2). Priors
tau ~ U(0.1, 5), a ~ U(0, 3), m ~ U(0, 1); the data are simulated with tau = 3.0,
a = 1.05, m = 0.2 (sigma = 0.1 is known; it and the noise sd are our constants).

A DiffusionGuide is fitted, then Pyro's NUTS runs 2 chains (one after the other) from
(a) one guide draw per chain (``init_to_guide``), (b) the same with the guide's
covariance as a fixed inverse mass matrix (``GuidedNUTS``, step size still adapted) and
(c) Pyro's default start (``init_to_uniform``), with the same short warm-up; the split
R-hat of tau, a, m over the 2 chains and the time are printed for each.

    python examples/fitzhugh_nagumo.py
    python examples/fitzhugh_nagumo.py --jit --starts guide guide_mass   # guide starts only
    python examples/fitzhugh_nagumo.py --smoke
"""

from __future__ import annotations

import argparse
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

from pyro_latdiff import DiffusionGuide, LatentDiffusion, fit
from pyro_latdiff.mcmc import GuidedNUTS, guide_inverse_mass_matrix, init_to_guide

TRUTH = {"tau": 3.0, "a": 1.05, "m": 0.2}
SIGMA = 0.1
OBS_SCALE = 0.1
X0 = (0.0, 1.0)


def drift_fn(tau, a):
    def drift(t, state):
        x, y = state[..., 0], state[..., 1]
        return torch.stack([tau * (x - x**3 / 3 + y), (a - x) / tau], dim=-1)

    return drift


def make_model(times):
    x0 = torch.tensor(X0)

    def model(z):
        tau = pyro.sample("tau", dist.Uniform(0.1, 5.0))
        a = pyro.sample("a", dist.Uniform(0.0, 3.0))
        m = pyro.sample("m", dist.Uniform(0.0, 1.0))
        path = pyro.sample("path", LatentDiffusion(drift_fn(tau, a), SIGMA, x0, times))
        m = m.unsqueeze(-1)
        mean = m * path[..., 0] + (1 - m) * path[..., 1]
        pyro.sample("z", dist.Normal(mean, OBS_SCALE).to_event(1), obs=z)

    return model


def simulate(times):
    x0 = torch.tensor(X0)
    path = LatentDiffusion(
        drift_fn(torch.tensor(TRUTH["tau"]), torch.tensor(TRUTH["a"])), SIGMA, x0, times
    ).sample()
    m = TRUTH["m"]
    return m * path[:, 0] + (1 - m) * path[:, 1] + OBS_SCALE * torch.randn(path.shape[0])


def run_chains(make_kernel, z, args):
    """``num_chains`` chains one after the other, each from ``make_kernel()``; returns
    stacked samples of tau, a, m and the seconds (kernel set-up included)."""
    chains = {name: [] for name in TRUTH}
    start = time.perf_counter()
    for _ in range(args.num_chains):
        kernel = make_kernel()
        mcmc = MCMC(
            kernel,
            num_samples=args.num_samples,
            warmup_steps=args.warmup_steps,
            disable_progbar=not args.progress,
        )
        mcmc.run(z)
        samples = mcmc.get_samples()
        for name in TRUTH:
            chains[name].append(samples[name])
    seconds = time.perf_counter() - start
    return {name: torch.stack(v) for name, v in chains.items()}, seconds


def summarise(label, chains, seconds):
    row = {"start": label, "seconds": seconds}
    for name, values in chains.items():
        row[f"rhat_{name}"] = split_gelman_rubin(values).item()
        row[f"ess_{name}"] = effective_sample_size(values).item()
        row[f"mean_{name}"] = values.mean().item()
    print(
        f"{label:<16} {seconds:8.1f} s   "
        + "  ".join(
            f"{n} R-hat {row[f'rhat_{n}']:6.3f} mean {row[f'mean_{n}']:.3f}" for n in chains
        )
    )
    return row


def main(args):
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    times = torch.arange(args.num_steps + 1) * 0.1
    z = simulate(times)
    model = make_model(times)

    guide = DiffusionGuide(model)
    start = time.perf_counter()
    fit(
        model,
        guide,
        z,
        num_steps=args.svi_steps,
        num_particles=args.num_particles,
        progress=args.progress,
    )
    fit_seconds = time.perf_counter() - start
    print(f"fit: {args.svi_steps} SVI steps in {fit_seconds:.1f} s")

    print(
        f"NUTS, {args.num_chains} chains x ({args.warmup_steps} warm-up + "
        f"{args.num_samples} samples), max tree depth {args.max_tree_depth}; truth {TRUTH}"
    )
    depth, jit = args.max_tree_depth, args.jit

    def guide_start():  # a fresh guide draw for every chain
        return NUTS(
            model, init_strategy=init_to_guide(guide, z), max_tree_depth=depth, jit_compile=jit
        )

    def guide_start_and_mass():
        matrix = guide_inverse_mass_matrix(model, guide, z, num_samples=args.mass_samples)
        return GuidedNUTS(
            model,
            init_strategy=init_to_guide(guide, z),
            inverse_mass_matrix=matrix,
            adapt_mass_matrix=False,
            max_tree_depth=depth,
            jit_compile=jit,
        )

    def default_start():
        return NUTS(model, max_tree_depth=depth, jit_compile=jit)  # Pyro's init_to_uniform

    starts = {
        "guide": ("guide start", guide_start),
        "guide_mass": ("guide + mass", guide_start_and_mass),
        "default": ("default start", default_start),
    }
    rows = []
    for name in args.starts:
        label, make_kernel = starts[name]
        rows.append(summarise(label, *run_chains(make_kernel, z, args)))
    return {"fit_seconds": fit_seconds, "rows": rows}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-steps", type=int, default=200, help="Euler steps, dt = 0.1")
    parser.add_argument("--svi-steps", type=int, default=2000)
    parser.add_argument("--num-particles", type=int, default=8)
    parser.add_argument("--num-chains", type=int, default=2)
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--max-tree-depth", type=int, default=8)
    parser.add_argument("--mass-samples", type=int, default=500, help="guide draws")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jit", action="store_true", help="NUTS with jit_compile=True")
    parser.add_argument(
        "--starts", nargs="+", default=["guide", "guide_mass", "default"],
        choices=["guide", "guide_mass", "default"], help="which starts to run",
    )  # fmt: skip
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_steps, args.svi_steps, args.warmup_steps, args.num_samples = 20, 5, 3, 4
        args.max_tree_depth, args.mass_samples = 3, 10
    return args


if __name__ == "__main__":
    main(parse_args())
