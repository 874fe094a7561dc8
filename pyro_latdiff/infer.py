"""Fitting a guide and estimating the log-evidence."""

from __future__ import annotations

import math
import os
import random
import tempfile
import warnings
from collections.abc import Callable

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.importance import vectorized_importance_weights
from pyro.optim import PyroOptim
from torch import Tensor
from tqdm.auto import tqdm

from ._traces import (
    check_full_plates,
    check_no_point_masses,
    guide_and_model_traces,
    resolve_max_plate_nesting,
    subsampled_plates,
)
from ._validation import check_model_and_guide, check_positive_int, chunk_size_or_default
from ._warnings import GuideQualityWarning, LatentDiffusionWarning

__all__ = ["FitDivergedError", "default_optim", "effective_sample_size", "fit", "log_evidence"]


def log_evidence(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1000,
    chunk_size: int | None = None,
    max_plate_nesting: int | None = None,
    **kwargs,
) -> Tensor:
    r"""Importance-sampled log-evidence with the guide as proposal,

    .. math::

        \log \hat p(y) = \log \frac1n \sum_{i=1}^n \frac{p(y, z_i)}{q(z_i)},
        \qquad z_i \sim q,

    vectorised over samples and computed in chunks of ``chunk_size`` samples to bound
    memory. Biased low by about ``stderr**2 / 2`` (Jensen), consistent as ``n`` grows.

    :param callable model: Pyro model.
    :param callable guide: its guide (the proposal).
    :param int num_samples: number ``n`` of importance samples.
    :param int chunk_size: samples per vectorised chunk (default: all at once, at most
        1000).
    :param int max_plate_nesting: as in :class:`~pyro.infer.ELBO`; found by tracing
        if omitted.
    :returns: a 0-d tensor; its attributes ``stderr`` (delta-method standard error of
        the log-estimate), ``ess`` (effective sample size ``(sum w)^2 / sum w^2``) and
        ``log_weights`` (shape ``(n,)``) describe it.
    :rtype: torch.Tensor
    """
    check_positive_int("num_samples", num_samples)
    chunk_size = chunk_size_or_default(chunk_size, num_samples)
    check_model_and_guide(model, guide, args, kwargs)
    traces = guide_and_model_traces(model, guide, args, kwargs)
    check_no_point_masses("log_evidence", traces[0])
    check_full_plates(
        "log_evidence",
        traces[1],
        "the importance weights of a minibatch do not estimate the evidence of the data",
    )
    max_plate_nesting = resolve_max_plate_nesting(
        model, guide, args, kwargs, max_plate_nesting, traces
    )
    chunks = []
    with torch.no_grad():
        for start in range(0, num_samples, chunk_size):
            size = min(chunk_size, num_samples - start)
            log_w, _, _ = vectorized_importance_weights(
                model,
                guide,
                *args,
                num_samples=size,
                max_plate_nesting=max_plate_nesting,
                **kwargs,
            )
            chunks.append(log_w.reshape(-1))
    log_weights = torch.cat(chunks)
    return _summarise(log_weights)


def effective_sample_size(log_weights) -> float:
    r"""Kish's effective sample size of importance weights,
    :math:`(\sum_i w_i)^2 / \sum_i w_i^2`, computed from their logarithms.

    :param log_weights: log-weights :math:`\log w_i`, a tensor or array of any shape
        (flattened).
    :type log_weights: torch.Tensor or numpy.ndarray
    :returns: a number between 1 and the number of weights.
    :rtype: float
    """
    log_weights = torch.as_tensor(log_weights).reshape(-1)
    log_sum = torch.logsumexp(log_weights, 0)
    return float(torch.exp(2 * log_sum - torch.logsumexp(2 * log_weights, 0)))


def _summarise(log_weights: Tensor) -> Tensor:
    n = log_weights.shape[0]
    estimate = torch.logsumexp(log_weights, 0) - math.log(n)
    ess = effective_sample_size(log_weights)
    # Var(w) / mean(w)^2 = n sum w^2 / (sum w)^2 - 1 = n / ess - 1; the stderr of the
    # log mean is sqrt(that / n).
    estimate.stderr = math.sqrt(max(n / ess - 1, 0.0) / n)
    estimate.ess = ess
    estimate.log_weights = log_weights
    return estimate


def default_optim(num_steps: int, lr: float = 1e-2, final_lr: float = 1e-3) -> PyroOptim:
    """Adam with gradient-norm clipping and a learning rate decaying geometrically from
    ``lr`` to ``final_lr`` over ``num_steps`` (:class:`pyro.optim.ClippedAdam`).

    :param int num_steps: the number of steps over which the rate decays.
    :param float lr: the initial learning rate.
    :param float final_lr: the learning rate after ``num_steps`` steps.
    :rtype: pyro.optim.PyroOptim
    """
    check_positive_int("num_steps", num_steps)
    return pyro.optim.ClippedAdam(
        {"lr": lr, "lrd": (final_lr / lr) ** (1.0 / num_steps), "clip_norm": 10.0}
    )


class FitDivergedError(FloatingPointError):
    """Raised by :func:`fit` when the loss or a gradient is not finite.

    The parameters and optimiser state are left as they were after the last finite
    step (the non-finite update is never applied).

    :param str message: the error message.
    :param int step: the step (0-based) whose loss or gradients were not finite.
    :param list losses: the losses of the steps before it.
    :ivar int step: the step (0-based) whose loss or gradients were not finite.
    :ivar list losses: the losses of the steps before it.
    """

    def __init__(self, message: str, step: int, losses: list[float]):
        super().__init__(message)
        self.step = step
        self.losses = losses


def _nonfinite_sites(model, guide, args, kwargs) -> list[str]:
    """Sites whose value or log-density is not finite in one guide/model run."""
    bad = []
    traces = guide_and_model_traces(model, guide, args, kwargs)
    with torch.no_grad():
        for trace in traces:
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or name in bad:
                    continue
                value = site["value"]
                if isinstance(value, Tensor) and not torch.isfinite(value).all():
                    bad.append(name)
                    continue
                log_prob = site["fn"].log_prob(value)
                if not torch.isfinite(log_prob).all():
                    bad.append(name)
    return bad


def _diverged(step, loss, bad_params, model, guide, args, kwargs, losses):
    what = (
        f"the loss is {loss}"
        if not math.isfinite(loss)
        else (f"gradients of {bad_params} are not finite")
    )
    try:
        sites = _nonfinite_sites(model, guide, args, kwargs)
    except Exception as error:  # the diagnosis must not hide the divergence
        sites = [f"<diagnosis failed: {type(error).__name__}>"]
    where = (
        f"non-finite values or densities at sites {sites}"
        if sites
        else ("no site is non-finite on a fresh draw (a rare draw diverged)")
    )
    return FitDivergedError(
        f"fit stopped at step {step}: {what}; {where}. Likely cause: a learning rate too "
        "large for this model or a stiff drift (paths blow up within one Euler step): "
        "lower the learning rate, pass clip_norm, or refine the time grid. The parameters "
        f"and optimiser state are those after step {step - 1}, the last finite one.",
        step,
        losses,
    )


def _save_checkpoint(path: str, svi: SVI, step: int, losses: list[float], rng) -> None:
    state = {
        "step": step,
        "losses": list(losses),
        "params": pyro.get_param_store().get_state(),
        "optim": svi.optim.get_state(),
        "rng": rng,
    }
    directory = os.path.dirname(os.path.abspath(path))
    with tempfile.NamedTemporaryFile(dir=directory, delete=False, suffix=".tmp") as handle:
        torch.save(state, handle)
        temporary = handle.name
    os.replace(temporary, path)  # atomic: a reader sees the old or the new file


def _check_checkpoint(path, state, guide_trace, num_steps: int) -> None:
    """The checkpoint holds this guide's parameters (a guide built while another of the
    same class lives gets another name, so a resume would silently train a fresh one)
    and is not past ``num_steps`` (a shorter run would rewrite its step count)."""
    saved = set(state["params"]["params"])
    names = [n for n, site in guide_trace.nodes.items() if site["type"] == "param"]
    missing = [name for name in names if name not in saved]
    if missing:
        prefixes = sorted({name.split(".")[0] for name in saved})
        raise ValueError(
            f"fit: expected checkpoint {str(path)!r} to hold the guide's parameters, actual "
            f"it lacks {missing[:3]}{' ...' if len(missing) > 3 else ''} (it holds "
            f"parameters under {prefixes}); build the guide with the name it was saved "
            "under, e.g. DiffusionGuide(model, name=...), or remove the file to start afresh"
        )
    if state["step"] > num_steps:
        raise ValueError(
            f"fit: expected `num_steps` >= the checkpoint's step {state['step']} to resume "
            f"{str(path)!r}, actual {num_steps}"
        )


def _restore_params(path, saved: dict) -> None:
    """Put the checkpoint's parameters into the parameter store. A parameter the store
    already holds (the guide's, created by a trace before resuming) takes the saved
    values in place: a module's plain ``nn.Parameter`` (the ``loc`` of
    ``AutoMultivariateNormal`` and the other ``AutoContinuous`` guides) is the store's
    tensor itself, and the module keeps computing with it, so replacing the store's
    tensor would leave the module at its initial values and its gradients out of the
    optimiser's reach. Every shape is checked before anything is written."""
    store = pyro.get_param_store()
    present = {name: store._params[name] for name in saved["params"] if name in store._params}
    for name, value in present.items():
        other = saved["params"][name]
        if value.shape != other.shape or value.dtype != other.dtype:
            raise ValueError(
                f"fit: expected checkpoint {str(path)!r} to hold parameter '{name}' as the "
                f"guide's, {tuple(value.shape)} {value.dtype}, actual {tuple(other.shape)} "
                f"{other.dtype}; the guide or the data changed since it was saved: remove "
                "the file to start afresh"
            )
    with torch.no_grad():
        for name, value in present.items():
            value.copy_(saved["params"][name])
    rest = [name for name in saved["params"] if name not in present]
    store.set_state(
        {
            "params": {name: saved["params"][name] for name in rest},
            "constraints": saved["constraints"],
        }
    )


def _rng_state():
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def _set_rng_state(state) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def fit(
    model: Callable,
    guide: Callable,
    *args,
    num_steps: int = 1000,
    optim: PyroOptim | None = None,
    loss: pyro.infer.ELBO | None = None,
    num_particles: int = 16,
    clip_norm: float | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    callback: Callable[[int, float], None] | None = None,
    progress: bool = True,
    check: bool | None = None,
    **kwargs,
) -> list[float]:
    """Fit ``guide`` (and any model parameters) with :class:`pyro.infer.SVI`.

    A thin loop around the SVI step (plain ``SVI(model, guide, optim, loss).step``
    works as well) that adds:

    - **divergence safety**: a non-finite loss or gradient stops the run with a
      :class:`FitDivergedError` naming the step, the sites and the likely cause; the
      non-finite update is never applied, so nothing learned is lost;
    - optional clipping of the total gradient norm (``clip_norm``);
    - the guide's running counters (a guide's optional ``fit_counters()`` hook, e.g.
      the states a :class:`~pyro_latdiff.DiffusionGuide` clamped into its
      ``state_bounds``) in the progress bar, and what its optional
      ``fit_warning(counts, num_steps)`` hook says at the end as a
      :class:`LatentDiffusionWarning`;
    - **checkpoints**: with ``checkpoint=path``, the parameter store, optimiser state,
      random state and loss history are saved atomically every ``checkpoint_every``
      steps, at the end, and when the run is interrupted (e.g. ``KeyboardInterrupt``);
      a later call with the same ``path`` resumes where it stopped. On CPU with a
      fixed seed, an interrupted and resumed run is bit-identical to an uninterrupted
      one;
    - **a check of the result**: after training, :func:`log_evidence` with
      ``CHECK_SAMPLES`` draws; an effective sample size below ``CHECK_ESS_FRACTION`` of
      them (the guide is far from the posterior, whose spread it then usually
      understates) is a :class:`~pyro_latdiff._warnings.GuideQualityWarning` that says
      what to try. Skipped for a model with a subsampled plate.

    :param int num_steps: total number of SVI steps (including those of a resumed run).
    :param callable model: Pyro model.
    :param callable guide: its guide.
    :param pyro.optim.PyroOptim optim: a Pyro optimiser; :func:`default_optim` if
        omitted.
    :param pyro.infer.ELBO loss: an ELBO; ``Trace_ELBO(num_particles, vectorize_particles=True)`` if
        omitted.
    :param int num_particles: particles of the default loss.
    :param float clip_norm: clip the total gradient norm to this value.
    :param checkpoint: file to save to and resume from.
    :type checkpoint: str or os.PathLike
    :param int checkpoint_every: steps between checkpoints.
    :param callable callback: ``callback(step, loss)`` after every step.
    :param bool progress: show a tqdm progress bar with the running loss.
    :param bool check: run the check of the result; by default, when ``loss`` is the
        default ELBO.
    :returns: the loss (negative ELBO estimate) at every step.
    :rtype: list
    :raises FitDivergedError: if a loss or gradient is not finite.
    """
    check_positive_int("num_steps", num_steps)
    check_positive_int("num_particles", num_particles)
    check_positive_int("checkpoint_every", checkpoint_every)
    if clip_norm is not None and not (
        isinstance(clip_norm, (int, float)) and math.isfinite(clip_norm) and clip_norm > 0
    ):
        raise ValueError(
            f"Expected `clip_norm` to be a positive float or None, actual {clip_norm!r}"
        )
    check_model_and_guide(model, guide, args, kwargs)
    if optim is not None and not isinstance(optim, PyroOptim):
        raise TypeError(
            f"Expected `optim` to be a pyro.optim optimiser, actual {type(optim).__name__}"
        )
    if loss is not None and not hasattr(loss, "loss_and_grads"):
        raise TypeError(f"Expected `loss` to be a pyro.infer ELBO, actual {type(loss).__name__}")
    if checkpoint is not None and not isinstance(checkpoint, (str, os.PathLike)):
        raise TypeError(
            f"Expected `checkpoint` to be a path or None, actual {type(checkpoint).__name__}"
        )
    if not isinstance(progress, bool):
        raise TypeError(f"Expected `progress` to be a bool, actual {progress!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"Expected `callback` to be callable, actual {type(callback).__name__}")
    if check is not None and not isinstance(check, bool):
        raise TypeError(f"Expected `check` to be a bool or None, actual {check!r}")
    check = loss is None if check is None else check
    optim = default_optim(num_steps) if optim is None else optim
    if loss is None:
        nesting = resolve_max_plate_nesting(model, guide, args, kwargs)
        loss = Trace_ELBO(
            num_particles=num_particles, vectorize_particles=True, max_plate_nesting=nesting
        )
    svi = SVI(model, guide, optim, loss)
    losses: list[float] = []
    start = 0
    if checkpoint is not None and os.path.exists(checkpoint):
        # Create the guide's parameters before restoring the random state: a guide
        # that initialises lazily must not draw from the restored stream.
        with poutine.block(), torch.no_grad():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        state = torch.load(checkpoint, weights_only=False)
        _check_checkpoint(checkpoint, state, guide_trace, num_steps)
        _restore_params(checkpoint, state["params"])
        optim.set_state(state["optim"])
        _set_rng_state(state["rng"])
        start, losses = state["step"], state["losses"]
    rng = _rng_state()
    step = start
    counters_before = _fit_counters(guide)
    try:
        with tqdm(total=num_steps, initial=start, disable=not progress, desc="SVI") as bar:
            for step in range(start, num_steps):
                value = _guarded_step(svi, step, clip_norm, losses, args, kwargs)
                losses.append(value)
                rng = _rng_state()
                if callback is not None:
                    callback(step, value)
                if checkpoint is not None and (step + 1) % checkpoint_every == 0:
                    _save_checkpoint(checkpoint, svi, step + 1, losses, rng)
                if step % 10 == 0 or step == num_steps - 1:
                    counts = _counts_since(guide, counters_before)
                    postfix = {"loss": f"{value:.4g}"} | {k: v for k, v in counts.items() if v}
                    bar.set_postfix(postfix, refresh=False)
                bar.update()
    except (KeyboardInterrupt, FitDivergedError):
        if checkpoint is not None:
            _save_checkpoint(checkpoint, svi, len(losses), losses, rng)
        raise
    if checkpoint is not None:
        _save_checkpoint(checkpoint, svi, num_steps, losses, rng)
    warning = getattr(guide, "fit_warning", None)
    message = (
        None
        if warning is None
        else warning(_counts_since(guide, counters_before), num_steps - start)
    )
    if message:
        warnings.warn(message, LatentDiffusionWarning, stacklevel=2)
    if check:
        _check_fit(model, guide, args, kwargs)
    return losses


#: Draws of :func:`fit`'s check of the result, and the effective sample size, as a
#: fraction of them, below which it warns.
CHECK_SAMPLES = 256
CHECK_ESS_FRACTION = 0.1


def _check_fit(model, guide, args, kwargs) -> None:
    _, model_trace = guide_and_model_traces(model, guide, args, kwargs)
    if subsampled_plates(model_trace):
        return  # a subsampled plate: importance weights of a minibatch say nothing
    try:
        estimate = log_evidence(
            model, guide, *args, num_samples=CHECK_SAMPLES, chunk_size=64, **kwargs
        )
    except ValueError as error:  # e.g. a model that does not vectorise over draws
        warnings.warn(
            f"fit: the check of the fitted guide could not run ({error}); pass check=False "
            "to skip it",
            GuideQualityWarning,
            stacklevel=3,
        )
        return
    fraction = estimate.ess / CHECK_SAMPLES
    if math.isfinite(fraction) and fraction >= CHECK_ESS_FRACTION:
        return
    warnings.warn(
        f"fit: the fitted guide's importance sampling effective sample size is "
        f"{estimate.ess:.1f} of {CHECK_SAMPLES} draws ({fraction:.1%}): the guide is far "
        "from the posterior and its posterior spread is likely too narrow. Train longer "
        "(num_steps) or with more particles, or use a richer guide (for correlated "
        "parameters DiffusionGuide(model, latent_guide=AutoMultivariateNormal), wider "
        "hidden_dims); pyro_latdiff.psis_diagnostics tells which sites are off",
        GuideQualityWarning,
        stacklevel=3,
    )


def _fit_counters(guide) -> dict[str, int]:
    """The guide's running counters, through its optional ``fit_counters()`` hook."""
    counters = getattr(guide, "fit_counters", None)
    return {} if counters is None else dict(counters())


def _counts_since(guide, before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in _fit_counters(guide).items()}


def _guarded_step(svi: SVI, step: int, clip_norm, losses, args, kwargs) -> float:
    """One SVI step that applies the update only if the loss and gradients are finite."""
    with poutine.trace(param_only=True) as capture:
        try:
            loss = svi.loss_and_grads(svi.model, svi.guide, *args, **kwargs)
        except ValueError as error:
            # A draw that overflowed reaches a distribution's argument checks as NaN or
            # inf (e.g. Normal(loc=path)): a divergence, not a bad model.
            if "found invalid values" not in str(error):
                raise
            params = [site["value"].unconstrained() for site in capture.trace.nodes.values()]
            pyro.infer.util.zero_grads(set(params))
            raise _diverged(
                step, math.nan, [], svi.model, svi.guide, args, kwargs, list(losses)
            ) from error
    params = {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()}
    loss = float(loss)
    bad = [
        name
        for name, p in params.items()
        if p.grad is not None and not torch.isfinite(p.grad).all()
    ]
    if not math.isfinite(loss) or bad:
        pyro.infer.util.zero_grads(set(params.values()))
        raise _diverged(step, loss, bad, svi.model, svi.guide, args, kwargs, list(losses))
    unique = list(dict.fromkeys(params.values()))  # trace order: deterministic
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(unique, clip_norm)
    svi.optim(unique)
    pyro.infer.util.zero_grads(set(unique))
    return loss
