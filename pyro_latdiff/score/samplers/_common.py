"""Pieces every sampler shares: the result type, the time grid, the first state, the
checked score call and the coefficient tables of a scalar-linear forward process."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.distributions import Distribution

from ..._validation import as_float, check_positive_int, check_provides, shape_of

LINEAR_PROCESS = ("horizon", "drift_coef", "diffusion_coef", "marginal_coefs", "prior")


class SampleResult(NamedTuple):
    """What every sampler returns.

    :param torch.Tensor samples: ``(num_samples, state_dim)``.
    :param int num_evaluations: calls of the score (or denoiser) network; a Jacobian
        counts as ``state_dim`` calls.
    :param torch.Tensor times: the increasing time grid the sampler stepped on.
    """

    samples: Tensor
    num_evaluations: int
    times: Tensor


def check_process(process, required: tuple[str, ...] = LINEAR_PROCESS) -> None:
    check_provides("process", process, required)


def as_coef(value, like: Tensor) -> Tensor:
    """A process coefficient as a tensor with the dtype and device of ``like``."""
    return torch.as_tensor(value, dtype=like.dtype, device=like.device)


def horizon_of(process) -> float:
    horizon = process.horizon
    horizon = float(horizon() if callable(horizon) else horizon)
    if not horizon > 0:
        raise ValueError(f"Expected `process.horizon` to be positive, actual {horizon}")
    return horizon


def check_time(name: str, value, horizon: float, *, positive: bool = False) -> float:
    """``value`` is a float (or a 0-d float tensor, as the unbiased estimators take
    ``t1``) in ``[0, horizon)``, in ``(0, horizon)`` with ``positive``; return it as a
    float."""
    value = as_float(value)
    interval = f"(0, horizon = {horizon})" if positive else f"[0, horizon = {horizon})"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"Expected `{name}` to be a float (or a 0-d float tensor) in {interval}, "
            f"actual {value!r}"
        )
    if not (0 < value < horizon if positive else 0 <= value < horizon):
        raise ValueError(f"Expected `{name}` in {interval}, actual {value!r}")
    return float(value)


def sampler_dtype(x_init) -> torch.dtype:
    """The dtype a sampler works in: ``x_init``'s, which must be floating point, else
    torch's default."""
    if not isinstance(x_init, Tensor):
        return torch.get_default_dtype()  # None, or a wrong type initial_state reports
    if not x_init.is_floating_point():
        raise ValueError(
            f"Expected `x_init` to be a floating point tensor, actual dtype {x_init.dtype}"
        )
    return x_init.dtype


def make_times(
    horizon: float, num_steps: int, schedule, t_min: float, dtype, device=None
) -> Tensor:
    """The increasing grid ``t_min = t_0 < ... < t_N = horizon`` a sampler steps on
    (reverse-time samplers walk it from the right).

    :param str or torch.Tensor schedule: ``"uniform"`` or the grid itself, ``(N + 1,)``.
    :param t_min: a float or a 0-d float tensor in ``[0, horizon)``.
    """
    check_positive_int("num_steps", num_steps)
    t_min = check_time("t_min", t_min, horizon)
    if isinstance(schedule, str):
        if schedule != "uniform":
            raise ValueError(
                f"Expected `schedule` to be 'uniform' or a tensor of times, actual {schedule!r}"
            )
        return torch.linspace(t_min, horizon, num_steps + 1, dtype=dtype, device=device)
    if not isinstance(schedule, Tensor) or schedule.dim() != 1:
        raise ValueError(
            "Expected `schedule` to be 'uniform' or a 1-D tensor of times, actual "
            f"{type(schedule).__name__}"
            + (f" of shape {shape_of(schedule)}" if isinstance(schedule, Tensor) else "")
        )
    if schedule.shape[0] != num_steps + 1:
        raise ValueError(
            f"Expected `schedule` of shape ({num_steps + 1},) (num_steps + 1), "
            f"actual shape {shape_of(schedule)}"
        )
    times = schedule.to(dtype=dtype, device=device)
    steps = times.diff()
    if not (torch.isfinite(times).all() and (steps > 0).all()):
        raise ValueError(
            "Expected `schedule` to be finite and strictly increasing (positive steps), "
            f"actual {times.tolist()}"
        )
    # The sampler starts from process.prior, the law at the horizon, and returns its
    # samples at t_min: a grid ending elsewhere would silently sample the wrong law.
    first, last = times[0].item(), times[-1].item()
    tol = 16 * torch.finfo(times.dtype).eps * max(1.0, horizon)
    if abs(last - horizon) > tol:
        raise ValueError(
            f"Expected `schedule` to end at the horizon {horizon} (the sampler starts from "
            f"process.prior, the law at the horizon), actual last time {last}"
        )
    if abs(first - t_min) > tol:
        raise ValueError(
            f"Expected `schedule` to start at `t_min` = {t_min} (the time the samples are "
            f"returned at; pass t_min=schedule[0]), actual first time {first}"
        )
    return times


def initial_state(
    process, num_samples: int, state_dim: int, x_init: Tensor | None, dtype
) -> Tensor:
    """``x_init`` when given, else ``num_samples`` draws of ``process.prior``."""
    check_positive_int("num_samples", num_samples)
    check_positive_int("state_dim", state_dim)
    shape = (num_samples, state_dim)
    if x_init is not None:
        if not isinstance(x_init, Tensor) or tuple(x_init.shape) != shape:
            actual = shape_of(x_init) if isinstance(x_init, Tensor) else type(x_init).__name__
            raise ValueError(
                f"Expected `x_init` of shape {shape} (num_samples, state_dim), actual {actual}"
            )
        if not torch.isfinite(x_init).all():
            raise ValueError("Expected `x_init` to be finite, actual NaN or inf")
        return x_init
    prior = process.prior(torch.Size(shape))
    x = prior.sample() if isinstance(prior, Distribution) else prior
    if not isinstance(x, Tensor) or x.shape[-len(shape) :] != shape:
        actual = shape_of(x) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"Expected `process.prior({shape})` to give samples of shape {shape}, actual {actual}"
        )
    return x.reshape(shape).to(dtype)


class CountedCall:
    """A network called as ``fn(t, x)``; counts calls and checks the first one.

    ``dtype_from`` says, in a dtype mismatch's message, how to give the sampler another
    dtype (``{dtype}`` is replaced by the network's)."""

    def __init__(
        self,
        fn: Callable,
        name: str,
        out_dim: int | None = None,
        extra_dims: tuple = (),
        dtype_from: str = "`x_init` of dtype {dtype}",
    ):
        if not callable(fn):
            raise ValueError(f"Expected `{name}` to be callable, actual {type(fn).__name__}")
        self.fn = fn
        self.name = name
        self.out_dim = out_dim  # the output's last dimension, if not x's
        self.extra_dims = tuple(extra_dims)  # trailing dimensions after it (a matrix)
        self.dtype_from = dtype_from
        self.count = 0

    def __call__(self, t: Tensor, x: Tensor) -> Tensor:
        """Every call: the output must be a tensor of the expected shape (a shape
        comparison, no host synchronisation; a wrong shape would broadcast silently)."""
        self.count += 1
        out = self.fn(t, x)
        expected = x.shape if self.out_dim is None else x.shape[:-1] + (self.out_dim,)
        expected = expected + self.extra_dims
        if not isinstance(out, Tensor) or out.shape != expected:
            actual = shape_of(out) if isinstance(out, Tensor) else type(out).__name__
            when = t.tolist() if isinstance(t, Tensor) else t
            raise ValueError(
                f"Expected `{self.name}(t, x)` to return shape {tuple(expected)} for x of "
                f"shape {shape_of(x)}, actual {actual} at t = {when}"
            )
        return out

    def checked(self, t: Tensor, x: Tensor, *, any_shape: bool = False) -> Tensor:
        """The first call: also, the call must not fail (a network built for another
        state dimension fails inside, so does one of another dtype) and the output must
        be finite. With ``any_shape`` the output is returned unchecked, for the caller
        to decide between the shapes it takes."""
        try:
            if any_shape:
                self.count += 1
                return self.fn(t, x)
            out = self(t, x)
        except (RuntimeError, IndexError) as error:
            message = str(error)
            dtype = _parameter_dtype(self.fn)
            if dtype not in (None, x.dtype) or "dtype" in message or "scalar type" in message:
                params = f"its parameters are {dtype} and " if dtype not in (None, x.dtype) else ""
                raise ValueError(
                    f"Expected `{self.name}(t, x)` to take x of the sampler's dtype {x.dtype}, "
                    f"actual {params}it fails: {message}. Pass "
                    + self.dtype_from.format(dtype=dtype or "the network's dtype")
                    + f", or convert the network, e.g. {self.name}.to({x.dtype})"
                ) from None
            raise ValueError(
                f"Expected `{self.name}(t, x)` to take x of shape {shape_of(x)} (the state "
                f"dimension is {x.shape[-1]}), actual it fails: {message}"
            ) from None
        if not torch.isfinite(out).all():
            raise ValueError(
                f"Expected `{self.name}(t, x)` to be finite, actual NaN or inf at t = {float(t)}"
            )
        return out


def _parameter_dtype(fn) -> torch.dtype | None:
    """The dtype of a module's first floating point parameter, else None."""
    if isinstance(fn, torch.nn.Module):
        for param in fn.parameters():
            if param.is_floating_point():
                return param.dtype
    return None


def check_samples(samples: Tensor, name: str) -> Tensor:
    """After the loop, once: a NaN anywhere on the path shows up here."""
    if not torch.isfinite(samples).all():
        raise ValueError(
            f"Expected `{name}(t, x)` to stay finite along the sampler's path, actual the "
            "samples contain NaN or inf"
        )
    return samples


def gauss_legendre(num_nodes: int, dtype, device=None) -> tuple[Tensor, Tensor]:
    """Nodes in (0, 1) and weights summing to 1."""
    import numpy as np

    nodes, weights = np.polynomial.legendre.leggauss(num_nodes)
    nodes = torch.as_tensor((nodes + 1) / 2, dtype=dtype, device=device)
    return nodes, torch.as_tensor(weights / 2, dtype=dtype, device=device)


def score_step_coefs(process, times: Tensor, num_nodes: int = 16) -> Tensor:
    r"""``c_k = \int_{t_k}^{t_{k+1}} g(u)^2 a(u, t_{k+1}) du / a(t_k, t_{k+1})``, the
    weight of a score frozen at ``t_{k+1}`` over the reverse step to ``t_k``
    (the process's closed form ``score_step_weight(s, t)`` where it has one, else
    Gauss-Legendre), for all ``k`` at once; ``a(s, t)`` is the transition scale."""
    closed_form = getattr(process, "score_step_weight", None)
    if closed_form is not None:
        return as_coef(closed_form(times[:-1], times[1:]), times[1:]).expand(times.shape[0] - 1)
    nodes, weights = gauss_legendre(num_nodes, times.dtype, times.device)
    lo, hi = times[:-1, None], times[1:, None]
    u = lo + (hi - lo) * nodes
    g = as_coef(process.diffusion_coef(u), u)
    scale_u = as_coef(process.transition_coefs(u, hi.expand_as(u))[0], u)
    scale = as_coef(process.transition_coefs(times[:-1], times[1:])[0], times)
    return (g**2 * scale_u * weights).sum(-1) * (hi - lo)[:, 0] / scale
