"""Checks of a model's shapes and plates as :mod:`~pyro_latdiff.guide` meets them,
where Pyro would otherwise compute a wrong answer silently (a cross product under
vectorised particles, plates that collide) or the guide would fail deep inside
(a series in an event, a singular noise matrix). Each is one ``ValueError`` that
names the site and says what to write instead."""

from __future__ import annotations

import torch
from pyro.poutine.runtime import get_plates
from pyro.poutine.util import site_is_subsample

from ._traces import is_deterministic
from .distribution import LatentDiffusion

__all__ = [
    "check_enclosing_plates",
    "check_noise_columns",
    "check_observed_sites",
    "check_path_batch_rank",
    "check_path_event_shape",
    "check_site_batch_ranks",
    "enclosing_plates",
    "observed_sites",
    "plates_batch_shape",
]


def observed_sites(trace) -> list[str]:
    """The observed sample sites of ``trace`` (the data), deterministic ones left out."""
    return [
        name
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and site["is_observed"]
        and not is_deterministic(site)
        and not site_is_subsample(site)
    ]


def check_observed_sites(trace, observed: list[str]) -> None:
    """The sites observed when the guide was built are observed now: the guide's paths
    are conditioned on them (its kernel is filtered from them, its network reads them as
    context), so with one left out (``obs=None``, Pyro's way to predict) it would draw
    from the prior, given a context drawn at random, and say nothing."""
    missing = [
        name for name in observed if name in trace.nodes and not trace.nodes[name]["is_observed"]
    ]
    if missing:
        raise ValueError(
            f"DiffusionGuide: expected the sites observed when the guide was built, "
            f"{observed}, to be observed in every call, actual {missing} unobserved: the "
            "guide's paths are conditioned on the data. To predict, draw the posterior with "
            "the data, then run the model on it without: samples = Predictive(model, "
            "guide=guide, num_samples=n)(data); Predictive(model, "
            "posterior_samples=samples)(None)"
        )


def enclosing_plates() -> list:
    """The vectorised plates around the caller (draws, vectorised particles). Read it
    outside ``poutine.block``, which hides them."""
    return [frame for frame in get_plates() if frame.vectorized and frame.dim is not None]


def plates_batch_shape(frames) -> torch.Size:
    """The batch shape that the vectorised plates ``frames`` imply."""
    shape: list[int] = []
    for frame in frames:
        shape = [1] * max(0, -frame.dim - len(shape)) + shape
        shape[frame.dim] = frame.size
    return torch.Size(shape)


def _batch_rank_excess(frames, shape: torch.Size) -> tuple[int, torch.Size | None]:
    """The number of batch dimensions the vectorised ``frames`` allow, and ``shape`` if
    it has a non-singleton dimension left of them (else None)."""
    allowed = max((-f.dim for f in frames), default=0)
    extra = shape[: max(0, len(shape) - allowed)]
    return allowed, (shape if any(size > 1 for size in extra) else None)


def check_path_event_shape(name: str, fn) -> None:
    """A path site must keep the ``(num_steps, state_dim)`` event of a LatentDiffusion:
    series go in a plate (each path is guided by its own observations), not in
    ``.to_event``."""
    if fn.event_dim != 2:
        raise ValueError(
            f"Expected path site '{name}' to have the event shape (num_steps, state_dim) of "
            f"a LatentDiffusion, actual event shape {tuple(fn.event_shape)}: put series in "
            "a pyro.plate, not in .to_event(...) (the guide draws each path given its own "
            "observations)"
        )


def check_path_batch_rank(name: str, fn, frames) -> None:
    """A path whose batch shape has more dimensions than its vectorised plates
    ``frames`` (its own and the enclosing ones) is a silent cross product under Pyro's
    ELBOs: the ELBO is wrong and memory grows with the square of the particle count."""
    allowed, shape = _batch_rank_excess(frames, fn.batch_shape)
    if shape is not None:
        raise ValueError(
            f"Expected site '{name}' to have a batch shape of at most {allowed} dimensions "
            f"(its plates {[f.name for f in frames]} at dims {[f.dim for f in frames]}), "
            f"actual batch shape {tuple(shape)}: its drift or diffusion broadcasts a "
            "parameter into extra dimensions (e.g. theta[..., None, None] * x for a "
            "global theta), which makes Pyro's ELBO a cross product; index parameters "
            "so that they broadcast from the right (e.g. theta.unsqueeze(-1) * x)"
        )


def check_site_batch_ranks(trace, path_names: set[str], enclosing) -> None:
    """The same check for the model's other sample sites (the observations above all),
    within their plates and the ``enclosing`` ones: a value computed from a path keeps
    the path's batch on its left, so an observation of a path at several times in a
    plate of its own, indexed as ``path[..., times, 0]``, is under vectorised particles
    a cross product that weighs the likelihood by the number of particles."""
    for name, node in trace.nodes.items():
        if node["type"] != "sample" or name in path_names or site_is_subsample(node):
            continue
        own = [f for f in node["cond_indep_stack"] if f.vectorized and f.dim is not None]
        frames = own + list(enclosing)
        allowed, shape = _batch_rank_excess(frames, node["fn"].batch_shape)
        if shape is not None:
            raise ValueError(
                f"Expected site '{name}' to have a batch shape of at most {allowed} "
                f"dimensions (its plates {[f.name for f in frames]} at dims "
                f"{[f.dim for f in frames]}), actual batch shape {tuple(shape)}: a value "
                "computed from a path keeps the path's batch dimensions on its left, so "
                "a plate over the path's times or coordinates (e.g. "
                "dist.Normal(path[..., times, 0], s) in a plate of observations) makes "
                "Pyro's ELBO a cross product over the particles; observe them as one "
                "event instead: dist.Normal(path[..., times, 0], s).to_event(1)"
            )


def check_noise_columns(name: str, prior: LatentDiffusion) -> None:
    """General noise needs at least ``state_dim`` columns: with fewer the Euler chain's
    noise covariance is singular and no density exists."""
    state_dim = prior.event_shape[-1]
    if prior.noise_type == "general" and prior.noise_dim < state_dim:
        raise ValueError(
            f"Expected the diffusion of site '{name}' to have at least state_dim = "
            f"{state_dim} noise columns with general noise, actual (..., {state_dim}, "
            f"{prior.noise_dim}): the Euler chain's noise covariance is singular, so "
            "neither the model's log_prob nor a guide's density exists; give every "
            "coordinate noise of its own (e.g. append small independent columns to the "
            "diffusion matrix)"
        )


def check_enclosing_plates(enclosing, nesting: int) -> None:
    """A vectorised plate around the guide (draws, particles) at a dim the model's own
    plates use (down to ``-nesting``) would collide with them when the guide runs the
    model, or give the observations' context a wrong shape. Pyro's
    ``Predictive(parallel=True)`` places its plate from the guide's trace alone, which
    does not show plates that are around observations only."""
    for frame in enclosing:
        if -frame.dim <= nesting:
            raise ValueError(
                f"DiffusionGuide: expected the enclosing plate '{frame.name}' at a dim "
                f"left of the model's plates (down to dim -{nesting}), actual dim "
                f"{frame.dim}. Predictive(parallel=True) guesses the plate nesting from "
                "the guide's trace, which does not show plates around observations "
                "only: draw with Predictive(..., parallel=False), with "
                "pyro_latdiff.to_inference_data, or inside pyro.plate(..., "
                f"dim={-(nesting + 1)})"
            )
