"""pyro_latdiff.sampling.replay: the Brownian bridge's law, the replay buffer (contents,
priority, local search) and the log-variance loss on replayed paths. Tolerances in
standard errors."""

from __future__ import annotations

import math

import pyro
import pytest
import torch

from pyro_latdiff.sampling import FollmerSampler, LogVarianceELBO, ReplayBuffer, brownian_bridge
from pyro_latdiff.testing import GaussianTarget

DTYPE = torch.float64
TOL = 4.0  # standard errors


def test_brownian_bridge_from_the_terminal_law_is_brownian_motion():
    """x1 ~ N(x0, sigma^2 T) and the bridge to it: the increments are independent
    N(0, sigma^2 h_k) (a non-uniform grid, a start other than 0, sigma per coordinate)."""
    torch.manual_seed(0)
    times = torch.tensor([0.5, 0.6, 0.9, 1.0, 1.7], dtype=DTYPE)
    sigma = torch.tensor([0.7, 2.0], dtype=DTYPE)
    x0 = torch.tensor([1.0, -3.0], dtype=DTYPE)
    n, horizon = 40_000, 1.2
    x1 = x0 + sigma * math.sqrt(horizon) * torch.randn(n, 2, dtype=DTYPE)
    paths = brownian_bridge(x1, times, sigma, x0)
    assert paths.shape == (n, 4, 2)
    assert torch.equal(paths[:, -1], x1)
    increments = (paths - torch.cat([x0.expand(n, 1, 2), paths[:, :-1]], 1)) / sigma
    steps = times.diff()
    for d in range(2):
        flat = increments[..., d]  # (n, 4)
        covariance = flat.T @ flat / n
        # Entries of E[xi xi^T]: se sqrt(h_i h_j / n) off the diagonal, sqrt(2/n) h_i on it.
        se = torch.outer(steps.sqrt(), steps.sqrt()) / math.sqrt(n)
        se = se + torch.diag(steps * (math.sqrt(2 / n) - 1 / math.sqrt(n)))
        assert ((covariance - torch.diag(steps)).abs() < TOL * se).all(), covariance
        assert (flat.mean(0).abs() < TOL * (steps / n).sqrt()).all()


def test_brownian_bridge_marginals_given_the_end():
    torch.manual_seed(1)
    times = torch.linspace(0, 1, 5, dtype=DTYPE)
    x1 = torch.tensor([[2.0, -1.0]], dtype=DTYPE).expand(20_000, 2)
    paths = brownian_bridge(x1, times, 1.5)
    t = times[1:-1, None]
    mean, var = t * x1[0], 1.5**2 * t * (1 - t)
    n = x1.shape[0]
    assert ((paths[:, :-1].mean(0) - mean).abs() < TOL * (var / n).sqrt()).all()
    assert ((paths[:, :-1].var(0) - var).abs() < TOL * var * math.sqrt(2 / (n - 1))).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(times=torch.tensor([0.0])), "times"),
        (dict(times=torch.tensor([0.0, 0.5, 0.5])), "strictly increasing"),
        (dict(x1=torch.tensor(1.0)), "x1"),
    ],
)
def test_brownian_bridge_bad_inputs(kwargs, match):
    args = dict(x1=torch.zeros(3, 2), times=torch.linspace(0, 1, 4))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        brownian_bridge(**args)


def _buffer(target, **kwargs):
    return ReplayBuffer(
        target.log_prob, target.dim, torch.linspace(0, 1, 11, dtype=DTYPE), dtype=DTYPE, **kwargs
    )


def test_buffer_keeps_the_newest_finite_states_up_to_capacity():
    def log_density(x):
        out = -0.5 * x.square().sum(-1)
        return torch.where(x[..., 0] > 10, torch.full_like(out, math.nan), out)

    buffer = ReplayBuffer(log_density, 2, torch.linspace(0, 1, 3), capacity=5)
    buffer.add(torch.tensor([[0.0, 0.0], [11.0, 0.0], [1.0, 0.0]]))
    assert len(buffer) == 2  # the NaN state is not kept
    buffer.add(torch.arange(8.0).reshape(4, 2))
    assert len(buffer) == 5
    assert torch.equal(buffer.states[0], torch.tensor([1.0, 0.0]))  # oldest left first
    assert torch.equal(buffer.states[-1], torch.tensor([6.0, 7.0]))
    assert torch.allclose(buffer.log_densities, -0.5 * buffer.states.square().sum(-1))
    with pytest.raises(ValueError, match=r"Expected `states` of shape \(M, 2\)"):
        buffer.add(torch.zeros(3))


def test_rank_priority_draws_in_proportion_to_its_weights():
    torch.manual_seed(2)
    target = GaussianTarget(1, 0.0, 1.0, DTYPE)
    buffer = _buffer(target, priority="rank", rank_weight=0.5)
    states = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=DTYPE)  # densities fall
    buffer.add(states)
    n = 40_000
    draws = buffer.sample(n)
    counts = torch.stack([(draws[:, 0] == s).sum() for s in states[:, 0]]).to(DTYPE)
    weights = 1 / (0.5 * 4 + torch.arange(4, dtype=DTYPE))
    p = weights / weights.sum()
    se = (n * p * (1 - p)).sqrt()
    assert ((counts - n * p).abs() < TOL * se).all(), counts / n
    uniform = _buffer(target)
    uniform.add(states)
    counts = torch.stack([(uniform.sample(n)[:, 0] == s).sum() for s in states[:, 0]])
    assert ((counts.to(DTYPE) - n / 4).abs() < TOL * math.sqrt(n * 3 / 16)).all()


def test_local_search_leaves_the_target_invariant_and_finds_it():
    """MALA: from exact draws the moments stay the target's; from a point they reach it."""
    torch.manual_seed(3)
    target = GaussianTarget(3, 1.0, 1.5, DTYPE)
    n = 4000
    for start in (target.mean + target.scale * torch.randn(n, 3, dtype=DTYPE), torch.zeros(n, 3)):
        buffer = _buffer(
            target, capacity=n, local_search_size=n, local_search_steps=100, step_size=0.5
        )
        buffer.add(start.to(DTYPE))
        buffer.local_search()
        x = buffer.states  # the capacity keeps only the search's results
        mean_se = target.scale / math.sqrt(n)
        var_se = target.scale**2 * math.sqrt(2 / (n - 1))
        # MALA's draws are correlated across its steps, not across chains: chains are
        # independent, so the i.i.d. standard errors hold.
        assert ((x.mean(0) - target.mean).abs() < TOL * mean_se).all(), x.mean(0)
        assert ((x.var(0) - target.scale**2).abs() < TOL * var_se).all(), x.var(0)
        assert 0.4 < buffer.acceptance_rate < 0.75
        assert buffer.density.num_gradient_evaluations == n * 101


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(capacity=0), "capacity"),
        (dict(priority="best"), "priority"),
        (dict(local_search_every=-1), "local_search_every"),
        (dict(step_size=0.0), "step_size"),
        (dict(target_accept=1.5), "target_accept"),
    ],
)
def test_buffer_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _buffer(GaussianTarget(2), **kwargs)
    with pytest.raises(RuntimeError, match="empty"):
        _buffer(GaussianTarget(2)).sample(3)


def test_replayed_paths_have_zero_log_variance_at_the_optimum():
    """With the exact Föllmer drift the guide's log-ratio is (nearly) constant on every
    path, so also on the bridge paths to states far from the target's bulk: the loss on
    replayed paths vanishes there, and not at the untrained guide."""
    torch.manual_seed(4)
    target = GaussianTarget(2, 1.0, 1.5, DTYPE)
    kwargs = dict(control="network", loss="log_variance", num_steps=200, dtype=DTYPE)
    exact = FollmerSampler(target.log_prob, 2, base_drift=target.follmer_drift, **kwargs)
    prior = FollmerSampler(target.log_prob, 2, **kwargs)
    losses = {}
    for name, sampler in (("exact", exact), ("prior", prior)):
        buffer = ReplayBuffer(target.log_prob, 2, sampler.times, dtype=DTYPE)
        buffer.add(4.0 + 2 * torch.randn(256, 2, dtype=DTYPE))  # far from N(1, 1.5^2)
        loss = LogVarianceELBO(2, max_plate_nesting=0, replay=buffer, replay_particles=256)
        losses[name] = loss.loss(sampler.model, sampler.guide)
        assert len(buffer) == 256 + 2  # the two on-policy terminal states were added
    assert losses["exact"] < 0.02 * losses["prior"], losses


def test_replay_trains_the_sampler_and_fills_its_buffer():
    torch.manual_seed(5)
    pyro.set_rng_seed(5)
    target = GaussianTarget(2, 1.0, 1.5, DTYPE)
    sampler = FollmerSampler(
        target.log_prob, 2, num_steps=10, loss="log_variance", replay=True, hidden_dims=(32,)
    )
    before = sampler.log_normalizer(500)
    sampler.fit(40, num_particles=32, lr=1e-2)
    after = sampler.log_normalizer(500)
    assert after.elbo > before.elbo
    buffer = sampler.replay
    # 32 terminal states per step, and 4 local searches of 512 states.
    assert len(buffer) == 40 * 32 + 4 * 512
    assert math.isfinite(buffer.acceptance_rate)
    # The buffer counts its evaluations with the sampler's.
    assert sampler.density is buffer.density


def test_replay_errors():
    target = GaussianTarget(2)
    with pytest.raises(ValueError, match="loss='log_variance' with `replay`"):
        FollmerSampler(target.log_prob, 2, replay=True)
    with pytest.raises(ValueError, match="`replay` to be a bool or a ReplayBuffer"):
        FollmerSampler(target.log_prob, 2, loss="log_variance", replay="yes")
    sampler = FollmerSampler(target.log_prob, 2, num_steps=10, loss="log_variance")
    wrong_grid = ReplayBuffer(target.log_prob, 2, torch.linspace(0, 1, 6))
    loss = LogVarianceELBO(4, max_plate_nesting=0, replay=wrong_grid)
    with pytest.raises(ValueError, match="ReplayBuffer's `times`"):
        loss.loss(sampler.model, sampler.guide)
    misnamed = LogVarianceELBO(4, max_plate_nesting=0, replay=wrong_grid, replay_site="x")
    with pytest.raises(ValueError, match="`replay_site` 'x'"):
        misnamed.loss(sampler.model, sampler.guide)
    with pytest.raises(ValueError, match="`replay` to be a ReplayBuffer"):
        LogVarianceELBO(4, replay=object())
    with pytest.raises(ValueError, match="replay_particles"):
        LogVarianceELBO(4, replay=wrong_grid, replay_particles=0)
