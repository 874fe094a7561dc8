"""Memory of one SVI step against the number of Euler steps N, with and without
``DiffusionGuide(block_size=...)`` (checkpointed blocks of steps): the tensors the step
keeps for its backward pass (what checkpointing bounds), and the growth of the peak
resident set size (which also counts the allocator's caches).

Model: 4 OU series dX = -theta X dt + dW sharing an unknown rate, on [0, 1] with N
steps, each observed with sd 0.2 at 10 evenly spaced times; 16 particles. Every
configuration runs in a fresh process (the peak resident set size only grows), which
reports the growth of its peak during its first SVI step over the peak after building
the guide's parameters, and the time of that step; the variants alternate (default,
blocks, default, blocks, ...).

    python benchmarks/memory.py                      # N = 100, 1000, 10000
    python benchmarks/memory.py --smoke              # N = 20, 40 (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

OBS_SCALE = 0.2
NUM_SERIES = 4


def measure(num_steps: int, block_size: int | None) -> dict:
    """One configuration, in this process: peak growth (MiB) and time (s) of an SVI step."""
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer import SVI, Trace_ELBO

    from pyro_latdiff import DiffusionGuide, LatentDiffusion

    torch.manual_seed(0)
    times = torch.linspace(0.0, 1.0, num_steps + 1)
    observed = torch.linspace(num_steps // 10, num_steps, 10).long() - 1
    y = torch.randn(NUM_SERIES, 10)

    def model(y):
        theta = pyro.sample("theta", dist.LogNormal(0.0, 0.5))
        with pyro.plate("series", NUM_SERIES):
            x0 = torch.zeros(NUM_SERIES, 1)
            drift = lambda t, x: -theta.unsqueeze(-1) * x  # noqa: E731
            path = pyro.sample("path", LatentDiffusion(drift, 1.0, x0, times))
            pyro.sample("y", dist.Normal(path[..., observed, 0], OBS_SCALE).to_event(1), obs=y)

    guide = DiffusionGuide(model, block_size=block_size)
    elbo = Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
    with torch.no_grad():  # the guide's parameters, without particles or gradients
        guide(y)
    saved: dict[int, int] = {}

    def pack(tensor):  # every storage the step keeps for its backward pass, once
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        svi.step(y)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "saved_mib": sum(saved.values()) / 2**20,
        "peak_mib": (after - before) / 1024,
        "seconds": seconds,
    }


def run_in_subprocess(num_steps: int, block_size: int | None) -> dict:
    command = [sys.executable, __file__, "--child", str(num_steps), str(block_size or 0)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(args) -> list[dict]:
    rows = []
    for num_steps in args.num_steps:
        row = {"N": num_steps}
        for variant, block in (("default", None), ("blocks", args.block_size)):
            result = run_in_subprocess(num_steps, block)
            row[f"{variant}_saved"] = result["saved_mib"]
            row[f"{variant}_mib"] = result["peak_mib"]
            row[f"{variant}_s"] = result["seconds"]
        rows.append(row)
    base = rows[0]
    print(
        f"block_size = {args.block_size}. saved: tensors kept for the backward pass (MiB); "
        "RSS: growth of the peak resident set size during the step (MiB, allocator "
        "included); time (s)"
    )
    print("| N | saved default | saved blocks | blocks / N=first | RSS default | RSS blocks | "
          "default s | blocks s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['N']} | {row['default_saved']:.1f} | {row['blocks_saved']:.2f} | "
            f"{row['blocks_saved'] / max(base['blocks_saved'], 1e-6):.2f} | "
            f"{row['default_mib']:.0f} | {row['blocks_mib']:.0f} | "
            f"{row['default_s']:.2f} | {row['blocks_s']:.2f} |"
        )
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-steps", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--block-size", type=int, default=100)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_steps, args.block_size = [20, 40], 10
    return args


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        block = int(sys.argv[3]) or None
        print(json.dumps(measure(int(sys.argv[2]), block)))
    else:
        main(parse_args())
