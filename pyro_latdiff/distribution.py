"""The path of an SDE on a time grid as one Pyro distribution."""

from __future__ import annotations

from collections.abc import Callable

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import Tensor

from ._shapes import broadcast_shapes
from ._validation import (
    call_probe,
    check_diffusion,
    check_noise_type,
    check_output,
    check_positive_int,
    check_times,
    check_x0,
    shape_of,
)
from .checkpoint import checkpoint_block
from .sde import NOISE_TYPES, Diffusion, constant_diffusion, simulate, transition_log_prob

__all__ = ["ALL_STEPS", "EulerChain", "LatentDiffusion", "latent_diffusion_of"]

#: The ``steps`` of :meth:`EulerChain.path_coefficients` that mean every step.
ALL_STEPS = slice(None)

#: Without gradients, :meth:`EulerChain.log_prob` scores at most about this many
#: states (steps x batch) at once: all steps of a large batch at once make every
#: intermediate of the network a fresh allocation of steps x batch x width, which is
#: slower than a few steps at a time (``benchmarks/scoring.py``: ``log_evidence`` of
#: 1000 draws of 100 series x 50 steps 1.8x faster in blocks).
SCORING_BLOCK_STATES = 1 << 16


class EulerChain(TorchDistribution):
    r"""A Markov chain of Gaussian Euler transitions on a grid, as one distribution.

    Subclasses give the coefficients of step ``k`` in two forms that must agree:
    :meth:`step` ``(k, x)`` for simulation (``k`` the step index, an ``int``, ``x`` of
    shape ``sample_shape + batch_shape + (D,)``) and :meth:`path_coefficients` for all steps
    at once (time axis leftmost). Both return ``(drift, scale)`` with
    ``x_{k+1} = x_k + drift h_k + scale sqrt(h_k) xi_k``; ``scale`` is shaped like
    ``x`` (diagonal noise) or ``(..., D, M)`` (general noise). This base class writes
    :meth:`rsample`, :meth:`log_prob` and :meth:`expand` once for every chain.
    Subclasses set ``x0``, ``times``, ``noise_type`` and ``noise_dim`` and call
    :meth:`_init_chain`.
    """

    arg_constraints = {"x0": constraints.real_vector}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    x0: Tensor
    times: Tensor
    noise_type: str
    noise_dim: int
    #: Steps per checkpointed block (``None``: none). With it, :meth:`rsample` and
    #: :meth:`log_prob` run one block of steps at a time, recorded for the backward pass
    #: as one node that recomputes the block
    #: (:func:`~pyro_latdiff.checkpoint.checkpoint_block`), so memory does not grow
    #: with ``N``. Without gradients, :meth:`log_prob` runs in blocks of at most
    #: ``SCORING_BLOCK_STATES`` states even when this is ``None`` (nothing is recorded).
    block_size: int | None = None

    def _init_chain(self, batch_shape: torch.Size, validate_args) -> None:
        self.x0 = self.x0.expand(batch_shape + self.x0.shape[-1:])
        event_shape = torch.Size((self.times.shape[0] - 1, self.x0.shape[-1]))
        TorchDistribution.__init__(self, batch_shape, event_shape, validate_args=validate_args)

    @property
    def num_steps(self) -> int:
        """Number of Euler steps ``N``."""
        return self.event_shape[0]

    @property
    def state_dim(self) -> int:
        """State dimension ``D``."""
        return self.event_shape[1]

    def step(self, k: int, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(drift, scale)`` of step ``k`` at states ``x``."""
        raise NotImplementedError

    def path_coefficients(
        self, t: Tensor, previous: Tensor, steps: slice = ALL_STEPS
    ) -> tuple[Tensor, Tensor]:
        """``(drift, scale)`` of the steps ``steps`` (all by default) at once:
        ``previous`` is ``(K,) + batch + (D,)`` (the states ``x_k`` at those steps),
        ``t`` is ``times[steps]`` shaped ``(K, 1, ..., 1)``."""
        raise NotImplementedError

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(type(self), _instance)
        new.__dict__.update(self.__dict__)
        new._init_chain(torch.Size(batch_shape), validate_args=False)
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
        return simulate(
            self.step, x0, self.times, None, self.noise_type, self.noise_dim, self.block_size,
            lambda steps: self.window(steps).step,
        )  # fmt: skip

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
        batch = broadcast_shapes(value.shape[:-2], self.batch_shape)
        value = value.expand(batch + self.event_shape)
        x0 = self.x0.expand(batch + self.x0.shape[-1:])
        # Time axis leftmost: (N,) + sample_shape + batch_shape + (D,).
        value = value.movedim(-2, 0)
        steps = self.times.diff().reshape((-1,) + (1,) * (value.dim() - 1))
        t = self.times[:-1].reshape(steps.shape)
        size = self.block_size
        if size is None and not torch.is_grad_enabled():
            size = max(1, SCORING_BLOCK_STATES // max(1, batch.numel()))
        if size is None or size >= self.num_steps:
            previous = torch.cat([x0.unsqueeze(0), value[:-1]], dim=0)
            return self._log_prob_of_steps(value, previous, t, steps, ALL_STEPS)
        total, before = 0.0, x0
        # split, not indexing: the backward pass joins the blocks' gradients once
        starts = range(0, self.num_steps, size)
        pieces = zip(starts, value.split(size), t.split(size), steps.split(size), strict=True)
        for start, value_k, t_k, steps_k in pieces:
            window = slice(start, start + value_k.shape[0])

            def block(value, before, t=t_k, steps=steps_k, window=window):
                # the block's states before each step and its chain are made inside the
                # block: recomputed in the backward pass, not kept
                previous = torch.cat([before.unsqueeze(0), value[:-1]], dim=0)
                return self.window(window)._log_prob_of_steps(value, previous, t, steps, window)

            total = total + checkpoint_block(block, value_k, before)
            before = value_k[-1]
        return total

    def window(self, steps: slice) -> EulerChain:
        """The chain to use for the steps ``steps`` (a ``slice`` of the grid's) of one
        solve or scored block: ``self``, unless the chain precomputes per-step tables,
        which it then makes for those steps only (see :attr:`block_size`); the copy's
        :meth:`step` may keep rows of its tables for the solve (it is made inside the
        solve, with the solve's gradient mode)."""
        return self

    def _log_prob_of_steps(self, value, previous, t, steps, window: slice) -> Tensor:
        drift, scale = self.path_coefficients(t, previous, window)
        first = window.start or 0
        return transition_log_prob(value, previous, drift, scale, steps, self.noise_type, first)


class LatentDiffusion(EulerChain):
    r"""The Euler–Maruyama path of an SDE on a time grid, as one Pyro sample site.

    .. math::

        x_{k+1} = x_k + b(t_k, x_k)\, h_k + \sigma(t_k, x_k) \sqrt{h_k}\, \xi_k,
        \qquad \xi_k \sim \mathcal{N}(0, I),\quad h_k = t_{k+1} - t_k,

    for ``k = 0, ..., N - 1``, from ``x_0 = x0`` on ``times = (t_0, ..., t_N)``. The
    value is the path ``(x_1, ..., x_N)``; its density is the product of the Gaussian
    transitions, so :meth:`log_prob` is exact and evaluated on all steps at once.
    :meth:`rsample` simulates the chain with torchsde and is reparameterised.

    **Noise.** With ``noise_type="diagonal"`` (default) ``sigma`` is shaped like
    ``x`` and ``xi`` has ``D`` components. With ``noise_type="general"`` (torchsde's
    name) ``sigma`` is a ``(..., D, M)`` matrix driven by ``M`` Brownian motions; the
    transition covariance is ``sigma sigma^T h``, factorised by Cholesky in
    :meth:`log_prob` (a singular one is an error naming the step).

    **Shapes.** ``event_shape = (N, D)`` (time left of state, as in
    :class:`~pyro.distributions.GaussianHMM`). ``batch_shape`` is the leading shape of
    ``x0`` broadcast with that of a tensor ``diffusion`` and with what the drift returns
    on ``x0``; so a drift that closes over a batched global parameter (``theta`` of shape
    ``(P, 1, 1)`` under vectorised particles and a plate) gets the right batch shape.
    The drift sees ``x`` of shape ``sample_shape + batch_shape + (D,)`` with ``t`` 0-d
    while simulating, and ``(N,) + sample_shape + batch_shape + (D,)`` with ``t`` of
    shape ``(N, 1, ..., 1)`` in :meth:`log_prob`: the time axis is leftmost, so the same
    broadcasting serves both. A vector of ``t`` is ``t * w`` (``w`` of shape ``(D,)``), a
    matrix ``t[..., None] * m``: a matrix of ``t`` alone (``m * (1 + t)``) would line the
    time axis up with the batch.

    **Checks.** The arguments' contract (types, shapes, grid, dtype and device) is
    checked once, at construction, by probing the drift and a callable diffusion on
    ``x0``, at one step and at every step at once (a time axis of a size no other axis
    has, so a misplaced one shows whatever ``N``). Values are not a contract: a drift
    that is not finite (say, for an extreme parameter value proposed by NUTS) makes
    :meth:`log_prob` non-finite, so inference can reject it, as with Pyro's own
    distributions.

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
        or callable ``diffusion(t, x)`` returning a positive tensor shaped like ``x``;
        with general noise, a tensor or callable of shape ``(..., D, M)``.
    :param torch.Tensor x0: initial state, shape ``batch_shape + (D,)``.
    :param torch.Tensor times: 1-D strictly increasing grid of ``N + 1 >= 2`` points,
        uniform or not, with the dtype and device of ``x0``.
    :param str noise_type: ``"diagonal"`` (default) or ``"general"``.
    :param int block_size: memory flat in the number of steps: :meth:`rsample` and
        :meth:`log_prob` run in checkpointed blocks of this many steps (same values and
        gradients; a :class:`~pyro_latdiff.DiffusionGuide` of the model takes it too).
    :param bool validate_args: as for every Pyro distribution.

    References: Tzen & Raginsky (2019), *Neural stochastic differential equations: deep
    latent Gaussian models in the diffusion limit*.
    """

    def __init__(
        self,
        drift: Callable[[Tensor, Tensor], Tensor],
        diffusion: Diffusion,
        x0: Tensor,
        times: Tensor,
        *,
        noise_type: str = "diagonal",
        block_size: int | None = None,
        validate_args: bool | None = None,
    ):
        check_times(times)
        if block_size is not None:
            check_positive_int("block_size", block_size)
        check_x0(x0, times)
        check_noise_type(noise_type)
        general = noise_type == "general"
        if not callable(diffusion):
            check_diffusion(diffusion, x0, matrix=general)
        if not callable(drift):
            raise TypeError(
                f"Expected `drift` to be a callable drift(t, x), actual type {type(drift).__name__}"
            )
        t0 = times[0]
        batch_shape = check_output("drift", call_probe("drift", drift, t0, x0), x0, positive=False)
        event_dims = NOISE_TYPES[noise_type]
        if callable(diffusion):
            probe = call_probe("diffusion", diffusion, t0, x0)
            shape = check_output("diffusion", probe, x0, positive=not general, matrix=general)
            batch_shape = _broadcast_batch("diffusion", batch_shape, shape)
        else:
            probe = torch.as_tensor(diffusion)
            if isinstance(diffusion, Tensor):
                batch_shape = _broadcast_batch(
                    "diffusion", batch_shape, diffusion.shape[:-event_dims]
                )
        self.drift = drift
        self.diffusion = diffusion
        self.noise_type = noise_type
        self.noise_dim = probe.shape[-1] if general else x0.shape[-1]
        _probe_time_axis(
            drift, diffusion if callable(diffusion) else None, x0, t0, batch_shape, self.noise_dim,
            general,
        )  # fmt: skip
        self._diffusion_fn = constant_diffusion(diffusion, x0)
        self.x0 = x0
        self.times = times
        self.block_size = block_size
        self._init_chain(batch_shape, validate_args)

    def step(self, k: int, x: Tensor) -> tuple[Tensor, Tensor]:
        t = self.times[k]
        return self.drift(t, x), self._diffusion_fn(t, x)

    def path_coefficients(
        self, t: Tensor, previous: Tensor, steps: slice = ALL_STEPS
    ) -> tuple[Tensor, Tensor]:
        try:
            drift, scale = self.drift(t, previous), self._diffusion_fn(t, previous)
        except (RuntimeError, TypeError, ValueError) as error:
            raise ValueError(
                f"Expected `drift(t, x)` and `diffusion(t, x)` to take all steps at once in "
                f"log_prob: t of shape {tuple(t.shape)} and x of shape {tuple(previous.shape)} "
                "(time leftmost); use tensor operations of t (torch.cos(t), t * x), not "
                f"float(t) or math functions of it, actual it fails: {error}"
            ) from error
        # The construction probe sees a 0-d t; here t is (K, 1, ..., 1) and a drift that
        # broadcasts it against x (e.g. a matrix built as t.shape + (D, D)) would grow
        # the log-density's shape and sum a wrong value.
        _check_broadcasts_to("drift", drift, previous.shape)
        if self.noise_type == "diagonal":
            _check_broadcasts_to("diffusion", scale, previous.shape)
        else:  # a (..., D, M) matrix per state
            _check_broadcasts_to("diffusion", scale, previous.shape, self.noise_dim)
        return drift, scale

    def diffusion_at(self, t: Tensor, x: Tensor) -> Tensor:
        """``sigma(t, x)`` whether ``diffusion`` is a constant or a callable."""
        return self._diffusion_fn(t, x)


def _broadcast_batch(name: str, batch_shape: torch.Size, shape: torch.Size) -> torch.Size:
    """The batch shape of x0 and the drift broadcast with ``name``'s, or one error."""
    try:
        return broadcast_shapes(batch_shape, shape)
    except ValueError:
        raise ValueError(
            f"Expected `{name}` to have a batch shape that broadcasts with {tuple(batch_shape)} "
            f"(the batch shape of x0 and the drift), actual {tuple(shape)}"
        ) from None


def _check_broadcasts_to(
    name: str, value: Tensor, states: torch.Size, columns: int | None = None
) -> None:
    """``value``, returned by ``name`` on ``states`` (time leftmost), broadcasts to them
    (or, with ``columns``, to a ``(D, columns)`` matrix per state) without growing."""
    shape = states if columns is None else states + (columns,)
    if not isinstance(value, Tensor) or value.dim() > len(shape):
        ok = False
    else:
        ok = all(a in (1, b) for a, b in zip(value.shape[::-1], shape[::-1], strict=False))
    if not ok:
        what = "the states" if columns is None else "a (D, M) matrix per state"
        raise ValueError(
            f"Expected `{name}(t, x)` to return a value that broadcasts to {what}, shape "
            f"{tuple(shape)}, for x of shape {tuple(states)} and t of shape "
            f"{(states[0],) + (1,) * (len(states) - 1)} (every step at once, time leftmost, "
            "as log_prob calls it), actual "
            f"{tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__}: "
            f"{_TIME_LAYOUT}"
        )


#: How to write a function of ``t`` that serves both layouts (one step, all steps).
_TIME_LAYOUT = (
    "t has the rank of the states, 1 for each size but the time axis, so a tensor built "
    "from t alone has t's shape: build a vector as t * w (w of shape (D,)), a matrix as "
    "t[..., None] * m (m of shape (D, D), or (D, M) for general noise)"
)


def _probe_time_axis(drift, diffusion, x0, t0, batch_shape, noise_dim, general) -> None:
    """:meth:`EulerChain.log_prob` calls the drift and a callable diffusion on all
    steps at once, time leftmost: probe that layout at construction too, with ``K``
    copies of the state at ``t0``. ``K`` is a size no other axis has, so a time axis
    that a function lines up with another axis (say, a matrix built from ``t`` that
    pairs step ``k`` with series ``k``) changes the shape and shows, whatever ``N``."""
    state_dim = x0.shape[-1]
    taken = set(batch_shape) | {state_dim, noise_dim}
    size = next(k for k in range(2, len(taken) + 3) if k not in taken)
    x = x0.expand(batch_shape + (state_dim,)).expand((size,) + batch_shape + (state_dim,))
    t = t0.expand(size).reshape((size,) + (1,) * (len(batch_shape) + 1))
    functions = [("drift", drift, None)]
    if diffusion is not None:
        functions.append(("diffusion", diffusion, noise_dim if general else None))
    for name, fn, columns in functions:
        try:
            out = fn(t, x)
        except (RuntimeError, TypeError, ValueError, IndexError) as error:
            raise ValueError(
                f"Expected `{name}(t, x)` to take every step at once, as log_prob calls it: t "
                f"of shape {tuple(t.shape)} and x of shape {tuple(x.shape)} (time leftmost); "
                "use tensor operations of t (torch.cos(t), t * x), not float(t) or math "
                f"functions of it; {_TIME_LAYOUT}; actual it fails: {error}"
            ) from error
        _check_broadcasts_to(name, out, x.shape, columns)


def latent_diffusion_of(fn) -> LatentDiffusion | None:
    """The :class:`LatentDiffusion` under Pyro's wrappers (mask, independent, expand)."""
    while fn is not None and not isinstance(fn, LatentDiffusion):
        fn = getattr(fn, "base_dist", None)
    return fn
