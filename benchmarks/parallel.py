"""Throughput of data-parallel SVI: 1 process against 2 processes (gloo, localhost).

Model: ``SharedRateOU`` (a rate shared by M OU series of N Euler steps, each observed at
its end), ``DiffusionGuide``, ``Trace_ELBO`` with 16 vectorised particles. Layouts,
alternated A B A B in one run, each a fresh launch whose steps are timed after warm-up
steps (start-up and the process group's rendezvous are not counted):

- ``1 process``: ``DataParallelSVI`` with one shard (plain SVI on all M series);
- ``2 processes``: two ranks joined by gloo on localhost, M / 2 series each, gradients
  summed by one ``all_reduce`` per step.

Every process runs with one thread (``OMP_NUM_THREADS=1``), so 2 processes use at most
2 cores. Printed: series per second of each layout and the ratio 2-process / 1-process.

    OMP_NUM_THREADS=1 python benchmarks/parallel.py
    python benchmarks/parallel.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(args) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    import pyro
    import torch

    from pyro_latdiff import DiffusionGuide
    from pyro_latdiff.parallel import (
        DataParallelSVI,
        destroy_process_group,
        init_process_group,
        shard_slice,
    )
    from pyro_latdiff.testing import SharedRateOU

    torch.set_num_threads(1)
    distributed = "WORLD_SIZE" in os.environ
    rank = init_process_group("gloo")[0] if distributed else 0
    problem = SharedRateOU(torch.linspace(0.0, 1.0, args.num_steps + 1))
    pyro.set_rng_seed(0)
    y = problem.simulate(1.5, args.num_series)
    guide = DiffusionGuide(problem.model)

    def shard_fn(shard, num_shards, y):
        return (y[shard_slice(len(y), shard, num_shards)], len(y)), {}

    svi = DataParallelSVI(problem.model, guide, pyro.optim.Adam({"lr": 1e-3}), shard_fn=shard_fn)
    for _ in range(args.warmup):
        svi.step(y)
    if distributed:
        torch.distributed.barrier()
    start = time.perf_counter()
    for _ in range(args.svi_steps):
        svi.step(y)
    seconds = (time.perf_counter() - start) / args.svi_steps
    if rank == 0:
        print(json.dumps({"seconds_per_step": seconds}))
    if distributed:
        destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(num_processes: int, args) -> float:
    """Seconds per step of one launch of ``num_processes`` ranks."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        f"--num-series={args.num_series}",
        f"--num-steps={args.num_steps}",
        f"--svi-steps={args.svi_steps}",
        f"--warmup={args.warmup}",
    ]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    if num_processes > 1:
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        env["WORLD_SIZE"] = str(num_processes)
    procs = [
        subprocess.Popen(
            command,
            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)) if num_processes > 1 else env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(num_processes)
    ]
    outputs = [proc.communicate() for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            raise RuntimeError(f"worker failed:\n{out}\n{err}")
    return json.loads(outputs[0][0].strip().splitlines()[-1])["seconds_per_step"]


def main(args):
    times: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.rounds):
        for layout in (1, 2):  # A B A B ...
            times[layout].append(launch(layout, args))
    rows = {}
    print(
        f"SharedRateOU, {args.num_series} series x {args.num_steps} Euler steps, 16 particles, "
        f"{args.svi_steps} timed steps per launch, {args.rounds} launches per layout (A B A B)"
    )
    print(f"{'layout':<12} {'ms/step (median)':>17} {'series/s':>10} {'ratio':>7}")
    base = statistics.median(times[1])
    for layout in (1, 2):
        median = statistics.median(times[layout])
        rows[layout] = {"ms": 1e3 * median, "series_per_s": args.num_series / median}
        print(
            f"{layout} process{'es' if layout > 1 else '':<2} {1e3 * median:17.1f} "
            f"{args.num_series / median:10.1f} {base / median:7.2f}"
        )
    ratio = base / statistics.median(times[2])
    print(f"throughput 2 processes / 1 process: {ratio:.2f}")
    return {"times": times, "ratio": ratio, "rows": rows}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-series", type=int, default=256)
    parser.add_argument("--num-steps", type=int, default=50)
    parser.add_argument("--svi-steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_series, args.num_steps, args.svi_steps, args.warmup, args.rounds = 8, 5, 2, 1, 1
    return args


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.worker:
        worker(arguments)
    else:
        main(arguments)
