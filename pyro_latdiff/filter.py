r"""Backward information filter on an Euler chain, and the guided kernel it defines.

Guided proposals (Schauer, van der Meulen & van Zanten 2017; backward filtering
forward guiding, Mider, Schauer & van der Meulen 2021) in discrete time. The model's
Euler chain is linearised around a reference path :math:`\hat x`,

.. math::

    x_{k+1} = A_k x_k + a_k + \varepsilon_k, \quad \varepsilon_k \sim N(0, Q_k), \qquad
    A_k = I + B_k h_k,\; a_k = (b(t_k, \hat x_k) - B_k \hat x_k) h_k,\;
    Q_k = \sigma \sigma^T(t_k, \hat x_k)\, h_k,

with :math:`B_k = \partial b / \partial x` at :math:`\hat x_k`, and the observation
log-likelihood by its second-order expansion in each state. For this auxiliary chain
the probability of the observations from step :math:`j` on, given :math:`x_j = x`,
is :math:`\tilde h_j(x) \propto \exp(-x^T H_j x / 2 + F_j^T x)`, and :math:`(H_j,
F_j)` follow backwards in closed form (:func:`backward_filter`). The guided step
(:class:`GuidedKernel`) is the model's own Euler kernel at the current state tilted by
:math:`\tilde h_{k+1}` and renormalised: again Gaussian,

.. math::

    \Sigma' = (I + \Sigma H)^{-1} \Sigma, \qquad
    m' = (I + \Sigma H)^{-1} (m + \Sigma F),

with :math:`m = x + b(t_k, x) h_k` and :math:`\Sigma = \sigma\sigma^T(t_k, x) h_k`.
When the model is linear-Gaussian the auxiliary chain is the model and the guided
chain is exactly the posterior chain; for one terminal observation it is a
modified diffusion bridge.
"""

from __future__ import annotations

import copy
import math
from bisect import bisect_left
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor

from ._shapes import broadcast_shapes
from .checkpoint import checkpoint_block
from .distribution import ALL_STEPS, LatentDiffusion

__all__ = [
    "BlockedGuidedKernel",
    "GuidedKernel",
    "SparseObservationTerms",
    "backward_filter",
    "linearise_drift",
    "observation_terms",
]


def _jacobian_rows(out: Tensor, inputs: Tensor, create_graph: bool) -> Tensor:
    """``d out[..., i] / d inputs[..., :]`` stacked over ``i``, for an ``out`` whose
    entries depend only on the ``inputs`` entry at the same batch position:
    ``out.shape[:-1] + (D_out, D_in)``. One row in a plain backward pass; several in one
    vectorised pass (``is_grads_batched``), or one pass per row where an operation does
    not vectorise."""
    dim = out.shape[-1]
    if dim == 1:  # one row: a plain backward pass (no batching machinery)
        (row,) = torch.autograd.grad(
            out, inputs, torch.ones_like(out), create_graph=create_graph, retain_graph=True,
            allow_unused=True,
        )  # fmt: skip
        if row is None:
            return torch.zeros(inputs.shape + (1,), dtype=inputs.dtype, device=inputs.device)
        return row.unsqueeze(-2)
    eye = torch.eye(dim, dtype=out.dtype, device=out.device)
    basis = eye.reshape((dim,) + (1,) * (out.dim() - 1) + (dim,)).expand((dim,) + out.shape)
    try:
        (rows,) = torch.autograd.grad(
            out, inputs, basis, create_graph=create_graph, retain_graph=True,
            allow_unused=True, is_grads_batched=True,
        )  # fmt: skip
    except RuntimeError:  # an operation without a batching rule
        rows = None
        per_row = []
        for i in range(dim):
            (row,) = torch.autograd.grad(
                out[..., i].sum(), inputs, create_graph=create_graph, retain_graph=True,
                allow_unused=True,
            )  # fmt: skip
            per_row.append(torch.zeros_like(inputs) if row is None else row.expand_as(inputs))
        return torch.stack(per_row, dim=-2)
    if rows is None:
        return torch.zeros(inputs.shape + (dim,), dtype=inputs.dtype, device=inputs.device)
    return rows.expand((dim,) + inputs.shape).movedim(0, -2)


class SparseObservationTerms(NamedTuple):
    """The observation terms of :func:`observation_terms` at the observed states only:
    ``precision`` and ``information`` hold one row per entry of ``states`` (time
    leftmost, ``(K,) + batch + (D, D)`` and ``(K,) + batch + (D,)``), the terms of every
    other state of the ``num_states`` being zero. The memory is that of the
    observations, not of the path."""

    precision: Tensor
    information: Tensor
    #: the sorted indices (``0 .. num_states - 1``, state ``x_{j+1}`` at ``j``) of the
    #: rows; ``None``: a row for every state (dense terms)
    states: tuple[int, ...] | None
    num_states: int

    def rows(self, first: int, stop: int) -> tuple[Tensor, Tensor]:
        """The dense terms of the states ``first .. stop - 1`` (zero where unobserved)."""
        P, f = self.precision, self.information
        if self.states is None:
            return P[first:stop], f[first:stop]
        lo, hi = bisect_left(self.states, first), bisect_left(self.states, stop)
        P_rows = P.new_zeros((stop - first,) + P.shape[1:])
        f_rows = f.new_zeros((stop - first,) + f.shape[1:])
        if lo == hi:
            return P_rows, f_rows
        local = torch.tensor(self.states[lo:hi], device=P.device) - first
        return P_rows.index_copy(0, local, P[lo:hi]), f_rows.index_copy(0, local, f[lo:hi])

    def start_rows(self, steps: slice) -> tuple[Tensor, Tensor]:
        """The dense terms of the states the transitions ``steps`` start from: ``x_start
        .. x_{stop - 1}``, zero for ``x_0``."""
        P, f = self.rows(max(steps.start - 1, 0), steps.stop - 1)
        if steps.start == 0:  # x_0 is not observed
            P, f = (torch.cat([t.new_zeros((1,) + t.shape[1:]), t]) for t in (P, f))
        return P, f


def _dependent_states(log_likelihood: Tensor, path: Tensor) -> tuple[int, ...]:
    """The indices along the time axis of ``path`` (``batch + (N, D)``) of the states
    ``log_likelihood`` depends on, whatever the values: a backward pass of a NaN marks
    every state it reaches, since ``0 * nan`` is ``nan`` (a derivative that is zero at
    these values, such as a loading at zero, still counts). Only selections (indexing,
    ``where``) leave a state unmarked, and their derivatives are zero there too; an
    operation that mixes states marks them all, which only keeps more rows."""
    nan = torch.full_like(log_likelihood, math.nan)
    (probe,) = torch.autograd.grad(log_likelihood, path, nan, retain_graph=True)
    marked = (probe != 0).movedim(-2, 0).reshape(path.shape[-2], -1).any(-1)  # nan != 0
    return tuple(marked.nonzero().squeeze(-1).tolist())


def observation_terms(
    log_likelihood: Tensor,
    path: Tensor,
    create_graph: bool = True,
    check_coupling: bool = False,
    sparse: bool = False,
) -> tuple[Tensor, Tensor] | SparseObservationTerms | None:
    """The second-order expansion of the observation log-likelihood in each state.

    ``log_likelihood`` is a scalar computed from ``path`` (a leaf, ``batch + (N, D)``,
    the reference path), each observation depending on the state at one time. Returns
    ``(precision, information)`` with time leftmost, ``(N,) + batch + (D, D)`` and
    ``(N,) + batch + (D,)``: ``log p(obs | x_j = x) ~ -x^T P_j x / 2 + f_j^T x`` with
    ``P_j = -Hessian`` (negative curvature is clipped to zero, so the guided kernel
    stays a proper Gaussian) and ``f_j = gradient + P_j x_ref``; ``None`` if the
    observations do not depend on the path.

    The per-time Hessian blocks come from ``D`` backward passes, which is exact only
    if no observation couples the states at two times. With ``check_coupling`` one
    more Hessian-vector product in a random direction checks it, and a coupling is a
    ``ValueError``. With ``sparse``, the terms of the states the observations depend on
    only, as :class:`SparseObservationTerms` (one more backward pass finds them): a
    path observed at a few of many times then keeps no path-sized terms.
    """
    if not isinstance(log_likelihood, Tensor) or not log_likelihood.requires_grad:
        return None
    (grad,) = torch.autograd.grad(
        log_likelihood, path, create_graph=True, retain_graph=True, allow_unused=True
    )
    if grad is None:
        return None
    hessian = _jacobian_rows(grad, path, create_graph)
    if check_coupling and grad.requires_grad:
        direction = torch.randn(path.shape, dtype=path.dtype, device=path.device)
        (full,) = torch.autograd.grad(
            (grad * direction).sum(), path, retain_graph=True, allow_unused=True
        )
        full = torch.zeros_like(path) if full is None else full
        blocks = (hessian.detach() @ direction.unsqueeze(-1)).squeeze(-1)
        tolerance = 1e-6 * (1.0 + full.abs().max() + blocks.abs().max())
        if not torch.allclose(full, blocks, rtol=1e-4, atol=float(tolerance)):
            raise ValueError(
                "Expected each observation of a path to depend on its state at one time "
                "(the guided proposal expands the likelihood time by time), actual an "
                "observation that couples states at several times; use "
                "DiffusionGuide(..., bridge=False) for such a model"
            )
    reference = path.detach()
    if sparse:  # the rows of the observed states, before anything keeps the path-sized
        states = _dependent_states(log_likelihood, path)
        index = torch.tensor(states, dtype=torch.long, device=path.device)
        grad, hessian = grad.index_select(-2, index), hessian.index_select(-3, index)
        reference = reference.index_select(-2, index)
    precision = -0.5 * (hessian + hessian.transpose(-1, -2))
    if path.shape[-1] == 1:
        precision = precision.clamp(min=0.0)
    elif not _positive_semidefinite(precision.detach()):  # e.g. a heavy-tailed likelihood
        values, vectors = torch.linalg.eigh(precision)
        precision = (vectors * values.clamp(min=0.0).unsqueeze(-2)) @ vectors.transpose(-1, -2)
    information = grad + (precision @ reference.unsqueeze(-1)).squeeze(-1)
    if not create_graph:
        precision, information = precision.detach(), information.detach()
    precision, information = precision.movedim(-3, 0), information.movedim(-2, 0)
    if sparse:
        return SparseObservationTerms(precision, information, states, path.shape[-2])
    return precision, information


def _positive_semidefinite(matrix: Tensor) -> bool:
    """Whether every ``(D, D)`` block is positive semi-definite (to rounding): a Cholesky
    factorisation with a small relative jitter succeeds everywhere."""
    scale = matrix.diagonal(dim1=-2, dim2=-1).abs().amax(-1, keepdim=True).clamp(min=1.0)
    jitter = 1e3 * torch.finfo(matrix.dtype).eps * scale
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    _, info = torch.linalg.cholesky_ex(matrix + jitter.unsqueeze(-1) * eye)
    return bool((info == 0).all().item())


def linearise_drift(
    prior: LatentDiffusion, reference: Tensor, create_graph: bool = True
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The Euler chain linearised around a reference path, all steps at once.

    :param LatentDiffusion prior: the model's chain.
    :param torch.Tensor reference: the states ``x_1 .. x_N``, shape ``batch + (N, D)``
        (``batch`` broadcasting with the prior's).
    :returns: ``(A, a, Q, previous)`` with time leftmost: ``(N,) + batch + (D, D)``,
        ``(N,) + batch + (D,)``, ``(N,) + batch + (D, D)`` (see the module docstring),
        and the states ``x_0 .. x_{N-1}`` linearised at, ``(N,) + batch + (D,)``.
    """
    previous = _previous_states(prior, reference)
    return (*_linearise_steps(prior, previous, ALL_STEPS, create_graph), previous)


def _previous_states(prior: LatentDiffusion, reference: Tensor) -> Tensor:
    """``x_0 .. x_{N-1}`` of a reference path ``x_1 .. x_N``, time leftmost, detached."""
    batch = broadcast_shapes(reference.shape[:-2], prior.batch_shape)
    reference = reference.detach().expand(batch + reference.shape[-2:])
    x0 = prior.x0.detach().expand(batch + prior.x0.shape[-1:])
    return torch.cat([x0.unsqueeze(-2), reference[..., :-1, :]], dim=-2).movedim(-2, 0)


def _linearise_steps(
    prior: LatentDiffusion, previous: Tensor, steps: slice, create_graph: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """``(A, a, Q)`` of the steps ``steps`` at the states ``previous`` (``(K,) + batch
    + (D,)``, the states those steps start from)."""
    num_steps, dim = previous.shape[0], previous.shape[-1]
    ones = (1,) * (previous.dim() - 1)
    h = prior.times.diff()[steps].reshape((num_steps,) + ones)
    t = prior.times[:-1][steps].reshape(h.shape)
    with torch.enable_grad():
        previous = previous.detach().requires_grad_()
        drift = prior.drift(t, previous).expand_as(previous)
        jacobian = _jacobian_rows(drift, previous, create_graph)
    previous = previous.detach()
    eye = torch.eye(dim, dtype=previous.dtype, device=previous.device)
    step_matrix = h.unsqueeze(-1)
    A = eye + jacobian * step_matrix
    a = (drift - (jacobian @ previous.unsqueeze(-1)).squeeze(-1)) * h
    if not create_graph:
        A, a = A.detach(), a.detach()
    sigma = prior.diffusion_at(t, previous)
    Q = _covariance(sigma, prior.noise_type, dim) * step_matrix
    return A, a, Q.expand(A.shape)


def _covariance(scale: Tensor, noise_type: str, dim: int) -> Tensor:
    """``sigma sigma^T`` for a diagonal (broadcasting with ``(D,)``) or general
    (``(..., D, M)``) scale."""
    if noise_type == "diagonal":
        scale = scale.expand(broadcast_shapes(scale.shape, (dim,)))
        return torch.diag_embed(scale.square())
    return scale @ scale.transpose(-1, -2)


def backward_filter(
    A: Tensor, a: Tensor, Q: Tensor, precision: Tensor, information: Tensor
) -> tuple[Tensor, Tensor]:
    r"""The backward information filter of a linear-Gaussian chain.

    Transition ``k`` (``k = 0 .. N - 1``) maps ``x_k`` to
    ``x_{k+1} ~ N(A_k x_k + a_k, Q_k)``; the observations of state ``x_j``
    (``j = 1 .. N``) contribute ``exp(-x^T P x / 2 + f^T x)`` with ``(P, f)`` at index
    ``j - 1`` of ``precision, information``. All arguments have time leftmost and
    broadcastable batch shapes.

    :returns: ``(H, F)``, shapes ``(N,) + batch + (D, D)`` and ``(N,) + batch + (D,)``:
        at index ``j - 1``, the quadratic log h-function of state ``x_j`` given every
        observation from ``j`` on, ``log h_j(x) = -x^T H x / 2 + F^T x + const``.
    """
    dim = A.shape[-1]
    if dim == 1:  # scalars: no linear algebra on 1 x 1 matrices
        H, F = _backward_filter_scalar(
            A[..., 0, 0], a[..., 0], Q[..., 0, 0], precision[..., 0, 0], information[..., 0]
        )
        return H[..., None, None], F[..., None]
    P, f = _start_observations(precision, information, slice(0, precision.shape[0]))
    H, F, _ = _filter_back(A, a, Q, P, f, precision[-1], information[-1])
    return H, F


def _start_observations(precision: Tensor, information: Tensor, steps: slice):
    """The observation terms (time leftmost, of :func:`observation_terms`' states
    ``x_1 .. x_N``) of the states the transitions ``steps`` start from: ``x_start ..
    x_{stop - 1}``, zero for ``x_0``."""
    terms = SparseObservationTerms(precision, information, None, precision.shape[0])
    return terms.start_rows(steps)


def _stacked(tensors: list[Tensor], shape: torch.Size | None = None) -> Tensor:
    """``tensors`` expanded to their broadcast shape (or ``shape``), stacked time leftmost."""
    if shape is None:
        shape = broadcast_shapes(*(t.shape for t in tensors))
    return torch.stack([t.expand(shape) for t in tensors])


def _filter_back(A, a, Q, P, f, H, F):
    """The backward filter over transitions ``K - 1, ..., 0`` (time leftmost ``A, a,
    Q``), from ``(H, F)`` of the state the last one ends in; ``P, f`` are the
    observation terms of the states the transitions start from (zero for none).
    Returns ``(H, F)`` of the states after each transition, time leftmost, and ``(H,
    F)`` of the state before the first."""
    A, a, Q = A.unbind(0), a.unbind(0), Q.unbind(0)
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    Hs, Fs = [], []
    for j in range(len(A) - 1, -1, -1):  # from state j + 1 back to state j
        Hs.append(H)
        Fs.append(F)
        gain, info = torch.linalg.inv_ex(eye + H @ Q[j])  # singular: NaN, no raise
        gain = torch.where((info > 0)[..., None, None], torch.nan, gain)
        H_pred = gain @ H
        H_pred = 0.5 * (H_pred + H_pred.transpose(-1, -2))
        F_pred = (gain @ F.unsqueeze(-1)).squeeze(-1)
        shifted = F_pred - (H_pred @ a[j].unsqueeze(-1)).squeeze(-1)
        At = A[j].transpose(-1, -2)
        H = At @ H_pred @ A[j]
        F = (At @ shifted.unsqueeze(-1)).squeeze(-1) + f[j]
        H = H + P[j]
    return _stacked(Hs[::-1]), _stacked(Fs[::-1]), (H, F)


#: Scalar filters times ``log2`` of the steps up to which the suffix-product filter is
#: faster than the loop (2-core CPU, float32 and float64 alike).
_SCAN_FILTERS = 400


def _filter_back_diagonal(A, a, Q, P, f, H, F):
    r""":func:`_filter_back` for independent coordinates.

    Every argument holds diagonals (or scalars for ``D = 1``), time leftmost: ``P, f``
    are the observation terms of the states the transitions start from (zero for
    none). With ``H = u / w`` and ``F = v / w``, transition ``j`` maps ``(w, u, v)``
    of the state after it linearly to that of the state before,

    .. math::

        M_j = \begin{pmatrix} 1 & Q & 0 \\ P & A^2 + P Q & 0 \\
              f & f Q - A a & A \end{pmatrix},

    so the filter of every state is a suffix product ``M_j M_{j+1} ... M_{K-1}``
    applied to ``(1, H, F)``: ``log2 K`` batched products instead of a loop over the
    ``K`` steps, which wins while the products are few (measured on CPU: up to about
    400 scalar filters times ``log2 K``); beyond, the loop.
    """
    shape = broadcast_shapes(A.shape, a.shape, Q.shape, P.shape, f.shape,
                             (1,) + H.shape, (1,) + F.shape)  # fmt: skip
    steps, filters = shape[0], math.prod(shape[1:])
    if filters * max(1, math.ceil(math.log2(steps))) > _SCAN_FILTERS:
        return _filter_back_diagonal_loop(A, a, Q, P, f, H, F)
    A, a, Q, P, f = (t.expand(shape) for t in (A, a, Q, P, f))
    one, zero = torch.ones_like(A), torch.zeros_like(A)
    rows = [(one, Q, zero), (P, A * A + P * Q, zero), (f, f * Q - A * a, A)]
    suffix = _suffix_products(torch.stack([torch.stack(row, -1) for row in rows], -2))
    end = torch.stack(torch.broadcast_tensors(torch.ones_like(H), H, F), -1)
    w, u, v = (suffix @ end.expand(shape + (3,)).unsqueeze(-1)).squeeze(-1).unbind(-1)
    H_all = torch.cat([u[1:] / w[1:], H.expand(shape[1:]).unsqueeze(0)])
    F_all = torch.cat([v[1:] / w[1:], F.expand(shape[1:]).unsqueeze(0)])
    return H_all, F_all, (u[0] / w[0], v[0] / w[0])


def _filter_back_diagonal_loop(A, a, Q, P, f, H, F):
    """:func:`_filter_back_diagonal` step by step."""
    A2, Aa = A.square().unbind(0), (A * a).unbind(0)
    A, Q, P, f = A.unbind(0), Q.unbind(0), P.unbind(0), f.unbind(0)
    Hs, Fs = [], []
    for j in range(len(A) - 1, -1, -1):  # from state j + 1 back to state j
        Hs.append(H)
        Fs.append(F)
        gain = 1.0 / (1.0 + H * Q[j])
        H, F = A2[j] * (gain * H) + P[j], gain * (A[j] * F - Aa[j] * H) + f[j]
    shape = broadcast_shapes(*(t.shape for t in Hs + Fs))  # H and F alike
    return _stacked(Hs[::-1], shape), _stacked(Fs[::-1], shape), (H, F)


def _suffix_products(M: Tensor) -> Tensor:
    """``M_j M_{j+1} ... M_{K-1}`` for every ``j`` (time leftmost ``(K, ..., n, n)``),
    each up to a positive factor, in ``ceil(log2 K)`` steps (Hillis and Steele)."""
    count, span = M.shape[0], 1
    while span < count:
        head = M[: count - span] @ M[span:]
        scale = head.detach().abs().amax((-2, -1), keepdim=True)
        M = torch.cat([head / scale, M[count - span :]])
        span *= 2
    return M


def _backward_filter_scalar(A, a, Q, precision, information):
    """:func:`backward_filter` for independent coordinates: every argument holds the
    diagonals (or scalars for ``D = 1``), without the matrix axes."""
    P, f = _start_observations(precision, information, slice(0, precision.shape[0]))
    H, F, _ = _filter_back_diagonal(A, a, Q, P, f, precision[-1], information[-1])
    return H, F


def _all_diagonal(prior: LatentDiffusion, A: Tensor, precision: Tensor) -> bool:
    """Whether the linearised chain splits into independent coordinates: diagonal noise,
    drift Jacobians and observation curvatures (one host synchronisation)."""
    if A.shape[-1] == 1:
        return True
    if prior.noise_type != "diagonal":
        return False
    return bool(_off_diagonal(A, precision).item() == 0)


def _off_diagonal(*matrices: Tensor) -> Tensor:
    """The largest off-diagonal magnitude of ``matrices`` (a 0-d tensor)."""
    off = [(m - torch.diag_embed(m.diagonal(dim1=-2, dim2=-1))).detach().abs().max()
           for m in matrices]  # fmt: skip
    return torch.stack(off).max()


def _probe_noise(shape: torch.Size, like: Tensor) -> Tensor:
    """A fixed pseudo-random direction of shape ``shape``, with the dtype and device of
    ``like`` (the global random state untouched)."""
    generator = torch.Generator(device=like.device).manual_seed(0)
    noise = torch.randn(shape, generator=generator, device=like.device)
    return noise.to(like.dtype)


def _linearisation_error(prior, A, a, reference, noise, steps: slice) -> tuple[Tensor, Tensor]:
    """The largest error of the linearised Euler mean of the steps ``steps`` at the
    states ``reference`` (time leftmost) displaced by ``noise``, and the largest
    exact mean (0-d tensors)."""
    previous = reference + noise * (1.0 + reference.abs())
    h = prior.times.diff()[steps].reshape((-1,) + (1,) * (previous.dim() - 1))
    t = prior.times[:-1][steps].reshape(h.shape)
    exact = previous + prior.drift(t, previous) * h
    linear = (A.detach() @ previous.unsqueeze(-1)).squeeze(-1) + a.detach()
    return (exact - linear).abs().max(), exact.abs().max()


def _is_rounding(error: Tensor, size: Tensor) -> bool:
    """Whether ``error`` is rounding for numbers of magnitude ``size``."""
    return bool((error <= 1e3 * torch.finfo(size.dtype).eps * (1.0 + size)).item())


def _noise_free_path(prior: LatentDiffusion, batch_shape, kernels) -> Tensor:
    """The path of guided kernels without noise from ``x0``, ``batch + (N, D)``:
    ``kernels`` gives ``(kernel, steps)`` pairs, each kernel for its slice of steps."""
    batch = broadcast_shapes(batch_shape, prior.batch_shape)
    x = prior.x0.expand(batch + prior.x0.shape[-1:])
    h = prior.times.diff()
    states = []
    for kernel, steps in kernels:
        kernel = kernel.window(steps)
        for k in range(steps.start, steps.stop):
            drift, _ = kernel.step(k, x, *prior.step(k, x))
            x = x + drift * h[k]
            states.append(x)
    return torch.stack(states, dim=-2)


class GuidedKernel:
    r"""The prior's Euler kernel tilted by the backward filter's h-function of the next
    state (see the module docstring), by step index or for all steps at once.

    :meth:`step` and :meth:`path` take the prior's ``(drift, scale)`` at the current
    states and return the guided ``(drift, scale)``; the guided scale is a
    lower-triangular ``(..., D, D)`` matrix (``"triangular"`` noise) when ``D > 1`` and is
    shaped like ``x`` when ``D = 1``. If the prior's noise does not depend on the state
    the tilt is precomputed for the whole grid at construction (a gain, a shift and a
    scale per step), so a step costs a matrix-vector product.

    :param torch.Tensor H: filter precisions of ``x_1 .. x_N``, ``(N,) + batch + (D, D)``.
    :param torch.Tensor F: filter informations, ``(N,) + batch + (D,)``.
    :param LatentDiffusion prior: the model's chain.
    """

    def __init__(self, H: Tensor, F: Tensor, prior: LatentDiffusion, offset: int = 0):
        if H.dim() == F.dim() + 1 and H.shape[-1] == 1:  # 1 x 1 blocks: scalars
            H = H[..., 0]
        self.H, self.F = H, F
        # H and F are those of the steps offset, offset + 1, ... (one block of them).
        self._offset = offset
        self.dim = F.shape[-1]
        # Diagonal: H holds the diagonals (N, batch, D) of diagonal blocks, every
        # coordinate is its own scalar filter and the guided noise stays diagonal.
        self.diagonal = H.dim() == F.dim()
        self.batch_shape = F.shape[1:-1]
        self.noise_type = "diagonal" if self.diagonal else "triangular"
        self.prior_noise_type = prior.noise_type
        self.steps = prior.times.diff()
        self._ones = (1,) * (F.dim() - 1)
        self._precomputed = None
        if not callable(prior.diffusion):
            h = self.steps[offset : offset + H.shape[0]].reshape((-1,) + self._ones)
            sigma = prior.diffusion_at(prior.times[0], prior.x0)
            self._precomputed = self._tilt(self._rate(sigma), h, H, F)
            if self.diagonal:
                # The guided drift (gain (x + drift h) + shift - x) / h as gain drift +
                # slope x + level: two operations fewer per step.
                gain, _, scale = self._precomputed
                rate = self._rate(sigma)
                slope, level = -gain * rate * H, gain * rate * F
                self._precomputed = (gain, slope, level, scale)
        #: the steps of the solve this is the window of (see :meth:`window`), or None
        self._window: slice | None = None
        self._rows: tuple[int, list] | None = None

    def window(self, steps: slice) -> GuidedKernel:
        """The kernel for the steps ``steps`` of one solve or checkpointed block (its
        tables cover them): :meth:`step` splits their rows off at its first call."""
        new = copy.copy(self)
        new._window, new._rows = steps, None
        return new

    def _step_rows(self, steps: slice) -> tuple[int, list[tuple[Tensor, ...]]]:
        """The first step of ``steps`` and, per step, the rows of the tables it reads."""
        local = self._local(steps)
        if self._precomputed is None:
            tables = [self.H[local], self.F[local], self.steps[steps]]
        else:  # diagonal: gain, slope, level, scale; else gain, shift, scale and h
            tables = [table[local] for table in self._precomputed]
            if not self.diagonal:
                tables.append(self.steps[steps])
        return steps.start or 0, list(zip(*(table.unbind(0) for table in tables), strict=True))

    def _rate(self, sigma: Tensor) -> Tensor:
        """``sigma sigma^T`` per unit time: its diagonal when the kernel is diagonal."""
        covariance = _covariance(sigma, self.prior_noise_type, self.dim)
        return covariance.diagonal(dim1=-2, dim2=-1) if self.diagonal else covariance

    @classmethod
    def from_observations(
        cls,
        prior: LatentDiffusion,
        reference: Tensor,
        terms: tuple[Tensor, Tensor] | SparseObservationTerms,
        create_graph: bool = True,
        block_size: int | None = None,
    ) -> GuidedKernel | BlockedGuidedKernel:
        """The guided kernel of ``prior`` linearised around ``reference`` (``batch +
        (N, D)``), given the observation terms of :func:`observation_terms` (dense or
        sparse); with ``block_size`` (fewer than ``N``), a :class:`BlockedGuidedKernel`."""
        if block_size is not None and block_size < prior.num_steps:
            return BlockedGuidedKernel(prior, reference, terms, create_graph, block_size)
        A, a, Q, previous = linearise_drift(prior, reference, create_graph)
        if isinstance(terms, SparseObservationTerms):
            terms = terms.rows(0, terms.num_states)
        precision, information = terms
        if _all_diagonal(prior, A, precision):  # D independent scalar filters
            diagonal = lambda m: m.diagonal(dim1=-2, dim2=-1)  # noqa: E731
            H, F = _backward_filter_scalar(
                diagonal(A), a, diagonal(Q), diagonal(precision), information
            )
        else:
            H, F = backward_filter(A, a, Q, precision, information)
        kernel = cls(H, F, prior)
        kernel._linear = (A, a)
        kernel._reference = previous
        return kernel

    @torch.no_grad()
    def mean_path(self, prior: LatentDiffusion) -> Tensor:
        """The noise-free path of the guided kernel from ``x0``, ``batch + (N, D)``."""
        return _noise_free_path(prior, self.batch_shape, [(self, slice(0, self.steps.shape[0]))])

    @torch.no_grad()
    def drift_is_affine(self, prior: LatentDiffusion) -> bool:
        """Whether the drift linearised in :meth:`from_observations` predicts the
        model's drift at states displaced from the reference in a fixed pseudo-random
        direction (then relinearising elsewhere changes nothing). Does not touch the
        global random state."""
        A, a = self._linear
        noise = _probe_noise(self._reference.shape, self._reference)
        error, size = _linearisation_error(prior, A, a, self._reference, noise, ALL_STEPS)
        return _is_rounding(error, size)

    def _tilt(self, cov_rate: Tensor, h: Tensor, H: Tensor, F: Tensor):
        """Gain ``K = (I + Sigma H)^{-1}``, shift ``K Sigma F`` and guided scale for
        ``Sigma = cov_rate * h``; the tilted mean is ``K m + shift``."""
        if self.diagonal:
            cov = cov_rate * h
            gain = 1.0 / (1.0 + cov * H)
            return gain, gain * cov * F, (gain * cov_rate).sqrt()
        cov = cov_rate * h.unsqueeze(-1)
        eye = torch.eye(self.dim, dtype=cov.dtype, device=cov.device)
        # A singular factorisation (states far off after a bad optimiser step) becomes
        # NaN, so the ELBO is not finite and fit stops with FitDivergedError; no raise,
        # no host synchronisation.
        gain, inv_info = torch.linalg.inv_ex(eye + cov @ H)
        shift = (gain @ (cov @ F.unsqueeze(-1))).squeeze(-1)
        rate = gain @ cov_rate
        scale, chol_info = torch.linalg.cholesky_ex(0.5 * (rate + rate.transpose(-1, -2)))
        failed = ((inv_info > 0) | (chol_info > 0))[..., None, None]
        scale = torch.where(failed, torch.nan, scale)
        return gain, shift, scale

    def _apply(self, gain: Tensor, mean: Tensor) -> Tensor:
        if self.diagonal:
            return gain * mean
        return (gain @ mean.unsqueeze(-1)).squeeze(-1)

    def _local(self, steps: slice) -> slice:
        """``steps`` of the grid as a slice of the tables."""
        if not self._offset or steps == ALL_STEPS:
            return steps
        return slice(steps.start - self._offset, steps.stop - self._offset)

    def step(self, k: int, x: Tensor, drift: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
        rows = self._rows
        if rows is None:
            rows = self._step_rows(slice(k, k + 1) if self._window is None else self._window)
            if self._window is not None:  # at the first step of the solve
                self._rows = rows
        first, rows = rows
        row = rows[k - first]
        if self._precomputed is not None and self.diagonal:
            gain, slope, level, guided_scale = row
            return gain * drift + slope * x + level, guided_scale
        h = row[-1]
        mean = x + drift * h
        if self._precomputed is not None:
            gain, shift, guided_scale = row[:3]
        else:
            gain, shift, guided_scale = self._tilt(self._rate(scale), h, row[0], row[1])
        guided_mean = self._apply(gain, mean) + shift
        return (guided_mean - x) / h, guided_scale

    def path(
        self, previous: Tensor, drift: Tensor, scale: Tensor, steps: slice = ALL_STEPS
    ) -> tuple[Tensor, Tensor]:
        """The steps ``steps`` (a slice of the grid's) at once: ``previous`` is
        ``(K,) + sample + batch + (D,)``."""
        h = self.steps[steps].reshape((-1,) + (1,) * (previous.dim() - 1))
        extra = previous.dim() - 1 - len(self.batch_shape) - 1
        local = self._local(steps)
        if self._precomputed is not None and self.diagonal:
            gain, slope, level, guided_scale = (
                self._insert(table[local], extra) for table in self._precomputed
            )
            return gain * drift + slope * previous + level, guided_scale
        mean = previous + drift * h
        if self._precomputed is not None:
            tables = [table[local] for table in self._precomputed]
        else:
            H, F = self._insert(self.H[local], extra), self._insert(self.F[local], extra)
            tables = self._tilt(self._rate(scale), h, H, F)
            extra = 0
        gain, shift, guided_scale = (self._insert(table, extra) for table in tables)
        guided_mean = self._apply(gain, mean) + shift
        return (guided_mean - previous) / h, guided_scale

    @staticmethod
    def _insert(table: Tensor, extra: int) -> Tensor:
        """Insert ``extra`` singleton (sample) dimensions after the time axis."""
        if extra <= 0:
            return table
        return table.reshape(table.shape[:1] + (1,) * extra + table.shape[1:])


class BlockedGuidedKernel:
    r"""The guided kernel of a chain run in checkpointed blocks of steps, with memory
    flat in the number of steps.

    The linearisation, the backward filter and the tilt tables of
    :class:`GuidedKernel` are ``O(N)`` tensors with their autograd graphs. Here the
    filter runs block by block from the last, each block a
    :func:`~pyro_latdiff.checkpoint.checkpoint_block`, and only the filter's state at
    block boundaries is kept. :meth:`window` makes the :class:`GuidedKernel` of one
    block from the boundary after it (the chain calls it inside the block it
    simulates or scores, so its tables are recomputed in the backward pass): the
    same values as :class:`GuidedKernel`, to rounding.

    :param LatentDiffusion prior: the model's chain.
    :param torch.Tensor reference: the reference path ``x_1 .. x_N``, ``batch + (N, D)``.
    :param terms: the observation terms of :func:`observation_terms`, dense or (to keep
        no path-sized terms) :class:`SparseObservationTerms`.
    :param bool create_graph: whether the kernel is differentiated (to the prior's
        parameters and the observation terms).
    :param int block_size: steps per block.
    """

    def __init__(
        self,
        prior: LatentDiffusion,
        reference: Tensor,
        terms: tuple[Tensor, Tensor] | SparseObservationTerms,
        create_graph: bool,
        block_size: int,
    ):
        self.prior = prior
        self.block_size = block_size
        # What a block's filter needs, apart from the boundaries (which hold the blocks'
        # autograd nodes: a block's closure must not reach them, or the graph is a cycle).
        self._filter = _BlockFilter(prior, reference, terms, create_graph, block_size)
        self.blocks = self._filter.blocks
        self.diagonal = self._filter.diagonal
        num_states = self._filter.terms.num_states
        boundary = tuple(term[0] for term in self._filter.terms.rows(num_states - 1, num_states))
        self._boundaries: list[tuple[Tensor, Tensor]] = [boundary] * len(self.blocks)
        for b in range(len(self.blocks) - 1, 0, -1):
            boundary = checkpoint_block(partial(self._filter.boundary, b), *boundary)
            self._boundaries[b - 1] = boundary
        H, F = boundary
        self.batch_shape = broadcast_shapes(
            prior.batch_shape, H.shape[:-1] if self.diagonal else H.shape[:-2], F.shape[:-1]
        )
        self.noise_type = "diagonal" if self.diagonal else "triangular"

    def window(self, steps: slice) -> GuidedKernel:
        """The :class:`GuidedKernel` of the block ``steps`` (one of :attr:`blocks`)."""
        b = steps.start // self.block_size
        if steps != self.blocks[b]:
            raise ValueError(f"Expected one of the blocks {self.blocks}, actual {steps}")
        H, F, _ = self._filter(b, *self._boundaries[b])
        return GuidedKernel(H, F, self.prior, offset=steps.start).window(steps)

    def step(self, k: int, x: Tensor, drift: Tensor, scale: Tensor):
        raise RuntimeError("BlockedGuidedKernel: step through window(steps) of each block")

    def path(self, previous, drift, scale, steps: slice = ALL_STEPS):
        """:meth:`GuidedKernel.path` for the steps of one block."""
        return self.window(steps).path(previous, drift, scale, steps)

    @torch.no_grad()
    def mean_path(self, prior: LatentDiffusion) -> Tensor:
        """The noise-free path of the guided kernel from ``x0``, ``batch + (N, D)``."""
        kernels = ((self.window(s), s) for s in self.blocks)  # lazily
        return _noise_free_path(prior, self.batch_shape, kernels)

    @torch.no_grad()
    def drift_is_affine(self, prior: LatentDiffusion) -> bool:
        """:meth:`GuidedKernel.drift_is_affine`, block by block."""
        reference = self._filter.reference  # batch + (N, D); the probe is time leftmost
        shape = reference.shape[-2:-1] + reference.shape[:-2] + reference.shape[-1:]
        noise = _probe_noise(shape, reference)
        errors, sizes = [], []
        for steps in self.blocks:
            previous = self._filter.previous(steps)
            A, a, _ = _linearise_steps(prior, previous, steps, False)
            error, size = _linearisation_error(prior, A, a, previous, noise[steps], steps)
            errors.append(error)
            sizes.append(size)
        return _is_rounding(torch.stack(errors).max(), torch.stack(sizes).max())


class _BlockFilter:
    """The backward filter of one block of a :class:`BlockedGuidedKernel` from the
    filter's state after the block."""

    def __init__(self, prior, reference, terms, create_graph: bool, block_size: int):
        self.prior = prior
        batch = broadcast_shapes(reference.shape[:-2], prior.batch_shape)
        self.reference = reference.detach().expand(batch + reference.shape[-2:])
        self._x0 = prior.x0.detach().expand(batch + prior.x0.shape[-1:])
        self.create_graph = create_graph
        num_steps, dim = reference.shape[-2:]
        self.blocks = [
            slice(start, min(start + block_size, num_steps))
            for start in range(0, num_steps, block_size)
        ]
        if not isinstance(terms, SparseObservationTerms):  # every state has a row
            terms = SparseObservationTerms(*terms, None, num_steps)
        self.diagonal = dim == 1 or (
            prior.noise_type == "diagonal" and self._linear_parts_are_diagonal(terms.precision)
        )
        if self.diagonal:
            terms = terms._replace(precision=terms.precision.diagonal(dim1=-2, dim2=-1))
        self.terms = terms

    def previous(self, steps: slice) -> Tensor:
        """The reference states the steps ``steps`` start from, time leftmost."""
        if steps.start == 0:
            states = torch.cat(
                [self._x0.unsqueeze(-2), self.reference[..., : steps.stop - 1, :]], -2
            )
        else:
            states = self.reference[..., steps.start - 1 : steps.stop - 1, :]
        return states.movedim(-2, 0)

    @torch.no_grad()
    def _linear_parts_are_diagonal(self, precision: Tensor) -> bool:
        """:func:`_all_diagonal`, block by block (one host synchronisation)."""
        off = [_off_diagonal(precision)]
        for steps in self.blocks:
            A, _, _ = _linearise_steps(self.prior, self.previous(steps), steps, False)
            off.append(_off_diagonal(A))
        return bool(torch.stack(off).max().item() == 0)

    def __call__(self, b: int, H: Tensor, F: Tensor):
        """The filter of the states after each step of block ``b``, from ``(H, F)`` of
        the state after the block, and ``(H, F)`` of the state before it."""
        steps = self.blocks[b]
        A, a, Q = _linearise_steps(self.prior, self.previous(steps), steps, self.create_graph)
        P, f = self.terms.start_rows(steps)
        if self.diagonal:
            A, Q = A.diagonal(dim1=-2, dim2=-1), Q.diagonal(dim1=-2, dim2=-1)
            return _filter_back_diagonal(A, a, Q, P, f, H, F)
        return _filter_back(A, a, Q, P, f, H, F)

    def boundary(self, b: int, H: Tensor, F: Tensor) -> tuple[Tensor, Tensor]:
        """``(H, F)`` of the state before block ``b``."""
        return self(b, H, F)[2]
