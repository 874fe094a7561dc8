"""Time of scoring without gradients: ``log_evidence`` and ``to_inference_data`` with
``LatentDiffusion.log_prob`` scoring a few steps at a time (the default without
gradients, at most ``SCORING_BLOCK_STATES`` states at once) against all steps at once.

Model: ``SharedRateOU``, M OU series sharing a rate, N Euler steps, each observed at its
end; a ``DiffusionGuide`` after a few SVI steps. The two variants alternate (blocks,
all at once, blocks, ...) in one process; the log-weights of both are compared.

    OMP_NUM_THREADS=1 python benchmarks/scoring.py
    python benchmarks/scoring.py --smoke
"""

from __future__ import annotations

import argparse
import statistics
import time

import pyro
import torch

import pyro_latdiff.distribution as distribution
from pyro_latdiff import DiffusionGuide, fit, log_evidence, to_inference_data
from pyro_latdiff.testing import SharedRateOU

ALL_AT_ONCE = 1 << 62


def main(args):
    torch.set_num_threads(1)
    problem = SharedRateOU(torch.linspace(0.0, 1.0, args.num_steps + 1))
    pyro.set_rng_seed(0)
    y = problem.simulate(1.5, args.num_series)
    pyro.clear_param_store()
    guide = DiffusionGuide(problem.model)
    fit(problem.model, guide, y, num_steps=3, num_particles=4, progress=False, check=False)
    default = distribution.SCORING_BLOCK_STATES
    variants = {"blocks": default, "all steps at once": ALL_AT_ONCE}
    seconds = {(v, task): [] for v in variants for task in ("log_evidence", "to_inference_data")}
    log_weights = {}
    try:
        for _ in range(args.repeats):
            for variant, states in variants.items():
                distribution.SCORING_BLOCK_STATES = states
                pyro.set_rng_seed(1)
                start = time.perf_counter()
                estimate = log_evidence(problem.model, guide, y, num_samples=args.num_samples)
                seconds[variant, "log_evidence"].append(time.perf_counter() - start)
                log_weights[variant] = estimate.log_weights
                start = time.perf_counter()
                to_inference_data(problem.model, guide, y, num_samples=args.num_samples // 4)
                seconds[variant, "to_inference_data"].append(time.perf_counter() - start)
    finally:
        distribution.SCORING_BLOCK_STATES = default
    difference = float((log_weights["blocks"] - log_weights["all steps at once"]).abs().max())
    print(
        f"{args.num_series} series x {args.num_steps} steps, {args.num_samples} draws, "
        f"{args.repeats} alternated repeats; blocks of {default} states"
    )
    print("| task | blocks s | all steps at once s | ratio |")
    print("|---|---|---|---|")
    rows = {}
    for task in ("log_evidence", "to_inference_data"):
        blocks = statistics.median(seconds["blocks", task])
        whole = statistics.median(seconds["all steps at once", task])
        rows[task] = whole / blocks
        print(f"| {task} | {blocks:.2f} | {whole:.2f} | {whole / blocks:.2f} |")
    print(f"largest difference of the log-weights: {difference:.2e}")
    return {"ratios": rows, "max_log_weight_difference": difference}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-series", type=int, default=100)
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_series, args.num_steps, args.num_samples, args.repeats = 4, 5, 8, 1
    return args


if __name__ == "__main__":
    main(parse_args())
