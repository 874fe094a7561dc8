import pytest
import torch

from pyro_latdiff import NeuralDrift


def perturbed(net):
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return net


def test_output_is_zero_at_initialisation():
    for hidden_dims in [(), (16,), (16, 8)]:
        net = NeuralDrift(3, context_dim=2, hidden_dims=hidden_dims)
        out = net(torch.tensor(0.4), torch.randn(5, 3), torch.randn(5, 2))
        assert out.shape == (5, 3) and torch.equal(out, torch.zeros(5, 3))


def test_time_leftmost_layout_equals_one_call_per_time():
    """The log_prob layout (t of shape (N, 1, ..., 1)) agrees with simulation calls."""
    net = perturbed(NeuralDrift(2, context_dim=1, out_dim=4, hidden_dims=(8,)))
    times = torch.linspace(0.0, 1.0, 6)
    x = torch.randn(6, 3, 5, 2)  # (N, particles, series, D)
    context = torch.randn(5, 1)
    together = net(times.reshape(-1, 1, 1, 1), x, context)
    one_by_one = torch.stack([net(t, x[k], context) for k, t in enumerate(times)])
    assert together.shape == (6, 3, 5, 4)
    assert torch.allclose(together, one_by_one, atol=1e-6)


def test_split_first_layer_equals_a_layer_on_the_concatenated_input():
    net = perturbed(NeuralDrift(2, context_dim=3, hidden_dims=(8,), num_frequencies=2))
    t, x, c = torch.tensor(0.7), torch.randn(4, 2), torch.randn(4, 3)
    weight = torch.cat([net.input_x.weight, net.input_time.weight, net.input_context.weight], 1)
    inputs = torch.cat([x, net.time_features(t).expand(4, 4), c], -1)
    hidden = inputs @ weight.T + net.input_x.bias
    assert torch.allclose(net(t, x, c), net.hidden(hidden), atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(state_dim=0), "`state_dim`"),
        (dict(state_dim=2, context_dim=-1), "`context_dim`"),
        (dict(state_dim=2, hidden_dims=(4, 0)), r"`hidden_dims\[i\]`"),
        (dict(state_dim=2, num_frequencies=1.5), "`num_frequencies`"),
        (dict(state_dim=2, time_span=(1.0, 1.0)), "`time_span`"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NeuralDrift(**kwargs)


def test_missing_context_is_named():
    net = NeuralDrift(2, context_dim=1)
    with pytest.raises(ValueError, match="`context`"):
        net(torch.tensor(0.0), torch.zeros(2))


def test_on_grid_equals_one_call_per_time():
    net = perturbed(NeuralDrift(2, context_dim=3, out_dim=4, hidden_dims=(8,)))
    times = torch.linspace(0.0, 1.0, 5)
    context = torch.randn(6, 3)
    step = net.on_grid(times, context)
    for k, t in enumerate(times):
        x = torch.randn(4, 6, 2)
        assert torch.allclose(step(k, x), net(t, x, context), atol=1e-6)
