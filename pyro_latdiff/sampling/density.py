r"""A user's unnormalised log-density, checked once, guarded against non-finite values
and counted."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._validation import check_positive_float

__all__ = ["TargetDensity"]

_HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


def check_dtype(dtype) -> torch.dtype:
    """``dtype`` is None (torch's default dtype) or a floating point ``torch.dtype``;
    return the dtype to use."""
    if dtype is None:
        return torch.get_default_dtype()
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"Expected `dtype` to be a floating point torch.dtype, actual {dtype!r}")
    return dtype


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
      construction on ``x`` of shape ``(3, dim)`` and on an unbatched ``(dim,)``, and
      checked (a free shape comparison) on every call; a wrong shape raises one
      :class:`ValueError` naming ``log_density``.
    - **Non-finite values.** Finiteness is decided by :func:`torch.isfinite` on the raw
      values, never by comparing with a threshold, so adding a constant to
      ``log_density`` changes nothing. A NaN or infinite value (a point outside a
      support, an overflow) is replaced by a *floor*: ``margin`` nats below the lowest
      finite value met so far (the probe at 0 included; a tensor, so no host sync),
      whatever the offset of the finite values; its gradient is zero. The points
      replaced are counted in :attr:`num_nonfinite`.
    - **Log-ratios.** A sampler's factor is :math:`\log f = \log \pi - \log
      \mathcal N(x; 0, s^2 I)` (:meth:`log_ratio`). Where :math:`\log \pi` is not
      finite, the whole of :math:`\log f` takes a constant floor (the floor minus the
      reference's peak), so it neither grows away from the support (which would push
      paths out of it) nor has a gradient there, and stays below every finite value of
      :math:`\log f`. Under the path-derivative gradient such paths contribute no
      target gradient, and :class:`~pyro_latdiff.sampling.LogVarianceELBO` leaves them
      out.
    - **Cost.** Every point evaluated is counted in :attr:`num_evaluations` (with
      :attr:`num_gradient_evaluations` for those evaluated with a gradient), so that
      samplers can be compared at equal budgets.

    Example::

        density = TargetDensity(lambda x: -0.5 * (x**2).sum(-1), dim=2)
        value, grad = density.value_and_grad(torch.randn(5, 2))
        log_f = density.log_ratio(torch.randn(5, 2), scale=1.0)

    :param callable log_density: ``log_density(x)``, a Python function of a tensor.
    :param int dim: the state dimension.
    :param float margin: how far (in nats) below the lowest finite log-density met the
        non-finite values are placed.
    :param torch.dtype dtype: dtype of the probe (default: torch's default dtype).
    """

    def __init__(
        self,
        log_density: Callable[[Tensor], Tensor],
        dim: int,
        *,
        margin: float = 1e4,
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
        self.margin = check_positive_float("margin", margin)
        dtype = check_dtype(dtype)
        self.num_evaluations = 0
        self.num_gradient_evaluations = 0
        self._num_nonfinite: Tensor | int = 0
        with torch.no_grad():
            for shape in ((3, dim), (dim,)):
                x = torch.zeros(shape, dtype=dtype)
                try:
                    out = log_density(x)
                except (IndexError, RuntimeError) as error:
                    raise ValueError(
                        f"Expected `log_density` to take x of shape batch_shape + ({dim},) "
                        f"for any batch_shape (the state on the last axis, e.g. "
                        f"`.sum(-1)`), actual it fails on x of shape {tuple(shape)}: {error}"
                    ) from None
                self._check(x, out)
        # The lowest finite log-density met (a tensor, updated without host syncs),
        # seeded by the probe at 0 so that the floor follows the target's offset.
        self._lowest = torch.where(torch.isfinite(out), out, math.inf).detach()

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
                f"for x of shape {tuple(x.shape)} (one log-density per point, the state on "
                f"the last axis), actual shape {tuple(out.shape)}"
            )
        if not out.is_floating_point():
            raise ValueError(
                f"Expected `log_density` to return a floating point tensor, actual {out.dtype}"
            )

    @property
    def num_nonfinite(self) -> int:
        """Points met whose log-density was NaN or infinite (reading it syncs)."""
        return int(self._num_nonfinite)

    @property
    def floor(self) -> float:
        """The value non-finite log-densities are given now (reading it syncs)."""
        return float(self._floor(self._lowest))

    def _floor(self, lowest: Tensor) -> Tensor:
        # margin below the lowest finite value met; -margin if none was ever finite.
        return torch.where(torch.isfinite(lowest), lowest - self.margin, -self.margin)

    def evaluate(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """:math:`\\log \\pi(x)` with non-finite values replaced by the floor, and the
        boolean mask ``batch_shape`` of the points where it was finite."""
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(
                f"Expected `x` of shape (..., {self.dim}) (dim), actual "
                f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}"
            )
        out = self.log_density(_FiniteGrad.apply(x) if x.requires_grad else x)
        self._check(x, out)
        self.num_evaluations += x.shape[:-1].numel()
        finite = torch.isfinite(out)
        if out.numel() == 0:
            return out, finite
        self._num_nonfinite = self._num_nonfinite + (~finite).sum()
        raw = out.detach()
        lowest = torch.where(finite, raw, math.inf).amin()
        lowest = torch.minimum(lowest, self._lowest.to(lowest))
        self._lowest = lowest
        out = torch.where(finite, out, self._floor(lowest).to(raw))
        return out, finite

    def __call__(self, x: Tensor) -> Tensor:
        """:math:`\\log \\pi(x)`, non-finite values replaced by the floor."""
        return self.evaluate(x)[0]

    def log_ratio(self, x: Tensor, scale: float, floor: bool = True) -> Tensor:
        r""":math:`\log f(x) = \log \pi(x) - \log \mathcal N(x; 0, s^2 I)`, ``s =
        scale``; where :math:`\log \pi(x)` is not finite, the constant floor minus the
        reference's peak :math:`\log \mathcal N(0; 0, s^2 I)`: below every finite value
        of :math:`\log f`, flat (zero gradient) and not growing away from a support.
        With ``floor=False`` (importance weights), ``-inf`` there: a zero weight, whatever
        was met before (a floor set before any finite value can sit above them)."""
        value, finite = self.evaluate(x)
        return self._log_ratio(x, value, finite, scale, floor)

    def _log_ratio(self, x: Tensor, value: Tensor, finite: Tensor, scale: float, floor: bool):
        peak = -self.dim * (_HALF_LOG_TWO_PI + math.log(scale))
        log_reference = -0.5 * (x / scale).square().sum(-1) + peak
        outside = value - peak if floor else torch.full_like(value, -math.inf)
        return torch.where(finite, value - log_reference, outside)

    def log_ratio_and_grad(
        self, x: Tensor, scale: float, create_graph: bool | None = None
    ) -> tuple[Tensor, Tensor]:
        r""":meth:`log_ratio` (with its floor) and its gradient in ``x``, zero where
        :math:`\log \pi(x)` or its gradient is not finite (see :meth:`value_and_grad`
        for ``create_graph``)."""
        value, grad, finite = self.value_grad_finite(x, create_graph)
        log_ratio = self._log_ratio(x, value, finite, scale, floor=True)
        grad = torch.where(finite.unsqueeze(-1), grad + x / scale**2, torch.zeros_like(grad))
        return log_ratio, grad

    def value_grad_finite(
        self, x: Tensor, create_graph: bool | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`value_and_grad` and the mask of the points where the value was
        finite."""
        if create_graph is None:
            create_graph = torch.is_grad_enabled() and x.requires_grad
        with torch.enable_grad():
            leaf = x if x.requires_grad else x.detach().requires_grad_()
            value, finite = self.evaluate(leaf)
            (grad,) = torch.autograd.grad(value.sum(), leaf, create_graph=create_graph)
        self.num_gradient_evaluations += x.shape[:-1].numel()
        ok = torch.isfinite(grad).all(-1, keepdim=True) & finite.unsqueeze(-1)
        grad = torch.where(ok, grad, torch.zeros_like(grad))
        if not create_graph:
            value, grad = value.detach(), grad.detach()
        return value, grad, finite

    def value_and_grad(self, x: Tensor, create_graph: bool | None = None) -> tuple[Tensor, Tensor]:
        """:math:`\\log \\pi(x)` and :math:`\\nabla \\log \\pi(x)` (zero where either is not
        finite). With ``create_graph`` (default: when gradients are enabled and ``x``
        requires them) the gradient is differentiable, as a path-derivative ELBO
        gradient through a drift that uses it needs."""
        value, grad, _ = self.value_grad_finite(x, create_graph)
        return value, grad

    def reset_counts(self) -> None:
        """Set the evaluation and non-finite counts to zero."""
        self.num_evaluations = 0
        self.num_gradient_evaluations = 0
        self._num_nonfinite = 0
