"""A double-well path observed between its wells.

dX = (X - X^3) dt + sigma dW from X_0 = 0: the terminal prior is bimodal (wells at
-1 and +1). One noisy observation y between the wells leaves a bimodal posterior
tilted towards one well. The 1-D Euler chain is propagated exactly on a fine grid
(:func:`pyro_latdiff.testing.euler_grid_density`), which gives the exact evidence and terminal
posterior to compare the fitted guide with.

    python examples/double_well.py
    python examples/double_well.py --smoke
"""

from __future__ import annotations

import argparse
import math

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Predictive, Trace_ELBO
from pyro.infer.importance import vectorized_importance_weights

from pyro_latdiff import DiffusionGuide, LatentDiffusion, fit, log_evidence
from pyro_latdiff.testing import euler_grid_density


def drift(t, x):
    return x - x**3


def model(y, times, sigma, obs_scale):
    path = pyro.sample("path", LatentDiffusion(drift, sigma, torch.zeros(1), times))
    pyro.sample("y", dist.Normal(path[..., -1, :], obs_scale).to_event(1), obs=y)


def grid_solution(y, times, sigma, obs_scale, grid_size=3501):
    """Exact evidence and terminal posterior of the Euler chain, on a grid of states."""
    x = torch.linspace(-3.5, 3.5, grid_size)
    dx = x[1] - x[0]
    density = euler_grid_density(drift, sigma, 0.0, times, x, time_homogeneous=True)
    likelihood = dist.Normal(x, obs_scale).log_prob(torch.as_tensor(y, dtype=x.dtype)).exp()
    evidence = (density * likelihood).sum() * dx
    posterior = density * likelihood / evidence
    mean = (posterior * x).sum() * dx
    sd = ((posterior * (x - mean) ** 2).sum() * dx).sqrt()
    upper = (posterior * (x > 0)).sum() * dx
    return dict(
        log_evidence=evidence.log().item(),
        mean=mean.item(),
        sd=sd.item(),
        p_upper=upper.item(),
        prior_mass=(density.sum() * dx).item(),
    )


def main(args):
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    times = torch.linspace(0.0, args.t_end, args.num_steps + 1)
    y = torch.tensor([args.y])
    model_args = (y, times, args.sigma, args.obs_scale)

    guide = DiffusionGuide(model)
    fit(
        model,
        guide,
        *model_args,
        num_steps=args.svi_steps,
        num_particles=args.num_particles,
        progress=not args.smoke,
    )

    exact = grid_solution(args.y, times, args.sigma, args.obs_scale, args.grid_size)
    elbo = -Trace_ELBO(num_particles=args.num_samples, vectorize_particles=True).loss(
        model, guide, *model_args
    )
    estimate = log_evidence(model, guide, *model_args, num_samples=args.num_samples)
    with torch.no_grad():
        terminal = Predictive(model, guide=guide, num_samples=args.num_samples, parallel=True)(
            *model_args
        )["path"][:, -1, 0]
    with torch.no_grad():  # importance weights and the draws they belong to
        log_w, _, guide_trace = vectorized_importance_weights(
            model, guide, *model_args, num_samples=args.num_samples, max_plate_nesting=0
        )
    weights = torch.softmax(log_w, 0)
    drawn = guide_trace.nodes["path"]["value"][..., -1, 0]
    print(f"grid mass check {exact['prior_mass']:.6f} (should be 1)")
    print(
        f"log p(y)   exact {exact['log_evidence']:.4f}   ELBO {elbo:.4f}   "
        f"log_evidence {estimate.item():.4f} +- {estimate.stderr:.4f} "
        f"(ESS {estimate.ess:.0f}/{args.num_samples})"
    )
    print(
        f"X_T | y    exact mean {exact['mean']:.4f} sd {exact['sd']:.4f} "
        f"P(X_T > 0) {exact['p_upper']:.4f}"
    )
    print(
        f"           guide mean {terminal.mean():.4f} sd {terminal.std():.4f} "
        f"P(X_T > 0) {(terminal > 0).double().mean():.4f}"
    )
    reweighted = (weights * drawn).sum().item()
    print(f"           importance-reweighted mean {reweighted:.4f}")
    return dict(
        exact=exact,
        elbo=elbo,
        log_evidence=estimate.item(),
        stderr=estimate.stderr,
        mean=terminal.mean().item(),
        sd=terminal.std().item(),
        p_upper=(terminal > 0).double().mean().item(),
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--y", type=float, default=0.3)
    parser.add_argument("--sigma", type=float, default=0.6)
    parser.add_argument("--obs-scale", type=float, default=0.4)
    parser.add_argument("--t-end", type=float, default=3.0)
    parser.add_argument("--num-steps", type=int, default=60)
    parser.add_argument("--svi-steps", type=int, default=1500)
    parser.add_argument("--num-particles", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument(
        "--grid-size", type=int, default=3501, help="states in the exact grid computation"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.svi_steps, args.num_samples, args.grid_size = 5, 64, 401
    if not math.isfinite(args.y):
        parser.error("--y must be finite")
    return args


if __name__ == "__main__":
    main(parse_args())
