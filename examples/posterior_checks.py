"""Posterior checks with ArviZ: fit, convert to InferenceData, check.

1. Bench A (OU path observed at its end, exact posterior known): fit, convert, print
   az.summary and the PSIS k-hat of the guide; plot the posterior path fan chart
   against the prior and the terminal marginal against the exact density.
2. The global-parameter model (as in examples/global_parameter.py): fit, convert, print
   az.summary of theta, az.loo, k-hat and the importance-corrected posterior mean of
   theta against the exact one; az.plot_ppc and az.plot_posterior.
3. Simulation-based calibration of theta on a small version of that model, with the
   rank histogram.

    python examples/posterior_checks.py            # PNGs in outputs/
    python examples/posterior_checks.py --smoke    # a few steps, for the tests
"""

from __future__ import annotations

import argparse
import math
import os

import matplotlib

matplotlib.use("Agg")
import arviz as az  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402

from pyro_latdiff import DiffusionGuide, fit  # noqa: E402
from pyro_latdiff.calibration import calibrate  # noqa: E402
from pyro_latdiff.infer import default_optim  # noqa: E402
from pyro_latdiff.inference_data import (  # noqa: E402
    importance_mean,
    psis_diagnostics,
    to_inference_data,
)
from pyro_latdiff.plots import plot_paths, plot_ranks, plot_terminal  # noqa: E402
from pyro_latdiff.testing import SharedRateOU, ou_problem  # noqa: E402


def bench_a(args) -> dict:
    problem = ou_problem()
    y = torch.tensor([1.5])
    guide = DiffusionGuide(problem.model)
    fit(problem.model, guide, y, num_steps=args.svi_steps, progress=not args.smoke)
    data = to_inference_data(
        problem.model, guide, y, num_samples=args.num_samples, num_prior_samples=args.num_samples
    )
    diagnostics = psis_diagnostics(data)
    mean, cov = problem.terminal_posterior(y)
    mean, sd = mean.item(), cov.sqrt().item()
    t_end = data.posterior["time"].values[-1]
    print("== Bench A: OU path, y = 1.5 observed at T = 1 with sd 0.1")
    print(az.summary(data, var_names=["path"], coords={"time": [t_end]}))
    print(diagnostics)
    corrected = importance_mean(data, lambda post: post["path"].isel(time=-1, state=0))
    print(
        f"X_T | y: guide mean {data.posterior['path'].isel(time=-1).mean().item():.4f}, "
        f"PSIS-corrected {corrected.item():.4f}, exact {mean:.4f} (sd {sd:.4f})"
    )

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    plot_paths(data, ax=axes[0])
    axes[0].errorbar([t_end], [1.5], yerr=[0.2], fmt="o", color="k", label="y (2 sd)")
    axes[0].set_title("Bench A: posterior paths against the prior")
    axes[0].legend(fontsize=7, ncol=2)
    plot_terminal(
        data,
        ax=axes[1],
        density=lambda x: np.exp(-0.5 * ((x - mean) / sd) ** 2) / (sd * math.sqrt(2 * math.pi)),
    )
    axes[1].set_title("X_T | y: guide, PSIS-weighted and exact")
    fig.tight_layout()
    fig.savefig(os.path.join(args.outdir, "posterior_checks_bench_a.png"), dpi=110)
    plt.close(fig)
    return dict(
        bench_a_k_hat=diagnostics.k_hat,
        bench_a_terminal_mean=corrected.item(),
        bench_a_exact_mean=mean,
    )


def global_model(args) -> dict:
    problem = SharedRateOU(torch.linspace(0.0, 1.0, args.num_steps + 1), args.obs_scale)
    y = problem.simulate(args.theta, args.num_series)
    model = problem.model
    guide = DiffusionGuide(model)
    fit(model, guide, y, num_steps=args.svi_steps, progress=not args.smoke)
    data = to_inference_data(model, guide, y, num_samples=args.num_samples)
    diagnostics = psis_diagnostics(data)
    _, _, exact_mean, exact_sd = problem.exact_posterior(y)
    corrected = importance_mean(data, var_names=["theta"])["theta"].item()
    print(f"\n== Global parameter: theta shared by {args.num_series} OU paths")
    print(az.summary(data, var_names=["theta"]))
    loo = az.loo(data)
    print(loo)
    print(diagnostics)
    print(
        f"theta | y: guide mean {data.posterior['theta'].mean().item():.4f}, "
        f"PSIS-corrected {corrected:.4f}, exact {exact_mean:.4f} (sd {exact_sd:.4f})"
    )

    az.plot_ppc(data, num_pp_samples=min(100, args.num_samples), random_seed=args.seed)
    plt.gcf().savefig(os.path.join(args.outdir, "posterior_checks_ppc.png"), dpi=110)
    az.plot_posterior(data, var_names=["theta"], ref_val=float(exact_mean))
    plt.gcf().savefig(os.path.join(args.outdir, "posterior_checks_theta.png"), dpi=110)
    plt.close("all")
    return dict(
        global_k_hat=diagnostics.k_hat,
        elpd_loo=float(loo.elpd_loo),
        theta_mean=corrected,
        theta_exact_mean=float(exact_mean),
    )


def sbc(args) -> dict:
    """SBC of theta: 20 series observed with sd 0.5 at T = 2, 10 Euler steps; all
    simulations fitted together (one theta guide each, a shared path network)."""
    problem = SharedRateOU(torch.linspace(0.0, 2.0, 11), obs_scale=0.5)
    y = torch.zeros(20)  # a shape: calibrate simulates the data
    steps = args.sbc_steps

    def fit_fn(model, guide, *fit_args):
        fit(
            model,
            guide,
            *fit_args,
            num_steps=steps,
            num_particles=4,
            progress=False,
            optim=default_optim(steps, lr=0.05, final_lr=0.005),
        )

    result = calibrate(
        problem.model,
        y,
        quantities=["theta"],
        num_simulations=args.sbc_simulations,
        num_samples=99,
        simulations_per_fit=args.sbc_simulations,
        fit_fn=fit_fn,
        guide_fn=lambda model: DiffusionGuide(model, hidden_dims=(32,)),
    )
    print(f"\n== {result}")
    ax = plot_ranks(result, "theta")
    ax.figure.savefig(os.path.join(args.outdir, "posterior_checks_ranks.png"), dpi=110)
    plt.close("all")
    return dict(sbc_p_value=result.p_values()["theta"])


def main(args):
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    os.makedirs(args.outdir, exist_ok=True)
    result = bench_a(args)
    result.update(global_model(args))
    result.update(sbc(args))
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--svi-steps", type=int, default=1000)
    parser.add_argument("--num-samples", type=int, default=1000, help="draws per chain")
    parser.add_argument("--num-series", type=int, default=30)
    parser.add_argument("--num-steps", type=int, default=50, help="Euler steps")
    parser.add_argument("--theta", type=float, default=1.5, help="true rate of the data")
    parser.add_argument("--obs-scale", type=float, default=0.1)
    parser.add_argument("--sbc-simulations", type=int, default=100)
    parser.add_argument("--sbc-steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--outdir", default="outputs")
    parser.add_argument("--smoke", action="store_true", help="a few steps, for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.svi_steps, args.num_samples, args.num_series, args.num_steps = 5, 25, 4, 10
        args.sbc_simulations, args.sbc_steps = 20, 2
    return args


if __name__ == "__main__":
    main(parse_args())
