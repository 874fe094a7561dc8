"""Sampling a 9-mode Gaussian mixture with a learned Föllmer drift, and its log Z.

The target pi is the mixture of 9 Gaussians with means {-5, 0, 5}^2 and variance 0.3
(the path integral sampler's benchmark); log Z = 0. The sampler is a Pyro model (a
Brownian path from 0 on [0, 1] whose end observes pi through a factor) and a
DiffusionGuide whose drift is learned; the guide's terminal states are the samples,
its importance weights give log Z.

    python examples/sample_gmm.py                 # fit (minutes), print, write two PNGs
    python examples/sample_gmm.py --loss kl       # the reverse-KL loss instead
    python examples/sample_gmm.py --smoke         # a few steps, for the tests
"""

from __future__ import annotations

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402

from pyro_latdiff.sampling import FollmerSampler  # noqa: E402
from pyro_latdiff.testing import gmm9, mode_masses  # noqa: E402


def plot_samples(target, samples, masses, resampled_masses, losses, path):
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.4), gridspec_kw={"width_ratios": [1.1, 1, 1]})
    grid = torch.linspace(-8.5, 8.5, 300)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    density = target.log_prob(torch.stack([xx, yy], -1)).exp()
    ax = axes[0]
    ax.contourf(xx, yy, density, levels=20, cmap="Blues")
    ax.scatter(*samples[:2000].T, s=2, color="crimson", alpha=0.5, label="learned sampler")
    ax.set(title="samples over the target's density", xlim=(-8.5, 8.5), ylim=(-8.5, 8.5))
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=5, fontsize=8)
    ax = axes[1]
    ax.bar(torch.arange(9) - 0.2, masses, width=0.4, color="crimson", label="sampler")
    ax.bar(
        torch.arange(9) + 0.2,
        resampled_masses,
        width=0.4,
        color="darkorange",
        label="importance-resampled",
    )
    ax.axhline(1 / 9, color="k", lw=1, label="exact 1/9")
    ax.axhspan(1 / 9 - 0.03, 1 / 9 + 0.03, color="grey", alpha=0.2, label="±0.03")
    names = [f"({int(m[0])},{int(m[1])})" for m in target.means.tolist()]
    ax.set_xticks(range(9), names, rotation=45, fontsize=7)
    ax.set(title="mass of each mode (nearest mean)", ylim=(0, 0.25))
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.plot(losses, lw=0.6, color="slateblue")
    ax.set(title="training loss", xlabel="SVI step", yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_drift(sampler, target, path):
    """The learned drift at a few times, over the target's density, with the guide's
    states at that time."""
    num_steps = sampler.times.shape[0] - 1
    indices = [num_steps // 4, num_steps // 2, int(0.8 * num_steps), num_steps - 1]
    paths = sampler.sample_paths(600)
    fig, axes = plt.subplots(1, len(indices), figsize=(4 * len(indices), 4.2))
    fine = torch.linspace(-8, 8, 200)
    fx, fy = torch.meshgrid(fine, fine, indexing="xy")
    density = target.log_prob(torch.stack([fx, fy], -1)).exp()
    coarse = torch.linspace(-7.5, 7.5, 21)
    cx, cy = torch.meshgrid(coarse, coarse, indexing="xy")
    points = torch.stack([cx, cy], -1).reshape(-1, 2)
    for ax, k in zip(axes, indices, strict=True):
        drift = sampler.drift(k, points).float()
        norm = drift.norm(dim=-1, keepdim=True).clamp(min=1e-9)
        unit = (drift / norm).reshape(21, 21, 2)
        ax.contour(fx, fy, density, levels=6, colors="grey", linewidths=0.5)
        ax.scatter(*paths[:, k - 1].T, s=2, color="crimson", alpha=0.4, zorder=0)
        q = ax.quiver(
            cx,
            cy,
            unit[..., 0],
            unit[..., 1],
            norm.reshape(21, 21).log10(),
            cmap="viridis",
            scale=30,
            width=0.004,
        )
        ax.set(title=f"drift at t = {sampler.times[k].item():.2f}", xlim=(-8, 8), ylim=(-8, 8))
        ax.set_aspect("equal")
        fig.colorbar(q, ax=ax, fraction=0.046, pad=0.02, label="log10 |drift|")
    fig.suptitle(
        "learned drift: direction (arrows), magnitude (colour); red: the sampler's states X_t"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args):
    pyro.set_rng_seed(args.seed)
    pyro.clear_param_store()
    target = gmm9()
    sampler = FollmerSampler(
        target.log_prob,
        2,
        times=1 - (1 - torch.linspace(0, 1, args.num_steps + 1)) ** 2,
        sigma=args.sigma,
        loss=args.loss,
        noise_scale=args.noise_scale,
        base_drift=None if args.base_drift == "none" else args.base_drift,
        num_inner=args.num_inner,
    )
    start = time.perf_counter()
    losses = sampler.fit(
        args.svi_steps,
        num_particles=args.num_particles,
        lr=args.lr,
        final_lr=args.lr / 10,
        progress=not args.smoke,
    )
    seconds = time.perf_counter() - start
    training_evaluations = sampler.density.num_evaluations
    estimate = sampler.log_normalizer(args.num_samples)
    samples = sampler.sample(args.num_samples)
    masses = mode_masses(target, samples)
    resampled_masses = mode_masses(target, sampler.sample(args.num_samples, resample=True))
    result = dict(
        log_z=estimate.log_z,
        stderr=estimate.stderr,
        ess=estimate.ess,
        elbo=estimate.elbo,
        max_mass_error=float((masses - 1 / 9).abs().max()),
        max_mass_error_resampled=float((resampled_masses - 1 / 9).abs().max()),
        seconds=seconds,
        training_evaluations=training_evaluations,
    )
    print(
        f"log Z = {estimate.log_z:.4f} ± {estimate.stderr:.4f} (exact 0), "
        f"ESS {estimate.ess:.0f}/{args.num_samples}, ELBO {estimate.elbo:.4f}"
    )
    print("mode masses:", " ".join(f"{m:.3f}" for m in masses.tolist()))
    print("importance-resampled:", " ".join(f"{m:.3f}" for m in resampled_masses.tolist()))
    print(f"fit: {seconds:.0f} s, {training_evaluations} target evaluations")
    os.makedirs(args.outdir, exist_ok=True)
    plot_samples(
        target,
        samples,
        masses,
        resampled_masses,
        losses,
        os.path.join(args.outdir, "sample_gmm.png"),
    )
    plot_drift(sampler, target, os.path.join(args.outdir, "sample_gmm_drift.png"))
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loss", default="log_variance", choices=["kl", "log_variance"])
    parser.add_argument("--base-drift", default="none", choices=["none", "monte_carlo"])
    parser.add_argument("--num-inner", type=int, default=16, help="of the Monte Carlo drift")
    parser.add_argument("--svi-steps", type=int, default=1500)
    parser.add_argument("--num-steps", type=int, default=50, help="Euler steps on [0, 1]")
    parser.add_argument("--num-particles", type=int, default=64)
    parser.add_argument("--sigma", type=float, default=5.0)
    parser.add_argument("--noise-scale", type=float, default=1.1)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--num-samples", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--outdir", default="outputs")
    parser.add_argument("--smoke", action="store_true", help="a few steps, for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.svi_steps, args.num_steps, args.num_particles, args.num_samples = 3, 10, 8, 200
    return args


if __name__ == "__main__":
    main(parse_args())
