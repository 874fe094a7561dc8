"""Simulation-based calibration of a guide (Talts et al. 2018)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from scipy import stats
from torch import Tensor
from tqdm.auto import tqdm

from ._traces import SAMPLE_PLATE, is_deterministic, plate_nesting, uncondition_data, vectorize
from ._validation import check_positive_int, check_signature
from .guide import DiffusionGuide
from .infer import fit

__all__ = ["Calibration", "calibrate", "rank_histogram", "rank_test"]

_SIMULATION_PLATE = "_simulations"

Quantity = Callable[[dict[str, Tensor]], Tensor]


def rank_histogram(
    ranks, num_samples: int, num_bins: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Counts of ranks in ``num_bins`` bins, and each bin's expected count if the ranks
    were uniform on ``{0, ..., num_samples}``.

    Rank ``r`` falls in bin ``floor(r * num_bins / (num_samples + 1))``; the bins may
    hold unequal numbers of rank values, and the expected counts are exact.

    :param ranks: integer ranks, any shape (flattened).
    :type ranks: numpy.ndarray
    :param int num_samples: number ``L`` of posterior draws each rank was taken among.
    :param int num_bins: number of bins; default about one per 10 ranks, 2 to 20, at
        most one per rank value.
    :returns: ``(counts, expected)``, two arrays of length ``num_bins``.
    :rtype: tuple(numpy.ndarray, numpy.ndarray)
    """
    check_positive_int("num_samples", num_samples)
    ranks = np.asarray(ranks).reshape(-1)
    if ranks.size == 0:
        raise ValueError("Expected `ranks` to be non-empty, actual size 0")
    if not np.issubdtype(ranks.dtype, np.integer) or ranks.min() < 0 or (ranks.max() > num_samples):
        raise ValueError(
            f"Expected `ranks` to be integers in [0, {num_samples}] (num_samples), actual "
            f"dtype {ranks.dtype}, range [{ranks.min()}, {ranks.max()}]"
        )
    length = num_samples + 1
    if num_bins is None:
        num_bins = int(max(2, min(20, ranks.size // 10, length)))
    check_positive_int("num_bins", num_bins, minimum=2)
    if num_bins > length:
        raise ValueError(f"Expected `num_bins` <= num_samples + 1 = {length}, actual {num_bins}")
    counts = np.bincount(ranks * num_bins // length, minlength=num_bins)
    per_bin = np.bincount(np.arange(length) * num_bins // length, minlength=num_bins)
    return counts, ranks.size * per_bin / length


def rank_test(ranks, num_samples: int, num_bins: int | None = None) -> tuple[float, float]:
    r"""Chi-square test that ranks are uniform on ``{0, ..., num_samples}``, on the bins
    of :func:`rank_histogram`.

    :param ranks: integer ranks, any shape (flattened).
    :type ranks: numpy.ndarray
    :param int num_samples: number ``L`` of posterior draws each rank was taken among.
    :param int num_bins: number of bins; default about one per 10 ranks, 2 to 20.
    :returns: ``(statistic, p_value)``.
    :rtype: tuple(float, float)
    """
    statistic, p_value = stats.chisquare(*rank_histogram(ranks, num_samples, num_bins))
    return float(statistic), float(p_value)


@dataclass(frozen=True)
class Calibration:
    """Rank statistics of a simulation-based calibration run.

    :ivar dict ranks: quantity name to an integer array of shape
        ``(num_simulations,)``: the number of the ``num_samples`` posterior draws below
        the prior draw, uniform on ``{0, ..., num_samples}`` for a calibrated guide.
    :ivar int num_samples: posterior draws per simulation.
    """

    ranks: dict[str, np.ndarray]
    num_samples: int

    @property
    def num_simulations(self) -> int:
        return len(next(iter(self.ranks.values())))

    def test(self, num_bins: int | None = None) -> dict[str, tuple[float, float]]:
        """:func:`rank_test` of every quantity: name to ``(statistic, p_value)``."""
        return {name: rank_test(r, self.num_samples, num_bins) for name, r in self.ranks.items()}

    def p_values(self, num_bins: int | None = None) -> dict[str, float]:
        """The p-values of :meth:`test`."""
        return {name: p for name, (_, p) in self.test(num_bins).items()}

    def __str__(self) -> str:
        lines = [
            f"SBC: {self.num_simulations} simulations, {self.num_samples} posterior "
            "draws each; chi-square test of uniform ranks"
        ]
        for name, (statistic, p_value) in self.test().items():
            lines.append(f"  {name:20s} chi2 {statistic:8.2f}   p-value {p_value:.4f}")
        return "\n".join(lines)


def _aligned(value: Tensor, event_dim: int, rank: int) -> Tensor:
    """Pad ``value``'s batch shape on the left to ``rank`` dimensions."""
    batch_rank = value.dim() - event_dim
    return value.reshape((1,) * (rank - batch_rank) + tuple(value.shape))


def _check_quantity_names(quantities, truth: dict, data: dict, deterministic: set) -> None:
    """Quantities given by name name latent sites of the model (before any fit)."""
    if isinstance(quantities, str):
        quantities = [quantities]
    if isinstance(quantities, Mapping):
        return
    for name in quantities:
        if name not in truth:
            what = (
                "an observed site"
                if name in data
                else "a pyro.deterministic site, which a guide does not draw"
                if name in deterministic
                else "not a site of the model"
            )
            raise ValueError(
                f"Expected `quantities` to name latent sites of the model, {sorted(truth)}, "
                f"actual '{name}' is {what} (a function of the latents is given as a "
                "mapping of names to callables)"
            )


def _quantity_fns(quantities) -> dict[str, Quantity]:
    if isinstance(quantities, str):
        quantities = [quantities]
    if isinstance(quantities, Mapping):
        fns = dict(quantities)
    elif isinstance(quantities, Sequence):
        fns = {name: (lambda values, name=name: values[name]) for name in quantities}
    else:
        raise TypeError(
            "Expected `quantities` to be a sequence of site names or a mapping of names to "
            f"callables, actual {type(quantities).__name__}"
        )
    if not fns:
        raise ValueError("Expected at least one quantity in `quantities`, actual none")
    for name, fn in fns.items():
        if not callable(fn):
            raise TypeError(f"Expected `quantities['{name}']` to be callable, actual {fn!r}")
    return fns


def _default_fit(num_steps: int):
    def fit_fn(model, guide, *args, **kwargs):
        fit(model, guide, *args, num_steps=num_steps, progress=False, **kwargs)

    return fit_fn


def calibrate(
    model: Callable,
    *args,
    quantities: Sequence[str] | Mapping[str, Quantity],
    num_simulations: int = 100,
    num_samples: int = 99,
    simulations_per_fit: int = 1,
    guide_fn: Callable[[Callable], Callable] = DiffusionGuide,
    fit_fn: Callable | None = None,
    num_steps: int = 500,
    progress: bool = False,
    **kwargs,
) -> Calibration:
    r"""Simulation-based calibration (SBC) of a guide.

    For each simulation ``i``: draw latents :math:`z_i^*` and data :math:`y_i` from the
    model (observed sites are sampled, their values in ``args`` ignored); fit a fresh
    guide to :math:`y_i`; draw ``L = num_samples`` posterior samples from it; record
    the rank of each quantity :math:`f(z_i^*)` among :math:`f(z_{i,1}), ...,
    f(z_{i,L})`. If the guide were the exact posterior, each rank would be uniform on
    ``{0, ..., L}`` (Talts, Betancourt, Simpson, Vehtari & Gelman 2018, *Validating
    Bayesian inference algorithms with simulation-based calibration*). An
    over-confident guide puts too many ranks at both ends, an under-confident one too
    many in the middle, a biased one too many on one side; test with
    :meth:`Calibration.test`, plot with :func:`pyro_latdiff.plots.plot_ranks`.

    ``simulations_per_fit > 1`` fits that many simulations at once, as independent
    replicates of the model under an outer plate: each keeps its own parameters for
    the non-path latents, while the path sites' control network is shared (amortised
    over the data and latents in its context). Far cheaper; the fit of one data set
    then depends on the others only through the shared network. The model must
    broadcast over the extra batch dimension, as a model written for vectorised
    particles does.

    Example::

        result = calibrate(model, y, times, obs_scale, quantities=["theta"],
                           num_simulations=100, simulations_per_fit=100, num_steps=300)
        print(result.p_values())   # {'theta': ...}

    :param callable model: Pyro model; ``args`` and ``kwargs`` are its arguments.
    :param quantities: names of latent sites (each element of the site is a quantity,
        named ``"name"`` for one element, ``"name[i]"`` else), or a mapping of names to
        callables ``f(values)``; ``values`` maps each latent site to a tensor of shape
        ``(draws,) + shape`` (``shape`` the site's shape in one simulation, left-padded
        with ones to the model's plate nesting) and ``f`` returns ``(draws, ...)``.
    :type quantities: list or dict
    :param int num_simulations: number of simulated data sets.
    :param int num_samples: posterior draws per simulation (``L``; ``L + 1`` a multiple
        of the number of bins keeps bins equal).
    :param int simulations_per_fit: simulations fitted together (see above).
    :param callable guide_fn: builds a guide from a model (default
        :class:`~pyro_latdiff.DiffusionGuide`).
    :param callable fit_fn: ``fit_fn(model, guide, *args, **kwargs)`` trains the guide
        (default: :func:`~pyro_latdiff.fit` with ``num_steps`` steps); it may also
        alter the trained guide.
    :param int num_steps: SVI steps of the default ``fit_fn``.
    :param bool progress: show a progress bar over the fits.
    :rtype: Calibration
    """
    check_signature("model", model, args, kwargs)
    check_positive_int("num_simulations", num_simulations)
    check_positive_int("num_samples", num_samples)
    check_positive_int("simulations_per_fit", simulations_per_fit)
    check_positive_int("num_steps", num_steps)
    if not callable(guide_fn):
        raise TypeError(f"Expected `guide_fn` to be callable, actual {guide_fn!r}")
    fns = _quantity_fns(quantities)
    fit_fn = _default_fit(num_steps) if fit_fn is None else fit_fn
    with poutine.block(), torch.no_grad():
        nesting = plate_nesting(poutine.trace(uncondition_data(model)).get_trace(*args, **kwargs))
    ranks: dict[str, list[np.ndarray]] = {}
    starts = range(0, num_simulations, simulations_per_fit)
    for start in tqdm(starts, disable=not progress, desc="SBC"):
        size = min(simulations_per_fit, num_simulations - start)
        replicated = vectorize(model, size, -(nesting + 1), _SIMULATION_PLATE)
        with poutine.block(), torch.no_grad():
            prior = poutine.trace(uncondition_data(replicated)).get_trace(*args, **kwargs)
        data, truth, event_dims, deterministic = {}, {}, {}, set()
        for name, site in prior.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if is_deterministic(site):
                deterministic.add(name)  # a function of the others: not data, nor drawn
                continue
            if site["infer"].get("was_observed", False):
                data[name] = site["value"]
            else:
                event_dims[name] = site["fn"].event_dim
                truth[name] = _aligned(site["value"], event_dims[name], nesting + 1)
        if start == 0:
            _check_quantity_names(quantities, truth, data, deterministic)
        conditioned = poutine.condition(replicated, data=data)
        with pyro.get_param_store().scope():
            guide = guide_fn(conditioned)
            fit_fn(conditioned, guide, *args, **kwargs)
            sampler = vectorize(guide, num_samples, -(nesting + 2), SAMPLE_PLATE)
            with poutine.block(), torch.no_grad():
                draws = poutine.trace(sampler).get_trace(*args, **kwargs)
        posterior = {
            name: _aligned(draws.nodes[name]["value"], event_dims[name], nesting + 2)
            for name in truth
        }
        for i in range(size):
            true_i = {name: value[i].unsqueeze(0) for name, value in truth.items()}
            post_i = {name: value[:, i] for name, value in posterior.items()}
            for qname, fn in fns.items():
                with torch.no_grad():
                    reference = fn(true_i).reshape(-1)
                    samples = fn(post_i).reshape(num_samples, -1)
                if samples.shape[1] != reference.shape[0]:
                    raise ValueError(
                        f"Expected quantity '{qname}' to have as many elements for the "
                        f"posterior draws as for the prior draw, actual {samples.shape[1]} "
                        f"and {reference.shape[0]}"
                    )
                less = (samples < reference).sum(0)
                ties = (samples == reference).sum(0)
                rank = less + (torch.rand(ties.shape) * (ties + 1)).floor().long()
                names = (
                    [qname] if rank.numel() == 1 else [f"{qname}[{j}]" for j in range(rank.numel())]
                )
                for key, r in zip(names, rank.tolist(), strict=True):
                    ranks.setdefault(key, []).append(r)
    return Calibration({k: np.asarray(v, dtype=np.int64) for k, v in ranks.items()}, num_samples)
