"""Fitting a guide and estimating the log-evidence."""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.importance import vectorized_importance_weights
from pyro.optim import PyroOptim
from torch import Tensor
from tqdm.auto import tqdm

__all__ = ["default_optim", "fit", "log_evidence"]


def _check_count(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected `{name}` to be an int >= {minimum}, actual {value!r}")


def _guess_max_plate_nesting(model: Callable, guide: Callable, *args, **kwargs) -> int:
    """The deepest plate dimension used by ``model`` and ``guide``, found by tracing
    both once (as :class:`~pyro.infer.ELBO` does when not told)."""
    with poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    dims = [
        -frame.dim
        for trace in (model_trace, guide_trace)
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


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

    :param model: Pyro model. :param guide: its guide (proposal).
    :param int num_samples: number ``n`` of importance samples.
    :param int chunk_size: samples per vectorised chunk (default: all at once, at most
        1000).
    :param int max_plate_nesting: as in :class:`~pyro.infer.ELBO`; found by tracing
        if omitted.
    :returns: a 0-d tensor; its attributes ``stderr`` (delta-method standard error of
        the log-estimate), ``ess`` (effective sample size ``(sum w)^2 / sum w^2``) and
        ``log_weights`` (shape ``(n,)``) describe it.
    """
    _check_count("num_samples", num_samples)
    chunk_size = min(num_samples, 1000) if chunk_size is None else chunk_size
    _check_count("chunk_size", chunk_size)
    if max_plate_nesting is None:
        max_plate_nesting = _guess_max_plate_nesting(model, guide, *args, **kwargs)
    chunks = []
    with torch.no_grad():
        for start in range(0, num_samples, chunk_size):
            size = min(chunk_size, num_samples - start)
            log_w, _, _ = vectorized_importance_weights(
                model, guide, *args, num_samples=size,
                max_plate_nesting=max_plate_nesting, **kwargs,
            )
            chunks.append(log_w.reshape(-1))
    log_weights = torch.cat(chunks)
    return _summarise(log_weights)


def _summarise(log_weights: Tensor) -> Tensor:
    n = log_weights.shape[0]
    log_sum = torch.logsumexp(log_weights, 0)
    log_sum_sq = torch.logsumexp(2 * log_weights, 0)
    estimate = log_sum - math.log(n)
    ess = torch.exp(2 * log_sum - log_sum_sq)
    # Var(w) / mean(w)^2 = n sum w^2 / (sum w)^2 - 1; stderr of log mean = sqrt(that / n).
    relative_var = (n * torch.exp(log_sum_sq - 2 * log_sum) - 1).clamp(min=0)
    estimate.stderr = float((relative_var / n).sqrt())
    estimate.ess = float(ess)
    estimate.log_weights = log_weights
    return estimate


def default_optim(num_steps: int, lr: float = 1e-2, final_lr: float = 1e-3) -> PyroOptim:
    """Adam with gradient-norm clipping and a learning rate decaying geometrically from
    ``lr`` to ``final_lr`` over ``num_steps`` (:class:`pyro.optim.ClippedAdam`)."""
    _check_count("num_steps", num_steps)
    return pyro.optim.ClippedAdam(
        {"lr": lr, "lrd": (final_lr / lr) ** (1.0 / num_steps), "clip_norm": 10.0}
    )


def fit(
    model: Callable,
    guide: Callable,
    *args,
    num_steps: int = 1000,
    optim: PyroOptim | None = None,
    loss: pyro.infer.ELBO | None = None,
    num_particles: int = 16,
    progress: bool = True,
    **kwargs,
) -> list[float]:
    """Fit ``guide`` (and any model parameters) with :class:`pyro.infer.SVI`.

    A thin loop: plain ``SVI(model, guide, optim, loss).step(...)`` works as well.

    :param int num_steps: number of SVI steps.
    :param optim: a Pyro optimiser; :func:`default_optim` if omitted.
    :param loss: an ELBO; ``Trace_ELBO(num_particles, vectorize_particles=True)`` if
        omitted.
    :param int num_particles: particles of the default loss.
    :param bool progress: show a tqdm progress bar with the running loss.
    :returns: the loss (negative ELBO estimate) at every step.
    """
    _check_count("num_steps", num_steps)
    _check_count("num_particles", num_particles)
    optim = default_optim(num_steps) if optim is None else optim
    if loss is None:
        nesting = _guess_max_plate_nesting(model, guide, *args, **kwargs)
        loss = Trace_ELBO(num_particles=num_particles, vectorize_particles=True,
                          max_plate_nesting=nesting)
    svi = SVI(model, guide, optim, loss)
    losses: list[float] = []
    with tqdm(total=num_steps, disable=not progress, desc="SVI") as bar:
        for step in range(num_steps):
            losses.append(float(svi.step(*args, **kwargs)))
            if step % 10 == 0 or step == num_steps - 1:
                bar.set_postfix(loss=f"{losses[-1]:.4g}", refresh=False)
            bar.update()
    return losses
