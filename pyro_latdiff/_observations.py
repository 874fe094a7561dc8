"""The observations of a path as its guide sees them: the model run with reference
paths in place of the latent paths (nothing simulated), the values of the sites that
share a path's plates (the guide's default context), and the observations'
log-likelihood, which :mod:`~pyro_latdiff.filter` expands around the reference path.
Used by :mod:`~pyro_latdiff.guide`'s pre-pass."""

from __future__ import annotations

import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from ._shapes import broadcast_shapes
from ._traces import is_deterministic
from .distribution import LatentDiffusion, latent_diffusion_of

__all__ = ["ReferencePaths", "observation_log_likelihood", "shared_plate_values"]


class ReferencePaths(Messenger):
    """Sets each path site in ``names`` to a reference path (no simulation), by default
    the constant initial state, as a leaf tensor, so the observation log-likelihood can
    be differentiated with respect to every state.

    :param set names: the path sites to replace.
    :param torch.Size batch_shape: a batch the references are broadcast to (e.g. the
        enclosing vectorised particles), on top of each site's own.
    :param dict references: a reference path by site name (None or absent: constant).

    After the run, :attr:`paths` holds each site's leaf and :attr:`references` its
    reference broadcast to the site's batch: a view, which keeps no path-sized copy once
    the leaf is gone.
    """

    def __init__(self, names: set[str], batch_shape: torch.Size, references: dict):
        super().__init__()
        self.names = names
        self.batch_shape = batch_shape
        self.references = dict(references)
        self.paths: dict[str, Tensor] = {}
        self.fns: dict[str, LatentDiffusion] = {}

    def _pyro_sample(self, msg):
        if msg["name"] not in self.names:
            return
        fn = latent_diffusion_of(msg["fn"])
        batch = broadcast_shapes(msg["fn"].batch_shape, self.batch_shape)
        reference = self.references.get(msg["name"])
        if reference is None:
            reference = fn.x0.detach().unsqueeze(-2)
        reference = reference.detach().expand(batch + fn.event_shape)
        # The leaf is the reference broadcast (a view, no copy): the observation terms'
        # graph keeps it until the backward pass, where a copy would be path-sized.
        path = reference.detach().requires_grad_()
        self.paths[msg["name"]] = path
        self.references[msg["name"]] = reference
        self.fns[msg["name"]] = fn
        msg["value"] = path
        msg["is_observed"] = True


def shared_plate_values(path_site: dict, trace, path_names: set[str]) -> list[Tensor]:
    """The values of the other sites of ``trace`` that share the path's plates:
    observations and the guide's values of the other latents, one
    ``batch + (features,)`` tensor per site.

    A site shares the path's plates if its plates contain them (e.g. the observations
    of each path) or are contained in them (e.g. a global parameter). Dimensions of
    plates the path is not in (several observations per path) are folded into the
    features, leaving a singleton in their place. Deterministic sites (functions of
    the others) are left out.
    """
    path_frames = {f.name for f in path_site["cond_indep_stack"] if f.vectorized}
    pieces = []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or name in path_names or site_is_subsample(site):
            continue
        if is_deterministic(site):
            continue
        frames = [f for f in site["cond_indep_stack"] if f.vectorized]
        names = {f.name for f in frames}
        if not (path_frames <= names or names <= path_frames):
            continue
        value = site["value"]
        if not isinstance(value, Tensor):
            raise ValueError(
                f"Expected the value of site '{name}' to be a torch.Tensor, actual "
                f"{type(value).__name__} (convert observations with torch.as_tensor)"
            )
        event_dim = site["fn"].event_dim
        value = value.reshape(value.shape[: value.dim() - event_dim] + (-1,))
        for frame in frames:
            if frame.name in path_frames or -frame.dim >= value.dim():
                continue
            value = value.movedim(frame.dim - 1, -1)
            value = value.reshape(value.shape[:-2] + (-1,)).unsqueeze(frame.dim - 1)
        pieces.append(value)
    return pieces


def observation_log_likelihood(trace, path_names: set[str]):
    """The log-likelihood of the observed sites of ``trace`` (and of the guide's values
    of the other latents, observed there), without the minibatch scale of subsampled
    plates: each path's guided kernel needs its own observations' likelihood, not the
    scaled-up estimator's. Masks and any other ``poutine.scale`` are kept."""
    total = 0.0
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or not site["is_observed"] or name in path_names:
            continue
        if site_is_subsample(site) or is_deterministic(site):
            continue
        minibatch = 1.0
        for frame in site["cond_indep_stack"]:
            if frame.full_size is not None and frame.full_size != frame.size:
                minibatch *= frame.full_size / frame.size
        log_prob = site["fn"].log_prob(site["value"])
        total = total + scale_and_mask(log_prob, site["scale"] / minibatch, site["mask"]).sum()
    return total
