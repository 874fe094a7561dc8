"""Memory of one SVI step against the number of Euler steps N, with and without
checkpointed blocks of steps (``LatentDiffusion(..., block_size=...)``, which the
``DiffusionGuide`` takes): the growth of the peak resident set size during a step.

Model: 4 OU series dX = -theta X dt + dW sharing an unknown rate, on [0, 1] with N
steps, each observed with sd 0.2 at 10 evenly spaced times; 16 particles. Every
configuration runs in a fresh process with allocations of 64 KiB or more mapped from
the kernel and returned to it when freed (glibc's ``MALLOC_MMAP_THRESHOLD_``), so the
resident set follows the live memory: tensors, and the autograd graph's nodes, which
the tensors kept for backward do not show. It reports the peak's growth in each of
5 SVI steps over the size before the step (steps 2-5: the first also allocates once)
and the time of a step; the variants alternate (default, blocks, default, ...).

    python benchmarks/memory.py                      # N = 100, 1000, 10000
    python benchmarks/memory.py --smoke              # N = 20, 40 (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

OBS_SCALE = 0.2
NUM_SERIES = 4
STEPS = 5


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
            path = pyro.sample(
                "path", LatentDiffusion(drift, 1.0, x0, times, block_size=block_size)
            )
            pyro.sample("y", dist.Normal(path[..., observed, 0], OBS_SCALE).to_event(1), obs=y)

    guide = DiffusionGuide(model)  # takes the path site's block_size
    elbo = Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
    with torch.no_grad():  # the guide's parameters, without particles or gradients
        guide(y)
    peaks, seconds = [], []
    for _ in range(STEPS):
        before = _reset_peak()
        start = time.perf_counter()
        svi.step(y)
        seconds.append(time.perf_counter() - start)
        peaks.append(_status("VmHWM") - before)
    # The first step also allocates once (the optimiser's state, lazy initialisations).
    later = sorted(peaks[1:])
    return {
        "first_mib": peaks[0],
        "peak_mib": later[-1],
        "median_mib": later[len(later) // 2],
        "seconds": min(seconds[1:]),
    }


def _reset_peak() -> float:
    """Reset the peak resident set size (Linux) and return the current size (MiB)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def run_in_subprocess(num_steps: int, block_size: int | None) -> dict:
    command = [sys.executable, __file__, "--child", str(num_steps), str(block_size or 0)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    # Blocks of 64 KiB or more straight from the kernel and back to it when freed, so
    # the resident set size follows the live tensors instead of the allocator's caches.
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(args) -> list[dict]:
    rows = []
    for num_steps in args.num_steps:
        row = {"N": num_steps}
        for variant, block in (("default", None), ("blocks", args.block_size)):
            result = run_in_subprocess(num_steps, block)
            row[f"{variant}_first"] = result["first_mib"]
            row[f"{variant}_mib"] = result["peak_mib"]
            row[f"{variant}_median"] = result["median_mib"]
            row[f"{variant}_s"] = result["seconds"]
        rows.append(row)
    base = rows[0]
    print(
        f"block_size = {args.block_size}. Growth of the peak resident set size during an SVI "
        f"step (MiB): median / largest of steps 2-{STEPS} (first step in brackets); time of "
        "a step (s, the fastest)"
    )
    print("| N | default | blocks | blocks / N=first default (median) | default s | blocks s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['N']} | {row['default_median']:.1f} / {row['default_mib']:.1f} "
            f"({row['default_first']:.0f}) | {row['blocks_median']:.1f} / "
            f"{row['blocks_mib']:.1f} ({row['blocks_first']:.0f}) | "
            f"{row['blocks_median'] / max(base['default_median'], 1e-6):.2f} | "
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
