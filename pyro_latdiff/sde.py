"""Euler–Maruyama simulation on a user's time grid, through torchsde.

torchsde steps with a fixed ``dt`` from ``ts[0]`` and interpolates at the output
times, so a non-uniform grid is not stepped exactly. We therefore integrate in
*index time* ``s = 0, 1, ..., N`` with ``dt = 1``: step ``k`` of the index-time SDE

    dX = b(t_k, X) h_k ds + sigma(t_k, X) sqrt(h_k) dW_s

is exactly the Euler step of the user's SDE from ``t_k`` to ``t_{k+1}``, on any grid.

torchsde's default Brownian motion (``BrownianInterval``) costs about 30 times the
arithmetic of a 100-step solve; :class:`GridBrownian` instead serves increments
drawn once on the grid.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchsde
from torch import Tensor

from ._validation import check_diffusion, check_output, check_times, check_x0

__all__ = ["GridBrownian", "solve"]

Diffusion = float | Tensor | Callable[[Tensor, Tensor], Tensor]


class GridBrownian(torchsde.BaseBrownian):
    """A Brownian motion in index time, built from given standard normal increments.

    ``W(k + 1) - W(k) = noise[k]``; torchsde's Euler solver with ``dt = 1`` asks
    only for these unit increments.

    :param torch.Tensor noise: standard normal increments, shape ``(N, batch, D)``.
    """

    __slots__ = ("_noise",)

    def __init__(self, noise: Tensor):
        if not isinstance(noise, Tensor) or noise.dim() != 3:
            raise ValueError(
                "Expected `noise` of shape (N, batch, D), actual "
                f"{tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__}"
            )
        self._noise = noise

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        if tb is None or return_U or return_A:
            raise ValueError("GridBrownian serves increments W(tb) - W(ta) only")
        a, b = round(float(ta)), round(float(tb))
        if b == a + 1:
            return self._noise[a]
        return self._noise[a:b].sum(0)

    def __repr__(self) -> str:
        return f"GridBrownian(num_steps={self._noise.shape[0]}, shape={tuple(self.shape)})"

    @property
    def dtype(self):
        return self._noise.dtype

    @property
    def device(self):
        return self._noise.device

    @property
    def shape(self):
        return self._noise.shape[1:]

    @property
    def levy_area_approximation(self):
        return "none"


class _IndexTimeSDE:
    """The user's SDE rewritten in index time for torchsde (diagonal Itô noise).

    torchsde sees ``y`` flattened to ``(batch, D)``; the user's drift and diffusion
    see the state with its full ``shape`` restored and ``t`` as a 0-d tensor.
    """

    noise_type = "diagonal"
    sde_type = "ito"

    def __init__(self, drift, diffusion, times: Tensor, shape: torch.Size):
        self.drift = drift
        self.diffusion = diffusion
        self.times = times
        self.shape = shape
        steps = times.diff()
        self.steps = steps.tolist()
        self.sqrt_steps = steps.sqrt()
        self.constant_scale = None
        if not callable(diffusion):
            # (N, D) or broadcastable: sigma * sqrt(h_k) for every step at once.
            sigma = torch.as_tensor(diffusion, dtype=times.dtype, device=times.device)
            self.constant_scale = sigma * self.sqrt_steps.reshape((-1,) + (1,) * sigma.dim())

    def f_and_g_prod(self, s: Tensor, y: Tensor, v: Tensor):
        k = round(float(s))
        t = self.times[k]
        x = y.view(self.shape)
        b = self.drift(t, x)
        if self.constant_scale is None:
            g_prod = self.diffusion(t, x) * self.sqrt_steps[k] * v.view(self.shape)
        else:
            g_prod = self.constant_scale[k] * v.view(self.shape)
        return (b * self.steps[k]).reshape(y.shape), g_prod.reshape(y.shape)


def _solve(drift, diffusion, x0: Tensor, times: Tensor, noise: Tensor | None = None) -> Tensor:
    """:func:`solve` without argument checks (callers have checked them)."""
    num_steps = times.shape[0] - 1
    shape = x0.shape
    if noise is None:
        noise = torch.randn((num_steps,) + shape, dtype=x0.dtype, device=x0.device)
    flat = x0.reshape(-1, shape[-1])
    sde = _IndexTimeSDE(drift, diffusion, times, shape)
    index_times = torch.arange(num_steps + 1, dtype=x0.dtype, device=x0.device)
    bm = GridBrownian(noise.reshape(num_steps, flat.shape[0], shape[-1]))
    ys = torchsde.sdeint(sde, flat, index_times, bm=bm, method="euler", dt=1.0)
    return ys[1:].reshape((num_steps,) + shape).movedim(0, -2)


def solve(
    drift: Callable[[Tensor, Tensor], Tensor],
    diffusion: Diffusion,
    x0: Tensor,
    times: Tensor,
    noise: Tensor | None = None,
) -> Tensor:
    r"""Simulate the Euler–Maruyama chain of an SDE on ``times`` with torchsde.

    .. math::

        x_{k+1} = x_k + b(t_k, x_k) h_k + \sigma(t_k, x_k) \sqrt{h_k}\, \xi_k,
        \qquad \xi_k \sim \mathcal{N}(0, I).

    :param callable drift: ``drift(t, x)`` with ``t`` a 0-d tensor and ``x`` of
        shape ``x0.shape``; returns a tensor of that shape.
    :param diffusion: positive float, tensor broadcastable to ``x0``, or callable
        ``diffusion(t, x)`` (diagonal noise).
    :param torch.Tensor x0: initial states, shape ``batch_shape + (D,)``.
    :param torch.Tensor times: 1-D increasing grid ``t_0 < ... < t_N``.
    :param torch.Tensor noise: optional standard normal increments ``xi``, shape
        ``(N,) + x0.shape``; drawn with ``torch.randn`` if omitted.
    :returns: the states at ``times[1:]``, shape ``batch_shape + (N, D)``.
    :rtype: torch.Tensor
    """
    check_times(times)
    check_x0(x0, times)
    if not callable(drift):
        raise TypeError(f"Expected `drift` to be callable, actual {type(drift).__name__}")
    if callable(diffusion):
        check_output("diffusion", diffusion(times[0], x0), x0, positive=True)
    else:
        check_diffusion(diffusion, x0)
    check_output("drift", drift(times[0], x0), x0, positive=False)
    expected = (times.shape[0] - 1,) + tuple(x0.shape)
    if noise is not None and (
        not isinstance(noise, Tensor) or tuple(noise.shape) != expected or noise.dtype != x0.dtype
    ):
        raise ValueError(
            f"Expected `noise` of shape {expected} and dtype {x0.dtype}, actual "
            f"{tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__}"
        )
    return _solve(drift, diffusion, x0, times, noise)
