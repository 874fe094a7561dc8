"""Tests of the linear-Gaussian state-space references in
:mod:`pyro_latdiff.testing.state_space` against independent computations (float64).

- The Kalman log-evidence, the backward information filter's evidence, the filtered and
  smoothed moments against the dense joint Gaussian of the whole Euler chain, built here
  by its own affine recursion (``path = mean + L xi``, ``L`` block lower-triangular), to
  1e-10; the posterior kernels composed over the steps against the dense posterior
  marginals and lag-one cross-covariances (which determine a Gaussian Markov chain).
- ``model(y)``'s log joint (path conditioned) against the dense joint density.
- The quadrature posteriors against importance sampling (within 4 standard errors) and
  converged in the grid size (relative change < 1e-3 when the grid doubles).
"""

from __future__ import annotations

import inspect
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_latdiff import LatentDiffusion
from pyro_latdiff.testing import (
    EulerMaruyamaExample,
    LinearGaussianSSM,
    SharedParameterSSM,
)

DTYPE = torch.float64
TOL = 1e-10
SE = 4.0  # standard errors, for the Monte Carlo checks
HAS_GENERAL_NOISE = "noise_type" in inspect.signature(LatentDiffusion).parameters

# (D, M, Dy, N, grid, observed steps, observation noise, diagonal G)
CONFIGS = {
    "1d-every-step": (1, 1, 1, 6, "uniform", "every", "scale", True),
    "2d-M3-partial-random": (2, 3, 1, 8, "random", "random", "scale", False),
    "3d-M2-hypoelliptic": (3, 2, 2, 7, "random", "random", "cov", False),
    "4d-diagonal-last-only": (4, 4, 2, 10, "uniform", "last", "cov", True),
    "4d-M6-every-step": (4, 6, 4, 9, "random", "every", "cov", False),
    "3d-diagonal-random": (3, 3, 3, 12, "random", "random", "scale", True),
}


def make_ssm(D, M, Dy, N, grid, observed, noise, diagonal, seed=0) -> LinearGaussianSSM:
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=DTYPE)

    B = 0.6 * randn(D, D) - 0.5 * torch.eye(D, dtype=DTYPE)
    G = torch.diag(0.5 + torch.rand(D, generator=g, dtype=DTYPE)) if diagonal else randn(D, M)
    if grid == "uniform":
        times = torch.linspace(0.0, 1.0, N + 1, dtype=DTYPE)
    else:
        steps = 0.05 + 0.2 * torch.rand(N, generator=g, dtype=DTYPE)
        times = torch.cat([torch.zeros(1, dtype=DTYPE), steps.cumsum(0)])
    if observed == "every":
        obs_steps = torch.arange(1, N + 1)
    elif observed == "last":
        obs_steps = torch.tensor([N])
    else:
        obs_steps = (torch.randperm(N, generator=g)[: N // 2] + 1).sort().values
    kwargs = {}
    if noise == "scale":
        kwargs["obs_scale"] = 0.2 + 0.3 * torch.rand(Dy, generator=g, dtype=DTYPE)
    else:
        L = 0.3 * randn(Dy, Dy)
        kwargs["obs_cov"] = L @ L.T + 0.05 * torch.eye(Dy, dtype=DTYPE)
    return LinearGaussianSSM(
        B=B, c=randn(D), G=G, x0=randn(D), times=times, obs_steps=obs_steps, C=randn(Dy, D),
        **kwargs,
    )  # fmt: skip


def dense(ssm: LinearGaussianSSM):
    """The joint Gaussian of the flattened path ``(x_1..x_N)`` and of the stacked
    observations, from ``x_{k+1} = (I + B h_k) x_k + c h_k + sqrt(h_k) G xi_k``:
    ``path = mean + L xi`` with ``L[k, j] = A_k ... A_{j+1} sqrt(h_j) G``."""
    N, D, M = ssm.num_steps, ssm.state_dim, ssm.noise_dim
    h = ssm.times.diff()
    A = [torch.eye(D, dtype=DTYPE) + ssm.B * h[k] for k in range(N)]
    means, m = [], ssm.x0
    for k in range(N):
        m = A[k] @ m + ssm.c * h[k]
        means.append(m)
    L = torch.zeros(N * D, N * M, dtype=DTYPE)
    for j in range(N):
        block = h[j].sqrt() * ssm.G
        for k in range(j, N):
            if k > j:
                block = A[k] @ block
            L[k * D : (k + 1) * D, j * M : (j + 1) * M] = block
    mean, cov = torch.cat(means), L @ L.T
    Dy = ssm.obs_dim
    Z = torch.zeros(ssm.num_obs * Dy, N * D, dtype=DTYPE)
    for j, s in enumerate(ssm.obs_steps.tolist()):
        Z[j * Dy : (j + 1) * Dy, (s - 1) * D : s * D] = ssm.C
    R = ssm.obs_cov if ssm.obs_cov is not None else torch.diag(ssm.obs_scale.square())
    y_cov = Z @ cov @ Z.T + torch.block_diag(*[R] * ssm.num_obs)
    return mean, cov, Z, y_cov, R


def dense_condition(mean, cov, Z, y_cov, y_flat, rows=None):
    """Mean and covariance of the path given the observations ``rows`` (all if None)."""
    if rows is not None:
        Z, y_cov, y_flat = Z[rows], y_cov[rows][:, rows], y_flat[rows]
    cross = cov @ Z.T
    mean = mean + cross @ torch.linalg.solve(y_cov, y_flat - Z @ mean)
    return mean, cov - cross @ torch.linalg.solve(y_cov, cross.T)


@pytest.fixture(params=list(CONFIGS), ids=list(CONFIGS))
def case(request):
    ssm = make_ssm(*CONFIGS[request.param])
    _, y = ssm.simulate(1)
    return ssm, y


def test_kalman_evidence_matches_dense_gaussian(case):
    ssm, y = case
    mean, _, Z, y_cov, _ = dense(ssm)
    expected = dist.MultivariateNormal(Z @ mean, y_cov).log_prob(y.reshape(-1))
    assert abs(float(ssm.log_evidence(y) - expected)) < TOL
    H, F, c = ssm.backward_filter(y)
    x0 = ssm.x0
    from_backward = -0.5 * x0 @ H[0] @ x0 + F[0] @ x0 + c[0]
    assert abs(float(from_backward - expected)) < TOL


def test_filtered_and_smoothed_moments_match_dense_conditioning(case):
    ssm, y = case
    N, D, Dy = ssm.num_steps, ssm.state_dim, ssm.obs_dim
    mean, cov, Z, y_cov, _ = dense(ssm)
    y_flat = y.reshape(-1)
    smoothed_m, smoothed_P = ssm.smoothed_moments(y)
    m, P = dense_condition(mean, cov, Z, y_cov, y_flat)
    assert (smoothed_m.reshape(-1) - m).abs().max() < TOL
    for k in range(N):
        assert (smoothed_P[k] - P[k * D : (k + 1) * D, k * D : (k + 1) * D]).abs().max() < TOL
    filtered_m, filtered_P = ssm.filtered_moments(y)
    steps = ssm.obs_steps.tolist()
    for k in range(1, N + 1):
        rows = [j * Dy + i for j, s in enumerate(steps) if s <= k for i in range(Dy)]
        m, P = dense_condition(mean, cov, Z, y_cov, y_flat, torch.tensor(rows, dtype=torch.long))
        block = slice((k - 1) * D, k * D)
        assert (filtered_m[k - 1] - m[block]).abs().max() < TOL
        assert (filtered_P[k - 1] - P[block, block]).abs().max() < TOL


def test_posterior_kernels_compose_to_the_dense_posterior(case):
    """The kernels ``x_{k+1} | x_k, y`` are affine-Gaussian, ``M_k x + b_k + N(0, S_k)``:
    composed from ``x0`` they give the posterior marginals and the lag-one covariances
    ``Cov(x_{k+1}, x_k | y) = M_k P_k``, which together determine the posterior chain."""
    ssm, y = case
    N, D = ssm.num_steps, ssm.state_dim
    mean, cov, Z, y_cov, _ = dense(ssm)
    post_m, post_P = dense_condition(mean, cov, Z, y_cov, y.reshape(-1))
    basis = torch.cat([torch.zeros(1, D, dtype=DTYPE), torch.eye(D, dtype=DTYPE)])
    m, P = ssm.x0, torch.zeros(D, D, dtype=DTYPE)
    all_M, all_b, all_S = ssm.posterior_kernels(y)
    for k in range(N):
        means, S = ssm.posterior_transition(k, basis, y)
        b, M = means[0], (means[1:] - means[0]).T
        assert (all_M[k] - M).abs().max() < TOL and (all_b[k] - b).abs().max() < TOL
        assert (all_S[k] - S).abs().max() < TOL
        # Affine in x: a batch of states gives the same kernel as one at a time.
        single, S_single = ssm.posterior_transition(k, ssm.x0, y)
        assert (single - (M @ ssm.x0 + b)).abs().max() < TOL
        assert (S_single - S).abs().max() < TOL
        if k > 0:
            lag = post_P[k * D : (k + 1) * D, (k - 1) * D : k * D]
            assert (M @ P - lag).abs().max() < TOL
        m, P = M @ m + b, M @ P @ M.T + S
        block = slice(k * D, (k + 1) * D)
        assert (m - post_m[block]).abs().max() < TOL
        assert (P - post_P[block, block]).abs().max() < TOL


def _log_joint(model, y, **values):
    conditioned = poutine.condition(model, data=values)
    return poutine.trace(conditioned).get_trace(y).log_prob_sum()


def _dense_log_joint(ssm, path, y):
    mean, cov, _, _, R = dense(ssm)
    log_path = dist.MultivariateNormal(mean, cov).log_prob(path.reshape(-1))
    observed = path[ssm.obs_index] @ ssm.C.T
    return log_path + dist.MultivariateNormal(observed, R).log_prob(y).sum()


def _model_log_joint_check(ssm):
    path, y = ssm.simulate(5)
    expected = _dense_log_joint(ssm, path, y)
    assert abs(float(_log_joint(ssm.model, y, path=path) - expected)) < TOL
    trace = poutine.trace(ssm.model).get_trace(y)
    assert trace.nodes["path"]["value"].shape == (ssm.num_steps, ssm.state_dim)
    assert trace.nodes["y"]["value"].shape == (ssm.num_obs, ssm.obs_dim)
    assert trace.nodes["y"]["fn"].event_shape == (ssm.num_obs, ssm.obs_dim)


@pytest.mark.parametrize("name", [n for n, c in CONFIGS.items() if c[-1]])
def test_model_log_joint_matches_dense_density_diagonal_noise(name):
    _model_log_joint_check(make_ssm(*CONFIGS[name]))


@pytest.mark.skipif(not HAS_GENERAL_NOISE, reason="LatentDiffusion has no general noise yet")
@pytest.mark.parametrize("name", ["2d-M3-partial-random", "4d-M6-every-step"])
def test_model_log_joint_matches_dense_density_general_noise(name):
    _model_log_joint_check(make_ssm(*CONFIGS[name]))


def test_simulate_is_reproducible_and_has_the_chain_law():
    """``simulate`` from a seed is reproducible, and the whitened observations of 400
    draws have mean 0 and variance 1 (within 4 standard errors)."""
    ssm = make_ssm(*CONFIGS["3d-M2-hypoelliptic"])
    path, y = ssm.simulate(7)
    again, y_again = ssm.simulate(torch.Generator().manual_seed(7))
    assert torch.equal(path, again) and torch.equal(y, y_again)
    mean, _, Z, y_cov, _ = dense(ssm)
    tril = torch.linalg.cholesky(y_cov)
    ys = torch.stack([ssm.simulate(seed)[1].reshape(-1) for seed in range(400)])
    z = torch.linalg.solve_triangular(tril, (ys - Z @ mean).T, upper=False)
    n = z.numel()
    assert abs(float(z.mean())) < SE / math.sqrt(n)
    assert abs(float(z.square().mean()) - 1) < SE * math.sqrt(2 / n)


def test_non_diagonal_noise_needs_general_noise():
    ssm = make_ssm(*CONFIGS["2d-M3-partial-random"])
    if HAS_GENERAL_NOISE:
        pytest.skip("LatentDiffusion has general noise")
    with pytest.raises(NotImplementedError, match="diagonal"):
        ssm.model(ssm.simulate(0)[1])


@pytest.mark.parametrize("field, value", [("obs_steps", [0, 3]), ("obs_steps", [3, 3])])
def test_bad_obs_steps(field, value):
    ssm = make_ssm(*CONFIGS["1d-every-step"])
    with pytest.raises(ValueError, match="obs_steps"):
        LinearGaussianSSM(**{**ssm.__dict__, field: torch.tensor(value)})


# --------------------------------------------------------------------------- shared rate


def make_shared(seed=0, general=False) -> SharedParameterSSM:
    g = torch.Generator().manual_seed(seed)
    S, N, D = 6, 10, 2
    mask = torch.rand(S, N, generator=g) < 0.5
    mask[:, -1] = True
    return SharedParameterSSM(
        times=torch.linspace(0.0, 2.0, N + 1, dtype=DTYPE),
        obs_mask=mask,
        x0=torch.randn(S, D, generator=g, dtype=DTYPE),
        drift_matrix=torch.tensor([[-1.0, 0.4], [-0.4, -0.8]], dtype=DTYPE),
        c=torch.tensor([0.3, -0.2], dtype=DTYPE),
        G=torch.tensor([[0.8, 0.3], [0.0, 0.6]], dtype=DTYPE)
        if general
        else torch.diag(torch.tensor([0.8, 0.6], dtype=DTYPE)),
        C=torch.tensor([[1.0, 0.5]], dtype=DTYPE),
        obs_scale=torch.tensor([0.3], dtype=DTYPE),
        prior_loc=0.2,
        prior_scale=0.6,
    )


@pytest.mark.parametrize("general", [False, True])
def test_shared_likelihood_is_the_sum_of_series_evidences(general):
    ssm = make_shared(general=general)
    _, y = ssm.simulate(1.4, seed=2)
    theta = torch.tensor([0.5, 1.4, 3.0], dtype=DTYPE)
    steps = torch.arange(1, ssm.num_steps + 1)
    for value, got in zip(theta, ssm.log_likelihood(theta, y), strict=True):
        expected = sum(
            series.log_evidence(y[i, steps[ssm.obs_mask[i]] - 1])
            for i, series in enumerate(ssm.series(float(value)))
        )
        assert abs(float(got - expected)) < TOL


def test_shared_model_log_joint_matches_dense_density():
    ssm = make_shared()
    paths, y = ssm.simulate(1.4, seed=3)
    theta = torch.tensor(1.1, dtype=DTYPE)
    steps = torch.arange(1, ssm.num_steps + 1)
    expected = ssm.prior().log_prob(theta)
    for i, series in enumerate(ssm.series(float(theta))):
        expected = expected + _dense_log_joint(series, paths[i], y[i, steps[ssm.obs_mask[i]] - 1])
    got = _log_joint(ssm.model, y, theta=theta, path=paths)
    assert abs(float(got - expected)) < TOL
    trace = poutine.trace(ssm.model).get_trace(y)
    assert trace.nodes["path"]["value"].shape == (ssm.num_series, ssm.num_steps, 2)
    assert [frame.name for frame in trace.nodes["path"]["cond_indep_stack"]] == ["series"]


def _importance(log_target, proposal, n, fn):
    """Self-normalised importance estimates of ``E fn`` (delta-method standard errors)
    and of ``log Z``; returns dicts of (estimate, stderr)."""
    u = proposal.sample((n,))
    log_w = log_target(u) - proposal.log_prob(u)
    w = torch.softmax(log_w, 0)
    out = {}
    for name, values in fn(u).items():
        est = (w * values).sum()
        out[name] = (est, float((w.square() * (values - est).square()).sum().sqrt()))
    log_z = torch.logsumexp(log_w, 0) - math.log(n)
    rel = (n * w.square().sum() - 1).clamp(min=0)
    out["log_z"] = (log_z, float((rel / n).sqrt()))
    return out


def test_shared_quadrature_matches_importance_sampling_and_converges():
    ssm = make_shared()
    _, y = ssm.simulate(1.4, seed=4)
    post = ssm.exact_posterior(y)
    fine = ssm.exact_posterior(y, grid_size=512)
    sd = float(post.sd)
    assert abs(float(fine.mean - post.mean)) < 1e-3 * float(post.mean)
    assert abs(float(fine.sd - post.sd)) < 1e-3 * sd
    assert abs(float(ssm.log_evidence(y, 512) - ssm.log_evidence(y))) < 1e-6
    # The density integrates to one (in log theta, where the grid is uniform).
    trapezoid = torch.trapezoid(post.density * post.grid, post.grid.log())
    assert abs(float(trapezoid) - 1) < 1e-10
    # Brute force: importance sampling from the prior (60000 draws).
    pyro.set_rng_seed(11)
    prior = ssm.prior()
    est = _importance(
        lambda theta: prior.log_prob(theta) + ssm.log_likelihood(theta, y),
        prior,
        60000,
        lambda theta: {"mean": theta, "second": theta.square()},
    )
    (mean, se_mean), (second, se_second) = est["mean"], est["second"]
    assert abs(float(mean - post.mean)) < SE * se_mean
    assert abs(float(second - post.mean**2 - post.sd**2)) < SE * se_second
    log_z, se_z = est["log_z"]
    assert abs(float(log_z - ssm.log_evidence(y))) < SE * se_z


# --------------------------------------------------------------------------- PyMC shape


def test_euler_maruyama_model_log_joint():
    ex = EulerMaruyamaExample(num_steps=30)
    path, y = ex.simulate(0.7, 0.06, seed=1)
    l_value, s_value = torch.tensor(0.9, dtype=DTYPE), torch.tensor(0.07, dtype=DTYPE)
    series = LinearGaussianSSM(
        B=-l_value.reshape(1, 1),
        c=torch.zeros(1, dtype=DTYPE),
        G=s_value.reshape(1, 1),
        x0=torch.tensor([ex.x0], dtype=DTYPE),
        times=ex.times,
        obs_steps=torch.arange(1, 31),
        C=torch.eye(1, dtype=DTYPE),
        obs_scale=torch.tensor([ex.obs_scale], dtype=DTYPE),
    )
    expected = (
        ex.l_prior().log_prob(l_value)
        + ex.s_prior().log_prob(s_value)
        + _dense_log_joint(series, path, y.unsqueeze(-1))
    )
    got = _log_joint(ex.model, y, l=l_value, s=s_value, path=path)
    assert abs(float(got - expected)) < TOL
    assert (
        abs(float(ex.log_likelihood(l_value, s_value, y) - series.log_evidence(y[:, None]))) < TOL
    )


def test_euler_maruyama_quadrature_matches_importance_sampling_and_converges():
    ex = EulerMaruyamaExample()
    _, y = ex.simulate(seed=0)
    post = ex.exact_posterior(y, grid_size=64)
    fine = ex.exact_posterior(y, grid_size=128)
    for name in ("l_mean", "l_sd", "s_mean", "s_sd"):
        coarse_value, fine_value = float(getattr(post, name)), float(getattr(fine, name))
        assert abs(coarse_value - fine_value) < 1e-3 * abs(fine_value), name
    assert abs(float(post.log_evidence - fine.log_evidence)) < 1e-6
    assert abs(float(post.weights.sum()) - 1) < 1e-12
    # Brute force: importance sampling with a Gaussian proposal in the unconstrained
    # coordinates, 1.5 times wider than the quadrature posterior there.
    width = ex.s_high - ex.s_low
    u_l = fine.l_grid.log()
    u_s = torch.logit((fine.s_grid - ex.s_low) / width)
    w_l, w_s = fine.weights.sum(1), fine.weights.sum(0)
    loc = torch.stack([(w_l * u_l).sum(), (w_s * u_s).sum()])
    scale = torch.stack(
        [
            (w_l * (u_l - loc[0]).square()).sum().sqrt(),
            (w_s * (u_s - loc[1]).square()).sum().sqrt(),
        ]
    )
    proposal = dist.Normal(loc, 1.5 * scale).to_event(1)

    def log_density(u):  # the posterior density of (log l, logit of s), unnormalised
        l_value, s_value = u[:, 0].exp(), ex.s_low + width * torch.sigmoid(u[:, 1])
        log_jacobian = u[:, 0] + (s_value - ex.s_low).log() + (ex.s_high - s_value).log()
        log_prior = ex.l_prior().log_prob(l_value) + ex.s_prior().log_prob(s_value)
        return log_prior + log_jacobian - math.log(width) + ex.log_likelihood(l_value, s_value, y)

    pyro.set_rng_seed(12)
    est = _importance(
        log_density,
        proposal,
        20000,
        lambda u: {"l": u[:, 0].exp(), "s": ex.s_low + width * torch.sigmoid(u[:, 1])},
    )
    assert abs(float(est["l"][0] - fine.l_mean)) < SE * est["l"][1]
    assert abs(float(est["s"][0] - fine.s_mean)) < SE * est["s"][1]
    assert abs(float(est["log_z"][0] - fine.log_evidence)) < SE * est["log_z"][1]
