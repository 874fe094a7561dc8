r"""Exact references for the score samplers of :mod:`pyro_latdiff.score.samplers`.

*Gaussian data* :math:`X_0 \sim \mathcal N(m, \mathrm{diag}(s^2))`. Under a
scalar-linear forward process the marginal is
:math:`\mathcal N(a_t m, a_t^2 s^2 + \sigma_t^2)` per coordinate and the exact score is
affine, :math:`\nabla \log q_t(x) = -(x - a_t m) / (a_t^2 s^2 + \sigma_t^2)`. Every
sampler step is then affine in the state plus Gaussian noise, so each sampler's output
law is Gaussian, computed here by its own recursion (written from the step equations,
not by calling the samplers), and KL divergences are exact.

*Binary data* :math:`X` uniform on :math:`\{\pm 1\}` on the channel
:math:`Y_t = t X + W_t`: :math:`E[X \mid Y_t = y] = \tanh y`, the MMSE and the mutual
information are one-dimensional Gauss-Hermite integrals, and the path KL of the
denoiser sampler (plain or covariance-matched) is a sum over steps of two-dimensional
ones.

**References:** S. Chen et al., *Sampling is as easy as learning the score*, ICLR 2023;
G. Reeves, H. D. Pfister, *Discrete-time diffusion sampling*, 2025.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "GAUSSIAN_SAMPLERS",
    "binary_denoiser",
    "binary_mmse",
    "binary_mutual_information",
    "binary_path_kl",
    "exponential_integrator_density_1d",
    "gaussian_cld_law",
    "gaussian_cld_velocity_score",
    "gaussian_denoiser",
    "gaussian_denoiser_law",
    "gaussian_kl",
    "gaussian_marginal",
    "gaussian_sampler_law",
    "gaussian_score",
]

GAUSSIAN_SAMPLERS = ("reverse_sde_euler", "exponential_integrator", "probability_flow_ode")


def _t(value, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def gaussian_marginal(process, mean: Tensor, var: Tensor, t) -> tuple[Tensor, Tensor]:
    """Mean and variance (per coordinate) of :math:`X_t` for :math:`X_0 \\sim
    \\mathcal N(\\text{mean}, \\mathrm{diag}(\\text{var}))`.

    :param process: scalar-linear forward process (``marginal_coefs``).
    :param torch.Tensor mean: ``(D,)``. :param torch.Tensor var: ``(D,)`` or scalar.
    :param t: time, float or tensor (broadcast on the left of ``D``).
    """
    a, std = (_t(c, mean) for c in process.marginal_coefs(_t(t, mean)))
    a, std = a[..., None], std[..., None]
    return a * mean, a**2 * var + std**2


def _score_time(t, x: Tensor) -> Tensor:
    """``t`` in the score convention (:func:`~pyro_latdiff.score.check_score`): 0-d, or
    of ``x``'s rank with a last axis of 1 (time leftmost, e.g. ``(N, 1, 1)`` against
    ``x`` of shape ``(N, B, D)``); returned without that axis, broadcasting with
    ``x.shape[:-1]``."""
    t = _t(t, x)
    if t.dim() == 0:
        return t
    if t.dim() != x.dim() or t.shape[-1] != 1:
        raise ValueError(
            f"Expected `t` 0-d or of x's rank {x.dim()} with a last axis of 1 (time "
            f"leftmost, x of shape {tuple(x.shape)}), actual shape {tuple(t.shape)}"
        )
    return t[..., 0]


def gaussian_score(process, mean: Tensor, var: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """The exact score ``score(t, x)`` of the diffused Gaussian data, shaped like ``x``;
    ``t`` 0-d or of ``x``'s rank with a last axis of 1, as
    :func:`~pyro_latdiff.score.check_score` probes a score."""

    def score(t: Tensor, x: Tensor) -> Tensor:
        m, v = gaussian_marginal(process, mean, var, _score_time(t, x))
        return -(x - m) / v

    return score


def gaussian_kl(mean_p: Tensor, var_p: Tensor, mean_q: Tensor, var_q: Tensor) -> Tensor:
    """:math:`KL(\\mathcal N_p \\| \\mathcal N_q)` of diagonal Gaussians, summed over the
    last dimension."""
    ratio = var_p / var_q
    return 0.5 * (ratio - 1 - ratio.log() + (mean_p - mean_q) ** 2 / var_q).sum(-1)


def _score_weights(process, lo: Tensor, hi: Tensor, nodes: int = 64) -> Tensor:
    # int_lo^hi g(u)^2 a(u, hi) du / a(lo, hi), Gauss-Legendre with many nodes, per step.
    x, w = (torch.as_tensor(v, dtype=lo.dtype) for v in np.polynomial.legendre.leggauss(nodes))
    u = lo[..., None] + (hi - lo)[..., None] * (x + 1) / 2
    g = _t(process.diffusion_coef(u), u)
    a_u = _t(process.transition_coefs(u, hi[..., None].expand_as(u))[0], u)
    a = _t(process.transition_coefs(lo, hi)[0], lo)
    return (g**2 * a_u * w).sum(-1) * (hi - lo) / 2 / a


def gaussian_sampler_law(
    sampler: str,
    process,
    mean: Tensor,
    var: Tensor,
    times: Tensor,
    init_mean: Tensor | float = 0.0,
    init_var: Tensor | float = 1.0,
) -> tuple[Tensor, Tensor]:
    r"""The exact output law of a reverse-time sampler with the exact score of Gaussian
    data, started from :math:`\mathcal N(\text{init\_mean}, \text{init\_var})` at
    ``times[-1]`` and stopped at ``times[0]``.

    - ``"reverse_sde_euler"``: :math:`x' = x - (f x - g^2 s(x)) h + g \sqrt h \xi`,
      coefficients at the step's upper end;
    - ``"exponential_integrator"``: :math:`x' = x / a + c\, s(x) + (\sigma / a) \xi`,
      score frozen at the upper end, :math:`c = a^{-1}\int g(u)^2 a(u, t_{k+1}) du`;
    - ``"probability_flow_ode"``: the exact flow, which maps
      :math:`q_{t_N}` to :math:`q_{t_0}` and is affine:
      :math:`x \mapsto m_0 + \sqrt{v_0 / v_N} (x - m_N)` (a solver adds its own error).

    :param str sampler: one of ``GAUSSIAN_SAMPLERS``.
    :param torch.Tensor times: increasing grid ``(N + 1,)``.
    :returns: mean and variance, each ``(D,)``.
    """
    if sampler not in GAUSSIAN_SAMPLERS:
        raise ValueError(f"Expected `sampler` in {GAUSSIAN_SAMPLERS}, actual {sampler!r}")
    loc = torch.zeros_like(mean) + _t(init_mean, mean)
    cov = torch.zeros_like(mean) + _t(init_var, mean)
    grid = [float(t) for t in times]
    if sampler == "probability_flow_ode":
        m0, v0 = gaussian_marginal(process, mean, var, grid[0])
        m1, v1 = gaussian_marginal(process, mean, var, grid[-1])
        gain = (v0 / v1).sqrt()
        return m0 + gain * (loc - m1), gain**2 * cov
    lo, hi = times[:-1].to(mean.dtype), times[1:].to(mean.dtype)
    m, v = gaussian_marginal(process, mean, var, hi)  # (N, D)
    if sampler == "reverse_sde_euler":
        h = (hi - lo)[:, None]
        f = _t(process.drift_coef(hi), mean).expand_as(hi)[:, None]
        g2 = _t(process.diffusion_coef(hi), mean).expand_as(hi)[:, None] ** 2
        # x' = (1 - f h - g^2 h / v) x + g^2 h m / v + g sqrt(h) xi
        gain, shift, noise = 1 - f * h - g2 * h / v, g2 * h * m / v, g2 * h
    else:
        a, std = (_t(c, mean)[:, None] for c in process.transition_coefs(lo, hi))
        c = _score_weights(process, lo, hi)[:, None]
        gain, shift, noise = 1 / a - c / v, c * m / v, (std / a) ** 2
    for k in range(len(grid) - 2, -1, -1):
        loc = gain[k] * loc + shift[k]
        cov = gain[k] ** 2 * cov + noise[k]
    return loc, cov


def exponential_integrator_density_1d(
    score: Callable[[Tensor, Tensor], Tensor],
    process,
    times: Tensor,
    grid: Tensor,
    init_std: float = 1.0,
) -> Tensor:
    r"""The output density, on an equally spaced 1-D ``grid``, of the exponential
    integrator with any ``score`` (e.g. the exact score of a mixture), from
    :math:`\mathcal N(0, \text{init\_std}^2)`: each step's Gaussian kernel
    :math:`\mathcal N(x / a + c\, s(x), (\sigma / a)^2)` applied to the density by
    quadrature on the grid. For a KL that no closed form gives.

    :param callable score: ``score(t, x)`` for ``x`` of shape ``(G, 1)``.
    :param process: scalar-linear forward process.
    :param torch.Tensor times: increasing grid of the sampler ``(N + 1,)``.
    :param torch.Tensor grid: ``(G,)`` equally spaced, wide enough to hold the mass.
    :param float init_std: standard deviation of the start.
    :returns: ``(G,)`` density values.
    """
    dx = grid[1] - grid[0]
    density = torch.exp(-0.5 * (grid / init_std) ** 2) / (init_std * np.sqrt(2 * np.pi))
    lo, hi = times[:-1].to(grid.dtype), times[1:].to(grid.dtype)
    a, std = (_t(c, grid) for c in process.transition_coefs(lo, hi))
    c = _score_weights(process, lo, hi)
    for k in range(times.shape[0] - 2, -1, -1):
        s = score(hi[k], grid[:, None])[:, 0]
        centre = grid / a[k] + c[k] * s  # kernel centres of the source points
        scale = std[k] / a[k]
        kernel = torch.exp(-0.5 * ((grid[:, None] - centre[None, :]) / scale) ** 2)
        kernel = kernel / (scale * np.sqrt(2 * np.pi))
        density = kernel @ (density * dx)
    return density


# --- critically damped Langevin -------------------------------------------------------


def _cld_marginal(process, mean: Tensor, var: Tensor, t) -> tuple[Tensor, Tensor]:
    """Per coordinate: mean ``t.shape + (D, 2)`` and covariance ``t.shape + (D, 2, 2)``
    of ``(x_t, v_t)``, ``t`` a float or a tensor of times."""
    e, sigma = (
        c.to(mean.dtype)[..., None, :, :]  # a coordinate axis, left of the 2 x 2 blocks
        for c in process.transition(_t(0.0, mean), _t(t, mean))
    )
    gamma = float(getattr(process, "init_velocity_var", 0.0))
    init = torch.zeros(mean.shape + (2, 2), dtype=mean.dtype)
    init[..., 0, 0] = var
    init[..., 1, 1] = gamma
    loc = mean[..., None] * e[..., :, 0]
    return loc, e @ init @ e.transpose(-1, -2) + sigma


def gaussian_cld_velocity_score(
    process, mean: Tensor, var: Tensor
) -> Callable[[Tensor, Tensor], Tensor]:
    r"""The exact velocity score :math:`\nabla_v \log q_t(x, v)` of Gaussian data under
    critically damped Langevin diffusion; ``score(t, z)``, ``z = concat(x, v)`` of shape
    ``(..., 2 D)``, returns ``(..., D)``; ``t`` 0-d or of ``z``'s rank with a last axis
    of 1, as for :func:`gaussian_score`."""

    def score(t: Tensor, z: Tensor) -> Tensor:
        loc, cov = _cld_marginal(process, mean, var, _score_time(t, z))
        x, v = z.chunk(2, dim=-1)
        prec = torch.linalg.inv(cov)
        return -(prec[..., 1, 0] * (x - loc[..., 0]) + prec[..., 1, 1] * (v - loc[..., 1]))

    return score


def gaussian_cld_law(process, mean: Tensor, var: Tensor, times: Tensor) -> tuple[Tensor, Tensor]:
    r"""The exact output law of the CLD exponential integrator (velocity score frozen at
    each step's upper end) with the exact score of Gaussian data, started from
    ``process.prior``: per coordinate, the mean ``(D, 2)`` and covariance ``(D, 2, 2)``
    of the final ``(x, v)``.

    One reverse step over ``h``: :math:`z' = e^{-A h} z + g^2 \int_0^h e^{-A u} du\,
    e_v\, s_v(z) + \eta`, :math:`\eta \sim \mathcal N(0, E^{-1} \Sigma E^{-\top})` with
    ``(E, Sigma)`` the forward transition over the step."""
    dtype = mean.dtype
    a = process.drift_matrix().to(dtype)
    g2 = float(process.diffusion_coef()) ** 2
    mass = float(getattr(process, "mass", 1.0))
    loc = torch.zeros(mean.shape + (2,), dtype=dtype)
    cov = torch.diag(torch.tensor([1.0, mass], dtype=dtype)).expand(mean.shape + (2, 2))
    grid = [float(t) for t in times]
    eye = torch.eye(2, dtype=dtype)
    for k in range(len(grid) - 2, -1, -1):
        lo, hi = grid[k], grid[k + 1]
        h = hi - lo
        e, sigma = (c.to(dtype) for c in process.transition(_t(lo, mean), _t(hi, mean)))
        e_inv = torch.linalg.inv(e)
        # int_0^h e^{-A u} du = A^{-1} (I - e^{-A h})  (A is invertible for CLD)
        integral = torch.linalg.solve(a, eye - e_inv) if h > 0 else 0 * eye
        b = g2 * integral[:, 1]
        m_t, c_t = _cld_marginal(process, mean, var, hi)
        prec_v = torch.linalg.inv(c_t)[:, 1, :]  # (D, 2): s_v(z) = -prec_v (z - m_t)
        gain = e_inv - b[:, None] * prec_v[:, None, :]  # (D, 2, 2)
        shift = b * (prec_v * m_t).sum(-1, keepdim=True)
        loc = (gain @ loc[..., None])[..., 0] + shift
        cov = gain @ cov @ gain.transpose(-1, -2) + e_inv @ sigma @ e_inv.T
    return loc, cov


# --- the denoiser sampler on the channel Y_t = t X + W_t ---------------------------------


def gaussian_denoiser(mean: Tensor, var: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """:math:`E[X \\mid Y_t = y] = (m / s^2 + y) / (1 / s^2 + t)` for
    :math:`X \\sim \\mathcal N(m, \\mathrm{diag}(s^2))`."""

    def denoiser(t: Tensor, y: Tensor) -> Tensor:
        return (mean / var + y) / (1 / var + t)

    return denoiser


def gaussian_denoiser_law(
    mean: Tensor,
    var: Tensor,
    times: Tensor,
    covariance_matched: bool = False,
    output: str = "mean",
) -> tuple[Tensor, Tensor]:
    r"""The exact law of the denoiser sampler's output for Gaussian data with the exact
    conditional mean: the recursion
    :math:`\hat Y_k = (1 - \delta_k / (1/s^2 + t_{k-1})) \hat Y_{k-1}
    + \delta_k (m / s^2) / (1 / s^2 + t_{k-1}) + \text{noise}`, noise variance
    :math:`\delta_k` (plain) or :math:`\delta_k + \delta_k^2 s^2 / (1 + t_{k-1} s^2)`
    (covariance-matched), then ``output`` as in the sampler."""
    loc = torch.zeros_like(mean)
    cov = torch.zeros_like(mean)
    grid = [float(t) for t in times]
    for k in range(1, len(grid)):
        t, delta = grid[k - 1], grid[k] - grid[k - 1]
        prec = 1 / var + t
        gain = 1 + delta / prec  # d/dy [y + delta (m / s^2 + y) / prec]
        loc = gain * loc + delta * (mean / var) / prec
        noise = delta + (delta**2 / prec if covariance_matched else 0.0)
        cov = gain**2 * cov + noise
    t_n = grid[-1]
    if output == "mean":
        prec = 1 / var + t_n
        return (mean / var + loc) / prec, cov / prec**2
    if output == "scaled":
        return loc / t_n, cov / t_n**2
    return loc, cov


def _hermite(num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    z, w = np.polynomial.hermite_e.hermegauss(num_nodes)
    return z, w / w.sum()


def binary_denoiser(t: Tensor, y: Tensor) -> Tensor:
    """:math:`E[X \\mid Y_t = y] = \\tanh y` for :math:`X` uniform on :math:`\\{\\pm 1\\}`."""
    return torch.tanh(y)


def binary_mmse(t, num_nodes: int = 200) -> Tensor:
    r""":math:`\mathrm{mmse}(t) = 1 - E \tanh(t + \sqrt t Z)` for :math:`X` uniform on
    :math:`\{\pm 1\}` (Gauss-Hermite); ``t`` a float or tensor of times."""
    t = torch.as_tensor(t, dtype=torch.float64)
    z, w = (torch.as_tensor(a) for a in _hermite(num_nodes))
    y = t[..., None] + t[..., None].sqrt() * z
    return 1 - (w * torch.tanh(y)).sum(-1)


def binary_mutual_information(t, num_nodes: int = 200) -> Tensor:
    r""":math:`I(X; Y_t) = t - E \log\cosh(t + \sqrt t Z)` nats, :math:`X` uniform on
    :math:`\{\pm 1\}`."""
    t = torch.as_tensor(t, dtype=torch.float64)
    z, w = (torch.as_tensor(a) for a in _hermite(num_nodes))
    y = t[..., None] + t[..., None].sqrt() * z
    log_cosh = torch.logaddexp(y, -y) - np.log(2.0)
    return t - (w * log_cosh).sum(-1)


def binary_path_kl(times: Tensor, covariance_matched: bool = False, num_nodes: int = 120) -> Tensor:
    r"""The path KL :math:`KL(P_{Y_{t_1:t_n}} \| \hat Q)` of the denoiser sampler with
    the exact :math:`\tanh` for :math:`X` uniform on :math:`\{\pm 1\}`, computed from its
    definition: per step, :math:`E\, KL(p(y_k \mid y_{k-1}) \| \hat q(y_k \mid y_{k-1}))`
    with the true kernel the two-component mixture
    :math:`\sum_x P(x \mid y_{k-1}) \mathcal N(y_{k-1} + \delta_k x, \delta_k)`, by
    two-dimensional Gauss-Hermite quadrature (by symmetry given :math:`X = 1`). It does
    not use the I-MMSE identity, so it checks it.

    :param torch.Tensor times: increasing grid from 0, ``(n + 1,)``.
    :param bool covariance_matched: step variance
        :math:`\delta_k + \delta_k^2 (1 - \tanh^2 y_{k-1})` instead of :math:`\delta_k`.
    :returns: 0-d float64 tensor.
    """
    z, w = (torch.as_tensor(a) for a in _hermite(num_nodes))
    grid = torch.as_tensor(times, dtype=torch.float64)
    t0 = grid[:-1, None, None]
    delta = grid.diff()[:, None, None]
    y0 = t0 + t0.sqrt() * z[:, None]
    y1 = y0 + delta + delta.sqrt() * z[None, :]
    log_w1 = torch.nn.functional.logsigmoid(2 * y0)  # P(X = 1 | y0) = sigmoid(2 y0)
    log_w0 = torch.nn.functional.logsigmoid(-2 * y0)
    log_p = torch.logaddexp(
        log_w1 - (y1 - y0 - delta) ** 2 / (2 * delta),
        log_w0 - (y1 - y0 + delta) ** 2 / (2 * delta),
    ) - 0.5 * torch.log(2 * np.pi * delta)
    f = torch.tanh(y0)
    var = delta + (delta**2 * (1 - f**2) if covariance_matched else 0)
    log_q = -((y1 - y0 - delta * f) ** 2) / (2 * var) - 0.5 * torch.log(2 * np.pi * var)
    weights = w[:, None] * w[None, :]
    return ((log_p - log_q) * weights).sum()
