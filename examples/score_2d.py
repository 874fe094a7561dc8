"""A score-based diffusion model of 2-D data, trained and evaluated through its ELBO.

Data: an 8-component Gaussian mixture on a circle (radius 1.5, component sd 0.3), so
the true log-likelihood of every held-out point is known. Model: the reverse Euler
chain of the OU process dX = -X dt + sqrt(2) dB (T = 3) with a learned score, as a
Pyro model with a latent diffusion path (pyro_latdiff.score.ScoreModel); guide: the
forward noising chain from the data. Training: likelihood-weighted denoising score
matching (an ELBO object, so pyro_latdiff.fit runs it, divergence-safe), with its
closed-form constant so the curve is the continuous-time negative ELBO; or, with
--loss elbo, Pyro's Trace_ELBO on the discrete chain itself. Evaluation on held-out
points, against the true mean log-likelihood:

1. the discrete chain's ELBO (nats and bits per dimension);
2. the importance-weighted bound through pyro_latdiff.log_evidence (guide as proposal);
3. the probability-flow ODE's exact log-likelihood (torchdiffeq).

    python examples/score_2d.py            # train (minutes on CPU), print, write PNGs
    python examples/score_2d.py --smoke    # seconds, for the tests
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer import Trace_ELBO  # noqa: E402

from pyro_latdiff import fit  # noqa: E402
from pyro_latdiff.score import (  # noqa: E402
    ContinuousTimeELBO,
    DenoisingScoreMatching,
    OrnsteinUhlenbeck,
    ScoreModel,
    adapted_times,
    bits_per_dim,
    elbo_per_point,
    importance_weighted_bound,
    ode_log_likelihood,
)
from pyro_latdiff.testing import GaussianMixture  # noqa: E402

FIGURES = ("score_2d_samples.png", "score_2d_training.png")


def ring_mixture(num_components: int = 8, radius: float = 1.5, scale: float = 0.3):
    angles = torch.arange(num_components) * 2 * math.pi / num_components
    means = radius * torch.stack([angles.cos(), angles.sin()], -1)
    return GaussianMixture(means, scale)


def paired(values, truth):
    """Mean of ``values``, and the gap to ``truth`` with its paired standard error."""
    gap = truth - values
    return float(values.mean()), float(gap.mean()), float(gap.std() / math.sqrt(gap.numel()))


def main(args):
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    q = ring_mixture()
    train, test = q.sample(args.num_train), q.sample(args.num_test)
    truth_per_point = q.log_prob(test)
    truth = float(truth_per_point.mean())

    process = OrnsteinUhlenbeck(horizon=3.0)
    sm = ScoreModel(
        process,
        2,
        times=adapted_times(process, args.train_grid, data_var=0.09),
        subsample_size=args.batch_size,
        hidden_dims=(args.width, args.width),
    )
    if args.loss == "dsm":
        loss = DenoisingScoreMatching(sm, truncation=1e-3, include_constant=True)
    elif args.loss == "ct-elbo":
        loss = ContinuousTimeELBO(sm, truncation=1e-3, time_sampling="importance")
    else:
        loss = Trace_ELBO()
    optim = pyro.optim.ClippedAdam(
        {"lr": args.lr, "lrd": 0.1 ** (1 / args.train_steps), "clip_norm": 10.0}
    )
    start = time.perf_counter()
    losses = fit(
        sm.model,
        sm.guide,
        train,
        num_steps=args.train_steps,
        optim=optim,
        loss=loss,
        progress=not args.smoke,
    )
    train_seconds = time.perf_counter() - start
    per_point_losses = torch.tensor(losses) / args.num_train

    # Evaluation on the held-out points, on a finer grid than training used (the
    # score network is grid-free; the discrete chain's gap shrinks like the step).
    evaluated = ScoreModel(
        process, 2, score=sm.score, times=adapted_times(process, args.eval_grid, data_var=0.09)
    )
    start = time.perf_counter()
    with torch.no_grad():
        elbo = elbo_per_point(evaluated, test, args.num_particles)
        iw = importance_weighted_bound(evaluated, test, args.num_samples)
        ode = ode_log_likelihood(
            process, sm.score, test, truncation=1e-3, rtol=args.ode_tol, atol=args.ode_tol
        )
    eval_seconds = time.perf_counter() - start
    result = {"truth": truth, "train_seconds": train_seconds, "eval_seconds": eval_seconds}
    print(f"held-out points: {args.num_test}; true mean log-likelihood {truth:.4f} nats")
    print(f"{'':24s}{'nats':>9s}{'gap':>9s}{'+-':>8s}{'bits/dim':>10s}")
    for name, key, values in (
        (f"ELBO ({args.eval_grid} steps)", "elbo", elbo),
        (f"IW bound (K={args.num_samples})", "iw_bound", iw),
        ("probability-flow ODE", "ode", ode),
    ):
        mean, gap, se = paired(values, truth_per_point)
        result |= {key: mean, f"{key}_gap": gap, f"{key}_gap_stderr": se}
        print(f"{name:24s}{mean:9.4f}{gap:9.4f}{se:8.4f}{float(bits_per_dim(mean, 2)):10.4f}")
    print(f"truth{'':19s}{truth:9.4f}{'':17s}{float(bits_per_dim(truth, 2)):10.4f}")
    print(
        f"training {train_seconds:.0f} s ({args.train_steps} steps, {args.loss}), "
        f"evaluation {eval_seconds:.0f} s, {torch.get_num_threads()} threads"
    )

    os.makedirs(args.outdir, exist_ok=True)
    samples = evaluated.sample(args.num_plot)
    grid = torch.linspace(-3, 3, 200)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    density = q.log_prob(torch.stack([xx, yy], -1)).exp()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.contour(xx, yy, density, levels=8, cmap="Greys", linewidths=0.8)
    ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.4, color="tab:blue", label="model")
    ax.set(
        xlim=(-3, 3),
        ylim=(-3, 3),
        aspect="equal",
        title="samples of the reverse chain over the true density",
    )
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.outdir, FIGURES[0]), dpi=120)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    window = max(1, len(losses) // 100)
    smooth = per_point_losses.unfold(0, window, window).mean(-1) if window > 1 else per_point_losses
    ax.plot(torch.arange(len(smooth)) * window, smooth, lw=1, label=f"loss per point ({args.loss})")
    train_truth = float(q.log_prob(train).mean())
    ax.axhline(-train_truth, color="k", ls="--", lw=1, label="true, training points")
    ax.axhline(-truth, color="tab:gray", ls="--", lw=1, label="true, held-out points")
    ax.axhline(
        result["elbo_gap"] - truth, color="tab:red", ls=":", lw=1, label="held-out -ELBO (chain)"
    )
    ax.set(xlabel="SVI step", ylabel="-log-likelihood, nats per point", title="training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(args.outdir, FIGURES[1]), dpi=120)
    plt.close("all")
    if args.docs:
        os.makedirs("docs", exist_ok=True)
        for name in FIGURES:
            shutil.copy(os.path.join(args.outdir, name), os.path.join("docs", name))
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--loss", choices=("dsm", "ct-elbo", "elbo"), default="dsm")
    parser.add_argument("--train-steps", type=int, default=20000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--train-grid", type=int, default=100, help="steps of the chain (elbo)")
    parser.add_argument("--eval-grid", type=int, default=200, help="steps of the chain evaluated")
    parser.add_argument("--num-train", type=int, default=5000)
    parser.add_argument("--num-test", type=int, default=500)
    parser.add_argument("--num-particles", type=int, default=8, help="ELBO draws per point")
    parser.add_argument("--num-samples", type=int, default=64, help="IW samples per point")
    parser.add_argument("--num-plot", type=int, default=2000)
    parser.add_argument("--ode-tol", type=float, default=1e-5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--outdir", default="outputs")
    parser.add_argument("--docs", action="store_true", help="copy the figures to docs/")
    parser.add_argument("--smoke", action="store_true", help="seconds, for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.train_steps, args.batch_size, args.width = 30, 128, 32
        args.train_grid, args.eval_grid = 10, 20
        args.num_train, args.num_test, args.num_samples, args.num_plot = 500, 20, 8, 200
        args.ode_tol = 1e-3
    return args


if __name__ == "__main__":
    main(parse_args())
