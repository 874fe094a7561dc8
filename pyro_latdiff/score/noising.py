r"""The forward noising chain from the data, in the reverse model's time order."""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor

from .._validation import check_times, shape_of

__all__ = ["ForwardNoising"]

_HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


class ForwardNoising(TorchDistribution):
    r"""The forward chain of a linear process from the data, on the grid ``times``
    :math:`0 \le t_0 < t_1 < \dots < t_N`, with exact Gaussian transitions:

    .. math::

        x_{t_0} = x, \qquad
        x_{t_{k+1}} \mid x_{t_k} \sim \mathcal N\big(a_k x_{t_k}, \sigma_k^2 I\big),
        \quad (a_k, \sigma_k) = \text{process.transition\_coefs}(t_k, t_{k+1}).

    The value lists the states **in the reverse model's time order** (model time
    :math:`u = T - t`): ``value[..., j, :]`` is :math:`x_{t_{N - j}}`, so
    ``value[..., 0, :]`` is the noise :math:`x_{t_N}` and ``value[..., -1, :]`` is
    :math:`x_{t_1}`, the state just before the data. Its density is the product of the
    forward transitions; :meth:`rsample` draws all steps at once (a cumulative sum of
    the rescaled increments) and is reparameterised.

    **Shapes.** ``x`` has shape ``batch_shape + (D,)``; ``event_shape = (N, D)``.

    :param process: a scalar-coefficient linear process (``transition_coefs``).
    :param torch.Tensor x: the data, ``batch_shape + (D,)``.
    :param torch.Tensor times: the forward grid, 1-D increasing, ``N + 1 >= 2`` points.
    """

    arg_constraints = {"x": constraints.real_vector}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(self, process, x: Tensor, times: Tensor, *, validate_args=None):
        check_times(times)
        if not isinstance(x, Tensor) or x.dim() < 1:
            raise ValueError(
                "Expected `x` of shape batch_shape + (state_dim,), actual "
                f"{shape_of(x) if isinstance(x, Tensor) else type(x).__name__}"
            )
        self.process = process
        self.x = x
        self.times = times
        scale, std = process.transition_coefs(times[:-1], times[1:])
        self._scale = scale.to(x.dtype)  # (N,)
        self._std = std.to(x.dtype)
        # Marginal mean scales a(t_0, t_k) for k = 0..N, as cumulative products.
        self._cum = torch.cat([torch.ones_like(self._scale[:1]), self._scale.cumprod(0)])
        event_shape = torch.Size((times.shape[0] - 1, x.shape[-1]))
        super().__init__(x.shape[:-1], event_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ForwardNoising, _instance)
        batch_shape = torch.Size(batch_shape)
        new.process, new.times = self.process, self.times
        new._scale, new._std, new._cum = self._scale, self._std, self._cum
        new.x = self.x.expand(batch_shape + self.x.shape[-1:])
        super(ForwardNoising, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        shape = self._extended_shape(sample_shape)  # sample + batch + (N, D)
        noise = torch.randn(shape, dtype=self.x.dtype, device=self.x.device)
        cum = self._cum[1:, None]  # (N, 1)
        # x_{t_k} = a(t_0, t_k) (x + sum_{j < k} sigma_j xi_j / a(t_0, t_{j + 1})).
        increments = (self._std[:, None] / cum) * noise
        forward = cum * (self.x.unsqueeze(-2) + increments.cumsum(-2))
        return forward.flip(-2)

    def log_prob(self, value: Tensor) -> Tensor:
        if not isinstance(value, Tensor) or value.dim() < 2 or value.shape[-2:] != self.event_shape:
            raise ValueError(
                f"Expected `value` of shape (..., {self.event_shape[0]}, {self.event_shape[1]}) "
                f"(num_steps, state_dim), actual "
                f"{shape_of(value) if isinstance(value, Tensor) else type(value).__name__}"
            )
        if self._validate_args:
            self._validate_sample(value)
        forward = value.flip(-2)  # x_{t_1}, ..., x_{t_N}
        x = self.x.expand(torch.broadcast_shapes(value.shape[:-2], self.batch_shape) + (-1,))
        before = forward[..., :-1, :].expand(x.shape[:-1] + (-1, -1))
        previous = torch.cat([x.unsqueeze(-2), before], -2)
        std = self._std[:, None]
        z = (forward - self._scale[:, None] * previous) / std
        log_density = -0.5 * z.square() - std.log() - _HALF_LOG_TWO_PI
        return log_density.sum((-1, -2))

    @property
    def mean(self) -> Tensor:
        return (self._cum[1:, None] * self.x.unsqueeze(-2)).flip(-2)
