"""Checks on a CUDA device (not run by the tests or CI, which have no GPU).

- every tensor the library makes follows the device of ``x0`` and ``times``;
- a fit of bench A on the GPU reaches the exact posterior as on the CPU;
- a device mismatch is one clear error;
- time per SVI step, CPU against GPU, for a large plate of paths.

    python benchmarks/gpu_check.py            # needs torch with CUDA
    python benchmarks/gpu_check.py --device cpu --smoke   # the script itself, anywhere
"""

from __future__ import annotations

import argparse
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO

from pyro_latdiff import DiffusionGuide, LatentDiffusion, fit, log_evidence
from pyro_latdiff.testing import LinearSDE, ou_problem


def on(problem: LinearSDE, device) -> LinearSDE:
    return LinearSDE(
        *(
            getattr(problem, f).to(device)
            for f in ("A", "c", "sigma", "x0", "times", "H", "obs_scale")
        )
    )


def check_devices(device):
    problem = on(ou_problem(), device)
    d = problem.distribution()
    path = d.rsample((8,))
    assert path.device.type == device.type and d.log_prob(path).device.type == device.type
    if device.type == "cpu":
        return
    try:
        LatentDiffusion(lambda t, x: -x, 1.0, torch.zeros(1, dtype=torch.float64), problem.times)
    except ValueError as error:
        print("device mismatch ->", error)
    else:
        raise AssertionError("a device mismatch went through")


def check_fit(device, num_steps):
    cpu_problem = ou_problem()
    problem = on(cpu_problem, device)
    y = torch.tensor([1.5], dtype=torch.float64, device=device)
    guide = DiffusionGuide(problem.model)
    start = time.perf_counter()
    fit(problem.model, guide, y, num_steps=num_steps, progress=False)
    seconds = time.perf_counter() - start
    assert all(p.device.type == device.type for p in guide.parameters())
    estimate = log_evidence(problem.model, guide, y, num_samples=4000)
    with torch.no_grad():
        terminal = Predictive(problem.model, guide=guide, num_samples=4000, parallel=True)(y)[
            "path"
        ][:, -1, 0]
    y_cpu = y.cpu()
    mean, cov = cpu_problem.terminal_posterior(y_cpu)
    print(
        f"bench A on {device}: {num_steps} steps in {seconds:.1f} s; log_evidence "
        f"{estimate.item():.4f} +- {estimate.stderr:.4f} (exact "
        f"{cpu_problem.log_evidence(y_cpu).item():.4f}, ESS {estimate.ess:.0f}/4000); "
        f"X_T mean {terminal.mean().item():.4f} (exact {mean.item():.4f}), sd "
        f"{terminal.std().item():.4f} (exact {cov.sqrt().item():.4f})"
    )


def step_time(device, num_series, num_steps, repeats):
    times = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64, device=device)
    y = 1.5 * torch.ones(num_series, 1, dtype=torch.float64, device=device)

    def model(y):
        with pyro.plate("series", num_series):
            x0 = torch.zeros(num_series, 1, dtype=torch.float64, device=device)
            path = pyro.sample("path", LatentDiffusion(lambda t, x: -x, 1.0, x0, times))
            pyro.sample("y", dist.Normal(path[..., -1, :], 0.1).to_event(1), obs=y)

    pyro.clear_param_store()
    svi = SVI(
        model,
        DiffusionGuide(model),
        pyro.optim.Adam({"lr": 1e-3}),
        Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=1),
    )
    svi.step(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        svi.step(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main(args):
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(0)
    device = torch.device(args.device)
    print(torch.__version__, torch.cuda.get_device_name() if device.type == "cuda" else "")
    check_devices(device)
    if device.type == "cpu":  # a mismatch needs two devices: check with the meta device
        try:
            LatentDiffusion(
                lambda t, x: -x, 1.0, torch.zeros(1, device="meta"), torch.linspace(0, 1, 3)
            )
        except ValueError as error:
            print("device mismatch ->", error)
    check_fit(device, args.svi_steps)
    print(f"{'series':>6} {'N':>4} {'cpu ms':>8} {'gpu ms':>8} {'cpu/gpu':>7}")
    for num_series in args.num_series:
        cpu = step_time(torch.device("cpu"), num_series, args.num_steps, args.repeats)
        gpu = step_time(device, num_series, args.num_steps, args.repeats)
        print(
            f"{num_series:>6} {args.num_steps:>4} {1e3 * cpu:>8.1f} {1e3 * gpu:>8.1f} "
            f"{cpu / gpu:>7.2f}",
            flush=True,
        )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--svi-steps", type=int, default=1000)
    parser.add_argument("--num-series", type=int, nargs="+", default=[16, 256, 4096])
    parser.add_argument("--num-steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (runs on a CPU too)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.svi_steps, args.num_series, args.num_steps, args.repeats = 3, [2], 5, 1
    return args


if __name__ == "__main__":
    main(parse_args())
