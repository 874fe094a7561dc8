r"""Held-out evaluation of a :class:`~pyro_latdiff.score.ScoreModel`: three numbers.

1. the **ELBO** of the Euler chain (what SVI with Trace_ELBO maximises), per point, in
   nats and bits per dimension;
2. the **importance-weighted bound** :math:`\log \frac1K \sum_k p(x, y_k) / q(y_k \mid
   x)`, :math:`y_k` from the forward noising guide, through
   :func:`pyro_latdiff.log_evidence` one point at a time: tighter than the ELBO and
   increasing to the chain's :math:`\log p(x)` as :math:`K` grows;
3. the **probability-flow ODE** log-likelihood (:func:`ode_log_likelihood`), exact for
   the flow (a different model from the Euler chain, equal in law to it only in the
   limit of the exact score and infinitely many steps).

For data drawn from :math:`q`, the averages of 1 and 2 sit below
:math:`\mathbb E_q \log q` (Gibbs' inequality: the chain is a normalised density);
standard errors are over the held-out points.
"""

from __future__ import annotations

import math

import torch
from pyro import poutine
from torch import Tensor

from .._validation import check_positive_int
from ..infer import log_evidence
from .likelihood import bits_per_dim, ode_log_likelihood

__all__ = ["elbo_per_point", "evaluate", "importance_weighted_bound"]


@torch.no_grad()
def log_weights(score_model, data: Tensor, num_particles: int, chunk_size: int = 512) -> Tensor:
    """``log p(x, y) - log q(y | x)`` for ``num_particles`` guide draws ``y`` per point,
    shape ``(num_particles, num_data)``."""
    score_model.check_data(data)
    check_positive_int("num_particles", num_particles)
    check_positive_int("chunk_size", chunk_size)
    rows = data.repeat(num_particles, 1)
    out = []
    with poutine.block():
        for chunk in rows.split(chunk_size):
            guide = poutine.trace(score_model.full_guide).get_trace(chunk)
            model = poutine.trace(poutine.replay(score_model.full_model, trace=guide)).get_trace(
                chunk
            )
            total = torch.zeros(chunk.shape[0], dtype=chunk.dtype, device=chunk.device)
            for trace, sign in ((model, 1.0), (guide, -1.0)):
                trace.compute_log_prob()
                for site in trace.nodes.values():
                    if site["type"] == "sample":
                        total = total + sign * site["log_prob"]
            out.append(total)
    return torch.cat(out).reshape(num_particles, data.shape[0])


def elbo_per_point(score_model, data: Tensor, num_particles: int = 1) -> Tensor:
    """The Euler chain's ELBO of each point, averaged over ``num_particles`` draws of
    the forward noising chain; shape ``(num_data,)``, nats."""
    return log_weights(score_model, data, num_particles).mean(0)


def importance_weighted_bound(score_model, data: Tensor, num_samples: int = 64) -> Tensor:
    """:func:`pyro_latdiff.log_evidence` of each point separately, with the forward
    noising chain as proposal; shape ``(num_data,)``, nats."""
    score_model.check_data(data)
    check_positive_int("num_samples", num_samples)
    values = [
        log_evidence(
            score_model.full_model, score_model.full_guide, data[i : i + 1], num_samples=num_samples
        )
        for i in range(data.shape[0])
    ]
    return torch.stack(values)


def _summary(values: Tensor, state_dim: int, name: str) -> dict[str, float]:
    mean = float(values.mean())
    stderr = float(values.std() / math.sqrt(values.numel())) if values.numel() > 1 else math.nan
    return {
        name: mean,
        f"{name}_stderr": stderr,
        f"{name}_bpd": float(bits_per_dim(mean, state_dim)),
    }


def evaluate(
    score_model,
    data: Tensor,
    *,
    num_particles: int = 4,
    num_samples: int = 64,
    ode: bool = True,
    ode_kwargs: dict | None = None,
) -> dict[str, float]:
    """The three held-out numbers (module docstring), each as a mean per point with its
    standard error and in bits per dimension: keys ``elbo``, ``iw_bound``, ``ode`` and
    ``*_stderr``, ``*_bpd``.

    :param int num_particles: guide draws per point for the ELBO.
    :param int num_samples: importance samples per point for the bound.
    :param bool ode: also solve the probability-flow ODE.
    :param dict ode_kwargs: keyword arguments of :func:`ode_log_likelihood`.
    """
    score_model.check_data(data)
    d = score_model.state_dim
    result = _summary(elbo_per_point(score_model, data, num_particles), d, "elbo")
    result |= _summary(importance_weighted_bound(score_model, data, num_samples), d, "iw_bound")
    if ode:
        with torch.no_grad():
            values = ode_log_likelihood(
                score_model.process, score_model.score, data, **(ode_kwargs or {})
            )
        result |= _summary(values, d, "ode")
    return result
