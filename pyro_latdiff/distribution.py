"""The path of an SDE on a time grid as one Pyro distribution."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor

from .sde import Diffusion, solve

__all__ = ["LatentDiffusion"]

_HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


def _shape(x) -> tuple:
    return tuple(x.shape)


def _check_times(times) -> None:
    if not isinstance(times, Tensor):
        raise TypeError(
            f"Expected `times` to be a torch.Tensor, actual type {type(times).__name__}"
        )
    if times.dim() != 1 or times.shape[0] < 2:
        raise ValueError(
            "Expected `times` to be a 1-D tensor of at least 2 points, "
            f"actual shape {_shape(times)}"
        )
    if not times.is_floating_point():
        raise ValueError(
            f"Expected `times` to be a floating point tensor, actual dtype {times.dtype}"
        )
    if not torch.isfinite(times).all():
        raise ValueError(f"Expected `times` to be finite, actual values {times.tolist()}")
    steps = times.diff()
    if not (steps > 0).all():
        k = int((steps <= 0).nonzero()[0])
        raise ValueError(
            "Expected `times` to be strictly increasing, actual "
            f"times[{k}] = {times[k].item()} >= times[{k + 1}] = {times[k + 1].item()}"
        )


def _check_x0(x0, times: Tensor) -> None:
    if not isinstance(x0, Tensor):
        raise TypeError(f"Expected `x0` to be a torch.Tensor, actual type {type(x0).__name__}")
    if x0.dim() < 1 or x0.shape[-1] < 1:
        raise ValueError(
            "Expected `x0` of shape batch_shape + (state_dim,) with state_dim >= 1, "
            f"actual shape {_shape(x0)}"
        )
    if x0.dtype != times.dtype or x0.device != times.device:
        raise ValueError(
            "Expected `x0` and `times` to share dtype and device, actual "
            f"x0: {x0.dtype} on {x0.device}, times: {times.dtype} on {times.device}"
        )
    if not torch.isfinite(x0).all():
        raise ValueError("Expected `x0` to be finite, actual tensor contains NaN or inf")


def _check_output(name: str, out, x: Tensor, positive: bool) -> torch.Size:
    """Check one probe of the drift or a callable diffusion; return its batch shape."""
    what = f"`{name}(times[0], x0)`"
    if not isinstance(out, Tensor):
        raise TypeError(f"Expected {what} to return a torch.Tensor, actual {type(out).__name__}")
    if out.dim() == 0 or out.shape[-1] != x.shape[-1]:
        raise ValueError(
            f"Expected {what} to return a tensor shaped like x, {_shape(x)} (last dimension "
            f"exactly state_dim = {x.shape[-1]}), actual shape {_shape(out)}"
        )
    try:
        shape = torch.broadcast_shapes(out.shape, x.shape)
    except RuntimeError:
        raise ValueError(
            f"Expected {what} to return a tensor shaped like x, {_shape(x)}, "
            f"actual shape {_shape(out)}"
        ) from None
    if not torch.isfinite(out).all():
        raise ValueError(f"Expected {what} to be finite, actual output contains NaN or inf")
    if positive and not (out > 0).all():
        raise ValueError(f"Expected {what} to be positive, actual minimum {out.min().item()}")
    return shape[:-1]


def _check_diffusion(diffusion, x0: Tensor) -> None:
    if isinstance(diffusion, bool) or not isinstance(diffusion, (int, float, Tensor)):
        raise TypeError(
            "Expected `diffusion` to be a positive float, a tensor of shape (..., state_dim) "
            f"or a callable diffusion(t, x), actual type {type(diffusion).__name__}"
        )
    if isinstance(diffusion, Tensor):
        if diffusion.dim() > 0 and diffusion.shape[-1] != x0.shape[-1]:
            raise ValueError(
                f"Expected `diffusion` of shape (..., {x0.shape[-1]}) (state_dim of x0), "
                f"actual shape {_shape(diffusion)}"
            )
        if diffusion.dtype != x0.dtype or diffusion.device != x0.device:
            raise ValueError(
                "Expected `diffusion` to share dtype and device with `x0`, actual "
                f"{diffusion.dtype} on {diffusion.device} (x0: {x0.dtype} on {x0.device})"
            )
        ok = torch.isfinite(diffusion).all() and (diffusion > 0).all()
    else:
        ok = math.isfinite(diffusion) and diffusion > 0
    if not ok:
        raise ValueError(f"Expected `diffusion` to be positive and finite, actual {diffusion}")


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
        _check_times(times)
        _check_x0(x0, times)
        if not callable(diffusion):
            _check_diffusion(diffusion, x0)
        if not callable(drift):
            raise TypeError(
                f"Expected `drift` to be a callable drift(t, x), actual type {type(drift).__name__}"
            )
        t0 = times[0]
        batch_shape = _check_output("drift", drift(t0, x0), x0, positive=False)
        if callable(diffusion):
            shape = _check_output("diffusion", diffusion(t0, x0), x0, positive=True)
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
        shape = self._extended_shape(sample_shape)[:-2]
        x0 = self.x0.expand(shape + self.x0.shape[-1:])
        return solve(self.drift, self.diffusion, x0, self.times)

    def _scale(self, t: Tensor, x: Tensor, sqrt_steps: Tensor) -> Tensor:
        if callable(self.diffusion):
            return self.diffusion(t, x) * sqrt_steps
        return torch.as_tensor(self.diffusion, dtype=x.dtype, device=x.device) * sqrt_steps

    def log_prob(self, value: Tensor) -> Tensor:
        if value.dim() < 2 or value.shape[-2:] != self.event_shape:
            raise ValueError(
                f"Expected `value` of shape (..., {self.num_steps}, {self.state_dim}) "
                f"(num_steps, state_dim), actual shape {_shape(value)}"
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
