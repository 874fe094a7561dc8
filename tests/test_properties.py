"""Property-based tests: shapes, dtypes and finiteness over random configurations."""

import pyro
import pyro.distributions as dist
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_latdiff import DiffusionGuide, LatentDiffusion, log_evidence

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)


@st.composite
def grids(draw, dtype):
    num_steps = draw(st.integers(1, 6))
    if draw(st.booleans()):
        return torch.linspace(0.0, draw(st.floats(0.1, 3.0)), num_steps + 1, dtype=dtype)
    steps = draw(st.lists(st.floats(0.01, 0.5), min_size=num_steps, max_size=num_steps))
    start = draw(st.floats(-1.0, 1.0))
    return start + torch.cat([torch.zeros(1), torch.tensor(steps).cumsum(0)]).to(dtype)


def diffusions(kind, state_dim, dtype):
    if kind == "float":
        return 0.7
    if kind == "tensor":
        return torch.linspace(0.5, 1.5, state_dim, dtype=dtype)
    return lambda t, x: 0.5 + torch.sigmoid(x) * (1 + t.abs())


@st.composite
def configurations(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    state_dim = draw(st.integers(1, 3))
    batch_shape = draw(shapes)
    times = draw(grids(dtype))
    kind = draw(st.sampled_from(["float", "tensor", "callable"]))
    size = state_dim * int(torch.Size(batch_shape).numel())
    values = draw(st.lists(st.floats(-2.0, 2.0), min_size=size, max_size=size))
    x0 = torch.tensor(values, dtype=dtype).reshape(batch_shape + (state_dim,))
    return dtype, x0, times, diffusions(kind, state_dim, dtype), draw(shapes)


def drift(t, x):
    return torch.sin(x) - 0.5 * x * (1 + t)


@SETTINGS
@given(configurations())
def test_sample_log_prob_expand_shapes(config):
    dtype, x0, times, diffusion, sample_shape = config
    d = LatentDiffusion(drift, diffusion, x0, times)
    num_steps, state_dim = times.shape[0] - 1, x0.shape[-1]
    assert d.batch_shape == x0.shape[:-1] and d.event_shape == (num_steps, state_dim)
    path = d.rsample(sample_shape)
    assert path.shape == sample_shape + x0.shape[:-1] + (num_steps, state_dim)
    assert path.dtype == dtype and path.device == x0.device
    log_p = d.log_prob(path)
    assert log_p.shape == sample_shape + x0.shape[:-1] and log_p.dtype == dtype
    assert torch.isfinite(path).all() and torch.isfinite(log_p).all()
    expanded = d.expand((2,) + d.batch_shape)
    assert expanded.sample().shape == (2,) + d.batch_shape + d.event_shape
    # Expanding does not change the density of a path.
    single = d.sample()
    expected = d.log_prob(single).expand(expanded.batch_shape)
    assert torch.allclose(expanded.log_prob(single), expected, rtol=1e-6, atol=1e-5)


@st.composite
def plated_models(draw):
    num_series = draw(st.integers(1, 4))
    state_dim = draw(st.integers(1, 2))
    times = draw(grids(torch.float64))
    with_theta = draw(st.booleans())

    def model(y):
        rate = pyro.sample("theta", dist.LogNormal(0.0, 0.3)).unsqueeze(-1) if with_theta else 1.0
        with pyro.plate("series", num_series):
            x0 = torch.zeros(num_series, state_dim, dtype=torch.float64)
            path = pyro.sample("path", LatentDiffusion(lambda t, x: -rate * x, 1.0, x0, times))
            pyro.sample("y", dist.Normal(path[..., -1, :], 0.5).to_event(1), obs=y)

    y = torch.tensor(
        draw(
            st.lists(
                st.floats(-2.0, 2.0),
                min_size=num_series * state_dim,
                max_size=num_series * state_dim,
            )
        ),
        dtype=torch.float64,
    ).reshape(num_series, state_dim)
    return model, y, times.shape[0] - 1, draw(st.integers(1, 5))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plated_models())
def test_guide_samples_and_log_evidence(case):
    model, y, num_steps, num_samples = case
    pyro.clear_param_store()
    guide = DiffusionGuide(model)
    values = guide(y)
    assert values["path"].shape == y.shape[:1] + (num_steps, y.shape[-1])
    assert values["path"].dtype == torch.float64
    estimate = log_evidence(model, guide, y, num_samples=num_samples)
    assert estimate.shape == () and torch.isfinite(estimate)
    assert estimate.log_weights.shape == (num_samples,)
