"""Tests of the reference problems in pyro_latdiff.testing against each other and against
independent computations.

- Beneš: the closed forms against Gauss–Hermite quadrature (1e-10); the density
  against the Fokker–Planck and backward Kolmogorov equations (autograd, exact
  derivatives), its mass and moments by the trapezoid rule, and the mixture law;
  the moments and ``E cos`` against the Euler chain, by density propagation
  (Richardson-extrapolated, O(h^2)) and by Monte Carlo (in standard errors).
- The grid propagation of an Euler chain's density against the exact Gaussian chain.
- Ornstein–Uhlenbeck: the moments against the Euler chain of
  :class:`~pyro_latdiff.testing.LinearSDE` (first-order convergence, Richardson to
  O(h^2)), ``E cos`` against quadrature.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pyro_latdiff.testing import (
    benes_drift,
    benes_expectation,
    benes_expectation_cos,
    benes_expectation_sin,
    benes_terminal_distribution,
    benes_terminal_moments,
    benes_transition_density,
    euler_grid_density,
    ou_drift,
    ou_expectation_cos,
    ou_problem,
    ou_terminal_moments,
    ou_terminal_variance,
)

DTYPE = torch.float64
TOL = 3.5  # standard errors
CASES = [(0.5, 1.0, 1.0), (0.0, 2.0, 1.0), (-1.0, 0.3, 1.0), (0.5, 1.0, 2.0), (1.2, 0.7, 3.0)]


def _cos(x):
    return torch.cos(x[..., 0])


def _sin(x):
    return torch.sin(x[..., 0])


def _ones(x):
    return torch.ones_like(x[..., 0])


def _identity(x):
    return x[..., 0]


def _square(x):
    return x[..., 0] ** 2


# --------------------------------------------------------------------------- Beneš


def test_benes_references_agree():
    """The Gauss–Hermite reference and the closed forms agree, and the density
    integrates to one (moved from tests/test_unbiased.py, same tolerances)."""
    for x0, t in [(0.5, 1.0), (0.0, 2.0), (-1.0, 0.3)]:
        c, s = benes_expectation_cos(x0, t), benes_expectation_sin(x0, t)
        assert float(benes_expectation(_cos, x0, t)) == pytest.approx(c, abs=1e-12)
        assert float(benes_expectation(_sin, x0, t)) == pytest.approx(s, abs=1e-12)
        assert float(benes_expectation(_ones, x0, t)) == pytest.approx(1.0, abs=1e-12)
        mean = x0 + t * math.tanh(x0)
        assert float(benes_expectation(_identity, x0, t)) == pytest.approx(mean, abs=1e-12)


@pytest.mark.parametrize("x0, t, a", CASES)
@pytest.mark.parametrize("frequency", [1.0, 2.5])
def test_benes_closed_forms_match_quadrature(x0, t, a, frequency):
    def fn(x):
        return torch.stack([torch.cos(frequency * x[..., 0]), torch.sin(frequency * x[..., 0])], -1)

    quadrature = benes_expectation(fn, x0, t, a=a)
    assert quadrature.shape == (2,) and quadrature.dtype == DTYPE
    assert float(quadrature[0]) == pytest.approx(
        benes_expectation_cos(x0, t, a=a, frequency=frequency), abs=1e-10
    )
    assert float(quadrature[1]) == pytest.approx(
        benes_expectation_sin(x0, t, a=a, frequency=frequency), abs=1e-10
    )
    mean, variance = benes_terminal_moments(x0, t, a=a)
    assert float(benes_expectation(_identity, x0, t, a=a)) == pytest.approx(mean, abs=1e-10)
    second = float(benes_expectation(_square, x0, t, a=a))
    assert second == pytest.approx(variance + mean**2, abs=1e-10)


def test_benes_a_zero_is_brownian_motion():
    x0, t = 0.7, 1.3
    assert benes_expectation_cos(x0, t, a=0.0) == pytest.approx(
        math.exp(-t / 2) * math.cos(x0), abs=1e-15
    )
    assert benes_terminal_moments(x0, t, a=0.0) == (x0, t)


@pytest.mark.parametrize("x0, t, a", CASES)
def test_benes_density_mass_moments_and_mixture(x0, t, a):
    """Trapezoid rule on a wide grid (spectrally accurate for these tails)."""
    x = torch.linspace(x0 - a * t - 14 * math.sqrt(t), x0 + a * t + 14 * math.sqrt(t), 20_001)
    x = x.to(DTYPE)
    p = benes_transition_density(x, x0, t, a=a)
    mean, variance = benes_terminal_moments(x0, t, a=a)
    assert float(torch.trapezoid(p, x)) == pytest.approx(1.0, abs=1e-10)
    assert float(torch.trapezoid(x * p, x)) == pytest.approx(mean, abs=1e-10)
    assert float(torch.trapezoid((x - mean) ** 2 * p, x)) == pytest.approx(variance, abs=1e-10)
    mixture = benes_terminal_distribution(x0, t, a=a)
    assert torch.allclose(mixture.log_prob(x).exp(), p, rtol=1e-12, atol=1e-300)


def test_benes_density_solves_kolmogorov_equations():
    """``p_t = -(b p)_x + p_xx / 2`` (forward) and ``p_t = b(x0) p_x0 + p_x0x0 / 2``
    (backward), with exact derivatives by autograd."""
    for a in (1.0, 2.0):
        b = benes_drift(a)
        n = 41
        x = torch.linspace(-3.0, 4.0, n, dtype=DTYPE).requires_grad_()
        x0 = torch.linspace(-1.0, 1.5, n, dtype=DTYPE).requires_grad_()
        t = torch.linspace(0.3, 2.0, n, dtype=DTYPE).requires_grad_()
        p = benes_transition_density(x, x0, t, a=a)

        def d(y, wrt):
            return torch.autograd.grad(y.sum(), wrt, create_graph=True)[0]

        p_t = d(p, t)
        flux = b(t, x) * p
        forward = -d(flux, x) + d(d(p, x), x) / 2
        backward = b(t, x0) * d(p, x0) + d(d(p, x0), x0) / 2
        scale = p_t.abs().max()
        assert (p_t - forward).abs().max() < 1e-12 * scale
        assert (p_t - backward).abs().max() < 1e-12 * scale


def test_benes_density_is_stable_far_out():
    x = torch.tensor([999.0, 1001.0, 1000.0], dtype=DTYPE)
    p = benes_transition_density(x, 1000.0, 1.0)
    assert torch.isfinite(p).all() and (p > 0).all()
    # for x0 >> 1 the law is N(x0 + t, t)
    expected = torch.distributions.Normal(1001.0, 1.0).log_prob(x).exp()
    assert torch.allclose(p, expected, rtol=1e-12)
    assert float(benes_expectation(_identity, 500.0, 1.0)) == pytest.approx(501.0, abs=1e-9)


def _euler_chain_moments(a, x0, t, num_steps, dx=0.01):
    """``E X, E X^2, E cos X`` of the Euler chain, by propagating its density on a grid."""
    grid = torch.arange(x0 - a * t - 9.0, x0 + a * t + 9.0, dx, dtype=DTYPE)
    times = torch.linspace(0.0, t, num_steps + 1, dtype=DTYPE)
    density = euler_grid_density(benes_drift(a), 1.0, x0, times, grid, time_homogeneous=True)
    return np.array([float((density * g).sum() * dx) for g in (grid, grid**2, torch.cos(grid))])


@pytest.mark.parametrize("a", [1.0, 2.0])
def test_benes_against_euler_chain_density(a):
    """The Euler chain converges at first order to the closed forms; Richardson
    extrapolation of 32 and 64 steps is within O(h^2): below 2e-3 (7e-4 measured), and
    a tenth of the first-order error (up to 6e-2 at 32 steps for a = 2)."""
    x0, t = 0.5, 1.0
    mean, variance = benes_terminal_moments(x0, t, a=a)
    exact = np.array([mean, variance + mean**2, benes_expectation_cos(x0, t, a=a)])
    coarse = _euler_chain_moments(a, x0, t, 32) - exact
    fine = _euler_chain_moments(a, x0, t, 64) - exact
    assert np.abs(2 * fine - coarse).max() < 2e-3
    assert np.abs(2 * fine - coarse).max() < 0.1 * np.abs(coarse).max()
    ratio = coarse / fine
    assert np.all((ratio > 1.7) & (ratio < 2.3)), ratio


def test_benes_against_euler_monte_carlo():
    """Richardson-extrapolated Euler (64 and 128 steps on one Brownian path): its bias
    is O(h^2) ~ 1e-5, far below the standard errors; the estimates of ``E X``,
    ``E X^2``, ``E cos X`` lie within 3.5 of them. The exact mixture sampler too."""
    a, x0, t, num_samples, num_steps = 1.0, 0.5, 1.0, 100_000, 128
    drift = benes_drift(a)
    h = t / num_steps
    torch.manual_seed(0)
    fine = torch.full((num_samples,), x0, dtype=DTYPE)
    coarse = fine.clone()
    for _ in range(num_steps // 2):
        dw = math.sqrt(h) * torch.randn(2, num_samples, dtype=DTYPE)
        coarse = coarse + drift(None, coarse) * 2 * h + dw.sum(0)
        fine = fine + drift(None, fine) * h + dw[0]
        fine = fine + drift(None, fine) * h + dw[1]
    mean, variance = benes_terminal_moments(x0, t, a=a)
    exact = torch.tensor([mean, variance + mean**2, benes_expectation_cos(x0, t, a=a)])

    def stats(x):
        return torch.stack([x, x**2, torch.cos(x)], -1)

    values = 2 * stats(fine) - stats(coarse)
    exact_draws = stats(benes_terminal_distribution(x0, t, a=a).sample((num_samples,)))
    for v in (values, exact_draws):
        z = (v.mean(0) - exact) / (v.std(0) / math.sqrt(num_samples))
        assert z.abs().max() < TOL, z


def test_benes_terminal_distribution_batch():
    x0 = torch.tensor([[-1.0], [0.0], [2.0]], dtype=DTYPE)
    law = benes_terminal_distribution(x0, torch.tensor([0.5, 1.0], dtype=DTYPE), a=2.0)
    assert law.batch_shape == (3, 2) and law.event_shape == ()
    for i in range(3):
        for j, t in enumerate((0.5, 1.0)):
            mean, variance = benes_terminal_moments(float(x0[i, 0]), t, a=2.0)
            assert float(law.mean[i, j]) == pytest.approx(mean, abs=1e-12)
            assert float(law.variance[i, j]) == pytest.approx(variance, abs=1e-12)


def test_drifts():
    x = torch.linspace(-3, 3, 7, dtype=DTYPE).reshape(7, 1)
    t = torch.tensor(0.0, dtype=DTYPE)
    assert torch.equal(benes_drift()(t, x), torch.tanh(x))
    assert torch.allclose(benes_drift(2.0)(t, x), 2 * torch.tanh(2 * x))
    assert torch.equal(ou_drift()(t, x), -x)
    assert torch.equal(ou_drift(0.5)(t, x), -0.5 * x)


# --------------------------------------------------------------------------- OU


@pytest.mark.parametrize("rate, sigma, x0", [(1.0, 1.0, 1.0), (2.0, 0.5, -0.7), (-0.5, 1.5, 0.3)])
def test_ou_moments_against_euler_chain(rate, sigma, x0):
    """``LinearSDE`` marginals (the Euler chain) converge at first order; Richardson
    extrapolation of 200 and 400 steps is within O(h^2) ~ 1e-5."""
    t = 1.3
    mean, variance = ou_terminal_moments(x0, t, rate=rate, sigma=sigma)
    errors = []
    for num_steps in (200, 400):
        problem = ou_problem(rate=rate, sigma=sigma, num_steps=num_steps, t_end=t, x0=x0)
        means, covs = problem.marginals()
        errors.append(np.array([float(means[-1, 0]) - mean, float(covs[-1, 0, 0]) - variance]))
        chain_variance = ou_terminal_variance(torch.tensor(rate, dtype=DTYPE), sigma, problem.times)
        assert float(chain_variance) == pytest.approx(float(covs[-1, 0, 0]), abs=1e-12)
    coarse, fine = errors
    assert np.abs(2 * fine - coarse).max() < 1e-4
    assert np.abs(coarse).max() < 0.05 and np.all(np.abs(coarse / fine - 2.0) < 0.1)


def test_ou_rate_zero_is_brownian_motion():
    """The Euler chain of Brownian motion is exact."""
    x0, t, sigma = 0.4, 2.0, 1.7
    assert ou_terminal_moments(x0, t, rate=0.0, sigma=sigma) == (x0, sigma**2 * t)
    times = torch.linspace(0.0, t, 11, dtype=DTYPE)
    chain = ou_terminal_variance(torch.tensor(0.0, dtype=DTYPE), sigma, times)
    assert float(chain) == pytest.approx(sigma**2 * t, rel=1e-12)
    assert ou_terminal_moments(x0, t, rate=1e-9, sigma=sigma)[1] == pytest.approx(
        sigma**2 * t, rel=1e-6
    )


@pytest.mark.parametrize("frequency", [1.0, 3.0])
def test_ou_expectation_cos_matches_quadrature(frequency):
    x0, t, rate, sigma = 1.0, 0.8, 1.5, 0.9
    mean, variance = ou_terminal_moments(x0, t, rate=rate, sigma=sigma)
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    quadrature = np.sum(weights * np.cos(frequency * (mean + math.sqrt(variance) * nodes)))
    quadrature /= math.sqrt(2 * math.pi)
    exact = ou_expectation_cos(x0, t, rate=rate, sigma=sigma, frequency=frequency)
    assert exact == pytest.approx(quadrature, abs=1e-12)


# --------------------------------------------------------------------------- grid density


@pytest.mark.parametrize("time_homogeneous", [False, True])
def test_euler_grid_density_matches_the_gaussian_chain(time_homogeneous):
    """OU chain (non-uniform steps; state-dependent callable diffusion equal to the
    constant): mass, mean and variance of x_N on the grid against the exact marginals
    of :class:`~pyro_latdiff.testing.LinearSDE` (rectangle rule, dx 0.01 << the step sd)."""
    problem = ou_problem(rate=1.5, sigma=0.8, x0=0.5, t_end=1.2)
    problem.times = torch.tensor([0.0, 0.1, 0.15, 0.3, 0.6, 0.9, 1.2], dtype=DTYPE)
    means, covs = problem.marginals()
    grid = torch.arange(-5.0, 5.0, 0.01, dtype=DTYPE)
    dx = float(grid[1] - grid[0])
    for diffusion in (0.8, lambda t, x: torch.full_like(x, 0.8)):
        density = euler_grid_density(
            problem.drift, diffusion, 0.5, problem.times, grid, time_homogeneous=time_homogeneous
        )
        mass = float(density.sum()) * dx
        mean = float((density * grid).sum()) * dx
        variance = float((density * (grid - mean) ** 2).sum()) * dx
        assert mass == pytest.approx(1.0, abs=1e-10)
        assert mean == pytest.approx(float(means[-1, 0]), abs=1e-10)
        assert variance == pytest.approx(float(covs[-1, 0, 0]), abs=1e-10)
