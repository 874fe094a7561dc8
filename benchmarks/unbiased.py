"""MSE against cost: unbiased random-depth estimators against plain Euler.

Problem: the Beneš SDE ``dX = a tanh(a X) dt + dW``, ``X_0 = 0.5``, ``T = 1``,
``g = cos`` (``a = 1`` is the classical one). Since ``b' + b^2 = a^2`` is constant,
its transition density is known in closed form,
``p_T(x | x0) = cosh(a x) / cosh(a x0) e^{-a^2 T / 2} N(x; x0, T)``, which gives
``E cos X_T = (e^{a x0} cos(x0 + aT) + e^{-a x0} cos(x0 - aT)) e^{-T/2} / (2 cosh(a x0))``
(:mod:`pyro_latdiff.testing.benes`; the OU of Table 3 is :mod:`pyro_latdiff.testing.ou`).
The drift's Lipschitz constant is ``a^2``: ``a`` sets how hard the problem is.

Cost is counted in drift evaluations (one per sample per Euler step; the
parametrix's extra evaluation of ``g`` is not counted). For each estimator one run
measures the per-sample variance ``v`` and the mean cost ``c``; for Euler with
``n`` steps the bias is computed *exactly* for the Euler chain by propagating its
transition density on a fine grid (``pyro_latdiff.testing.euler_grid_density``; checked
against the Monte Carlo run, column ``z``). At a budget of ``B`` drift evaluations the
mean squared error is

- unbiased estimators: ``v c / B``;
- Euler with ``n`` steps (``B / n`` paths): ``bias_n^2 + v_n n / B``.

Table 1 (``a = 1``) gives these at a few budgets; ``MSE@1e4 emp.`` checks the
formula by cutting the run into consecutive batches of ``10^4`` drift evaluations.
Table 2 gives MSE(best Euler over the step counts) / MSE(method) against the budget
(> 1: the method wins), for ``a = 1`` and for harder drifts; Euler step counts
beyond the largest measured one use its bias extrapolated as ``1 / steps``
(first-order weak error), so the best Euler keeps improving with the budget. Table 3 scans the
inter-arrival law of the parametrix: variance, mean depth, their product (the
work-normalised variance) and the kurtosis (a tail indicator: large values make
the reported standard error itself unreliable).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/unbiased.py [--outdir outputs] [--smoke]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch

from pyro_latdiff.testing import (
    benes_drift,
    benes_expectation_cos,
    euler_grid_density,
    ou_drift,
    ou_expectation_cos,
)
from pyro_latdiff.unbiased import (
    ExponentialArrivals,
    PowerArrivals,
    euler_expectation,
    expectation,
    rmlmc_expectation,
)

X0, T = 0.5, 1.0
TABLE_BUDGETS = (1e4, 1e6, 1e8)
RATIO_BUDGETS = tuple(10.0**k for k in range(2, 10))
EMPIRICAL_BUDGET = 1e4


def cos(x):
    return torch.cos(x[..., 0])


def benes_cos_exact(a: float, x0: float = X0, t: float = T) -> float:
    """``E cos X_T`` for the Beneš SDE of scale ``a``, in closed form."""
    return benes_expectation_cos(x0, t, a=a)


def euler_exact_moments(a: float, num_steps: int, dx: float) -> tuple[float, float]:
    """Mean and variance of ``cos(X_T)`` for the Beneš Euler chain, by propagating the
    chain's density on a grid (:func:`~pyro_latdiff.testing.euler_grid_density`)."""
    grid = torch.arange(X0 - 9.0 - a * T, X0 + a * T + 9.0, dx, dtype=torch.float64)
    times = torch.linspace(0.0, T, num_steps + 1, dtype=torch.float64)
    density = euler_grid_density(benes_drift(a), 1.0, X0, times, grid, time_homogeneous=True)
    mass = density.sum()
    mean = (density * torch.cos(grid)).sum() / mass
    second = (density * torch.cos(grid) ** 2).sum() / mass
    return float(mean), float(second - mean**2)


def empirical_mse(values: torch.Tensor, costs: torch.Tensor, exact: float, budget: float):
    """Mean squared error of consecutive batches of ``budget`` drift evaluations each."""
    cumulative = torch.cumsum(costs.double(), 0)
    batch = torch.div(cumulative - 1, budget, rounding_mode="floor").long()
    num = int(batch[-1])  # drop the last (incomplete) batch
    if num < 2:
        return float("nan")
    keep = batch < num
    sums = torch.zeros(num, dtype=torch.float64).index_add_(0, batch[keep], values[keep])
    counts = torch.zeros(num, dtype=torch.float64).index_add_(
        0, batch[keep], torch.ones_like(values[keep])
    )
    # a sample dearer than the budget (a deep RMLMC level) leaves empty batches behind
    full = counts > 0
    return float(((sums[full] / counts[full] - exact) ** 2).mean())


UNBIASED = [
    ("parametrix exp(1) [default]", expectation, {}),
    ("parametrix exp(2)", expectation, dict(arrivals=ExponentialArrivals(2.0))),
    ("parametrix power(0.5, 2)", expectation, dict(arrivals=PowerArrivals(0.5, 2.0))),
    ("parametrix exp(1) no antithetic", expectation, dict(antithetic=False)),
    ("rmlmc coupled-sum", rmlmc_expectation, dict(estimator="coupled")),
    ("rmlmc single-term", rmlmc_expectation, dict(estimator="single")),
]


def run_methods(a: float, num_samples: int, euler_steps, dx: float, methods=UNBIASED):
    """Measure cost, variance and bias of every method on the Beneš problem ``a``."""
    exact = benes_cos_exact(a)
    drift = benes_drift(a)
    x0 = torch.tensor([X0], dtype=torch.float64)
    rows = []
    for name, method, kwargs in methods:
        result = method(cos, drift, x0, T, num_samples=num_samples, **kwargs)
        rows.append(
            dict(
                name=name,
                cost=result.mean_cost,
                variance=float(result.variance),
                bias=0.0,
                z=float((result.estimate - exact) / result.stderr),
                empirical=empirical_mse(result.values, result.costs, exact, EMPIRICAL_BUDGET),
            )
        )
    for n in euler_steps:
        result = euler_expectation(cos, drift, x0, T, num_samples=num_samples, num_steps=n)
        mean, variance = euler_exact_moments(a, n, dx)
        rows.append(
            dict(
                name=f"euler {n} steps",
                cost=float(n),
                variance=variance,
                bias=mean - exact,
                # the Monte Carlo run against the grid value: checks both
                z=float((result.estimate - mean) / result.stderr),
                empirical=empirical_mse(result.values, result.costs, exact, EMPIRICAL_BUDGET),
            )
        )
    return exact, rows


def mse(row, budget: float) -> float:
    return row["bias"] ** 2 + row["variance"] * row["cost"] / budget


def best_euler(rows, budget: float):
    """The smallest Euler MSE over step counts at this budget: the measured step
    counts, and beyond the finest one ``n_max`` the first-order weak-error
    extrapolation ``bias_n = bias_{n_max} n_max / n`` for ``n = 2 n_max, ...,
    2**20`` (variance that of ``n_max``)."""
    euler = [r for r in rows if r["name"].startswith("euler")]
    finest = max(euler, key=lambda r: r["cost"])
    n_max = int(finest["cost"])
    extrapolated = [
        dict(
            name=f"euler {n} steps",
            cost=float(n),
            variance=finest["variance"],
            bias=finest["bias"] * n_max / n,
        )
        for n in (2**k for k in range(1, 21))
        if n > n_max
    ]
    row = min(euler + extrapolated, key=lambda r: mse(r, budget))
    return mse(row, budget), int(row["name"].split()[1])


def rate_scan(num_samples: int, laws):
    problems = [
        ("benes a=1", benes_drift(1.0), X0, benes_cos_exact(1.0)),
        ("ou", ou_drift(1.0), 1.0, ou_expectation_cos(1.0, T, rate=1.0)),
    ]
    out = []
    for problem, drift, x0, exact in problems:
        for label, law in laws:
            r = expectation(
                cos,
                drift,
                torch.tensor([x0], dtype=torch.float64),
                T,
                num_samples=num_samples,
                arrivals=law,
            )
            centred = r.values - r.values.mean()
            var = float(centred.square().mean())
            out.append(
                dict(
                    problem=problem,
                    law=label,
                    depth=r.mean_depth,
                    variance=var,
                    work=var * r.mean_depth,
                    kurtosis=float(centred.pow(4).mean()) / var**2,
                    z=float((r.estimate - exact) / r.stderr),
                )
            )
    return out


def print_method_table(a, exact, rows, num_samples):
    print(
        f"Table 1. Beneš SDE a = {a:g}, x0 = {X0}, T = {T}, g = cos, E g(X_T) = {exact:.6f};"
        f" {num_samples} samples per method"
    )
    header = (
        f"{'method':32s} {'cost':>6s} {'variance':>9s} {'bias':>10s} {'z':>6s}"
        + "".join(f" {f'MSE@{b:.0e}':>9s}" for b in TABLE_BUDGETS)
        + f" {'MSE@1e4 emp.':>12s}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['name']:32s} {row['cost']:6.2f} {row['variance']:9.4f} {row['bias']:10.2e} "
            f"{row['z']:6.2f}"
            + "".join(f" {mse(row, b):9.2e}" for b in TABLE_BUDGETS)
            + f" {row['empirical']:12.2e}"
        )
    print()


def print_ratio_table(results):
    print(
        "Table 2. MSE(best Euler over the step counts) / MSE(method) at a budget of B drift"
        " evaluations (> 1: the method wins);"
    )
    print("Euler step counts beyond the measured ones use the bias extrapolated as 1 / steps")
    header = f"{'a':>4s} {'method':32s}" + "".join(f" {f'{b:.0e}':>8s}" for b in RATIO_BUDGETS)
    print(header)
    print("-" * len(header))
    for a, (_, rows) in results.items():
        best = [best_euler(rows, b) for b in RATIO_BUDGETS]
        print(f"{a:4g} {'(best Euler: steps)':32s}" + "".join(f" {n:8d}" for _, n in best))
        for row in rows:
            if row["name"].startswith("euler"):
                continue
            ratios = [m / mse(row, b) for (m, _), b in zip(best, RATIO_BUDGETS, strict=True)]
            print(f"{a:4g} {row['name']:32s}" + "".join(f" {r:8.2f}" for r in ratios))
    print()


def print_scan_table(scan):
    print("Table 3. Inter-arrival law scan (parametrix, antithetic, g = cos, T = 1; OU: a = 1,")
    print("x0 = 1); depth = mean number of Euler steps = drift evaluations per sample")
    header = (
        f"{'problem':10s} {'law':16s} {'depth':>6s} {'variance':>9s} {'var*depth':>10s} "
        f"{'kurtosis':>9s} {'z':>6s}"
    )
    print(header)
    print("-" * len(header))
    for s in scan:
        print(
            f"{s['problem']:10s} {s['law']:16s} {s['depth']:6.2f} {s['variance']:9.3f} "
            f"{s['work']:10.3f} {s['kurtosis']:9.0f} {s['z']:6.2f}"
        )
    print()


def plot(results, outdir: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = np.logspace(2, 10, 60)
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 5), squeeze=False)
    for ax, (a, (_, rows)) in zip(axes[0], results.items(), strict=True):
        for row in rows:
            euler = row["name"].startswith("euler")
            ax.loglog(
                budgets,
                [mse(row, b) for b in budgets],
                ls="--" if euler else "-",
                lw=1 if euler else 2,
                label=row["name"],
            )
        ax.set_xlabel("budget (drift evaluations)")
        ax.set_ylabel("mean squared error")
        ax.set_title(f"Beneš dX = a tanh(aX) dt + dW, a = {a:g}, E cos X_1")
        ax.legend(fontsize=6)
        ax.grid(True, which="both", alpha=0.3)
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, "unbiased_mse.png")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(args):
    torch.manual_seed(args.seed)
    if args.smoke:
        num_samples, euler_steps, dx = 20_000, (1, 4, 16), 0.02
        scales = (1.0, 2.0)
        laws = [("exp(1)", ExponentialArrivals(1.0)), ("power(0.5,2)", PowerArrivals(0.5, 2.0))]
    else:
        num_samples, euler_steps, dx = args.num_samples, (1, 2, 4, 8, 16, 32, 64), 0.005
        scales = (1.0, 2.0, 3.0)
        laws = [(f"exp({r:g})", ExponentialArrivals(r)) for r in (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)]
        laws += [
            ("power(0.5,2)", PowerArrivals(0.5, 2.0)),
            ("power(0.5,1.5)", PowerArrivals(0.5, 1.5)),
            ("uniform(0,2)", PowerArrivals(0.0, 2.0)),
        ]
    results = {}
    for a in scales:
        methods = (
            UNBIASED
            if a == 1.0
            else [
                m
                for m in UNBIASED
                if m[0].startswith(("parametrix exp(1) [", "parametrix exp(2)", "rmlmc coupled"))
            ]
        )
        exact, rows = run_methods(a, num_samples, euler_steps, dx, methods)
        results[a] = (exact, rows)
        print_method_table(a, exact, rows, num_samples)
    print_ratio_table(results)
    scan = rate_scan(num_samples, laws)
    print_scan_table(scan)
    path = plot(results, args.outdir)
    print(f"plot: {path}")
    return results, scan


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outdir", default="outputs", help="where the PNG plot goes")
    parser.add_argument("--num-samples", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="a seconds-long run")
    return parser.parse_args(argv)


if __name__ == "__main__":
    main(parse_args())
