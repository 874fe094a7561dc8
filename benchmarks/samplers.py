"""Samplers of unnormalised targets: learned Föllmer sampler (reverse KL and log-variance
losses) against the training-free Monte Carlo Föllmer sampler and plain importance
sampling from N(0, sigma^2 I), at equal budgets of target evaluations.

For each target and seed: |Δ log Z| of the importance-weighted estimate and of the
ELBO, the ESS, mode coverage and the largest deviation of a mode's mass from the equal
share (mixtures), an MMD (RBF kernel, median bandwidth) to exact target samples, wall
time and target evaluations. Published |Δ log Z| (Sendera et al. 2024, Table 1) are
printed beside ours.

    OMP_NUM_THREADS=1 python benchmarks/samplers.py --targets gmm9 --seeds 5
    OMP_NUM_THREADS=1 python benchmarks/samplers.py --smoke
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import pyro
import torch

from pyro_latdiff.sampling import (
    FollmerSampler,
    LogNormalizerEstimate,
    MonteCarloFollmerSampler,
    ReplayBuffer,
    gaussian_importance_sampling,
)
from pyro_latdiff.testing import (
    FunnelTarget,
    GaussianMixtureTarget,
    GaussianTarget,
    ManyWellTarget,
    gmm9,
    gmm25,
    mode_coverage,
    mode_masses,
)

# Sendera et al. (2024), Table 1: |Δ log Z| of the importance-weighted estimate.
PUBLISHED = {
    "gmm25": "DDS 0.746, PIS 1.274, best 0.004",
    "funnel": "DDS 0.206, PIS 0.262, best 0.051",
    "manywell": "DDS 0.23, PIS 2.69, best 0.02",
}

# Per target: the reference's sigma (about the target's spread) and the training length.
CONFIG = {
    "gmm9": dict(make=lambda dtype: gmm9(dtype), sigma=5.0),
    "gmm25": dict(make=lambda dtype: gmm25(dtype), sigma=8.0),
    "funnel": dict(make=lambda dtype: FunnelTarget(10, dtype), sigma=1.0),
    "manywell": dict(make=lambda dtype: ManyWellTarget(32, dtype), sigma=1.0),
}


def mmd(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased squared MMD with an RBF kernel of median bandwidth (of the pooled
    distances); ``x`` and ``y`` are ``(n, d)``."""
    pooled = torch.cat([x, y])
    distances = torch.cdist(pooled, pooled).square()
    bandwidth = distances.median().clamp(min=1e-12)
    kernel = torch.exp(-distances / bandwidth)
    n = x.shape[0]
    kxx, kyy, kxy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    m = y.shape[0]
    term_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    term_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(term_x + term_y - 2 * kxy.mean())


def describe(target, samples, exact, estimate, seconds, evaluations):
    row = dict(
        dlogz=abs(estimate.log_z - target.log_normalizer),
        # Signed, with the estimate's own standard error: a low ESS shows here.
        logz_error=estimate.log_z - target.log_normalizer,
        logz_stderr=estimate.stderr,
        delbo=abs(estimate.elbo - target.log_normalizer),
        ess=estimate.ess / estimate.num_samples,
        mmd=mmd(samples[: exact.shape[0]], exact),
        seconds=seconds,
        evaluations=evaluations,
    )
    if isinstance(target, GaussianMixtureTarget):
        masses = mode_masses(target, samples)
        row["coverage"] = mode_coverage(masses)
        row["max_mass_error"] = float((masses - 1 / target.num_modes).abs().max())
    return row


#: Regions where a sampler loses mass, per target: a mask of draws ``(n,)``, or of
#: draws and coordinates ``(n, m)`` (averaged over the coordinates). The funnel's neck
#: and mouth, x_0 < -3 and x_0 > 3 (x_0 ~ N(0, 3^2): 0.1587 each); ManyWell's minor
#: wells, x_1 < 0 in each double well (``ManyWellTarget.minor_well_mass``).
REGIONS = {
    "funnel": {"neck": lambda x: x[:, 0] < -3.0, "mouth": lambda x: x[:, 0] > 3.0},
    "manywell": {"minor": lambda x: x[:, 0::2] < 0.0},
}
FUNNEL_REGION_MASS = 0.5 * math.erfc(1 / math.sqrt(2))


def region_mass(name, target):
    """The exact mass of each of the target's regions."""
    if name == "funnel":
        return {"neck": FUNNEL_REGION_MASS, "mouth": FUNNEL_REGION_MASS}
    return {"minor": target.minor_well_mass}


def _share(mask, weights=None):
    mask = mask.double().reshape(mask.shape[0], -1)
    if weights is not None:
        mask = mask * weights.double()[:, None]
    return float(mask.mean())


def region_shares(name, sampler, num_samples):
    """The guide's share of draws in each of the target's regions (see ``REGIONS``)."""
    states = sampler.sample(num_samples)
    return {region: _share(inside(states)) for region, inside in REGIONS[name].items()}


def regions(name, sampler, target, num_samples):
    """The guide's share of draws in each region and the mass its importance weights
    give each (exact: ``region_mass``): where the weights' log Z loses mass. The draws
    are their own, not those of the log Z estimate."""
    states, log_weights = sampler.sample_with_log_weights(num_samples)
    weights = (log_weights - target.log_normalizer).exp()
    row = {}
    for region, inside in REGIONS[name].items():
        mask = inside(states)
        row[f"{region}_guide"] = _share(mask)
        row[f"{region}_iw"] = _share(mask, weights)
    return row


def run_learned(name, target, loss, seed, args):
    pyro.set_rng_seed(seed)
    pyro.clear_param_store()
    config = CONFIG[name]
    times = 1 - (1 - torch.linspace(0, 1, args.num_steps + 1, dtype=args.dtype)) ** 2
    replay = False
    if loss == "log_variance+replay":
        # Off-policy: the reference's bridge paths to states of a replay buffer.
        loss = "log_variance"
        replay = ReplayBuffer(
            target.log_prob,
            target.dim,
            times,
            config["sigma"],
            priority=args.replay_priority,
            local_search_every=args.local_search_every,
            dtype=args.dtype,
        )
    sampler = FollmerSampler(
        target.log_prob,
        target.dim,
        times=times,
        sigma=config["sigma"],
        loss=loss,
        noise_scale=args.noise_scale,
        replay=replay,
        hidden_dims=args.hidden_dims,
        dtype=args.dtype,
    )
    pause = {"seconds": 0.0}

    def track(step, loss):
        # The regions' shares during training (``--track-every``), not timed.
        if name in REGIONS and args.track_every and (step + 1) % args.track_every == 0:
            begin = time.perf_counter()
            shares = region_shares(name, sampler, args.track_samples)
            pause["seconds"] += time.perf_counter() - begin
            print(f"  step {step + 1} loss {loss:.4g} shares", shares, flush=True)

    start = time.perf_counter()
    sampler.fit(
        args.fit_steps,
        num_particles=args.particles,
        lr=args.lr,
        final_lr=args.lr / 10,
        gain_lr=args.gain_lr_multiplier * args.lr,
        callback=track,
    )
    seconds = time.perf_counter() - start - pause["seconds"]
    evaluations = sampler.density.num_evaluations
    estimate = sampler.log_normalizer(args.eval_samples)
    samples = sampler.sample(max(args.mmd_samples, args.mass_samples))
    return sampler, estimate, samples, seconds, evaluations


def run_training_free(name, target, budget, args):
    config = CONFIG[name]
    per_path = args.num_steps * args.num_inner + 1
    num_paths = max(2, min(args.max_baseline_paths, budget // per_path))
    sampler = MonteCarloFollmerSampler(
        target.log_prob,
        target.dim,
        num_steps=args.num_steps,
        num_inner=args.num_inner,
        sigma=config["sigma"],
        dtype=args.dtype,
    )
    start = time.perf_counter()
    samples, log_weights = sampler.sample_with_log_weights(num_paths)
    seconds = time.perf_counter() - start
    estimate = LogNormalizerEstimate.from_log_weights(log_weights, sampler.density.num_evaluations)
    return estimate, samples, seconds, sampler.density.num_evaluations


def run_importance(name, target, budget, args):
    start = time.perf_counter()
    chunks, proposals = [], None
    remaining = budget
    while remaining > 0:
        size = min(remaining, 1_000_000)
        estimate, x = gaussian_importance_sampling(
            target.log_prob, target.dim, size, scale=CONFIG[name]["sigma"], dtype=args.dtype
        )
        chunks.append(estimate.log_weights)
        proposals = x if proposals is None else proposals
        remaining -= size
    estimate = LogNormalizerEstimate.from_log_weights(torch.cat(chunks), budget)
    # Samples for the MMD and mode masses: resampled by weight from the first chunk.
    weights = torch.softmax(chunks[0], 0)
    index = torch.multinomial(weights, max(args.mmd_samples, args.mass_samples), replacement=True)
    return estimate, proposals[index], time.perf_counter() - start, budget


def summarise(rows, key):
    values = [r[key] for r in rows if key in r]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3g}"
    return f"{statistics.mean(values):.3g} ± {statistics.stdev(values):.2g}"


def bias_vs_k(args):
    """The training-free sampler's bias as the number K of inner samples grows: X_1
    moments on N(1, 1.5^2 I) in 2-D (exact mean 1, variance 2.25) and the largest
    mode-mass error on the 9-mode mixture (sigma = 5), at a fixed number of paths."""
    gaussian = GaussianTarget(2, 1.0, 1.5, args.dtype)
    mixture = gmm9(args.dtype)
    n = args.bias_paths
    print(f"\n| estimator | K | mean - 1 | variance - 2.25 | gmm9 max mass error | (n = {n})")
    print("|---|---|---|---|---|")
    for estimator in ("gradient", "stein"):
        for k in args.bias_k:
            torch.manual_seed(0)
            x = MonteCarloFollmerSampler(
                gaussian.log_prob,
                2,
                num_steps=args.num_steps,
                num_inner=k,
                estimator=estimator,
                dtype=args.dtype,
            ).sample(n)
            y = MonteCarloFollmerSampler(
                mixture.log_prob,
                2,
                num_steps=args.num_steps,
                num_inner=k,
                estimator=estimator,
                sigma=5.0,
                dtype=args.dtype,
            ).sample(n)
            masses = mode_masses(mixture, y)
            print(
                f"| {estimator} | {k} | {float(x.mean(0).mean()) - 1:+.3f} "
                f"(se {1.5 / math.sqrt(2 * n):.3f}) | {float(x.var(0).mean()) - 2.25:+.3f} "
                f"(se {2.25 * math.sqrt(1 / (n - 1)):.3f}) | "
                f"{float((masses - 1 / 9).abs().max()):.3f} "
                f"(se {math.sqrt(8 / 81 / n):.3f}) |",
                flush=True,
            )


def main(args):
    if args.bias_vs_k:
        return bias_vs_k(args)
    results, targets = {}, {}
    for name in args.targets:
        target = targets[name] = CONFIG[name]["make"](args.dtype)
        exact = target.sample(args.mmd_samples, generator=torch.Generator().manual_seed(123))
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            budget = None
            for loss in args.losses:
                sampler, estimate, samples, seconds, evaluations = run_learned(
                    name, target, loss, seed, args
                )
                budget = evaluations if budget is None else max(budget, evaluations)
                row = describe(target, samples, exact, estimate, seconds, evaluations)
                if name in REGIONS:
                    row.update(regions(name, sampler, target, args.eval_samples))
                results.setdefault((name, f"learned {loss}"), []).append(row)
                print(name, seed, loss, {k: round(v, 4) for k, v in row.items()}, flush=True)
            if args.no_baselines:
                continue
            torch.manual_seed(seed)
            estimate, samples, seconds, evaluations = run_training_free(name, target, budget, args)
            row = describe(target, samples, exact, estimate, seconds, evaluations)
            results.setdefault((name, f"MC Föllmer K={args.num_inner}"), []).append(row)
            print(name, seed, "mc", {k: round(v, 4) for k, v in row.items()}, flush=True)
            torch.manual_seed(seed)
            estimate, samples, seconds, evaluations = run_importance(name, target, budget, args)
            row = describe(target, samples, exact, estimate, seconds, evaluations)
            results.setdefault((name, "IS N(0, sigma^2 I)"), []).append(row)
            print(name, seed, "is", {k: round(v, 4) for k, v in row.items()}, flush=True)
    keys = ["dlogz", "delbo", "ess", "coverage", "max_mass_error", "mmd", "seconds", "evaluations"]
    for name in args.targets:
        keys += [f"{region}_{kind}" for region in REGIONS.get(name, ()) for kind in ("guide", "iw")]
    header = "| target | sampler | " + " | ".join(keys) + " | published |Δ log Z| |"
    print()
    print(header)
    print("|" + "---|" * (len(keys) + 3))
    for (name, method), rows in results.items():
        cells = " | ".join(summarise(rows, k) for k in keys)
        published = PUBLISHED.get(name, "-") if method.startswith("learned") else ""
        print(f"| {name} | {method} | {cells} | {published} |")
    for name in args.targets:
        if name in REGIONS:
            exact = region_mass(name, targets[name])
            print(
                f"\n{name}: exact mass of each region", {k: round(v, 4) for k, v in exact.items()}
            )
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", default=["gmm9"], choices=sorted(CONFIG))
    parser.add_argument(
        "--losses",
        nargs="+",
        default=["kl", "log_variance"],
        choices=["kl", "log_variance", "log_variance+replay"],
        help="log_variance+replay: also the bridge paths to a ReplayBuffer's states",
    )
    parser.add_argument("--hidden-dims", type=int, nargs="+", default=[64, 64])
    parser.add_argument("--replay-priority", default="uniform", choices=["uniform", "rank"])
    parser.add_argument("--local-search-every", type=int, default=10)
    parser.add_argument(
        "--no-baselines", action="store_true", help="the learned samplers only (no MC, no IS)"
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed, ...")
    parser.add_argument("--sigma", type=float, help="the reference's noise, for every target")
    parser.add_argument("--fit-steps", type=int, default=1500)
    parser.add_argument("--num-steps", type=int, default=50, help="Euler steps on [0, 1]")
    parser.add_argument("--particles", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument(
        "--gain-lr-multiplier", type=float, default=10.0, help="target-aware gains' lr / lr"
    )
    parser.add_argument("--noise-scale", type=float, default=1.1)
    parser.add_argument("--num-inner", type=int, default=64)
    parser.add_argument("--eval-samples", type=int, default=4000)
    parser.add_argument("--mmd-samples", type=int, default=1000)
    parser.add_argument("--mass-samples", type=int, default=10000, help="draws for the mode masses")
    parser.add_argument("--max-baseline-paths", type=int, default=4000)
    parser.add_argument(
        "--track-every", type=int, default=0, help="print the regions' shares every K fit steps"
    )
    parser.add_argument("--track-samples", type=int, default=2000)
    parser.add_argument("--float64", action="store_true")
    parser.add_argument("--bias-vs-k", action="store_true", help="the training-free bias table")
    parser.add_argument("--bias-k", type=int, nargs="+", default=[4, 16, 64, 256])
    parser.add_argument("--bias-paths", type=int, default=2000)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    args = parser.parse_args(argv)
    args.dtype = torch.float64 if args.float64 else torch.float32
    if args.sigma is not None:
        for config in CONFIG.values():
            config["sigma"] = args.sigma
    if args.smoke:
        args.seeds, args.fit_steps, args.num_steps, args.particles = 1, 2, 5, 8
        args.eval_samples, args.mmd_samples, args.num_inner = 50, 50, 4
        args.mass_samples = 50
        args.max_baseline_paths = 50
        args.track_every, args.track_samples = 1, 20
        args.bias_k, args.bias_paths = [4], 20
    return args


if __name__ == "__main__":
    main(parse_args())
