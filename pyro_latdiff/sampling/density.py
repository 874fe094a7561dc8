r"""A user's unnormalised log-density, checked once, guarded against non-finite values
and counted."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["TargetDensity"]


class _FiniteGrad(torch.autograd.Function):
    """Identity whose backward sets non-finite gradient entries to zero: a point where
    the user's log-density is NaN must not send NaN back into the paths."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)


class TargetDensity:
    r"""``log_density(x)``, an unnormalised :math:`\log \pi(x)`, made safe for samplers.

    - **Shapes.** ``log_density`` takes ``x`` of shape ``batch_shape + (dim,)`` (any
      ``batch_shape``) and returns ``batch_shape``. This is probed once at
      construction on ``x`` of shape ``(3, dim)`` and checked (a free shape comparison)
      on every call; a wrong shape raises one :class:`ValueError` naming
      ``log_density``.
    - **Non-finite values.** A NaN or infinite value (a point outside a support, an
      overflow) is replaced by ``floor``, a finite log-density so low that its
      importance weight is zero, and its gradient by zero; the points replaced are
      counted in :attr:`num_nonfinite`. Training is not poisoned: under the
      path-derivative gradient a constant contributes no gradient, and
      :class:`~pyro_latdiff.sampling.LogVarianceELBO` leaves such paths out.
    - **Cost.** Every point evaluated is counted in :attr:`num_evaluations` (with
      :attr:`num_gradient_evaluations` for those evaluated with a gradient), so that
      samplers can be compared at equal budgets.

    Example::

        density = TargetDensity(lambda x: -0.5 * (x**2).sum(-1), dim=2)
        value, grad = density.value_and_grad(torch.randn(5, 2))

    :param callable log_density: ``log_density(x)``, a Python function of a tensor.
    :param int dim: the state dimension.
    :param float floor: the value given to non-finite log-densities.
    :param torch.dtype dtype: dtype of the probe (default: torch's default dtype).
    """

    def __init__(
        self,
        log_density: Callable[[Tensor], Tensor],
        dim: int,
        *,
        floor: float = -1e4,
        dtype: torch.dtype | None = None,
    ):
        if isinstance(log_density, TargetDensity):
            log_density = log_density.log_density
        if not callable(log_density):
            raise TypeError(
                f"Expected `log_density` to be callable, actual {type(log_density).__name__}"
            )
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"Expected `dim` to be an int >= 1, actual {dim!r}")
        self.log_density = log_density
        self.dim = dim
        self.floor = float(floor)
        self.num_evaluations = 0
        self.num_gradient_evaluations = 0
        self.num_nonfinite = 0
        with torch.no_grad():
            self._check(
                torch.zeros(3, dim, dtype=dtype), log_density(torch.zeros(3, dim, dtype=dtype))
            )

    def _check(self, x: Tensor, out) -> None:
        if not isinstance(out, Tensor):
            raise ValueError(
                f"Expected `log_density` to return a torch.Tensor of shape x.shape[:-1] = "
                f"{tuple(x.shape[:-1])} for x of shape {tuple(x.shape)}, actual "
                f"{type(out).__name__}"
            )
        if out.shape != x.shape[:-1]:
            raise ValueError(
                f"Expected `log_density` to return shape x.shape[:-1] = {tuple(x.shape[:-1])} "
                f"for x of shape {tuple(x.shape)} (one log-density per point), actual shape "
                f"{tuple(out.shape)}"
            )
        if not out.is_floating_point():
            raise ValueError(
                f"Expected `log_density` to return a floating point tensor, actual {out.dtype}"
            )

    def __call__(self, x: Tensor) -> Tensor:
        """:math:`\\log \\pi(x)`, non-finite values replaced by ``floor``."""
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"Expected `x` of shape (..., {self.dim}) (dim), actual shape {tuple(x.shape)}"
            )
        out = self.log_density(_FiniteGrad.apply(x) if x.requires_grad else x)
        self._check(x, out)
        self.num_evaluations += x.shape[:-1].numel()
        finite = torch.isfinite(out)
        if not bool(finite.all()):
            self.num_nonfinite += int((~finite).sum())
            out = torch.where(finite, out, torch.full_like(out, self.floor))
        return out

    def value_and_grad(self, x: Tensor, create_graph: bool | None = None) -> tuple[Tensor, Tensor]:
        """:math:`\\log \\pi(x)` and :math:`\\nabla \\log \\pi(x)` (zero where either is not
        finite). With ``create_graph`` (default: when gradients are enabled and ``x``
        requires them) the gradient is differentiable, as a path-derivative ELBO
        gradient through a drift that uses it needs."""
        if create_graph is None:
            create_graph = torch.is_grad_enabled() and x.requires_grad
        with torch.enable_grad():
            leaf = x if x.requires_grad else x.detach().requires_grad_()
            value = self(leaf)
            (grad,) = torch.autograd.grad(value.sum(), leaf, create_graph=create_graph)
        self.num_gradient_evaluations += x.shape[:-1].numel()
        ok = torch.isfinite(grad).all(-1, keepdim=True) & (value > self.floor).unsqueeze(-1)
        grad = torch.where(ok, grad, torch.zeros_like(grad))
        if not create_graph:
            value, grad = value.detach(), grad.detach()
        return value, grad

    def reset_counts(self) -> None:
        """Set the evaluation and non-finite counts to zero."""
        self.num_evaluations = 0
        self.num_gradient_evaluations = 0
        self.num_nonfinite = 0
