import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive, RenyiELBO, Trace_ELBO

from pyro_latdiff import LatentDiffusion
from pyro_latdiff.sde import SingularNoiseError, solve
from pyro_latdiff.testing import LinearSDE, SharedRateOU

DTYPE = torch.float64


def t64(values):
    return torch.tensor(values, dtype=DTYPE)


def linear_problem(times):
    """A 2-D linear SDE with coupled drift, per-dimension noise and an offset."""
    return LinearSDE(
        A=t64([[-1.0, 0.5], [-0.3, -0.2]]),
        c=t64([0.2, -0.1]),
        sigma=t64([0.7, 1.3]),
        x0=t64([0.5, -1.0]),
        times=times,
        H=t64([[1.0, 0.0]]),
        obs_scale=t64([0.2]),
    )


GRIDS = {
    "uniform": torch.linspace(0.0, 1.0, 11, dtype=DTYPE),
    "non-uniform": t64([0.0, 0.05, 0.1, 0.3, 0.35, 0.6, 1.0, 1.1]),
}


@pytest.mark.parametrize("grid", list(GRIDS))
def test_log_prob_equals_exact_joint_gaussian(grid):
    problem = linear_problem(GRIDS[grid])
    d = problem.distribution()
    paths = d.sample((5, 3))
    exact = problem.path_distribution().log_prob(paths.reshape(5, 3, -1))
    assert paths.shape == (5, 3) + d.event_shape
    assert torch.allclose(d.log_prob(paths), exact, atol=1e-8, rtol=0)


def _manual_chain_log_prob(drift, diffusion, x0, times, path):
    """Reference: loop over the transitions with torch's Normal."""
    total = 0.0
    x = x0
    for k in range(times.shape[0] - 1):
        h = times[k + 1] - times[k]
        t = times[k]
        step = dist.Normal(x + drift(t, x) * h, diffusion(t, x) * h.sqrt())
        total = total + step.log_prob(path[..., k, :]).sum(-1)
        x = path[..., k, :]
    return total


def _manual_chain_sample(drift, diffusion, x0, times, noise):
    x, states = x0, []
    for k in range(times.shape[0] - 1):
        h = times[k + 1] - times[k]
        x = x + drift(times[k], x) * h + diffusion(times[k], x) * h.sqrt() * noise[k]
        states.append(x)
    return torch.stack(states, dim=-2)


def state_dependent():
    def drift(t, x):
        return torch.sin(x) - t * x

    def diffusion(t, x):
        return 0.5 + 0.3 * torch.tanh(x) ** 2 + 0.1 * t

    return drift, diffusion


@pytest.mark.parametrize("grid", list(GRIDS))
def test_state_dependent_diffusion_matches_manual_chain(grid):
    times = GRIDS[grid]
    drift, diffusion = state_dependent()
    x0 = t64([[0.1, -0.4], [1.0, 2.0], [0.0, 0.0]])
    d = LatentDiffusion(drift, diffusion, x0, times)
    noise = torch.randn((times.shape[0] - 1, 4, 3, 2), dtype=DTYPE)
    path = solve(drift, diffusion, x0.expand(4, 3, 2), times, noise)
    assert torch.allclose(
        path, _manual_chain_sample(drift, diffusion, x0, times, noise), atol=1e-12
    )
    expected = _manual_chain_log_prob(drift, diffusion, x0, times, path)
    assert torch.allclose(d.log_prob(path), expected, atol=1e-10)


@pytest.mark.parametrize("grid", sorted(GRIDS))
@pytest.mark.parametrize("states", [1, 5, 10**6])
def test_log_prob_without_gradients_scores_in_blocks_of_steps(grid, states, monkeypatch):
    """Without gradients log_prob scores a few steps at a time (at most
    SCORING_BLOCK_STATES states): the same value as all steps at once, with gradients."""
    import pyro_latdiff.distribution as distribution

    times = GRIDS[grid]
    drift, diffusion = state_dependent()
    x0 = t64([[0.1, -0.4], [1.0, 2.0], [0.0, 0.0]])
    d = LatentDiffusion(drift, diffusion, x0, times)
    path = d.sample((4,))
    expected = _manual_chain_log_prob(drift, diffusion, x0, times, path)
    monkeypatch.setattr(distribution, "SCORING_BLOCK_STATES", states)
    with torch.no_grad():
        blocked = d.log_prob(path)
    assert torch.allclose(blocked, expected, atol=1e-10)
    assert torch.allclose(blocked, d.log_prob(path), atol=1e-10)


def test_rsample_marginals_match_exact_within_four_standard_errors():
    problem = linear_problem(GRIDS["non-uniform"])
    n = 20000
    paths = problem.distribution().sample((n,))
    means, covs = problem.marginals()
    variances = covs.diagonal(dim1=-2, dim2=-1)
    mean_se = (variances / n).sqrt()
    var_se = variances * math.sqrt(2.0 / (n - 1))
    assert ((paths.mean(0) - means).abs() < 4 * mean_se).all()
    assert ((paths.var(0) - variances).abs() < 4 * var_se).all()


def test_rsample_is_reparameterised():
    theta = torch.tensor(0.7, dtype=DTYPE, requires_grad=True)
    d = LatentDiffusion(lambda t, x: -theta * x, 1.0, t64([1.0]), GRIDS["uniform"])
    d.rsample((8,))[..., -1, 0].sum().backward()
    assert theta.grad is not None and theta.grad.abs() > 0


def test_batch_shapes_and_expand():
    drift, diffusion = state_dependent()
    sigma = t64([[0.5, 1.0], [1.5, 2.0], [1.0, 1.0]])  # per-series, per-dimension
    d = LatentDiffusion(drift, sigma, t64([0.0, 1.0]), GRIDS["uniform"])
    assert d.batch_shape == (3,) and d.event_shape == (10, 2)
    assert d.rsample((4,)).shape == (4, 3, 10, 2)
    e = d.expand((5, 3))
    assert e.batch_shape == (5, 3)
    x = e.sample()
    assert x.shape == (5, 3, 10, 2)
    assert torch.allclose(e.log_prob(x)[2], d.log_prob(x[2]))


def test_drift_closing_over_batched_parameter():
    """The drift sees the distribution's batch shape, time axis leftmost in log_prob."""
    theta = t64([0.5, 1.0, 2.0, 4.0]).reshape(4, 1, 1)  # (P, 1, 1)
    x0 = torch.zeros(3, 1, dtype=DTYPE)  # a plate of 3 series
    d = LatentDiffusion(lambda t, x: -theta * x, 1.0, x0, GRIDS["uniform"])
    assert d.batch_shape == (4, 3)
    path = d.sample()
    for p in range(4):
        single = LatentDiffusion(lambda t, x, p=p: -theta[p] * x, 1.0, x0, GRIDS["uniform"])
        assert torch.allclose(d.log_prob(path)[p], single.log_prob(path[p]))


ou_model = SharedRateOU(GRIDS["uniform"], obs_scale=0.5).model  # a rate, a plate of 3 paths


def ou_guide(y, num_series=3):
    loc = pyro.param("loc", torch.tensor(0.0, dtype=DTYPE))
    theta = pyro.sample("theta", dist.LogNormal(loc, 0.3))
    with pyro.plate("series", num_series):
        pyro.sample(
            "path",
            LatentDiffusion(
                lambda t, x: -theta.unsqueeze(-1) * x + 0.1,
                1.0,
                torch.zeros(num_series, 1, dtype=DTYPE),
                GRIDS["uniform"],
            ),
        )


@pytest.mark.parametrize(
    "elbo",
    [
        Trace_ELBO(num_particles=4, vectorize_particles=True),
        Trace_ELBO(num_particles=2),
        RenyiELBO(alpha=0.5, num_particles=4, vectorize_particles=True),
    ],
    ids=["vectorized", "sequential", "renyi"],
)
def test_works_under_pyro_elbos(elbo):
    y = t64([0.3, -0.2, 1.0])
    loss = elbo.loss_and_grads(ou_model, ou_guide, y)
    assert math.isfinite(loss)
    assert pyro.param("loc").grad is not None


def test_predictive_parallel_and_replay():
    y = t64([0.3, -0.2, 1.0])
    samples = Predictive(ou_model, guide=ou_guide, num_samples=7, parallel=True)(y)
    assert samples["path"].shape == (7, 3, 10, 1)
    guide_trace = poutine.trace(ou_guide).get_trace(y)
    model_trace = poutine.trace(poutine.replay(ou_model, trace=guide_trace)).get_trace(y)
    assert torch.equal(model_trace.nodes["path"]["value"], guide_trace.nodes["path"]["value"])
    model_trace.compute_log_prob()
    assert model_trace.nodes["path"]["log_prob"].shape == (3,)


def bad(match):
    return pytest.raises((ValueError, TypeError), match=match)


def good_args():
    return dict(drift=lambda t, x: -x, diffusion=1.0, x0=t64([0.0]), times=GRIDS["uniform"])


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(times=GRIDS["uniform"].reshape(1, -1)), r"`times`.*1-D.*actual shape \(1, 11\)"),
        (dict(times=t64([0.0])), r"`times`.*at least 2 points"),
        (dict(times=t64([0.0, 0.5, 0.5, 1.0])), r"`times`.*strictly increasing.*times\[1\]"),
        (dict(times=t64([0.0, 1.0, 0.5])), r"`times`.*strictly increasing"),
        (dict(times=t64([0.0, float("nan")])), r"`times`.*finite"),
        (dict(times=[0.0, 1.0]), r"`times`.*torch.Tensor"),
        (dict(x0=t64(0.0)), r"`x0`.*state_dim.*actual shape \(\)"),
        (dict(x0=t64([float("inf")])), r"`x0`.*finite"),
        (dict(x0=torch.zeros(1)), r"`x0` and `times`.*dtype"),
        (dict(drift=lambda t, x: torch.zeros(2, dtype=DTYPE)), r"`drift.*last dimension.*\(2,\)"),
        (
            dict(
                drift=lambda t, x: torch.zeros(3, 1, dtype=DTYPE), x0=torch.zeros(2, 1, dtype=DTYPE)
            ),
            r"`drift.*shaped like x",
        ),
        (dict(drift=3.0), r"`drift`.*callable"),
        (dict(diffusion=-1.0), r"`diffusion`.*positive"),
        (dict(diffusion=0.0), r"`diffusion`.*positive"),
        (dict(diffusion=t64([1.0, 2.0])), r"`diffusion`.*\(\.\.\., 1\)"),
        (dict(diffusion=lambda t, x: -torch.ones_like(x)), r"`diffusion.*positive"),
        (dict(diffusion=lambda t, x: torch.ones(2, dtype=DTYPE)), r"`diffusion.*last dimension"),
        (dict(diffusion="1.0"), r"`diffusion`.*float"),
    ],
)
def test_contract_errors_name_the_argument(change, match):
    with bad(match):
        LatentDiffusion(**{**good_args(), **change})


@pytest.mark.parametrize("validate_args", [True, False])
def test_log_prob_checks_value_shape(validate_args):
    d = LatentDiffusion(**good_args(), validate_args=validate_args)
    with bad(r"`value`.*\(\.\.\., 10, 1\).*actual shape \(9, 1\)"):
        d.log_prob(torch.zeros(9, 1, dtype=DTYPE))


def test_non_finite_drift_is_a_value_not_a_contract_error():
    """A drift that is not finite at x0 (an extreme parameter proposed by NUTS) builds,
    and its log_prob is not finite, so inference can reject the proposal."""
    times = t64([0.0, 0.5, 1.0])
    fn = LatentDiffusion(lambda t, x: x * float("nan"), 1.0, t64([1.0]), times)
    assert not torch.isfinite(fn.log_prob(torch.zeros(2, 1, dtype=DTYPE))).any()
    fn = LatentDiffusion(lambda t, x: -1e308 * x * 1e308, 1.0, t64([1.0]), times)
    assert not torch.isfinite(fn.log_prob(torch.zeros(2, 1, dtype=DTYPE))).any()


@pytest.mark.slow
def test_pyro_nuts_runs_on_a_drift_rate_with_a_heavy_tailed_prior():
    """PyMC's Euler–Maruyama example (a HalfCauchy prior on the rate) under Pyro's NUTS:
    the step-size search proposes extreme rates, whose non-finite drift must make the
    potential non-finite (rejected), not raise."""
    from pyro.infer import MCMC, NUTS

    from pyro_latdiff.testing import EulerMaruyamaExample

    problem = EulerMaruyamaExample(num_steps=15)
    _, y = problem.simulate(l=0.78, s=0.05, seed=0)
    mcmc = MCMC(
        NUTS(problem.model, max_tree_depth=4), warmup_steps=30, num_samples=20, disable_progbar=True
    )
    mcmc.run(y)
    samples = mcmc.get_samples()
    assert samples["l"].shape == (20,) and torch.isfinite(samples["l"]).all()
    assert torch.isfinite(samples["path"]).all()


@pytest.mark.parametrize("state_dependent", [False, True])
def test_general_noise_log_prob_equals_a_multivariate_normal_chain(state_dependent):
    """noise_type="general": sigma is (..., D, M); log_prob is the chain of
    N(x + b h, sigma sigma^T h) transitions, written here with Pyro's MultivariateNormal."""
    torch.manual_seed(0)
    D, M = 3, 4
    times = t64([0.0, 0.1, 0.3, 0.35, 0.7, 1.0])
    G = torch.randn(D, M, dtype=DTYPE)
    B = torch.randn(D, D, dtype=DTYPE)

    def drift(t, x):
        return x @ B.T * 0.3 - x.sin()

    def diffusion(t, x):
        return G * (1.5 + x.tanh().unsqueeze(-1)) if state_dependent else G

    x0 = torch.randn(2, D, dtype=DTYPE)
    fn = LatentDiffusion(drift, diffusion if state_dependent else G, x0, times,
                         noise_type="general")  # fmt: skip
    value = fn.sample((5,))
    assert value.shape == (5, 2, 5, D)
    expected = torch.zeros(5, 2, dtype=DTYPE)
    previous = x0.expand(5, 2, D)
    for k in range(5):
        h = times[k + 1] - times[k]
        sigma = diffusion(times[k], previous)
        mvn = dist.MultivariateNormal(previous + drift(times[k], previous) * h,
                                      covariance_matrix=sigma @ sigma.mT * h)  # fmt: skip
        expected += mvn.log_prob(value[..., k, :])
        previous = value[..., k, :]
    assert torch.allclose(fn.log_prob(value), expected, atol=1e-10, rtol=0)


def test_general_noise_errors_name_the_argument_and_the_step():
    times = t64([0.0, 0.5, 1.0])
    x0 = torch.zeros(2, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"`diffusion` of shape \(\.\.\., 2, M\)"):
        LatentDiffusion(lambda t, x: -x, torch.ones(3, 2, dtype=DTYPE), x0, times,
                        noise_type="general")  # fmt: skip
    with pytest.raises(ValueError, match=r"`diffusion\(times\[0\], x0\)`.*matrix"):
        LatentDiffusion(lambda t, x: -x, lambda t, x: torch.ones_like(x), x0, times,
                        noise_type="general")  # fmt: skip
    with pytest.raises(ValueError, match=r"`noise_type`.*'diagonal' or 'general'"):
        LatentDiffusion(lambda t, x: -x, 1.0, x0, times, noise_type="full")
    singular = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=DTYPE)  # rank 1
    fn = LatentDiffusion(lambda t, x: -x, singular, x0, times, noise_type="general")
    with pytest.raises(SingularNoiseError, match=r"positive definite.*singular .*at step k = 0"):
        fn.log_prob(torch.zeros(2, 2, dtype=DTYPE))


def test_a_drift_that_broadcasts_time_against_the_states_is_one_clear_error():
    """Built as ``t.shape + (D, D)``, a matrix drift is right for a 0-d t and, in
    log_prob, where t is (N, 1), returns (N, N, D): the log-density would have shape
    (N,) and a wrong sum. Construction probes that layout too: the error names the drift
    and the fix."""

    def matrix(t):
        a = torch.zeros(t.shape + (2, 2), dtype=torch.float64)
        a[..., 0, 0], a[..., 0, 1], a[..., 1, 1] = -1.0, t, -0.5
        return a

    times = torch.linspace(0.0, 1.0, 6, dtype=torch.float64)
    x0 = torch.tensor([0.5, -0.5], dtype=torch.float64)
    match = r"`drift\(t, x\)`.*shape \(3, 2\).*actual \(3, 3, 2\).*t\[\.\.\., None\] \* m"
    with pytest.raises(ValueError, match=match):
        LatentDiffusion(lambda t, x: (matrix(t) @ x.unsqueeze(-1)).squeeze(-1), 0.5, x0, times)
    good = LatentDiffusion(
        lambda t, x: (matrix(t[..., 0] if t.dim() else t) @ x.unsqueeze(-1)).squeeze(-1),
        0.5, x0, times,
    )  # fmt: skip
    assert good.log_prob(good.sample()).shape == ()


@pytest.mark.parametrize("batch", [(), (5,), (3, 5)], ids=str)
def test_a_noise_matrix_of_t_must_keep_its_time_axis_apart_even_when_a_batch_has_n_series(batch):
    """General noise ``S (1 + t)`` lines log_prob's time axis (N, 1, ..., 1) up with the
    batch: with N series it is silently the matrix of step k for series k. Construction
    probes every-step layout with a time axis of a size no other axis has, so it is one
    error whatever N; ``S (1 + t[..., None])`` is right and matches the transitions'
    density written out."""
    num_steps = 5
    times = torch.linspace(0.0, 1.0, num_steps + 1, dtype=DTYPE) ** 1.5
    x0 = torch.zeros(batch + (2,), dtype=DTYPE)
    s = torch.tensor([[1.0, 0.0, 0.3], [0.4, 0.8, 0.0]], dtype=DTYPE)
    drift = lambda t, x: -x  # noqa: E731
    with pytest.raises(ValueError, match=r"`diffusion\(t, x\)`.*t\[\.\.\., None\]"):
        LatentDiffusion(drift, lambda t, x: s * (1 + t), x0, times, noise_type="general")
    fn = LatentDiffusion(
        drift, lambda t, x: s * (1 + t[..., None]), x0, times, noise_type="general"
    )
    value = fn.sample((2,))
    expected, previous = 0.0, x0
    for k in range(num_steps):
        h, sigma = times[k + 1] - times[k], s * (1 + times[k])
        mvn = dist.MultivariateNormal(
            previous - previous * h, covariance_matrix=sigma @ sigma.mT * h
        )
        expected = expected + mvn.log_prob(value[..., k, :])
        previous = value[..., k, :]
    assert torch.allclose(fn.log_prob(value), expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "drift", [lambda t, x: -float(t) * x, lambda t, x: -math.cos(t) * x], ids=["float", "math"]
)
def test_a_drift_of_a_python_number_of_t_is_one_clear_error_at_construction(drift):
    """Simulation calls the drift with a 0-d t, log_prob with all steps at once: a
    float(t) or math.cos(t) works in the one and fails in the other; construction
    probes both, with a hint."""
    with pytest.raises(ValueError, match=r"every step at once.*t of shape \(2, 1\).*float\(t\)"):
        LatentDiffusion(drift, 1.0, torch.zeros(1), torch.linspace(0.0, 1.0, 6))


@pytest.mark.parametrize(
    "drift, match",
    [
        (lambda t: -t, r"`drift` to be a function drift\(t, x\).*TypeError"),
        (lambda t, x: -x * t[..., 0], r"`drift` to be a function drift\(t, x\).*IndexError"),
    ],
    ids=["one argument", "indexes a 0-d t"],
)
def test_a_drift_that_cannot_be_called_as_drift_t_x_is_one_clear_error(drift, match):
    with pytest.raises(ValueError, match=match):
        LatentDiffusion(drift, 1.0, torch.zeros(1), torch.linspace(0.0, 1.0, 6))


def test_a_singular_noise_matrix_names_its_step_in_blocks_and_is_what_nuts_rejects():
    """Singular only at step 6 of 8: the step is named whether log_prob runs at once
    or in blocks. The error is a RuntimeError saying "singular", as torch's own, so
    Pyro's HMC/NUTS reject the proposal instead of stopping; Pyro's trace passes it
    through unwrapped (a ValueError would become a plain one)."""
    times = torch.linspace(0.0, 1.0, 9, dtype=DTYPE)
    s = torch.eye(2, dtype=DTYPE)

    def diffusion(t, x):
        singular = ((t - times[6]).abs() < 1e-9).to(DTYPE)[..., None]  # rank 1 at step 6
        return s - singular * torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=DTYPE)

    x0 = torch.zeros(2, dtype=DTYPE)
    value = torch.zeros(8, 2, dtype=DTYPE)
    for block_size in (None, 2, 4):
        fn = LatentDiffusion(
            lambda t, x: -x, diffusion, x0, times, noise_type="general", block_size=block_size
        )
        with pytest.raises(SingularNoiseError, match=r"singular .*at step k = 6"):
            fn.log_prob(value)

    def model():
        pyro.sample("path", fn, obs=value)

    trace = poutine.trace(model).get_trace()
    with pytest.raises(RuntimeError, match="singular") as caught:
        trace.log_prob_sum()
    assert isinstance(caught.value, SingularNoiseError)


def test_a_diffusion_negative_where_a_path_crossed_zero_has_a_finite_log_prob():
    """Geometric Brownian motion's Euler paths cross zero; there sigma(x) = 0.8 x is
    negative, and the transition depends on sigma^2 only: log_prob equals the
    transitions' density with |sigma| on the chain's own draws."""
    times = torch.linspace(0.0, 4.0, 5, dtype=DTYPE)
    x0 = torch.ones(1, dtype=DTYPE)
    fn = LatentDiffusion(lambda t, x: 0.1 * x, lambda t, x: 0.8 * x, x0, times)
    pyro.set_rng_seed(0)
    value = fn.sample((1000,))
    assert (value[..., :-1, :] < 0).any()
    previous = torch.cat([x0.expand(1000, 1, 1), value[..., :-1, :]], dim=-2)
    expected = dist.Normal(previous * 1.1, 0.8 * previous.abs()).log_prob(value).sum((-1, -2))
    assert torch.allclose(fn.log_prob(value), expected, atol=1e-9, rtol=0)


@pytest.mark.parametrize("block_size", [None, 3, 10])
def test_blocks_leave_the_random_stream_as_one_solve_does(block_size):
    """Each torchsde solve checks shapes with a normal draw of its own; the solves put
    the generator back, so a path in blocks and its backward pass leave the stream
    where the path in one solve leaves it: later draws are the same."""
    times = torch.linspace(0.0, 1.0, 21, dtype=DTYPE)
    rate = torch.tensor(0.7, dtype=DTYPE, requires_grad=True)
    fn = LatentDiffusion(
        lambda t, x: -rate * x, 0.5, torch.zeros(3, 1, dtype=DTYPE), times, block_size=block_size
    )
    pyro.set_rng_seed(3)
    path = fn.rsample()
    path.square().sum().backward()
    after = torch.randn(4, dtype=DTYPE)
    pyro.set_rng_seed(3)
    torch.randn((20, 3, 1), dtype=DTYPE)  # the increments: one draw over the grid
    assert torch.equal(after, torch.randn(4, dtype=DTYPE))


@pytest.mark.parametrize("kind", ["tensor", "callable"])
def test_a_diffusion_batch_that_does_not_broadcast_is_one_clear_error(kind):
    sigma = torch.ones(4, 1)
    diffusion = sigma if kind == "tensor" else (lambda t, x: sigma)
    with pytest.raises(ValueError, match=r"`diffusion.*(broadcasts with|shaped like).*actual"):
        LatentDiffusion(lambda t, x: -x, diffusion, torch.zeros(3, 1), torch.linspace(0, 1, 6))
