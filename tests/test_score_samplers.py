"""Score samplers against their exact laws (Gaussian data, X uniform on {+-1})."""

from __future__ import annotations

import importlib
import math
from types import SimpleNamespace

import pytest
import torch

from pyro_latdiff.score import (
    CriticallyDampedLangevin,
    OrnsteinUhlenbeck,
    ScoreNetwork,
    VarianceExploding,
    VariancePreserving,
    check_score,
)
from pyro_latdiff.score.samplers import (
    GaussianChannel,
    ScoreDenoiser,
    cld_sampler,
    denoiser_sampler,
    equalised_times,
    exponential_integrator,
    immse_times,
    probability_flow_ode,
    reverse_sde_euler,
    uniform_times,
)
from pyro_latdiff.score.samplers._common import score_step_coefs
from pyro_latdiff.testing import (
    binary_denoiser,
    binary_mmse,
    binary_path_kl,
    gaussian_cld_law,
    gaussian_cld_velocity_score,
    gaussian_denoiser,
    gaussian_denoiser_law,
    gaussian_kl,
    gaussian_sampler_law,
    gaussian_score,
)

SAMPLERS = {
    "reverse_sde_euler": reverse_sde_euler,
    "exponential_integrator": exponential_integrator,
    "probability_flow_ode": probability_flow_ode,
}
PROCESSES = {
    "ou": (lambda: OrnsteinUhlenbeck(4.0), 0.0),
    "vp-linear": (lambda: VariancePreserving(), 1e-3),
    "vp-cosine": (lambda: VariancePreserving(schedule="cosine"), 1e-3),
    "ve": (lambda: VarianceExploding(0.01, 5.0), 1e-3),
}
NUM = 4000
Z_MAX = 4.0


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)


def _data(d=3):
    return torch.linspace(-1.0, 1.5, d), torch.linspace(0.3, 0.8, d)


def _z_scores(samples, mean, var):
    n = samples.shape[0]
    z_mean = (samples.mean(0) - mean) / (var / n).sqrt()
    z_var = (samples.var(0) - var) / (var * math.sqrt(2 / (n - 1)))
    return z_mean.abs().max().item(), z_var.abs().max().item()


# --- Chen et al.: the exponential integrator on Gaussian data --------------------------


@pytest.mark.parametrize("h, expected", [(0.4, 1.70), (0.04, 1.63e-2), (0.004, 1.61e-4)])
def test_exponential_integrator_gaussian_kl(h, expected):
    """m = 1, s^2 = 0.5, d = 10, T = 4, from N(0, I), exact score frozen at each step's
    start: KL(data || sampler) to the 3 digits published (Chen et al. 2023)."""
    d = 10
    mean, var = torch.ones(d), torch.full((d,), 0.5)
    process = OrnsteinUhlenbeck(4.0)
    times = torch.linspace(0, 4, round(4 / h) + 1)
    loc, cov = gaussian_sampler_law("exponential_integrator", process, mean, var, times)
    kl = gaussian_kl(mean, var, loc, cov).item()
    assert float(f"{kl:.3g}") == pytest.approx(expected)


def test_score_step_coefs_closed_forms():
    """The quadrature weight of the frozen score: 2 (e^h - 1) for OU, 2 (1/a - 1) for VP,
    std^2 for VE."""
    times = torch.tensor([0.0, 0.1, 0.35, 1.0])
    ou = OrnsteinUhlenbeck(1.0)
    h = times.diff()
    assert torch.allclose(score_step_coefs(ou, times), 2 * torch.expm1(h), rtol=1e-12)
    vp = VariancePreserving()
    a_vp = vp.transition_coefs(times[:-1], times[1:])[0]
    assert torch.allclose(score_step_coefs(vp, times), 2 * (1 / a_vp - 1), rtol=1e-10)
    ve = VarianceExploding()
    std = ve.transition_coefs(times[:-1], times[1:])[1]
    assert torch.allclose(score_step_coefs(ve, times), std**2, rtol=1e-10)
    # The processes' closed forms; 16-node quadrature, which they replace, was 10 % off
    # on the cosine VP's one step (its beta grows like tan near the horizon).
    cosine = VariancePreserving(schedule="cosine")
    for grid in (torch.tensor([1e-3, 1.0]), times):
        a = cosine.transition_coefs(grid[:-1], grid[1:])[0]
        assert torch.allclose(score_step_coefs(cosine, grid), 2 * (1 / a - 1), rtol=1e-12)
    # A process without one takes the quadrature: accurate on the linear VP.
    generic = SimpleNamespace(
        diffusion_coef=vp.diffusion_coef, transition_coefs=vp.transition_coefs
    )
    assert torch.allclose(score_step_coefs(generic, times), 2 * (1 / a_vp - 1), rtol=1e-10)


@pytest.mark.parametrize("process_name", sorted(PROCESSES))
@pytest.mark.parametrize("sampler_name", sorted(SAMPLERS))
def test_sampler_moments_match_exact_law(sampler_name, process_name):
    """Sample mean and variance within 4 standard errors of the exact discrete law (the
    probability-flow ODE: of the exact flow)."""
    make, t_min = PROCESSES[process_name]
    process = make()
    mean, var = _data()
    # the ODE with RK4 steps, whose error is far below the standard errors
    options = {"method": "rk4"} if sampler_name == "probability_flow_ode" else {}
    result = SAMPLERS[sampler_name](
        gaussian_score(process, mean, var), process, NUM, 20, state_dim=3, t_min=t_min, **options
    )
    assert result.samples.shape == (NUM, 3) and result.samples.dtype == torch.float64
    assert result.num_evaluations == (80 if sampler_name == "probability_flow_ode" else 20)
    loc, cov = gaussian_sampler_law(
        sampler_name, process, mean, var, result.times, init_var=process.prior_std**2
    )
    z_mean, z_var = _z_scores(result.samples, loc, cov)
    assert z_mean < Z_MAX and z_var < Z_MAX


@pytest.mark.parametrize("method, per_step", [("euler", 1), ("heun2", 2), ("rk4", 4)])
def test_probability_flow_solver_converges_to_the_exact_flow(method, per_step):
    """The flow of an affine score is affine: the solver's own law from two starting
    points, against the exact flow, at the solver's order."""
    process = VariancePreserving()
    mean, var = _data()
    score = gaussian_score(process, mean, var)
    start = torch.stack([torch.zeros(3), torch.ones(3)])
    errors = []
    for n in (10, 20):
        result = probability_flow_ode(
            score, process, 2, n, state_dim=3, t_min=1e-3, x_init=start, method=method
        )
        assert result.num_evaluations == n * per_step
        loc, cov = gaussian_sampler_law("probability_flow_ode", process, mean, var, result.times)
        shift, gain = result.samples[0], result.samples[1] - result.samples[0]
        errors.append(((shift - loc).abs().max() + (gain - cov.sqrt()).abs().max()).item())
    order = math.log2(errors[0] / errors[1])
    assert order > per_step - 0.6 if per_step < 4 else order > 2.5


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_adaptive_ode_on_variance_preserving_processes(schedule):
    """dopri5's first-step probe and last step reach outside [t_min, horizon], where a VP
    process's beta is negative (its diffusion NaN): this raised inside torchdiffeq."""
    process = VariancePreserving(schedule=schedule)
    mean, var = _data()
    score = gaussian_score(process, mean, var)
    flow = probability_flow_ode(score, process, NUM, 4, state_dim=3, t_min=1e-3, method="dopri5")
    loc, cov = gaussian_sampler_law("probability_flow_ode", process, mean, var, flow.times)
    assert max(_z_scores(flow.samples, loc, cov)) < Z_MAX


def test_schedule_tensor_and_adaptive_ode():
    process = OrnsteinUhlenbeck(3.0)
    mean, var = _data()
    score = gaussian_score(process, mean, var)
    times = torch.tensor([0.0, 0.05, 0.2, 0.6, 1.5, 3.0])
    result = exponential_integrator(score, process, NUM, 5, state_dim=3, schedule=times)
    assert torch.equal(result.times, times)
    loc, cov = gaussian_sampler_law("exponential_integrator", process, mean, var, times)
    assert max(_z_scores(result.samples, loc, cov)) < Z_MAX
    flow = probability_flow_ode(score, process, 2000, 2, state_dim=3, method="dopri5")
    assert flow.num_evaluations > 6  # adaptive steps inside the two reported intervals
    loc, cov = gaussian_sampler_law("probability_flow_ode", process, mean, var, flow.times)
    assert max(_z_scores(flow.samples, loc, cov)) < Z_MAX


def test_cld_sampler_moments_match_exact_law():
    process = CriticallyDampedLangevin(horizon=5.0)
    mean, var = _data()
    score = gaussian_cld_velocity_score(process, mean, var)
    result = cld_sampler(score, process, NUM, 25, state_dim=3)
    assert result.samples.shape == (NUM, 3) and result.num_evaluations == 25
    loc, cov = gaussian_cld_law(process, mean, var, result.times)
    assert max(_z_scores(result.samples, loc[:, 0], cov[:, 0, 0])) < Z_MAX
    # the full score (position half ignored) gives the same chain
    torch.manual_seed(1)
    full = cld_sampler(
        lambda t, z: torch.cat([torch.zeros_like(z[..., :3]), score(t, z)], -1),
        process,
        NUM,
        25,
        state_dim=3,
    )
    assert max(_z_scores(full.samples, loc[:, 0], cov[:, 0, 0])) < Z_MAX


def test_cld_sampler_converges_to_data():
    process = CriticallyDampedLangevin(horizon=6.0)
    mean, var = _data()
    kls = []
    for n in (10, 40):
        loc, cov = gaussian_cld_law(process, mean, var, torch.linspace(0, 6, n + 1))
        kls.append(gaussian_kl(mean, var, loc[:, 0], cov[:, 0, 0]).item())
    assert kls[1] < kls[0] / 4


# --- Reeves & Pfister: the denoiser sampler ----------------------------------------------


@pytest.mark.parametrize("output", ["mean", "scaled", "channel"])
@pytest.mark.parametrize("covariance", [None, "jacobian", "head"])
def test_denoiser_sampler_moments_match_exact_law(covariance, output):
    mean, var = _data()
    denoiser = gaussian_denoiser(mean, var)
    if covariance == "head":

        def covariance(t, y):
            return torch.diag_embed((1 / (1 / var + t)).expand_as(y))

    result = denoiser_sampler(
        denoiser,
        GaussianChannel(4.0),
        NUM,
        8,
        state_dim=3,
        covariance=covariance,
        output=output,
    )
    per_step = 3 if covariance == "jacobian" else 1
    assert result.num_evaluations == 8 * per_step + (output == "mean")
    loc, cov = gaussian_denoiser_law(
        mean, var, result.times, covariance_matched=covariance is not None, output=output
    )
    assert max(_z_scores(result.samples, loc, cov)) < Z_MAX


def test_covariance_matched_denoiser_is_exact_for_gaussian_data():
    """Reeves & Pfister: with Gaussian X the covariance-matched chain has the law of the
    channel itself, Y_t ~ N(t m, t^2 s^2 + t)."""
    mean, var = _data()
    times = torch.tensor([0.0, 0.5, 0.7, 2.0, 4.0])
    loc, cov = gaussian_denoiser_law(mean, var, times, covariance_matched=True, output="channel")
    assert torch.allclose(loc, 4 * mean) and torch.allclose(cov, 16 * var + 4)
    loc, cov = gaussian_denoiser_law(mean, var, times, output="channel")
    assert not torch.allclose(cov, 16 * var + 4)


@pytest.mark.parametrize(
    "n, plain, matched", [(4, 0.269748, 2.6e-2), (8, 0.126133, 8.5e-3), (16, 0.060689, 2.5e-3)]
)
def test_binary_path_kl(n, plain, matched):
    """X uniform on {+-1}, t_max = 4: the path KL from its definition (2-D quadrature)."""
    times = torch.linspace(0, 4, n + 1)
    assert binary_path_kl(times).item() == pytest.approx(plain, abs=1e-6)
    kl_matched = binary_path_kl(times, covariance_matched=True).item()
    assert float(f"{kl_matched:.2g}") == pytest.approx(matched)


def test_binary_covariance_matched_falls_faster_than_one_over_n():
    kls = [binary_path_kl(torch.linspace(0, 4, n + 1), True).item() for n in (4, 8, 16, 32)]
    plain = [binary_path_kl(torch.linspace(0, 4, n + 1)).item() for n in (4, 8, 16, 32)]
    assert all(m < p for m, p in zip(kls, plain, strict=True))
    assert all(a / b > 2.5 for a, b in zip(kls, kls[1:], strict=False))  # 1/n would give 2


def test_binary_denoiser_sampler_runs_both_variants():
    for covariance in (None, "jacobian"):
        result = denoiser_sampler(
            binary_denoiser, GaussianChannel(4.0), 2000, 16, state_dim=1, covariance=covariance
        )
        # E[X] = 0 and the output E[X | Y_4] = tanh(Y_4) sits near +-1
        assert abs(result.samples.mean().item()) < 4 * result.samples.std().item() / 2000**0.5
        assert (result.samples.abs() > 0.5).float().mean() > 0.9


@pytest.mark.parametrize("process_name", ["ou", "vp-linear"])
def test_score_denoiser_is_the_conditional_mean(process_name):
    """Tweedie on the channel: from the exact score of Gaussian data, the exact
    E[X | Y_t = y] wherever the process reaches the channel time; it drives the
    covariance-matched sampler, which is then exact."""
    process = PROCESSES[process_name][0]()
    mean, var = _data()
    denoiser = ScoreDenoiser(gaussian_score(process, mean, var), process, t_min=1e-3)
    reference = gaussian_denoiser(mean, var)
    a, std = process.marginal_coefs(torch.tensor([process.horizon, 1e-3]))
    low, high = (a / std).square().tolist()
    assert denoiser.channel.horizon == pytest.approx(high)
    y = torch.randn(7, 3)
    for t in torch.logspace(math.log10(low), math.log10(high), 9):
        assert torch.allclose(denoiser(t, y), reference(t, y), atol=1e-5)
    result = denoiser_sampler(
        denoiser, GaussianChannel(4.0), NUM, 8, state_dim=3, covariance="jacobian"
    )
    loc, cov = gaussian_denoiser_law(mean, var, result.times, covariance_matched=True)
    assert max(_z_scores(result.samples, loc, cov)) < Z_MAX


# --- schedules ----------------------------------------------------------------------------


def test_schedules():
    grid = torch.linspace(0, 4, 4001)
    mmse = binary_mmse(grid)
    times = equalised_times(grid, mmse, 8)
    assert times.shape == (9,) and times[0] == 0 and times[-1] == 4
    assert (times.diff() > 0).all() and times.diff()[0] < times.diff()[-1]
    mi = immse_times(grid, mmse, 8)
    assert mi[0] == 0 and mi[-1] == 4 and (mi.diff() > 0).all()
    assert torch.allclose(uniform_times(4.0, 4), torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))


# --- bad input -----------------------------------------------------------------------------


def _ou():
    return OrnsteinUhlenbeck(2.0)


def _score(t, x):
    return -x


BAD = [
    ("score", lambda: exponential_integrator(lambda t, x: x[:, :1], _ou(), 8, 4, state_dim=2)),
    ("score", lambda: reverse_sde_euler(lambda t, x: x * math.nan, _ou(), 8, 4, state_dim=2)),
    ("score", lambda: probability_flow_ode(lambda t, x: 1.0, _ou(), 8, 4, state_dim=2)),
    ("score", lambda: exponential_integrator(None, _ou(), 8, 4, state_dim=2)),
    ("num_steps", lambda: exponential_integrator(_score, _ou(), 8, 0, state_dim=2)),
    ("num_steps", lambda: reverse_sde_euler(_score, _ou(), 8, -3, state_dim=2)),
    ("num_samples", lambda: exponential_integrator(_score, _ou(), 0, 4, state_dim=2)),
    ("state_dim", lambda: exponential_integrator(_score, _ou(), 8, 4, state_dim=0)),
    (
        "schedule",
        lambda: exponential_integrator(
            _score, _ou(), 8, 2, state_dim=2, schedule=torch.tensor([0.0, 1.0, 0.5])
        ),
    ),
    (
        "schedule",
        lambda: exponential_integrator(
            _score, _ou(), 8, 3, state_dim=2, schedule=torch.tensor([0.0, 1.0, 2.0])
        ),
    ),
    ("schedule", lambda: exponential_integrator(_score, _ou(), 8, 3, state_dim=2, schedule="x")),
    (  # ends before the horizon (2.0), where the prior is not the law
        "schedule` to end at the horizon",
        lambda: reverse_sde_euler(
            _score, _ou(), 8, 2, state_dim=2, schedule=torch.tensor([0.0, 0.5, 1.0])
        ),
    ),
    (  # starts above t_min: the samples would be returned at another time
        "schedule` to start at `t_min`",
        lambda: exponential_integrator(
            _score, _ou(), 8, 2, state_dim=2, schedule=torch.tensor([0.1, 1.0, 2.0])
        ),
    ),
    ("t_min", lambda: exponential_integrator(_score, _ou(), 8, 3, state_dim=2, t_min=5.0)),
    (
        "x_init",
        lambda: exponential_integrator(_score, _ou(), 8, 3, state_dim=2, x_init=torch.ones(8)),
    ),
    ("process", lambda: exponential_integrator(_score, object(), 8, 3, state_dim=2)),
    ("process", lambda: cld_sampler(_score, _ou(), 8, 3, state_dim=2)),
    ("method", lambda: probability_flow_ode(_score, _ou(), 8, 3, state_dim=2, method="rk45")),
    (
        "score",
        lambda: cld_sampler(lambda t, z: z[:, :1], CriticallyDampedLangevin(), 8, 3, state_dim=2),
    ),
    ("channel", lambda: denoiser_sampler(_score, _ou(), 8, 3, state_dim=2)),
    (
        "denoiser",
        lambda: denoiser_sampler(lambda t, y: y.sum(-1), GaussianChannel(1.0), 8, 3, state_dim=2),
    ),
    (
        "covariance",
        lambda: denoiser_sampler(
            _score, GaussianChannel(1.0), 8, 3, state_dim=2, covariance="diag"
        ),
    ),
    (
        "covariance",
        lambda: denoiser_sampler(
            _score, GaussianChannel(1.0), 8, 3, state_dim=2, covariance=lambda t, y: y
        ),
    ),
    (
        "output",
        lambda: denoiser_sampler(_score, GaussianChannel(1.0), 8, 3, state_dim=2, output="x"),
    ),
    ("horizon", lambda: GaussianChannel(-1.0)),
    ("t_min", lambda: ScoreDenoiser(_score, _ou(), t_min=0.0)),
    ("t_min", lambda: ScoreDenoiser(_score, _ou(), t_min=torch.tensor([1e-3]))),
    ("t_min", lambda: reverse_sde_euler(_score, _ou(), 8, 3, state_dim=2, t_min=torch.tensor(5.0))),
    ("t_min", lambda: reverse_sde_euler(_score, _ou(), 8, 3, state_dim=2, t_min=torch.tensor(0))),
    (
        "x_init",
        lambda: reverse_sde_euler(
            _score, _ou(), 8, 3, state_dim=2, x_init=torch.zeros(8, 2, dtype=torch.int64)
        ),
    ),
    (
        "x_init",
        lambda: exponential_integrator(
            _score, _ou(), 8, 3, state_dim=2, x_init=torch.zeros(8, 2, dtype=torch.int64)
        ),
    ),
    (
        "x_init",
        lambda: probability_flow_ode(
            _score, _ou(), 8, 3, state_dim=2, x_init=torch.zeros(8, 2, dtype=torch.int32)
        ),
    ),
    (
        "x_init",
        lambda: cld_sampler(
            _score,
            CriticallyDampedLangevin(),
            8,
            3,
            state_dim=2,
            x_init=torch.zeros(8, 4, dtype=torch.int64),
        ),
    ),
    ("num_steps", lambda: equalised_times(torch.linspace(0, 1, 5), torch.ones(5), 0)),
    ("mmse_values", lambda: equalised_times(torch.linspace(0, 1, 5), torch.ones(4), 3)),
    ("mmse_times", lambda: immse_times(torch.linspace(1, 2, 5), torch.ones(5), 3)),
]


def _score_changing_shape(t, x):
    """Right at the first call (the horizon), (n, 1) afterwards: would broadcast."""
    return -x if float(t) == 2.0 else -x[:, :1]


@pytest.mark.parametrize(
    "sampler", [reverse_sde_euler, exponential_integrator, probability_flow_ode, cld_sampler]
)
def test_a_score_of_the_wrong_shape_after_the_first_call_is_one_clear_error(sampler):
    process = CriticallyDampedLangevin(horizon=2.0) if sampler is cld_sampler else _ou()
    with pytest.raises(ValueError, match=r"Expected `score\(t, x\)` to return shape.*actual"):
        sampler(_score_changing_shape, process, 8, 4, state_dim=2)


@pytest.mark.parametrize("name, call", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_names_the_argument(name, call):
    with pytest.raises(ValueError, match=f"Expected `{name}"):
        call()


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_t_min_may_be_a_0d_tensor(sampler):
    """As the unbiased estimators take ``t1``: the same grid as the float."""
    run = SAMPLERS[sampler]
    torch.manual_seed(0)
    expected = run(_score, _ou(), 8, 3, state_dim=2, t_min=0.1)
    torch.manual_seed(0)
    result = run(_score, _ou(), 8, 3, state_dim=2, t_min=torch.tensor(0.1))
    assert torch.equal(result.times, expected.times)
    assert torch.equal(result.samples, expected.samples)
    assert ScoreDenoiser(_score, _ou(), t_min=torch.tensor(1e-3)).channel.horizon == pytest.approx(
        ScoreDenoiser(_score, _ou(), t_min=1e-3).channel.horizon
    )


@pytest.mark.parametrize(
    "sampler", [reverse_sde_euler, exponential_integrator, probability_flow_ode, cld_sampler]
)
@pytest.mark.parametrize("wrapped", [False, True])
def test_a_network_of_another_dtype_is_named_as_a_dtype_mismatch(sampler, wrapped):
    """Not as a wrong state dimension: the message names both dtypes and x_init."""
    cld = sampler is cld_sampler
    process = CriticallyDampedLangevin(horizon=2.0) if cld else _ou()
    net = ScoreNetwork(_ou(), 4 if cld else 2).float()  # the default dtype is float64 here
    score = (lambda t, x: net(t, x)) if wrapped else net
    match = "sampler's dtype torch.float64" + ("" if wrapped else ".*parameters are torch.float32")
    with pytest.raises(ValueError, match=f"Expected `score\\(t, x\\)`.*{match}.*`x_init`"):
        sampler(score, process, 8, 3, state_dim=2, t_min=0.1)
    x_init = torch.zeros(8, 4 if cld else 2, dtype=torch.float32)
    result = sampler(net, process, 8, 3, state_dim=2, x_init=x_init, t_min=0.1)
    assert result.samples.dtype == torch.float32


def test_a_denoiser_of_another_dtype_names_the_dtype_argument():
    net = torch.nn.Linear(2, 2).float()
    with pytest.raises(ValueError, match="sampler's dtype torch.float64.*Pass dtype="):
        denoiser_sampler(lambda t, y: net(y), GaussianChannel(1.0), 8, 3, state_dim=2)


def test_exact_scores_follow_the_score_convention():
    """t 0-d, (N, 1, 1) against x (N, B, D), (B, 1) against (B, D): x's shape, and the
    same values as one time at a time."""
    process, mean, var = _ou(), *_data(2)
    cld = CriticallyDampedLangevin(horizon=2.0)
    check_score(gaussian_score(process, mean, var), 2, 2.0)
    for score, dim in (
        (gaussian_score(process, mean, var), 2),
        (gaussian_cld_velocity_score(cld, mean, var), 4),  # the velocity half
    ):
        out_dim = 2
        x = torch.randn(4, 3, dim)
        t = torch.rand(4, 1, 1) + 0.1
        batched = score(t, x)
        assert batched.shape == (4, 3, out_dim)
        assert torch.allclose(batched, torch.stack([score(t[i, 0, 0], x[i]) for i in range(4)]))
        t = t[:, 0]
        batched = score(t, x[:, 0])
        assert batched.shape == (4, out_dim)
        assert torch.allclose(batched, torch.stack([score(t[i, 0], x[i, 0]) for i in range(4)]))
        with pytest.raises(ValueError, match="Expected `t` 0-d or of x's rank"):
            score(torch.rand(3), x)


def test_nan_along_the_path_is_reported():
    def score(t, x):
        return torch.where(t < 1.0, torch.full_like(x, math.nan), -x)

    with pytest.raises(ValueError, match="Expected `score\\(t, x\\)` to stay finite"):
        exponential_integrator(score, _ou(), 8, 4, state_dim=2)


@pytest.mark.parametrize(
    "module_name", ["pyro_latdiff.score.samplers", "pyro_latdiff.testing.score_references"]
)
def test_all_names_resolve_and_are_sorted(module_name):
    module = importlib.import_module(module_name)
    assert list(module.__all__) == sorted(module.__all__)
    for name in module.__all__:
        assert getattr(module, name) is not None


def test_equalised_times_from_a_noisy_curve():
    """A model's Monte Carlo MMSE curve wiggles: the grid still increases strictly and
    ends at t_max, for many steps."""
    grid = torch.cat([torch.zeros(1), torch.logspace(-3, math.log10(500.0), 300)])
    noisy = 2 / (1 + grid) * (1 + 0.05 * torch.randn(grid.shape))
    for n in (5, 80, 200):
        times = equalised_times(grid, noisy, n)
        assert times.shape == (n + 1,) and (times.diff() > 0).all()
        assert times[0] == 0 and times[-1] == grid[-1]
