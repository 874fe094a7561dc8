"""Forward processes: closed-form kernels against simulated Euler chains, the
protocol's coefficients against the kernels, Chapman–Kolmogorov."""

import math

import pytest
import torch

from pyro_latdiff.score import (
    CriticallyDampedLangevin,
    OrnsteinUhlenbeck,
    VarianceExploding,
    VariancePreserving,
)
from pyro_latdiff.sde import solve

PROCESSES = {
    "vp_linear": lambda: VariancePreserving(),
    "vp_cosine": lambda: VariancePreserving(schedule="cosine"),
    "ou": lambda: OrnsteinUhlenbeck(horizon=3.0),
    "ve": lambda: VarianceExploding(sigma_min=0.05, sigma_max=5.0),
}


@pytest.fixture(params=sorted(PROCESSES))
def process(request):
    return PROCESSES[request.param]()


def test_coefficients_are_the_kernels_derivatives(process):
    torch.set_default_dtype(torch.float64)
    h = 1e-6
    for frac in (0.05, 0.5, 0.9):
        s = frac * process.horizon
        scale, std = process.transition_coefs(s, s + h)
        assert float((scale - 1) / h) == pytest.approx(float(process.drift_coef(s)), rel=1e-4)
        assert float(std**2 / h) == pytest.approx(float(process.diffusion_coef(s) ** 2), rel=1e-4)


def test_chapman_kolmogorov(process):
    torch.set_default_dtype(torch.float64)
    r, s, t = (torch.tensor(f * process.horizon) for f in (0.1, 0.45, 0.95))
    a1, s1 = process.transition_coefs(r, s)
    a2, s2 = process.transition_coefs(s, t)
    a, sd = process.transition_coefs(r, t)
    assert float(a1 * a2) == pytest.approx(float(a), rel=1e-12)
    assert float(a2**2 * s1**2 + s2**2) == pytest.approx(float(sd**2), rel=1e-12)
    m, v = process.marginal_coefs(t)
    assert float(m) == pytest.approx(float(process.transition_coefs(0.0, t)[0]), rel=1e-12)
    assert float(v) == pytest.approx(float(process.transition_coefs(0.0, t)[1]), rel=1e-12)


def test_shapes_broadcast_with_t(process):
    t = torch.linspace(0.1, 0.9, 5).reshape(5, 1) * process.horizon
    scale, std = process.transition_coefs(0.05 * process.horizon, t)
    assert scale.shape == std.shape == (5, 1)
    mean_scale, std = process.marginal_coefs(t.float())
    assert mean_scale.dtype == torch.float32 and mean_scale.shape == (5, 1)
    assert process.drift_coef(t).shape == process.diffusion_coef(t).shape == (5, 1)
    prior = process.prior((7, 3))
    assert prior.batch_shape == (7,) and prior.event_shape == (3,)
    assert isinstance(process.marginal_coefs(0.5)[0], torch.Tensor)


def test_simulated_chain_matches_kernel(process):
    """Euler chain of dX = f X dt + g dW from x0 (1000 steps): mean and variance at
    two times within 4 standard errors of the closed-form transition."""
    torch.set_default_dtype(torch.float64)
    n, x0 = 4000, 1.5
    s, t = 0.2 * process.horizon, process.horizon
    times = torch.linspace(s, t, 1001)
    start = torch.full((n, 1), x0)

    def drift(tt, x):
        return process.drift_coef(tt) * x

    def diffusion(tt, x):
        return process.diffusion_coef(tt).expand(x.shape)

    path = solve(drift, diffusion, start, times)  # (n, 1000, 1)
    for k in (249, 999):
        scale, std = process.transition_coefs(s, times[k + 1])
        sample = path[:, k, 0]
        mean, var = float(scale * x0), float(std**2)
        assert abs(float(sample.mean()) - mean) < 4 * math.sqrt(var / n)
        assert abs(float(sample.var()) - var) < 4 * var * math.sqrt(2 / (n - 1))


def test_vp_prior_is_the_limit():
    mean_scale, std = VariancePreserving().marginal_coefs(1.0)
    assert float(mean_scale) < 0.01 and float(std) == pytest.approx(1.0, abs=1e-4)
    mean_scale, std = OrnsteinUhlenbeck(horizon=8.0).marginal_coefs(8.0)
    assert float(mean_scale) == pytest.approx(math.exp(-8.0))


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: VariancePreserving(beta_min=-1.0), "beta_min"),
        (lambda: VariancePreserving(beta_min=2.0, beta_max=1.0), "beta_min"),
        (lambda: VariancePreserving(schedule="quadratic"), "schedule"),
        (lambda: OrnsteinUhlenbeck(horizon=0.0), "horizon"),
        (lambda: VarianceExploding(sigma_min=2.0, sigma_max=1.0), "sigma_min"),
        (lambda: CriticallyDampedLangevin(mass=float("nan")), "mass"),
        (lambda: CriticallyDampedLangevin(init_velocity_var=-1.0), "init_velocity_var"),
    ],
)
def test_bad_arguments_name_themselves(make, name):
    with pytest.raises(ValueError, match=f"Expected `{name}`"):
        make()


def test_cld_kernel_is_the_matrix_exponential_and_integral():
    torch.set_default_dtype(torch.float64)
    cld = CriticallyDampedLangevin(mass=0.5, beta=1.5)
    a = cld.drift_matrix().double()
    g2 = torch.diag(torch.tensor([0.0, float(cld.diffusion_coef()) ** 2]))
    for tau in (1e-3, 0.3, 2.0):
        mean, cov = cld.transition(0.7, 0.7 + tau)
        assert torch.allclose(mean, torch.linalg.matrix_exp(a * tau), atol=1e-12)
        # Simpson's rule on the integral of e^{Au} G G^T e^{A^T u}.
        u = torch.linspace(0, tau, 2001)
        e = torch.linalg.matrix_exp(a * u[:, None, None])
        integrand = e @ g2 @ e.transpose(-1, -2)
        w = torch.ones(2001)
        w[1:-1:2], w[2:-1:2] = 4, 2
        integral = (w[:, None, None] * integrand).sum(0) * tau / 6000
        assert torch.allclose(cov, integral, rtol=1e-8, atol=1e-15)
    # Stationary law is the prior's.
    _, cov = cld.transition(0.0, 60.0)
    assert torch.allclose(cov, torch.diag(torch.tensor([1.0, 0.5])), atol=1e-12)


def test_cld_simulated_chain_matches_kernel():
    """Euler chain of the CLD SDE from (x0, v0): mean and covariance (all three
    entries) of each pair within 4 standard errors."""
    torch.set_default_dtype(torch.float64)
    cld = CriticallyDampedLangevin()
    n, steps, horizon = 4000, 1000, 2.0
    h = horizon / steps
    a = cld.drift_matrix().double()
    g = float(cld.diffusion_coef())
    z0 = torch.tensor([1.0, -0.5])
    z = z0.expand(n, 2).clone()
    for _ in range(steps):
        z = z + h * z @ a.T
        z[:, 1] += g * math.sqrt(h) * torch.randn(n)
    mean_matrix, cov = cld.transition(0.0, horizon)
    mean = mean_matrix @ z0
    centred = z - mean
    for i in range(2):
        assert abs(float(centred[:, i].mean())) < 4 * math.sqrt(float(cov[i, i]) / n)
    for i, j in ((0, 0), (1, 1), (0, 1)):
        prod = centred[:, i] * centred[:, j]
        se = float(prod.std()) / math.sqrt(n)
        assert abs(float(prod.mean()) - float(cov[i, j])) < 4 * se


def test_cld_apply_and_prior():
    cld = CriticallyDampedLangevin(mass=0.25, init_velocity_var=0.01)
    mean, _ = cld.transition(0.0, torch.tensor([0.5, 1.0]))
    z = torch.randn(2, 6)  # D = 3
    out = cld.transition_apply(mean, z)
    x, v = z.chunk(2, -1)
    assert torch.allclose(out[0, :3], mean[0, 0, 0] * x[0] + mean[0, 0, 1] * v[0])
    assert torch.allclose(out[1, 3:], mean[1, 1, 0] * x[1] + mean[1, 1, 1] * v[1])
    prior = cld.prior((5, 6))
    assert prior.event_shape == (6,)
    assert torch.allclose(prior.base_dist.scale[0], torch.tensor([1, 1, 1, 0.5, 0.5, 0.5]))
    coef, cov = cld.marginal(1.0)
    m, c = cld.transition(0.0, 1.0)
    assert torch.allclose(coef, m[:, 0])
    assert torch.allclose(cov - c, 0.01 * m[:, 1:] @ m[:, 1:].T)
    with pytest.raises(ValueError, match="Expected `shape`"):
        cld.prior((5, 3))
