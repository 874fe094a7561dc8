import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Predictive, Trace_ELBO
from pyro.infer.importance import vectorized_importance_weights

from pyro_latdiff import DiffusionGuide, LatentDiffusion, fit, log_evidence
from pyro_latdiff._model_checks import enclosing_plates
from pyro_latdiff.testing import LinearSDE, SharedRateOU, ou_problem

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(DTYPE)


def linear_problem(obs_scale=0.3):
    return LinearSDE(
        A=torch.tensor([[-1.0, 0.5], [-0.3, -0.2]]),
        c=torch.tensor([0.2, -0.1]),
        sigma=torch.tensor([0.7, 1.3]),
        x0=torch.tensor([0.5, -1.0]),
        times=torch.tensor([0.0, 0.1, 0.15, 0.3, 0.5, 0.6, 0.8, 1.0]),
        H=torch.tensor([[1.0, 0.0], [1.0, 1.0]]),
        obs_scale=torch.tensor([obs_scale, obs_scale]),
    )


def global_problem():
    """A global rate, a plate of series, terminal observations."""
    return SharedRateOU(torch.linspace(0, 1, 11), obs_scale=0.2)


def test_guide_without_guidance_at_initialisation_is_the_prior():
    y = torch.tensor([0.5, -1.0, 2.0])
    global_model = global_problem().model
    guide = DiffusionGuide(global_model, bridge=False)
    guide_trace = poutine.trace(guide).get_trace(y)
    model_trace = poutine.trace(poutine.replay(global_model, trace=guide_trace)).get_trace(y)
    path = guide_trace.nodes["path"]["value"]
    q = guide_trace.nodes["path"]["fn"].log_prob(path)
    p = model_trace.nodes["path"]["fn"].log_prob(path)
    assert q.shape == (3,)
    assert torch.allclose(q, p, atol=1e-10)


def test_path_derivative_detaches_parameters_in_log_prob_only():
    problem = linear_problem()
    y = torch.tensor([0.3, 0.1])
    for path_derivative in (True, False):
        pyro.clear_param_store()
        guide = DiffusionGuide(problem.model, path_derivative=path_derivative)
        site = poutine.trace(guide).get_trace(y).nodes["path"]
        params = list(guide.chains.parameters())
        (dvalue,) = torch.autograd.grad(site["value"].sum(), params[-1], allow_unused=True)
        assert dvalue is not None and dvalue.abs().sum() > 0  # reparameterised value
        log_q = site["fn"].log_prob(site["value"].detach()).sum()
        # Fully detached (nothing upstream of the path needs gradients): no graph at all.
        dscore = (
            torch.autograd.grad(log_q, params, allow_unused=True)
            if log_q.requires_grad
            else [None] * len(params)
        )
        scored = [g is not None and g.abs().sum() > 0 for g in dscore]
        assert any(scored) is (not path_derivative)


def test_distinct_guides_do_not_share_parameters():
    problem = ou_problem()
    y = torch.tensor([1.5])
    first, second = DiffusionGuide(problem.model), DiffusionGuide(problem.model)
    first(y), second(y)
    names = list(pyro.get_param_store().keys())
    assert len(names) == 2 * len(set(n.split(".", 1)[1] for n in names))


def importance_log_weights(model, guide, *args, num_samples):
    with torch.no_grad():
        log_w, _, _ = vectorized_importance_weights(
            model, guide, *args, num_samples=num_samples, max_plate_nesting=1
        )
    return log_w


@pytest.mark.parametrize("trained", [False, True])
def test_log_evidence_and_elbo_against_exact_evidence(trained):
    problem = linear_problem()
    y = torch.tensor([0.3, 0.1])
    exact = problem.log_evidence(y).item()
    guide = DiffusionGuide(problem.model)
    if trained:
        fit(problem.model, guide, y, num_steps=150, progress=False)
    estimate = log_evidence(problem.model, guide, y, num_samples=20000, chunk_size=5000)
    assert abs(estimate.item() - exact) < 3 * estimate.stderr
    assert estimate.log_weights.shape == (20000,)
    assert 0 < estimate.ess <= 20000
    log_w = importance_log_weights(problem.model, guide, y, num_samples=20000)
    elbo, elbo_se = log_w.mean().item(), log_w.std().item() / math.sqrt(20000)
    assert elbo <= exact + 3 * elbo_se


@pytest.mark.slow
def test_bench_a_reaches_the_exact_discrete_posterior():
    """Bench A: 1000 SVI steps, 16 particles, default optimiser."""
    problem = ou_problem()
    y = torch.tensor([1.5])
    exact = problem.log_evidence(y).item()
    mean, cov = problem.terminal_posterior(y)
    guide = DiffusionGuide(problem.model)
    fit(problem.model, guide, y, num_steps=1000, num_particles=16, progress=False)
    log_w = importance_log_weights(problem.model, guide, y, num_samples=4000)
    assert exact - log_w.mean().item() <= 0.05
    with torch.no_grad():
        terminal = Predictive(problem.model, guide=guide, num_samples=4000, parallel=True)(y)[
            "path"
        ][:, -1, 0]
    assert abs(terminal.mean().item() - mean.item()) <= 0.02
    assert abs(terminal.std().item() / cov.sqrt().item() - 1) <= 0.10


def test_context_is_the_observations_and_latents_sharing_the_paths_plates():
    y = torch.tensor([0.5, -1.0, 2.0])
    global_model = global_problem().model
    guide = DiffusionGuide(global_model)
    guide(y)
    assert guide.chains.path.net.context_dim == 2  # y_i and theta
    # No context when asked for none; a callable context sets its own width.
    assert DiffusionGuide(global_model, context=None).__call__(y)
    custom = DiffusionGuide(global_model, context=lambda y: torch.stack([y, y**2], -1))
    custom(y)
    assert custom.chains.path.net.context_dim == 2


def repeated_observations_model(y, times):
    """Each path observed at several times: one event of the series' observations."""
    with pyro.plate("series", y.shape[-1], dim=-1):
        x0 = torch.zeros(y.shape[-1], 1)
        path = pyro.sample("path", LatentDiffusion(lambda t, x: -x, 1.0, x0, times))
        observed = path[..., [4, 9], 0]  # (series, 2)
        pyro.sample("y", dist.Normal(observed, 0.3).to_event(1), obs=y.transpose(-1, -2))


def test_nested_observations_are_folded_into_the_context():
    y = torch.tensor([[0.1, 0.5, -0.2], [0.4, 1.0, -0.8]])  # (obs_times, series)
    times = torch.linspace(0, 1, 11)
    guide = DiffusionGuide(repeated_observations_model)
    losses = fit(repeated_observations_model, guide, y, times, num_steps=60, progress=False)
    assert guide.chains.path.net.context_dim == 2
    # Linear-Gaussian: the guided chain is the exact posterior from the start, so the
    # loss stays at -log p(y) (it cannot decrease) and training keeps it there.
    estimate = log_evidence(repeated_observations_model, guide, y, times, num_samples=1000)
    assert estimate.ess > 0.99 * 1000
    assert abs(sum(losses[-10:]) / 10 + estimate.item()) < 0.01


def plated_observations_model(y, times):
    """One path observed at several times through a plate of observations: correct
    for one draw, a cross product over vectorised particles (``path[..., idx, 0]``
    keeps the particles' singleton on the left of the plate's dimension)."""
    path = pyro.sample("path", LatentDiffusion(lambda t, x: -x, 1.0, torch.zeros(1), times))
    with pyro.plate("obs", y.shape[0]):
        pyro.sample("y", dist.Normal(path[..., ::3, 0], 0.3), obs=y)


@pytest.mark.parametrize("diffusion", ["constant", "callable"])
def test_general_noise_with_fewer_columns_than_states_is_one_clear_error(diffusion):
    """A (2, 1) noise matrix makes every Euler step's covariance singular: the guide
    would draw NaN paths; it says why instead (the model's log_prob does too)."""
    times = torch.linspace(0.0, 1.0, 6)
    matrix = torch.tensor([[1.0], [0.5]])
    sigma = matrix if diffusion == "constant" else (lambda t, x: matrix.expand(x.shape + (1,)))

    def model(y):
        chain = LatentDiffusion(lambda t, x: -x, sigma, torch.zeros(2), times, noise_type="general")
        path = pyro.sample("path", chain)
        pyro.sample("y", dist.Normal(path[..., -1, :], 0.5).to_event(1), obs=y)

    with pytest.raises(ValueError, match=r"at least state_dim = 2 noise columns.*\(\.\.\., 2, 1\)"):
        DiffusionGuide(model)(torch.tensor([1.0, 0.3]))


@pytest.mark.parametrize("y", [[1.0], (1.0,)])
def test_observations_that_are_not_tensors_are_one_clear_error(y):
    times = torch.linspace(0.0, 1.0, 6)

    def model(y):
        path = pyro.sample("path", LatentDiffusion(lambda t, x: -x, 1.0, torch.zeros(1), times))
        pyro.sample("y", dist.Normal(path[..., -1, :], 0.5).to_event(1), obs=y)

    with pytest.raises(ValueError, match=r"site 'y' to be a torch.Tensor, actual (list|tuple)"):
        DiffusionGuide(model)(y)


def test_series_in_to_event_instead_of_a_plate_is_one_clear_error():
    times = torch.linspace(0.0, 1.0, 6)

    def model(y):
        chain = LatentDiffusion(lambda t, x: -x, 1.0, torch.zeros(3, 1), times).to_event(1)
        path = pyro.sample("path", chain)
        pyro.sample("y", dist.Normal(path[..., -1, :], 0.5).to_event(2), obs=y)

    with pytest.raises(ValueError, match=r"site 'path'.*event shape \(3, 5, 1\).*pyro.plate"):
        DiffusionGuide(model)(torch.zeros(3, 1))


def test_parallel_predictive_with_plates_around_observations_only_is_one_clear_error():
    """One path seen by three sensors (a plate around the observations only): Pyro's
    Predictive(parallel=True) puts its draws' plate at dim -1, guessed from the guide's
    trace, where the model's sensors plate is. Sequential draws and the library's own
    vectorised passes place it right."""
    times = torch.linspace(0.0, 1.0, 6)

    def model(y):
        path = pyro.sample("path", LatentDiffusion(lambda t, x: -x, 1.0, torch.zeros(1), times))
        with pyro.plate("sensors", 3):
            pyro.sample("y", dist.Normal(path[..., -1, 0], 0.3), obs=y)

    y = torch.tensor([0.8, 1.1, 0.6])
    guide = DiffusionGuide(model)
    with pytest.raises(ValueError, match=r"plate '_num_predictive_samples'.*dim=-2"):
        Predictive(model, guide=guide, num_samples=4, parallel=True)(y)
    assert Predictive(model, guide=guide, num_samples=4)(y)["path"].shape == (4, 1, 5, 1)
    with pyro.plate("draws", 4, dim=-2):
        assert guide(y)["path"].shape == (4, 1, 5, 1)
    assert math.isfinite(float(log_evidence(model, guide, y, num_samples=64)))


def test_observations_in_a_plate_of_their_own_are_one_clear_error_under_particles():
    """Under vectorised particles Pyro weighs such a likelihood by the number of
    particles, silently (the loss at the exact guide was 35 for 16 particles against
    -log p(y) = 5.6); one draw at a time it is right, and the guide's path has the
    model's shape (no singleton from the observations' plate)."""
    times = torch.linspace(0, 1, 11)
    y = torch.tensor([1.0, 0.0, 1.0, 1.0])
    guide = DiffusionGuide(plated_observations_model)
    value = poutine.trace(guide).get_trace(y, times).nodes["path"]["value"]
    assert value.shape == (10, 1)
    Trace_ELBO().loss(plated_observations_model, guide, y, times)  # one draw: fine
    with pytest.raises(ValueError, match=r"site 'y'.*at most 2 dimensions.*\(4, 1, 4\).*to_event"):
        fit(plated_observations_model, guide, y, times, num_steps=2, num_particles=4, check=False)
    with pytest.raises(ValueError, match=r"site 'y'.*cross product"):
        log_evidence(plated_observations_model, guide, y, times, num_samples=8)


def test_guide_errors():
    def no_paths(y):
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def discrete(y):
        pyro.sample("k", dist.Bernoulli(0.5))
        pyro.sample(
            "path", LatentDiffusion(lambda t, x: -x, 1.0, torch.zeros(1), torch.linspace(0, 1, 5))
        )

    with pytest.raises(ValueError, match="at least one LatentDiffusion site.*'z'"):
        DiffusionGuide(no_paths)(None)
    with pytest.raises(ValueError, match="discrete.*site 'k'"):
        DiffusionGuide(discrete)(None)
    with pytest.raises(ValueError, match="`context`"):
        DiffusionGuide(no_paths, context="observed")
    with pytest.raises(ValueError, match="`num_samples`"):
        log_evidence(no_paths, no_paths, None, num_samples=0)
    with pytest.raises(ValueError, match="`num_steps`"):
        fit(no_paths, no_paths, None, num_steps=0)


def test_plain_svi_works_with_the_guide():
    problem = ou_problem(num_steps=10)
    y = torch.tensor([1.5])
    guide = DiffusionGuide(problem.model)
    svi = pyro.infer.SVI(
        problem.model,
        guide,
        pyro.optim.Adam({"lr": 1e-2}),
        Trace_ELBO(num_particles=4, vectorize_particles=True),
    )
    losses = [svi.step(y) for _ in range(30)]
    assert all(math.isfinite(v) for v in losses)


@pytest.mark.slow
def test_global_parameter_posterior_matches_quadrature():
    """A smaller global-parameter problem than the example: 12 paths of 20 steps."""
    problem = SharedRateOU(torch.linspace(0.0, 1.0, 21), obs_scale=0.1)
    y = problem.simulate(1.5, 12)
    guide = DiffusionGuide(problem.model)
    fit(problem.model, guide, y, num_steps=800, num_particles=8, progress=False)
    _, _, exact_mean, exact_sd = problem.exact_posterior(y)
    with torch.no_grad():
        theta = Predictive(problem.model, guide=guide, num_samples=4000, return_sites=["theta"])(y)[
            "theta"
        ]
    # The guide's mean is estimated to 0.016 exact sd (= sd / sqrt(4000)); the floor is 0.1.
    assert abs(theta.mean() - exact_mean) <= 0.1 * exact_sd
    assert abs(theta.std() / exact_sd - 1) <= 0.2


def two_stage_model(y, times):
    """The second path starts where the first ends."""
    first = pyro.sample("first", LatentDiffusion(lambda t, x: -x, 1.0, torch.zeros(1), times))
    second = pyro.sample(
        "second", LatentDiffusion(lambda t, x: x.sin(), 0.5, first[..., -1, :], times)
    )
    pyro.sample("y", dist.Normal(second[..., -1, :], 0.2).to_event(1), obs=y)


def test_a_later_path_starts_from_the_guides_earlier_path():
    times = torch.linspace(0, 1, 6)
    y = torch.tensor([0.7])
    guide = DiffusionGuide(two_stage_model, bridge=False)
    guide_trace = poutine.trace(guide).get_trace(y, times)
    model_trace = poutine.trace(poutine.replay(two_stage_model, trace=guide_trace)).get_trace(
        y, times
    )
    for name in ("first", "second"):  # at initialisation the guide is the prior, given upstream
        value = guide_trace.nodes[name]["value"]
        assert torch.allclose(
            guide_trace.nodes[name]["fn"].log_prob(value),
            model_trace.nodes[name]["fn"].log_prob(value),
            atol=1e-10,
        )
    second_fn = guide_trace.nodes["second"]["fn"]
    assert torch.equal(second_fn.fn.x0, guide_trace.nodes["first"]["value"][..., -1, :])
    estimate = log_evidence(two_stage_model, guide, y, times, num_samples=200)
    assert torch.isfinite(estimate)


def test_a_path_broadcast_into_extra_dimensions_is_one_clear_error():
    """theta[..., None, None] * x under vectorised particles makes the path's batch
    shape (P, 1, S): a silent cross product under Trace_ELBO. The guide names it."""

    def model(y, bad):
        theta = pyro.sample("theta", dist.LogNormal(0.0, 0.5))
        with pyro.plate("series", y.shape[0]):
            rate = theta[..., None, None] if bad else theta.unsqueeze(-1)
            x0 = torch.zeros(y.shape[0], 1)
            path = pyro.sample(
                "path", LatentDiffusion(lambda t, x: -rate * x, 1.0, x0, torch.linspace(0, 1, 6))
            )
            pyro.sample("y", dist.Normal(path[..., -1, 0], 0.1), obs=y)

    y = torch.tensor([0.1, -0.3, 0.8])
    fit(model, DiffusionGuide(model), y, False, num_steps=2, num_particles=4, progress=False)
    with pytest.raises(ValueError, match=r"site 'path'.*at most 2 dimensions.*\(4, 1, 3\)"):
        fit(model, DiffusionGuide(model), y, True, num_steps=2, num_particles=4, progress=False)


def test_checkpointed_blocks_give_the_same_loss_and_gradients():
    problem = SharedRateOU(torch.linspace(0.0, 1.0, 24), obs_scale=0.2)
    y = problem.simulate(1.2, 3)

    def loss_and_grads(block_size):
        pyro.clear_param_store()
        pyro.set_rng_seed(3)
        guide = DiffusionGuide(problem.model, block_size=block_size, name="g")
        guide(y)
        # Away from the zero initialisation, with a generator of its own: torchsde draws
        # a probe vector per solve, so blocks advance the global stream differently.
        generator = torch.Generator().manual_seed(5)
        for param in guide.parameters():
            param.data.add_(0.1 * torch.randn(param.shape, generator=generator))
        pyro.set_rng_seed(4)
        elbo = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
        loss = elbo.differentiable_loss(problem.model, guide, y)
        grads = torch.autograd.grad(loss, list(guide.parameters()), allow_unused=True)
        return loss, [torch.zeros(1) if g is None else g for g in grads]

    loss, grads = loss_and_grads(None)
    blocked_loss, blocked_grads = loss_and_grads(5)
    assert torch.allclose(loss, blocked_loss, rtol=1e-10)
    for g, b in zip(grads, blocked_grads, strict=True):
        assert torch.allclose(g, b, rtol=1e-6, atol=1e-10)


def subsampled_model(y, subsample_size=None):
    """A global rate, a plate of series (subsampled), a local level per series."""
    theta = pyro.sample("theta", dist.LogNormal(0.0, 0.5))
    with pyro.plate("series", y.shape[0], subsample_size=subsample_size) as index:
        level = pyro.sample("level", dist.Normal(0.0, 1.0))
        x0 = torch.zeros(len(index), 1)
        drift = lambda t, x: -theta.unsqueeze(-1) * (x - level.unsqueeze(-1))  # noqa: E731
        path = pyro.sample("path", LatentDiffusion(drift, 1.0, x0, torch.linspace(0, 1, 9)))
        pyro.sample("y", dist.Normal(path[..., -1, 0], 0.3), obs=y[index])


@pytest.mark.slow
def test_minibatch_gradient_is_an_unbiased_estimate_of_the_full_one():
    """Subsampling the plate of series (paths and a local latent under it): the mean
    gradient over random minibatches equals the full-data gradient within 4 standard
    errors of the difference, for the global and local parameters."""
    y = torch.tensor([0.4, -0.8, 1.1, 0.2, -0.3, 0.9])
    guide = DiffusionGuide(  # the guide's plate follows the call, as with Pyro's autoguides
        subsampled_model,
        create_plates=lambda y, size=None: pyro.plate("series", y.shape[0], subsample_size=size),
    )
    guide(y)
    generator = torch.Generator().manual_seed(1)
    for param in guide.parameters():  # away from the initialisation
        param.data.add_(0.2 * torch.randn(param.shape, generator=generator))
    names = ["locs.theta", "log_scales.theta", "locs.level", "chains.path.offset"]
    params = [pyro.param(f"{guide._pyro_name}.{name}").unconstrained() for name in names]
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)

    def gradients(subsample_size, repeats=150):
        rows = []
        for seed in range(repeats):
            pyro.set_rng_seed(seed)
            loss = elbo.differentiable_loss(subsampled_model, guide, y, subsample_size)
            grads = torch.autograd.grad(loss, params)
            rows.append(torch.cat([g.reshape(-1)[:3] for g in grads]))
        rows = torch.stack(rows)
        return rows.mean(0), rows.std(0) / math.sqrt(repeats)

    full, full_se = gradients(None)
    mini, mini_se = gradients(2)
    z = (mini - full) / (full_se.square() + mini_se.square()).sqrt()
    assert (z.abs() < 4).all(), z


def test_deterministic_sites_are_no_context():
    """pyro.deterministic sites (default event_dim) record functions of the latents: no
    data for the guide's context, whose features they broke under particles."""
    times = torch.linspace(0.0, 1.0, 6)
    y = torch.tensor([0.3, -0.4, 0.8])

    def model(y, record):
        theta = pyro.sample("theta", dist.LogNormal(0.0, 0.5))
        if record:
            pyro.deterministic("half_life", 0.693 / theta)
        with pyro.plate("series", 3):
            drift = lambda t, x: -theta.unsqueeze(-1) * x  # noqa: E731
            path = pyro.sample("path", LatentDiffusion(drift, 1.0, torch.zeros(3, 1), times))
            pyro.sample("y", dist.Normal(path[..., -1, 0], 0.1), obs=y)
            if record:
                pyro.deterministic("end", path[..., -1, 0])

    sizes = []
    for record in (False, True):
        guide = DiffusionGuide(model)
        losses = fit(model, guide, y, record, num_steps=3, num_particles=4, progress=False)
        assert len(losses) == 3
        trace = poutine.trace(model).get_trace(y, record)
        sizes.append(guide._context("path", trace, (y, record), {}, torch.zeros(3, 1)).shape)
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("plates", ["default", "create_plates"])
def test_a_minibatch_path_is_guided_by_its_own_series_observations(plates):
    """A linear-Gaussian model without other latents: the untrained guide is each
    series' exact posterior, so log p(x, y_i) - log q(x) is the same for every draw of a
    series, minibatch or not. The model run inside the guide drew its own subsample, so
    the paths were guided by other series' observations (log-weight sd 17-67 nats)."""
    y = torch.tensor([0.4, -0.8, 1.1, 0.2, -0.3, 0.9])
    times = torch.linspace(0.0, 1.0, 6)

    def model(y, size=None):
        with pyro.plate("series", y.shape[0], subsample_size=size) as index:
            chain = LatentDiffusion(lambda t, x: -x, 1.0, torch.zeros(len(index), 1), times)
            path = pyro.sample("path", chain)
            pyro.sample("y", dist.Normal(path[..., -1, 0], 0.1), obs=y[index])

    make = lambda y, size=None: pyro.plate("series", y.shape[0], subsample_size=size)  # noqa: E731
    guide = DiffusionGuide(model, create_plates=make if plates == "create_plates" else None)
    guide(y, 2)
    weights: dict[int, list[float]] = {}
    for _ in range(20):
        guide_trace = poutine.trace(guide).get_trace(y, 2)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(y, 2)
        for trace in (guide_trace, model_trace):
            trace.compute_log_prob()
        log_w = (
            model_trace.nodes["path"]["unscaled_log_prob"]
            + model_trace.nodes["y"]["unscaled_log_prob"]
            - guide_trace.nodes["path"]["unscaled_log_prob"]
        )
        index = guide_trace.nodes["series"]["value"].tolist()
        for i, w in zip(index, log_w.tolist(), strict=True):
            weights.setdefault(i, []).append(w)
    spreads = [torch.tensor(w).std().item() for w in weights.values() if len(w) > 1]
    assert spreads and max(spreads) < 1e-4, spreads


@pytest.mark.parametrize("with_global", [False, True])
def test_the_filter_is_per_draw_only_when_the_guide_draws_other_latents(with_global):
    """Without other latents the observations' expansion is the same for every draw, and
    the guided kernel's tables leave out the vectorised particles (a filter per series,
    not per particle and series); with a global latent drawn by the guide, per draw."""
    times = torch.linspace(0.0, 1.0, 6)
    y = torch.randn(3, 1)

    def model(y):
        rate = pyro.sample("rate", dist.LogNormal(0.0, 0.3)) if with_global else 1.0
        with pyro.plate("series", 3):
            path = pyro.sample("path", LatentDiffusion(lambda t, x: -rate * x, 1.0,
                                                       torch.zeros(3, 1), times))  # fmt: skip
            pyro.sample("y", dist.Normal(path[..., -1, :], 0.5).to_event(1), obs=y)

    guide = DiffusionGuide(model)
    guide(y)
    with pyro.plate("particles", 8, dim=-2):
        values = {"rate": guide._normal_distribution("rate")()} if with_global else {}
        enclosing = enclosing_plates()
        _, _, kernel = guide._prepass("path", values, enclosing, (y,), {}, {})
    assert kernel.batch_shape == ((8, 3) if with_global else (3,))


def test_log_evidence_of_a_subsampled_model_is_one_clear_error():
    """The importance weights of a minibatch (scaled up by the plate) do not estimate
    the evidence of the data: five calls gave -2.0, -4.7, -1.2, -3.9 and +9.1 where the
    full data's is -6.3. Raise instead of returning such a number."""
    y = torch.tensor([0.3, -0.2, 0.8, 0.1, -0.5, 0.4])
    guide = DiffusionGuide(subsampled_model)
    with pytest.raises(ValueError, match=r"log_evidence.*subsampled plates \['series'\]"):
        log_evidence(subsampled_model, guide, y, 2, num_samples=16)
    full = DiffusionGuide(subsampled_model)
    assert torch.isfinite(log_evidence(subsampled_model, full, y, num_samples=16))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_jit_elbo_is_one_clear_error_unless_the_guide_can_be_traced():
    from pyro.infer import SVI, JitTrace_ELBO

    times = torch.linspace(0.0, 1.0, 6)

    def model(y):
        with pyro.plate("series", y.shape[0]):
            x0 = torch.zeros(y.shape[0], 1)
            path = pyro.sample("path", LatentDiffusion(lambda t, x: -x, 1.0, x0, times))
            pyro.sample("y", dist.Normal(path[..., -1, 0], 0.5), obs=y)

    y = torch.tensor([0.3, -0.5])
    pyro.clear_param_store()
    svi = SVI(model, DiffusionGuide(model), pyro.optim.Adam({"lr": 1e-2}), JitTrace_ELBO())
    with pytest.raises(NotImplementedError, match=r"torch.jit.trace.*bridge=False"):
        svi.step(y)
    # Without the guided kernel and the path derivative the guide traces, and the
    # traced loss is the untraced one on the same draws.
    losses = {}
    for name, elbo in (("jit", JitTrace_ELBO()), ("eager", Trace_ELBO())):
        pyro.clear_param_store()
        guide = DiffusionGuide(model, bridge=False, path_derivative=False)
        torch.manual_seed(0)
        losses[name] = SVI(model, guide, pyro.optim.Adam({"lr": 0.0}), elbo).evaluate_loss(y)
    assert math.isfinite(losses["jit"])
    assert losses["jit"] == pytest.approx(losses["eager"], rel=1e-5)


def test_predicting_with_the_observations_left_out_is_one_clear_error_and_the_recipe_works():
    """Predictive(model, guide=guide)(None), Pyro's way to predict, runs the guide
    without the data: its paths would come from the prior with a context drawn at
    random, silently. It is one error naming the site and the recipe; the recipe
    (posterior draws with the data, then the model on them) gives the posterior."""
    problem = ou_problem(num_steps=10)
    y = torch.tensor([1.5])
    guide = DiffusionGuide(problem.model)
    guide(y)  # built with the data, as by fit
    with pytest.raises(ValueError, match=r"\['y'\] unobserved.*posterior_samples=samples"):
        Predictive(problem.model, guide=guide, num_samples=10)(None)
    samples = Predictive(problem.model, guide=guide, num_samples=4000, return_sites=["path"])(y)
    predicted = Predictive(problem.model, posterior_samples=samples)(None)["y"]
    mean, cov = problem.terminal_posterior(y)  # the untrained guide is exact here
    var = cov[0, 0] + 0.1**2  # of y_new = x_N + noise
    assert abs(predicted.mean() - mean[0]) < 4 * math.sqrt(var / 4000)
    assert abs(predicted.var() / var - 1) < 4 * math.sqrt(2 / 4000)


@pytest.mark.parametrize(
    "returned, error, match",
    [
        ({}, ValueError, r"latents other than the paths, \['theta'\], actual \['theta'\] missing"),
        (None, TypeError, r"latent_guide\(\*args, \*\*kwargs\) to return a dict.*NoneType"),
    ],
    ids=["empty", "none"],
)
def test_a_latent_guide_that_does_not_return_its_values_is_one_clear_error(returned, error, match):
    """A hand-written latent_guide must return its values, as Pyro's autoguides do:
    otherwise the paths' kernel would be filtered given globals drawn from the prior in
    the pre-pass (a valid but poor proposal, silently)."""
    problem = SharedRateOU(torch.linspace(0.0, 1.0, 6), 0.2)

    def latent_guide(blocked_model):
        def guide(y):
            pyro.sample("theta", dist.LogNormal(0.0, 0.5))
            return returned

        return guide

    guide = DiffusionGuide(problem.model, latent_guide=latent_guide)
    with pytest.raises(error, match=match):
        guide(torch.tensor([0.3, -0.5, 1.2, 0.1]))
