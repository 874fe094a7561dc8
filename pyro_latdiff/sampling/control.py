r"""The target-aware control term of the path integral sampler."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..drift import NeuralDrift
from .density import TargetDensity

__all__ = ["TargetAwareControl"]


class TargetAwareControl(nn.Module):
    r"""The term :math:`\mathrm{NN}_2(t) \odot \mathrm{clip}(\nabla \log \pi(x))` of the
    path integral sampler's control

    .. math::

        c(t, x) = \mathrm{NN}_1(t, x) + \mathrm{NN}_2(t) \odot
                  \mathrm{clip}\big(\nabla \log \pi(x), -C, C\big),

    the gradient evaluated at the *current* state ``x`` of the chain (not at a
    reference point), clipped elementwise to ``[-clip, clip]``; :math:`\mathrm{NN}_1`
    is the guide's own network. :math:`\mathrm{NN}_2` is a
    :class:`~pyro_latdiff.NeuralDrift` of the time alone (Fourier features, one gain per
    state dimension), initialised at zero, so the control starts at zero. Called as
    ``term(t, x)`` with the shapes of a drift (``t`` 0-d, or ``(N, 1, ..., 1)``); the
    gradient is differentiable (the path-derivative ELBO gradient goes through it).

    :param TargetDensity density: the target.
    :param int dim: the state dimension.
    :param float clip: the clip ``C`` of the gradient.
    :param hidden_dims: hidden widths of :math:`\mathrm{NN}_2`.
    :param int num_frequencies: Fourier time frequencies of :math:`\mathrm{NN}_2`.
    :param time_span: ``(t_start, t_end)`` of the grid.

    References: Zhang & Chen (2022), *Path integral sampler: a stochastic control
    approach for sampling*, §4 (network); Vargas, Grathwohl & Doucet (2023),
    *Denoising diffusion samplers*.
    """

    def __init__(
        self,
        density: TargetDensity,
        dim: int,
        *,
        clip: float = 100.0,
        hidden_dims: Sequence[int] = (64,),
        num_frequencies: int = 4,
        time_span: tuple[float, float] = (0.0, 1.0),
    ):
        super().__init__()
        self.density = density
        self.clip = float(clip)
        self.gain = NeuralDrift(
            1,
            out_dim=dim,
            hidden_dims=hidden_dims,
            num_frequencies=num_frequencies,
            time_span=time_span,
        )

    def score(self, x: Tensor) -> Tensor:
        r""":math:`\mathrm{clip}(\nabla \log \pi(x))`."""
        _, grad = self.density.value_and_grad(x)
        return grad.clamp(-self.clip, self.clip)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        t = t.to(x.dtype)
        zeros = torch.zeros(t.shape[:-1] + (1,) if t.dim() else (1,), dtype=x.dtype)
        return self.gain(t, zeros) * self.score(x)
