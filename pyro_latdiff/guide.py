"""An autoguide for models with :class:`~pyro_latdiff.LatentDiffusion` sites."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import TorchDistribution, constraints
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger, init_to_feasible
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import get_plates
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn
from torch.distributions import biject_to

from ._validation import check_ordered_pair, check_positive_int, check_signature, check_widths
from .distribution import LatentDiffusion
from .drift import NeuralDrift

__all__ = ["DiffusionGuide"]

_instance_counter = itertools.count()


def latent_diffusion_of(fn) -> LatentDiffusion | None:
    """The :class:`LatentDiffusion` under Pyro's wrappers (mask, independent, expand)."""
    while fn is not None and not isinstance(fn, LatentDiffusion):
        fn = getattr(fn, "base_dist", None)
    return fn


class _PathDerivative(TorchDistribution):
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
        new = self._get_checked_instance(_PathDerivative, _instance)
        fn, score_fn = self.fn.expand(batch_shape), self.score_fn.expand(batch_shape)
        _PathDerivative.__init__(new, fn, score_fn)
        return new

    def rsample(self, sample_shape=torch.Size()):
        return self.fn.rsample(sample_shape)

    def log_prob(self, value):
        return self.score_fn.log_prob(value)


class _ReferencePaths(Messenger):
    """Sets each path site to a constant reference path (no simulation) whose terminal
    state is a leaf tensor, so the observation log-likelihood can be differentiated
    with respect to the terminal state."""

    def __init__(self, names: set[str], batch_shape: torch.Size):
        super().__init__()
        self.names = names
        self.batch_shape = batch_shape
        self.terminals: dict[str, Tensor] = {}
        self.fns: dict[str, LatentDiffusion] = {}

    def _pyro_sample(self, msg):
        if msg["name"] not in self.names:
            return
        fn = latent_diffusion_of(msg["fn"])
        batch = torch.broadcast_shapes(msg["fn"].batch_shape, self.batch_shape)
        x0 = fn.x0.detach().expand(batch + fn.x0.shape[-1:])
        terminal = x0.clone().requires_grad_()
        path = torch.cat(
            [
                x0.unsqueeze(-2).expand(batch + (fn.num_steps - 1, fn.state_dim)),
                terminal.unsqueeze(-2),
            ],
            dim=-2,
        )
        self.terminals[msg["name"]] = terminal
        self.fns[msg["name"]] = fn
        msg["value"] = path
        msg["is_observed"] = True


def _outer_batch_shape() -> torch.Size:
    """Batch shape implied by the plates enclosing the guide (e.g. vectorised particles)."""
    shape: list[int] = []
    for frame in get_plates():
        if frame.vectorized and frame.dim is not None:
            shape = [1] * max(0, -frame.dim - len(shape)) + shape
            shape[frame.dim] = frame.size
    return torch.Size(shape)


def _auto_context(path_site: dict, trace, path_names: set[str]) -> list[Tensor]:
    """The values of the other sites that share the path's plates: observations and the
    guide's values of the other latents, one ``batch + (features,)`` tensor per site.

    A site shares the path's plates if its plates contain them (e.g. the observations
    of each path) or are contained in them (e.g. a global parameter). Dimensions of
    plates the path is not in (several observations per path) are folded into the
    features, leaving a singleton in their place.
    """
    path_frames = {f.name for f in path_site["cond_indep_stack"] if f.vectorized}
    pieces = []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or name in path_names or site_is_subsample(site):
            continue
        frames = [f for f in site["cond_indep_stack"] if f.vectorized]
        names = {f.name for f in frames}
        if not (path_frames <= names or names <= path_frames):
            continue
        value = site["value"]
        event_dim = site["fn"].event_dim
        value = value.reshape(value.shape[: value.dim() - event_dim] + (-1,))
        for frame in frames:
            if frame.name in path_frames or -frame.dim >= value.dim():
                continue
            value = value.movedim(frame.dim - 1, -1)
            value = value.reshape(value.shape[:-2] + (-1,)).unsqueeze(frame.dim - 1)
        pieces.append(value)
    return pieces


class _StepNet(nn.Module):
    """The learned parts of one path site's guide chain.

    ``net`` outputs a control and a log-scale correction; ``tables`` holds, per step
    ``k`` and state dimension, the bridge gain ``alpha``, a linear gain ``gamma``, an
    offset ``delta`` and a log-scale ``beta``. Everything starts at zero.
    """

    def __init__(
        self,
        num_steps: int,
        state_dim: int,
        context_dim: int,
        time_span,
        hidden_dims: Sequence[int],
        num_frequencies: int,
        dtype: torch.dtype,
    ):
        super().__init__()
        self.net = NeuralDrift(
            state_dim,
            context_dim=context_dim,
            out_dim=2 * state_dim,
            hidden_dims=hidden_dims,
            num_frequencies=num_frequencies,
            time_span=time_span,
        ).to(dtype)
        self.tables = nn.Parameter(torch.zeros(num_steps, 4, state_dim, dtype=dtype))


class _ControlledChain:
    """Drift and diffusion of the guide's chain for one path site.

    u(t, x) = b(t, x) + sigma(t, x) * c(t, x),  c = net + alpha_k * sigma * g(x)
              + gamma_k * x + delta_k,
    s(t, x) = sigma(t, x) * exp(beta_k + net_scale),

    with ``g(x)`` the gradient of the observation log-likelihood at the terminal state
    set to ``x``, linearised around the reference path. One evaluation serves both
    the drift and the diffusion of a step (torchsde and ``log_prob`` ask for both at
    the same ``(t, x)``).
    """

    def __init__(
        self,
        prior: LatentDiffusion,
        net: Callable,
        tables: Tensor,
        context: Tensor | None,
        bridge: tuple | None,
        bounds: tuple[float, float] | None = None,
    ):
        self.prior = prior
        self.bounds = bounds
        self.clamped: Tensor | int = 0  # simulated states that left the box
        self.net = net
        self.tables = tables
        self.context = context
        self.bridge = None
        if bridge is not None:  # g(x) = grad + H (x - reference) = offset + H x
            grad, hessian, reference = bridge
            self.bridge = (grad - (hessian @ reference.unsqueeze(-1)).squeeze(-1), hessian)
        sigma = prior.diffusion
        self.sigma = (
            None
            if callable(sigma)
            else torch.as_tensor(sigma, dtype=prior.x0.dtype, device=prior.x0.device)
        )
        # Simulation calls come one grid time at a time: look the step up by value.
        self._step_of_time = {t: k for k, t in enumerate(prior.times[:-1].tolist())}
        # A NeuralDrift computes its time and context inputs once for the whole grid.
        self._grid_net = (
            net.on_grid(prior.times[:-1], context) if isinstance(net, NeuralDrift) else None
        )
        self._rows: tuple[Tensor, ...] | None = None
        self._cache: tuple = (None, None, None)

    def _step_tables(self, t: Tensor, k: int | None) -> Tensor:
        """The tables of step ``k`` (``t`` 0-d), ``(4, D)``; else the whole grid laid
        out as ``(N, 1, ..., 1, 4, D)`` for ``t`` of shape ``(N, 1, ..., 1)``."""
        if k is not None:
            if self._rows is None:
                self._rows = self.tables.unbind(0)
            return self._rows[k]
        ones = (1,) * (t.dim() - 2)
        return self.tables.reshape(self.tables.shape[:1] + ones + self.tables.shape[1:])

    def evaluate(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        if self._cache[0] is t and self._cache[1] is x:
            return self._cache[2]
        state = x
        if self.bounds is not None:  # the chain's own functions see the state in the box
            x = x.clamp(*self.bounds)
            if t.dim() == 0:  # a simulation step (log_prob re-evaluates the same states)
                self.clamped = self.clamped + (x != state).sum()
        sigma = self.prior.diffusion(t, x) if self.sigma is None else self.sigma
        k = self._step_of_time[t.item()] if t.dim() == 0 else None
        if k is not None and self._grid_net is not None:
            out = self._grid_net(k, x)
        else:
            out = self.net(t, x, self.context)
        control, log_scale = out.chunk(2, dim=-1)
        alpha, gamma, delta, beta = self._step_tables(t, k).unbind(-2)
        control = control + gamma * x + delta
        if self.bridge is not None:
            offset, hessian = self.bridge
            g = offset + (hessian @ x.unsqueeze(-1)).squeeze(-1)
            control = control + alpha * sigma * g
        result = (self.prior.drift(t, x) + sigma * control, sigma * torch.exp(beta + log_scale))
        self._cache = (t, state, result)
        return result

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        return self.evaluate(t, x)[0]

    def diffusion(self, t: Tensor, x: Tensor) -> Tensor:
        return self.evaluate(t, x)[1]


class DiffusionGuide(AutoGuide):
    r"""Autoguide for models with :class:`~pyro_latdiff.LatentDiffusion` sites.

    Each path site gets a controlled Euler chain on the model's grid,

    .. math::

        x_{k+1} = x_k + \big(b(t_k, x_k) + \sigma(t_k, x_k)\, c_k(x_k)\big) h_k
                  + \sigma(t_k, x_k)\, s_k(x_k) \sqrt{h_k}\, \xi_k,

    whose drift is the model's own ``b`` (re-evaluated with the guide's values of the
    upstream latents, so a path follows a sampled global parameter) plus ``sigma``
    times a learned control ``c``, and whose noise is scaled by a learned factor ``s``.
    ``c`` is a :class:`~pyro_latdiff.NeuralDrift` of ``(t, x, context)`` plus per-step
    terms: a bridge term ``alpha_k sigma grad_x log p(obs | x_N = x)`` (the gradient of
    the observation log-likelihood at the current state, as in modified diffusion
    bridges and the path-integral sampler's drift), and ``gamma_k x + delta_k``;
    ``log s = beta_k + net``. With a linear-Gaussian model these per-step Gaussian
    transitions can represent the discrete posterior chain exactly, which a drift-only
    guide cannot when the observation is sharp. Everything starts at zero: at
    initialisation the guide's path law is the prior's.

    The context is, by default, the values of the other sites that share the path's
    plates: its observations (one network then serves a plate of independent series)
    and the guide's values of the other latents (so the control can follow a global
    parameter); ``context`` overrides it
    with a callable ``context(*args, **kwargs)`` returning ``batch_shape + (C,)``, or
    ``None`` for no context. Other latent sites get a mean-field normal guide in
    unconstrained space, as :class:`~pyro.infer.autoguide.AutoNormal`.

    With ``path_derivative=True`` (default) the guide's log-density is scored with its
    parameters detached: the path-derivative gradient, unbiased and lower-variance
    under :class:`~pyro.infer.Trace_ELBO`; switch it off for RenyiELBO/IWAE or
    score-function estimators.

    Example::

        guide = DiffusionGuide(model)
        svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}),
                             pyro.infer.Trace_ELBO(num_particles=32, vectorize_particles=True))

    :param callable model: a Pyro model with at least one ``LatentDiffusion`` site.
    :param hidden_dims: hidden widths of the control network.
    :param int num_frequencies: Fourier time frequencies of the control network.
    :param context: ``"auto"``, ``None`` or a callable ``context(*args, **kwargs)``.
    :param bool bridge: use the observation-gradient bridge term.
    :param bool path_derivative: score with detached parameters (see above).
    :param state_bounds: ``(low, high)``: the guide chain's drift and diffusion see the
        state clamped into this box, so a path that strays far cannot blow up the
        network or a stiff drift. The chain stays a proper distribution (its density
        uses the same clamped functions), so the ELBO and importance weights stay
        valid. Simulated states that left the box are counted in ``num_clamped``, and
        :func:`~pyro_latdiff.fit` reports them.
    :param callable init_loc_fn: initialisation of the non-path latent sites.
    :param float init_scale: initial scale of the non-path latent sites.
    :param callable create_plates: as in :class:`~pyro.infer.autoguide.AutoGuide`.
    :param str name: prefix of the guide's parameter names in Pyro's parameter store;
        unique per instance by default. Give one to reload saved parameters into a new
        guide (e.g. to resume a fit in the same process).

    References: Tzen & Raginsky (2019); Whitaker, Golightly, Boys & Sherlock (2017),
    *Improved bridge constructs for stochastic differential equations*; Zhang & Chen
    (2022), *Path integral sampler*; Roeder, Wu & Duvenaud (2017).
    """

    def __init__(
        self,
        model: Callable,
        *,
        hidden_dims: Sequence[int] = (64, 64),
        num_frequencies: int = 4,
        context: str | Callable | None = "auto",
        bridge: bool = True,
        path_derivative: bool = True,
        state_bounds: tuple[float, float] | None = None,
        init_loc_fn: Callable = init_to_feasible,
        init_scale: float = 0.1,
        create_plates: Callable | None = None,
        name: str | None = None,
    ):
        if not callable(model):
            raise TypeError(f"Expected `model` to be callable, actual {type(model).__name__}")
        super().__init__(InitMessenger(init_loc_fn)(model), create_plates=create_plates)
        if not (context is None or context == "auto" or callable(context)):
            raise ValueError(
                f"Expected `context` to be 'auto', None or a callable, actual {context!r}"
            )
        check_widths(hidden_dims)
        check_positive_int("num_frequencies", num_frequencies, minimum=0)
        for flag, value in (("bridge", bridge), ("path_derivative", path_derivative)):
            if not isinstance(value, bool):
                raise TypeError(f"Expected `{flag}` to be a bool, actual {value!r}")
        if not callable(init_loc_fn):
            raise TypeError(f"Expected `init_loc_fn` to be callable, actual {init_loc_fn!r}")
        if create_plates is not None and not callable(create_plates):
            raise TypeError(
                f"Expected `create_plates` to be callable or None, actual {create_plates!r}"
            )
        if (
            isinstance(init_scale, bool)
            or not isinstance(init_scale, (int, float))
            or not math.isfinite(init_scale)
            or not init_scale > 0
        ):
            raise ValueError(f"Expected `init_scale` to be a positive float, actual {init_scale!r}")
        self.hidden_dims = tuple(hidden_dims)
        self.num_frequencies = num_frequencies
        self.context = context
        self.bridge = bridge
        self.state_bounds = (
            None if state_bounds is None else check_ordered_pair("state_bounds", state_bounds)
        )
        self.num_clamped = 0
        self.path_derivative = path_derivative
        self.init_loc_fn = init_loc_fn
        self.init_scale = float(init_scale)
        self._unwrapped_model = (model,)  # a tuple: a model that is an nn.Module stays out
        if name is None:
            # Unique parameter names: a second guide in one process must not share the
            # first one's parameters.
            index = next(_instance_counter)
            name = "DiffusionGuide" if index == 0 else f"DiffusionGuide_{index}"
        elif not isinstance(name, str) or not name or "$$$" in name:
            raise ValueError(f"Expected `name` to be a non-empty str, actual {name!r}")
        self._pyro_name = name

    @staticmethod
    def _prototype_hide_fn(msg):
        # Keep observed sites too: they are the default context.
        return msg["type"] != "sample" or site_is_subsample(msg)

    def _setup_prototype(self, *args, **kwargs):
        check_signature("model", self._unwrapped_model[0], args, kwargs)
        super()._setup_prototype(*args, **kwargs)
        self._path_sites: list[str] = []
        self._normal_sites: list[str] = []
        self._event_dims: dict[str, int] = {}
        self._frames: dict[str, list] = {}
        self._init_normal: dict[str, tuple[Tensor, Tensor]] = {}
        self.step_nets = nn.ModuleDict()
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            self._frames[name] = [f for f in site["cond_indep_stack"] if f.vectorized]
            if latent_diffusion_of(site["fn"]) is not None:
                self._path_sites.append(name)
            elif site["fn"].support.is_discrete:
                raise ValueError(
                    f"DiffusionGuide: expected continuous latent sites, actual discrete site "
                    f"'{name}' ({type(site['fn']).__name__}); enumerate it out in the model"
                )
            else:
                self._setup_normal_site(name, site)
        if not self._path_sites:
            raise ValueError(
                "DiffusionGuide: expected a model with at least one LatentDiffusion site, "
                f"actual latent sites {list(self._frames)}"
            )
        for name in self._path_sites:
            site = self.prototype_trace.nodes[name]
            fn = latent_diffusion_of(site["fn"])
            context = self._context(name, self.prototype_trace, args, kwargs, fn.x0)
            times = fn.times
            self.step_nets[self._key(name)] = _StepNet(
                fn.num_steps,
                fn.state_dim,
                0 if context is None else context.shape[-1],
                (times[0].item(), times[-1].item()),
                self.hidden_dims,
                self.num_frequencies,
                fn.x0.dtype,
            ).to(fn.x0.device)

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def _setup_normal_site(self, name: str, site: dict) -> None:
        value = site["value"].detach()
        init_loc = biject_to(site["fn"].support).inv(value).detach()
        event_dim = site["fn"].event_dim + init_loc.dim() - value.dim()
        self._event_dims[name] = event_dim
        for frame in site["cond_indep_stack"]:
            full_size = frame.full_size or frame.size
            if full_size != frame.size:
                raise NotImplementedError(
                    f"DiffusionGuide: subsampled plate '{frame.name}' around site '{name}' "
                    "is not supported yet"
                )
        self._normal_sites.append(name)
        self._init_normal[name] = (init_loc, torch.full_like(init_loc, self.init_scale).log())

    def _context(self, name, trace, args, kwargs, like: Tensor) -> Tensor | None:
        if self.context is None:
            return None
        if callable(self.context):
            pieces = [self.context(*args, **kwargs)]
        else:
            pieces = _auto_context(trace.nodes[name], trace, set(self._path_sites))
        if not pieces:
            return None
        pieces = [p.to(like.dtype) for p in pieces]
        batch = torch.broadcast_shapes(*(p.shape[:-1] for p in pieces))
        return torch.cat([p.expand(batch + p.shape[-1:]) for p in pieces], dim=-1)

    def _normal_distribution(self, name: str) -> TorchDistribution:
        init_loc, init_log_scale = self._init_normal[name]
        event_dim = self._event_dims[name]
        loc = pyro.param(f"{self._pyro_name}.locs.{name}", init_loc, event_dim=event_dim)
        log_scale = pyro.param(
            f"{self._pyro_name}.log_scales.{name}", init_log_scale, event_dim=event_dim
        )
        support = self.prototype_trace.nodes[name]["fn"].support
        transform = biject_to(support).with_cache(1)

        def make(loc, log_scale):
            base = dist.Normal(loc, log_scale.exp()).to_event(event_dim)
            return dist.TransformedDistribution(base, transform)

        if not self.path_derivative:
            return make(loc, log_scale)
        return _PathDerivative(make(loc, log_scale), make(loc.detach(), log_scale.detach()))

    def _prepass(self, site: str, values: dict, args, kwargs):
        """Run the model with the guide's values so far (other latents, earlier paths)
        and reference paths for the paths not yet drawn, without simulating: gives the
        path site's prior (with the guide's upstream values), its context, and the
        observation gradient at its terminal state."""
        remaining = set(self._path_sites) - set(values)
        reference = _ReferencePaths(remaining, _outer_batch_shape())
        model = poutine.condition(self._unwrapped_model[0], data=values)
        with poutine.block(), torch.enable_grad():
            trace = poutine.trace(reference(model)).get_trace(*args, **kwargs)
            bridge = None
            if self.bridge:
                # Observations and the guide's values of other latents; not the paths
                # (earlier ones do not depend on this one, later ones are references).
                paths = set(self._path_sites)
                trace.compute_log_prob(site_filter=lambda n, s: s["is_observed"] and n not in paths)
                log_lik = sum(s["log_prob"].sum() for s in trace.nodes.values() if "log_prob" in s)
                bridge = self._linearise(log_lik, reference.terminals[site])
        return trace, reference.fns[site], bridge

    @staticmethod
    def _linearise(log_lik, terminal: Tensor):
        """Gradient and Hessian of the log-likelihood in the terminal state (each path
        separately: paths are independent across the batch)."""
        if not isinstance(log_lik, Tensor) or not log_lik.requires_grad:
            return None
        (grad,) = torch.autograd.grad(log_lik, terminal, create_graph=True, allow_unused=True)
        if grad is None:
            return None
        rows = []
        for i in range(terminal.shape[-1]):
            (row,) = torch.autograd.grad(
                grad[..., i].sum(),
                terminal,
                create_graph=True,
                retain_graph=True,
                allow_unused=True,
            )
            rows.append(torch.zeros_like(terminal) if row is None else row)
        return grad, torch.stack(rows, dim=-2), terminal.detach()

    def _path_distribution(self, name: str, trace, prior, bridge, args, kwargs):
        step_net = self.step_nets[self._key(name)]
        if prior.num_steps != step_net.tables.shape[0]:
            raise ValueError(
                f"DiffusionGuide: expected site '{name}' on the grid of {step_net.tables.shape[0]}"
                f" steps the guide was built for, actual {prior.num_steps} steps; the guide's "
                "per-step terms belong to one grid: build a new guide for a new grid"
            )
        context = self._context(name, trace, args, kwargs, prior.x0)
        expected = step_net.net.context_dim
        if (0 if context is None else context.shape[-1]) != expected:
            raise ValueError(
                f"DiffusionGuide: expected a context of {expected} features for site '{name}' "
                f"(as when the guide was built), actual "
                f"{0 if context is None else context.shape[-1]}"
            )

        def chain(net, tables):
            controlled = _ControlledChain(prior, net, tables, context, bridge, self.state_bounds)
            fn = LatentDiffusion(
                controlled.drift, controlled.diffusion, prior.x0, prior.times, validate_args=False
            )
            return fn, controlled

        fn, controlled = chain(step_net.net, step_net.tables)
        controlled.clamped = 0  # the probe at construction is no simulation step
        if self.path_derivative:
            detached = {k: v.detach() for k, v in step_net.net.named_parameters()}

            def detached_net(t, x, context):
                return torch.func.functional_call(step_net.net, detached, (t, x, context))

            fn = _PathDerivative(fn, chain(detached_net, step_net.tables.detach())[0])
        return fn, controlled

    def _plate_stack(self, name: str, plates: dict) -> ExitStack:
        stack = ExitStack()
        for frame in self._frames[name]:
            stack.enter_context(plates[frame.name])
        return stack

    def forward(self, *args, **kwargs) -> dict[str, Tensor]:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        pyro.module(f"{self._pyro_name}.step_nets", self.step_nets, update_module_params=True)
        values: dict[str, Tensor] = {}
        for name in self._normal_sites:
            with self._plate_stack(name, plates):
                values[name] = pyro.sample(name, self._normal_distribution(name))
        for name in self._path_sites:  # in model order: a later path may start from an earlier
            trace, prior, bridge = self._prepass(name, values, args, kwargs)
            fn, controlled = self._path_distribution(name, trace, prior, bridge, args, kwargs)
            with self._plate_stack(name, plates):
                values[name] = pyro.sample(name, fn)
            if self.state_bounds is not None:
                self.num_clamped += int(controlled.clamped)
        return values

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, Tensor]:
        """Not defined for path sites; use :class:`~pyro.infer.Predictive` samples."""
        raise NotImplementedError("DiffusionGuide has no closed-form median; draw samples")
