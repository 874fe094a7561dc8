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
    python benchmarks/memory.py --live --variants blocks   # the live heap's peak
    python benchmarks/memory.py --smoke              # N = 20, 40 (tests)

With ``--live`` the peak is that of the live C heap instead (glibc's ``mallinfo2``,
read after every operator by a ``TorchDispatchMode``: chunks in use, small ones
included). The resident set misses small allocations served from memory the
allocator already holds, so its growth understates the step's own peak where most
tensors are small (N = 100); the live heap counts them at every size.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import time

OBS_SCALE = 0.2
NUM_SERIES = 4
STEPS = 5


def measure(num_steps: int, block_size: int | None, live: bool = False, steps: int = STEPS) -> dict:
    """One configuration, in this process: peak growth (MiB) and time (s) of an SVI step;
    with ``live``, the peak of the live heap instead of the resident set."""
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
        probe = _peak_heap_mode() if live else contextlib.nullcontext()
        before = _live_heap() if live else _reset_peak()
        start = time.perf_counter()
        with probe:
            svi.step(y)
        seconds.append(time.perf_counter() - start)
        peaks.append((probe.peak - before) / 2**20 if live else _status("VmHWM") - before)
    # The first step also allocates once (the optimiser's state, lazy initialisations).
    later = sorted(peaks[1:])
    return {
        "first_mib": peaks[0],
        "peak_mib": later[-1],
        "median_mib": later[len(later) // 2],
        "seconds": min(seconds[1:]),
    }


@functools.cache
def _mallinfo2():
    """glibc's ``mallinfo2``, returning its struct."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [
            (name, ctypes.c_size_t)
            for name in (
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
            ).split()
        ]

    mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo2.restype = MallInfo2
    return mallinfo2


def _live_heap() -> int:
    """Bytes of the C heap in use now (arena chunks in use plus mmapped chunks): every
    tensor and autograd node, whatever the allocator keeps cached."""
    info = _mallinfo2()()
    return info.uordblks + info.hblkhd


def _peak_heap_mode():
    """A ``TorchDispatchMode`` that reads :func:`_live_heap` after every operator
    (forward, backward and the blocks' recomputation) and keeps the largest in ``peak``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class PeakHeap(TorchDispatchMode):
        peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.peak = max(self.peak, _live_heap())
            return out

    return PeakHeap()


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
    num_steps: int, block_size: int | None, live: bool = False, steps: int = STEPS
) -> dict:
    command = [sys.executable, __file__, "--child", str(num_steps), str(block_size or 0)]
    command += [str(int(live)), str(steps)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    # Blocks of 64 KiB or more straight from the kernel and back to it when freed, so
    # the resident set size follows the live tensors instead of the allocator's caches.
    env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(args) -> list[dict]:
    blocks = {"default": None, "blocks": args.block_size}
    rows = []
    for num_steps in args.num_steps:
        row = {"N": num_steps}
        for variant in args.variants:
            result = run_in_subprocess(num_steps, blocks[variant], args.live, args.steps)
            row[f"{variant}_first"] = result["first_mib"]
            row[f"{variant}_mib"] = result["peak_mib"]
            row[f"{variant}_median"] = result["median_mib"]
            row[f"{variant}_s"] = result["seconds"]
        rows.append(row)
    base = rows[0]
    what = "live heap (the probe slows the step)" if args.live else "resident set size"
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
        help="the peak of the live heap (glibc mallinfo2 after every operator) instead of "
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
