"""Matplotlib figures for posterior checks: path fan charts, terminal marginals, SBC
rank histograms.

The figures read :class:`arviz.InferenceData` made by
:func:`~pyro_latdiff.inference_data.to_inference_data` through xarray only; ArviZ's own
plots (``az.plot_ppc``, ``az.plot_posterior``, ...) work on the same object.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from scipy import stats

from .calibration import Calibration, rank_histogram
from .inference_data import psis_diagnostics

__all__ = ["plot_fan", "plot_paths", "plot_ranks", "plot_terminal"]

_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _axes(ax):
    if ax is None:
        import matplotlib.pyplot as plt

        _, ax = plt.subplots(figsize=(7, 4))
    return ax


def _select(dataset, var_name: str, coords: Mapping | None, state: int, group: str):
    if var_name not in dataset:
        raise ValueError(
            f"Expected `var_name` to be a variable of the {group} group, actual {var_name!r} "
            f"(variables: {list(dataset.data_vars)})"
        )
    values = dataset[var_name]
    time_dims = [d for d in values.dims if d == "time" or d.endswith("_time")]
    state_dims = [d for d in values.dims if d == "state" or d.endswith("_state")]
    if len(time_dims) != 1 or len(state_dims) != 1:
        raise ValueError(
            f"Expected `var_name` to name a path with time and state dims, actual {var_name!r} "
            f"with dims {values.dims}"
        )
    if coords:
        values = values.sel(dict(coords))
    values = values.isel({state_dims[0]: state})
    values = values.stack(sample=("chain", "draw"))
    extra = [d for d in values.dims if d not in (time_dims[0], "sample")]
    if extra:
        raise ValueError(
            f"Expected `coords` to select one value of each of {extra} (e.g. "
            f"coords={{'{extra[0]}': 0}}), actual coords {coords!r}"
        )
    return values.transpose("sample", time_dims[0]), time_dims[0]


def plot_fan(times, paths, *, label: str = "", color: str = "tab:blue", ax=None):
    """Fan chart of sampled paths: the median and the 50% and 90% bands over time.

    :param times: the times, shape ``(T,)``.
    :type times: numpy.ndarray or torch.Tensor
    :param paths: one state of each sampled path at those times, shape ``(S, T)``.
    :type paths: numpy.ndarray or torch.Tensor
    :param str label: legend label prefix, e.g. ``"posterior"``.
    :param str color: matplotlib colour of the bands and the median.
    :param matplotlib.axes.Axes ax: the axes to draw on (default: a new figure).
    :returns: the axes.
    :rtype: matplotlib.axes.Axes
    """
    ax = _axes(ax)
    times, paths = np.asarray(times), np.asarray(paths)
    q = np.quantile(paths, _QUANTILES, axis=0)
    ax.fill_between(times, q[0], q[4], color=color, alpha=0.2, lw=0, label=f"{label} 90%")
    ax.fill_between(times, q[1], q[3], color=color, alpha=0.4, lw=0, label=f"{label} 50%")
    ax.plot(times, q[2], color=color, lw=1.5, label=f"{label} median")
    return ax


def plot_paths(
    data, var_name: str = "path", *, coords: Mapping | None = None, state: int = 0, ax=None
):
    """Fan chart of a path: median, 50% and 90% bands of the posterior over time, and
    of the prior if ``data`` has a ``prior`` group.

    :param arviz.InferenceData data: from
        :func:`~pyro_latdiff.inference_data.to_inference_data`.
    :param str var_name: the path variable.
    :param dict coords: one value per plate dimension, e.g. ``{"series": 0}``.
    :param int state: index of the state dimension to show.
    :param matplotlib.axes.Axes ax: the axes to draw on (default: a new figure).
    :returns: the axes.
    :rtype: matplotlib.axes.Axes
    """
    ax = _axes(ax)
    groups = [("prior", "tab:gray")] if "prior" in data.groups() else []
    for group, color in groups + [("posterior", "tab:blue")]:
        values, time_dim = _select(data[group], var_name, coords, state, group)
        plot_fan(values[time_dim].values, values.values, label=group, color=color, ax=ax)
    ax.set(xlabel="t", ylabel=f"{var_name} (state {state})")
    ax.legend(fontsize=7, ncol=2)
    return ax


def plot_terminal(
    data,
    var_name: str = "path",
    *,
    density: Callable | None = None,
    coords: Mapping | None = None,
    state: int = 0,
    weighted: bool = True,
    bins: int = 50,
    ax=None,
):
    """Histogram of a path's terminal state under the guide, with its PSIS-weighted
    (importance-corrected) version and, where known, the exact density.

    :param arviz.InferenceData data: from
        :func:`~pyro_latdiff.inference_data.to_inference_data`.
    :param str var_name: the path variable.
    :param callable density: ``density(x)`` of the exact terminal marginal, for a numpy
        array ``x``.
    :param dict coords: one value per plate dimension, e.g. ``{"series": 0}``.
    :param int state: index of the state dimension to show.
    :param bool weighted: also show the PSIS-weighted histogram.
    :param int bins: histogram bins.
    :param matplotlib.axes.Axes ax: the axes to draw on (default: a new figure).
    :returns: the axes.
    :rtype: matplotlib.axes.Axes
    """
    ax = _axes(ax)
    values, _ = _select(data.posterior, var_name, coords, state, "posterior")
    terminal = values.values[:, -1]
    edges = np.histogram_bin_edges(terminal, bins=bins)
    ax.hist(terminal, bins=edges, density=True, color="tab:blue", alpha=0.4, label="guide")
    if weighted:
        diagnostics = psis_diagnostics(data)
        weights = np.exp(diagnostics.log_weights.reshape(-1))
        ax.hist(
            terminal,
            bins=edges,
            weights=weights,
            density=True,
            histtype="step",
            color="tab:orange",
            lw=1.5,
            label=f"PSIS-weighted (k-hat {diagnostics.k_hat:.2f})",
        )
    if density is not None:
        grid = np.linspace(edges[0], edges[-1], 400)
        ax.plot(grid, density(grid), color="k", lw=1.5, label="exact")
    ax.set(xlabel=f"{var_name} at t = {float(values[values.dims[-1]][-1]):g}", ylabel="density")
    ax.legend(fontsize=7)
    return ax


def plot_ranks(
    calibration: Calibration, quantity: str | None = None, *, num_bins: int | None = None, ax=None
):
    """SBC rank histogram (Talts et al. 2018) with the expected count and its 99%
    binomial band: a U shape means an over-confident guide, a hump an under-confident
    one, a slope a biased one.

    :param Calibration calibration: from :func:`~pyro_latdiff.calibration.calibrate`.
    :param str quantity: which quantity (default: the first).
    :param int num_bins: bins, as in :func:`~pyro_latdiff.calibration.rank_test`.
    :param matplotlib.axes.Axes ax: the axes to draw on (default: a new figure).
    :returns: the axes.
    :rtype: matplotlib.axes.Axes
    """
    if not isinstance(calibration, Calibration):
        raise TypeError(
            f"Expected `calibration` to be a Calibration, actual {type(calibration).__name__}"
        )
    quantity = next(iter(calibration.ranks)) if quantity is None else quantity
    if quantity not in calibration.ranks:
        raise ValueError(f"Expected `quantity` in {list(calibration.ranks)}, actual {quantity!r}")
    ranks = calibration.ranks[quantity]
    statistic, p_value = calibration.test(num_bins)[quantity]
    counts, expected = rank_histogram(ranks, calibration.num_samples, num_bins)
    num_bins = counts.size
    probs = expected / ranks.size
    ax = _axes(ax)
    lows = stats.binom.ppf(0.005, ranks.size, probs)
    highs = stats.binom.ppf(0.995, ranks.size, probs)
    centres = np.arange(num_bins)
    ax.fill_between(
        np.arange(num_bins + 1) - 0.5,
        np.append(lows, lows[-1]),
        np.append(highs, highs[-1]),
        step="post",
        color="tab:gray",
        alpha=0.3,
        lw=0,
        label="99% band if uniform",
    )
    ax.bar(centres, counts, width=0.9, color="tab:blue", alpha=0.7, label="ranks")
    ax.plot(centres, expected, "k--", lw=1, label="expected")
    ax.set(
        xlabel=f"rank bin ({calibration.num_samples + 1} ranks in {num_bins} bins)",
        ylabel="count",
        title=f"SBC ranks of {quantity}: chi2 {statistic:.1f}, p = {p_value:.3g}",
    )
    ax.legend(fontsize=7)
    return ax
