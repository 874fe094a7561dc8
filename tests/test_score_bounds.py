"""The bound diagnostics: every term computed, and the measured error below the bound."""

from __future__ import annotations

import importlib

import pytest
import torch

from pyro_latdiff.score import OrnsteinUhlenbeck, VariancePreserving
from pyro_latdiff.score.bounds import chen_bound, denoiser_discretisation, mmse_curve
from pyro_latdiff.testing import (
    binary_denoiser,
    binary_mmse,
    binary_path_kl,
    exponential_integrator_density_1d,
    gaussian_kl,
    gaussian_marginal,
    gaussian_sampler_law,
    gaussian_score,
)


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)


WEIGHTS = torch.tensor([0.3, 0.7])
MEANS = torch.tensor([-1.5, 1.0])
SDS = torch.tensor([0.4, 0.6])


def _mixture_log_prob(x, scale=1.0, extra_var=0.0):
    var = scale**2 * SDS**2 + extra_var
    comp = -0.5 * (x[..., None] - scale * MEANS) ** 2 / var - 0.5 * torch.log(2 * torch.pi * var)
    return torch.logsumexp(comp + WEIGHTS.log(), -1)


def _mixture_score(process):
    """Exact score of the 1-D two-component mixture diffused by ``process``."""

    def score(t, x):
        a, std = process.marginal_coefs(t)
        var = a**2 * SDS**2 + std**2
        comp = -0.5 * (x - a * MEANS) ** 2 / var - 0.5 * var.log() + WEIGHTS.log()
        resp = torch.softmax(comp, -1)
        return (resp * -(x - a * MEANS) / var).sum(-1, keepdim=True)

    return score


def _mixture_sample(n):
    k = torch.multinomial(WEIGHTS, n, replacement=True)
    return (MEANS[k] + SDS[k] * torch.randn(n))[:, None]


def test_chen_bound_gaussian_terms_and_measured_kl(capsys):
    d = 10
    mean, var = torch.ones(d), torch.full((d,), 0.5)
    process = OrnsteinUhlenbeck(4.0)
    data = mean + var.sqrt() * torch.randn(2000, d)
    result = chen_bound(gaussian_score(process, mean, var), process, data, 10)
    print(result)
    out = capsys.readouterr().out
    for term in ("forward", "discretisation", "score error", "bound KL", "bound TV"):
        assert term in out
    # forward term: the convexity bound sits above the exact KL(q_T || N(0, I))
    m_t, v_t = gaussian_marginal(process, mean, var, 4.0)
    exact_forward = gaussian_kl(m_t, v_t, torch.zeros(d), torch.ones(d)).item()
    assert exact_forward <= result.forward < 2 * exact_forward
    # the exact score: the score-error estimate is zero within its noise
    assert abs(result.score_error) < 4 * result.score_error_se
    loc, cov = gaussian_sampler_law("exponential_integrator", process, mean, var, result.times)
    measured = gaussian_kl(mean, var, loc, cov).item()
    assert 1.6 < measured < result.bound
    assert result.per_step.shape == (10, 2)


@pytest.mark.parametrize("bias", [0.0, 0.3])
def test_chen_bound_mixture_measured_kl_below_bound(bias):
    """1-D two-component mixture, exact score (+ a constant bias): the exponential
    integrator's output density by quadrature on a grid, its KL against the data below
    the estimated bound."""
    process = OrnsteinUhlenbeck(4.0)
    exact = _mixture_score(process)

    def score(t, x):
        return exact(t, x) + bias

    times = torch.linspace(0, 4, 21)
    grid = torch.linspace(-7, 7, 1401)
    density = exponential_integrator_density_1d(score, process, times, grid)
    dx = grid[1] - grid[0]
    assert (density.sum() * dx).item() == pytest.approx(1, abs=1e-6)
    log_q = _mixture_log_prob(grid)
    measured = ((log_q.exp() * (log_q - density.clamp(min=1e-300).log())).sum() * dx).item()
    result = chen_bound(score, process, _mixture_sample(3000), 20, true_score=exact)
    assert 0 < measured < result.bound
    assert result.score_error_reference == pytest.approx(bias**2 * 4, rel=1e-6)
    if bias:
        assert result.score_error > 5 * result.score_error_se
        # a constant bias e: the estimate is 2 |e|^2 T = 0.72 (true integral 0.36)
        assert result.score_error == pytest.approx(2 * bias**2 * 4, rel=0.25)


def test_chen_bound_vp_with_early_stopping():
    process = VariancePreserving()
    mean, var = torch.zeros(2), torch.full((2,), 0.25)
    data = var.sqrt() * torch.randn(1000, 2)
    result = chen_bound(gaussian_score(process, mean, var), process, data, 25, t_min=1e-3)
    loc, cov = gaussian_sampler_law(
        "exponential_integrator", process, mean, var, result.times, init_var=1.0
    )
    m0, v0 = gaussian_marginal(process, mean, var, 1e-3)
    assert gaussian_kl(m0, v0, loc, cov).item() < result.bound


def test_denoiser_discretisation_equals_binary_path_kl():
    """Reeves & Pfister's identity: Delta_n from the MMSE curve equals the path KL
    computed from its definition, for uniform and equalised grids."""
    grid = torch.linspace(0, 4, 4001)
    mmse = binary_mmse(grid)
    for n, expected in ((4, 0.269748), (8, 0.126133), (16, 0.060689)):
        result = denoiser_discretisation(grid, mmse, n)
        assert result.delta == pytest.approx(expected, abs=2e-6)
        assert result.equalised_delta < result.delta <= result.bound
        per_step = 2 * result.per_step
        assert per_step.shape == (n,)
        equal = denoiser_discretisation(grid, mmse, result.equalised_times)
        assert torch.allclose(equal.per_step, equal.per_step.mean(), rtol=1e-3)
        assert binary_path_kl(result.equalised_times).item() == pytest.approx(
            result.equalised_delta, rel=1e-4
        )
    assert "equalised" in repr(result)


def test_mmse_curve_from_the_model():
    """The held-out MMSE curve of the exact denoiser matches the quadrature within its
    noise, and the Delta_n it gives is close to the exact one."""
    data = torch.randint(0, 2, (20000, 1)).double() * 2 - 1
    times = torch.linspace(0, 4, 41)
    curve = mmse_curve(binary_denoiser, data, times)
    exact = binary_mmse(times)
    assert (curve - exact).abs().max() < 0.02
    estimated = denoiser_discretisation(times, curve, 8).delta
    assert estimated == pytest.approx(0.126133, abs=0.01)


@pytest.mark.parametrize(
    "name, call",
    [
        ("data", lambda: chen_bound(lambda t, x: -x, OrnsteinUhlenbeck(), torch.ones(3), 4)),
        (
            "score",
            lambda: chen_bound(lambda t, x: x[:, :1], OrnsteinUhlenbeck(), torch.ones(5, 2), 4),
        ),
        (
            "num_steps",
            lambda: chen_bound(lambda t, x: -x, OrnsteinUhlenbeck(), torch.ones(5, 2), 0),
        ),
        ("times", lambda: denoiser_discretisation(torch.linspace(0, 1, 5), torch.ones(5), 0)),
        (
            "times",
            lambda: denoiser_discretisation(
                torch.linspace(0, 1, 5), torch.ones(5), torch.tensor([0.0, 0.5])
            ),
        ),
        ("mmse_values", lambda: denoiser_discretisation(torch.linspace(0, 1, 5), torch.ones(3), 2)),
        ("denoiser", lambda: mmse_curve(lambda t, y: y[:, :1], torch.ones(5, 2), torch.ones(2))),
    ],
)
def test_bad_input_names_the_argument(name, call):
    with pytest.raises(ValueError, match=f"Expected `{name}"):
        call()


def test_all_names_resolve_and_are_sorted():
    module = importlib.import_module("pyro_latdiff.score.bounds")
    assert list(module.__all__) == sorted(module.__all__)
    for name in module.__all__:
        assert getattr(module, name) is not None
