"""Checkpointed blocks (pyro_latdiff.checkpoint) and memory flat in the number of steps:
the blocked chains give the default's loss and gradients, and the autograd graph of an
SVI step does not grow with the number of steps."""

import gc
import weakref

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from pyro_latdiff import DiffusionGuide, LatentDiffusion
from pyro_latdiff.checkpoint import checkpoint_block


def _stack(x, w, theta):
    for _ in range(3):
        x = torch.tanh(x @ w) * theta
    return x, x.sum(-1)


def test_gradients_reach_arguments_closed_over_leaves_and_closed_over_non_leaves():
    torch.manual_seed(0)
    w = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    a = torch.randn(3, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)

    def loss(blocked):
        theta = a.exp()  # a non-leaf the blocks close over
        x = x0
        for _ in range(3):
            block = lambda x: _stack(x, w, theta)  # noqa: E731
            x, total = checkpoint_block(block, x) if blocked else block(x)
        return x.square().sum() + total.sum()

    plain = torch.autograd.grad(loss(False), [w, a, x0])
    blocked = torch.autograd.grad(loss(True), [w, a, x0])
    for p, b in zip(plain, blocked, strict=True):
        assert torch.allclose(p, b, rtol=1e-12, atol=1e-14)
    loss(True).backward()  # .backward accumulates into the leaves as well
    assert torch.allclose(w.grad, plain[0], rtol=1e-12)


def test_a_block_with_its_own_inner_gradient_is_differentiated_through_it():
    """A block that differentiates inside (a drift's Jacobian): the inner graph is
    built in the block and its gradient reaches the closed-over parameter."""
    a = torch.tensor([0.3, -0.7], dtype=torch.float64, requires_grad=True)

    def block(x):
        with torch.enable_grad():
            y = x.detach().requires_grad_()
            (jacobian,) = torch.autograd.grad((a * y.sin()).sum(), y, create_graph=True)
        return jacobian * x

    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    (plain,) = torch.autograd.grad(block(x).sum(), a)
    (blocked,) = torch.autograd.grad(checkpoint_block(block, x).sum(), a)
    assert torch.allclose(plain, blocked, rtol=1e-12)
    assert torch.allclose(plain, x.detach().cos() * x.detach(), rtol=1e-12)


def test_without_gradients_a_block_is_a_plain_call():
    x = torch.ones(3, requires_grad=True)
    with torch.no_grad():
        out = checkpoint_block(lambda x: 2 * x, x)
    assert out.grad_fn is None and torch.equal(out, 2 * torch.ones(3))
    constant = checkpoint_block(lambda x: 2 * x, torch.ones(3))  # nothing requires grad
    assert not constant.requires_grad


def _model_factory(kind: str, num_steps: int, block_size):
    """Models whose guide takes each filter branch: diagonal scalars (D = 1), a coupled
    drift (matrix filter), general noise, state-dependent noise, a nonlinear drift
    (relinearised)."""
    times = torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64)
    observed = torch.arange(2, num_steps, 3)
    dim = 1 if kind in ("scalar", "state_noise", "nonlinear") else 2

    def model(y):
        theta = pyro.sample("theta", dist.LogNormal(torch.tensor(0.0, dtype=torch.float64), 0.5))
        rate = theta.unsqueeze(-1)
        with pyro.plate("series", y.shape[0]):
            x0 = torch.zeros(y.shape[0], dim, dtype=torch.float64)
            kwargs = {}
            if kind == "coupled":
                coupling = torch.tensor([[1.0, 0.5], [-0.5, 1.0]], dtype=torch.float64)
                drift = lambda t, x: -rate * (x @ coupling.T)  # noqa: E731
                diffusion = 1.0
            elif kind == "general":
                drift = lambda t, x: -rate * x  # noqa: E731
                diffusion = torch.tensor([[1.0, 0.2, 0.0], [0.3, 0.8, 0.4]], dtype=torch.float64)
                kwargs["noise_type"] = "general"
            elif kind == "state_noise":
                drift = lambda t, x: -rate * x  # noqa: E731
                diffusion = lambda t, x: 0.5 + 0.3 * torch.sigmoid(x)  # noqa: E731
            elif kind == "nonlinear":
                drift = lambda t, x: rate * (x - x**3)  # noqa: E731
                diffusion = 0.7
            else:
                drift = lambda t, x: -rate * x  # noqa: E731
                diffusion = 1.0
            path = pyro.sample(
                "path",
                LatentDiffusion(drift, diffusion, x0, times, block_size=block_size, **kwargs),
            )
            pyro.sample("y", dist.Normal(path[..., observed, :].sum(-1), 0.3).to_event(1), obs=y)

    return model, len(observed)


def _loss_and_grads(kind, num_steps, block_size, seed=3):
    model, num_obs = _model_factory(kind, num_steps, block_size)
    y = torch.randn(3, num_obs, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pyro.clear_param_store()
    guide = DiffusionGuide(model, name="g")
    guide(y)
    # Every parameter set from a generator of its own (blocks draw the global stream
    # differently while the model first runs), away from the zero initialisation.
    generator = torch.Generator().manual_seed(5)
    for param in guide.parameters():
        param.data.copy_(0.05 * torch.randn(param.shape, generator=generator, dtype=param.dtype))
    pyro.set_rng_seed(seed)
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.differentiable_loss(model, guide, y)
    params = list(guide.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss, [
        torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
    ]


@pytest.mark.parametrize("kind", ["scalar", "coupled", "general", "state_noise", "nonlinear"])
@pytest.mark.parametrize("block_size", [4, 7])
def test_blocked_model_and_guide_give_the_default_loss_and_gradients(kind, block_size):
    """block_size on the model's path site: the model's log_prob, the guide's filter,
    simulation and score all run in blocks (an uneven last block with 7), with the
    default's values and gradients to 1e-10 in float64."""
    loss, grads = _loss_and_grads(kind, 18, None)
    blocked_loss, blocked_grads = _loss_and_grads(kind, 18, block_size)
    assert torch.isfinite(loss)
    assert torch.allclose(loss, blocked_loss, rtol=1e-10)
    for g, b in zip(grads, blocked_grads, strict=True):
        assert torch.allclose(g, b, rtol=1e-8, atol=1e-10)


def test_a_blocked_step_leaves_nothing_alive():
    """The blocked kernel keeps the blocks' outputs (the filter's boundaries) and the
    blocks' closures must not reach it back, or the kernel and its graph form a cycle
    through the autograd nodes that the garbage collector cannot see."""
    from pyro_latdiff.filter import BlockedGuidedKernel

    model, num_obs = _model_factory("scalar", 20, 4)
    y = torch.zeros(3, num_obs, dtype=torch.float64)
    pyro.clear_param_store()
    guide = DiffusionGuide(model, name="g")
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    for _ in range(2):
        elbo.differentiable_loss(model, guide, y).backward()
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is BlockedGuidedKernel]


@pytest.mark.parametrize("block_size", [None, 4])
def test_a_step_is_freed_without_the_cyclic_collector(block_size):
    """Every object of an SVI step is freed by reference counting when the step ends.
    torchsde's wrapper of an SDE keeps bound methods of its own, a reference cycle:
    while it reached the chain, each step's chains, tables and autograd graph waited
    for Python's cyclic collector, and the peak memory of later steps varied with
    when it ran."""
    from pyro_latdiff.chain import ControlledChain
    from pyro_latdiff.filter import GuidedKernel

    model, num_obs = _model_factory("scalar", 20, block_size)
    y = torch.zeros(3, num_obs, dtype=torch.float64)
    pyro.clear_param_store()
    guide = DiffusionGuide(model, name="g")
    elbo = Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
    elbo.differentiable_loss(model, guide, y).backward()
    gc.collect()
    gc.disable()
    try:
        for _ in range(2):
            elbo.differentiable_loss(model, guide, y).backward()
        alive = [o for o in gc.get_objects() if type(o) in (ControlledChain, GuidedKernel)]
    finally:
        gc.enable()
    assert not alive


def _graph_size(loss: torch.Tensor) -> int:
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


def test_the_autograd_graph_of_an_svi_step_grows_with_the_blocks_not_the_steps():
    """Memory flat in N: with blocks the graph has a few nodes per block (whatever the
    block holds is recomputed), so 10x the steps in 10x larger blocks is about the same
    graph, while the default graph grows with the steps."""

    def size(num_steps, block_size):
        model, num_obs = _model_factory("scalar", num_steps, block_size)
        y = torch.zeros(3, num_obs, dtype=torch.float64)
        pyro.clear_param_store()
        guide = DiffusionGuide(model, name="g")
        elbo = Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1)
        return _graph_size(elbo.differentiable_loss(model, guide, y))

    small, large = size(40, 4), size(400, 40)
    assert large <= 1.2 * small
    assert size(400, None) > 5 * large


@pytest.mark.parametrize("block_size", [0, -3, 2.5, True])
def test_a_bad_block_size_is_one_clear_error(block_size):
    times = torch.linspace(0.0, 1.0, 11)
    with pytest.raises(ValueError, match="block_size"):
        LatentDiffusion(lambda t, x: -x, 1.0, torch.zeros(1), times, block_size=block_size)


def test_sparse_observation_terms_are_the_dense_terms_at_the_observed_states():
    """In blocks the guide keeps the terms of the observed states only: the rows of
    the dense terms there, zero elsewhere, with the same derivatives to a loading; a
    loading of zero (every derivative to the path zero at these values) still keeps
    its states, and a state reached through ``where`` only is left out."""
    from pyro_latdiff.filter import SparseObservationTerms, observation_terms

    generator = torch.Generator().manual_seed(0)
    path = torch.randn(3, 12, 2, generator=generator, dtype=torch.float64).requires_grad_()
    loading = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    observed = torch.tensor([1, 4, 5, 11])
    masked = torch.where(torch.zeros(3, 1, 2, dtype=torch.bool), path[..., 7:8, :], 0.0)
    loc = (path[..., observed, :] * loading).sum(-1) + masked.sum((-2, -1)).unsqueeze(-1)
    log_lik = dist.Normal(loc, 0.5).log_prob(y).sum() - 0.1 * path[..., 9, :].square().sum()
    dense = observation_terms(log_lik, path, create_graph=True)
    sparse = observation_terms(log_lik, path, create_graph=True, sparse=True)
    assert isinstance(sparse, SparseObservationTerms)
    assert sparse.states == (1, 4, 5, 9, 11) and sparse.num_states == 12
    for first, stop in [(0, 12), (3, 6), (6, 9), (10, 12)]:
        for d, s in zip((t[first:stop] for t in dense), sparse.rows(first, stop), strict=True):
            assert torch.equal(d, s)
    # The derivatives to the loading (zero-valued terms at loading 0) agree.
    weights = [torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in dense]

    def weighted(terms):
        return sum((w * t).sum() for w, t in zip(weights, terms, strict=True))

    d_dense = torch.autograd.grad(weighted(dense), loading, retain_graph=True)
    d_sparse = torch.autograd.grad(weighted(sparse.rows(0, 12)), loading)
    assert d_dense[0].abs().sum() > 0
    assert torch.allclose(d_dense[0], d_sparse[0], rtol=1e-12)


def test_a_blocked_kernel_keeps_no_terms_of_the_size_of_the_path(monkeypatch):
    """The blocked guided kernel of a path observed at a few of many steps holds the
    observation terms of those states only."""
    from pyro_latdiff.filter import BlockedGuidedKernel

    model, num_obs = _model_factory("scalar", 60, 10)
    y = torch.zeros(3, num_obs, dtype=torch.float64)
    pyro.clear_param_store()
    guide = DiffusionGuide(model, name="g")
    kernels = []
    original = BlockedGuidedKernel.__init__

    def record(self, *args, **kwargs):
        original(self, *args, **kwargs)
        kernels.append(self)

    monkeypatch.setattr(BlockedGuidedKernel, "__init__", record)
    guide(y)
    (kernel,) = kernels
    terms = kernel._filter.terms
    assert terms.states == tuple(range(2, 60, 3))
    assert terms.precision.shape[0] == terms.information.shape[0] == num_obs


def test_blocks_let_the_increments_go_and_the_recomputation_draws_the_same_ones(monkeypatch):
    """A blocked solve keeps no path-sized increments from its forward pass to the
    backward pass: each block recomputed draws its own again from the generator's saved
    state (the same numbers: the path and its gradients equal the default solve's),
    which leaves the generator as it was."""
    from pyro_latdiff import sde

    drawn, redrawn = [], []
    draw, rows = sde._GridNormal.draw, sde._GridNormal.rows

    def recorded_draw(self):
        drawn.append(weakref.ref(out := draw(self)))
        return out

    def recorded_rows(self, start, stop):
        state = torch.get_rng_state()
        out = rows(self, start, stop)
        redrawn.append((start, stop, torch.equal(state, torch.get_rng_state())))
        return out

    monkeypatch.setattr(sde._GridNormal, "draw", recorded_draw)
    monkeypatch.setattr(sde._GridNormal, "rows", recorded_rows)
    monkeypatch.setattr(sde, "DRAW_STEPS", 16)  # blocks across chunks, a merged last one
    times = torch.linspace(0.0, 1.0, 50, dtype=torch.float64)
    rate = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    x0 = torch.ones(5, 2, dtype=torch.float64)

    def run(block_size):
        drawn.clear()
        redrawn.clear()
        pyro.set_rng_seed(4)
        step = lambda k, x: (-rate * x, 0.3 + 0.2 * torch.tanh(x))  # noqa: E731
        path = sde.simulate(step, x0, times, block_size=block_size)
        released = [ref() is None for ref in drawn]
        (grad,) = torch.autograd.grad((path**2).sum(), rate)
        return path.detach(), grad, released, list(redrawn)

    path, grad, kept, none = run(None)
    blocked_path, blocked_grad, released, blocks = run(10)
    assert kept == [False] and none == []  # the default's graph holds its increments
    assert released == [True]
    assert sorted(blocks) == [(start, min(start + 10, 49), True) for start in range(0, 49, 10)]
    assert torch.equal(path, blocked_path)
    assert torch.allclose(grad, blocked_grad, rtol=1e-12)


@pytest.mark.parametrize("num_steps, batch", [(300, 64), (129, 5), (1000, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("block_size", [None, 70])
def test_increments_drawn_in_chunks_are_one_draw_of_the_grid_on_cpu(
    num_steps, batch, dtype, block_size
):
    """The chunks keep the numbers of a single draw over the grid (those of earlier
    versions), a last chunk of fewer than 16 numbers included: the path drawn equals
    the path given that draw as its noise."""
    from pyro_latdiff.sde import simulate

    times = torch.cat([torch.zeros(1), torch.rand(num_steps).cumsum(0)]).to(dtype)
    x0 = torch.zeros(batch, 1, dtype=dtype)
    step = lambda k, x: (-0.5 * x, 0.7 + 0.1 * x.tanh())  # noqa: E731
    torch.manual_seed(2)
    once = torch.randn(num_steps, batch, 1, dtype=dtype)
    given = simulate(step, x0, times, noise=once)
    torch.manual_seed(2)
    drawn = simulate(step, x0, times, block_size=block_size)
    assert torch.equal(drawn, given)


def test_grid_brownian_draws_released_increments_again_and_checks_them():
    from pyro_latdiff.sde import GridBrownian

    noise = torch.randn(4, 3, 2)
    bm = GridBrownian(noise.clone(), redraw=lambda a, b: noise[a:b].clone())
    bm.release()
    bm.start_solve(1, 3)
    assert torch.equal(bm(torch.tensor(1.0), torch.tensor(2.0)), noise[1])
    assert torch.equal(bm(torch.tensor(2.0), torch.tensor(3.0)), noise[2])
    with pytest.raises(RuntimeError, match=r"expected a step in 1 \.\. 2, actual step 3"):
        bm(torch.tensor(3.0), torch.tensor(4.0))
    assert torch.equal(bm.noise, noise)
    with pytest.raises(RuntimeError, match="`redraw`"):
        GridBrownian(noise).release()
    bm = GridBrownian(noise, redraw=lambda a, b: noise[a : b + 1])
    bm.release()
    with pytest.raises(RuntimeError, match=r"expected `redraw` to return .* \(2, 3, 2\)"):
        bm.start_solve(0, 2)
