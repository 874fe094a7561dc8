"""The guide's controlled chain and the backward filter, without Pyro's inference.

Checked: the simulation form ``step(k, x)`` and the whole-path form agree for every
term and noise type; the backward filter equals the reference filter of
``testing.LinearGaussianSSM``; the chain's Euler loop makes no host synchronisation.
"""

import pytest
import torch
from torch import nn

from pyro_latdiff import LatentDiffusion, NeuralDrift
from pyro_latdiff.chain import Control, ControlledChain, TargetGradient
from pyro_latdiff.filter import GuidedKernel, backward_filter, linearise_drift
from pyro_latdiff.testing import LinearGaussianSSM

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(DTYPE)


def perturbed(module: nn.Module, scale: float = 0.3) -> nn.Module:
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn_like(param))
    return module


def prior(noise: str, dim: int, batch=(3,), state_dependent=False):
    times = torch.tensor([0.0, 0.1, 0.25, 0.3, 0.6, 1.0])
    x0 = torch.randn(batch + (dim,))
    B = -torch.eye(dim) + 0.3 * torch.randn(dim, dim)
    drift = lambda t, x: x @ B.T + (x * t).sin()  # noqa: E731
    if noise == "general":
        G = torch.randn(dim, dim + 1)
        if state_dependent:
            diffusion = lambda t, x: G * (1.0 + 0.1 * x.unsqueeze(-1).tanh())  # noqa: E731
        else:
            diffusion = G
        return LatentDiffusion(drift, diffusion, x0, times, noise_type="general")
    sigma = 0.5 + torch.rand(dim)
    if state_dependent:
        return LatentDiffusion(drift, lambda t, x: sigma * (1.2 + x.tanh()), x0, times)
    return LatentDiffusion(drift, sigma, x0, times)


def control(fn: LatentDiffusion, target: bool = False) -> Control:
    dim, num_steps = fn.state_dim, fn.num_steps
    net = perturbed(NeuralDrift(dim, context_dim=2, out_dim=2 * dim, hidden_dims=(8,)))
    tables = [0.3 * torch.randn(num_steps, dim) for _ in range(3)]
    context = torch.randn(fn.batch_shape + (2,))
    gradient = TargetGradient(lambda x: -(x - 1.0).square().sum(-1) / 2) if target else None
    gain = 0.3 * torch.randn(num_steps, dim) if target else None
    return Control(net, *tables, fn.times, context, gradient, gain)


def kernel(fn: LatentDiffusion, diagonal: bool = False) -> GuidedKernel:
    """A guided kernel from random observation terms at every step (diagonal: one
    scalar filter per coordinate, as for independent coordinates)."""
    shape = (fn.num_steps,) + fn.batch_shape
    if diagonal:
        H = torch.rand(shape + (fn.state_dim,)) * 3.0
        return GuidedKernel(H, torch.randn(shape + (fn.state_dim,)), fn)
    root = torch.randn(shape + (fn.state_dim, fn.state_dim))
    precision = root @ root.transpose(-1, -2)
    information = torch.randn(shape + (fn.state_dim,))
    reference = torch.randn(fn.batch_shape + fn.event_shape)
    A, a, Q, _ = linearise_drift(fn, reference)
    return GuidedKernel(*backward_filter(A, a, Q, precision, information), fn)


CASES = [
    (noise, dim, guided, state_dependent)
    for noise in ("diagonal", "general")
    for dim in (1, 3)
    for guided in (False, True, "diagonal")
    for state_dependent in (False, True)
    if not (guided == "diagonal" and noise == "general" and dim > 1)
]


@pytest.mark.parametrize("noise, dim, guided, state_dependent", CASES)
def test_step_by_index_equals_the_whole_path_evaluation(noise, dim, guided, state_dependent):
    fn = prior(noise, dim, state_dependent=state_dependent)
    terms = control(fn, target=True)
    guide_kernel = kernel(fn, diagonal=guided == "diagonal") if guided else None
    chain = ControlledChain(fn, terms, guide_kernel)
    value = chain.rsample((2,))
    assert value.shape == (2,) + fn.batch_shape + fn.event_shape
    previous = torch.cat([chain.x0.expand(value.shape[:-2] + (dim,)).unsqueeze(-2),
                          value[..., :-1, :]], dim=-2).movedim(-2, 0)  # fmt: skip
    t = fn.times[:-1].reshape((-1,) + (1,) * (previous.dim() - 1))
    drift, scale = chain.path_coefficients(t, previous)
    for k in range(fn.num_steps):
        step_drift, step_scale = chain.step(k, previous[k])
        assert torch.allclose(step_drift, drift[k].expand_as(step_drift), atol=1e-12)
        assert torch.allclose(step_scale, scale[k].expand_as(step_scale), atol=1e-12)
    assert torch.isfinite(chain.log_prob(value)).all()


@pytest.mark.parametrize("guided", [False, True, "diagonal"])
def test_a_solve_takes_its_rows_in_its_own_gradient_mode(guided):
    """The rows a solve splits off its tables are the solve's: a chain simulated
    without gradients and then with them has its gradients the second time, and its
    path is the Euler chain of ``step(k, x)`` on the same increments."""
    fn = prior("diagonal", 2)
    terms = control(fn)
    for table in terms._tables:
        table.requires_grad_()
    guide_kernel = kernel(fn, diagonal=guided == "diagonal") if guided else None
    chain = ControlledChain(fn, terms, guide_kernel)
    with torch.no_grad():
        chain.rsample((2,))
    torch.manual_seed(1)
    value = chain.rsample((2,))
    grads = torch.autograd.grad(value.square().sum(), terms._tables)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    torch.manual_seed(1)
    noise = torch.randn((fn.num_steps, 2) + fn.batch_shape + (fn.state_dim,))
    h = fn.times.diff()
    x, states = chain.x0.expand(value.shape[:-2] + (fn.state_dim,)), []
    for k in range(fn.num_steps):
        drift, scale = chain.step(k, x)
        shock = scale * noise[k] if chain.noise_type == "diagonal" else scale @ noise[k, ..., None]
        x = x + drift * h[k] + h[k].sqrt() * shock.reshape(x.shape)
        states.append(x)
    assert torch.allclose(value, torch.stack(states, -2).detach(), atol=1e-12)


def test_zero_control_without_guidance_is_the_prior():
    fn = prior("general", 2)
    zeros = torch.zeros(fn.num_steps, 2)
    net = NeuralDrift(2, out_dim=4)  # zero output layer
    chain = ControlledChain(fn, Control(net, zeros, zeros, zeros, fn.times, None))
    value = fn.sample((4,))
    assert torch.allclose(chain.log_prob(value), fn.log_prob(value), atol=1e-12)


def test_backward_filter_equals_the_reference_filter():
    torch.manual_seed(1)
    dim = 3
    problem = LinearGaussianSSM(
        B=-torch.eye(dim) + 0.2 * torch.randn(dim, dim),
        c=torch.randn(dim),
        G=torch.randn(dim, dim),
        x0=torch.randn(dim),
        times=torch.tensor([0.0, 0.2, 0.3, 0.7, 0.8, 1.2, 1.5]),
        obs_steps=torch.tensor([2, 3, 6]),
        C=torch.randn(2, dim),
        obs_scale=torch.tensor([0.3, 0.5]),
    )
    _, y = problem.simulate(0)
    H_ref, F_ref, _ = problem.backward_filter(y)
    precision = torch.zeros(problem.num_steps, dim, dim)
    information = torch.zeros(problem.num_steps, dim)
    R_inv = torch.linalg.inv(problem.R)
    for j, k in enumerate(problem.obs_steps.tolist()):
        precision[k - 1] = problem.C.T @ R_inv @ problem.C
        information[k - 1] = problem.C.T @ R_inv @ y[j]
    A, a, Q = problem.euler_transitions()
    H, F = backward_filter(A, a, Q, precision, information)
    assert torch.allclose(H, H_ref[1:], atol=1e-10)
    assert torch.allclose(F, F_ref[1:], atol=1e-10)


def diagonal_filter_problem(steps: int, batch: int, dim: int, dtype, seed: int = 0):
    """Random diagonal transitions ``(A, a, Q)`` and observation terms (some states
    unobserved) in :func:`backward_filter`'s layout, diagonals only; curvatures large
    enough that the products behind the filter span many orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(shape, generator=g, dtype=dtype)  # noqa: E731
    observed = (rand(steps, batch, 1) < 0.5).to(dtype)
    observed[-1] = 1.0
    return (
        0.9 + 0.2 * rand(steps, batch, dim),
        rand(steps, batch, dim) - 0.5,
        0.05 + rand(steps, 1, dim),
        10 * rand(steps, batch, dim) * observed,
        (rand(steps, batch, dim) - 0.5) * observed,
    )


def filter_of_diagonals(A, a, Q, precision, information):
    """The diagonal problem as independent scalar filters (``D = 1``, the coordinates
    moved into the batch), the path of the diagonal filter."""
    scalar = lambda t: t.unsqueeze(-1)  # noqa: E731
    square = lambda t: t[..., None, None]  # noqa: E731
    H, F = backward_filter(square(A), scalar(a), square(Q), square(precision), scalar(information))
    return H[..., 0, 0], F[..., 0]


def filter_of_matrices(A, a, Q, precision, information):
    """The diagonal problem through the matrix filter."""
    diag = torch.diag_embed
    H, F = backward_filter(diag(A), a, diag(Q).expand(A.shape + A.shape[-1:]), diag(precision),
                           information)  # fmt: skip
    return H.diagonal(dim1=-2, dim2=-1), F


@pytest.mark.parametrize("steps", [1, 2, 7, 100])
@pytest.mark.parametrize("batch", [2, 100])  # few scalar filters: suffix products; many: a loop
def test_the_diagonal_filter_equals_the_matrix_filter(steps, batch):
    """Independent coordinates filtered as scalars (in ``log2 N`` suffix products for
    few filters, step by step for many) equal the matrix filter, values and gradients,
    in float64."""
    inputs = [t.requires_grad_() for t in diagonal_filter_problem(steps, batch, 3, DTYPE)]
    H, F = filter_of_diagonals(*inputs)
    H_ref, F_ref = filter_of_matrices(*inputs)
    assert torch.allclose(H, H_ref, rtol=1e-11, atol=1e-12)
    assert torch.allclose(F, F_ref, rtol=1e-11, atol=1e-12)
    weights = torch.randn(H.shape, dtype=DTYPE)
    grads, grads_ref = (
        torch.autograd.grad(((h + f * f) * weights).sum(), inputs, allow_unused=True)
        for h, f in [(H, F), (H_ref, F_ref)]
    )
    for grad, reference, x in zip(grads, grads_ref, inputs, strict=True):
        grad = torch.zeros_like(x) if grad is None else grad  # with one step, A is unused
        reference = torch.zeros_like(x) if reference is None else reference
        assert torch.allclose(grad, reference, rtol=1e-9, atol=1e-10)


def test_the_diagonal_filter_stays_finite_on_a_long_chain_in_float32():
    """5000 steps, each multiplying the suffix products by up to about 11: without the
    rescaling of partial products they overflow float32."""
    inputs = diagonal_filter_problem(5000, 2, 2, torch.float32, seed=3)
    H, F = filter_of_diagonals(*inputs)
    H_ref, F_ref = filter_of_matrices(*(t.double() for t in inputs))
    assert torch.isfinite(H).all() and torch.isfinite(F).all()
    assert torch.allclose(H.double(), H_ref, rtol=1e-4, atol=1e-5)
    assert torch.allclose(F.double(), F_ref, rtol=1e-4, atol=1e-5)


def test_the_euler_loop_makes_no_host_synchronisation(monkeypatch):
    """The number of .item(), float(), int() and .tolist() calls during a simulation
    does not grow with the number of steps."""
    counts = {"n": 0}
    for name in ("item", "tolist", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            counts["n"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)

    def syncs(num_steps):
        times = torch.linspace(0.0, 1.0, num_steps + 1)
        fn = LatentDiffusion(lambda t, x: -x, 0.7, torch.zeros(4, 2), times)
        chain = ControlledChain(fn, control(fn, target=True), kernel(fn), bounds=(-3.0, 3.0))
        counts["n"] = 0
        chain.rsample()
        return counts["n"]

    assert syncs(10) == syncs(40)


def test_target_gradient_is_clipped_and_zero_where_not_finite():
    gradient = TargetGradient(
        lambda x: torch.where(x[..., 0] > 0, -(x**2).sum(-1), -torch.inf), 3.0
    )
    x = torch.tensor([[1.0, 5.0], [-1.0, 0.5]])
    assert torch.equal(gradient(x), torch.tensor([[-2.0, -3.0], [0.0, 0.0]]))


def test_a_singular_filter_step_is_nan_not_an_error():
    """I + H Q singular (curvature that cancels the noise): the filter and the tilt give
    NaN, which fit reports as a divergence, instead of raising mid-step."""
    N, D = 4, 2
    A, a = torch.eye(D).expand(N, D, D), torch.zeros(N, D)
    Q = torch.eye(D).expand(N, D, D)
    precision = torch.diag(torch.tensor([-1.0, 1.0])).expand(N, D, D)
    H, F = backward_filter(A, a, Q, precision, torch.zeros(N, D))
    assert torch.isnan(H).any()
    fn = LatentDiffusion(lambda t, x: -x, 1.0, torch.zeros(D), torch.linspace(0.0, 1.0, N + 1))
    tilted = GuidedKernel(precision.clone() * 10, torch.zeros(N, D), fn)
    assert torch.isnan(tilted._precomputed[2]).any()
