"""The sampler targets in pyro_latdiff.testing against quadrature and their own samples."""

from __future__ import annotations

import math

import pytest
import torch

from pyro_latdiff.testing import (
    FunnelTarget,
    GaussianTarget,
    ManyWellTarget,
    gmm9,
    gmm25,
    gmm40,
    mode_coverage,
    mode_masses,
)

DTYPE = torch.float64


def _grid_log_z(log_prob, low, high, size=1201):
    x = torch.linspace(low, high, size, dtype=DTYPE)
    grid = torch.cartesian_prod(x, x)
    values = log_prob(grid).reshape(size, size).exp()
    return math.log(torch.trapezoid(torch.trapezoid(values, x), x).item())


def test_gmm40_means_match_the_global_seed_and_leave_global_rng_alone():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    target = gmm40(DTYPE)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(0)
    expected = (torch.rand(40, 2) - 0.5) * 2 * 40
    assert torch.equal(target.means, expected.to(DTYPE))
    assert target.scale == pytest.approx(1.3132616875)


@pytest.mark.parametrize(
    "target, low, high",
    [
        (gmm9(DTYPE), -9.0, 9.0),
        (gmm25(DTYPE), -14.0, 14.0),
        (GaussianTarget(2, 1.0, 1.5, DTYPE), -8.0, 10.0),
    ],
)
def test_log_normalizer_by_quadrature(target, low, high):
    assert _grid_log_z(target.log_prob, low, high, 601) == pytest.approx(
        target.log_normalizer, abs=2e-3
    )


def test_funnel_log_normalizer_by_quadrature():
    """In (x0, u) with x1 = exp(x0 / 2) u the funnel's neck is resolved on a plain grid."""
    target = FunnelTarget(2, DTYPE)
    x0 = torch.linspace(-20, 20, 801, dtype=DTYPE)
    u = torch.linspace(-10, 10, 801, dtype=DTYPE)
    a, b = torch.meshgrid(x0, u, indexing="ij")
    points = torch.stack([a, b * torch.exp(a / 2)], -1)
    values = (target.log_prob(points) + a / 2).exp()
    log_z = math.log(torch.trapezoid(torch.trapezoid(values, u), x0).item())
    assert log_z == pytest.approx(0.0, abs=1e-6)


def test_manywell_log_normalizer_by_quadrature():
    target = ManyWellTarget(2, DTYPE)
    assert _grid_log_z(target.log_prob, -6.0, 6.0, 2001) == pytest.approx(
        target.log_normalizer, abs=1e-6
    )
    assert ManyWellTarget(32).log_normalizer == pytest.approx(164.6957, abs=1e-4)


@pytest.mark.parametrize(
    "target",
    [
        gmm9(DTYPE),
        GaussianTarget(3, 1.0, 1.5, DTYPE),
        FunnelTarget(10, DTYPE),
        ManyWellTarget(4, DTYPE),
    ],
)
def test_samples_match_the_density(target):
    """A Gaussian-kernel Stein check: E_pi[grad log pi(x) . v + div v] = 0 for
    v(x) = x exp(-|x|^2 / 50), in standard errors."""
    x = target.sample(20000, generator=torch.Generator().manual_seed(1)).requires_grad_()
    (grad,) = torch.autograd.grad(target.log_prob(x).sum(), x)
    x = x.detach()
    weight = torch.exp(-x.square().sum(-1) / 50)
    d = x.shape[-1]
    stein = weight * ((grad * x).sum(-1) + d - 2 * x.square().sum(-1) / 50)
    assert abs(stein.mean()) < 4 * stein.std() / math.sqrt(x.shape[0])


def test_funnel_and_manywell_sample_moments():
    funnel = FunnelTarget(10, DTYPE).sample(20000, generator=torch.Generator().manual_seed(2))
    assert funnel[:, 0].std() == pytest.approx(3.0, rel=0.03)
    well = ManyWellTarget(32, DTYPE).sample(20000, generator=torch.Generator().manual_seed(3))
    assert well.shape == (20000, 32)
    assert well[:, 1::2].std() == pytest.approx(1.0, rel=0.02)
    # P(x1 > 0) of the tilted double well, by quadrature.
    x = torch.linspace(-4, 4, 20001, dtype=DTYPE)
    density = torch.exp(-(x**4) + 6 * x**2 + 0.5 * x)
    upper = torch.trapezoid(density * (x > 0), x) / torch.trapezoid(density, x)
    p = (well[:, 0] > 0).double().mean()
    assert abs(p - upper) < 4 * math.sqrt(upper * (1 - upper) / 20000)
    assert ManyWellTarget(32).minor_well_mass == pytest.approx(1 - upper.item(), abs=1e-4)


def test_gaussian_follmer_drift_is_the_h_transform():
    """b* = grad log h, h(t, x) = p_t(x) / N(x; 0, t), p_t = N(t m, t^2 s^2 + t (1 - t)) the
    Föllmer marginal at time t (X_t | X_1 ~ N(t X_1, t (1 - t)))."""
    target = GaussianTarget(2, 1.0, 1.5, DTYPE)
    m, s2 = target.mean, target.scale**2
    for t in (0.0, 0.3, 0.99):
        t = torch.tensor(t, dtype=DTYPE)
        x = torch.tensor([[0.2, -0.4], [2.0, 1.0]], dtype=DTYPE, requires_grad=True)
        tt = t.clamp(min=1e-9)
        var = tt**2 * s2 + tt * (1 - tt)
        log_h = (-((x - tt * m) ** 2) / (2 * var) + x**2 / (2 * tt)).sum()
        (grad,) = torch.autograd.grad(log_h, x)
        assert torch.allclose(target.follmer_drift(t, x.detach()), grad, atol=1e-6)


def test_mode_masses_and_coverage():
    target = gmm9(DTYPE)
    x = target.sample(9000, generator=torch.Generator().manual_seed(4))
    masses = mode_masses(target, x)
    assert masses.sum() == pytest.approx(1.0)
    assert (masses - 1 / 9).abs().max() < 4 * math.sqrt(1 / 9 * 8 / 9 / 9000)
    assert mode_coverage(masses) == 1.0
    one_mode = target.means[4] + 0.1 * torch.randn(100, 2, dtype=DTYPE)
    assert mode_coverage(mode_masses(target, one_mode)) == pytest.approx(1 / 9)
