"""What the unbiased estimators return, and the types of their arguments."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from .._validation import check_callable, check_fn_output

__all__ = ["LikelihoodEstimate", "UnbiasedEstimate", "WeightedSample"]

#: ``drift(t, x)``, see :mod:`pyro_latdiff.unbiased` for the shapes.
Drift = Callable[[Tensor, Tensor], Tensor]
#: A constant diffusion coefficient: a positive float or a tensor ``(..., D)``.
Sigma = float | Tensor

#: Samples simulated at once when ``chunk_size`` is not given (a memory bound).
DEFAULT_SAMPLES_PER_CHUNK = 2**17


@dataclass(frozen=True)
class UnbiasedEstimate:
    """The result of :func:`expectation`, :func:`rmlmc_expectation` or
    :func:`euler_expectation`.

    :ivar torch.Tensor estimate: the sample mean, shape ``batch_shape + event_shape``.
    :ivar torch.Tensor stderr: its standard error, ``std(values) / sqrt(num_samples)``.
    :ivar torch.Tensor values: the i.i.d. per-sample values, shape
        ``(num_samples,) + batch_shape + event_shape``; their mean is ``estimate``.
    :ivar torch.Tensor depths: per-sample number of Euler steps on the finest path
        (the random depth), shape ``(num_samples,)``.
    :ivar torch.Tensor costs: per-sample number of drift evaluations, ``(num_samples,)``.
    :ivar str method: ``"parametrix"``, ``"rmlmc"`` or ``"euler"``.
    """

    estimate: Tensor
    stderr: Tensor
    values: Tensor
    depths: Tensor
    costs: Tensor
    method: str

    @property
    def num_samples(self) -> int:
        return self.values.shape[0]

    @property
    def variance(self) -> Tensor:
        """The per-sample variance (unbiased sample variance of ``values``)."""
        return self.values.var(0)

    @property
    def mean_depth(self) -> float:
        """Average number of Euler steps (layers) per sample."""
        return self.depths.double().mean().item()

    @property
    def mean_cost(self) -> float:
        """Average number of drift evaluations per sample."""
        return self.costs.double().mean().item()


@dataclass(frozen=True)
class WeightedSample:
    r"""Draws of the random signed measure of the parametrix estimator.

    Sample ``i`` is two weighted terminal states, ``(weights[i, j], states[i, j])``
    for ``j = 0, 1``, such that for every bounded measurable ``phi``

    .. math:: \mathbb E \sum_j w_{ij}\, \varphi(x_{ij}) = \mathbb E\, \varphi(X_T),

    with finite variance for Lipschitz ``phi`` (see
    :mod:`pyro_latdiff.unbiased.parametrix`). Without antithetics the atoms are
    :math:`(w, \hat X_{N+1})` and :math:`(-w, \hat X_N)`
    (weight 0 when ``N = 0``); with antithetics :math:`(w/2, \hat X^+_{N+1})` and
    :math:`(\mp w/2, \hat X^-_{N+1})`. Weights can be negative.

    :ivar torch.Tensor weights: shape ``(num_samples, 2) + batch_shape``.
    :ivar torch.Tensor states: shape ``(num_samples, 2) + batch_shape + (D,)``.
    :ivar torch.Tensor depths: per-sample number of Euler steps ``N + 1``.
    """

    weights: Tensor
    states: Tensor
    depths: Tensor

    @property
    def num_samples(self) -> int:
        return self.weights.shape[0]

    @property
    def mean_depth(self) -> float:
        return self.depths.double().mean().item()

    def values(self, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """Per-sample estimator values ``sum_j w_ij fn(x_ij)``, shape
        ``(num_samples,) + batch_shape + event_shape``."""
        check_callable("fn", fn)
        out = fn(self.states)
        check_fn_output("fn", out, self.states)
        w = self.weights.reshape(self.weights.shape + (1,) * (out.dim() - self.weights.dim()))
        return (w * out).sum(1)


@dataclass(frozen=True)
class LikelihoodEstimate:
    r"""An unbiased estimate of ``p(y) = E p(y | X_T)`` (:func:`likelihood`).

    The per-sample values are kept on a shifted scale, ``scaled_values =
    values * exp(-log_scale)``, so that tiny likelihoods do not underflow. The
    estimate is signed (the parametrix weights are): use ``sign`` and
    ``log_abs_estimate`` in a pseudo-marginal sampler (Lyne et al. 2015).

    :ivar torch.Tensor estimate: ``p̂(y)``, shape ``batch_shape``.
    :ivar torch.Tensor stderr: its standard error.
    :ivar torch.Tensor log_abs_estimate: ``log |p̂(y)|``, computed on the shifted scale.
    :ivar torch.Tensor sign: the sign of ``p̂(y)`` (-1, 0 or 1).
    :ivar torch.Tensor log_scale: the shift, ``max log p(y | x)`` over the draws.
    :ivar torch.Tensor scaled_values: per-sample values times ``exp(-log_scale)``.
    :ivar torch.Tensor depths: per-sample number of Euler steps.
    """

    estimate: Tensor
    stderr: Tensor
    log_abs_estimate: Tensor
    sign: Tensor
    log_scale: Tensor
    scaled_values: Tensor
    depths: Tensor

    @property
    def num_samples(self) -> int:
        return self.scaled_values.shape[0]

    @property
    def relative_stderr(self) -> Tensor:
        """``stderr / |estimate|``, computed on the shifted scale."""
        m = self.scaled_values.mean(0).abs()
        return self.scaled_values.std(0) / math.sqrt(self.num_samples) / m

    @property
    def mean_depth(self) -> float:
        return self.depths.double().mean().item()


def summarise(values: Tensor, depths: Tensor, costs: Tensor, method: str) -> UnbiasedEstimate:
    """The :class:`UnbiasedEstimate` of i.i.d. per-sample ``values``."""
    n = values.shape[0]
    return UnbiasedEstimate(
        estimate=values.mean(0),
        stderr=values.std(0) / math.sqrt(n),
        values=values,
        depths=depths,
        costs=costs,
        method=method,
    )
