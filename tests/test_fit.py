import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoDiagonalNormal, AutoMultivariateNormal, AutoNormal

from pyro_latdiff import DiffusionGuide, LatentDiffusion, fit, log_evidence
from pyro_latdiff.infer import FitDivergedError
from pyro_latdiff.testing import ou_problem


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)


def snapshot():
    store = pyro.get_param_store()
    return {name: store[name].detach().clone() for name in store.keys()}


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_divergence_stops_with_message_and_keeps_last_finite_parameters():
    problem = ou_problem()
    y = torch.tensor([1.5])
    guide = DiffusionGuide(problem.model)
    history = []
    with pytest.raises(
        FitDivergedError, match=r"fit stopped at step \d+.*'path'.*learning rate"
    ) as caught:
        fit(
            problem.model,
            guide,
            y,
            num_steps=200,
            optim=pyro.optim.Adam({"lr": 100.0}),
            callback=lambda step, loss: history.append(snapshot()),
            progress=False,
        )
    error = caught.value
    assert error.step == len(error.losses) == len(history)
    assert all(math.isfinite(v) for v in error.losses)
    after = snapshot()
    last = history[-1]
    assert after.keys() == last.keys()
    assert all(torch.equal(after[k], last[k]) for k in after)
    assert all(torch.isfinite(v).all() for v in after.values())


def run(path, name, num_steps, interrupt_at=None):
    pyro.set_rng_seed(1)
    problem = ou_problem(num_steps=10)
    y = torch.tensor([1.5])
    guide = DiffusionGuide(problem.model, name=name)

    def callback(step, loss):
        if step == interrupt_at:
            raise KeyboardInterrupt

    return fit(
        problem.model,
        guide,
        y,
        num_steps=num_steps,
        num_particles=4,
        checkpoint=path,
        checkpoint_every=3,
        callback=callback,
        progress=False,
    )


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    straight = run(tmp_path / "a.pt", "guide", 12)
    expected = snapshot()
    pyro.clear_param_store()
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b.pt", "guide", 12, interrupt_at=6)
    assert torch.load(tmp_path / "b.pt", weights_only=False)["step"] == 7
    pyro.clear_param_store()
    pyro.set_rng_seed(123)  # whatever the state now, resuming restores the saved one
    resumed = run(tmp_path / "b.pt", "guide", 12)
    assert resumed == straight
    got = snapshot()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


def _rate_model(y):
    rate = pyro.sample("rate", dist.LogNormal(0.0, 0.5))
    x0 = torch.zeros(rate.shape + (1,))
    drift = lambda t, x: -rate[..., None] * x  # noqa: E731
    path = pyro.sample("path", LatentDiffusion(drift, 1.0, x0, torch.linspace(0, 1, 11)))
    pyro.sample("y", dist.Normal(path[..., -1, :], 0.1).to_event(1), obs=y)


def _run_rate(path, latent_guide, interrupt_at=None):
    pyro.set_rng_seed(1)
    guide = DiffusionGuide(_rate_model, latent_guide=latent_guide, name="g")

    def callback(step, loss):
        if step == interrupt_at:
            raise KeyboardInterrupt

    return fit(
        _rate_model,
        guide,
        torch.tensor([1.5]),
        num_steps=10,
        num_particles=4,
        checkpoint=path,
        checkpoint_every=3,
        callback=callback,
        progress=False,
        check=False,
    )


@pytest.mark.parametrize(
    "latent_guide",
    [AutoNormal, AutoDiagonalNormal, AutoMultivariateNormal],
    ids=lambda g: g.__name__,
)
def test_resume_is_bit_identical_with_a_latent_guide_of_plain_parameters(tmp_path, latent_guide):
    """An AutoContinuous guide computes with its ``loc``, a plain nn.Parameter that is the
    parameter store's tensor itself: resuming writes the saved values into it (replacing
    the store's tensor would leave the guide at its initial ``loc``, untrained)."""
    straight = _run_rate(tmp_path / "a.pt", latent_guide)
    expected = snapshot()
    pyro.clear_param_store()
    with pytest.raises(KeyboardInterrupt):
        _run_rate(tmp_path / "b.pt", latent_guide, interrupt_at=4)
    pyro.clear_param_store()
    pyro.set_rng_seed(123)
    resumed = _run_rate(tmp_path / "b.pt", latent_guide)
    assert resumed == straight
    got = snapshot()
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)


def test_resuming_a_checkpoint_of_other_shapes_is_one_clear_error(tmp_path):
    path = tmp_path / "run.pt"
    _run_rate(path, AutoMultivariateNormal)
    state = torch.load(path, weights_only=False)
    state["params"]["params"]["g.latents.loc"] = torch.zeros(3)
    torch.save(state, path)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=r"parameter 'g.latents.loc' as the guide's, \(1,\)"):
        _run_rate(path, AutoMultivariateNormal)


def test_resuming_a_checkpoint_of_another_guide_or_past_num_steps_is_one_clear_error(tmp_path):
    """A guide named otherwise than the saved one (a second DiffusionGuide built while
    the first lives gets another name) would train afresh while "resuming"; a shorter
    num_steps would rewrite the step count. Both raise, the file untouched."""
    path = tmp_path / "run.pt"
    run(path, "saved", 6)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"checkpoint .*lacks \['other\..*under \['saved'\]"):
        run(path, "other", 12)
    with pytest.raises(ValueError, match=r"`num_steps` >= the checkpoint's step 6.*actual 3"):
        run(path, "saved", 3)
    assert path.read_bytes() == before
    assert len(run(path, "saved", 6)) == 6  # the same num_steps: nothing left to do


def test_same_seed_same_losses_and_evidence():
    problem = ou_problem(num_steps=10)
    y = torch.tensor([1.5])
    results = []
    for _ in range(2):
        pyro.clear_param_store()
        pyro.set_rng_seed(7)
        guide = DiffusionGuide(problem.model, name="g")
        losses = fit(problem.model, guide, y, num_steps=5, num_particles=4, progress=False)
        estimate = log_evidence(problem.model, guide, y, num_samples=100)
        results.append((losses, estimate.item(), estimate.log_weights))
    assert results[0][0] == results[1][0]
    assert results[0][1] == results[1][1]
    assert torch.equal(results[0][2], results[1][2])


def test_clip_norm_bounds_the_update():
    problem = ou_problem(num_steps=10)
    y = torch.tensor([1.5])
    guide = DiffusionGuide(problem.model)
    losses = fit(
        problem.model,
        guide,
        y,
        num_steps=20,
        clip_norm=1.0,
        optim=pyro.optim.SGD({"lr": 1e-3}),
        progress=False,
    )
    assert all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(checkpoint_every=0), "`checkpoint_every`"),
        (dict(clip_norm=-1.0), "`clip_norm`"),
        (dict(clip_norm=float("nan")), "`clip_norm`"),
        (dict(callback=3), "`callback`"),
        (dict(num_particles=0), "`num_particles`"),
    ],
)
def test_fit_argument_errors(kwargs, match):
    problem = ou_problem(num_steps=5)
    with pytest.raises((ValueError, TypeError), match=match):
        fit(
            problem.model,
            DiffusionGuide(problem.model),
            torch.tensor([1.5]),
            num_steps=2,
            progress=False,
            **kwargs,
        )


def test_states_clamped_into_the_box_are_counted_reported_and_keep_the_evidence_exact():
    from pyro_latdiff._warnings import LatentDiffusionWarning

    problem = ou_problem(obs_scale=0.5, num_steps=10)
    y = torch.tensor([1.0])
    guide = DiffusionGuide(problem.model, state_bounds=(-0.3, 0.3))
    with pytest.warns(LatentDiffusionWarning, match=r"fit: \d+ simulated guide states left"):
        fit(problem.model, guide, y, num_steps=20, progress=False)
    assert guide.num_clamped > 0
    # The clamped chain is still a proper proposal: importance sampling stays consistent.
    estimate = log_evidence(problem.model, guide, y, num_samples=20000, chunk_size=5000)
    assert abs(estimate.item() - problem.log_evidence(y).item()) < 3 * estimate.stderr


def test_fit_warns_when_the_guide_is_far_from_the_posterior():
    """Two steps on 200 series with an unknown rate: the rate's guide is far from its
    sharp posterior and the importance ESS of the joint guide collapses (about 1 % of
    the draws over seeds; with 40 series it is 3-9 %, too near the 10 % threshold)."""
    from pyro_latdiff._warnings import GuideQualityWarning
    from pyro_latdiff.testing import SharedRateOU

    problem = SharedRateOU(torch.linspace(0.0, 1.0, 6), obs_scale=0.1, prior_scale=2.0)
    y = problem.simulate(3.0, 200)
    guide = DiffusionGuide(problem.model)
    with pytest.warns(GuideQualityWarning, match=r"effective sample size is .* of 256 draws"):
        fit(problem.model, guide, y, num_steps=2, progress=False)
    # Exact at initialisation (a linear-Gaussian path, one terminal observation): quiet.
    problem = ou_problem(num_steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GuideQualityWarning)
        fit(problem.model, DiffusionGuide(problem.model), torch.tensor([1.5]), num_steps=2,
            progress=False)  # fmt: skip


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_a_draw_that_overflows_into_a_distribution_check_is_a_divergence():
    """An overflowing path reaches the observation's Normal(loc=...) as NaN: under
    validation Pyro raises ValueError; fit reports it as FitDivergedError instead."""
    import pyro.distributions as dist

    from pyro_latdiff import LatentDiffusion

    times = torch.linspace(0.0, 1.0, 6)

    def model(y):
        rate = pyro.sample("rate", dist.Normal(0.0, 1.0))
        drift = lambda t, x: rate * 1e200 * x**3  # noqa: E731
        path = pyro.sample("path", LatentDiffusion(drift, 1.0, torch.ones(1), times))
        pyro.sample("y", dist.Normal(path[..., -1, :], 0.1).to_event(1), obs=y)

    guide = DiffusionGuide(model, bridge=False)
    with pytest.raises(FitDivergedError, match=r"fit stopped at step 0: the loss is nan"):
        fit(
            model,
            guide,
            torch.tensor([1.0]),
            num_steps=3,
            progress=False,
            loss=pyro.infer.Trace_ELBO(max_plate_nesting=0),  # no tracing before step 0
        )
