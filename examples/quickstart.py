"""Quickstart: the posterior of an Ornstein–Uhlenbeck path observed at its end.

Bench A of the references: dX = -X dt + dW, X_0 = 0, T = 1, 50 Euler steps, and
y = 1.5 observed as N(X_T, 0.1^2). Everything has a closed form on the discrete
chain: log p(y) = -3.028, and X_T | y has mean 1.466, sd 0.0989.

    python examples/quickstart.py            # fit, print, write two PNGs
    python examples/quickstart.py --smoke    # a few steps, for the tests
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer import Predictive, Trace_ELBO  # noqa: E402

from pyro_latdiff import DiffusionGuide, fit, log_evidence  # noqa: E402
from pyro_latdiff.plots import plot_fan  # noqa: E402
from pyro_latdiff.testing import ou_problem  # noqa: E402


def main(args):
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    problem = ou_problem(num_steps=args.num_steps)
    y = torch.tensor([args.y])

    guide = DiffusionGuide(problem.model)
    losses = fit(
        problem.model,
        guide,
        y,
        num_steps=args.svi_steps,
        num_particles=args.num_particles,
        progress=not args.smoke,
    )

    elbo_loss = Trace_ELBO(num_particles=args.num_samples, vectorize_particles=True)
    elbo = -elbo_loss.loss(problem.model, guide, y)
    estimate = log_evidence(problem.model, guide, y, num_samples=args.num_samples)
    exact = problem.log_evidence(y).item()
    mean, cov = problem.terminal_posterior(y)
    with torch.no_grad():
        posterior = Predictive(
            problem.model, guide=guide, num_samples=args.num_samples, parallel=True
        )(y)["path"][..., 0]
    terminal = posterior[:, -1]
    print(f"ELBO           {elbo:9.4f}   (gap to exact {exact - elbo:.4f} nats)")
    print(
        f"log_evidence   {estimate.item():9.4f} +- {estimate.stderr:.4f}   "
        f"ESS {estimate.ess:.0f}/{args.num_samples}"
    )
    print(f"exact log p(y) {exact:9.4f}")
    print(f"X_T | y mean   {terminal.mean():9.4f}   exact {mean.item():.4f}")
    print(f"X_T | y sd     {terminal.std():9.4f}   exact {cov.sqrt().item():.4f}")

    os.makedirs(args.outdir, exist_ok=True)
    times = problem.times
    prior = problem.distribution().sample((args.num_samples,))[..., 0]
    fig, ax = plt.subplots(figsize=(7, 4))
    for paths, color, label in ((prior, "tab:gray", "prior"), (posterior, "tab:blue", "posterior")):
        start = torch.zeros(len(paths), 1)  # x0 = 0 at times[0]
        plot_fan(times, torch.cat([start, paths], 1), label=label, color=color, ax=ax)
    ax.errorbar([times[-1]], [args.y], yerr=[0.2], fmt="o", color="k", label="y (2 sd)")
    ax.set(xlabel="t", ylabel="X_t", title="OU path: prior and posterior given y at T")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(os.path.join(args.outdir, "quickstart_paths.png"), dpi=120)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(losses, lw=0.8)
    ax.axhline(-exact, color="k", ls="--", label="-log p(y), exact")
    ax.set(xlabel="SVI step", ylabel="loss (negative ELBO)", yscale="symlog")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(args.outdir, "quickstart_loss.png"), dpi=120)
    plt.close("all")
    return dict(
        elbo=elbo,
        log_evidence=estimate.item(),
        exact=exact,
        mean=terminal.mean().item(),
        sd=terminal.std().item(),
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--y", type=float, default=1.5)
    parser.add_argument("--num-steps", type=int, default=50, help="Euler steps of the path")
    parser.add_argument("--svi-steps", type=int, default=1000)
    parser.add_argument("--num-particles", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--outdir", default="outputs")
    parser.add_argument("--smoke", action="store_true", help="a few steps, for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.svi_steps, args.num_samples = 5, 64
    return args


if __name__ == "__main__":
    main(parse_args())
