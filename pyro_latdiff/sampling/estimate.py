r"""Importance-weighted estimates of a log normalising constant."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LogNormalizerEstimate"]


@dataclass(frozen=True)
class LogNormalizerEstimate:
    r"""An estimate of :math:`\log Z` from importance log-weights :math:`\log w_i`,
    :math:`i = 1..n`, :math:`\mathbb E\, w = Z`.

    :ivar float log_z: :math:`\log \frac1n \sum_i w_i` (biased low by about
        ``stderr**2 / 2``, consistent).
    :ivar float stderr: delta-method standard error of ``log_z``.
    :ivar float ess: effective sample size :math:`(\sum w)^2 / \sum w^2`.
    :ivar float elbo: :math:`\frac1n \sum_i \log w_i`, a lower bound on
        :math:`\log Z` in expectation (the ELBO).
    :ivar float elbo_stderr: its standard error.
    :ivar int num_samples: ``n``.
    :ivar int num_evaluations: target evaluations spent (0 if not counted).
    :ivar torch.Tensor log_weights: the ``(n,)`` log-weights.
    """

    log_z: float
    stderr: float
    ess: float
    elbo: float
    elbo_stderr: float
    num_samples: int
    num_evaluations: int
    log_weights: Tensor

    @classmethod
    def from_log_weights(cls, log_weights: Tensor, num_evaluations: int = 0):
        """Summarise ``(n,)`` log-weights (non-finite ones count as zero weights)."""
        if not isinstance(log_weights, Tensor) or log_weights.numel() == 0:
            actual = (
                f"shape {tuple(log_weights.shape)}"
                if isinstance(log_weights, Tensor)
                else type(log_weights).__name__
            )
            raise ValueError(f"Expected `log_weights` to be a non-empty tensor, actual {actual}")
        # Sums in float64: float32 weights far from 0 (a log Z of 1e5) lose the spread.
        lw = log_weights.detach().reshape(-1).double()
        n = lw.shape[0]
        lw = torch.where(torch.isnan(lw), torch.full_like(lw, -math.inf), lw)
        log_sum = torch.logsumexp(lw, 0)
        log_sum_sq = torch.logsumexp(2 * lw, 0)
        relative_var = (n * torch.exp(log_sum_sq - 2 * log_sum) - 1).clamp(min=0)
        finite = lw[torch.isfinite(lw)]
        elbo = float(finite.mean()) if finite.numel() == n else -math.inf
        elbo_sd = float(finite.std()) if finite.numel() > 1 else math.nan
        return cls(
            log_z=float(log_sum - math.log(n)),
            stderr=float((relative_var / n).sqrt()),
            ess=float(torch.exp(2 * log_sum - log_sum_sq)),
            elbo=elbo,
            elbo_stderr=elbo_sd / math.sqrt(n),
            num_samples=n,
            num_evaluations=int(num_evaluations),
            log_weights=lw,
        )

    def __float__(self) -> float:
        return self.log_z
