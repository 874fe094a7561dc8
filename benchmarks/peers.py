"""Race against the peers: time to a posterior of given accuracy.

Methods, each on the same Euler–Maruyama chain:
- ``svi``: ``fit`` + ``DiffusionGuide`` (this package), posterior from 1000 guide draws;
- ``svi_is``: the same fit, the posterior mean and sd from the same 1000 draws
  importance-weighted (``to_inference_data`` + ``importance_mean``, Pareto-smoothed
  weights): what a user does to correct the guide's remaining bias;
- ``pyro_nuts``: Pyro's NUTS on the model (path and parameters as latents);
- ``numpyro_nuts``: NumPyro's NUTS, the chain's density from
  ``numpyro.distributions.EulerMaruyama`` (JIT compile time counted);
- ``pymc_nuts``: PyMC's NUTS, the Euler transitions written with ``pm.Normal`` (compile
  time counted).

Problems, each with an exact posterior of one quantity:
- ``bench_a``: dX = -X dt + dW, X_0 = 0, T = 1, N = 50, y = 1.5 ~ N(X_T, 0.1^2); X_T;
- ``shared_rate``: 100 OU series with a shared rate theta (``SharedRateOU``), each
  observed at its end; theta (quadrature);
- ``observed_path``: PyMC's example, a path observed at every step with an unknown
  rate (``ObservedRateOU``); the rate (Kalman filter + quadrature).

Error = max(|mean - exact mean|, |sd - exact sd|) / exact sd, measured at checkpoints;
time to accuracy = the first checkpoint after which the error stays below ``--tol``.
Times include compilation and warm-up; each run stops at ``--time-limit`` seconds
(checkpoints so far kept). Peers not installed are skipped with a line.
Every method runs with one thread.

    OMP_NUM_THREADS=1 python benchmarks/peers.py --outdir outputs
    python benchmarks/peers.py --smoke
"""

import argparse
import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass, field

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault(
    "XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402
from pyro.infer import MCMC, NUTS, Predictive  # noqa: E402

from pyro_latdiff import DiffusionGuide, fit, importance_mean, to_inference_data  # noqa: E402
from pyro_latdiff.testing import ObservedRateOU, SharedRateOU, ou_problem  # noqa: E402

METHODS = ["svi", "svi_is", "pyro_nuts", "numpyro_nuts", "pymc_nuts"]
PEERS = {"numpyro_nuts": "numpyro", "pymc_nuts": "pymc"}


class _TimeUp(Exception):
    """Raised from a sampler's or optimiser's callback when the time limit is reached."""


@dataclass
class Problem:
    """One benchmark problem: the torch model, its data, the exact answer."""

    name: str
    quantity: str
    model: object
    data: torch.Tensor
    exact_mean: float
    exact_sd: float
    times: torch.Tensor
    extract: object  # samples dict -> 1-D tensor of the quantity
    spec: dict = field(default_factory=dict)  # what the peer models need


def make_problems(args) -> dict[str, Problem]:
    torch.set_default_dtype(torch.float64)
    pyro.set_rng_seed(0)
    problems = {}
    n = args.num_steps
    linear = ou_problem(num_steps=n)
    y = torch.tensor([1.5])
    mean, cov = linear.terminal_posterior(y)
    problems["bench_a"] = Problem(
        "bench_a",
        "X_T",
        linear.model,
        y,
        mean.item(),
        cov.sqrt().item(),
        linear.times,
        lambda s: s["path"][..., -1, 0].reshape(-1),
        {"rate": 1.0, "obs_scale": 0.1},
    )
    shared = SharedRateOU(torch.linspace(0.0, 1.0, n + 1))
    ys = shared.simulate(1.5, args.num_series)
    _, _, mean, sd = shared.exact_posterior(ys)
    problems["shared_rate"] = Problem(
        "shared_rate",
        "theta",
        shared.model,
        ys,
        mean.item(),
        sd.item(),
        shared.times,
        lambda s: s["theta"].reshape(-1),
        {"obs_scale": shared.obs_scale},
    )
    observed = ObservedRateOU(num_steps=args.observed_steps)
    z = observed.simulate(-0.78)
    _, _, mean, sd = observed.exact_posterior(z)
    problems["observed_path"] = Problem(
        "observed_path",
        "rate",
        observed.model,
        z,
        mean.item(),
        sd.item(),
        observed.times,
        lambda s: s["rate"].reshape(-1),
        {"problem": observed},
    )
    return problems


def error(problem: Problem, values) -> float:
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2:
        return math.inf
    return moments_error(problem, values.mean(), values.std(ddof=1))


# ----- methods: each returns a list of (seconds, error) checkpoints -----------------


def moments_error(problem: Problem, mean: float, sd: float) -> float:
    return max(abs(mean - problem.exact_mean), abs(sd - problem.exact_sd)) / problem.exact_sd


def _importance_weighted_error(problem: Problem, guide) -> float:
    """The error of the importance-weighted mean and sd of the quantity, from 1000 draws."""
    data = to_inference_data(problem.model, guide, problem.data, num_samples=250)  # x 4 chains
    name = {"X_T": "path"}.get(problem.quantity, problem.quantity)
    pick = (lambda post: post[name][..., -1, 0]) if name == "path" else (lambda post: post[name])
    first = float(importance_mean(data, pick).values)
    second = float(importance_mean(data, lambda post: pick(post) ** 2).values)
    return moments_error(problem, first, math.sqrt(max(second - first**2, 0.0)))


def run_svi_is(problem: Problem, args):
    return run_svi(problem, args, weighted=True)


def run_svi(problem: Problem, args, weighted: bool = False):
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    guide = DiffusionGuide(problem.model)
    checkpoints = []
    state = {"start": time.perf_counter(), "paused": 0.0}

    def callback(step, loss):
        if (step + 1) % args.eval_every:
            return
        pause = time.perf_counter()
        if pause - state["start"] - state["paused"] > args.time_limit:
            raise _TimeUp
        with torch.no_grad():
            if weighted:
                err = _importance_weighted_error(problem, guide)
            else:
                samples = Predictive(problem.model, guide=guide, num_samples=1000, parallel=True)(
                    problem.data
                )
                err = error(problem, problem.extract(samples))
        elapsed = pause - state["start"] - state["paused"]
        checkpoints.append((elapsed, err))
        state["paused"] += time.perf_counter() - pause

    try:
        fit(
            problem.model,
            guide,
            problem.data,
            num_steps=args.svi_steps,
            num_particles=args.num_particles,
            callback=callback,
            progress=False,
        )
    except _TimeUp:
        pass
    return checkpoints


class _Checkpoints:
    """Running error over post-warm-up samples, every ``every`` samples."""

    def __init__(self, problem, every, start, time_limit=math.inf):
        self.problem, self.every, self.start = problem, every, start
        self.time_limit = time_limit
        self.values: list[float] = []
        self.checkpoints: list[tuple[float, float]] = []

    def add(self, values) -> None:
        for v in np.asarray(values).reshape(-1):
            self.values.append(float(v))
            if len(self.values) % self.every == 0:
                now = time.perf_counter() - self.start
                self.checkpoints.append((now, error(self.problem, self.values)))
                if now > self.time_limit:
                    raise _TimeUp


def run_pyro_nuts(problem: Problem, args):
    from pyro.infer.mcmc.util import initialize_model

    pyro.set_rng_seed(2)
    start = time.perf_counter()
    record = _Checkpoints(problem, args.mcmc_every, start)
    initial, potential, transforms, _ = initialize_model(problem.model, (problem.data,))

    def guarded(params):
        # The step-size search tries huge steps; a rate that overflows makes
        # LatentDiffusion's construction check raise. Treat that as zero density.
        try:
            return potential(params)
        except ValueError:  # an infinite energy that HMC's gradient can still be taken of
            return sum(v.sum() * 0.0 for v in params.values()) + math.inf

    def hook(kernel, params, stage, i):
        if time.perf_counter() - start > args.time_limit:
            raise _TimeUp
        if stage.lower() != "sample":
            return
        constrained = {
            k: transforms[k].inv(v.detach()) if k in transforms else v.detach()
            for k, v in params.items()
        }
        record.add(problem.extract(constrained).numpy())

    kernel = NUTS(potential_fn=guarded, max_tree_depth=args.max_tree_depth)
    mcmc = MCMC(
        kernel,
        num_samples=args.num_samples,
        warmup_steps=args.warmup_steps,
        initial_params=initial,
        hook_fn=hook,
        disable_progbar=True,
    )
    try:
        mcmc.run()
    except _TimeUp:
        pass
    return record.checkpoints


def _numpyro_model(problem: Problem):
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist

    t = jnp.asarray(problem.times.numpy())
    n = t.shape[0] - 1
    data = jnp.asarray(problem.data.numpy())

    def chain_log_prob(sde, x0, path, init):
        full = jnp.concatenate([jnp.broadcast_to(x0, path.shape[:-1] + (1,)), path], -1)
        em = ndist.EulerMaruyama(t, sde, init)
        return em.log_prob(full).sum() - init.log_prob(x0).sum()

    if problem.name == "bench_a":
        rate, obs = problem.spec["rate"], problem.spec["obs_scale"]

        def model():
            path = numpyro.sample("path", ndist.ImproperUniform(ndist.constraints.real, (), (n,)))
            numpyro.factor(
                "chain", chain_log_prob(lambda x, s: (-rate * x, 1.0), 0.0, path, ndist.Normal())
            )
            numpyro.sample("y", ndist.Normal(path[-1], obs), obs=data[0])

        return model, lambda s: np.asarray(s["path"])[..., -1]
    if problem.name == "shared_rate":
        obs = problem.spec["obs_scale"]
        m = data.shape[0]

        def model():
            theta = numpyro.sample("theta", ndist.LogNormal(0.0, 0.5))
            path = numpyro.sample("path", ndist.ImproperUniform(ndist.constraints.real, (m,), (n,)))
            init = ndist.Normal(jnp.zeros(m), 1.0)
            numpyro.factor("chain", chain_log_prob(lambda x, s: (-theta * x, 1.0), 0.0, path, init))
            numpyro.sample("y", ndist.Normal(path[:, -1], obs), obs=data)

        return model, lambda s: np.asarray(s["theta"])
    spec = problem.spec["problem"]

    def model():
        rate = numpyro.sample("rate", ndist.Normal(spec.prior_loc, spec.prior_scale))
        path = numpyro.sample("path", ndist.ImproperUniform(ndist.constraints.real, (), (n,)))
        numpyro.factor(
            "chain",
            chain_log_prob(lambda x, s: (rate * x, spec.diffusion), spec.x0, path, ndist.Normal()),
        )
        numpyro.sample("z", ndist.Normal(path, spec.obs_scale), obs=data)

    return model, lambda s: np.asarray(s["rate"])


def run_numpyro_nuts(problem: Problem, args):
    """Warm-up (JIT compile included), then one sampling run; the sampling time is
    spread evenly over the draws (NumPyro's loop is compiled: no per-draw callback)."""
    import jax
    from numpyro.infer import MCMC as NMCMC
    from numpyro.infer import NUTS as NNUTS

    jax.config.update("jax_enable_x64", True)
    start = time.perf_counter()
    model, extract = _numpyro_model(problem)
    mcmc = NMCMC(
        NNUTS(model, max_tree_depth=args.max_tree_depth),
        num_warmup=args.warmup_steps,
        num_samples=args.num_samples,
        progress_bar=False,
    )
    mcmc.warmup(jax.random.PRNGKey(3))
    warm = time.perf_counter() - start
    mcmc.run(mcmc.post_warmup_state.rng_key)
    values = extract(mcmc.get_samples())
    per_draw = (time.perf_counter() - start - warm) / len(values)
    checkpoints = []
    for n in range(args.mcmc_every, len(values) + 1, args.mcmc_every):
        checkpoints.append((warm + n * per_draw, error(problem, values[:n])))
    return checkpoints


def run_pymc_nuts(problem: Problem, args):
    import pymc as pm
    import pytensor.tensor as pt

    start = time.perf_counter()
    t = problem.times.numpy()
    n = t.shape[0] - 1
    h = np.diff(t)
    data = problem.data.numpy()
    with pm.Model():
        if problem.name == "bench_a":
            path = pm.Flat("path", shape=n)
            prev = pt.concatenate([[0.0], path[:-1]])
            drift, sigma, quantity = -problem.spec["rate"] * prev, 1.0, "path"
            pm.Normal("y", path[-1], problem.spec["obs_scale"], observed=data[0])
        elif problem.name == "shared_rate":
            theta = pm.LogNormal("theta", 0.0, 0.5)
            path = pm.Flat("path", shape=(data.shape[0], n))
            prev = pt.concatenate([pt.zeros((data.shape[0], 1)), path[:, :-1]], axis=1)
            drift, sigma, quantity = -theta * prev, 1.0, "theta"
            pm.Normal("y", path[:, -1], problem.spec["obs_scale"], observed=data)
        else:
            spec = problem.spec["problem"]
            rate = pm.Normal("rate", spec.prior_loc, spec.prior_scale)
            path = pm.Flat("path", shape=n)
            prev = pt.concatenate([[spec.x0], path[:-1]])
            drift, sigma, quantity = rate * prev, spec.diffusion, "rate"
            pm.Normal("z", path, spec.obs_scale, observed=data)
        transition = pm.Normal.dist(prev + drift * h, sigma * np.sqrt(h))
        pm.Potential("chain", pm.logp(transition, path).sum())
        record = _Checkpoints(problem, args.mcmc_every, start, args.time_limit)

        def callback(trace, draw):
            if time.perf_counter() - start > args.time_limit:
                raise _TimeUp
            if not draw.tuning:
                point = draw.point  # values on PyMC's unconstrained scale
                if quantity in point:
                    value = np.asarray(point[quantity])
                else:  # a positive variable: sampled as its log
                    value = np.exp(np.asarray(point[f"{quantity}_log__"]))
                record.add(value[..., -1] if problem.name == "bench_a" else value)

        try:
            pm.sample(
                draws=args.num_samples,
                tune=args.warmup_steps,
                chains=1,
                cores=1,
                random_seed=4,
                progressbar=False,
                compute_convergence_checks=False,
                callback=callback,
            )
        except _TimeUp:
            pass
    return record.checkpoints


RUNNERS = {
    "svi": run_svi,
    "svi_is": run_svi_is,
    "pyro_nuts": run_pyro_nuts,
    "numpyro_nuts": run_numpyro_nuts,
    "pymc_nuts": run_pymc_nuts,
}


def time_to_accuracy(checkpoints, tol):
    """The first checkpoint after which the error stays below ``tol``."""
    reached = None
    for seconds, err in checkpoints:
        if err <= tol:
            reached = seconds if reached is None else reached
        else:
            reached = None
    return reached


def plot(results, problems, path, tol):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = [p for p in results if any(results[p].values())]
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for method, checkpoints in results[name].items():
            if checkpoints:
                seconds, errs = zip(*checkpoints, strict=True)
                color = f"C{METHODS.index(method)}"  # one colour per method in every panel
                ax.plot(seconds, errs, marker=".", lw=1, label=method, color=color)
        ax.axhline(tol, color="k", ls=":", lw=0.8)
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="seconds (1 thread)",
            ylabel="error / posterior sd",
            title=f"{name}: {problems[name].quantity}",
        )
        # After the scale is set (setting it resets the formatters): decades only.
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args):
    torch.set_num_threads(1)
    problems = make_problems(args)
    results: dict[str, dict[str, list]] = {p: {} for p in args.problems}
    table = []
    for name in args.problems:
        problem = problems[name]
        print(
            f"{name}: exact posterior of {problem.quantity}: mean {problem.exact_mean:.4f} "
            f"sd {problem.exact_sd:.4f}"
        )
        for method in args.methods:
            peer = PEERS.get(method)
            if peer is not None and importlib.util.find_spec(peer) is None:
                print(f"  {method}: skipped ({peer} is not installed)")
                continue
            start = time.perf_counter()
            checkpoints = RUNNERS[method](problem, args)
            total = time.perf_counter() - start
            results[name][method] = checkpoints
            reached = time_to_accuracy(checkpoints, args.tol)
            final = checkpoints[-1][1] if checkpoints else math.inf
            table.append((name, method, reached, final, total))
            shown = f"{reached:8.1f} s" if reached is not None else "  not reached"
            print(
                f"  {method:<13} time to error <= {args.tol}: {shown}   final error "
                f"{final:.3f}   run {total:.1f} s"
            )
    print()
    print(f"{'problem':<14} {'method':<13} {'time to acc.':>12} {'final err':>10} {'run s':>7}")
    for name, method, reached, final, total in table:
        shown = f"{reached:.1f}" if reached is not None else "-"
        print(f"{name:<14} {method:<13} {shown:>12} {final:10.3f} {total:7.1f}")
    if args.outdir:
        os.makedirs(args.outdir, exist_ok=True)
        plot(results, problems, os.path.join(args.outdir, "peers_accuracy.png"), args.tol)
        with open(os.path.join(args.outdir, "peers.json"), "w") as handle:
            json.dump({"checkpoints": results, "table": table}, handle)
    return {"table": table}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--problems", nargs="+", default=["bench_a", "shared_rate", "observed_path"]
    )
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--tol", type=float, default=0.1, help="error, in posterior sds")
    parser.add_argument("--num-steps", type=int, default=50, help="Euler steps (bench A, shared)")
    parser.add_argument("--num-series", type=int, default=100)
    parser.add_argument("--observed-steps", type=int, default=200)
    parser.add_argument("--svi-steps", type=int, default=1500)
    parser.add_argument("--num-particles", type=int, default=16)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--warmup-steps", type=int, default=300)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--mcmc-every", type=int, default=50)
    parser.add_argument("--max-tree-depth", type=int, default=8)
    parser.add_argument(
        "--time-limit", type=float, default=75.0, help="seconds per method and problem"
    )
    parser.add_argument("--outdir", default=None, help="write peers_accuracy.png here")
    parser.add_argument("--smoke", action="store_true", help="bench A, tiny sizes")
    args = parser.parse_args(argv)
    if args.smoke:
        args.problems = ["bench_a"]
        args.num_steps, args.num_series, args.observed_steps = 5, 4, 5
        args.svi_steps, args.eval_every, args.num_particles = 4, 2, 2
        args.warmup_steps, args.num_samples, args.mcmc_every, args.max_tree_depth = 5, 6, 3, 3
    return args


if __name__ == "__main__":
    main(parse_args())
