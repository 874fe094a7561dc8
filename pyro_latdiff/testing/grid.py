r"""The density of a 1-D Euler chain, propagated on a grid of states.

The Euler chain of a scalar SDE :math:`dX = b(t, X)\, dt + \sigma(t, X)\, dW` has
Gaussian transitions, so the density of its state :math:`x_k` can be propagated on a
uniform grid of states :math:`x^{(j)}` with spacing :math:`\Delta x`:

.. math::

    p_1(x) = \mathcal N\big(x;\, x_0 + b(t_0, x_0) h_0,\, \sigma(t_0, x_0)^2 h_0\big),

    p_{k+1}(x) = \sum_j p_k(x^{(j)})\,
        \mathcal N\big(x;\, x^{(j)} + b(t_k, x^{(j)}) h_k,\,
        \sigma(t_k, x^{(j)})^2 h_k\big)\, \Delta x,

a matrix-vector product per step (the rectangle rule: spectrally accurate for a
smooth density that vanishes at both ends of the grid, when :math:`\Delta x` is well
below :math:`\sigma \sqrt{h_k}`). It is exact for the discrete chain, nonlinear drift
included, up to that quadrature: the reference for the evidence and terminal posterior
of a 1-D model (``examples/double_well.py``), the bias of Euler against a closed form
(``benchmarks/unbiased.py``), and the Euler chain's convergence (``tests/test_testing.py``).

Example::

    >>> import torch
    >>> from pyro_latdiff.testing import euler_grid_density, ou_drift
    >>> grid = torch.linspace(-5.0, 5.0, 2001, dtype=torch.float64)
    >>> times = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    >>> density = euler_grid_density(ou_drift(1.0), 1.0, 0.0, times, grid)
    >>> round(float(density.sum() * (grid[1] - grid[0])), 6)  # mass
    1.0
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["euler_grid_density"]


def euler_grid_density(
    drift: Callable[[Tensor, Tensor], Tensor],
    diffusion: float | Callable[[Tensor, Tensor], Tensor],
    x0: float,
    times: Tensor,
    grid: Tensor,
    *,
    time_homogeneous: bool = False,
) -> Tensor:
    r"""Density of the last state :math:`x_N` of a 1-D Euler chain on a grid of states.

    ``drift(t, x)`` (and a callable ``diffusion(t, x)``) are called as
    :class:`~pyro_latdiff.LatentDiffusion` calls them while simulating: ``t`` a 0-d
    tensor, ``x`` of shape ``(G, 1)`` (the grid as a batch of 1-D states).

    :param callable drift: ``drift(t, x)`` returning a tensor of ``x``'s shape.
    :param diffusion: a positive float, or a callable ``diffusion(t, x)``.
    :type diffusion: float or callable
    :param float x0: the initial state.
    :param torch.Tensor times: the chain's grid ``t_0 < ... < t_N``, ``N >= 1``.
    :param torch.Tensor grid: uniformly spaced states ``(G,)``, wide enough that the
        density vanishes at both ends; its dtype is the computation's.
    :param bool time_homogeneous: the drift and diffusion do not depend on ``t``: steps
        of equal size (to rounding) then share one transition matrix, built once.
    :returns: the density of :math:`x_N` at the grid's states, shape ``(G,)``; its sum
        times the grid spacing is the mass that stayed on the grid (1 when wide enough).
    :rtype: torch.Tensor
    """
    dtype = grid.dtype
    times = torch.as_tensor(times, dtype=dtype)
    steps = times.diff()
    dx = grid[1] - grid[0]
    states = grid.unsqueeze(-1)

    def transition(t: Tensor, x: Tensor, h: Tensor) -> Tensor:
        """``N(grid; x + b h, sigma^2 h)`` for each state of ``x`` (rows)."""
        sigma = diffusion(t, x) if callable(diffusion) else torch.full_like(x, diffusion)
        mean = (x + drift(t, x) * h)[..., 0]
        scale = (sigma * h.sqrt())[..., 0]
        z = (grid - mean.unsqueeze(-1)) / scale.unsqueeze(-1)
        return torch.exp(-0.5 * z.square()) / (scale.unsqueeze(-1) * math.sqrt(2.0 * math.pi))

    start = torch.full((1, 1), float(x0), dtype=dtype)
    density = transition(times[0], start, steps[0])[0]
    matrix, matrix_step = None, None
    for k in range(1, steps.shape[0]):
        h = steps[k]
        reuse = time_homogeneous and matrix_step is not None
        if not (reuse and torch.isclose(h, matrix_step, rtol=1e-12, atol=0.0)):
            matrix, matrix_step = transition(times[k], states, h) * dx, h
        density = density @ matrix
    return density
