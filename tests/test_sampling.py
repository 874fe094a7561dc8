"""pyro_latdiff.sampling: exact and Monte Carlo Föllmer drifts, the learned sampler's
model and guide, the log-variance loss, and bad targets. Tolerances in standard
errors."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer import SVI

from pyro_latdiff import DiffusionGuide, fit
from pyro_latdiff._warnings import LatentDiffusionWarning
from pyro_latdiff.sampling import (
    FollmerSampler,
    LogNormalizerEstimate,
    LogVarianceELBO,
    MonteCarloFollmerDrift,
    MonteCarloFollmerSampler,
    ReplayBuffer,
    TargetDensity,
    gaussian_importance_sampling,
)
from pyro_latdiff.testing import GaussianTarget, ManyWellTarget, gmm9, mode_masses

DTYPE = torch.float64
TOL = 4.0  # standard errors


def _check_moments(x: torch.Tensor, target: GaussianTarget, tol: float = TOL):
    n = x.shape[0]
    mean_se = target.scale / math.sqrt(n)
    var_se = target.scale**2 * math.sqrt(2 / (n - 1))
    assert ((x.mean(0) - target.mean).abs() < tol * mean_se).all(), x.mean(0)
    assert ((x.var(0) - target.scale**2).abs() < tol * var_se).all(), x.var(0)


def test_exact_follmer_drift_gives_target_moments_and_log_z():
    target = GaussianTarget(2, 1.0, 1.5, DTYPE)
    sampler = MonteCarloFollmerSampler(
        target.log_prob, 2, drift=target.follmer_drift, num_steps=200, dtype=DTYPE
    )
    x, log_weights = sampler.sample_with_log_weights(4000)
    _check_moments(x, target)
    estimate = LogNormalizerEstimate.from_log_weights(log_weights)
    assert abs(estimate.log_z) < 3 * estimate.stderr + 1e-12
    assert estimate.ess > 3900


def test_exact_follmer_drift_through_the_pyro_model_and_guide():
    """The drift as the model's base drift: the untrained guide is the Föllmer chain; the
    model's Girsanov factor keeps the evidence at Z."""
    target = GaussianTarget(2, 1.0, 1.5, DTYPE)
    sampler = FollmerSampler(
        target.log_prob,
        2,
        num_steps=50,
        control="network",
        base_drift=target.follmer_drift,
        dtype=DTYPE,
    )
    _check_moments(sampler.sample(2000), target)
    _check_moments(sampler.sample(1000, resample=True, pool_size=2000), target, tol=2 * TOL)
    estimate = sampler.log_normalizer(2000)
    assert abs(estimate.log_z) < 3 * estimate.stderr + 1e-12
    assert estimate.elbo <= estimate.log_z
    assert estimate.num_evaluations > 0


@pytest.mark.parametrize("estimator", ["gradient", "stein"])
def test_monte_carlo_drift_converges_to_the_exact_drift(estimator):
    target = GaussianTarget(2, 1.0, 1.5, DTYPE)
    x = torch.randn(50, 2, dtype=DTYPE)
    errors = []
    for k in (16, 16384):
        drift = MonteCarloFollmerDrift(
            target.log_prob, 2, num_inner=k, estimator=estimator, fixed=False, dtype=DTYPE
        )
        t = torch.tensor(0.5, dtype=DTYPE)
        errors.append((drift(t, x) - target.follmer_drift(t, x)).abs().mean().item())
    assert errors[1] < 0.05 and errors[1] < errors[0]
    # The whole-path layout of LatentDiffusion.log_prob, and t -> 1.
    drift = MonteCarloFollmerDrift(target.log_prob, 2, num_inner=64, estimator=estimator)
    t = torch.tensor([0.0, 0.5, 1.0], dtype=DTYPE).reshape(3, 1, 1)
    out = drift(t, torch.randn(3, 7, 2, dtype=DTYPE))
    assert out.shape == (3, 7, 2) and torch.isfinite(out).all()


@pytest.mark.slow
def test_training_free_sampler_gaussian_moments_as_k_grows():
    """At K = 512 the drift's bias (benchmarks/README.md: about -0.05 in the mean at
    K = 256) is below the 4 standard errors of 2000 paths."""
    target = GaussianTarget(2, 1.0, 1.5, DTYPE)
    sampler = MonteCarloFollmerSampler(target.log_prob, 2, num_steps=50, num_inner=512, dtype=DTYPE)
    _check_moments(sampler.sample(2000), target)


@pytest.mark.slow
def test_training_free_sampler_gmm9_mode_masses():
    target = gmm9(DTYPE)
    sampler = MonteCarloFollmerSampler(
        target.log_prob, 2, num_steps=25, num_inner=64, sigma=5.0, dtype=DTYPE
    )
    masses = mode_masses(target, sampler.sample(1000))
    se = math.sqrt(1 / 9 * 8 / 9 / 1000)
    assert ((masses - 1 / 9).abs() < TOL * se).all(), masses


def test_importance_sampling_baseline():
    target = GaussianTarget(2, 0.5, 1.0, DTYPE)
    estimate, x = gaussian_importance_sampling(target.log_prob, 2, 4000, scale=2.0, dtype=DTYPE)
    assert x.shape == (4000, 2)
    assert abs(estimate.log_z) < 3 * estimate.stderr
    assert estimate.num_evaluations == 4000


def test_log_variance_loss_vanishes_at_the_optimum_and_runs_under_svi():
    target = GaussianTarget(2, 1.0, 1.5, DTYPE)
    exact = FollmerSampler(
        target.log_prob,
        2,
        control="network",
        base_drift=target.follmer_drift,
        loss="log_variance",
        num_steps=200,
        dtype=DTYPE,
    )
    prior = FollmerSampler(target.log_prob, 2, control="network", loss="log_variance", dtype=DTYPE)
    loss = LogVarianceELBO(64, max_plate_nesting=0)
    at_optimum = loss.loss(exact.model, exact.guide)
    at_prior = loss.loss(prior.model, prior.guide)
    assert at_optimum < 0.05 * at_prior
    svi = SVI(prior.model, prior.guide, pyro.optim.Adam({"lr": 1e-2}), loss)
    values = [svi.step() for _ in range(3)]
    assert all(math.isfinite(v) for v in values)
    with pytest.raises(ValueError, match="path_derivative=False"):
        loss.loss(prior.model, DiffusionGuide(prior.model))


@pytest.mark.parametrize("loss", ["kl", "log_variance"])
def test_learned_sampler_improves_on_a_gaussian(loss):
    target = GaussianTarget(2, 1.0, 1.5, DTYPE)
    sampler = FollmerSampler(target.log_prob, 2, num_steps=10, loss=loss, hidden_dims=(32,))
    before = sampler.log_normalizer(500)
    sampler.fit(40, num_particles=32, lr=1e-2)
    after = sampler.log_normalizer(500)
    assert after.elbo > before.elbo
    assert sampler.sample(7).shape == (7, 2)


def test_target_with_nan_and_inf_does_not_poison_training():
    target = GaussianTarget(2, 1.0, 1.5, DTYPE)

    def log_density(x):
        out = target.log_prob(x)
        out = torch.where(x[..., 0] > 1.5, torch.full_like(out, math.nan), out)
        return torch.where(x[..., 1] < -1.5, torch.full_like(out, -math.inf), out)

    for loss in ("kl", "log_variance"):
        sampler = FollmerSampler(log_density, 2, num_steps=10, loss=loss, hidden_dims=(16,))
        with pytest.warns(LatentDiffusionWarning, match="NaN or infinite"):
            losses = sampler.fit(5, num_particles=32)
        assert all(math.isfinite(v) for v in losses)
        assert sampler.density.num_nonfinite > 0
        estimate = sampler.log_normalizer(200)
        assert math.isfinite(estimate.log_z)


@pytest.mark.parametrize(
    "log_density",
    [
        lambda x: x.sum(-1, keepdim=True),  # (..., 1)
        lambda x: x,  # (..., D)
        lambda x: x.sum(),  # a scalar
        lambda x: 1.0,  # not a tensor
        lambda x: -0.5 * x[:, 0] ** 2,  # only batched x: fails on an unbatched (dim,)
    ],
)
def test_wrong_shaped_target_is_one_clear_error(log_density):
    with pytest.raises(ValueError, match=r"Expected `log_density` .*actual"):
        FollmerSampler(log_density, 2)
    with pytest.raises(ValueError, match=r"Expected `log_density` .*actual"):
        MonteCarloFollmerSampler(log_density, 2)


@pytest.mark.parametrize("num_steps", [0, -1, 2.5])
def test_fit_with_a_bad_number_of_steps_is_one_clear_error(num_steps):
    sampler = FollmerSampler(GaussianTarget(2).log_prob, 2, num_steps=5)
    with pytest.raises(ValueError, match=r"Expected `num_steps`.*actual"):
        sampler.fit(num_steps)


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda f: FollmerSampler(f, 2, num_steps=0), "num_steps"),
        (lambda f: FollmerSampler(f, 2, times=torch.tensor([0.0, 0.5, 0.5])), "times"),
        (lambda f: FollmerSampler(f, 2, times=torch.tensor([0, 1])), "times"),
        (lambda f: FollmerSampler(f, 2, num_inner=0), "num_inner"),
        (lambda f: FollmerSampler(f, 2, noise_scale=-1.0), "noise_scale"),
        (lambda f: MonteCarloFollmerSampler(f, 2, num_steps=2.5), "num_steps"),
        (lambda f: MonteCarloFollmerSampler(f, 2, sigma=torch.tensor(1.0)), "sigma"),
        (lambda f: MonteCarloFollmerSampler(f, 2, chunk_size=0), "chunk_size"),
        (lambda f: MonteCarloFollmerSampler(f, 2, drift="exact"), "drift"),
        (lambda f: FollmerSampler(f, 2, estimator="foo"), "estimator"),
        (lambda f: FollmerSampler(f, 2, clip=-1.0), "clip"),
        (lambda f: FollmerSampler(f, 2, num_steps=3).sample(0), "num_samples"),
        (lambda f: FollmerSampler(f, 2, num_steps=3).sample(2.5), "num_samples"),
        (lambda f: FollmerSampler(f, 2, num_steps=3).sample_paths(4, chunk_size=0), "chunk_size"),
        (
            lambda f: FollmerSampler(f, 2, num_steps=3).sample(2, resample=True, pool_size=0),
            "pool_size",
        ),
        (lambda f: MonteCarloFollmerSampler(f, 2, num_steps=3).sample(0), "num_samples"),
        (lambda f: FollmerSampler(f, 2, dtype=torch.int64), "dtype"),
        (lambda f: MonteCarloFollmerSampler(f, 2, dtype=torch.int64), "dtype"),
        (lambda f: FollmerSampler(f, 2, base_drift="monte_carlo", num_inner=3), "num_inner"),
        (
            lambda f: FollmerSampler(f, 2, num_steps=5, times=torch.linspace(0, 1, 3)),
            "num_steps",
        ),
        (lambda f: FollmerSampler(f, 2, num_steps=3).fit(2, lr=-1e-3), "lr"),
        (lambda f: FollmerSampler(f, 2, num_steps=3).fit(2, lr=0.0), "lr"),
        (lambda f: FollmerSampler(f, 2, num_steps=3).fit(2, lr=math.nan), "lr"),
        (lambda f: FollmerSampler(f, 2, num_steps=3).fit(2, final_lr=0.0), "final_lr"),
        (lambda f: FollmerSampler(f, 2, num_steps=3).fit(2, gain_lr=-1.0), "gain_lr"),
        (lambda f: FollmerSampler(f, 2, num_steps=3).fit(2, num_particles=0), "num_particles"),
        (lambda f: FollmerSampler(f, 2, num_steps=3).drift(3, torch.zeros(2)), "k"),
        (lambda f: FollmerSampler(f, 2, num_steps=3).drift(-1, torch.zeros(2)), "k"),
        (lambda f: FollmerSampler(f, 2, num_steps=3).drift(0, torch.zeros(3)), "x"),
        (lambda f: MonteCarloFollmerSampler(f, 2, num_steps=3).log_normalizer(0), "num_samples"),
        (lambda f: gaussian_importance_sampling(f, 2, 10, scale=0.0), "scale"),
        (lambda f: gaussian_importance_sampling(f, 2, 0), "num_samples"),
    ],
)
def test_sampler_arguments_are_checked(make, name):
    with pytest.raises((ValueError, TypeError), match=f"Expected `{name}`"):
        make(GaussianTarget(2).log_prob)


def test_num_steps_that_agrees_with_times_is_accepted():
    times = torch.linspace(0, 1, 4)
    sampler = FollmerSampler(GaussianTarget(2).log_prob, 2, num_steps=3, times=times)
    assert torch.equal(sampler.times, times)
    assert FollmerSampler(GaussianTarget(2).log_prob, 2).times.shape == (101,)


def test_resampling_from_a_pool_smaller_than_the_sample():
    """With replacement, so a small pool is valid: only repeats more."""
    sampler = FollmerSampler(GaussianTarget(2).log_prob, 2, num_steps=3, hidden_dims=(8,))
    x = sampler.sample(8, resample=True, pool_size=2)
    assert x.shape == (8, 2)
    assert torch.unique(x, dim=0).shape[0] <= 2


def test_drift_at_every_grid_step_and_any_batch():
    sampler = FollmerSampler(GaussianTarget(2).log_prob, 2, num_steps=3, hidden_dims=(8,))
    for k in range(3):
        assert sampler.drift(k, torch.zeros(4, 5, 2)).shape == (4, 5, 2)


def test_a_new_sampler_never_takes_a_freed_one_s_name():
    """Names came from id(self), which Python reuses once an object is freed: a new
    sampler then read the dead one's trained parameters from the parameter store."""
    import gc

    names = set()
    for _ in range(30):
        sampler = FollmerSampler(GaussianTarget(2).log_prob, 2, num_steps=4, hidden_dims=(8,))
        assert sampler.name not in names
        names.add(sampler.name)
        del sampler
        gc.collect()


def test_any_batch_shape_and_plain_functions():
    density = TargetDensity(lambda x: -0.5 * (x**2).sum(-1), 3)
    assert density(torch.zeros(4, 5, 3)).shape == (4, 5)
    value, grad = density.value_and_grad(torch.ones(2, 3))
    assert torch.allclose(grad, -torch.ones(2, 3))
    assert density.num_evaluations == 4 * 5 + 2


def test_an_offset_target_is_handled_as_the_unshifted_one():
    """Finiteness is decided by isfinite, not a threshold: a log-density offset far below
    any fixed floor keeps its values, its gradients, its buffer states and its log Z."""
    target = GaussianTarget(2, 1.0, 1.5, DTYPE)
    offset = -5e4
    shifted = TargetDensity(lambda x: target.log_prob(x) + offset, 2, dtype=DTYPE)
    plain = TargetDensity(target.log_prob, 2, dtype=DTYPE)
    x = torch.randn(50, 2, dtype=DTYPE)
    value, grad = shifted.value_and_grad(x)
    assert torch.allclose(value - offset, plain(x))
    assert torch.allclose(grad, plain.value_and_grad(x)[1])
    assert shifted.num_nonfinite == 0
    torch.manual_seed(0)
    estimate, _ = gaussian_importance_sampling(shifted.log_density, 2, 1000, scale=2.0, dtype=DTYPE)
    torch.manual_seed(0)
    reference, _ = gaussian_importance_sampling(target.log_prob, 2, 1000, scale=2.0, dtype=DTYPE)
    assert estimate.log_z - offset == pytest.approx(reference.log_z, abs=1e-8)
    buffer = ReplayBuffer(shifted, 2, torch.linspace(0, 1, 5, dtype=DTYPE), dtype=DTYPE)
    buffer.update(x)
    assert len(buffer) == 50


def test_log_ratio_off_the_support_is_a_flat_floor_below_every_finite_value():
    """Where log pi is -inf or NaN, log f = log pi - log N(x; 0, s^2) is one constant
    (it must not grow with |x|, which would push paths out of the support), lower than
    every finite log f met, with zero gradient; the points are counted."""

    def log_density(x):
        out = 3.0 - 0.5 * x.square().sum(-1)
        out = torch.where(x[..., 0] > 0, torch.full_like(out, -math.inf), out)
        return torch.where(x[..., 1] > 2, torch.full_like(out, math.nan), out)

    density = TargetDensity(log_density, 2, margin=50.0, dtype=DTYPE)
    torch.manual_seed(1)
    x = (3 * torch.randn(400, 2, dtype=DTYPE)).requires_grad_()
    log_f = density.log_ratio(x, scale=1.5)
    off = (x[:, 0] > 0) | (x[:, 1] > 2)
    assert off.any() and (~off).any()
    assert torch.isfinite(log_f).all()
    assert torch.unique(log_f[off].detach()).numel() == 1
    assert log_f[off][0] < log_f[~off].min()
    (grad,) = torch.autograd.grad(log_f.sum(), x)
    assert torch.equal(grad[off], torch.zeros_like(grad[off]))
    assert density.num_nonfinite == int(off.sum())
    # The value and its gradient in one pass (the Monte Carlo Föllmer drift's form).
    fused, fused_grad = density.log_ratio_and_grad(x.detach(), scale=1.5)
    assert torch.allclose(fused, log_f.detach())
    assert torch.allclose(fused_grad, grad)
    finite_values = log_density(x.detach())[~off]
    assert density.floor == pytest.approx(float(finite_values.min()) - 50.0)


def test_importance_weights_off_the_support_are_zero_whatever_was_met_before():
    """N(0, 1) truncated to x > 1, offset by -1e5, under a plain Brownian proposal one
    draw per chunk: a first chunk off the support set the floor at -1e4 (nothing finite
    met yet), far above every finite value, and those draws took all the weight (log Z
    off by 9e4). Off the support an importance weight is zero."""
    offset = -1e5

    def log_density(x):
        value = -0.5 * x.square().sum(-1) - 0.5 * math.log(2 * math.pi) + offset
        return torch.where(x[..., 0] > 1.0, value, torch.full_like(value, -math.inf))

    exact = math.log(0.5 * math.erfc(1 / math.sqrt(2))) + offset
    zero = lambda t, x: torch.zeros_like(x)  # noqa: E731
    sampler = MonteCarloFollmerSampler(
        log_density, 1, num_steps=4, drift=zero, chunk_size=1, dtype=DTYPE
    )
    estimate = sampler.log_normalizer(2000)
    assert abs(estimate.log_z - exact) < TOL * estimate.stderr


def test_log_normalizer_estimate_sums_float32_weights_in_float64():
    """float32 log-weights near 1e5 with a spread of 0.01: summed in float32 the ESS came
    out above n and the standard error 0."""
    torch.manual_seed(0)
    spread = 0.01 * torch.randn(4000, dtype=DTYPE)
    estimate = LogNormalizerEstimate.from_log_weights((1e5 + spread).float())
    assert estimate.ess <= 4000 and estimate.stderr > 0
    with pytest.raises(ValueError, match="Expected `log_weights` to be a non-empty tensor"):
        LogNormalizerEstimate.from_log_weights(torch.zeros(0))


@pytest.mark.parametrize("margin", [0.0, -1.0, math.inf, "1"])
def test_density_margin_must_be_a_positive_number(margin):
    with pytest.raises((ValueError, TypeError), match="margin"):
        TargetDensity(lambda x: -x.square().sum(-1), 2, margin=margin)


def test_fit_takes_the_log_variance_loss_on_a_user_model():
    """The sampler's model is an ordinary Pyro model: fit() runs on it directly."""
    target = GaussianTarget(2, 1.0, 1.5, DTYPE)
    sampler = FollmerSampler(target.log_prob, 2, control="network", loss="log_variance")
    losses = fit(
        sampler.model,
        sampler.guide,
        num_steps=3,
        loss=LogVarianceELBO(16, noise_scale=1.5),
        progress=False,
    )
    assert len(losses) == 3


def test_manywell_exact_follmer_drift():
    """At t = 0 the Föllmer drift is the target's mean; simulated (2-D, 200 Euler steps)
    it puts the minor well's mass there and gives log Z."""
    target = ManyWellTarget(2, DTYPE)
    x1 = target._grid
    mean = float((x1 * torch.diff(target._cdf, prepend=torch.zeros(1, dtype=DTYPE))).sum())
    drift = target.follmer_drift(torch.tensor(0.0, dtype=DTYPE), torch.zeros(1, 2, dtype=DTYPE))
    assert drift[0, 0].item() == pytest.approx(mean, abs=1e-4) and drift[0, 1] == 0
    times = torch.tensor([0.0, 0.5, 0.9], dtype=DTYPE).reshape(3, 1, 1)
    assert target.follmer_drift(times, torch.randn(3, 7, 2, dtype=DTYPE)).shape == (3, 7, 2)
    torch.manual_seed(0)
    sampler = MonteCarloFollmerSampler(
        target.log_prob, 2, drift=target.follmer_drift, num_steps=200, dtype=DTYPE
    )
    x, log_weights = sampler.sample_with_log_weights(2000)
    m = target.minor_well_mass
    share = (x[:, 0] < 0).double().mean().item()
    assert abs(share - m) < 4 * math.sqrt(m * (1 - m) / 2000)
    estimate = LogNormalizerEstimate.from_log_weights(log_weights)
    assert abs(estimate.log_z - target.log_normalizer) < 3 * estimate.stderr + 1e-12
