"""The path of an SDE on a time grid as one Pyro distribution."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor

from ._validation import check_diffusion, check_output, check_times, check_x0, shape_of
from .sde import Diffusion, _solve

__all__ = ["LatentDiffusion"]

_HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


class LatentDiffusion(TorchDistribution):
    r"""The Euler–Maruyama path of an SDE on a time grid, as one Pyro sample site.

    .. math::

        x_{k+1} = x_k + b(t_k, x_k)\, h_k + \sigma(t_k, x_k) \sqrt{h_k}\, \xi_k,
        \qquad \xi_k \sim \mathcal{N}(0, I),\quad h_k = t_{k+1} - t_k,

    for ``k = 0, ..., N - 1``, from ``x_0 = x0`` on ``times = (t_0, ..., t_N)``. The
    value is the path ``(x_1, ..., x_N)``; its density is the product of the Gaussian
    transitions, so :meth:`log_prob` is exact and evaluated on all steps at once.
    :meth:`rsample` simulates the chain with torchsde and is reparameterised.

    **Shapes.** ``event_shape = (N, D)`` (time left of state, as in
    :class:`~pyro.distributions.GaussianHMM`). ``batch_shape`` is the leading shape of
    ``x0`` broadcast with that of a tensor ``diffusion`` and with what the drift returns
    on ``x0``; so a drift that closes over a batched global parameter (``theta`` of shape
    ``(P, 1, 1)`` under vectorised particles and a plate) gets the right batch shape.
    The drift sees ``x`` of shape ``sample_shape + batch_shape + (D,)`` with ``t`` 0-d
    while simulating, and ``(N,) + sample_shape + batch_shape + (D,)`` with ``t`` of
    shape ``(N, 1, ..., 1)`` in :meth:`log_prob`: the time axis is leftmost, so the same
    broadcasting serves both.

    Example::

        def model(y):
            theta = pyro.sample("theta", dist.LogNormal(0.0, 0.5))
            path = pyro.sample(
                "path",
                LatentDiffusion(lambda t, x: -theta * x, 1.0, torch.zeros(1),
                                torch.linspace(0, 1, 51)),
            )
            pyro.sample("y", dist.Normal(path[..., -1, :], 0.1).to_event(1), obs=y)

    :param callable drift: ``drift(t, x)``, a callable or ``nn.Module`` returning a
        tensor shaped like ``x``.
    :param diffusion: positive float, positive tensor of shape ``(..., D)`` (diagonal),
        or callable ``diffusion(t, x)`` returning a positive tensor shaped like ``x``.
    :param torch.Tensor x0: initial state, shape ``batch_shape + (D,)``.
    :param torch.Tensor times: 1-D strictly increasing grid of ``N + 1 >= 2`` points,
        uniform or not, with the dtype and device of ``x0``.

    References: Tzen & Raginsky (2019), *Neural stochastic differential equations: deep
    latent Gaussian models in the diffusion limit*.
    """

    arg_constraints = {"x0": constraints.real_vector}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(
        self,
        drift: Callable[[Tensor, Tensor], Tensor],
        diffusion: Diffusion,
        x0: Tensor,
        times: Tensor,
        *,
        validate_args: bool | None = None,
    ):
        check_times(times)
        check_x0(x0, times)
        if not callable(diffusion):
            check_diffusion(diffusion, x0)
        if not callable(drift):
            raise TypeError(
                f"Expected `drift` to be a callable drift(t, x), actual type {type(drift).__name__}"
            )
        t0 = times[0]
        batch_shape = check_output("drift", drift(t0, x0), x0, positive=False)
        if callable(diffusion):
            shape = check_output("diffusion", diffusion(t0, x0), x0, positive=True)
            batch_shape = torch.broadcast_shapes(batch_shape, shape)
        elif isinstance(diffusion, Tensor):
            batch_shape = torch.broadcast_shapes(batch_shape, diffusion.shape[:-1])
        self.drift = drift
        self.diffusion = diffusion
        self.x0 = x0.expand(batch_shape + x0.shape[-1:])
        self.times = times
        event_shape = torch.Size((times.shape[0] - 1, x0.shape[-1]))
        super().__init__(batch_shape, event_shape, validate_args=validate_args)

    @property
    def num_steps(self) -> int:
        """Number of Euler steps ``N``."""
        return self.event_shape[0]

    @property
    def state_dim(self) -> int:
        """State dimension ``D``."""
        return self.event_shape[1]

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(LatentDiffusion, _instance)
        batch_shape = torch.Size(batch_shape)
        new.drift = self.drift
        new.diffusion = self.diffusion
        new.x0 = self.x0.expand(batch_shape + self.x0.shape[-1:])
        new.times = self.times
        super(LatentDiffusion, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        try:
            sample_shape = torch.Size(sample_shape)
        except TypeError:
            raise TypeError(
                f"Expected `sample_shape` to be a tuple of ints, actual {sample_shape!r}"
            ) from None
        if any(size < 0 for size in sample_shape):
            raise ValueError(f"Expected `sample_shape` of sizes >= 0, actual {sample_shape}")
        shape = self._extended_shape(sample_shape)[:-2]
        x0 = self.x0.expand(shape + self.x0.shape[-1:])
        return _solve(self.drift, self.diffusion, x0, self.times)

    def _scale(self, t: Tensor, x: Tensor, sqrt_steps: Tensor) -> Tensor:
        if callable(self.diffusion):
            return self.diffusion(t, x) * sqrt_steps
        return torch.as_tensor(self.diffusion, dtype=x.dtype, device=x.device) * sqrt_steps

    def log_prob(self, value: Tensor) -> Tensor:
        if not isinstance(value, Tensor):
            raise TypeError(f"Expected `value` to be a torch.Tensor, actual {type(value).__name__}")
        if value.dim() < 2 or value.shape[-2:] != self.event_shape:
            raise ValueError(
                f"Expected `value` of shape (..., {self.num_steps}, {self.state_dim}) "
                f"(num_steps, state_dim), actual shape {shape_of(value)}"
            )
        if self._validate_args:
            self._validate_sample(value)
        batch = torch.broadcast_shapes(value.shape[:-2], self.batch_shape)
        value = value.expand(batch + self.event_shape)
        x0 = self.x0.expand(batch + self.x0.shape[-1:])
        # Time axis leftmost: (N,) + sample_shape + batch_shape + (D,).
        value = value.movedim(-2, 0)
        previous = torch.cat([x0.unsqueeze(0), value[:-1]], dim=0)
        steps = self.times.diff().reshape((-1,) + (1,) * (value.dim() - 1))
        t = self.times[:-1].reshape(steps.shape)
        mean = previous + self.drift(t, previous) * steps
        scale = self._scale(t, previous, steps.sqrt())
        z = (value - mean) / scale
        log_density = -0.5 * z.square() - scale.log() - _HALF_LOG_TWO_PI
        return log_density.sum(-1).sum(0)
