"""Stochastic Lotka–Volterra observed at four times: paths and rates from one fit.

The predator–prey diffusion of Ryder, Golightly, McGough & Prangle (2018), for prey U
and predators V,

    d(U, V) = (t1 U - t2 U V, t2 U V - t3 V) dt + L(U, V) dW,
    L L^T = [[t1 U + t2 U V, -t2 U V], [-t2 U V, t3 V + t2 U V]],

from (U, V) = (71, 79) on 400 Euler steps of 0.1 (T = 40), observed at t = 10, 20,
30, 40 with sd 1 (data simulated with theta = (0.5, 0.0025, 0.3)); prior
log theta_i ~ N(0, 3^2). Every path state is latent (800 of them) and only four
points pin the path: the guide is a backward-filtered guided proposal
(``DiffusionGuide``) that sees all four observations, plus a learned correction.

    python examples/state_space.py                  # fit, print, write two PNGs
    python examples/state_space.py --nuts           # and compare with Pyro NUTS
    python examples/state_space.py --smoke          # a few steps, for the tests

**Noise matrix.** ``L`` is the lower Cholesky factor of the covariance rate, in
closed form. Any factor with ``L L^T`` equal to it (the symmetric square root
included) gives the same Euler chain: a transition is Gaussian with covariance
``L L^T h``, and ``LatentDiffusion`` scores it through that covariance alone. The
Cholesky factor is cheaper and its entries are explicit.

**Positivity.** The Euler chain is Gaussian, so a population can step below zero,
where the covariance above is not positive semi-definite. The noise matrix uses the
populations clamped at ``--floor`` (0.1 by default; the drift uses the raw states):
the chain is a proper distribution for every state, and it is the model above
wherever both populations stay above the floor, which holds for the posterior paths
(the fit reports how many posterior draws ever go below it: none at the defaults).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import time
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from pyro import poutine  # noqa: E402
from pyro.infer.autoguide import AutoMultivariateNormal  # noqa: E402
from pyro.infer.autoguide.initialization import init_to_value  # noqa: E402

from pyro_latdiff import DiffusionGuide, LatentDiffusion, fit, log_evidence  # noqa: E402
from pyro_latdiff.plots import plot_fan  # noqa: E402
from pyro_latdiff.testing.nuts import run_nuts, summarise_draws  # noqa: E402

X0 = (71.0, 79.0)
OBS_TIMES = (10.0, 20.0, 30.0, 40.0)
U_OBS = (47.61225908, 80.53119269, 23.10087379, 158.05238324)
V_OBS = (447.20971405, 50.26254069, 339.40432691, 66.79611979)
TRUE_THETA = (0.5, 0.0025, 0.3)
NAMES = ("theta1", "theta2", "theta3")


class LotkaVolterra:
    """The model and its data. ``model(y)``: site ``"log_theta"`` ``(3,)``, the path
    ``"path"`` ``(400, 2)`` and the observed ``"y"`` ``(4, 2)``.

    The state is the populations in units of ``unit`` (100 by default): the same
    model, since a linear change of units maps the Euler chain onto the Euler chain of
    the rescaled SDE (drift and noise matrix divided by ``unit``), but the guide's
    learned terms (linear in the state, a network of it) see numbers of order one.
    Log-densities of ``y`` differ by the Jacobian, ``8 log(unit)``, which
    :meth:`log_evidence_in_populations` adds back.
    """

    def __init__(self, dt: float = 0.1, t_end: float = 40.0, floor: float = 0.1, unit=100.0):
        num_steps = round(t_end / dt)
        self.times = torch.linspace(0.0, t_end, num_steps + 1)
        self.obs_index = torch.tensor([round(t / dt) - 1 for t in OBS_TIMES])
        self.unit = unit
        self.x0 = torch.tensor(X0) / unit
        self.floor = floor
        self.y = torch.tensor([U_OBS, V_OBS]).T / unit

    def log_evidence_in_populations(self, log_evidence: float) -> float:
        return log_evidence - self.y.numel() * math.log(self.unit)

    def drift_fn(self, theta):
        t1, t2, t3 = theta.unbind(-1)
        unit = self.unit

        def drift(t, x):
            u, v = (x * unit).unbind(-1)
            return torch.stack([t1 * u - t2 * u * v, t2 * u * v - t3 * v], -1) / unit

        return drift

    def diffusion_fn(self, theta):
        t1, t2, t3 = theta.unbind(-1)
        floor, unit = self.floor, self.unit

        def diffusion(t, x):
            u, v = (x * unit).clamp(min=floor).unbind(-1)
            c = t2 * u * v
            a = t1 * u + c
            l11 = a.sqrt()
            l21 = -c / l11
            l22 = (t3 * v + c * t1 * u / a).sqrt()  # = sqrt(t3 v + c - c^2 / a)
            zero = torch.zeros_like(l11)
            rows = [torch.stack([l11, zero], -1), torch.stack([l21, l22], -1)]
            return torch.stack(rows, -2) / unit

        return diffusion

    def model(self, y=None):
        prior = dist.Normal(torch.zeros(3), 3.0).to_event(1)
        theta = pyro.sample("log_theta", prior).exp()
        path = pyro.sample(
            "path",
            LatentDiffusion(
                self.drift_fn(theta),
                self.diffusion_fn(theta),
                self.x0,
                self.times,
                noise_type="general",
            ),
        )
        states = path[..., self.obs_index, :]
        return pyro.sample("y", dist.Normal(states, 1.0 / self.unit).to_event(2), obs=y)


def initial_log_theta(y):
    """A rough estimate from the data, to start the fit where the chain is not stiff
    (at the prior median theta = (1, 1, 1) one Euler step takes U from 71 to -490): the
    Lotka–Volterra equilibrium (t3 / t2, t1 / t2) at the data's mean populations, and
    the small-oscillation period 2 pi / sqrt(t1 t3) at 20, the spacing of the predator
    peaks (t = 10, 30)."""
    u_mean, v_mean = y.mean(0).tolist()
    rate = 2 * math.pi / 20.0  # sqrt(t1 t3)
    t3 = rate * math.sqrt(u_mean / v_mean)
    t2 = t3 / u_mean
    t1 = rate**2 / t3
    return torch.tensor([t1, t2, t3]).log()


def fit_guide(problem, args, joint: bool):
    pyro.set_rng_seed(args.seed)
    init = init_to_value(values={"log_theta": initial_log_theta(problem.y * problem.unit)})
    latent_guide = (
        functools.partial(AutoMultivariateNormal, init_loc_fn=init, init_scale=0.1)
        if joint
        else None
    )
    guide = DiffusionGuide(
        problem.model,
        latent_guide=latent_guide,
        init_loc_fn=init,
        relinearise=args.relinearise,
        context=None,
        state_bounds=(args.floor / problem.unit, args.high / problem.unit),
    )
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:  # e.g. the states the guide clamped
        warnings.simplefilter("always")
        losses = fit(
            problem.model,
            guide,
            problem.y,
            num_steps=args.svi_steps,
            num_particles=args.num_particles,
            progress=not args.smoke,
            check=False,
        )
    for warning in caught:
        print(f"  {warning.message}")
    seconds = time.perf_counter() - start
    estimate = log_evidence(
        problem.model, guide, problem.y, num_samples=args.num_samples, chunk_size=args.chunk_size
    )
    return guide, losses, seconds, estimate


def draw(problem, guide, num_samples, chunk_size):
    """``log_theta`` and paths from the guide, in vectorised chunks. (Not through
    ``Predictive``: it first runs the model from the prior to count plates, and prior
    draws of theta, log theta ~ N(0, 3^2), make the chain overflow.)"""
    thetas, paths = [], []
    with torch.no_grad():
        for start in range(0, num_samples, chunk_size):
            size = min(chunk_size, num_samples - start)
            with pyro.plate("draws", size, dim=-1):
                trace = poutine.trace(guide).get_trace(problem.y)
            thetas.append(trace.nodes["log_theta"]["value"].reshape(size, 3))
            paths.append(trace.nodes["path"]["value"].reshape(size, -1, 2))
    return torch.cat(thetas), torch.cat(paths)


def nuts_from_guide(problem, guide, args):
    """NUTS on the same chain (all 800 states and log theta latent), each chain
    started from a draw of the fitted guide."""
    log_theta, paths = draw(problem, guide, args.nuts_chains, args.nuts_chains)
    inits = [{"log_theta": log_theta[c], "path": paths[c]} for c in range(args.nuts_chains)]
    return run_nuts(
        problem.model,
        problem.y,
        inits=inits,
        num_samples=args.nuts_samples,
        warmup_steps=args.nuts_warmup,
        max_tree_depth=args.nuts_tree_depth,
        target_accept_prob=args.nuts_target_accept,
        jit_compile=True,
        seed=args.seed,
        progress=args.progress,
    )


def summary_rows(theta):
    """Mean and sd of theta = exp(log_theta) draws ``(S, 3)``."""
    return [(float(theta[:, i].mean()), float(theta[:, i].std())) for i in range(3)]


def plot_paths_figure(problem, paths, path):
    times = problem.times.numpy()
    start = problem.x0.expand(len(paths), 1, 2)
    paths = torch.cat([start, paths], 1).numpy() * problem.unit
    fig, axes = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    for i, (ax, name, color) in enumerate(
        zip(axes, ("prey U", "predators V"), ("tab:blue", "tab:red"), strict=True)
    ):
        plot_fan(times, paths[..., i], label="posterior", color=color, ax=ax)
        ax.plot(times, paths[0, :, i], color=color, lw=0.6, alpha=0.7, label="one posterior path")
        ax.plot(
            [0.0, *OBS_TIMES],
            [X0[i], *(problem.y[:, i] * problem.unit).tolist()],
            "o",
            color="k",
            ms=5,
            label="x0 and data (sd 1)",
        )
        ax.set_ylabel(name)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7, ncol=4, loc="upper left")
    axes[0].set_title("Stochastic Lotka–Volterra: posterior paths given 4 observations")
    axes[-1].set_xlabel("t")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_theta_figure(draws, path):
    """``draws``: label -> theta draws ``(S, 3)``."""
    styles = {
        "DiffusionGuide, mean-field": ("tab:blue", "stepfilled", 0.35),
        "DiffusionGuide + AutoMultivariateNormal": ("tab:green", "stepfilled", 0.35),
        "NUTS": ("k", "step", 1.0),
    }
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for i, ax in enumerate(axes):
        values = np.concatenate([d[:, i].numpy() for d in draws.values()])
        low, high = np.quantile(values, [0.001, 0.999])
        bins = np.linspace(low, high, 50)
        for label, theta in draws.items():
            color, kind, alpha = styles.get(label, ("tab:gray", "step", 1.0))
            ax.hist(
                theta[:, i].numpy(),
                bins=bins,
                density=True,
                histtype=kind,
                color=color,
                alpha=alpha,
                lw=1.5,
                label=label,
            )
        ax.axvline(TRUE_THETA[i], color="tab:orange", ls="--", lw=1.5, label="simulated with")
        ax.set_xlabel(f"theta{i + 1}")
        ax.set_yticks([])
    axes[0].legend(fontsize=7)
    fig.suptitle("Posterior of the rates (marginals)")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main(args):
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    problem = LotkaVolterra(floor=args.floor)
    results, draws = {}, {}
    guides = {}
    for joint in {"both": (False, True), "mean-field": (False,), "mvn": (True,)}[args.guides]:
        label = "DiffusionGuide + AutoMultivariateNormal" if joint else "DiffusionGuide, mean-field"
        guide, losses, seconds, estimate = fit_guide(problem, args, joint)
        log_theta, paths = draw(problem, guide, args.num_samples, args.chunk_size)
        theta = log_theta.exp()
        below = int((paths * problem.unit < args.floor).any(-1).any(-1).sum())
        rows = summary_rows(theta)
        results[label] = dict(
            theta=rows,
            log_evidence=problem.log_evidence_in_populations(estimate.item()),
            stderr=estimate.stderr,
            ess=estimate.ess,
            seconds=seconds,
            final_loss=float(np.mean(losses[-50:])),
            draws_below_floor=below,
        )
        draws[label] = theta
        guides[label] = (guide, paths)
        print(f"{label}: {args.svi_steps} SVI steps in {seconds:.0f} s")
        for name, (mean, sd), true in zip(NAMES, rows, TRUE_THETA, strict=True):
            print(f"  {name}  mean {mean:.5g}  sd {sd:.3g}   (simulated with {true})")
        print(
            f"  log_evidence {results[label]['log_evidence']:.3f} +- {estimate.stderr:.3f}, "
            f"ESS {estimate.ess:.0f}/{args.num_samples}; draws below the floor {below}"
        )
    best = max(results, key=lambda k: results[k]["ess"])
    print(f"better guide (higher importance ESS): {best}")
    if args.nuts:
        run = nuts_from_guide(problem, guides[best][0], args)
        theta = run.samples["log_theta"].reshape(-1, 3).exp()
        summary = {
            name: summarise_draws(run.samples["log_theta"][..., i].exp())
            for i, name in enumerate(NAMES)
        }
        draws["NUTS"] = theta
        results["NUTS"] = dict(summary=summary, settings=run.settings, seconds=run.seconds)
        print(f"NUTS {run.settings}: {run.seconds:.0f} s, step sizes {run.step_sizes}")
        for name, row in summary.items():
            print(
                f"  {name}  mean {row['mean']:.5g}  sd {row['sd']:.3g}  "
                f"R-hat {row['r_hat']:.3f}  ESS {row['ess']:.0f}"
            )
    os.makedirs(args.outdir, exist_ok=True)
    plot_paths_figure(problem, guides[best][1], os.path.join(args.outdir, "state_space_paths.png"))
    plot_theta_figure(draws, os.path.join(args.outdir, "state_space_theta.png"))
    with open(os.path.join(args.outdir, "state_space.json"), "w") as handle:
        json.dump(results, handle, indent=2, default=str)
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--svi-steps", type=int, default=1500)
    parser.add_argument("--num-particles", type=int, default=8)
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--chunk-size", type=int, default=250)
    parser.add_argument("--relinearise", type=int, default=2)
    parser.add_argument("--floor", type=float, default=0.1, help="populations' floor in L")
    parser.add_argument("--guides", choices=["both", "mean-field", "mvn"], default="both")
    parser.add_argument("--high", type=float, default=2000.0, help="guide's state bound")
    parser.add_argument("--nuts", action="store_true", help="also run Pyro NUTS (slow)")
    parser.add_argument("--nuts-chains", type=int, default=4)
    parser.add_argument("--nuts-warmup", type=int, default=500)
    parser.add_argument("--nuts-samples", type=int, default=500)
    parser.add_argument("--nuts-tree-depth", type=int, default=8)
    parser.add_argument("--nuts-target-accept", type=float, default=0.8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--outdir", default="outputs")
    parser.add_argument("--progress", action="store_true", help="NUTS progress bars")
    parser.add_argument("--smoke", action="store_true", help="a few steps, for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.svi_steps, args.num_particles, args.num_samples, args.chunk_size = 3, 2, 16, 16
        args.relinearise = 0
        args.nuts = False
    return args


if __name__ == "__main__":
    main(parse_args())
