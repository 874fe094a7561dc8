"""Argument checks shared by the package: each raises one ValueError or TypeError
that names the argument, what was expected and what was given."""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor


def shape_of(x) -> tuple:
    return tuple(x.shape)


def check_times(times) -> None:
    if not isinstance(times, Tensor):
        raise TypeError(
            f"Expected `times` to be a torch.Tensor, actual type {type(times).__name__}"
        )
    if times.dim() != 1 or times.shape[0] < 2:
        raise ValueError(
            "Expected `times` to be a 1-D tensor of at least 2 points, "
            f"actual shape {shape_of(times)}"
        )
    if times.device.type == "meta":
        raise ValueError("Expected `times` to hold values, actual a tensor on the meta device")
    if not times.is_floating_point():
        raise ValueError(
            f"Expected `times` to be a floating point tensor, actual dtype {times.dtype}"
        )
    if not torch.isfinite(times).all():
        raise ValueError(f"Expected `times` to be finite, actual values {times.tolist()}")
    steps = times.diff()
    if not (steps > 0).all():
        k = int((steps <= 0).nonzero()[0])
        raise ValueError(
            "Expected `times` to be strictly increasing, actual "
            f"times[{k}] = {times[k].item()} >= times[{k + 1}] = {times[k + 1].item()}"
        )


def check_x0(x0, times: Tensor) -> None:
    if not isinstance(x0, Tensor):
        raise TypeError(f"Expected `x0` to be a torch.Tensor, actual type {type(x0).__name__}")
    if x0.dim() < 1 or x0.shape[-1] < 1:
        raise ValueError(
            "Expected `x0` of shape batch_shape + (state_dim,) with state_dim >= 1, "
            f"actual shape {shape_of(x0)}"
        )
    if x0.dtype != times.dtype or x0.device != times.device:
        raise ValueError(
            "Expected `x0` and `times` to share dtype and device, actual "
            f"x0: {x0.dtype} on {x0.device}, times: {times.dtype} on {times.device}"
        )
    if x0.device.type == "meta":
        raise ValueError("Expected `x0` to hold values, actual a tensor on the meta device")
    if x0.numel() == 0:
        raise ValueError(f"Expected `x0` to be non-empty, actual shape {shape_of(x0)}")
    if not torch.isfinite(x0).all():
        raise ValueError("Expected `x0` to be finite, actual tensor contains NaN or inf")


def check_noise_type(noise_type) -> None:
    if noise_type not in ("diagonal", "general"):
        raise ValueError(
            f"Expected `noise_type` to be 'diagonal' or 'general', actual {noise_type!r}"
        )


def check_output(name: str, out, x: Tensor, positive: bool, matrix: bool = False) -> torch.Size:
    """Check the shape of one probe of the drift or a callable diffusion (a contract
    error raises) and return its batch shape. Values are not checked for finiteness:
    a non-finite drift or diffusion makes ``log_prob`` non-finite, so inference (e.g.
    NUTS) can reject it; a finite diffusion value that is not positive raises."""
    what = f"`{name}(times[0], x0)`"
    if not isinstance(out, Tensor):
        raise TypeError(f"Expected {what} to return a torch.Tensor, actual {type(out).__name__}")
    if matrix:
        if out.dim() < 2 or out.shape[-2] != x.shape[-1] or out.shape[-1] < 1:
            raise ValueError(
                f"Expected {what} to return a matrix of shape (..., {x.shape[-1]}, M) "
                f"(state_dim rows, one column per Brownian motion), actual shape {shape_of(out)}"
            )
        batch = out.shape[:-2]
    else:
        if out.dim() == 0 or out.shape[-1] != x.shape[-1]:
            raise ValueError(
                f"Expected {what} to return a tensor shaped like x, {shape_of(x)} (last "
                f"dimension exactly state_dim = {x.shape[-1]}), actual shape {shape_of(out)}"
            )
        batch = out.shape[:-1]
    try:
        shape = torch.broadcast_shapes(batch, x.shape[:-1])
    except RuntimeError:
        raise ValueError(
            f"Expected {what} to return a tensor shaped like x, {shape_of(x)}, "
            f"actual shape {shape_of(out)}"
        ) from None
    if positive:
        finite = out[torch.isfinite(out)]
        if not (finite > 0).all():
            raise ValueError(
                f"Expected {what} to be positive, actual minimum {finite.min().item()}"
            )
    return shape


def check_diffusion(
    diffusion,
    x0: Tensor,
    name: str = "diffusion",
    callable_allowed: bool = True,
    matrix: bool = False,
) -> None:
    """A constant diffusion: a positive float, or a positive tensor ``(..., D)`` with the
    dtype and device of ``x0``; with ``matrix``, a tensor ``(..., D, M)``."""
    if matrix:
        if not isinstance(diffusion, Tensor):
            also = f" or a callable {name}(t, x)" if callable_allowed else ""
            raise TypeError(
                f"Expected `{name}` to be a tensor of shape (..., state_dim, M){also} with "
                f"general noise, actual type {type(diffusion).__name__}"
            )
        if diffusion.dim() < 2 or diffusion.shape[-2] != x0.shape[-1]:
            raise ValueError(
                f"Expected `{name}` of shape (..., {x0.shape[-1]}, M) (state_dim rows) with "
                f"general noise, actual shape {shape_of(diffusion)}"
            )
    if isinstance(diffusion, bool) or not isinstance(diffusion, (int, float, Tensor)):
        also = f" or a callable {name}(t, x)" if callable_allowed else ""
        raise TypeError(
            f"Expected `{name}` to be a positive float or a tensor of shape (..., state_dim)"
            f"{also}, actual type {type(diffusion).__name__}"
        )
    if isinstance(diffusion, Tensor):
        if not matrix and diffusion.dim() > 0 and diffusion.shape[-1] != x0.shape[-1]:
            raise ValueError(
                f"Expected `{name}` of shape (..., {x0.shape[-1]}) (state_dim of x0), "
                f"actual shape {shape_of(diffusion)}"
            )
        if diffusion.dtype != x0.dtype or diffusion.device != x0.device:
            raise ValueError(
                f"Expected `{name}` to share dtype and device with `x0`, actual "
                f"{diffusion.dtype} on {diffusion.device} (x0: {x0.dtype} on {x0.device})"
            )
        finite = torch.isfinite(diffusion).all()
        ok = finite if matrix else finite and (diffusion > 0).all()
    else:
        ok = math.isfinite(diffusion) and diffusion > 0
    if not ok:
        what = "finite" if matrix else "positive and finite"
        raise ValueError(f"Expected `{name}` to be {what}, actual {diffusion}")


def check_positive_int(name: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected `{name}` to be an int >= {minimum}, actual {value!r}")


def check_widths(hidden_dims) -> None:
    if not isinstance(hidden_dims, (tuple, list)):
        raise TypeError(
            f"Expected `hidden_dims` to be a tuple of ints, actual {type(hidden_dims).__name__}"
        )
    for width in hidden_dims:
        check_positive_int("hidden_dims[i]", width)


def check_signature(name: str, function, args: tuple, kwargs: dict) -> None:
    """``function`` is callable and accepts ``(*args, **kwargs)``."""
    if not callable(function):
        raise TypeError(f"Expected `{name}` to be callable, actual {type(function).__name__}")
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # no signature to inspect: the call will decide
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as error:
        raise TypeError(
            f"Expected `{name}` to accept the model arguments given ({len(args)} positional, "
            f"keywords {sorted(kwargs)}), actual: {error}"
        ) from None


def check_ordered_pair(name: str, value, what: str = "(low, high)") -> tuple[float, float]:
    """``value`` is two finite numbers, the first below the second."""
    ok = (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in value
        )
    )
    if not ok or not value[0] < value[1]:
        low, high = what.strip("()").split(", ")
        raise ValueError(
            f"Expected `{name}` = {what}, finite with {low} < {high}, actual {value!r}"
        )
    return float(value[0]), float(value[1])
