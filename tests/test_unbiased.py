"""Tests of pyro_latdiff.unbiased: unbiasedness against closed forms, in standard errors.

Reference problems (sigma = 1 unless stated):

- Ornstein–Uhlenbeck ``dX = -a X dt + dW``: ``X_T ~ N(x0 e^{-aT}, (1 - e^{-2aT}) / (2a))``
  (:mod:`pyro_latdiff.testing.ou`).
- Beneš ``dX = tanh(X) dt + dW``: ``p_T(x | x0) = cosh(x) / cosh(x0) e^{-T/2} N(x; x0, T)``,
  closed forms of ``E cos X_T``, ``E sin X_T`` (:mod:`pyro_latdiff.testing.benes`; the
  references themselves are checked in ``tests/test_testing.py``).
- A 2-D linear SDE ``dX = A X dt + diag(s) dW`` (matrix exponential, Van Loan).

Each estimate must lie within 3.5 standard errors of the exact value; on the same
problems 10-step Euler must miss by more than 5 of its standard errors, so the
tests can tell a biased estimator from an unbiased one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import torch

import pyro_latdiff.unbiased as unbiased
from pyro_latdiff.testing import (
    benes_drift,
    benes_expectation_cos,
    benes_expectation_sin,
    ou_drift,
    ou_expectation_cos,
    ou_terminal_moments,
)
from pyro_latdiff.unbiased import (
    ExponentialArrivals,
    PowerArrivals,
    euler_expectation,
    expectation,
    likelihood,
    rmlmc_expectation,
    sample_weighted,
)

DTYPE = torch.float64
NUM = 1_000_000  # samples of every unbiasedness test
TOL = 3.5  # standard errors
EULER_MIN_Z = 5.0  # 10-step Euler must be at least this many of its stderrs off


# --------------------------------------------------------------------------- problems


A_OU, T_OU, X0_OU = 1.0, 1.0, 1.0
X0_BENES, T_BENES = 0.5, 1.0

_ou_drift = ou_drift(A_OU)
_benes_drift = benes_drift()


def _cos(x):
    return torch.cos(x[..., 0])


def _sin(x):
    return torch.sin(x[..., 0])


def _square(x):
    return x[..., 0] ** 2


def _problems():
    m, v = ou_terminal_moments(X0_OU, T_OU, rate=A_OU)
    ou_cos = ou_expectation_cos(X0_OU, T_OU, rate=A_OU)
    benes_cos = benes_expectation_cos(X0_BENES, T_BENES)
    benes_sin = benes_expectation_sin(X0_BENES, T_BENES)
    return {
        "ou-cos": (_ou_drift, X0_OU, T_OU, _cos, ou_cos),
        "ou-square": (_ou_drift, X0_OU, T_OU, _square, m * m + v),
        "benes-cos": (_benes_drift, X0_BENES, T_BENES, _cos, benes_cos),
        "benes-sin": (_benes_drift, X0_BENES, T_BENES, _sin, benes_sin),
    }


PROBLEMS = _problems()

LAWS = {
    "exponential-1": lambda t: ExponentialArrivals(rate=1.0 / t),
    "exponential-2": lambda t: ExponentialArrivals(rate=2.0 / t),
    "power-0.5": lambda t: PowerArrivals(gamma=0.5, horizon=2.0 * t),
    "uniform": lambda t: PowerArrivals(gamma=0.0, horizon=2.0 * t),
}


def _z(result, exact) -> float:
    return float((result.estimate - exact) / result.stderr)


def _x0(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=DTYPE)


# --------------------------------------------------------------------------- parametrix


@pytest.mark.slow
@pytest.mark.parametrize("law", sorted(LAWS))
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_parametrix_unbiased(problem, law):
    drift, x0, t, fn, exact = PROBLEMS[problem]
    torch.manual_seed(0)
    result = expectation(fn, drift, _x0(x0), t, num_samples=NUM, arrivals=LAWS[law](t))
    assert result.estimate.shape == ()
    assert abs(_z(result, exact)) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_parametrix_unbiased_without_antithetic(problem):
    drift, x0, t, fn, exact = PROBLEMS[problem]
    torch.manual_seed(1)
    result = expectation(fn, drift, _x0(x0), t, num_samples=NUM, antithetic=False)
    assert abs(_z(result, exact)) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("problem", sorted(PROBLEMS))
def test_euler_10_steps_is_detectably_biased(problem):
    """The problems are sharp enough: 10-step Euler misses by > 5 standard errors."""
    drift, x0, t, fn, exact = PROBLEMS[problem]
    torch.manual_seed(2)
    result = euler_expectation(fn, drift, _x0(x0), t, num_samples=NUM, num_steps=10)
    assert abs(_z(result, exact)) > EULER_MIN_Z


def _linear_2d():
    A = np.array([[-1.0, 0.8], [-0.8, -0.5]])
    s = np.array([1.0, 0.5])
    t = 1.2
    n = 2
    van_loan = scipy.linalg.expm(
        np.block([[-A, np.diag(s**2)], [np.zeros((n, n)), A.T]]) * t
    )  # covariance of X_T: Phi^T G with Phi = e^{A^T t}
    cov = van_loan[n:, n:].T @ van_loan[:n, n:]
    return A, s, t, scipy.linalg.expm(A * t), cov


@pytest.mark.slow
def test_parametrix_linear_2d_batch_and_event_shape():
    """2-D rotating linear SDE, per-dimension sigma, batch of 3 initial states,
    ``fn`` with an event dimension: every entry unbiased."""
    A, s, t, phi, cov = _linear_2d()
    x0 = np.array([[1.0, -0.5], [0.0, 0.0], [-1.5, 1.0]])
    u = np.array([1.0, -0.7])
    A_t = torch.tensor(A, dtype=DTYPE)

    def drift(t, x):
        return x @ A_t.T

    def fn(x):
        return torch.stack([torch.cos(x @ torch.tensor(u, dtype=DTYPE)), x[..., 1]], dim=-1)

    mean = x0 @ phi.T  # (3, 2)
    exact = np.stack([np.exp(-0.5 * u @ cov @ u) * np.cos(mean @ u), mean[:, 1]], axis=-1)  # (3, 2)
    torch.manual_seed(3)
    result = expectation(
        fn,
        drift,
        torch.tensor(x0, dtype=DTYPE),
        t,
        sigma=torch.tensor(s, dtype=DTYPE),
        num_samples=NUM,
    )
    assert result.estimate.shape == (3, 2)
    assert result.values.shape == (NUM, 3, 2)
    z = (result.estimate - torch.tensor(exact)) / result.stderr
    assert z.abs().max() < TOL, z


@pytest.mark.slow
def test_parametrix_time_dependent_drift_and_t0():
    """``dX = (-X + sin t) dt + 0.7 dW`` on ``[0.5, 1.7]``: the random grid passes one
    time per sample to the drift."""
    t0, t1, x0, sig = 0.5, 1.7, 0.3, 0.7

    def drift(t, x):
        assert t.shape == (x.shape[0], 1) or t.dim() == 0  # random grid, resp. Euler
        return -x + torch.sin(t)

    def primitive(s):  # d/ds [e^{s - t1} (sin s - cos s) / 2] = e^{s - t1} sin s
        return math.exp(s - t1) * (math.sin(s) - math.cos(s)) / 2.0

    mean = x0 * math.exp(-(t1 - t0)) + primitive(t1) - primitive(t0)
    var = sig**2 * (1.0 - math.exp(-2.0 * (t1 - t0))) / 2.0
    torch.manual_seed(4)
    result = expectation(_cos, drift, _x0(x0), t1, t0=t0, sigma=sig, num_samples=NUM)
    assert abs(_z(result, math.exp(-var / 2.0) * math.cos(mean))) < TOL
    # the closed form of the mean, checked by quadrature of the variation of constants
    forced, _ = scipy.integrate.quad(lambda r: math.exp(r - t1) * math.sin(r), t0, t1)
    assert mean == pytest.approx(x0 * math.exp(-(t1 - t0)) + forced, abs=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("rate", [1.0, 2.0])
def test_standard_error_shrinks_like_inverse_sqrt_n(rate):
    """Finite variance: the stderr at n and 4n differ by a factor 2 and the sample
    variances agree, both within tolerances derived from the fourth moments; the
    variance estimate itself has a small relative standard error (Beneš, whose drift
    is bounded and Lipschitz: the setting of the finite-variance theorem)."""
    drift, x0, t, fn, _ = PROBLEMS["benes-cos"]
    law = ExponentialArrivals(rate)
    n = 250_000
    torch.manual_seed(6)
    small = expectation(fn, drift, _x0(x0), t, num_samples=n, arrivals=law)
    large = expectation(fn, drift, _x0(x0), t, num_samples=4 * n, arrivals=law)

    def var_and_se(values):
        centred = values - values.mean()
        var = centred.square().mean()
        m4 = centred.pow(4).mean()
        return float(var), float(((m4 - var**2) / values.numel()).sqrt())

    v_small, se_small = var_and_se(small.values)
    v_large, se_large = var_and_se(large.values)
    se_diff = math.hypot(se_small, se_large)
    assert abs(v_small - v_large) < TOL * se_diff
    ratio = float(small.stderr / large.stderr)
    # ratio = 2 sqrt(v_small / v_large); delta method on the variance ratio
    ratio_se = ratio / 2.0 * se_diff / v_large
    assert abs(ratio - 2.0) < TOL * ratio_se
    # measured kurtosis 30 (rate 2) to 400 (rate 1): relative stderr of the variance
    # 0.5 % to 2 % at 10^6 samples; heavy tails (an infinite fourth moment) would not
    # settle like this
    assert se_large / v_large < 0.05


def test_mean_depth_of_exponential_grid_is_one_plus_rate_times_horizon():
    """The depth is N + 1 with N ~ Poisson(rate T)."""
    rate, t = 3.0, 0.8
    torch.manual_seed(7)
    draws = sample_weighted(
        _benes_drift, _x0(0.5), t, num_samples=200_000, arrivals=ExponentialArrivals(rate)
    )
    depths = draws.depths.double()
    assert depths.min() >= 1
    expected = 1.0 + rate * t
    stderr = math.sqrt(rate * t / depths.numel())
    assert abs(depths.mean().item() - expected) < TOL * stderr
    assert abs(depths.var().item() - rate * t) < 0.05 * rate * t


def test_drift_is_called_once_per_depth_level_per_chunk():
    """Vectorised over samples: one drift call per level (plus the contract probe),
    whatever the number of samples."""
    calls = []

    def drift(t, x):
        calls.append(tuple(x.shape))
        return torch.tanh(x)

    torch.manual_seed(8)
    draws = sample_weighted(drift, torch.zeros(4, 2, dtype=DTYPE), 1.0, num_samples=50_000)
    assert calls[0] == (1, 4, 2)  # the probe
    assert len(calls) - 1 == int(draws.depths.max())
    assert all(shape[1:] == (4, 2) for shape in calls)
    assert calls[1][0] == 50_000
    torch.manual_seed(8)
    calls.clear()
    sample_weighted(
        drift, torch.zeros(4, 2, dtype=DTYPE), 1.0, num_samples=50_000, chunk_size=20_000
    )
    assert len(calls) - 1 <= 3 * int(draws.depths.max()) + 3


def test_weighted_sample_atoms():
    """Antithetic atoms: depth 1 gives two equal weights, deeper draws opposite ones."""
    torch.manual_seed(9)
    draws = sample_weighted(_ou_drift, _x0(1.0), 1.0, num_samples=10_000)
    assert draws.weights.shape == (10_000, 2)
    assert draws.states.shape == (10_000, 2, 1)
    shallow = draws.depths == 1
    assert shallow.any() and (~shallow).any()
    w = draws.weights
    assert torch.equal(w[shallow, 0], w[shallow, 1])
    assert torch.equal(w[~shallow, 0], -w[~shallow, 1])
    # depth 1 is the N = 0 event, weight 1 / P(N = 0) / 2 = e^{rate T} / 2
    assert torch.allclose(w[shallow, 0], torch.full_like(w[shallow, 0], math.e / 2))
    torch.manual_seed(9)
    plain = sample_weighted(_ou_drift, _x0(1.0), 1.0, num_samples=10_000, antithetic=False)
    assert (plain.weights[plain.depths == 1, 1] == 0).all()


# --------------------------------------------------------------------------- laws


@pytest.mark.parametrize(
    "law", [ExponentialArrivals(2.5), PowerArrivals(0.5, 2.0), PowerArrivals(0.0, 1.5)]
)
def test_arrival_laws(law):
    """``sample``, ``survival``, ``density`` and ``mean`` describe the same law."""
    n = 400_000
    torch.manual_seed(10)
    tau = law.sample((n,), DTYPE)
    assert tau.dtype == DTYPE and (tau > 0).all()
    stderr = float(tau.std()) / math.sqrt(n)
    assert abs(float(tau.mean()) - law.mean) < TOL * stderr
    for t in [0.05, 0.3, 1.0]:
        p = float(law.survival(torch.tensor(t, dtype=DTYPE)))
        empirical = float((tau > t).double().mean())
        assert abs(empirical - p) < TOL * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-12
    # density = -d survival / dt
    t = torch.linspace(0.05, 1.2, 50, dtype=DTYPE)
    eps = 1e-6
    numeric = (law.survival(t - eps) - law.survival(t + eps)) / (2 * eps)
    assert torch.allclose(law.density(t), numeric, rtol=1e-6, atol=1e-9)


def test_power_law_needs_horizon_beyond_t1():
    with pytest.raises(ValueError, match="arrivals"):
        expectation(
            _cos, _benes_drift, _x0(0.5), 1.0, num_samples=10, arrivals=PowerArrivals(0.5, 1.0)
        )


# --------------------------------------------------------------------------- RMLMC


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["coupled", "single"])
@pytest.mark.parametrize("problem", ["benes-cos", "ou-square"])
def test_rmlmc_unbiased(problem, estimator):
    drift, x0, t, fn, exact = PROBLEMS[problem]
    torch.manual_seed(11)
    result = rmlmc_expectation(fn, drift, _x0(x0), t, num_samples=NUM, estimator=estimator)
    assert result.method == "rmlmc"
    assert abs(_z(result, exact)) < TOL
    # finite mean cost: about 3 to 4 drift evaluations per sample with base_steps=1
    assert 1.0 < result.mean_cost < 10.0


def test_rmlmc_level_zero_only_is_one_step_euler():
    """With a huge decay every sample is level 0: the estimator is 1-step Euler."""
    torch.manual_seed(12)
    result = rmlmc_expectation(_cos, _benes_drift, _x0(0.5), 1.0, num_samples=1000, decay=60.0)
    torch.manual_seed(12)
    torch.rand(1000, dtype=torch.float64)  # the level draws
    euler = euler_expectation(_cos, _benes_drift, _x0(0.5), 1.0, num_samples=1000, num_steps=1)
    assert torch.allclose(result.values, euler.values * (1.0 / (1.0 - 2.0**-60.0)))
    assert result.mean_cost == 1.0


# --------------------------------------------------------------------------- likelihood


@pytest.mark.slow
def test_likelihood_of_ou_with_gaussian_observation():
    """``p(y) = N(y; m, v + s^2)`` for ``y ~ N(X_T, s^2)`` under OU."""
    y, s = 0.9, 0.5
    m, v = ou_terminal_moments(X0_OU, T_OU, rate=A_OU)
    exact = math.exp(-((y - m) ** 2) / (2 * (v + s * s))) / math.sqrt(2 * math.pi * (v + s * s))

    def log_lik(x):
        return -((y - x[..., 0]) ** 2) / (2 * s * s) - math.log(s * math.sqrt(2 * math.pi))

    torch.manual_seed(13)
    result = likelihood(log_lik, _ou_drift, _x0(X0_OU), T_OU, num_samples=NUM)
    assert abs(_z(result, exact)) < TOL
    assert result.sign == 1
    assert abs(float(result.log_abs_estimate) - math.log(exact)) < TOL * float(
        result.relative_stderr
    )
    # far in the tail: log-likelihood shifted by -1000 loses nothing
    torch.manual_seed(13)
    shifted = likelihood(
        lambda x: log_lik(x) - 1000.0, _ou_drift, _x0(X0_OU), T_OU, num_samples=NUM
    )
    assert float(shifted.estimate) == 0.0  # underflows on the natural scale
    assert float(shifted.log_abs_estimate) == pytest.approx(
        float(result.log_abs_estimate) - 1000.0, abs=1e-9
    )


def test_likelihood_batch():
    """A batch of initial states gives a batch of likelihoods."""
    torch.manual_seed(14)
    x0 = torch.tensor([[0.0], [1.0]], dtype=DTYPE)
    result = likelihood(lambda x: -0.5 * x[..., 0] ** 2, _benes_drift, x0, 1.0, num_samples=1000)
    assert result.estimate.shape == (2,)
    assert result.scaled_values.shape == (1000, 2)


# --------------------------------------------------------------------------- errors


def _call(**overrides):
    kwargs = dict(fn=_cos, drift=_benes_drift, x0=_x0(0.5), t1=1.0, num_samples=10)
    kwargs.update(overrides)
    fn = kwargs.pop("fn")
    drift = kwargs.pop("drift")
    x0 = kwargs.pop("x0")
    t1 = kwargs.pop("t1")
    return expectation(fn, drift, x0, t1, **kwargs)


@pytest.mark.parametrize(
    "overrides, error, name",
    [
        (dict(num_samples=0), ValueError, "num_samples"),
        (dict(num_samples=-5), ValueError, "num_samples"),
        (dict(num_samples=1), ValueError, "num_samples"),
        (dict(num_samples=10.0), TypeError, "num_samples"),
        (dict(num_samples=True), TypeError, "num_samples"),
        (dict(sigma=0.0), ValueError, "sigma"),
        (dict(sigma=-1.0), ValueError, "sigma"),
        (dict(sigma=float("nan")), ValueError, "sigma"),
        (dict(sigma=torch.tensor([1.0, 2.0], dtype=DTYPE)), ValueError, "sigma"),
        (dict(sigma=torch.tensor([-1.0], dtype=DTYPE)), ValueError, "sigma"),
        (dict(sigma="1"), TypeError, "sigma"),
        (dict(sigma=lambda t, x: torch.ones_like(x)), NotImplementedError, "sigma"),
        (dict(fn=3.0), TypeError, "fn"),
        (dict(fn=lambda x: x.sum()), ValueError, "fn"),
        (dict(drift="tanh"), TypeError, "drift"),
        (dict(drift=lambda t, x: x.sum(-1)), ValueError, "drift"),
        (dict(drift=lambda t, x: x * float("nan")), ValueError, "drift"),
        (dict(x0=[0.5]), TypeError, "x0"),
        (dict(x0=torch.tensor(0.5, dtype=DTYPE)), ValueError, "x0"),
        (dict(x0=torch.tensor([float("inf")], dtype=DTYPE)), ValueError, "x0"),
        (dict(t1=0.0), ValueError, "t1"),
        (dict(t1=-1.0, t0=0.0), ValueError, "t1"),
        (dict(t1=float("inf")), ValueError, "t1"),
        (dict(arrivals="exponential"), TypeError, "arrivals"),
        (dict(antithetic=1), TypeError, "antithetic"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
    ],
)
def test_bad_input(overrides, error, name):
    with pytest.raises(error, match=f"Expected `{name}") as info:
        _call(**overrides)
    assert "actual" in str(info.value)


@pytest.mark.parametrize(
    "make, error, name",
    [
        (lambda: ExponentialArrivals(0.0), ValueError, "rate"),
        (lambda: ExponentialArrivals(-1.0), ValueError, "rate"),
        (lambda: ExponentialArrivals("1"), TypeError, "rate"),
        (lambda: PowerArrivals(1.0, 2.0), ValueError, "gamma"),
        (lambda: PowerArrivals(-0.1, 2.0), ValueError, "gamma"),
        (lambda: PowerArrivals(0.5, 0.0), ValueError, "horizon"),
    ],
)
def test_bad_law(make, error, name):
    with pytest.raises(error, match=f"Expected `{name}`.*actual"):
        make()


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(estimator="both"), ValueError, "estimator"),
        (dict(decay=0.0), ValueError, "decay"),
        (dict(decay=1.0), ValueError, "decay"),  # infinite expected cost
        (dict(decay=0.5), ValueError, "decay"),
        (dict(base_steps=0), ValueError, "base_steps"),
        (dict(base_steps=1.5), TypeError, "base_steps"),
        (dict(num_samples=0), ValueError, "num_samples"),
    ],
)
def test_bad_rmlmc_input(kwargs, error, name):
    kwargs = {"num_samples": 10, **kwargs}
    with pytest.raises(error, match=f"Expected `{name}`.*actual"):
        rmlmc_expectation(_cos, _benes_drift, _x0(0.5), 1.0, **kwargs)


def test_bad_euler_and_likelihood_input():
    with pytest.raises(ValueError, match="Expected `num_steps`.*actual"):
        euler_expectation(_cos, _benes_drift, _x0(0.5), 1.0, num_samples=10, num_steps=0)
    with pytest.raises(TypeError, match="Expected `log_lik_fn`.*actual"):
        likelihood(None, _benes_drift, _x0(0.5), 1.0, num_samples=10)
    with pytest.raises(ValueError, match="Expected `log_lik_fn.*actual"):
        likelihood(lambda x: x, _benes_drift, _x0(0.5), 1.0, num_samples=10)


@pytest.mark.parametrize(
    "estimate",
    [
        lambda g: expectation(g, _benes_drift, _x0(0.5), 1.0, num_samples=10),
        lambda g: rmlmc_expectation(g, _benes_drift, _x0(0.5), 1.0, num_samples=10),
        lambda g: rmlmc_expectation(
            g, _benes_drift, _x0(0.5), 1.0, num_samples=10, estimator="single"
        ),
        lambda g: euler_expectation(g, _benes_drift, _x0(0.5), 1.0, num_samples=10, num_steps=4),
    ],
    ids=["parametrix", "rmlmc-coupled", "rmlmc-single", "euler"],
)
@pytest.mark.parametrize(
    "fn",
    [lambda x: x[..., 0] > 0, lambda x: (x[..., 0] > 0).long(), lambda x: x[..., 0].float()],
    ids=["bool", "long", "float32"],
)
def test_fn_of_another_dtype_is_one_clear_error(estimate, fn):
    """An indicator or a float32 fn on float64 states: one error with the fix, in every
    estimator (RMLMC raised torch's index-put error, Euler a mean() dtype error)."""
    with pytest.raises(ValueError, match=r"Expected `fn\(x\)` to return x's dtype torch.float64"):
        estimate(fn)


def test_public_names():
    assert unbiased.__all__ == sorted(unbiased.__all__)
    for name in unbiased.__all__:
        assert getattr(unbiased, name) is not None
