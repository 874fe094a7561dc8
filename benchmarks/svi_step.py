"""Time per SVI step: pyro_latdiff against hand-written loops and torchsde's latent SDE.

Model (every variant): B independent D-dimensional OU paths dX = -X dt + dW, X_0 = 0,
on [0, 1] with N Euler steps, each observed at its end as y ~ N(X_1, 0.1^2 I);
16 particles per series (the library's default for ``fit``).

Variants, timed alternately (A B C D A B C D ...) in one run:
- ``library``: ``DiffusionGuide`` + ``Trace_ELBO(vectorize_particles=True)`` via SVI.
- ``hand``: the same guide (same ``NeuralDrift`` network, per-step tables, bridge term,
  learned noise scale, path-derivative gradient) written by hand: an Euler loop,
  the log-ratio on all steps at once, Adam. What the library saves a user writing.
- ``hand_minimal``: a drift-only guide trained by the plain Girsanov ELBO in one
  Euler loop (the least a user could write); for reference.
- ``torchsde``: the step of torchsde's latent-SDE example: ``sdeint(..., logqp=True)``
  with its default Brownian motion, a posterior drift net of the same size.

    python benchmarks/svi_step.py             # the grid of the README table
    python benchmarks/svi_step.py --smoke     # one tiny configuration
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import time

import pyro
import pyro.distributions as dist
import torch
import torchsde
from pyro.infer import SVI, Trace_ELBO
from torch import nn

from pyro_latdiff import DiffusionGuide, LatentDiffusion, NeuralDrift

OBS_SCALE = 0.1
NUM_PARTICLES = 16


def make_model(times, state_dim):
    def model(y):
        with pyro.plate("series", y.shape[0]):
            x0 = torch.zeros(y.shape[0], state_dim)
            path = pyro.sample("path", LatentDiffusion(lambda t, x: -x, 1.0, x0, times))
            pyro.sample("y", dist.Normal(path[..., -1, :], OBS_SCALE).to_event(1), obs=y)

    return model


def library_step(times, y):
    model = make_model(times, y.shape[-1])
    guide = DiffusionGuide(model)
    svi = SVI(
        model,
        guide,
        pyro.optim.Adam({"lr": 1e-3}),
        Trace_ELBO(num_particles=NUM_PARTICLES, vectorize_particles=True, max_plate_nesting=1),
    )
    return lambda: svi.step(y)


def _normal_log_prob(x, mean, scale):
    return (-0.5 * ((x - mean) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)


def hand_step(times, y):
    """The library's guide and estimator for this model, written by hand: the backward
    information filter of the observation (run at every step, as for a model whose
    prior depends on other latents), the guided Euler kernel it tilts, the network's
    control and log-scale plus per-step tables, the path-derivative gradient."""
    num_steps, state_dim = times.shape[0] - 1, y.shape[-1]
    net = NeuralDrift(state_dim, context_dim=state_dim, out_dim=2 * state_dim, time_span=(0.0, 1.0))
    tables = nn.Parameter(torch.zeros(num_steps, 3, state_dim))
    optim = torch.optim.Adam([*net.parameters(), tables], lr=1e-3)
    h = times.diff()
    ctx = y.expand(NUM_PARTICLES, *y.shape)

    def kernel():
        """Gain, shift and scale of the guided kernel of each step: x_{k+1} = (1 - h_k)
        x_k + sqrt(h_k) xi is filtered back from y ~ N(x_N, OBS_SCALE^2), one scalar
        filter per coordinate."""
        precision = torch.full_like(y, OBS_SCALE**-2)
        information = y * OBS_SCALE**-2
        H, F = [precision], [information]
        for k in range(num_steps - 1, 0, -1):
            a, denominator = 1 - h[k], 1 + h[k] * precision
            precision, information = a * a * precision / denominator, a * information / denominator
            H.append(precision)
            F.append(information)
        H, F = torch.stack(H[::-1]), torch.stack(F[::-1])  # (N, B, D): of x_1 .. x_N
        cov = h.reshape(-1, 1, 1)
        gain = 1 / (1 + cov * H)
        return gain, gain * cov * F, gain.sqrt()

    def coefficients(x, out, gain, shift, scale, tab, hk):
        """Drift and scale of the guide's step from ``x``, given the network's output."""
        c, log_s = out.chunk(2, -1)
        linear_gain, offset, log_scale = tab.unbind(-2)
        mean = gain * (x - x * hk) + shift  # the prior's Euler mean, tilted
        c = c + linear_gain * x + offset
        return (mean - x) / hk + scale * c, scale * (log_s + log_scale).exp()

    def step():
        optim.zero_grad()
        gain, shift, scale = kernel()
        step_net = net.on_grid(times[:-1], ctx)  # time and context parts once per step
        x = torch.zeros(NUM_PARTICLES, *y.shape)
        states = [x]
        for k in range(num_steps):
            u, s = coefficients(x, step_net(k, x), gain[k], shift[k], scale[k], tables[k], h[k])
            x = x + u * h[k] + s * h[k].sqrt() * torch.randn_like(x)
            states.append(x)
        path = torch.stack(states)  # (N + 1, P, B, D)
        prev, nxt = path[:-1], path[1:]
        hk = h.reshape(-1, 1, 1, 1)
        detached = {k: v.detach() for k, v in net.named_parameters()}
        t = times[:-1].reshape(-1, 1, 1, 1)
        out = torch.func.functional_call(net, detached, (t, prev, ctx))
        g, b, sc = (v.detach().unsqueeze(1) for v in (gain, shift, scale))
        u, s = coefficients(prev, out, g, b, sc, tables.detach()[:, None, None], hk)
        log_q = _normal_log_prob(nxt, prev + u * hk, s * hk.sqrt()).sum(0)
        log_p = _normal_log_prob(nxt, prev - prev * hk, hk.sqrt().expand_as(prev)).sum(0)
        log_lik = _normal_log_prob(y, path[-1], torch.full_like(y, OBS_SCALE))
        loss = -(log_p + log_lik - log_q).sum(-1).mean()
        loss.backward()
        optim.step()
        return loss.item()

    return step


def hand_minimal_step(times, y):
    """Drift-only guide, plain Girsanov ELBO, one Euler loop."""
    state_dim = y.shape[-1]
    net = NeuralDrift(state_dim, context_dim=state_dim, time_span=(0.0, 1.0))
    optim = torch.optim.Adam(net.parameters(), lr=1e-3)
    h = times.diff()
    ctx = y.expand(NUM_PARTICLES, *y.shape)

    def step():
        optim.zero_grad()
        x = torch.zeros(NUM_PARTICLES, *y.shape)
        log_ratio = 0.0
        for k in range(times.shape[0] - 1):
            c = net(times[k], x, ctx)
            xi = torch.randn_like(x)
            x = x + (-x + c) * h[k] + h[k].sqrt() * xi
            log_ratio = log_ratio + (c * xi * h[k].sqrt() + 0.5 * c**2 * h[k]).sum(-1)
        log_lik = _normal_log_prob(y, x, torch.full_like(y, OBS_SCALE))
        loss = -(log_lik - log_ratio).sum(-1).mean()
        loss.backward()
        optim.step()
        return loss.item()

    return step


class _LatentSDE(torchsde.SDEIto):
    """torchsde's latent-SDE example: posterior drift f, prior drift h, diagonal g."""

    def __init__(self, state_dim, context_dim):
        super().__init__(noise_type="diagonal")
        self.net = NeuralDrift(state_dim, context_dim=context_dim, time_span=(0.0, 1.0))
        self.context = None

    def f(self, t, y):
        return -y + self.net(t, y, self.context)

    def h(self, t, y):
        return -y

    def g(self, t, y):
        return torch.ones_like(y)


def torchsde_step(times, y):
    batch, state_dim = NUM_PARTICLES * y.shape[0], y.shape[-1]
    sde = _LatentSDE(state_dim, state_dim)
    sde.context = y.repeat(NUM_PARTICLES, 1)
    optim = torch.optim.Adam(sde.parameters(), lr=1e-3)
    dt = float(times[1] - times[0])

    def step():
        optim.zero_grad()
        y0 = torch.zeros(batch, state_dim)
        ys, log_ratio = sdeint_logqp(sde, y0, times, dt)
        log_lik = _normal_log_prob(sde.context, ys[-1], torch.full_like(ys[-1], OBS_SCALE))
        loss = -(log_lik - log_ratio[-1]).mean()
        loss.backward()
        optim.step()
        return loss.item()

    return step


def sdeint_logqp(sde, y0, times, dt):
    return torchsde.sdeint(sde, y0, times, dt=dt, method="euler", logqp=True)


VARIANTS = {
    "library": library_step,
    "hand": hand_step,
    "hand_minimal": hand_minimal_step,
    "torchsde": torchsde_step,
}


def measure(batch, state_dim, num_steps, repeats, warmup, variants):
    pyro.clear_param_store()
    times = torch.linspace(0.0, 1.0, num_steps + 1)
    y = 1.5 * torch.ones(batch, state_dim)
    steps = {name: VARIANTS[name](times, y) for name in variants}
    for step in steps.values():
        for _ in range(warmup):
            step()
    seconds = {name: [] for name in steps}
    for _ in range(repeats):  # alternate the variants: A B C D A B C D ...
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in seconds.items()}


def main(args):
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    grid = list(itertools.product(args.batch, args.state_dim, args.num_steps))
    header = (
        f"{'batch':>5} {'D':>3} {'N':>4} | {'library ms':>10} | {'hand ms':>8} "
        f"{'lib/hand':>8} | {'minimal ms':>10} {'lib/min':>7} | {'torchsde ms':>11} "
        f"{'sde/lib':>7}"
    )
    print(f"{NUM_PARTICLES} particles per series; median of {args.repeats} alternated steps")
    print(header)
    print("-" * len(header))
    rows = []
    for batch, state_dim, num_steps in grid:
        t = measure(batch, state_dim, num_steps, args.repeats, args.warmup, list(VARIANTS))
        ms = {k: 1e3 * v for k, v in t.items()}
        row = (batch, state_dim, num_steps, ms)
        rows.append(row)
        print(
            f"{batch:>5} {state_dim:>3} {num_steps:>4} | {ms['library']:>10.1f} | "
            f"{ms['hand']:>8.1f} {ms['library'] / ms['hand']:>8.2f} | "
            f"{ms['hand_minimal']:>10.1f} {ms['library'] / ms['hand_minimal']:>7.2f} | "
            f"{ms['torchsde']:>11.1f} {ms['torchsde'] / ms['library']:>7.1f}",
            flush=True,
        )
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--state-dim", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--num-steps", type=int, nargs="+", default=[50, 100])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.state_dim, args.num_steps = [2], [1], [5]
        args.repeats, args.warmup = 2, 1
    return args


if __name__ == "__main__":
    main(parse_args())
