"""Pyro trace plumbing shared by :mod:`~pyro_latdiff.infer`,
:mod:`~pyro_latdiff.calibration` and :mod:`~pyro_latdiff.inference_data`: the plate
that vectorises draws, the plate nesting of traces, one run of a guide with the
model replayed on it, and what makes importance weights through a guide meaningless."""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from pyro.distributions import Delta
from pyro.poutine.uncondition_messenger import UnconditionMessenger

from ._validation import check_positive_int

#: Name of the plate that vectorises draws of a model or guide.
SAMPLE_PLATE = "_num_samples"


def vectorize(fn: Callable, size: int, dim: int, name: str = SAMPLE_PLATE) -> Callable:
    """``fn`` run under a plate of ``size`` independent copies at dimension ``dim``."""

    def vectorized(*args, **kwargs):
        with pyro.plate(name, size, dim=dim):
            return fn(*args, **kwargs)

    return vectorized


def guide_and_model_traces(model: Callable, guide: Callable, args, kwargs):
    """One run of ``guide`` and of ``model`` replayed on it, hidden from any enclosing
    handler and without gradients."""
    with poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    return guide_trace, model_trace


def is_deterministic(site: dict) -> bool:
    """Whether a trace site (or a message) is a ``pyro.deterministic`` one: a function
    of the other sites, observed in form only."""
    return bool(site["infer"].get("_deterministic", False))


class _UnconditionData(UnconditionMessenger):
    """``poutine.uncondition`` of the observations only: a ``pyro.deterministic`` site is
    a function of the others, and drawing from its Delta would broadcast the value
    against itself under vectorised plates."""

    def _pyro_sample(self, msg) -> None:
        if not is_deterministic(msg):
            super()._pyro_sample(msg)


def uncondition_data(fn: Callable) -> Callable:
    """``fn`` with its observations drawn from the model (see :class:`_UnconditionData`)."""
    return _UnconditionData()(fn)


def point_mass_sites(guide_trace) -> list[str]:
    """The latent sites that ``guide_trace`` draws from a point mass (``Delta``, as
    :class:`~pyro.infer.autoguide.AutoDelta` does): a proposal without a density, so
    importance weights through them are not weights of the posterior (they give
    ``log p(y, z_hat)``, not ``log p(y)``, with no spread to warn). A guide with
    auxiliary sites has none: its ``Delta`` sites are functions of them, whose density
    the weights count (``AutoMultivariateNormal``'s joint latent, a noising chain)."""
    sample_sites = [site for site in guide_trace.nodes.values() if site["type"] == "sample"]
    if any(site["infer"].get("is_auxiliary") for site in sample_sites):
        return []
    names = []
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        fn = site["fn"]
        while not isinstance(fn, Delta) and hasattr(fn, "base_dist"):
            fn = fn.base_dist
        if isinstance(fn, Delta):
            names.append(name)
    return names


def check_no_point_masses(caller: str, guide_trace) -> None:
    """One error if the guide draws a latent from a point mass (see
    :func:`point_mass_sites`)."""
    names = point_mass_sites(guide_trace)
    if names:
        raise ValueError(
            f"{caller}: expected a guide with a density for every latent, actual sites "
            f"{names} are point masses (Delta, e.g. AutoDelta: a MAP estimate): importance "
            "weights through them estimate log p(y, z_hat), not log p(y); use a guide with "
            "a spread for them (e.g. latent_guide=AutoNormal)"
        )


def subsampled_plates(trace) -> list[str]:
    """The names of the plates of ``trace`` that hold only some of their members."""
    names = {
        frame.name
        for site in trace.nodes.values()
        for frame in site.get("cond_indep_stack", ())
        if frame.full_size is not None and frame.size != frame.full_size
    }
    return sorted(names)


def check_full_plates(caller: str, model_trace, why: str) -> None:
    """One error if a plate of ``model_trace`` is subsampled: ``caller``'s result would
    not describe the data (``why``)."""
    subsampled = subsampled_plates(model_trace)
    if subsampled:
        raise ValueError(
            f"{caller}: expected the model's plates to hold all their members, actual "
            f"subsampled plates {subsampled}: {why}; call the model without subsampling"
        )


def plate_nesting(*traces) -> int:
    """The deepest vectorised plate dimension of the sample sites in ``traces``."""
    dims = [
        -frame.dim
        for trace in traces
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


def resolve_max_plate_nesting(
    model: Callable, guide: Callable, args, kwargs, given=None, traces=None
) -> int:
    """The deepest plate dimension ``model`` and ``guide`` use, found by tracing both
    once (as :class:`~pyro.infer.ELBO` does when not told) unless their ``traces`` are
    given; a ``given`` value is checked to be at least that deep and returned."""
    if traces is None:
        traces = guide_and_model_traces(model, guide, args, kwargs)
    needed = plate_nesting(*traces)
    if given is None:
        return needed
    return check_positive_int("max_plate_nesting", given, minimum=needed)
