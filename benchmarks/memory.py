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
    python benchmarks/memory.py --live --variants blocks   # the heap in use's peak
    python benchmarks/memory.py --smoke              # N = 20, 40 (tests)

With ``--live`` the peak is that of the C heap in use instead, counted exactly: each
child preloads ``heap_counter.c`` (built with the C compiler, ``cc``), which adds every
allocation's size and takes off every free, tensors, autograd nodes and Python
objects alike, and changes nothing in the step. The resident set misses small
allocations served from memory the allocator already holds, so its growth understates
the step's own peak where most tensors are small (N = 100); the counter sees them at
every size.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

OBS_SCALE = 0.2
NUM_SERIES = 4
STEPS = 5


def measure(num_steps: int, block_size: int | None, live: bool = False, steps: int = STEPS) -> dict:
    """One configuration, in this process: peak growth (MiB) and time (s) of an SVI step;
    with ``live``, the peak of the heap in use (the preloaded counter) instead of the
    resident set."""
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
    for _ in range(steps):
        before = _heap_counter().heap_counter_reset() / 2**20 if live else _reset_peak()
        start = time.perf_counter()
        svi.step(y)
        seconds.append(time.perf_counter() - start)
        peak = _heap_counter().heap_counter_peak() / 2**20 if live else _status("VmHWM")
        peaks.append(peak - before)
    # The first step also allocates once (the optimiser's state, lazy initialisations).
    later = sorted(peaks[1:])
    return {
        "first_mib": peaks[0],
        "peak_mib": later[-1],
        "median_mib": later[len(later) // 2],
        "seconds": min(seconds[1:]),
    }


@functools.cache
def _heap_counter():
    """The preloaded allocation counter's functions (``heap_counter.c``)."""
    import ctypes

    lib = ctypes.CDLL(None)
    if not hasattr(lib, "heap_counter_peak"):
        raise RuntimeError("expected the process to preload heap_counter.so (memory.py --live)")
    for name in ("heap_counter_reset", "heap_counter_peak"):
        getattr(lib, name).restype = ctypes.c_size_t
    return lib


def build_heap_counter(directory: str) -> str:
    """Compile ``heap_counter.c`` into ``directory``; returns the shared library's path."""
    compiler = shutil.which("cc")
    if compiler is None:
        raise RuntimeError("--live: expected a C compiler (cc) to build the heap counter")
    source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "heap_counter.c")
    library = os.path.join(directory, "heap_counter.so")
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-o", library, source], check=True)
    return library


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


def run_in_subprocess(
    num_steps: int, block_size: int | None, counter: str | None = None, steps: int = STEPS
) -> dict:
    """One configuration in a fresh process; ``counter``: the heap counter's library
    to preload (the peak of the heap in use), or None (the resident set)."""
    command = [sys.executable, __file__, "--child", str(num_steps), str(block_size or 0)]
    command += [str(int(counter is not None)), str(steps)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    # Blocks of 64 KiB or more straight from the kernel and back to it when freed, so
    # the resident set size follows the live tensors instead of the allocator's caches.
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    if counter is not None:
        env["LD_PRELOAD"] = counter
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(args) -> list[dict]:
    with tempfile.TemporaryDirectory() as directory:
        counter = build_heap_counter(directory) if args.live else None
        return _table(args, counter)


def _table(args, counter: str | None) -> list[dict]:
    blocks = {"default": None, "blocks": args.block_size}
    rows = []
    for num_steps in args.num_steps:
        row = {"N": num_steps}
        for variant in args.variants:
            result = run_in_subprocess(num_steps, blocks[variant], counter, args.steps)
            row[f"{variant}_first"] = result["first_mib"]
            row[f"{variant}_mib"] = result["peak_mib"]
            row[f"{variant}_median"] = result["median_mib"]
            row[f"{variant}_s"] = result["seconds"]
        rows.append(row)
    base = rows[0]
    what = "heap in use (counted)" if args.live else "resident set size"
    print(
        f"block_size = {args.block_size}. Growth of the peak {what} during an SVI "
        f"step (MiB): median / largest of steps 2-{args.steps} (first step in brackets); the "
        f"median over the same variant's at N = {base['N']}; time of a step (s, the fastest)"
    )
    names = args.variants
    header = ["N", *names, *(f"{v} / N = {base['N']}" for v in names), *(f"{v} s" for v in names)]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [str(row["N"])]
        cells += [
            f"{row[f'{v}_median']:.1f} / {row[f'{v}_mib']:.1f} ({row[f'{v}_first']:.0f})"
            for v in names
        ]
        cells += [f"{row[f'{v}_median'] / max(base[f'{v}_median'], 1e-6):.2f}" for v in names]
        cells += [f"{row[f'{v}_s']:.2f}" for v in names]
        print("| " + " | ".join(cells) + " |")
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-steps", type=int, nargs="+", default=[100, 1000, 10000])
    parser.add_argument("--block-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=STEPS, help="SVI steps (>= 2)")
    parser.add_argument(
        "--variants", nargs="+", choices=["default", "blocks"], default=["default", "blocks"]
    )
    parser.add_argument(
        "--live",
        action="store_true",
        help="the peak of the heap in use (every allocation counted; needs cc) instead of "
        "the resident set size",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for the tests")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(
            f"--steps: expected at least 2 (the first step allocates once), actual {args.steps}"
        )
    if args.smoke:
        args.num_steps, args.block_size = [20, 40], 10
    return args


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        num_steps, block, live, steps = (int(a) for a in sys.argv[2:])
        print(json.dumps(measure(num_steps, block or None, bool(live), steps)))
    else:
        main(parse_args())
