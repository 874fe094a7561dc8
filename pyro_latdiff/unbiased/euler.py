r"""Plain Euler–Maruyama Monte Carlo on a uniform grid: the biased baseline of the
unbiased estimators (bias :math:`O(1 / \text{num\_steps})`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._validation import (
    check_fn,
    check_fn_output,
    check_positive_int,
    check_sde_arguments,
    check_x0,
)
from .results import DEFAULT_SAMPLES_PER_CHUNK, Drift, Sigma, UnbiasedEstimate, summarise

__all__ = ["euler_expectation"]


def _euler_terminal(drift, x0, sigma, t0, t1, num, num_steps):
    """Plain Euler with ``num_steps`` uniform steps, noise drawn step by step."""
    dtype, device = x0.dtype, x0.device
    h = (t1 - t0) / num_steps
    times = t0 + h * torch.arange(num_steps, dtype=dtype, device=device)
    x = x0.expand((num,) + x0.shape)
    for k in range(num_steps):
        noise = torch.randn((num,) + x0.shape, dtype=dtype, device=device)
        x = x + drift(times[k], x) * h + sigma * math.sqrt(h) * noise
    return x


def euler_expectation(
    fn: Callable[[Tensor], Tensor],
    drift: Drift,
    x0: Tensor,
    t1: float,
    *,
    sigma: Sigma = 1.0,
    num_samples: int,
    num_steps: int,
    t0: float = 0.0,
    chunk_size: int | None = None,
) -> UnbiasedEstimate:
    r"""Plain Euler–Maruyama Monte Carlo on ``num_steps`` uniform steps: the *biased*
    baseline (bias :math:`O(1 / \text{num\_steps})`), same result type.

    :param callable fn: ``g(x)``, as in :func:`expectation`.
    :param callable drift: ``drift(t, x)``; ``t`` is a 0-d tensor here.
    :param torch.Tensor x0: initial state, ``batch_shape + (D,)``.
    :param float t1: final time.
    :param sigma: constant diffusion, as in :func:`expectation`.
    :type sigma: float or torch.Tensor
    :param int num_samples: number of paths.
    :param int num_steps: number of Euler steps.
    :param float t0: initial time.
    :param int chunk_size: samples simulated at once.
    :rtype: UnbiasedEstimate
    """
    check_positive_int("num_steps", num_steps, strict=True)
    check_x0(x0)
    check_fn("fn", fn, x0)
    _, sigma_t, chunk = check_sde_arguments(
        drift, x0, t0, t1, sigma, num_samples, chunk_size, DEFAULT_SAMPLES_PER_CHUNK
    )
    parts = []
    for start in range(0, num_samples, chunk):
        num = min(chunk, num_samples - start)
        x = _euler_terminal(drift, x0, sigma_t, float(t0), float(t1), num, num_steps)
        out = fn(x)
        check_fn_output("fn", out, x)
        parts.append(out)
    values = torch.cat(parts)
    steps = torch.full((num_samples,), num_steps, dtype=torch.long, device=x0.device)
    return summarise(values, steps, steps, "euler")
