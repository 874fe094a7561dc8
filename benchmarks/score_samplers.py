"""Sample quality against the number of score evaluations, one curve per sampler.

Problems (exact score or conditional mean throughout, float64):

1. Gaussian data ``N(1, 0.5 I)``, ``d = 10``, OU forward process ``T = 4`` (Chen et al.
   2023): the exact ``KL(data || sampler)`` of each sampler's Gaussian output law
   (reverse-SDE Euler, exponential integrator, probability-flow ODE with Heun and RK4
   steps, CLD exponential integrator with ``T = 6``). The laws of the SDE samplers come
   from :mod:`pyro_latdiff.testing` (affine recursions); the ODE solvers' own discrete
   laws from running the solver on two starting points (the flow of an affine score is
   affine).
2. X uniform on ``{+-1}`` on the channel ``Y_t = t X + W_t``, ``t_max = 4`` (Reeves &
   Pfister 2025): the exact path KL of the denoiser sampler, plain and
   covariance-matched, on uniform grids and on the grid that equalises the
   discretisation terms of the I-MMSE identity.
3. The 2-D mixture of ``examples/score_2d.py`` (8 components on a circle of radius 1.5,
   sd 0.3), OU ``T = 3``: MMD^2 to true samples (Gaussian kernels, bandwidths 0.5, 1, 2
   times the median distance); the noise floor is twice the spread of MMD^2 between two
   sets of true samples. With the exact score, and with a
   :class:`~pyro_latdiff.score.ScoreModel` trained here by likelihood-weighted denoising
   score matching as the example does, shorter (``--train-steps``, width 64); early
   stopping at ``t = 1e-3``. Table 4: the terms of Chen et al.'s bound
   (:func:`~pyro_latdiff.score.bounds.chen_bound`) for both. Table 5: Reeves & Pfister's
   sampler on the same problem, driven by the same scores through
   :class:`~pyro_latdiff.score.samplers.ScoreDenoiser` (channel up to the
   signal-to-noise ratio at ``t = 1e-3``), on a uniform grid and on the grid that
   equalises ``Delta_n`` of each model's own held-out MMSE curve; Table 6: that
   ``Delta_n``.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/score_samplers.py [--outdir outputs] [--smoke]
"""

from __future__ import annotations

import argparse
import functools
import math
import os

import torch

from pyro_latdiff.score import CriticallyDampedLangevin, OrnsteinUhlenbeck
from pyro_latdiff.score.bounds import chen_bound, denoiser_discretisation, mmse_curve
from pyro_latdiff.score.samplers import (
    ScoreDenoiser,
    denoiser_sampler,
    equalised_times,
    exponential_integrator,
    probability_flow_ode,
    reverse_sde_euler,
)
from pyro_latdiff.testing import (
    GaussianMixture,
    binary_mmse,
    binary_path_kl,
    gaussian_cld_law,
    gaussian_kl,
    gaussian_sampler_law,
    gaussian_score,
)

SDE_SAMPLERS = {"euler": "reverse_sde_euler", "exponential": "exponential_integrator"}
ODE_METHODS = {"ode-heun": ("heun2", 2), "ode-rk4": ("rk4", 4)}
T_MIN = 1e-3  # early stopping on the mixture (the trained model's truncation)


def gaussian_rows(steps, d=10):
    """Problem 1: exact KL against score evaluations."""
    mean, var = torch.ones(d), torch.full((d,), 0.5)
    process = OrnsteinUhlenbeck(4.0)
    score = gaussian_score(process, mean, var)
    cld = CriticallyDampedLangevin(horizon=6.0)
    rows = []
    for n in steps:
        times = torch.linspace(0, 4, n + 1)
        for name, law in SDE_SAMPLERS.items():
            loc, cov = gaussian_sampler_law(law, process, mean, var, times)
            rows.append((name, n, n, gaussian_kl(mean, var, loc, cov).item()))
        for name, (method, per_step) in ODE_METHODS.items():
            start = torch.stack([torch.zeros(d), torch.ones(d)])
            out = probability_flow_ode(
                score, process, 2, n, state_dim=d, x_init=start, method=method
            ).samples
            shift, gain = out[0], out[1] - out[0]  # output = gain * x + shift, x ~ N(0, I)
            rows.append((name, n, n * per_step, gaussian_kl(mean, var, shift, gain**2).item()))
        loc, cov = gaussian_cld_law(cld, mean, var, torch.linspace(0, 6, n + 1))
        rows.append(("cld", n, n, gaussian_kl(mean, var, loc[:, 0], cov[:, 0, 0]).item()))
    return rows


def binary_rows(steps):
    """Problem 2: exact path KL of the denoiser sampler, both variants, two grids."""
    curve_times = torch.linspace(0, 4, 4001, dtype=torch.float64)
    mmse = binary_mmse(curve_times)
    rows = []
    for n in steps:
        grids = {"uniform": torch.linspace(0, 4, n + 1, dtype=torch.float64)}
        grids["equalised"] = equalised_times(curve_times, mmse, n)
        for grid_name, times in grids.items():
            for matched in (False, True):
                name = ("matched" if matched else "plain") + f"-{grid_name}"
                kl = binary_path_kl(times, covariance_matched=matched).item()
                rows.append((name, n, n, kl))
        delta = denoiser_discretisation(curve_times, mmse, n).delta
        rows.append(("Delta_n (identity)", n, n, delta))
    return rows


def mmd(x, y):
    """Unbiased squared MMD, sum of Gaussian kernels at 0.5, 1, 2 x the median distance."""
    xy = torch.cat([x, y])
    dist2 = torch.cdist(xy, xy).square()
    median = dist2[dist2 > 0].median()
    kernel = sum(torch.exp(-dist2 / (2 * c**2 * median)) for c in (0.5, 1.0, 2.0))
    n, m = x.shape[0], y.shape[0]
    kxx, kyy, kxy = kernel[:n, :n], kernel[n:, n:], kernel[:n, n:]
    return (
        (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        - 2 * kxy.mean()
    ).item()


def mixture(num_components: int = 8, radius: float = 1.5, scale: float = 0.3):
    """The ring mixture of ``examples/score_2d.py``."""
    angles = torch.arange(num_components) * 2 * math.pi / num_components
    means = radius * torch.stack([angles.cos(), angles.sin()], -1)
    return GaussianMixture(means, scale)


def train_score(q, process, train_steps, num_data=5000):
    """A :class:`~pyro_latdiff.score.ScoreModel` (default network, hidden (64, 64))
    trained by likelihood-weighted denoising score matching with the library's ``fit``,
    as ``examples/score_2d.py`` does; returns the network."""
    import pyro

    from pyro_latdiff import fit
    from pyro_latdiff.score import DenoisingScoreMatching, ScoreModel

    pyro.clear_param_store()
    sm = ScoreModel(process, 2, subsample_size=512, hidden_dims=(64, 64))
    loss = DenoisingScoreMatching(sm, truncation=T_MIN)
    optim = pyro.optim.ClippedAdam({"lr": 2e-3, "lrd": 0.1 ** (1 / train_steps), "clip_norm": 10.0})
    data = q.sample(num_data)
    fit(sm.model, sm.guide, data, num_steps=train_steps, loss=loss, optim=optim, progress=False)
    return sm.score


def mixture_rows(steps, num_samples, train_steps):
    """Problem 3: MMD to true samples with the exact and a trained score, and the bound
    diagnostics of the exponential integrator at each step count."""
    q = mixture()
    process = OrnsteinUhlenbeck(3.0)
    scores = {"exact": q.score(process)}
    if train_steps:
        scores["trained"] = train_score(q, process, train_steps)
    rows, bounds = [], []
    # noise floor: twice the spread of MMD^2 between independent sets of true samples
    null = torch.tensor([mmd(q.sample(num_samples), q.sample(num_samples)) for _ in range(5)])
    floor = 2 * null.std().item()
    samplers = {"euler": reverse_sde_euler, "exponential": exponential_integrator}
    samplers.update(
        {
            name: functools.partial(probability_flow_ode, method=method)
            for name, (method, _) in ODE_METHODS.items()
        }
    )
    with torch.no_grad():
        for n in steps:
            truth = q.sample(num_samples)
            for score_name, score in scores.items():
                for name, sampler in samplers.items():
                    result = sampler(score, process, num_samples, n, state_dim=2, t_min=T_MIN)
                    value = mmd(result.samples, truth)
                    rows.append((f"{name} ({score_name})", n, result.num_evaluations, value))
                held_out = q.sample(min(num_samples, 1000))
                bound = chen_bound(
                    score, process, held_out, n, t_min=T_MIN, true_score=scores["exact"]
                )
                bounds.append((score_name, n, bound))
    return rows, floor, bounds, scores, q, process


def denoiser_rows(q, process, scores, steps, num_samples):
    """Problem 3 with Reeves & Pfister's sampler, driven through
    :class:`~pyro_latdiff.score.samplers.ScoreDenoiser` by the same scores: uniform and
    equalised grids, the latter from each model's own held-out MMSE curve, whose
    ``Delta_n`` (:func:`~pyro_latdiff.score.bounds.denoiser_discretisation`) is the
    predicted path KL of the plain sampler."""
    rows, deltas = [], []
    for score_name, score in scores.items():
        denoiser = ScoreDenoiser(score, process, t_min=T_MIN)
        horizon = denoiser.channel.horizon
        curve_times = torch.cat([torch.zeros(1), torch.logspace(-4, math.log10(horizon), 400)])
        curve = mmse_curve(denoiser, q.sample(min(num_samples, 1000)), curve_times)
        for n in steps:
            truth = q.sample(num_samples)
            diagnostic = denoiser_discretisation(curve_times, curve, n)
            deltas.append((score_name, n, diagnostic.delta, diagnostic.equalised_delta))
            grids = {"uniform": "uniform", "equalised": diagnostic.equalised_times}
            for label, covariance, grid in (
                ("plain-uniform", None, "uniform"),
                ("plain-equalised", None, "equalised"),
                ("matched-equalised", "jacobian", "equalised"),
            ):
                result = denoiser_sampler(
                    denoiser,
                    denoiser.channel,
                    num_samples,
                    n,
                    state_dim=2,
                    schedule=grids[grid],
                    covariance=covariance,
                )
                value = mmd(result.samples.detach(), truth)
                rows.append((f"{label} ({score_name})", n, result.num_evaluations, value))
    return rows, deltas


def print_table(title, rows, value_name):
    """One row per step count, one column per sampler: ``value (score evaluations)``."""
    names = list(dict.fromkeys(r[0] for r in rows))
    cells = {(name, n): (nfe, value) for name, n, nfe, value in rows}
    print(f"{title}; cells: {value_name} (score evaluations)")
    print("| steps | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for n in dict.fromkeys(r[1] for r in rows):
        line = [f"{cells[(name, n)][1]:.3g} ({cells[(name, n)][0]})" for name in names]
        print(f"| {n} | " + " | ".join(line) + " |")
    print()


def plot(panels, outdir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, (title, ylabel, rows, floor) in zip(axes[0], panels, strict=True):
        for name in dict.fromkeys(r[0] for r in rows):
            pts = [(nfe, v) for r_name, _, nfe, v in rows if r_name == name and v > 0]
            if pts:
                ax.loglog(*zip(*pts, strict=True), marker="o", ms=3, label=name)
        if floor is not None:
            ax.axhline(floor, color="gray", ls=":", label="noise floor")
        ax.set_xlabel("score evaluations")
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, "score_samplers.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(args):
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(args.seed)
    if args.smoke:
        steps, binary_steps, num_samples = (5, 20), (4, 8), 300
        train_steps = 20
    else:
        steps, binary_steps, num_samples = (5, 10, 20, 40, 80, 160), (4, 8, 16, 32, 64), 2000
        train_steps = args.train_steps
    gaussian = gaussian_rows(steps)
    print_table(
        "Table 1. Gaussian data, d = 10, OU T = 4: exact KL(data || sampler)", gaussian, "KL"
    )
    binary = binary_rows(binary_steps)
    print_table("Table 2. X uniform on {+-1}, t_max = 4: exact path KL", binary, "path KL")
    mix, floor, bounds, scores, q, process = mixture_rows(steps, num_samples, train_steps)
    print_table(
        f"Table 3. 2-D ring mixture, OU T = 3, {num_samples} samples: MMD^2 to true samples "
        f"(noise floor {floor:.2g})",
        mix,
        "MMD^2",
    )
    print("Table 4. Chen et al. bound terms for the exponential integrator on the mixture (KL)")
    print(
        "| score | steps | forward | discretisation | score error (est.) | score error "
        "(true) | score error (upper) | bound KL | bound TV | bound KL (upper) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for score_name, n, b in bounds:
        print(
            f"| {score_name} | {n} | {b.forward:.3g} | {b.discretisation:.3g} | "
            f"{b.score_error:.2g} +- {b.score_error_se:.1g} | {b.score_error_reference:.2g} | "
            f"{b.score_error_upper:.3g} | "
            f"{b.bound:.3g} | {b.tv:.3g} | {b.bound_upper:.3g} |"
        )
    print()
    denoised, deltas = denoiser_rows(q, process, scores, steps, num_samples)
    print_table(
        "Table 5. The ring mixture with Reeves & Pfister's sampler (ScoreDenoiser, channel "
        f"to snr {float(ScoreDenoiser(scores['exact'], process, T_MIN).channel.horizon):.0f}): "
        "MMD^2 to true samples",
        denoised,
        "MMD^2",
    )
    print("Table 6. Delta_n from each model's held-out MMSE curve (predicted path KL)")
    print("| score | steps | Delta_n uniform | Delta_n equalised |")
    print("|---|---|---|---|")
    for score_name, n, uniform, equal in deltas:
        print(f"| {score_name} | {n} | {uniform:.3g} | {equal:.3g} |")
    print()
    path = plot(
        [
            ("Gaussian d=10, OU T=4", "KL(data || sampler)", gaussian, None),
            ("X = +-1, t_max = 4 (denoiser sampler)", "path KL", binary, None),
            ("2-D ring mixture, OU T=3", "MMD^2 to data", mix, floor),
            ("ring mixture, denoiser sampler", "MMD^2 to data", denoised, floor),
        ],
        args.outdir,
    )
    print(f"plot: {path}")
    return {
        "gaussian": gaussian,
        "binary": binary,
        "mixture": mix,
        "floor": floor,
        "bounds": bounds,
        "denoiser": denoised,
        "deltas": deltas,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", default="outputs", help="where the PNG plot goes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--train-steps", type=int, default=4000, help="SVI steps of the mixture's score model"
    )
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
