r"""Gaussian mixture data with exact densities and exact diffused scores.

Under a scalar-coefficient linear forward process (see :mod:`pyro_latdiff.score.forward`;
anything with ``marginal_coefs(t) -> (mean_scale, std)`` will do), data drawn from

.. math::

    q_0 = \sum_k w_k\, \mathcal N(m_k, s_k^2 I)
    \quad\text{diffuses to}\quad
    q_t = \sum_k w_k\, \mathcal N\big(a_t m_k, (a_t^2 s_k^2 + \sigma_t^2) I\big),

so the exact score :math:`\nabla \log q_t` is known in closed form: the reference that a
learned score, an ELBO or a probability-flow likelihood is checked against. A single
Gaussian :math:`\mathcal N(m, s^2 I)` is the one-component case.

Example::

    >>> import torch
    >>> from pyro_latdiff.testing import GaussianMixture
    >>> q = GaussianMixture.gaussian(torch.zeros(1), 1.0)
    >>> round(float(q.log_prob(torch.ones(1))), 5)
    -1.41894
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["GaussianMixture"]


class GaussianMixture:
    r"""The isotropic Gaussian mixture :math:`\sum_k w_k \mathcal N(m_k, s_k^2 I)`.

    :param torch.Tensor means: ``(K, D)``.
    :param scales: ``(K,)`` positive standard deviations (or a float for all).
    :param torch.Tensor weights: ``(K,)`` positive, normalised here (default uniform).
    """

    def __init__(self, means: Tensor, scales, weights: Tensor | None = None):
        if not isinstance(means, Tensor) or means.dim() != 2:
            raise ValueError(
                "Expected `means` of shape (num_components, state_dim), actual "
                f"{tuple(means.shape) if isinstance(means, Tensor) else type(means).__name__}"
            )
        k = means.shape[0]
        scales = torch.as_tensor(scales, dtype=means.dtype).expand(k).clone()
        if not (scales > 0).all():
            raise ValueError(f"Expected `scales` to be positive, actual {scales.tolist()}")
        weights = torch.ones(k, dtype=means.dtype) if weights is None else weights
        if weights.shape != (k,) or not (weights > 0).all():
            raise ValueError(
                f"Expected `weights` of shape ({k},), positive, actual {weights.tolist()}"
            )
        self.means = means
        self.scales = scales
        self.weights = weights / weights.sum()

    @classmethod
    def gaussian(cls, mean: Tensor, variance: float) -> GaussianMixture:
        """The single Gaussian :math:`\\mathcal N(\\text{mean}, \\text{variance}\\, I)`."""
        return cls(mean.reshape(1, -1), math.sqrt(variance))

    @property
    def state_dim(self) -> int:
        return self.means.shape[1]

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """``num_samples`` draws, shape ``(num_samples, D)``."""
        component = torch.multinomial(self.weights, num_samples, True, generator=generator)
        noise = torch.randn(
            num_samples, self.state_dim, dtype=self.means.dtype, generator=generator
        )
        return self.means[component] + self.scales[component, None] * noise

    def _terms(self, x: Tensor, mean_scale, std) -> tuple[Tensor, Tensor, Tensor]:
        """Per-component log-densities ``(..., K)``, differences ``(..., K, D)`` and
        variances ``(..., K)`` at ``x`` for the mixture diffused to ``(mean_scale, std)``
        (tensors broadcasting with ``x.shape[:-1] + (1,)``)."""
        a = torch.as_tensor(mean_scale, dtype=x.dtype)
        s = torch.as_tensor(std, dtype=x.dtype)
        if a.dim():
            a = a[..., None]  # (..., 1) -> (..., 1, 1) against (K, D)
        if s.dim():
            s = s[..., None]
        var = a.square() * self.scales.square()[:, None] + s.square()  # (..., K, 1)
        diff = x[..., None, :] - a * self.means  # (..., K, D)
        d = self.state_dim
        log_comp = (
            self.weights.log()
            - 0.5 * (diff.square() / var).sum(-1)
            - 0.5 * d * torch.log(2 * math.pi * var[..., 0])
        )
        return log_comp, diff, var[..., 0]

    def log_prob(self, x: Tensor) -> Tensor:
        """:math:`\\log q_0(x)`, shape ``x.shape[:-1]``."""
        log_comp, _, _ = self._terms(x, 1.0, 0.0)
        return torch.logsumexp(log_comp, -1)

    def diffused_log_prob(self, process, t, x: Tensor) -> Tensor:
        """:math:`\\log q_t(x)` under ``process``, shape ``x.shape[:-1]``."""
        mean_scale, std = process.marginal_coefs(t)
        log_comp, _, _ = self._terms(x, mean_scale, std)
        return torch.logsumexp(log_comp, -1)

    def score(self, process) -> Callable[[Tensor, Tensor], Tensor]:
        """The exact score :math:`\\nabla_x \\log q_t(x)` under ``process`` as
        ``score(t, x)``, for ``t`` 0-d or of shape ``(N, 1, ..., 1)`` (``x.dim()``
        dimensions) and ``x`` of shape ``(..., D)``."""

        def score(t: Tensor, x: Tensor) -> Tensor:
            mean_scale, std = process.marginal_coefs(t.to(x.dtype))
            log_comp, diff, var = self._terms(x, mean_scale, std)
            resp = torch.softmax(log_comp, -1)  # (..., K)
            return -(resp[..., None] * diff / var[..., None]).sum(-2)

        return score
