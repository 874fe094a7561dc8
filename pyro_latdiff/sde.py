"""Euler–Maruyama chains on a user's time grid: simulation through torchsde, by step index.

An Euler chain is given by its *coefficients*: a function ``step(k, x) -> (drift,
scale)`` for the transition from ``x_k = x`` at ``t_k`` to ``t_{k+1}``, ``k`` the step
index (an ``int``),

    x_{k+1} = x_k + drift h_k + scale sqrt(h_k) xi_k,    xi_k ~ N(0, I_M),

where ``scale`` is shaped like ``x`` (``"diagonal"`` noise, ``M = D``) or is a
``(..., D, M)`` matrix (``"general"`` noise, torchsde's name), or a lower-triangular
``(..., D, D)`` Cholesky factor (``"triangular"``, the library's guided chains: the
density uses it as it is).

torchsde steps with a fixed ``dt`` from ``ts[0]`` and interpolates at the output
times, so a non-uniform grid is not stepped exactly. We therefore integrate in
*index time* ``s = 0, 1, ..., N`` with ``dt = 1``: step ``k`` of the index-time SDE

    dX = drift_k(X) h_k ds + scale_k(X) sqrt(h_k) dW_s

is exactly the Euler step of the user's SDE from ``t_k`` to ``t_{k+1}``, on any grid,
and ``s`` itself is the step index. The solver takes the steps in order, one call of
the coefficients each, so the adapter counts them: ``k`` is a Python ``int``, found
without reading ``s`` back from the device, and per-step tables are read as rows
split off once per solve (``table.unbind(0)``), not looked up at every step (a lookup
is a few tensor operations a step, and its backward pass writes into a grid-sized
zero tensor at every step). torchsde's default Brownian motion (``BrownianInterval``)
costs far more than the arithmetic of a solve (see benchmarks/README.md);
:class:`GridBrownian` instead serves increments drawn once on the grid. In blocks
the backward pass draws each block's increments again, from the generator's state
saved in the forward pass, so no path-sized increments are kept between the two.

:func:`transition_log_prob` is the one place where the density of Euler transitions
is written, for every chain in the package.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from functools import partial

import torch
import torchsde
from torch import Tensor

from ._shapes import broadcast_shapes
from ._validation import (
    call_probe,
    check_diffusion,
    check_noise_type,
    check_output,
    check_times,
    check_x0,
)
from .checkpoint import checkpoint_block

__all__ = [
    "GridBrownian",
    "NOISE_TYPES",
    "SingularNoiseError",
    "constant_diffusion",
    "gaussian_log_prob_tril",
    "simulate",
    "solve",
    "transition_log_prob",
]

Diffusion = float | Tensor | Callable[[Tensor, Tensor], Tensor]


class SingularNoiseError(RuntimeError):
    """A general noise covariance ``sigma sigma^T h`` that is singular (or not finite)
    at some step, so the Euler transition has no density there. A ``RuntimeError``
    whose message says "singular", like torch's own ``LinAlgError``: Pyro's HMC and
    NUTS treat it as a rejected (divergent) proposal instead of ending the run (a
    ``ValueError`` would reach them wrapped by Pyro's trace as a plain one)."""


Step = Callable[[int, Tensor], tuple[Tensor, Tensor]]

#: Noise types and the number of trailing dimensions of their scale.
NOISE_TYPES = {"diagonal": 1, "general": 2, "triangular": 2}
#: steps of increments drawn at a time (:class:`_GridNormal`): a block drawn again in
#: the backward pass draws at most two chunks more than its own steps
DRAW_STEPS = 128
#: The noise type torchsde is told: a lower-triangular ``(D, D)`` scale (the library's
#: own guided chains) is simulated as general noise; only its density differs.
_TORCHSDE_NOISE = {"diagonal": "diagonal", "general": "general", "triangular": "general"}

_HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


def constant_diffusion(diffusion, like: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """``diffusion`` as a function ``(t, x) -> Tensor``: itself if callable, else the
    constant (a float or tensor) with the dtype and device of ``like``."""
    if callable(diffusion):
        return diffusion
    value = torch.as_tensor(diffusion, dtype=like.dtype, device=like.device)

    def constant(t: Tensor, x: Tensor) -> Tensor:
        return value

    return constant


class GridBrownian(torchsde.BaseBrownian):
    """A Brownian motion in index time, built from given increments.

    ``W(k + 1) - W(k) = noise[k]``. torchsde's Euler solver with ``dt = 1`` asks only
    for these increments, one step after the other, so they are served in order
    from step :attr:`next_step` (:meth:`start_solve` sets it to a solve's first step;
    0 at construction), as rows split off once, without reading the solver's tensor
    times back. :func:`simulate` passes the increments of the user's Brownian motion on
    the grid, ``sqrt(h_k) xi_k``: the motion read in index time.

    :param torch.Tensor noise: the increments, shape ``(N, batch, M)``.
    :param callable redraw: optional: ``redraw(start, stop)`` returns the increments
        of the steps ``start .. stop - 1`` again (drawn from a generator's saved state).
        Then :meth:`release` lets them all go, and each later solve draws its own steps
        again.
    """

    __slots__ = ("_noise", "_rows", "_first", "_redraw", "_size", "_dtype", "_device")
    __slots__ += ("next_step", "served")

    def __init__(self, noise: Tensor, redraw: Callable[[int, int], Tensor] | None = None):
        if not isinstance(noise, Tensor) or noise.dim() != 3:
            raise ValueError(
                "Expected `noise` of shape (N, batch, M), actual "
                f"{tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__}"
            )
        self._noise: Tensor | None = noise
        #: the rows served, of the steps from ``_first`` on
        self._rows: tuple[Tensor, ...] = noise.unbind(0)
        self._first = 0
        self._redraw = redraw
        self._size, self._dtype, self._device = noise.shape, noise.dtype, noise.device
        #: the step whose increment the solver asks for next
        self.next_step = 0
        #: the increment last served to the solver's loop (see ``_IndexTimeSDE``)
        self.served: Tensor | None = None

    @property
    def noise(self) -> Tensor:
        """The increments, ``(N, batch, M)`` (drawn again if released)."""
        if self._noise is None:
            self._noise = self._drawn_again(0, self._size[0])
            self._rows, self._first = self._noise.unbind(0), 0
        return self._noise

    def release(self) -> None:
        """Let the increments go (needs ``redraw``): a later solve draws its own again."""
        if self._redraw is None:
            raise RuntimeError("GridBrownian.release: expected a `redraw` to draw them again")
        self._noise, self._rows, self.served = None, (), None

    def start_solve(self, start: int, stop: int) -> None:
        """Serve the steps ``start .. stop - 1`` next, drawn again if released."""
        if self._noise is None and not (
            self._first <= start and stop <= self._first + len(self._rows)
        ):
            self._rows, self._first = self._drawn_again(start, stop).unbind(0), start
        self.next_step = start

    def _drawn_again(self, start: int, stop: int) -> Tensor:
        noise = self._redraw(start, stop)
        expected = (stop - start,) + tuple(self._size[1:])
        if tuple(noise.shape) != expected:
            raise RuntimeError(
                f"GridBrownian: expected `redraw` to return increments of shape {expected}, "
                f"actual {tuple(noise.shape)}"
            )
        return noise

    def __call__(self, ta, tb=None, return_U=False, return_A=False):
        if tb is None or return_U or return_A:
            raise ValueError("GridBrownian serves increments W(tb) - W(ta) only")
        if not isinstance(ta, Tensor):  # a caller outside torchsde's loop
            a, b = round(ta), round(tb)
            return self.noise[a:b].sum(0)
        row = self.next_step - self._first
        if not 0 <= row < len(self._rows):
            raise RuntimeError(
                f"GridBrownian: expected a step in {self._first} .. "
                f"{self._first + len(self._rows) - 1}, actual step {self.next_step} (call "
                "start_solve with a solve's steps)"
            )
        self.served = self._rows[row]
        self.next_step += 1
        return self.served

    def __repr__(self) -> str:
        return f"GridBrownian(num_steps={self._size[0]}, shape={tuple(self.shape)})"

    @property
    def dtype(self):
        return self._dtype

    @property
    def device(self):
        return self._device

    @property
    def shape(self):
        return self._size[1:]

    @property
    def levy_area_approximation(self):
        return "none"


class _IndexTimeSDE:
    """One solve of an Euler chain in index time, for torchsde (Itô).

    torchsde sees ``y`` flattened to ``(batch, D)``; ``step`` sees the state with its
    full ``shape`` restored and the step index ``k``, counted from the solve's first
    step ``first`` (torchsde's Euler solver calls :meth:`f_and_g_prod` once per step,
    in order). One call of ``step`` per Euler step gives both the drift and the scale,
    which are applied to the increments of the user's Brownian motion
    (:class:`GridBrownian` in index time): ``g dW = scale sqrt(h_k) xi_k``.

    :attr:`states` collects the states the solver steps from (see :func:`_integrate`).
    """

    sde_type = "ito"

    def __init__(
        self,
        step: Step,
        steps: Tensor,
        first: int,
        shape: torch.Size,
        noise_type: str,
        brownian: GridBrownian,
    ):
        self.step = step
        self.shape = shape
        self.noise_type = _TORCHSDE_NOISE[noise_type]
        self._steps = steps.unbind(0)  # h_k of the solve's steps
        self._first = first
        self._general = self.noise_type == "general"
        self._flat = len(shape) == 2  # torchsde's (batch, D) is the state's own shape
        self.states: list[Tensor] = []
        #: the Brownian motion of the solve: a call with an increment it did not serve is
        #: torchsde's shape check before the solve, answered without evaluating the step
        self.brownian = brownian

    def f_and_g_prod(self, s: Tensor, y: Tensor, v: Tensor):
        if v is not self.brownian.served:
            return y, y  # torchsde reads only the shapes: (batch, D) both
        i = len(self.states)
        self.states.append(y)
        x = y if self._flat else y.view(self.shape)
        drift, scale = self.step(self._first + i, x)
        if self._general:
            noise = (v if self._flat else v.view(self.shape[:-1] + v.shape[-1:])).unsqueeze(-1)
            g_prod = (scale @ noise).squeeze(-1)
        else:
            g_prod = scale * (v if self._flat else v.view(self.shape))
        f = drift * self._steps[i]
        if f.shape != self.shape:
            f = f.expand(self.shape)
        if self._flat:
            return f, g_prod
        return f.reshape(y.shape), g_prod.reshape(y.shape)


def simulate(
    step: Step,
    x0: Tensor,
    times: Tensor,
    noise: Tensor | None = None,
    noise_type: str = "diagonal",
    noise_dim: int | None = None,
    block_size: int | None = None,
    window: Callable[[slice], Step] | None = None,
) -> Tensor:
    """Simulate an Euler chain given by its coefficients ``step(k, x)`` with torchsde.

    No argument checks: callers have checked them (see :func:`solve`).

    :param callable step: ``step(k, x) -> (drift, scale)``, ``k`` the step index.
    :param torch.Tensor x0: initial states, shape ``batch_shape + (D,)``.
    :param torch.Tensor times: the grid ``t_0 < ... < t_N``.
    :param torch.Tensor noise: optional standard normal increments, shape
        ``(N,) + batch_shape + (M,)``.
    :param str noise_type: ``"diagonal"``, ``"general"`` or ``"triangular"``.
    :param int noise_dim: ``M`` (general noise only; ``D`` by default).
    :param int block_size: integrate in blocks of this many steps, each a checkpointed
        block (:func:`~pyro_latdiff.checkpoint.checkpoint_block`) when gradients are on:
        the backward pass recomputes each block from its first state and the fixed
        increments, so memory does not grow with ``N``.
    :param callable window: ``window(steps)`` gives the coefficients to use for the
        steps ``steps`` (a ``slice``) of one solve: of one block, or of the whole grid.
        Made inside the block, so that what they precompute for it (rows of per-step
        tables) is recomputed too; ``step`` for every solve if omitted.
    :returns: the states at ``times[1:]``, shape ``batch_shape + (N, D)``.
    :rtype: torch.Tensor
    """
    num_steps = times.shape[0] - 1
    shape = x0.shape
    noise_dim = shape[-1] if noise_dim is None else noise_dim
    steps = times.diff()
    root_steps = steps.sqrt().reshape((-1,) + (1,) * len(shape))
    flat = x0.reshape(-1, shape[-1])
    blocked = block_size is not None and block_size < num_steps
    if noise is None:  # drawn here: scaled in place, one path-sized tensor
        starts = range(0, num_steps, block_size) if blocked else ()
        drawn = _GridNormal((num_steps, flat.shape[0], noise_dim), root_steps, x0, starts)
        bm = GridBrownian(drawn.draw(), drawn.rows if blocked else None)
    else:
        bm = GridBrownian((noise * root_steps).reshape(num_steps, flat.shape[0], noise_dim))
    index_times = torch.arange(num_steps + 1, dtype=x0.dtype, device=x0.device)

    def solve_steps(y: Tensor, start: int, stop: int) -> Tensor:
        coefficients = step if window is None else window(slice(start, stop))
        sde = _IndexTimeSDE(coefficients, steps[start:stop], start, shape, noise_type, bm)
        return _integrate(sde, y, index_times[start : stop + 1])

    if not blocked:
        ys = solve_steps(flat, 0, num_steps)
    else:
        blocks, y = [], flat
        for start in range(0, num_steps, block_size):
            stop = min(start + block_size, num_steps)
            blocks.append(checkpoint_block(partial(solve_steps, start=start, stop=stop), y))
            y = blocks[-1][-1]
        ys = torch.cat(blocks)
        if noise is None:
            # Not kept to the backward pass, where the path's gradients peak: each block
            # recomputed draws its own again, the same numbers.
            bm.release()
    return ys.reshape((num_steps,) + shape).movedim(0, -2)


class _GridNormal:
    """The increments ``sqrt(h_k) xi_k`` of a grid, ``xi`` standard normal from the
    default generator, drawn in chunks of :data:`DRAW_STEPS` steps. The generator's
    state is saved before the chunks where steps of ``starts`` fall, so the rows from
    such a step on can be drawn again (:meth:`rows`, after :meth:`draw`) without the
    others.

    A chunk's numbers are those of one draw over the whole grid when each chunk holds a
    multiple of 16 numbers (CPU generators fill 16 at a time; a last chunk of fewer than
    16 is drawn with the one before), so the chunks keep the numbers of earlier versions
    on CPU.
    """

    def __init__(self, size: tuple[int, ...], root_steps: Tensor, like: Tensor, starts=()):
        num_steps, per_step = size[0], math.prod(size[1:])
        bounds = list(range(0, num_steps, DRAW_STEPS)) + [num_steps]
        if len(bounds) > 2 and (num_steps - bounds[-2]) * per_step < 16:
            del bounds[-2]
        self._bounds, self._size = bounds, size
        self._root_steps = root_steps.reshape(-1, 1, 1)
        self._dtype, self._device = like.dtype, like.device
        self._wanted = {bisect_right(bounds, start) - 1 for start in starts}
        self._states: dict[int, Tensor] = {}

    def draw(self) -> Tensor:
        """The increments of every step, ``size``; saves the generator's states."""
        bounds = self._bounds
        noise = torch.empty(self._size, dtype=self._dtype, device=self._device)
        for chunk in range(len(bounds) - 1):
            if chunk in self._wanted:
                self._states[chunk] = _rng_state(self._device)
            noise[bounds[chunk] : bounds[chunk + 1]].normal_()
        return noise.mul_(self._root_steps)

    def rows(self, start: int, stop: int) -> Tensor:
        """The increments of the steps ``start .. stop - 1`` drawn again (``start`` one
        of ``starts``), leaving the generator as it is."""
        bounds = self._bounds
        first, last = bisect_right(bounds, start) - 1, bisect_left(bounds, stop)
        if first not in self._states:
            raise RuntimeError(f"_GridNormal: no saved state for step {start}")
        noise = torch.empty(
            (bounds[last] - bounds[first],) + self._size[1:], dtype=self._dtype, device=self._device
        )
        devices = [] if self._device.type == "cpu" else [self._device]
        with torch.random.fork_rng(devices, device_type=self._device.type if devices else "cuda"):
            _set_rng_state(self._device, self._states[first])
            for chunk in range(first, last):
                noise[bounds[chunk] - bounds[first] : bounds[chunk + 1] - bounds[first]].normal_()
        offset = bounds[first]
        rows = noise[start - offset : stop - offset]
        return rows.mul_(self._root_steps[start:stop])


def _rng_state(device: torch.device) -> Tensor:
    """The state of the default generator of ``device``."""
    if device.type == "cpu":
        return torch.get_rng_state()
    return torch.get_device_module(device.type).get_rng_state(device)


def _set_rng_state(device: torch.device, state: Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.get_device_module(device.type).set_rng_state(state, device)


def _integrate(sde: _IndexTimeSDE, y0: Tensor, index_times: Tensor) -> Tensor:
    """torchsde's Euler solve on ``index_times`` (``dt = 1``); the states after ``y0``.

    torchsde is asked for the last state only and the states in between are those it
    steps from: asked for every state, it would interpolate each one from the two
    around it (``0 * y_k + 1 * y_{k+1}``, three autograd nodes per step for nothing).
    Before solving, torchsde calls ``f_and_g_prod`` once at ``y0`` to check shapes
    (with an increment of its own): that call is answered with ``y0`` itself, without
    evaluating the chain's coefficients, and only the solver's ``N`` calls are steps.
    """
    num_steps = index_times.shape[0] - 1
    bm = sde.brownian
    bm.start_solve(sde._first, sde._first + num_steps)
    ends = index_times[[0, -1]]
    # torchsde's shape check draws a normal increment from the default generator; put
    # the generator back, so that a solve draws nothing (blocks and the backward
    # pass's recomputation then leave the random stream as one solve does).
    rng = _rng_state(y0.device)
    try:
        last = torchsde.sdeint(sde, y0, ends, bm=bm, method="euler", dt=1.0)[-1]
        _set_rng_state(y0.device, rng)
        states = sde.states
    finally:
        # torchsde's wrapper of the SDE keeps its own bound methods, a reference cycle
        # that outlives the solve until Python's cyclic collector runs: cut the link
        # from it to the chain (its tables and their autograd graph) and the states.
        sde.step = sde.states = sde.brownian = bm.served = None
    if len(states) != num_steps:
        raise RuntimeError(
            f"Expected torchsde's Euler solver to take {num_steps} steps, actual "
            f"{len(states)} calls of f_and_g_prod"
        )
    return torch.stack(states[1:] + [last])


def transition_log_prob(
    value: Tensor,
    previous: Tensor,
    drift: Tensor,
    scale: Tensor,
    steps: Tensor,
    noise_type: str,
    first_step: int = 0,
) -> Tensor:
    """Log-density of Euler transitions, all steps at once, summed over time and state.

    Time is the leftmost axis of every argument: ``value`` and ``previous`` are
    ``(N,) + batch + (D,)``, ``steps`` is ``(N, 1, ..., 1)``; ``drift`` broadcasts
    with ``value``; ``scale`` is shaped like ``value`` (diagonal), ``(..., D, M)``
    (general: the covariance ``scale scale^T h`` must be positive definite) or a
    lower-triangular ``(..., D, D)`` factor with a positive diagonal (triangular).

    A diagonal ``scale`` enters through its square only, as in the transition (a
    diffusion such as ``0.8 * x`` is negative where an Euler path crossed zero).
    ``first_step`` is the grid index of the first of these steps (for the message).

    :returns: ``sum_k log N(value_k; previous_k + drift_k h_k, Sigma_k)``, shape ``batch``.
    :raises SingularNoiseError: if a general noise covariance is singular, naming the
        step.
    """
    residual = value - previous - drift * steps
    if noise_type == "diagonal":
        scale = scale * steps.sqrt()
        log_density = -0.5 * (residual / scale).square() - scale.abs().log() - _HALF_LOG_TWO_PI
        return log_density.sum(-1).sum(0)
    if noise_type == "triangular":
        return gaussian_log_prob_tril(residual, scale * steps.sqrt().unsqueeze(-1)).sum(0)
    covariance = (scale @ scale.transpose(-1, -2)) * steps.unsqueeze(-1)
    tril, info = torch.linalg.cholesky_ex(covariance)
    if (info > 0).any():
        k = first_step + int(torch.nonzero(info.reshape(info.shape[0], -1) > 0)[0, 0])
        raise SingularNoiseError(
            "Expected the noise covariance diffusion(t, x) diffusion(t, x)^T h to be positive "
            f"definite at every step, actual singular (or not finite) at step k = {k}"
        )
    return gaussian_log_prob_tril(residual, tril).sum(0)


def gaussian_log_prob_tril(residual: Tensor, tril: Tensor) -> Tensor:
    """``log N(residual; 0, L L^T)`` for lower-triangular ``L``, over the last axis."""
    batch = broadcast_shapes(residual.shape[:-1], tril.shape[:-2])
    dim = residual.shape[-1]
    residual = residual.expand(batch + (dim,)).unsqueeze(-1)
    tril = tril.expand(batch + (dim, dim))
    z = torch.linalg.solve_triangular(tril, residual, upper=False).squeeze(-1)
    half_log_det = tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return -0.5 * z.square().sum(-1) - half_log_det - z.shape[-1] * _HALF_LOG_TWO_PI


def solve(
    drift: Callable[[Tensor, Tensor], Tensor],
    diffusion: Diffusion,
    x0: Tensor,
    times: Tensor,
    noise: Tensor | None = None,
    *,
    noise_type: str = "diagonal",
) -> Tensor:
    r"""Simulate the Euler–Maruyama chain of an SDE on ``times`` with torchsde.

    .. math::

        x_{k+1} = x_k + b(t_k, x_k) h_k + \sigma(t_k, x_k) \sqrt{h_k}\, \xi_k,
        \qquad \xi_k \sim \mathcal{N}(0, I).

    :param callable drift: ``drift(t, x)`` with ``t`` a 0-d tensor and ``x`` of
        shape ``x0.shape``; returns a tensor of that shape.
    :param diffusion: positive float, tensor broadcastable to ``x0``, or callable
        ``diffusion(t, x)`` (diagonal noise); with ``noise_type="general"`` a tensor
        or callable of shape ``(..., D, M)``.
    :param torch.Tensor x0: initial states, shape ``batch_shape + (D,)``.
    :param torch.Tensor times: 1-D increasing grid ``t_0 < ... < t_N``.
    :param torch.Tensor noise: optional standard normal increments ``xi``, shape
        ``(N,) + batch_shape + (M,)``; drawn with ``torch.randn`` if omitted.
    :param str noise_type: ``"diagonal"`` (default) or ``"general"``.
    :returns: the states at ``times[1:]``, shape ``batch_shape + (N, D)``.
    :rtype: torch.Tensor
    """
    check_times(times)
    check_x0(x0, times)
    check_noise_type(noise_type)
    if not callable(drift):
        raise TypeError(f"Expected `drift` to be callable, actual {type(drift).__name__}")
    general = noise_type == "general"
    if callable(diffusion):
        probe = call_probe("diffusion", diffusion, times[0], x0)
        check_output("diffusion", probe, x0, positive=not general, matrix=general)
    else:
        check_diffusion(diffusion, x0, matrix=general)
        probe = torch.as_tensor(diffusion)
    check_output("drift", call_probe("drift", drift, times[0], x0), x0, positive=False)
    noise_dim = probe.shape[-1] if general else x0.shape[-1]
    expected = (times.shape[0] - 1,) + tuple(x0.shape[:-1]) + (noise_dim,)
    if noise is not None and (
        not isinstance(noise, Tensor) or tuple(noise.shape) != expected or noise.dtype != x0.dtype
    ):
        raise ValueError(
            f"Expected `noise` of shape {expected} and dtype {x0.dtype}, actual "
            f"{tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__}"
        )
    diffusion_fn = constant_diffusion(diffusion, x0)

    def step(k: int, x: Tensor):
        t = times[k]
        return drift(t, x), diffusion_fn(t, x)

    return simulate(step, x0, times, noise, noise_type, noise_dim)
