"""Data-parallel SVI: a plate of OU series with a shared rate, split across processes.

Each process holds a shard of the series (``shard_slice``); ``DataParallelSVI`` sums
the shards' gradients with one ``all_reduce`` per step (gloo on CPU, NCCL on GPU), so
every process takes the same full-data steps. Run on one process, or with torchrun:

    python examples/data_parallel.py
    OMP_NUM_THREADS=1 torchrun --standalone --nproc-per-node 2 examples/data_parallel.py
    python examples/data_parallel.py --smoke

Rank 0 prints the posterior of the rate against the exact one (quadrature).
"""

from __future__ import annotations

import argparse
import os

import pyro
import torch
from pyro.infer import Predictive

from pyro_latdiff import DiffusionGuide
from pyro_latdiff.infer import default_optim
from pyro_latdiff.parallel import (
    DataParallelSVI,
    destroy_process_group,
    init_process_group,
    shard_slice,
)
from pyro_latdiff.testing import SharedRateOU


def shard_fn(shard, num_shards, y):
    """The model arguments of one shard: its series and the full number of series."""
    return (y[shard_slice(len(y), shard, num_shards)], len(y)), {}


def main(args):
    torch.set_default_dtype(torch.float64)
    distributed = "WORLD_SIZE" in os.environ
    rank, world = init_process_group() if distributed else (0, 1)
    pyro.set_rng_seed(args.seed)  # the same data on every rank
    pyro.clear_param_store()
    problem = SharedRateOU(torch.linspace(0.0, 1.0, args.num_steps + 1))
    y = problem.simulate(args.theta, args.num_series)
    guide = DiffusionGuide(problem.model)
    svi = DataParallelSVI(
        problem.model, guide, default_optim(args.svi_steps), shard_fn=shard_fn, seed=args.seed
    )
    for step in range(args.svi_steps):
        loss = svi.step(y)
        if rank == 0 and step % max(1, args.svi_steps // 10) == 0:
            print(f"step {step:5d}  loss {loss:10.3f}")
    result = {"loss": loss, "world_size": world}
    if rank == 0:
        with torch.no_grad():
            theta = Predictive(
                problem.model, guide=guide, num_samples=args.num_samples, return_sites=["theta"]
            )(*shard_fn(0, world, y)[0])["theta"]
        _, _, mean, sd = problem.exact_posterior(y)
        print(f"{world} process(es): theta | y guide mean {theta.mean():.4f} sd {theta.std():.4f}")
        print(f"                exact mean {mean:.4f} sd {sd:.4f}")
        result.update(mean=theta.mean().item(), sd=theta.std().item())
    if distributed:
        destroy_process_group()
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-series", type=int, default=64)
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--theta", type=float, default=1.5)
    parser.add_argument("--svi-steps", type=int, default=1000)
    parser.add_argument("--num-samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_series, args.num_steps, args.svi_steps, args.num_samples = 4, 5, 3, 50
    return args


if __name__ == "__main__":
    main(parse_args())
