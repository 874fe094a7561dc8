"""A drift rate shared by many paths: the posterior of a global parameter.

theta ~ LogNormal(0, 0.5) is the mean-reversion rate of M independent OU paths
dX_i = -theta X_i dt + dW_i, X_i(0) = 0, each observed once at T = 1 as
y_i ~ N(X_i(T), obs_scale^2) (:class:`pyro_latdiff.testing.SharedRateOU`). Given theta
the evidence of each y_i is Gaussian in closed form on the Euler chain, so the exact
posterior of theta follows by quadrature over theta; the fitted guide's posterior of
theta is compared with it.

    python examples/global_parameter.py
    python examples/global_parameter.py --smoke
"""

from __future__ import annotations

import argparse

import pyro
import torch
from pyro.infer import Predictive

from pyro_latdiff import DiffusionGuide, fit, log_evidence
from pyro_latdiff.testing import SharedRateOU


def main(args):
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    problem = SharedRateOU(torch.linspace(0.0, 1.0, args.num_steps + 1), args.obs_scale)
    y = problem.simulate(args.theta, args.num_series)

    guide = DiffusionGuide(problem.model)
    fit(
        problem.model,
        guide,
        y,
        num_steps=args.svi_steps,
        num_particles=args.num_particles,
        progress=not args.smoke,
    )

    _, _, exact_mean, exact_sd = problem.exact_posterior(y)
    with torch.no_grad():
        theta = Predictive(
            problem.model, guide=guide, num_samples=args.num_samples, return_sites=["theta"]
        )(y)["theta"]
    mean, sd = theta.mean().item(), theta.std().item()
    estimate = log_evidence(problem.model, guide, y, num_samples=args.num_samples)
    print(f"theta | y   guide mean {mean:.4f}  sd {sd:.4f}")
    print(f"            exact mean {exact_mean:.4f}  sd {exact_sd:.4f}")
    print(
        f"mean error {abs(mean - exact_mean) / exact_sd:.3f} posterior sd; "
        f"sd ratio {sd / exact_sd:.3f}"
    )
    print(
        f"log_evidence {estimate.item():.4f} +- {estimate.stderr:.4f}  "
        f"ESS {estimate.ess:.0f}/{args.num_samples}"
    )
    return dict(mean=mean, sd=sd, exact_mean=exact_mean.item(), exact_sd=exact_sd.item())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-series", type=int, default=30)
    parser.add_argument("--theta", type=float, default=1.5, help="true rate of the data")
    parser.add_argument("--obs-scale", type=float, default=0.1)
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--svi-steps", type=int, default=1500)
    parser.add_argument("--num-particles", type=int, default=16)
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.svi_steps, args.num_samples, args.num_series = 5, 64, 4
    return args


if __name__ == "__main__":
    main(parse_args())
