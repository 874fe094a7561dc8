"""The long NUTS reference of the nonlinear acceptance check (issue 12).

Runs Pyro's NUTS on the Euler chain of :class:`pyro_latdiff.testing.nonlinear.DoubleWellSSM`
(all 60 path states and theta as latents; float64) with several chains, prints the
posterior means and sds of theta with split R-hat, ESS and Monte Carlo standard errors,
and writes them to ``pyro_latdiff/testing/double_well_nuts.json``, which
``tests/test_nonlinear_posterior.py`` compares a fitted DiffusionGuide with.

    OMP_NUM_THREADS=1 python benchmarks/nuts_reference.py               # the stored reference
    OMP_NUM_THREADS=1 python benchmarks/nuts_reference.py --smoke --out /tmp/ref.json

Each chain starts from the observations interpolated linearly in time (the path) and
theta = (1, 1), the prior medians; warm-up adapts the step size and a diagonal mass
matrix.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch

from pyro_latdiff.testing.nonlinear import DoubleWellSSM
from pyro_latdiff.testing.nuts import run_nuts

DEFAULT_OUT = os.path.join(
    os.path.dirname(__file__), "..", "pyro_latdiff", "testing", "double_well_nuts.json"
)


def initial_values(problem: DoubleWellSSM, y: torch.Tensor, chain: int) -> dict:
    """The observations interpolated in time, plus a small per-chain jitter."""
    times = problem.times[1:].numpy()
    observed = problem.times[1:][problem.obs_index].numpy()
    path = np.interp(times, np.concatenate([[0.0], observed]), np.concatenate([[problem.x0], y]))
    g = torch.Generator().manual_seed(1000 + chain)
    path = torch.tensor(path, dtype=problem.dtype).unsqueeze(-1)
    path = path + 0.05 * torch.randn(path.shape, generator=g, dtype=problem.dtype)
    one = torch.ones((), dtype=problem.dtype)
    return {"theta1": one, "theta2": one, "path": path}


def main(args):
    torch.set_default_dtype(torch.float64)
    problem = DoubleWellSSM()
    y = problem.observations()
    inits = [initial_values(problem, y, c) for c in range(args.num_chains)]
    start = time.time()
    run = run_nuts(
        problem.model,
        y,
        inits=inits,
        num_samples=args.num_samples,
        warmup_steps=args.warmup_steps,
        max_tree_depth=args.max_tree_depth,
        target_accept_prob=args.target_accept_prob,
        seed=args.seed,
        jit_compile=not args.no_jit,
        progress=args.progress,
    )
    summary = run.summary(["theta1", "theta2"])
    print(
        f"NUTS: {args.num_chains} chains x ({args.warmup_steps} warm-up + {args.num_samples}) "
        f"draws, max_tree_depth {args.max_tree_depth}, target accept "
        f"{args.target_accept_prob}: {run.seconds:.0f} s; step sizes "
        + ", ".join(f"{s:.3g}" for s in run.step_sizes)
    )
    print(f"{'':8} {'mean':>8} {'sd':>8} {'mcse mean':>10} {'mcse sd':>8} {'ESS':>7} {'R-hat':>6}")
    for name, row in summary.items():
        print(
            f"{name:8} {row['mean']:8.4f} {row['sd']:8.4f} {row['mcse_mean']:10.4f} "
            f"{row['mcse_sd']:8.4f} {row['ess']:7.0f} {row['r_hat']:6.3f}"
        )
        print(
            f"{'':8} Monte Carlo error: mean {100 * row['mcse_mean'] / row['mean']:.2f} % of the "
            f"mean, sd {100 * row['mcse_sd'] / row['sd']:.2f} % of the sd"
        )
    out = dict(summary)
    out["settings"] = run.settings | {
        "seconds": round(run.seconds, 1),
        "command": "OMP_NUM_THREADS=1 python benchmarks/nuts_reference.py",
        "date": time.strftime("%Y-%m-%d", time.gmtime(start)),
        "torch": torch.__version__,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as handle:
        json.dump(out, handle, indent=2)
        handle.write("\n")
    print(f"wrote {os.path.abspath(args.out)}")
    return out


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-chains", type=int, default=4)
    parser.add_argument("--warmup-steps", type=int, default=500)
    parser.add_argument("--num-samples", type=int, default=2500)
    parser.add_argument("--max-tree-depth", type=int, default=10)
    parser.add_argument("--target-accept-prob", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--no-jit", action="store_true", help="no torch.jit of the potential")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="a few draws, for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_chains, args.warmup_steps, args.num_samples = 2, 10, 10
        args.max_tree_depth = 4
    return args


if __name__ == "__main__":
    main(parse_args())
