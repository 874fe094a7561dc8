import math

import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from scipy import stats

from pyro_latdiff import DiffusionGuide, LatentDiffusion, fit
from pyro_latdiff.calibration import Calibration, calibrate, rank_test
from pyro_latdiff.infer import default_optim
from pyro_latdiff.plots import plot_ranks
from pyro_latdiff.testing import SharedRateOU

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)


def ou_model(times, obs_scale):
    """The global-parameter model of examples/global_parameter.py: a rate shared by a
    plate of OU paths, each observed at its end."""
    return SharedRateOU(times, obs_scale).model


# ---------------------------------------------------------------- rank_test


def test_rank_test_exact_uniform_and_unequal_bins():
    ranks = np.repeat(np.arange(100), 3)  # every rank 0..99 three times
    statistic, p_value = rank_test(ranks, num_samples=99, num_bins=10)
    assert statistic == 0.0 and p_value == 1.0
    # 11 rank values in 3 bins hold 4, 4 and 3 values: expected counts are unequal.
    ranks = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 0, 0])
    bins = ranks * 3 // 11
    observed = np.bincount(bins, minlength=3)
    expected = len(ranks) * np.array([4, 4, 3]) / 11
    assert rank_test(ranks, num_samples=10, num_bins=3) == pytest.approx(
        tuple(stats.chisquare(observed, expected))
    )


def test_rank_test_level_under_uniform_ranks():
    """Under uniform ranks the 1% test rejects 1% of the time (within 4 standard errors)."""
    rng = np.random.default_rng(0)
    trials = 2000
    rejections = sum(rank_test(rng.integers(0, 100, size=100), 99)[1] < 0.01 for _ in range(trials))
    assert abs(rejections / trials - 0.01) < 4 * math.sqrt(0.01 * 0.99 / trials)


def test_rank_test_rejects_u_shape():
    ranks = np.concatenate([np.zeros(40, dtype=int), np.full(40, 99), np.arange(0, 100, 5)])
    assert rank_test(ranks, 99)[1] < 1e-10


@pytest.mark.parametrize(
    "ranks, kwargs, match",
    [
        (np.array([0, 100]), {}, r"`ranks` to be integers in \[0, 99\]"),
        (np.array([0.5, 1.0]), {}, "`ranks` to be integers"),
        (np.array([], dtype=int), {}, "`ranks` to be non-empty"),
        (np.array([1, 2]), {"num_bins": 1}, "`num_bins` to be an int >= 2"),
        (np.array([1, 2]), {"num_bins": 101}, "`num_bins` <= num_samples"),
    ],
)
def test_rank_test_errors(ranks, kwargs, match):
    with pytest.raises(ValueError, match=match):
        rank_test(ranks, 99, **kwargs)


# ---------------------------------------------------------------- calibrate


def test_calibrate_one_fit_per_simulation(tmp_path):
    """The textbook loop (one guide per data set): ranks of named sites and callables."""
    times = torch.linspace(0.0, 1.0, 6)
    y = torch.zeros(3)
    result = calibrate(
        ou_model(times, 0.5),
        y,
        quantities={"theta": lambda v: v["theta"], "terminal": lambda v: v["path"][..., -1, 0]},
        num_simulations=3,
        num_samples=19,
        num_steps=3,
        guide_fn=lambda model: DiffusionGuide(model, hidden_dims=(8,)),
    )
    assert isinstance(result, Calibration)
    assert result.num_simulations == 3 and result.num_samples == 19
    assert sorted(result.ranks) == ["terminal[0]", "terminal[1]", "terminal[2]", "theta"]
    for ranks in result.ranks.values():
        assert ranks.shape == (3,) and ranks.dtype == np.int64
        assert ranks.min() >= 0 and ranks.max() <= 19
    assert set(result.p_values(num_bins=2)) == set(result.ranks)
    assert "theta" in str(result)
    # SBC fits leave the caller's parameter store alone.
    assert not list(pyro.get_param_store().keys())
    ax = plot_ranks(result, "theta", num_bins=4)
    ax.figure.savefig(tmp_path / "ranks.png")
    plt.close("all")
    assert (tmp_path / "ranks.png").stat().st_size > 0


def test_calibrate_errors():
    times = torch.linspace(0.0, 1.0, 3)
    y = torch.zeros(2)
    with pytest.raises(ValueError, match="`num_simulations` to be an int >= 1, actual 0"):
        calibrate(ou_model(times, 0.5), y, quantities=["theta"], num_simulations=0)
    with pytest.raises(TypeError, match="`quantities` to be a sequence"):
        calibrate(ou_model(times, 0.5), y, quantities=3)
    with pytest.raises(ValueError, match="at least one quantity"):
        calibrate(ou_model(times, 0.5), y, quantities=[])
    with pytest.raises(TypeError, match=r"`quantities\['a'\]` to be callable"):
        calibrate(ou_model(times, 0.5), y, quantities={"a": 1})


@pytest.mark.parametrize(
    "name, match", [("thetta", "not a site of the model"), ("y", "an observed site")]
)
def test_quantities_that_name_no_latent_site_are_one_error_before_any_fit(name, match):
    times = torch.linspace(0.0, 1.0, 3)

    def never(*args, **kwargs):
        raise AssertionError("fitted before the quantities were checked")

    expected = rf"`quantities` to name latent sites.*'{name}' is {match}"
    with pytest.raises(ValueError, match=expected):
        calibrate(ou_model(times, 0.5), torch.zeros(2), quantities=[name], fit_fn=never)


def test_a_deterministic_site_is_neither_data_nor_a_quantity_by_name():
    """``pyro.deterministic("xT", ...)`` is a function of the path: simulated data are the
    observations only, so the fit sees y (the guide's X_T is near each simulated y), and
    xT named as a quantity says how to give it. Several simulations per fit too (its
    Delta is not drawn again under the simulations' plate)."""
    times = torch.linspace(0.0, 1.0, 11)

    def model(y):
        path = pyro.sample("path", LatentDiffusion(lambda t, x: -x, 1.0, torch.zeros(1), times))
        terminal = pyro.deterministic("xT", path[..., -1, 0])
        pyro.sample("y", dist.Normal(terminal, 0.05), obs=y)

    seen = []

    def fit_fn(conditioned, guide, *args, **kwargs):
        trace = poutine.trace(conditioned).get_trace(*args, **kwargs)
        observed = [
            name
            for name, site in trace.nodes.items()
            if site["type"] == "sample" and site["is_observed"]
            if not site["infer"].get("_deterministic")
        ]
        seen.append(sorted(observed))

    quantities = {"xT": lambda v: v["path"][..., -1, 0]}
    result = calibrate(model, torch.tensor(1.0), quantities=quantities, num_simulations=4,
                       num_samples=9, simulations_per_fit=2, fit_fn=fit_fn)  # fmt: skip
    assert seen == [["y"], ["y"]]
    assert result.ranks["xT"].shape == (4,)
    with pytest.raises(ValueError, match=r"'xT' is a pyro.deterministic site"):
        calibrate(model, torch.tensor(1.0), quantities=["xT"], fit_fn=fit_fn)


# SBC of theta in the OU global-parameter model: 20 series observed with sd 0.5 at
# T = 2, 10 Euler steps; the posterior sd of log(theta) is about 0.39 (prior 0.5).
# 100 simulations fitted together (simulations_per_fit=100: one theta guide per data
# set, a shared path network), 200 SVI steps, 99 posterior draws, 10 rank bins.
# Measured while writing this test: the trained guide's scale of log(theta) is 0.9-1.0
# times the exact posterior sd (quadrature), its mean within 0.1 posterior sd. The
# chi-square test at the 1% level then passes with probability about 0.99 for an exact
# posterior; halving the scale (ranks u = Phi(2 z)) gives a non-centrality of about 60
# on 9 degrees of freedom: power > 0.999 (asymptotic), so the over-confident guide
# fails with high probability.
SBC = dict(
    num_series=20,
    num_steps=10,
    t_end=2.0,
    obs_scale=0.5,
    num_simulations=100,
    num_samples=99,
    svi_steps=200,
)


def _sbc(shrink: float) -> Calibration:
    times = torch.linspace(0.0, SBC["t_end"], SBC["num_steps"] + 1)
    y = torch.zeros(SBC["num_series"])
    steps = SBC["svi_steps"]

    def fit_fn(model, guide, *args, **kwargs):
        fit(
            model,
            guide,
            *args,
            num_steps=steps,
            num_particles=4,
            progress=False,
            optim=default_optim(steps, lr=0.05, final_lr=0.005),
            **kwargs,
        )
        if shrink != 1.0:  # a deliberately over-confident guide
            log_scale = pyro.get_param_store()[f"{guide._pyro_name}.log_scales.theta"]
            with torch.no_grad():
                log_scale.add_(math.log(shrink))

    return calibrate(
        ou_model(times, SBC["obs_scale"]),
        y,
        quantities=["theta"],
        num_simulations=SBC["num_simulations"],
        num_samples=SBC["num_samples"],
        simulations_per_fit=SBC["num_simulations"],
        guide_fn=lambda model: DiffusionGuide(model, hidden_dims=(32,)),
        fit_fn=fit_fn,
    )


@pytest.mark.slow
def test_sbc_passes_for_trained_guide_and_fails_for_overconfident_guide():
    calibrated = _sbc(shrink=1.0)
    pyro.set_rng_seed(0)  # the same simulated data sets
    overconfident = _sbc(shrink=0.5)
    p_calibrated = calibrated.p_values(num_bins=10)["theta"]
    p_overconfident = overconfident.p_values(num_bins=10)["theta"]
    print(f"SBC p-values: trained {p_calibrated:.4g}, over-confident {p_overconfident:.4g}")
    assert p_calibrated > 0.01
    assert p_overconfident < 0.01
    # Over-confidence shows as a U shape: too many ranks in the outer bins.
    ranks = overconfident.ranks["theta"]
    outer = np.mean((ranks < 10) | (ranks >= 90))
    assert outer > 0.2 + 4 * math.sqrt(0.2 * 0.8 / len(ranks))
