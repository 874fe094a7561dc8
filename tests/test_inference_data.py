import math

import arviz as az
import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import xarray as xr
from pyro import poutine
from pyro.infer import Predictive
from pyro.infer.autoguide import AutoDelta

from pyro_latdiff import DiffusionGuide, LatentDiffusion, fit, log_evidence
from pyro_latdiff.inference_data import (
    K_HAT_BAD,
    ImportanceDiagnostics,
    importance_mean,
    psis_diagnostics,
    to_inference_data,
)
from pyro_latdiff.plots import plot_paths, plot_terminal
from pyro_latdiff.testing import LinearSDE, SharedRateOU, ou_problem

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DTYPE = torch.float64
OBS_SCALE = 0.2
Y = [0.3, -0.5, 1.2, 0.1]
NUM_STEPS = 10


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(DTYPE)


@pytest.fixture(scope="module")
def global_fit():
    """A guide fitted briefly to the global model, its InferenceData and, from the same
    guide, Predictive samples and a log-evidence estimate to compare with. Computed once
    (module scope): the parameter store is cleared before each test, so the guide's
    parameters are kept as a state to restore."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    pyro.set_rng_seed(1)
    pyro.clear_param_store()
    y = torch.tensor(Y)
    problem = SharedRateOU(torch.linspace(0.0, 1.0, NUM_STEPS + 1), OBS_SCALE)
    global_model = problem.model  # a global rate, a plate of OU paths
    guide = DiffusionGuide(global_model)
    fit(global_model, guide, y, num_steps=200, num_particles=8, progress=False)
    data = to_inference_data(global_model, guide, y, num_samples=500, num_prior_samples=300)
    with torch.no_grad():
        draws = Predictive(
            global_model,
            guide=guide,
            num_samples=2000,
            parallel=True,
            return_sites=["theta", "path"],
        )(y)
    evidence = log_evidence(global_model, guide, y, num_samples=2000)
    state = pyro.get_param_store().get_state()
    torch.set_default_dtype(default)
    return dict(
        y=y, problem=problem, guide=guide, data=data, draws=draws, evidence=evidence, state=state
    )


def test_groups_dims_and_coordinates(global_fit):
    data, y, times = global_fit["data"], global_fit["y"], global_fit["problem"].times
    assert set(data.groups()) == {
        "posterior",
        "posterior_predictive",
        "log_likelihood",
        "sample_stats",
        "observed_data",
        "prior",
        "prior_predictive",
    }
    posterior = data.posterior
    assert posterior["theta"].dims == ("chain", "draw")
    assert posterior["path"].dims == ("chain", "draw", "series", "time", "state")
    assert posterior["path"].shape == (4, 500, 4, NUM_STEPS, 1)
    np.testing.assert_allclose(posterior["time"].values, times[1:].numpy())
    np.testing.assert_array_equal(posterior["series"].values, np.arange(4))
    np.testing.assert_array_equal(posterior["state"].values, [0])
    assert data.observed_data["y"].dims == ("series",)
    np.testing.assert_array_equal(data.observed_data["y"].values, y.numpy())
    for group in ("posterior_predictive", "log_likelihood"):
        assert data[group]["y"].dims == ("chain", "draw", "series")
        assert data[group]["y"].shape == (4, 500, 4)
    for name in ("log_weight", "lp", "log_q"):
        assert data.sample_stats[name].dims == ("chain", "draw")
    assert data.prior["path"].dims == ("chain", "draw", "series", "time", "state")
    assert data.prior["path"].shape == (1, 300, 4, NUM_STEPS, 1)
    assert data.prior_predictive["y"].dims == ("chain", "draw", "series")
    assert data.posterior.attrs["inference_library"] == "pyro"


def _max_z(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |difference of means| / standard error over the trailing dimensions of
    two independent samples (draws along axis 0)."""
    se = np.sqrt(a.var(0) / len(a) + b.var(0) / len(b))
    return float(np.max(np.abs(a.mean(0) - b.mean(0)) / se))


def test_posterior_agrees_with_guide_samples(global_fit):
    data, samples = global_fit["data"], global_fit["draws"]
    path = data.posterior["path"].stack(sample=("chain", "draw")).transpose("sample", ...)
    theta = data.posterior["theta"].values.reshape(-1)
    # 41 independent comparisons: max |z| < 5 fails with probability < 1e-4.
    assert _max_z(path.values, samples["path"].numpy()) < 5
    assert _max_z(theta, samples["theta"].numpy().reshape(-1)) < 5
    assert data.prior["theta"].values.min() > 0


def test_log_densities_recomputed_from_the_draws(global_fit):
    """lp, log_q and the pointwise log-likelihood are those of the model and the guide
    at the stored draws."""
    data, y, model = global_fit["data"], global_fit["y"], global_fit["problem"].model
    pyro.get_param_store().set_state(global_fit["state"])
    guide = global_fit["guide"]
    stats = data.sample_stats
    np.testing.assert_allclose(stats["log_weight"], stats["lp"] - stats["log_q"])
    for chain, draw in [(0, 0), (1, 7), (3, 499)]:
        theta = torch.tensor(data.posterior["theta"].values[chain, draw])
        path = torch.tensor(data.posterior["path"].values[chain, draw])
        values = {"theta": theta, "path": path}
        model_trace = poutine.trace(poutine.condition(model, data=values)).get_trace(y)
        lp = model_trace.log_prob_sum().item()
        assert stats["lp"].values[chain, draw] == pytest.approx(lp, rel=1e-10)
        with torch.no_grad():
            guide_trace = poutine.trace(poutine.condition(guide, data=values)).get_trace(y)
        log_q = sum(
            site["fn"].log_prob(site["value"]).sum()
            for site in guide_trace.nodes.values()
            if site["type"] == "sample"
        )
        assert stats["log_q"].values[chain, draw] == pytest.approx(log_q.item(), rel=1e-8)
        log_lik = dist.Normal(path[:, -1, 0], OBS_SCALE).log_prob(y).numpy()
        np.testing.assert_allclose(data.log_likelihood["y"].values[chain, draw], log_lik)


def test_log_weights_estimate_the_evidence(global_fit):
    log_w = torch.tensor(global_fit["data"].sample_stats["log_weight"].values.reshape(-1))
    from_data = torch.logsumexp(log_w, 0) - math.log(len(log_w))
    evidence = global_fit["evidence"]
    relative_var = len(log_w) / psis_diagnostics(global_fit["data"]).ess - 1
    stderr = math.sqrt(relative_var / len(log_w) + evidence.stderr**2)
    assert abs(from_data.item() - evidence.item()) < 5 * stderr


def test_posterior_predictive_is_observation_noise_around_the_paths(global_fit):
    data = global_fit["data"]
    residual = (
        data.posterior_predictive["y"] - data.posterior["path"].isel(time=-1, state=0)
    ).values.reshape(-1)
    n = len(residual)
    assert abs(residual.mean()) < 5 * OBS_SCALE / math.sqrt(n)
    assert abs(residual.std() - OBS_SCALE) < 5 * OBS_SCALE / math.sqrt(2 * n)


def test_importance_mean_is_the_psis_weighted_average(global_fit):
    data = global_fit["data"]
    diagnostics = psis_diagnostics(data)
    weights = np.exp(diagnostics.log_weights)
    assert weights.shape == (4, 500) and weights.sum() == pytest.approx(1.0)
    theta = data.posterior["theta"].values
    mean = importance_mean(data, var_names=["theta"])
    assert isinstance(mean, xr.Dataset) and list(mean.data_vars) == ["theta"]
    assert mean["theta"].item() == pytest.approx((weights * theta).sum(), rel=1e-12)
    second = importance_mean(data, lambda posterior: posterior["theta"] ** 2)
    assert isinstance(second, xr.DataArray) and second.dims == ()
    assert second.item() == pytest.approx((weights * theta**2).sum(), rel=1e-12)
    terminal = importance_mean(data)["path"]
    assert terminal.dims == ("series", "time", "state")
    expected = np.einsum("cd,cdstk->stk", weights, data.posterior["path"].values)
    np.testing.assert_allclose(terminal.values, expected, rtol=1e-12, atol=1e-14)


def test_arviz_summary_loo_ppc_posterior_plots(global_fit, tmp_path):
    data, times = global_fit["data"], global_fit["problem"].times
    summary = az.summary(data, var_names=["theta"])
    assert list(summary.index) == ["theta"]
    assert summary.loc["theta", "mean"] == pytest.approx(
        data.posterior["theta"].values.mean(), abs=1e-3
    )
    assert summary.loc["theta", "r_hat"] < 1.05  # independent draws split into chains
    summary = az.summary(data, var_names=["path"], kind="stats")
    assert len(summary) == 4 * NUM_STEPS
    loo = az.loo(data, pointwise=True)
    assert loo.n_data_points == 4 and loo.n_samples == 2000
    assert np.isfinite(loo.elpd_loo) and loo.pareto_k.dims == ("series",)
    axes = az.plot_ppc(data, num_pp_samples=50, random_seed=0)
    plt.gcf().savefig(tmp_path / "ppc.png")
    assert np.asarray(axes).size >= 1
    az.plot_posterior(
        data, var_names=["theta", "path"], coords={"series": [0], "time": [times[-1].item()]}
    )
    plt.gcf().savefig(tmp_path / "posterior.png")
    plt.close("all")
    assert (tmp_path / "ppc.png").stat().st_size > 0
    assert (tmp_path / "posterior.png").stat().st_size > 0


def test_path_plots(global_fit, tmp_path):
    data = global_fit["data"]
    ax = plot_paths(data, coords={"series": 2})
    assert len(ax.collections) == 4  # 90% and 50% bands of prior and posterior
    ax.figure.savefig(tmp_path / "paths.png")
    ax = plot_terminal(data, coords={"series": 2})
    ax.figure.savefig(tmp_path / "terminal.png")
    plt.close("all")
    with pytest.raises(ValueError, match="`coords` to select one value of each of"):
        plot_paths(data)
    with pytest.raises(ValueError, match="`var_name` to name a path"):
        plot_paths(data, "theta")


# ---------------------------------------------------------------- other layouts


def test_multivariate_path_event_observation_and_chunks():
    """A 2-D path with a vector observation (one event): state coordinate of length 2,
    one pointwise log-likelihood value per draw; chunking does not change the layout."""
    problem = LinearSDE(
        A=torch.tensor([[-1.0, 0.5], [-0.3, -0.2]]),
        c=torch.tensor([0.2, -0.1]),
        sigma=torch.tensor([0.7, 1.3]),
        x0=torch.tensor([0.5, -1.0]),
        times=torch.tensor([0.0, 0.1, 0.3, 0.6, 1.0]),
        H=torch.eye(2),
        obs_scale=torch.tensor([0.3, 0.3]),
    )
    y = torch.tensor([0.3, 0.1])

    def model(y):
        path = pyro.sample("path", problem.distribution())
        pyro.deterministic("terminal", path[..., -1, :], event_dim=1)
        pyro.sample("y", dist.Normal(path[..., -1, :], 0.3).to_event(1), obs=y)

    guide = DiffusionGuide(model)
    data = to_inference_data(
        model, guide, y, num_samples=30, num_chains=2, chunk_size=7, num_prior_samples=5
    )
    assert data.posterior["path"].dims == ("chain", "draw", "time", "state")
    assert data.posterior["path"].shape == (2, 30, 4, 2)
    np.testing.assert_allclose(data.posterior["time"], [0.1, 0.3, 0.6, 1.0])
    assert data.observed_data["y"].dims == ("y_dim_0",)
    assert data.posterior_predictive["y"].dims == ("chain", "draw", "y_dim_0")
    assert data.log_likelihood["y"].dims == ("chain", "draw")
    terminal = torch.tensor(data.posterior["path"].values[..., -1, :])
    expected = dist.Normal(terminal, 0.3).to_event(1).log_prob(y)
    np.testing.assert_allclose(data.log_likelihood["y"].values, expected.numpy())
    # A deterministic site is a function of the latents: posterior (and prior), not data.
    for group in ("posterior", "prior"):
        assert data[group]["terminal"].dims == ("chain", "draw", "terminal_dim_0")
        np.testing.assert_array_equal(data[group]["terminal"], data[group]["path"].isel(time=-1))
    for group in ("log_likelihood", "posterior_predictive", "observed_data", "prior_predictive"):
        assert list(data[group].data_vars) == ["y"]


def test_errors():
    problem = ou_problem(num_steps=5)
    y = torch.tensor([1.5])
    guide = DiffusionGuide(problem.model)
    with pytest.raises(ValueError, match="`num_samples` to be an int >= 1, actual 0"):
        to_inference_data(problem.model, guide, y, num_samples=0)
    with pytest.raises(ValueError, match="`num_chains` to be an int >= 1, actual 1.5"):
        to_inference_data(problem.model, guide, y, num_chains=1.5)
    with pytest.raises(ValueError, match="`chunk_size` to be an int >= 1, actual 0"):
        to_inference_data(problem.model, guide, y, chunk_size=0)
    with pytest.raises(TypeError, match="`data` to be an arviz.InferenceData, actual dict"):
        psis_diagnostics({})
    data = az.InferenceData(posterior=az.dict_to_dataset({"a": np.zeros((1, 5))}))
    with pytest.raises(ValueError, match="`sample_stats.log_weight`"):
        importance_mean(data)


# ---------------------------------------------------------------- bench A


@pytest.fixture(scope="module")
def bench_a():
    """Bench A: the InferenceData of an untrained guide without guidance and of a
    trained guide."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    problem = ou_problem()
    y = torch.tensor([1.5])
    # The untrained guide without guidance is the prior chain: far from the posterior.
    # (With guidance, the default, the untrained guide is already exact on bench A.)
    prior_guide = DiffusionGuide(problem.model, bridge=False)
    untrained = to_inference_data(
        problem.model, prior_guide, y, num_samples=250, num_prior_samples=500
    )
    guide = DiffusionGuide(problem.model)
    fit(problem.model, guide, y, num_steps=300, progress=False)
    trained = to_inference_data(problem.model, guide, y, num_samples=250, num_prior_samples=500)
    torch.set_default_dtype(default)
    return dict(problem=problem, y=y, untrained=untrained, trained=trained)


@pytest.mark.slow
def test_k_hat_separates_trained_and_untrained_guides(bench_a):
    """1000 draws each. Measured while writing the test (3 seeds x 3 draws of 1000):
    untrained k-hat 5.6-7.7; after 200 steps 0.17-0.48, after 300 steps 0.10-0.36."""
    trained = psis_diagnostics(bench_a["trained"])
    untrained = psis_diagnostics(bench_a["untrained"])
    print(f"bench A: trained {trained}; untrained {untrained}")
    assert isinstance(trained, ImportanceDiagnostics) and trained.num_draws == 1000
    assert trained.k_hat <= K_HAT_BAD and trained.verdict in ("good", "usable")
    assert untrained.k_hat > K_HAT_BAD and untrained.verdict == "unreliable"
    assert "unreliable" in str(untrained)
    assert trained.ess > untrained.ess
    assert trained.log_weights.shape == (4, 250)
    np.testing.assert_allclose(np.logaddexp.reduce(trained.log_weights.reshape(-1)), 0, atol=1e-10)


@pytest.mark.slow
def test_bench_a_terminal_marginal_against_exact(bench_a, tmp_path):
    problem, y, data = bench_a["problem"], bench_a["y"], bench_a["trained"]
    mean, cov = problem.terminal_posterior(y)
    mean, sd = mean.item(), cov.sqrt().item()
    diagnostics = psis_diagnostics(data)
    terminal = importance_mean(data, lambda post: post["path"].isel(time=-1, state=0))
    assert abs(terminal.item() - mean) < 5 * sd / math.sqrt(diagnostics.psis_ess)
    guide_terminal = data.posterior["path"].isel(time=-1, state=0).values.reshape(-1)
    assert abs(guide_terminal.mean() - mean) < 0.2 * sd  # trained: close already
    ax = plot_terminal(
        data,
        density=lambda x: np.exp(-0.5 * ((x - mean) / sd) ** 2) / (sd * math.sqrt(2 * math.pi)),
    )
    assert len(ax.lines) == 1
    ax.figure.savefig(tmp_path / "terminal.png")
    ax = plot_paths(data)
    ax.figure.savefig(tmp_path / "paths.png")
    plt.close("all")
    assert (tmp_path / "terminal.png").stat().st_size > 0


def test_a_subsampled_model_is_one_clear_error():
    """Each chunk of draws would hold other series (the observed data too: only the
    first chunk's subsample was kept) and the log-weights would be meaningless."""
    from pyro_latdiff import LatentDiffusion

    times = torch.linspace(0.0, 1.0, 6)
    y = torch.tensor([0.4, -0.8, 1.1, 0.2])

    def model(y, size=None):
        with pyro.plate("series", 4, subsample_size=size) as index:
            chain = LatentDiffusion(lambda t, x: -x, 1.0, torch.zeros(len(index), 1), times)
            path = pyro.sample("path", chain)
            pyro.sample("y", dist.Normal(path[..., -1, 0], 0.3), obs=y[index])

    guide = DiffusionGuide(
        model, create_plates=lambda y, size=None: pyro.plate("series", 4, subsample_size=size)
    )
    with pytest.raises(ValueError, match=r"to_inference_data.*subsampled plates \['series'\]"):
        to_inference_data(model, guide, y, 2, num_samples=8)
    assert to_inference_data(model, guide, y, num_samples=8).posterior["path"].shape[1] == 8


def test_a_guide_of_point_masses_has_no_importance_weights():
    """AutoDelta's theta is a point mass: log p(y, z) - log q(z) through it is
    log p(y, theta_hat) with no spread (ESS full, stderr 0), not the evidence.
    log_evidence refuses it; to_inference_data keeps the draws and ``lp`` but no
    weights, and psis_diagnostics says why."""
    problem = SharedRateOU(torch.linspace(0.0, 1.0, NUM_STEPS + 1), OBS_SCALE)
    y = torch.tensor(Y)
    guide = DiffusionGuide(problem.model, latent_guide=AutoDelta)
    fit(problem.model, guide, y, num_steps=5, num_particles=2, progress=False, check=False)
    with pytest.raises(ValueError, match=r"log_evidence: .*\['theta'\] are point masses"):
        log_evidence(problem.model, guide, y, num_samples=10)
    data = to_inference_data(problem.model, guide, y, num_samples=5, num_chains=2)
    assert "lp" in data.sample_stats and "log_weight" not in data.sample_stats
    assert data.posterior["theta"].shape == (2, 5)
    with pytest.raises(ValueError, match=r"\['theta'\] are point masses"):
        psis_diagnostics(data)


def test_deterministic_sites_and_observations_broadcast_over_a_plate_keep_the_plates_dims():
    """pyro.deterministic counts every dimension of its value as an event by default,
    the draws' and plates' too: its dims are the plate's, and its draws are the path's
    own values. An observation that broadcasts over its plate (obs = a scalar) is one
    value per member in observed_data. importance_mean takes var_names as a string."""
    times = torch.linspace(0.0, 1.0, 6)
    y = torch.tensor([1.0, -1.0, 0.5])

    def model(y, scalar_obs=False):
        with pyro.plate("series", 3):
            x0 = torch.zeros(3, 1)
            path = pyro.sample("path", LatentDiffusion(lambda t, x: -x, 1.0, x0, times))
            terminal = pyro.deterministic("xT", path[..., -1, 0])
            obs = torch.tensor(0.5) if scalar_obs else y
            pyro.sample("y", dist.Normal(terminal, 0.1), obs=obs)

    guide = DiffusionGuide(model)
    data = to_inference_data(model, guide, y, num_samples=50, num_chains=2, chunk_size=30)
    assert data.posterior["xT"].dims == ("chain", "draw", "series")
    path = data.posterior["path"].isel(time=-1, state=0)
    np.testing.assert_array_equal(data.posterior["xT"].values, path.values)
    assert data.posterior_predictive["y"].dims == ("chain", "draw", "series")
    mean = importance_mean(data, var_names="xT")
    assert mean["xT"].dims == ("series",)
    pyro.clear_param_store()
    guide = DiffusionGuide(model)
    data = to_inference_data(model, guide, y, True, num_samples=10, num_chains=1)
    assert data.observed_data["y"].dims == ("series",)
    np.testing.assert_array_equal(data.observed_data["y"].values, [0.5, 0.5, 0.5])
