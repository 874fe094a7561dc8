"""An autoguide for models with :class:`~pyro_latdiff.LatentDiffusion` sites.

Autoguide plumbing only: the prototype trace, plates, the context, the pre-pass that
gives each path site its prior (with the guide's upstream values) and its observation
terms, and the normal guide of the other latents. The path sites' chains are
:class:`~pyro_latdiff.chain.ControlledChain` objects, guided by
:mod:`pyro_latdiff.filter`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from operator import attrgetter

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions import TorchDistribution, constraints
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger, init_to_feasible
from pyro.infer.autoguide.utils import deep_setattr
from pyro.nn import PyroModule, PyroParam
from pyro.poutine.util import site_is_subsample
from torch import Tensor, nn
from torch.distributions import biject_to

from ._model_checks import (
    check_enclosing_plates,
    check_noise_columns,
    check_observed_sites,
    check_path_batch_rank,
    check_path_event_shape,
    check_site_batch_ranks,
    enclosing_plates,
    observed_sites,
    plates_batch_shape,
)
from ._observations import ReferencePaths, observation_log_likelihood, shared_plate_values
from ._shapes import broadcast_shapes
from ._traces import plate_nesting
from ._validation import check_ordered_pair, check_positive_int, check_signature, check_widths
from .chain import ChainParameters, Control, ControlledChain, PathDerivative, TargetGradient
from .distribution import LatentDiffusion, latent_diffusion_of
from .filter import GuidedKernel, observation_terms

__all__ = ["DiffusionGuide"]

# Guides alive in this process, by parameter-name prefix (see DiffusionGuide's `name`).
_LIVE_GUIDES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def _detached_net(net):
    """``net`` with its parameters detached, as a function ``(t, x, context)``."""
    detached = {k: v.detach() for k, v in net.named_parameters()}

    def call(t, x, context):
        return torch.func.functional_call(net, detached, (t, x, context))

    return call


class DiffusionGuide(AutoGuide):
    r"""Autoguide for models with :class:`~pyro_latdiff.LatentDiffusion` sites.

    Each path site gets a controlled Euler chain on the model's grid
    (:class:`~pyro_latdiff.chain.ControlledChain`),

    .. math::

        x_{k+1} = x_k + \big(\bar b_k(x_k) + S_k(x_k)\, c_k(x_k)\big) h_k
                  + e^{\lambda_k(x_k)} S_k(x_k) \sqrt{h_k}\, \xi_k,

    whose base kernel :math:`(\bar b, S)` is, with guidance (default), the model's own
    Euler kernel (re-evaluated with the guide's values of the upstream latents, so a
    path follows a sampled global parameter) tilted by a backward information filter
    that sees **every observation of the path, at any time**
    (:mod:`pyro_latdiff.filter`: the drift is linearised around a reference path and
    each observation's log-likelihood expanded to second order in its state). For a
    linear-Gaussian model this is exactly the posterior chain, before any training;
    for one terminal observation it is a modified diffusion bridge. On top, a learned
    control ``c`` (a :class:`~pyro_latdiff.NeuralDrift` of ``(t, x, context)`` plus
    per-step terms ``linear_gain_k x + offset_k``) and a learned log-scale ``lambda``
    (network plus ``log_scale_k``) correct what the linearisation misses; they start
    at zero. The drift is linearised around the initial state, then, ``relinearise``
    times unless the drift is affine along it, around the noise-free path of the
    guided kernel itself (the observations are re-expanded there too).

    The context is, by default, the values of the other sites that share the path's
    plates: its observations (one network then serves a plate of independent series)
    and the guide's values of the other latents (so the control can follow a global
    parameter); ``context`` overrides it with a callable ``context(*args, **kwargs)``
    returning ``batch_shape + (C,)``, or ``None`` for no context. Other latent sites
    get a mean-field normal guide in unconstrained space, as
    :class:`~pyro.infer.autoguide.AutoNormal` (subsampled plates included), or, with
    ``latent_guide``, one joint Pyro autoguide (e.g.
    :class:`~pyro.infer.autoguide.AutoMultivariateNormal`,
    :class:`~pyro.infer.autoguide.AutoLowRankMultivariateNormal`,
    :class:`~pyro.infer.autoguide.AutoIAFNormal`): the parameters of a drift and of a
    diffusion are typically correlated a posteriori. The paths always follow the
    sampled values.

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
    :param bool bridge: guide every path by the backward filter of its observations
        (default); ``False`` for the model's own kernel plus the learned terms only.
    :param int relinearise: how many times the guided kernel may be rebuilt around its
        own noise-free path (0: linearise around the initial state only).
    :param bool path_derivative: score with detached parameters (see above).
    :param state_bounds: ``(low, high)``: the guide chain's drift and diffusion see the
        state clamped into this box, so a path that strays far cannot blow up the
        network or a stiff drift. The chain stays a proper distribution (its density
        uses the same clamped functions), so the ELBO and importance weights stay
        valid. Simulated states that left the box are counted in ``num_clamped``, and
        :func:`~pyro_latdiff.fit` reports them.
    :param callable target: ``log_target(x)`` of the terminal state: adds the
        target-aware term ``target_gain_k * clip(grad log_target(x))`` at the current
        state to the control of every path (for samplers of unnormalised targets,
        :mod:`pyro_latdiff.sampling`).
    :param float target_clip: the clip of that gradient.
    :param callable latent_guide: an autoguide class or factory ``latent_guide(model)``
        for all latents that are not paths (the model is given with the paths hidden),
        e.g. ``AutoMultivariateNormal`` or
        ``functools.partial(AutoLowRankMultivariateNormal, rank=2)``.
    :param int block_size: memory flat in the number of steps: the guided kernel's
        filter, the simulation and the density of each path run in checkpointed blocks
        of this many steps (:mod:`pyro_latdiff.checkpoint`: a block keeps no autograd
        graph and is recomputed in the backward pass; same values and gradients, up to
        about twice the time). By default the ``block_size`` of the model's
        :class:`~pyro_latdiff.LatentDiffusion` site, which blocks the model's density
        too.
    :param callable init_loc_fn: initialisation of the non-path latent sites.
    :param float init_scale: initial scale of the non-path latent sites.
    :param callable create_plates: as in :class:`~pyro.infer.autoguide.AutoGuide`.
    :param str name: prefix of the guide's parameter names in Pyro's parameter store,
        ``"DiffusionGuide"`` by default (names below it come from the module tree, as
        in Pyro's autoguides). A guide without a ``name`` takes the first of
        ``"DiffusionGuide"``, ``"DiffusionGuide_1"``, ... that no live guide and no
        parameter in the store uses, so two guides never share parameters by accident
        and, with a cleared store, the name does not depend on how many guides were
        built before. Give a ``name`` to reload saved parameters into a new guide.

    References: Tzen & Raginsky (2019); Schauer, van der Meulen & van Zanten (2017),
    *Guided proposals for simulating multi-dimensional diffusion bridges*; Mider,
    Schauer & van der Meulen (2021), *Continuous-discrete smoothing of diffusions*;
    Zhang & Chen (2022), *Path integral sampler*; Roeder, Wu & Duvenaud (2017).
    """

    def __init__(
        self,
        model: Callable,
        *,
        hidden_dims: Sequence[int] = (64, 64),
        num_frequencies: int = 4,
        context: str | Callable | None = "auto",
        bridge: bool = True,
        relinearise: int = 1,
        path_derivative: bool = True,
        state_bounds: tuple[float, float] | None = None,
        target: Callable[[Tensor], Tensor] | None = None,
        target_clip: float = 1e2,
        latent_guide: Callable[[Callable], AutoGuide] | None = None,
        block_size: int | None = None,
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
        check_positive_int("relinearise", relinearise, minimum=0)
        if block_size is not None:
            check_positive_int("block_size", block_size)
        for flag, value in (("bridge", bridge), ("path_derivative", path_derivative)):
            if not isinstance(value, bool):
                raise TypeError(f"Expected `{flag}` to be a bool, actual {value!r}")
        if not callable(init_loc_fn):
            raise TypeError(f"Expected `init_loc_fn` to be callable, actual {init_loc_fn!r}")
        if create_plates is not None and not callable(create_plates):
            raise TypeError(
                f"Expected `create_plates` to be callable or None, actual {create_plates!r}"
            )
        if latent_guide is not None and not callable(latent_guide):
            raise TypeError(
                "Expected `latent_guide` to be an autoguide class or factory, e.g. "
                f"AutoMultivariateNormal, actual {latent_guide!r}"
            )
        if target is not None and not callable(target):
            raise TypeError(
                f"Expected `target` to be a callable log_target(x) or None, actual {target!r}"
            )
        for what, value in (("init_scale", init_scale), ("target_clip", target_clip)):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or not value > 0
            ):
                raise ValueError(f"Expected `{what}` to be a positive float, actual {value!r}")
        if name is not None and (not isinstance(name, str) or not name or "$$$" in name):
            raise ValueError(f"Expected `name` to be a non-empty str, actual {name!r}")
        self.hidden_dims = tuple(hidden_dims)
        self.num_frequencies = num_frequencies
        self.context = context
        self.bridge = bridge
        self.relinearise = relinearise
        self.state_bounds = (
            None if state_bounds is None else check_ordered_pair("state_bounds", state_bounds)
        )
        self.target = None if target is None else TargetGradient(target, float(target_clip))
        self._latent_guide_factory = latent_guide
        self.block_size = block_size
        self.num_clamped = 0
        self.path_derivative = path_derivative
        self.init_loc_fn = init_loc_fn
        self.init_scale = float(init_scale)
        self._unwrapped_model = (model,)  # a tuple: a model that is an nn.Module stays out
        self._requested_name = name
        self._claim_name()

    @staticmethod
    def _prototype_hide_fn(msg):
        # Keep observed sites too: they are the default context.
        return msg["type"] != "sample" or site_is_subsample(msg)

    def _claim_name(self) -> None:
        """The parameter-name prefix (see ``name``), chosen when the guide is built, while
        a guide it replaces (``guide = DiffusionGuide(model)`` run twice) is alive."""
        name = self._requested_name
        if name is None:
            taken = {key.split(".", 1)[0] for key in pyro.get_param_store().keys()}
            name, index = "DiffusionGuide", 0
            while _LIVE_GUIDES.get(name) not in (None, self) or name in taken:
                index += 1
                name = f"DiffusionGuide_{index}"
        self._pyro_name = name
        _LIVE_GUIDES[name] = self

    def _setup_prototype(self, *args, **kwargs):
        check_signature("model", self._unwrapped_model[0], args, kwargs)
        super()._setup_prototype(*args, **kwargs)
        self._path_sites: list[str] = []
        self._normal_sites: list[str] = []
        self._event_dims: dict[str, int] = {}
        self._frames: dict[str, list] = {}
        self._coupling_checked: set[str] = set()
        self._sites_checked: set[str] = set()
        self._model_plate_nesting = plate_nesting(self.prototype_trace)
        self._model_has_params = self._find_model_params(*args, **kwargs)
        self._observed_sites = observed_sites(self.prototype_trace)
        self.chains = PyroModule()
        self.locs = PyroModule()
        self.log_scales = PyroModule()
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            self._frames[name] = [f for f in site["cond_indep_stack"] if f.vectorized]
            if latent_diffusion_of(site["fn"]) is not None:
                check_path_event_shape(name, site["fn"])
                self._path_sites.append(name)
            elif site["fn"].support.is_discrete:
                raise ValueError(
                    f"DiffusionGuide: expected continuous latent sites, actual discrete site "
                    f"'{name}' ({type(site['fn']).__name__}); enumerate it out in the model"
                )
            elif self._latent_guide_factory is None:
                self._setup_normal_site(name, site)
        if not self._path_sites:
            raise ValueError(
                "DiffusionGuide: expected a model with at least one LatentDiffusion site, "
                f"actual latent sites {list(self._frames)}"
            )
        if self._latent_guide_factory is not None:  # one joint guide of the other latents
            blocked = poutine.block(self._unwrapped_model[0], hide=self._path_sites)
            self.latents = self._latent_guide_factory(blocked)
        for name in self._path_sites:
            site = self.prototype_trace.nodes[name]
            fn = latent_diffusion_of(site["fn"])
            context = self._context(name, self.prototype_trace, args, kwargs, fn.x0)
            times = fn.times
            parameters = ChainParameters(
                fn.num_steps,
                fn.state_dim,
                0 if context is None else context.shape[-1],
                (times[0].item(), times[-1].item()),
                self.hidden_dims,
                self.num_frequencies,
                self.target is not None,
                fn.x0,
            )
            deep_setattr(self.chains, name, parameters)

    def _check_prototype(self, part_trace) -> None:
        """A ``latent_guide`` (a part of this guide, as in AutoGuideList) must see the
        latent sites as this guide does."""
        for name, part_site in part_trace.iter_stochastic_nodes():
            site = self.prototype_trace.nodes[name]
            if part_site["fn"].batch_shape != site["fn"].batch_shape or (
                part_site["value"].shape != site["value"].shape
            ):
                raise ValueError(
                    f"DiffusionGuide: expected latent_guide to see site '{name}' as the model "
                    f"does, shape {tuple(site['value'].shape)}, actual "
                    f"{tuple(part_site['value'].shape)}"
                )

    def _find_model_params(self, *args, **kwargs) -> bool:
        """Whether the model has parameters of its own (``pyro.param``, ``PyroModule``)."""
        with poutine.block(), torch.no_grad():
            trace = poutine.trace(self.model).get_trace(*args, **kwargs)
        return any(site["type"] == "param" for site in trace.nodes.values())

    def _setup_normal_site(self, name: str, site: dict) -> None:
        value = site["value"].detach()
        init_loc = biject_to(site["fn"].support).inv(value).detach()
        event_dim = site["fn"].event_dim + init_loc.dim() - value.dim()
        self._event_dims[name] = event_dim
        for frame in site["cond_indep_stack"]:  # subsampled: parameters for every member
            full_size = frame.full_size or frame.size
            if full_size != frame.size:
                dim = frame.dim - event_dim
                init_loc = pyro.ops.tensor_utils.periodic_repeat(init_loc, full_size, dim)
                init_loc = init_loc.contiguous()
        self._normal_sites.append(name)
        init_log_scale = torch.full_like(init_loc, self.init_scale).log()
        deep_setattr(self.locs, name, PyroParam(init_loc, constraints.real, event_dim))
        deep_setattr(self.log_scales, name, PyroParam(init_log_scale, constraints.real, event_dim))

    def _context(self, name, trace, args, kwargs, like: Tensor) -> Tensor | None:
        if self.context is None:
            return None
        if callable(self.context):
            pieces = [self.context(*args, **kwargs)]
        else:
            pieces = shared_plate_values(trace.nodes[name], trace, set(self._path_sites))
        if not pieces:
            return None
        pieces = [p.to(like.dtype) for p in pieces]
        batch = broadcast_shapes(*(p.shape[:-1] for p in pieces))
        context = torch.cat([p.expand(batch + p.shape[-1:]) for p in pieces], dim=-1)
        # A plate the path is not in leaves a singleton in its place; left of the
        # path's own batch it would give the guide's path a dimension the model's lacks.
        rank = len(trace.nodes[name]["fn"].batch_shape)
        while context.dim() - 1 > rank and context.shape[0] == 1:
            context = context.squeeze(0)
        return context

    def _normal_distribution(self, name: str) -> TorchDistribution:
        event_dim = self._event_dims[name]
        loc = attrgetter(name)(self.locs)
        log_scale = attrgetter(name)(self.log_scales)
        support = self.prototype_trace.nodes[name]["fn"].support
        transform = biject_to(support).with_cache(1)

        def make(loc, log_scale):
            base = dist.Normal(loc, log_scale.exp()).to_event(event_dim)
            return dist.TransformedDistribution(base, transform)

        if not self.path_derivative:
            return make(loc, log_scale)
        return PathDerivative(make(loc, log_scale), make(loc.detach(), log_scale.detach()))

    def _prepass(self, site: str, values: dict, enclosing, args, kwargs, subsamples: dict):
        """Run the model with the guide's values so far (other latents, earlier paths)
        and reference paths for the paths not yet drawn, without simulating: gives the
        path site's prior (with the guide's upstream values), its context, and the
        guided kernel of its observations. ``enclosing`` are the vectorised plates
        around the guide."""
        # The kernel is differentiated only where gradients can flow: to the guide's
        # upstream values (globals, earlier paths) or to the model's parameters.
        upstream = any(isinstance(v, Tensor) and v.requires_grad for v in values.values())
        graph = torch.is_grad_enabled() and (upstream or self._model_has_params)
        passes = (site, values, enclosing, graph, args, kwargs, subsamples)
        trace, prior, kernel = self._reference_pass(None, *passes)
        for _ in range(self.relinearise if kernel is not None else 0):
            with torch.no_grad():
                if kernel.drift_is_affine(prior):
                    break
                mean = kernel.mean_path(prior)
            trace, prior, kernel = self._reference_pass(mean, *passes)
        return trace, prior, kernel

    def _reference_pass(
        self, reference, site, values, enclosing, create_graph, args, kwargs, subsamples
    ):
        remaining = set(self._path_sites) - set(values)
        path_names = set(self._path_sites)
        # Without the guide's values of other latents the observations' terms are the
        # same for every draw: the reference paths (and so the filter) leave out the
        # batch of the enclosing plates (e.g. vectorised particles), which the chain
        # broadcasts to.
        outer = plates_batch_shape(enclosing)
        model = poutine.condition(self._unwrapped_model[0], data={**subsamples, **values})
        check_ranks = site not in self._sites_checked and len(outer) > 0
        if check_ranks and not values:
            # Once per site under such plates, a pass that keeps their batch checks the
            # batch ranks of the sites that depend on the path.
            probe = ReferencePaths(remaining, outer, {site: reference})
            with poutine.block(), torch.no_grad():
                probe_trace = poutine.trace(probe(model)).get_trace(*args, **kwargs)
            check_site_batch_ranks(probe_trace, path_names, enclosing)
            self._sites_checked.add(site)
            check_ranks = False
        paths = ReferencePaths(remaining, outer if values else torch.Size(), {site: reference})
        with poutine.block(), torch.enable_grad():
            trace = poutine.trace(paths(model)).get_trace(*args, **kwargs)
        check_observed_sites(trace, self._observed_sites)
        check_path_batch_rank(site, trace.nodes[site]["fn"], self._frames[site] + enclosing)
        if check_ranks:
            check_site_batch_ranks(trace, path_names, enclosing)
            self._sites_checked.add(site)
        prior = paths.fns[site]
        check_noise_columns(site, prior)
        with torch.enable_grad():
            if not self.bridge:
                return trace, prior, None
            # Observations and the guide's values of other latents; not the paths
            # (earlier ones do not depend on this one, later ones are references).
            log_lik = observation_log_likelihood(trace, path_names)
            check = site not in self._coupling_checked
            block_size = self._block_size(prior)
            # In blocks, the terms of the observed states only: none of size N.
            sparse = block_size is not None and block_size < prior.num_steps
            terms = observation_terms(log_lik, paths.paths[site], create_graph, check, sparse)
            self._coupling_checked.add(site)
            if terms is None:
                return trace, prior, None
            kernel = GuidedKernel.from_observations(
                prior, paths.references[site], terms, create_graph, block_size
            )
        return trace, prior, kernel

    def _chain_terms(self, parameters: ChainParameters) -> tuple[nn.Module, list[Tensor]]:
        """The network and the per-step tables of one path site's chain, each read from
        the parameter store once per guide call."""
        # A plain nn.Module below a PyroModule is registered with pyro.module, which keeps
        # the module's own tensors; reading them back from the parameter store makes a
        # restored store (a resumed fit, a loaded checkpoint) take effect. (PyroModule's
        # attribute access would register it again at every access.)
        net = pyro.module(
            f"{parameters._pyro_name}.net", parameters._modules["net"], update_module_params=True
        )
        tables = [parameters.linear_gain, parameters.offset, parameters.log_scale]
        tables.append(parameters.target_gain if self.target is not None else None)
        return net, tables

    def _control(self, net, tables, detach: bool, times, context) -> Control:
        *tables, target_gain = tables
        if detach:
            net = _detached_net(net)
            tables = [t.detach() for t in tables]
            target_gain = None if target_gain is None else target_gain.detach()
        return Control(net, *tables, times, context, self.target, target_gain)

    def _path_distribution(self, name: str, trace, prior, kernel, args, kwargs):
        net, tables = self._chain_terms(attrgetter(name)(self.chains))
        expected_steps = tables[0].shape[0]
        if prior.num_steps != expected_steps:
            raise ValueError(
                f"DiffusionGuide: expected site '{name}' on the grid of {expected_steps}"
                f" steps the guide was built for, actual {prior.num_steps} steps; the guide's "
                "per-step terms belong to one grid: build a new guide for a new grid"
            )
        context = self._context(name, trace, args, kwargs, prior.x0)
        expected = net.context_dim
        if (0 if context is None else context.shape[-1]) != expected:
            raise ValueError(
                f"DiffusionGuide: expected a context of {expected} features for site '{name}' "
                f"(as when the guide was built), actual "
                f"{0 if context is None else context.shape[-1]}"
            )
        control = self._control(net, tables, False, prior.times, context)
        block_size = self._block_size(prior)
        chain = ControlledChain(prior, control, kernel, self.state_bounds, block_size)
        if not self.path_derivative:
            return chain, chain
        detached = self._control(net, tables, True, prior.times, context)
        score = ControlledChain(prior, detached, kernel, self.state_bounds, block_size)
        return PathDerivative(chain, score), chain

    def _latent_values(self, drawn) -> dict:
        """What ``latent_guide`` returned: its values of every latent but the paths, as
        Pyro's autoguides return them. The paths' kernel is filtered given these; one
        left out would be drawn from its prior in the pre-pass, a poor proposal, and
        silently."""
        if not isinstance(drawn, dict):
            raise TypeError(
                "DiffusionGuide: expected latent_guide(*args, **kwargs) to return a dict of "
                f"its sites' values, as Pyro's autoguides do, actual {type(drawn).__name__}"
            )
        latents = [name for name in self._frames if name not in self._path_sites]
        missing = [name for name in latents if name not in drawn]
        if missing:
            raise ValueError(
                "DiffusionGuide: expected latent_guide to return the values of the model's "
                f"latents other than the paths, {latents}, actual {missing} missing from "
                f"what it returned, {sorted(drawn)}"
            )
        return drawn

    def _block_size(self, prior: LatentDiffusion) -> int | None:
        """The guide's ``block_size``, else the model's path site's."""
        return prior.block_size if self.block_size is None else self.block_size

    def _plate_stack(self, name: str, plates: dict) -> ExitStack:
        stack = ExitStack()
        for frame in self._frames[name]:
            stack.enter_context(plates[frame.name])
        return stack

    def forward(self, *args, **kwargs) -> dict[str, Tensor]:
        if torch.jit.is_tracing() and (self.bridge or self.path_derivative):
            raise NotImplementedError(
                "DiffusionGuide runs under torch.jit.trace (JitTrace_ELBO and the other "
                "Jit* ELBOs) only with bridge=False and path_derivative=False: the guided "
                "kernel differentiates the model's observations and drift inside the guide, "
                "and the path derivative calls the network with detached parameters, which "
                "tracing does not support; use the ELBO without Jit (e.g. Trace_ELBO)"
            )
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        enclosing = enclosing_plates()
        check_enclosing_plates(enclosing, self._model_plate_nesting)
        plates = self._create_plates(*args, **kwargs)
        # The model's subsampled plates, run inside the guide, take the guide's indices
        # (as Pyro's ELBOs replay them), so each path is guided by its own observations.
        subsamples = {
            name: plate._indices
            for name, plate in plates.items()
            if plate._indices is not None and plate.subsample_size < plate.size
        }
        values: dict[str, Tensor] = {}
        if self._latent_guide_factory is not None:
            values.update(self._latent_values(self.latents(*args, **kwargs)))
        for name in self._normal_sites:
            with self._plate_stack(name, plates):
                values[name] = pyro.sample(name, self._normal_distribution(name))
        for name in self._path_sites:  # in model order: a later path may start from an earlier
            trace, prior, kernel = self._prepass(name, values, enclosing, args, kwargs, subsamples)
            fn, chain = self._path_distribution(name, trace, prior, kernel, args, kwargs)
            with self._plate_stack(name, plates):
                values[name] = pyro.sample(name, fn)
            if self.state_bounds is not None:
                self.num_clamped += int(chain.num_clamped)
        return values

    def fit_counters(self) -> dict[str, int]:
        """Running counts that :func:`~pyro_latdiff.fit` shows and reports: the
        simulated states that left ``state_bounds``."""
        return {"clamped": self.num_clamped} if self.state_bounds is not None else {}

    def fit_warning(self, counts: dict[str, int], num_steps: int) -> str | None:
        """What :func:`~pyro_latdiff.fit` should warn about, given the counts of a run."""
        clamped = counts.get("clamped", 0)
        if not clamped:
            return None
        return (
            f"fit: {clamped} simulated guide states left the guide's state_bounds "
            f"{self.state_bounds} over {num_steps} steps and its drift saw them "
            "clamped (the ELBO stays valid); widen the box if this is not rare"
        )

    @torch.no_grad()
    def median(self, *args, **kwargs) -> dict[str, Tensor]:
        """Not defined for path sites; use :class:`~pyro.infer.Predictive` samples."""
        raise NotImplementedError("DiffusionGuide has no closed-form median; draw samples")


_GUIDED_PROPOSALS = True
