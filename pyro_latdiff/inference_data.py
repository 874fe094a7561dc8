"""ArviZ conversion of a fitted guide, and importance-sampling diagnostics of the fit.

Every call into ArviZ lives in this module (ArviZ 0.23.x), so that a port to ArviZ 1.x
touches one file.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import arviz as az
import numpy as np
import pyro
import torch
import xarray as xr
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from ._traces import (
    SAMPLE_PLATE,
    check_full_plates,
    guide_and_model_traces,
    is_deterministic,
    point_mass_sites,
    resolve_max_plate_nesting,
    uncondition_data,
    vectorize,
)
from ._validation import check_model_and_guide, check_positive_int, chunk_size_or_default
from .distribution import latent_diffusion_of
from .infer import effective_sample_size

__all__ = [
    "ImportanceDiagnostics",
    "K_HAT_BAD",
    "K_HAT_GOOD",
    "importance_mean",
    "psis_diagnostics",
    "to_inference_data",
]

#: PSIS k-hat thresholds (Yao et al. 2018): at most ``K_HAT_GOOD`` the importance
#: weights, and so the guide, are good; at most ``K_HAT_BAD`` usable; above, the guide
#: is too far from the posterior to be trusted, and so are its importance corrections.
K_HAT_GOOD = 0.5
K_HAT_BAD = 0.7


def _event_dim(site: dict, leading: int) -> int:
    """A site's event rank in a trace whose values have ``leading`` dimensions of draws
    and plates. A ``pyro.deterministic`` site counts every dimension of its value as an
    event by default (``event_dim = value.dim()``), the draws' and plates' too: its
    event dimensions are those right of them."""
    if is_deterministic(site):
        return max(0, site["value"].dim() - leading)
    return site["fn"].event_dim


def _sites(trace, observed: bool):
    """Sample sites of ``trace``: the observed ones, or the latent ones together with
    ``pyro.deterministic`` sites (functions of the latents, not observations)."""
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site) or name == SAMPLE_PLATE:
            continue
        is_observed = bool(site["is_observed"]) and not is_deterministic(site)
        if is_observed is observed:
            yield name, site


def _per_draw(log_prob: Tensor, num_samples: int, max_plate_nesting: int) -> Tensor:
    """Sum a site's log-density over every dimension but the sample dimension."""
    if log_prob.dim() < max_plate_nesting + 1:
        return log_prob.sum().expand(num_samples)
    return (
        log_prob.reshape(
            log_prob.shape[: log_prob.dim() - max_plate_nesting - 1] + (num_samples, -1)
        )
        .sum(-1)
        .reshape(num_samples)
    )


class _Layout:
    """Names the dimensions of each site and collects the coordinates.

    Batch dimensions under a plate are named after the plate; other batch dimensions
    of size 1 are dropped, larger ones named ``{site}_dim_{i}``. A path site's event
    dimensions are ``time`` (coordinate: the grid without its first point) and
    ``state``; if two path sites disagree on the grid or the state dimension, the later
    one gets ``{site}_time`` / ``{site}_state``. Other event dimensions are named
    ``{site}_dim_{i}``.
    """

    def __init__(self, max_plate_nesting: int):
        self.max_plate_nesting = max_plate_nesting
        self.coords: dict[str, np.ndarray] = {}
        self.dims: dict[str, list[str]] = {}
        self._batch_keep: dict[str, list[bool]] = {}

    def _coord(self, site_name: str, dim: str, values: np.ndarray) -> str:
        old = self.coords.get(dim)
        if old is not None and (old.shape != values.shape or not np.allclose(old, values)):
            dim = f"{site_name}_{dim}"
        self.coords[dim] = values
        return dim

    def add(self, name: str, site: dict, batch_shape: torch.Size, event_dim: int) -> None:
        """``batch_shape``: the site's batch shape without the sample dimension, padded
        on the left to ``max_plate_nesting`` dimensions; ``event_dim`` its event rank."""
        if name in self.dims:
            return
        frames = {f.dim: f for f in site["cond_indep_stack"] if f.vectorized}
        dims, keep, extra = [], [], 0
        for i, size in enumerate(batch_shape):
            frame = frames.get(i - len(batch_shape))
            if frame is not None:
                dims.append(self._coord(name, frame.name, np.arange(size)))
                keep.append(True)
            elif size == 1:
                keep.append(False)
            else:
                dims.append(f"{name}_dim_{extra}")
                extra += 1
                keep.append(True)
        path = latent_diffusion_of(site["fn"])
        if path is not None:
            times = path.times.detach().cpu().numpy()[1:]
            dims.append(self._coord(name, "time", times))
            dims.append(self._coord(name, "state", np.arange(path.state_dim)))
        else:
            for _ in range(event_dim):
                dims.append(f"{name}_dim_{extra}")
                extra += 1
        self.dims[name] = dims
        self._batch_keep[name] = keep

    def array(self, name: str, value: Tensor, event_dim: int, leading: int) -> np.ndarray:
        """``value`` with ``leading`` sample dimensions, batch dimensions aligned on the
        plates' positions (padded to ``max_plate_nesting``), dropped batch dimensions
        squeezed: a numpy array matching ``self.dims[name]``."""
        value = value.detach()
        batch_rank = value.dim() - event_dim - leading
        if batch_rank > self.max_plate_nesting:
            raise ValueError(
                f"Expected site '{name}' to have at most max_plate_nesting = "
                f"{self.max_plate_nesting} batch dimensions, actual shape {tuple(value.shape)}"
            )
        pad = (1,) * (self.max_plate_nesting - batch_rank)
        value = value.reshape(value.shape[:leading] + pad + value.shape[leading:])
        keep = self._batch_keep[name]
        drop = [leading + i for i, k in enumerate(keep) if not k]
        for axis in reversed(drop):
            value = value.squeeze(axis)
        return value.cpu().numpy()


def to_inference_data(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1000,
    num_chains: int = 4,
    num_prior_samples: int = 0,
    chunk_size: int | None = None,
    max_plate_nesting: int | None = None,
    **kwargs,
) -> az.InferenceData:
    r"""Draw from a fitted guide and convert the draws to :class:`arviz.InferenceData`.

    The guide's draws :math:`z_s \sim q` are independent, so the ``num_chains`` chains
    are an arbitrary split of ``num_chains * num_samples`` draws (several chains let
    :func:`arviz.summary` report ``r_hat`` without warnings). Groups:

    - ``posterior``: every latent site. A :class:`~pyro_latdiff.LatentDiffusion` path
      has dims ``(chain, draw, *plates, time, state)``, the ``time`` coordinate being
      the grid without its first point (the times of the path's states); plate
      dimensions are named after the plate.
    - ``posterior_predictive``: each observed site re-simulated from the model given the
      draws of the latents.
    - ``observed_data``: the observed values, with the same dims.
    - ``log_likelihood``: each observed site's log-density at each draw, pointwise
      (one value per element of the site's batch shape, so :func:`arviz.loo` sees one
      observation per plate element; an event dimension is one observation).
    - ``sample_stats``: ``log_weight`` :math:`= \log p(y, z_s) - \log q(z_s)`, the
      importance log-weights used by :func:`psis_diagnostics`, with ``lp``
      :math:`= \log p(y, z_s)` and ``log_q`` :math:`= \log q(z_s)`. A guide that
      draws a latent from a point mass (``AutoDelta``) has no weights: only ``lp``, and
      the attribute ``point_mass_sites`` names those sites.
    - ``prior`` and ``prior_predictive`` (only if ``num_prior_samples > 0``): draws of
      the latent and observed sites from the model, in one chain.

    Example::

        guide = DiffusionGuide(model)
        fit(model, guide, y, num_steps=1000)
        data = to_inference_data(model, guide, y, num_samples=500)
        print(az.summary(data, var_names=["theta"]), az.loo(data))

    :param callable model: Pyro model.
    :param callable guide: its fitted guide.
    :param int num_samples: draws per chain.
    :param int num_chains: number of chains the draws are split into.
    :param int num_prior_samples: draws from the prior (0: no prior groups).
    :param int chunk_size: draws per vectorised pass (default: all, at most 1000).
    :param int max_plate_nesting: as in :class:`~pyro.infer.ELBO`; found by tracing if
        omitted.
    :rtype: arviz.InferenceData
    """
    check_model_and_guide(model, guide, args, kwargs)
    check_positive_int("num_samples", num_samples)
    check_positive_int("num_chains", num_chains)
    check_positive_int("num_prior_samples", num_prior_samples, minimum=0)
    num_draws = num_samples * num_chains
    chunk_size = chunk_size_or_default(chunk_size, num_draws)
    traces = guide_and_model_traces(model, guide, args, kwargs)
    check_full_plates(
        "to_inference_data",
        traces[1],
        "each chunk of draws would hold other members (the observed data too) and the "
        "weights say nothing of the data",
    )
    max_plate_nesting = resolve_max_plate_nesting(
        model, guide, args, kwargs, max_plate_nesting, traces
    )
    layout = _Layout(max_plate_nesting)
    # Through a point mass the weights are not importance weights: left out, and
    # psis_diagnostics says why.
    point_masses = point_mass_sites(traces[0])
    groups: dict[str, dict[str, list]] = {
        name: {}
        for name in (
            "posterior",
            "posterior_predictive",
            "log_likelihood",
            "sample_stats",
            "prior",
            "prior_predictive",
        )
    }
    observed: dict[str, np.ndarray] = {}

    def append(group: str, name: str, array: np.ndarray) -> None:
        groups[group].setdefault(name, []).append(array)

    with poutine.block(), torch.no_grad():
        for start in range(0, num_draws, chunk_size):
            size = min(chunk_size, num_draws - start)
            guide_trace = poutine.trace(vectorize(guide, size, -(max_plate_nesting + 1))).get_trace(
                *args, **kwargs
            )
            vectorized_model = vectorize(model, size, -(max_plate_nesting + 1))
            model_trace = poutine.trace(
                poutine.replay(vectorized_model, trace=guide_trace)
            ).get_trace(*args, **kwargs)
            predictive_trace = poutine.trace(
                uncondition_data(poutine.replay(vectorized_model, trace=guide_trace))
            ).get_trace(*args, **kwargs)
            model_trace.compute_log_prob()
            guide_trace.compute_log_prob()
            log_p = sum(
                _per_draw(site["log_prob"], size, max_plate_nesting)
                for observed_ in (False, True)
                for _, site in _sites(model_trace, observed=observed_)
                if not is_deterministic(site)
            )
            log_q = sum(
                _per_draw(site["log_prob"], size, max_plate_nesting)
                for _, site in _sites(guide_trace, observed=False)
            )
            append("sample_stats", "lp", log_p.cpu().numpy())
            if not point_masses:
                append("sample_stats", "log_q", torch.as_tensor(log_q).cpu().numpy())
                append("sample_stats", "log_weight", (log_p - log_q).cpu().numpy())
            for name, site in _sites(model_trace, observed=False):
                event_dim = _add(layout, name, site, max_plate_nesting)
                append("posterior", name, layout.array(name, site["value"], event_dim, 1))
            for name, site in _sites(model_trace, observed=True):
                event_dim = _add(layout, name, site, max_plate_nesting)
                append("log_likelihood", name, layout.array(name, site["log_prob"], 0, 1))
                value = predictive_trace.nodes[name]["value"]
                append("posterior_predictive", name, layout.array(name, value, event_dim, 1))
                if name not in observed:
                    # as the site's density sees it: an observation that broadcasts over
                    # a plate (obs=torch.tensor(1.0)) is one value per member
                    fn = site["fn"]
                    shape = _without_draws(fn.batch_shape, max_plate_nesting) + fn.event_shape
                    value = site["value"].expand(shape)
                    observed[name] = layout.array(name, value, event_dim, 0)
        for start in range(0, num_prior_samples, chunk_size):
            size = min(chunk_size, num_prior_samples - start)
            prior_trace = poutine.trace(
                uncondition_data(vectorize(model, size, -(max_plate_nesting + 1)))
            ).get_trace(*args, **kwargs)
            for name, site in _sites(prior_trace, observed=False):
                was_observed = site["infer"].get("was_observed", False) and not is_deterministic(
                    site
                )
                event_dim = _add(layout, name, site, max_plate_nesting)
                append(
                    "prior_predictive" if was_observed else "prior",
                    name,
                    layout.array(name, site["value"], event_dim, 1),
                )

    data = _assemble(groups, observed, layout, num_chains, num_samples, num_prior_samples)
    if point_masses:
        data.sample_stats.attrs["point_mass_sites"] = point_masses
    return data


def _add(layout: _Layout, name: str, site: dict, max_plate_nesting: int) -> int:
    """Lay out the site's dimensions (once per site); returns its event rank."""
    event_dim = _event_dim(site, max_plate_nesting + 1)
    if is_deterministic(site):
        value = site["value"]
        batch = value.shape[: value.dim() - event_dim]
    else:
        batch = site["fn"].batch_shape
    batch = _without_draws(batch, max_plate_nesting)
    batch = torch.Size((1,) * (max_plate_nesting - len(batch))) + batch
    layout.add(name, site, batch, event_dim)
    return event_dim


def _without_draws(batch: torch.Size, max_plate_nesting: int) -> torch.Size:
    """A batch shape without the draws' dimension (the ``max_plate_nesting + 1``-th from
    the right), where it has one."""
    if len(batch) > max_plate_nesting:
        return batch[len(batch) - max_plate_nesting :]
    return batch


def _log_likelihood_dims(layout: _Layout, name: str) -> list[str]:
    # The log-density has the site's batch dimensions only: drop the event dimensions.
    dims = layout.dims[name]
    return [d for d in dims if d not in _event_dims(layout, name)]


def _event_dims(layout: _Layout, name: str) -> list[str]:
    keep = sum(layout._batch_keep[name])
    return layout.dims[name][keep:]


def _dataset(
    arrays: dict[str, np.ndarray],
    layout: _Layout,
    dims: dict[str, list[str]],
    sample_dims: Sequence[str],
) -> xr.Dataset:
    used = {d for name in arrays for d in dims[name]}
    coords = {d: v for d, v in layout.coords.items() if d in used}
    return az.dict_to_dataset(
        arrays, library=pyro, coords=coords, dims=dims, default_dims=list(sample_dims)
    )


def _assemble(groups, observed, layout, num_chains, num_samples, num_prior_samples):
    def stack(arrays, chains, draws):
        out = {}
        for name, pieces in arrays.items():
            value = np.concatenate(pieces, axis=0)
            out[name] = value.reshape((chains, draws) + value.shape[1:])
        return out

    full_dims = layout.dims
    loglik_dims = {name: _log_likelihood_dims(layout, name) for name in full_dims}
    datasets = {}
    for group in ("posterior", "posterior_predictive", "log_likelihood", "sample_stats"):
        arrays = stack(groups[group], num_chains, num_samples)
        dims = loglik_dims if group == "log_likelihood" else full_dims
        if group == "sample_stats":
            dims = {name: [] for name in arrays}
        datasets[group] = _dataset(arrays, layout, dims, ("chain", "draw"))
    datasets["observed_data"] = _dataset(observed, layout, full_dims, ())
    if num_prior_samples:
        for group in ("prior", "prior_predictive"):
            arrays = stack(groups[group], 1, num_prior_samples)
            if arrays:
                datasets[group] = _dataset(arrays, layout, full_dims, ("chain", "draw"))
    return az.InferenceData(**datasets)


@dataclass(frozen=True)
class ImportanceDiagnostics:
    """How well a guide serves as an importance proposal for the posterior.

    :ivar float k_hat: Pareto-smoothed importance sampling shape estimate of the
        weights' tail (Yao et al. 2018); see :attr:`verdict`.
    :ivar float ess: effective sample size ``(sum w)^2 / sum w^2`` of the raw weights.
    :ivar float psis_ess: the same, of the Pareto-smoothed weights.
    :ivar int num_draws: number of draws.
    :ivar numpy.ndarray log_weights: Pareto-smoothed, normalised log-weights,
        shape ``(chain, draw)``.
    """

    k_hat: float
    ess: float
    psis_ess: float
    num_draws: int
    log_weights: np.ndarray

    @property
    def verdict(self) -> str:
        """``"good"`` (k-hat <= 0.5), ``"usable"`` (<= 0.7) or ``"unreliable"``: above
        0.7 the guide is too far from the posterior to trust it or its importance
        corrections."""
        if self.k_hat <= K_HAT_GOOD:
            return "good"
        if self.k_hat <= K_HAT_BAD:
            return "usable"
        return "unreliable"

    def __str__(self) -> str:
        return (
            f"PSIS k-hat {self.k_hat:.3f} ({self.verdict}), importance ESS "
            f"{self.ess:.1f}/{self.num_draws} (smoothed {self.psis_ess:.1f})"
        )


def psis_diagnostics(data: az.InferenceData) -> ImportanceDiagnostics:
    r"""PSIS diagnostics of the importance weights :math:`w_s = p(y, z_s) / q(z_s)` of
    the guide's draws in ``data`` (as made by :func:`to_inference_data`).

    Pareto-smoothed importance sampling (:func:`arviz.psislw`) fits a generalised
    Pareto distribution to the largest weights; its shape ``k_hat`` measures how far
    the guide is from the posterior: ``k_hat <= 0.5`` good, ``<= 0.7`` usable, above
    that the guide, and importance corrections of it, should not be trusted (Yao,
    Vehtari, Simpson & Gelman 2018, *Yes, but did it work?: Evaluating variational
    inference*).

    :param arviz.InferenceData data: with ``sample_stats.log_weight``.
    :rtype: ImportanceDiagnostics
    """
    log_weights = _log_weights(data)
    shape = log_weights.shape
    flat = log_weights.reshape(-1)
    if not np.isfinite(flat).all():
        raise ValueError("Expected finite `sample_stats.log_weight`, actual NaN or inf")
    smoothed, k_hat = az.psislw(flat, reff=1.0)
    return ImportanceDiagnostics(
        k_hat=float(k_hat),
        ess=effective_sample_size(flat),
        psis_ess=effective_sample_size(smoothed),
        num_draws=flat.shape[0],
        log_weights=np.asarray(smoothed).reshape(shape),
    )


def _log_weights(data) -> np.ndarray:
    if not isinstance(data, az.InferenceData):
        raise TypeError(
            f"Expected `data` to be an arviz.InferenceData, actual {type(data).__name__}"
        )
    if "sample_stats" in data.groups() and data.sample_stats.attrs.get("point_mass_sites"):
        raise ValueError(
            "Expected `data` from a guide with a density for every latent, actual sites "
            f"{list(data.sample_stats.attrs['point_mass_sites'])} are point masses (Delta, "
            "e.g. AutoDelta): its draws have no importance weights (to_inference_data left "
            "`log_weight` out); use a guide with a spread for them (e.g. "
            "latent_guide=AutoNormal)"
        )
    if "sample_stats" not in data.groups() or "log_weight" not in data.sample_stats:
        raise ValueError(
            "Expected `data` to have `sample_stats.log_weight` (use to_inference_data), "
            f"actual groups {data.groups()}"
        )
    return data.sample_stats["log_weight"].transpose("chain", "draw").values


def importance_mean(
    data: az.InferenceData,
    fn: Callable[[xr.Dataset], xr.Dataset | xr.DataArray] | None = None,
    *,
    var_names: Sequence[str] | None = None,
) -> xr.Dataset | xr.DataArray:
    r"""Importance-corrected posterior expectations
    :math:`\sum_s \tilde w_s f(z_s)` with the Pareto-smoothed, normalised weights
    :math:`\tilde w_s` of :func:`psis_diagnostics`: consistent for the exact
    posterior whenever ``k_hat <= 0.7``, whatever the guide's bias.

    Example: the posterior mean and second moment of ``theta``::

        mean = importance_mean(data, var_names=["theta"])["theta"]
        second = importance_mean(data, lambda post: post["theta"] ** 2)

    :param arviz.InferenceData data: as made by :func:`to_inference_data`.
    :param callable fn: maps the posterior :class:`xarray.Dataset` to the quantities
        to average (default: the posterior itself).
    :param list var_names: posterior variables to keep before applying ``fn``.
    :returns: the expectations, with the ``chain`` and ``draw`` dimensions reduced.
    :rtype: xarray.Dataset or xarray.DataArray
    """
    log_weights = psis_diagnostics(data).log_weights
    posterior = data.posterior
    if var_names is not None:
        posterior = posterior[[var_names] if isinstance(var_names, str) else list(var_names)]
    values = posterior if fn is None else fn(posterior)
    weights = xr.DataArray(
        np.exp(log_weights - log_weights.max()),
        dims=("chain", "draw"),
        coords={"chain": posterior.chain, "draw": posterior.draw},
    )
    weights = weights / weights.sum()
    return (values * weights).sum(("chain", "draw"))
