r"""The guide's controlled chain: the interface every guided capability builds on.

A path site's guide is a controlled Euler chain on the model's grid. Its transition at
step ``k`` is Gaussian, with mean ``x + u_k(x) h_k`` and scale ``s_k(x) sqrt(h_k)``:

.. math::

    u_k(x) = \bar b_k(x) + S_k(x)\, c_k(x), \qquad
    s_k(x) = \operatorname{diag}(e^{\lambda_k(x)})\, S_k(x),

where

- :math:`(\bar b_k, S_k)` is the *base kernel*: the model's own drift and noise scale
  at ``(t_k, x)`` (re-evaluated with the guide's values of upstream latents), or, with
  guidance, that kernel tilted by the backward filter's h-function of the next state
  (:class:`~pyro_latdiff.filter.GuidedKernel`: exact posterior chain for a
  linear-Gaussian model observed at any steps);
- :math:`c_k` is the control, a sum of named terms (:class:`Control`): the learned
  network ``c(t, x, context)``, per-step terms ``linear_gain_k * x + offset_k``, and,
  for samplers, a target-aware term ``target_gain_k * clip(grad log pi(x))`` at the
  current state (Zhang & Chen 2022);
- :math:`\lambda_k` is the learned log-scale correction, network plus
  ``log_scale_k``, which the exact discrete posterior needs when an observation is
  sharp.

With ``S`` diagonal (shaped like ``x``) the shift is ``S * c``; with a matrix ``S``
(general noise) it is ``S c`` (the guided kernel's Cholesky factor) or
``sigma sigma^T c`` (the model's ``(D, M)`` noise matrix without guidance).
Everything learned starts at zero, so an untrained guide is the base kernel.

Every term is evaluated **by step index**: :meth:`ControlledChain.step` ``(k, x)``
for simulation (``k`` the step index, an ``int``; the torchsde adapter of
:mod:`pyro_latdiff.sde` calls it once per Euler step through ``f_and_g_prod``, on the
chain's :meth:`~ControlledChain.window` for the solve, which splits the rows of its
per-step tables off once) and
:meth:`ControlledChain.path_coefficients` for all steps at once in ``log_prob``. No
identity caches, no lookups of a step by float time, no host synchronisation in the
loop. A new term of ``c`` is a callable pair ``(step(k, x), path(t, previous))``
added to :class:`Control`; a new base kernel is an object with ``step`` and ``path``
as :class:`~pyro_latdiff.filter.GuidedKernel`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
from pyro.distributions import TorchDistribution, constraints
from pyro.nn import PyroModule, PyroParam
from torch import Tensor

from ._shapes import broadcast_shapes
from .distribution import ALL_STEPS, EulerChain, LatentDiffusion
from .drift import NeuralDrift
from .filter import GuidedKernel

__all__ = ["ChainParameters", "Control", "ControlledChain", "PathDerivative", "TargetGradient"]


class ChainParameters(PyroModule):
    """The learned parts of one path site's guide chain, registered the Pyro way
    (names from the module tree).

    :param int num_steps: ``N``.
    :param int state_dim: ``D``.
    :param int context_dim: width of the context (0 for none).
    :param tuple time_span: ``(t_0, t_N)`` for the network's time features.
    :param hidden_dims: hidden widths of the network.
    :param int num_frequencies: Fourier time frequencies of the network.
    :param bool target: add the per-step gain of a target-aware term.
    :param torch.Tensor like: a tensor with the dtype and device to use.
    """

    def __init__(
        self,
        num_steps: int,
        state_dim: int,
        context_dim: int,
        time_span: tuple[float, float],
        hidden_dims: Sequence[int],
        num_frequencies: int,
        target: bool,
        like: Tensor,
    ):
        super().__init__()
        self.net = NeuralDrift(
            state_dim,
            context_dim=context_dim,
            out_dim=2 * state_dim,
            hidden_dims=hidden_dims,
            num_frequencies=num_frequencies,
            time_span=time_span,
        ).to(dtype=like.dtype, device=like.device)
        zeros = torch.zeros(num_steps, state_dim, dtype=like.dtype, device=like.device)
        self.linear_gain = PyroParam(zeros.clone())
        self.offset = PyroParam(zeros.clone())
        self.log_scale = PyroParam(zeros.clone())
        if target:
            self.target_gain = PyroParam(zeros.clone())


class TargetGradient:
    """``clip(grad log pi(x))`` at the current state: the target-aware term of a
    sampler's control (path-integral sampler, Zhang & Chen 2022), usable with any
    model whose observation is a target density of the terminal state.

    Non-finite gradients (a target that is ``-inf`` or NaN somewhere) count as zero.

    :param callable log_target: ``log_target(x)``, batch shape ``x.shape[:-1]``.
    :param float clip: gradients are clipped to ``[-clip, clip]``.
    """

    def __init__(self, log_target: Callable[[Tensor], Tensor], clip: float = 1e2):
        self.log_target = log_target
        self.clip = clip

    def __call__(self, x: Tensor) -> Tensor:
        create_graph = torch.is_grad_enabled() and x.requires_grad
        with torch.enable_grad():
            inputs = x if create_graph else x.detach().requires_grad_()
            log_target = self.log_target(inputs)
            (grad,) = torch.autograd.grad(
                log_target.sum(), inputs, create_graph=create_graph, allow_unused=True
            )
        if grad is None:
            return torch.zeros_like(x)
        grad = torch.nan_to_num(grad, nan=0.0, posinf=self.clip, neginf=-self.clip)
        return grad.clamp(-self.clip, self.clip)


class Control:
    """The control ``c_k(x)`` and log-scale correction ``lambda_k(x)`` of a chain, as
    the sum of named terms, by step index or on the whole path.

    :param callable net: ``net(t, x, context)`` with ``2 D`` outputs (control, log-scale);
        a :class:`~pyro_latdiff.NeuralDrift` is evaluated through its
        :meth:`~pyro_latdiff.NeuralDrift.on_grid` form while simulating.
    :param torch.Tensor linear_gain: ``(N, D)``.
    :param torch.Tensor offset: ``(N, D)``.
    :param torch.Tensor log_scale: ``(N, D)``.
    :param torch.Tensor times: the grid.
    :param torch.Tensor context: ``batch + (C,)`` or ``None``.
    :param TargetGradient target: optional target-aware term.
    :param torch.Tensor target_gain: ``(N, D)``, with ``target``.
    """

    def __init__(
        self,
        net: Callable,
        linear_gain: Tensor,
        offset: Tensor,
        log_scale: Tensor,
        times: Tensor,
        context: Tensor | None,
        target: TargetGradient | None = None,
        target_gain: Tensor | None = None,
    ):
        self.net = net
        self.context = context
        self.target = target
        self._times = times[:-1]
        self._tables = [linear_gain, offset, log_scale] + ([] if target is None else [target_gain])
        #: the steps of the solve this is the window of (see :meth:`window`), or None
        self._steps: slice | None = None
        self._step_fn = None

    def _stepper(self, steps: slice):
        """``step(k, x) -> (network output, (table[k], ...))`` for the steps ``steps``,
        the rows of the time inputs and tables split off once."""
        first = steps.start or 0
        tables = [table[steps] for table in self._tables]
        if isinstance(self.net, NeuralDrift):
            on_grid = self.net.on_grid(self._times[steps], self.context, tables)
            return lambda k, x: on_grid(k - first, x)
        times = self._times[steps].unbind(0)
        rows = list(zip(*(table.unbind(0) for table in tables), strict=True))  # per step

        def step(k: int, x: Tensor):
            i = k - first
            return self.net(times[i], x, self.context), rows[i]

        return step

    def window(self, steps: slice) -> Control:
        """The same control, for the steps ``steps`` of one solve (or scored block):
        :meth:`step` splits their rows off at its first call."""
        new = copy.copy(self)
        new._steps, new._step_fn = steps, None
        return new

    def step(self, k: int, x: Tensor) -> tuple[Tensor, Tensor]:
        if self._steps is None:  # not the window of a solve: this step on its own
            out, tables = self._stepper(slice(k, k + 1))(k, x)
        else:
            if self._step_fn is None:  # at the first step (a scored chain never needs it)
                self._step_fn = self._stepper(self._steps)
            out, tables = self._step_fn(k, x)
        control, log_scale = out.chunk(2, dim=-1)
        linear_gain, offset, step_log_scale, *target_gain = tables
        control = control + linear_gain * x + offset
        if self.target is not None:
            control = control + target_gain[0] * self.target(x)
        return control, log_scale + step_log_scale

    def path(self, t: Tensor, previous: Tensor, steps: slice = ALL_STEPS) -> tuple[Tensor, Tensor]:
        """The steps ``steps`` at once, time leftmost: ``previous`` is
        ``(K,) + batch + (D,)``."""
        shape = (-1,) + (1,) * (previous.dim() - 2) + previous.shape[-1:]
        control, log_scale = self.net(t, previous, self.context).chunk(2, dim=-1)
        linear_gain, offset, step_log_scale, *target_gain = (
            table[steps].reshape(shape) for table in self._tables
        )
        control = control + linear_gain * previous + offset
        if self.target is not None:
            control = control + target_gain[0] * self.target(previous)
        return control, log_scale + step_log_scale


class ControlledChain(EulerChain):
    r"""A path site's guide: the model's chain with a control, an optional guided base
    kernel and a learned noise scale (see the module docstring).

    Built by :class:`~pyro_latdiff.DiffusionGuide` on every call, without the probes
    a user's :class:`~pyro_latdiff.LatentDiffusion` gets (the prior was checked when
    the model built it).

    :param LatentDiffusion prior: the model's chain (with the guide's upstream values).
    :param Control control: the control and log-scale terms.
    :param GuidedKernel kernel: the guided base kernel, or ``None`` for the prior's.
    :param tuple bounds: ``(low, high)``: the chain's functions see the state clamped
        into this box (the chain stays a proper distribution); simulated states that
        left it are counted in :attr:`num_clamped`.
    :param int block_size: steps per checkpointed block (see
        :attr:`~pyro_latdiff.distribution.EulerChain.block_size`).
    """

    def __init__(
        self,
        prior: LatentDiffusion,
        control: Control,
        kernel: GuidedKernel | None = None,
        bounds: tuple[float, float] | None = None,
        block_size: int | None = None,
    ):
        self.prior = prior
        self.block_size = block_size
        self.control = control
        self.kernel = kernel
        self.bounds = bounds
        self.x0 = prior.x0
        self.times = prior.times
        if kernel is not None:
            self.noise_type = kernel.noise_type
            self.noise_dim = prior.state_dim
            # The prior's noise type is kept for the shift when the kernel is diagonal.
        else:
            self.noise_type = prior.noise_type
            self.noise_dim = prior.noise_dim
        # Shared by the copies `expand` makes, so the count reaches the chain built.
        self._clamped: list[Tensor | int] = [0]
        batch_shape = prior.batch_shape
        if kernel is not None:
            batch_shape = broadcast_shapes(batch_shape, kernel.batch_shape)
        if control.context is not None:
            batch_shape = broadcast_shapes(batch_shape, control.context.shape[:-1])
        self._init_chain(batch_shape, validate_args=False)

    def window(self, steps: slice) -> ControlledChain:
        new = copy.copy(self)
        new.control = self.control.window(steps)
        if self.kernel is not None:
            new.kernel = self.kernel.window(steps)
        return new

    def _clamp(self, x: Tensor) -> Tensor:
        return x if self.bounds is None else x.clamp(*self.bounds)

    def _combine(self, drift, scale, control, log_scale):
        """``u = base drift + S c``, ``s = diag(exp(lambda)) S``."""
        if self.noise_type == "diagonal":
            return drift + scale * control, scale * log_scale.exp()
        if self.kernel is not None:  # S: the guided kernel's Cholesky factor
            shift = (scale @ control.unsqueeze(-1)).squeeze(-1)
        else:  # sigma sigma^T c with the model's (D, M) noise matrix
            shift = (scale @ (scale.transpose(-1, -2) @ control.unsqueeze(-1))).squeeze(-1)
        return drift + shift, log_scale.exp().unsqueeze(-1) * scale

    def step(self, k: int, x: Tensor) -> tuple[Tensor, Tensor]:
        inside = self._clamp(x)
        drift, scale = self.prior.step(k, inside)
        if self.kernel is not None:
            drift, scale = self.kernel.step(k, x, drift, scale)
        control, log_scale = self.control.step(k, inside)
        return self._combine(drift, scale, control, log_scale)

    def path_coefficients(
        self, t: Tensor, previous: Tensor, steps: slice = ALL_STEPS
    ) -> tuple[Tensor, Tensor]:
        inside = self._clamp(previous)
        drift, scale = self.prior.path_coefficients(t, inside, steps)
        if self.kernel is not None:
            drift, scale = self.kernel.path(previous, drift, scale, steps)
        control, log_scale = self.control.path(t, inside, steps)
        return self._combine(drift, scale, control, log_scale)

    def rsample(self, sample_shape=torch.Size()) -> Tensor:
        path = super().rsample(sample_shape)
        if self.bounds is not None:
            low, high = self.bounds
            seen = torch.cat([self.x0.expand(path.shape[:-2] + self.x0.shape[-1:]).unsqueeze(-2),
                              path[..., :-1, :]], dim=-2)  # fmt: skip
            self._clamped[0] = ((seen < low) | (seen > high)).sum()
        return path

    @property
    def num_clamped(self) -> Tensor | int:
        """Simulated states that left ``bounds`` in the last :meth:`rsample` (a tensor;
        reading it as a number synchronises)."""
        return self._clamped[0]


class PathDerivative(TorchDistribution):
    """Samples from ``fn``; scores with ``score_fn``, a copy whose guide parameters are
    detached. Under Trace_ELBO this gives the path-derivative ("sticking the landing")
    gradient (Roeder, Wu & Duvenaud 2017): the score term, whose variance does not
    vanish at the optimum, is dropped; the value keeps its reparameterised gradient.
    """

    def __init__(self, fn: TorchDistribution, score_fn: TorchDistribution):
        self.fn = fn
        self.score_fn = score_fn
        super().__init__(fn.batch_shape, fn.event_shape, validate_args=False)

    has_rsample = True
    arg_constraints: dict = {}

    @constraints.dependent_property
    def support(self):
        return self.fn.support

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(PathDerivative, _instance)
        fn, score_fn = self.fn.expand(batch_shape), self.score_fn.expand(batch_shape)
        PathDerivative.__init__(new, fn, score_fn)
        return new

    def rsample(self, sample_shape=torch.Size()):
        return self.fn.rsample(sample_shape)

    def log_prob(self, value):
        return self.score_fn.log_prob(value)
