"""Data-parallel SVI: two gloo processes take the same steps as one process."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_latdiff import DiffusionGuide, LatentDiffusion
from pyro_latdiff.parallel import DataParallelSVI, init_process_group, shard_slice

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parallel_problem import NUM_SERIES, make_problem, shard_fn  # noqa: E402

WORKER = Path(__file__).resolve().parent / "parallel_worker.py"
NUM_STEPS = 3


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_processes(tmp_path):
    out = tmp_path / "rank0.pt"
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE="2",
        PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]
        ),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out), str(NUM_STEPS)],
            env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=240)[0].decode())
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
    for proc, log in zip(procs, logs, strict=True):
        assert proc.returncode == 0, log
    return torch.load(out)


def one_process_run(num_shards):
    pyro.clear_param_store()
    problem, y, guide, optim = make_problem()
    svi = DataParallelSVI(
        problem.model, guide, optim, shard_fn=shard_fn, num_shards=num_shards, seed=3
    )
    losses = [svi.step(y) for _ in range(NUM_STEPS)]
    return {"params": svi.parameters(), "losses": losses}


def test_two_processes_equal_one_process_with_the_same_shards(tmp_path):
    """The 2-process run (gloo, one shard per rank) and a 1-process run computing the
    same two shards one after the other draw the same random numbers per shard (seeded
    by (seed, step, shard)), so after k Adam steps their parameters agree to rounding."""
    distributed = run_two_processes(tmp_path)
    local = one_process_run(num_shards=2)
    assert distributed["params"].keys() == local["params"].keys()
    for name, value in local["params"].items():
        other = distributed["params"][name]
        scale = value.abs().max().clamp(min=1e-12)
        assert (other - value).abs().max() / scale < 1e-6, name
    assert distributed["losses"] == pytest.approx(local["losses"], rel=1e-6)
    # The steps moved the parameters: the check is not of an untouched initialisation.
    pyro.clear_param_store()
    _, y, guide, _ = make_problem()
    with poutine.block(), torch.no_grad():
        guide(*shard_fn(0, 2, y)[0])
    store = pyro.get_param_store()
    assert not torch.equal(
        store["parallel_guide.locs.theta"], local["params"]["parallel_guide.locs.theta"]
    )


def test_sharded_objective_is_the_full_data_elbo_on_the_same_draws():
    """Deterministic: replay one full-data guide draw on each shard; the weighted shard
    losses (weights m_s / M) sum to the full-data loss, value and gradient."""
    pyro.clear_param_store()
    # Scored with its parameters attached: on replayed (fixed) values the path-derivative
    # form would leave the loss with no gradient at all to compare.
    problem, y, guide, _ = make_problem(path_derivative=False)
    elbo = pyro.infer.Trace_ELBO(max_plate_nesting=1)
    with poutine.block(), torch.no_grad():
        full_trace = poutine.trace(guide).get_trace(y)

    # A guide of the same name shares the parameters; it is built for a shard's size.
    shard_guide = DiffusionGuide(
        problem.model, hidden_dims=(8,), name="parallel_guide", path_derivative=False
    )

    def loss_on(guide, trace, *args):
        fixed = poutine.replay(guide, trace=trace)
        return elbo.differentiable_loss(problem.model, fixed, *args)

    def shard_trace(index):
        trace = full_trace.copy()
        trace.nodes = {name: dict(site) for name, site in full_trace.nodes.items()}
        trace.nodes["path"]["value"] = full_trace.nodes["path"]["value"][..., index, :, :]
        trace.nodes["series"]["value"] = torch.arange(NUM_SERIES)[index]
        return trace

    full = loss_on(guide, full_trace, y)
    params = [p.unconstrained() for p in pyro.get_param_store().values()]
    full_grads = torch.autograd.grad(full, params, allow_unused=True)
    total = 0.0
    for shard in range(2):
        index = shard_slice(NUM_SERIES, shard, 2)
        total = total + 0.5 * loss_on(shard_guide, shard_trace(index), y[index], NUM_SERIES)
    shard_grads = torch.autograd.grad(total, params, allow_unused=True)
    assert total.item() == pytest.approx(full.item(), rel=1e-10)
    for a, b in zip(full_grads, shard_grads, strict=True):
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def test_one_shard_is_plain_svi_objective():
    """num_shards=1 takes the unsharded path (weight 1) and trains."""
    run = one_process_run(num_shards=1)
    assert len(run["losses"]) == NUM_STEPS and all(
        map(torch.isfinite, map(torch.tensor, run["losses"]))
    )


def test_bad_input_is_one_value_error_naming_the_argument():
    pyro.clear_param_store()
    problem, y, guide, optim = make_problem()
    with pytest.raises(ValueError, match="`num_shards`"):
        DataParallelSVI(problem.model, guide, optim, shard_fn=shard_fn, num_shards=0)
    with pytest.raises(ValueError, match="`shard_fn`"):
        DataParallelSVI(problem.model, guide, optim, num_shards=2)
    with pytest.raises(ValueError, match="`seed`"):
        DataParallelSVI(problem.model, guide, optim, seed=-1)
    with pytest.raises(ValueError, match="`num_shards`"):
        shard_slice(3, 0, 4)
    with pytest.raises(ValueError, match="`shard`"):
        shard_slice(3, 3, 3)
    with pytest.raises(ValueError, match="`backend`"):
        init_process_group("tcp")
    # Shards that do not subsample the plate: every shard would count as the full data.
    svi = DataParallelSVI(
        problem.model,
        guide,
        optim,
        shard_fn=lambda s, n, y: ((y[shard_slice(len(y), s, n)],), {}),
        num_shards=2,
    )
    with pytest.raises(ValueError, match="`shard_fn`.*cover plate 'series'|subsample a plate"):
        svi.step(y)


def test_uneven_shards_in_one_process_are_refused():
    pyro.clear_param_store()
    problem, _, guide, optim = make_problem()
    y = torch.linspace(-1, 1, 7)
    svi = DataParallelSVI(problem.model, guide, optim, shard_fn=shard_fn, num_shards=2)
    with pytest.raises(ValueError, match="`shard_fn` to give shards of equal size"):
        svi.step(y)


def test_a_per_series_latent_under_the_sharded_plate_is_refused():
    """The guide's loc of a per-series latent has the plate's full size and is read at
    the guide's own draw of the plate's indices, not at the shard's series: each shard
    would train another series' parameters. Refused, naming the site."""
    times = torch.linspace(0.0, 1.0, 5)

    def model(y, num_series):
        with pyro.plate("series", num_series, subsample_size=y.shape[0]):
            a = pyro.sample("a", dist.Normal(0.0, 1.0))
            x0 = a.unsqueeze(-1) * torch.ones(y.shape[0], 1)
            path = pyro.sample("path", LatentDiffusion(lambda t, x: -x, 1.0, x0, times))
            pyro.sample("y", dist.Normal(path[..., -1, 0], 0.1), obs=y)

    def shard_fn(shard, num_shards, y):
        return (y[shard_slice(len(y), shard, num_shards)], len(y)), {}

    guide = DiffusionGuide(model, hidden_dims=(4,))
    optim = pyro.optim.Adam({"lr": 0.1})
    svi = DataParallelSVI(model, guide, optim, shard_fn=shard_fn, num_shards=2)
    with pytest.raises(ValueError, match=r"sharded plate 'series'.*site 'a' is a per-series"):
        svi.step(torch.arange(8.0))
