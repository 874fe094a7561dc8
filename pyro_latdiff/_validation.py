"""Argument checks shared by the package: each raises one ValueError or TypeError
that names the argument, what was expected and what was given."""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor

from ._shapes import broadcast_shapes


def shape_of(x) -> tuple:
    return tuple(x.shape)


def _broadcast(value: Tensor, like: Tensor, expected: str) -> torch.Size:
    """The broadcast shape of ``value`` and ``like``, else "Expected {expected}, actual ..."."""
    try:
        return broadcast_shapes(value.shape, like.shape)
    except ValueError:
        raise ValueError(f"Expected {expected}, actual shape {shape_of(value)}") from None


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


def check_x0(x0, times: Tensor | None = None) -> None:
    """``x0`` is a finite, non-empty floating point tensor ``batch_shape + (D,)``; with
    ``times``, it shares their dtype and device."""
    if not isinstance(x0, Tensor):
        raise TypeError(f"Expected `x0` to be a torch.Tensor, actual type {type(x0).__name__}")
    if x0.dim() < 1 or x0.shape[-1] < 1:
        raise ValueError(
            "Expected `x0` of shape batch_shape + (state_dim,) with state_dim >= 1, "
            f"actual shape {shape_of(x0)}"
        )
    if times is None:
        if not x0.is_floating_point():
            raise ValueError(
                f"Expected `x0` to be a floating point tensor, actual dtype {x0.dtype}"
            )
    elif x0.dtype != times.dtype or x0.device != times.device:
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


def call_probe(name: str, fn, t: Tensor, x: Tensor):
    """``fn(t, x)`` for the construction probe of ``name``; a shape mismatch raised inside
    the user's function (a ``RuntimeError``) becomes one ``ValueError`` that names the
    function, the shape of ``x`` and the usual cause."""
    try:
        return fn(t, x)
    except RuntimeError as error:
        raise ValueError(
            f"Expected `{name}(times[0], x0)` to run on x of shape {shape_of(x)}, actual it fails: "
            f"{error}. The tensors it closes over must broadcast with x (batch + (D,)); a "
            "latent drawn outside the path's plates has batch dimensions of its own (e.g. "
            "(num_particles, 1) under vectorised particles), so give it a trailing state "
            "axis, e.g. theta.unsqueeze(-1)"
        ) from error
    except (TypeError, IndexError) as error:
        raise ValueError(
            f"Expected `{name}` to be a function {name}(t, x) of a time t (a 0-d tensor here, "
            f"times[0]) and states x (of shape {shape_of(x)} here), actual {name}(times[0], x0) "
            f"fails: {type(error).__name__}: {error}"
        ) from error


def check_output(
    name: str,
    out,
    x: Tensor,
    positive: bool,
    *,
    call: str = "(times[0], x0)",
    exact: bool = False,
    matrix: bool = False,
    finite: bool = False,
) -> torch.Size:
    """Check one probe ``out = name{call}`` of the drift or a callable diffusion on ``x``
    and return its batch shape: shaped like ``x`` (exactly ``x``'s shape with ``exact``,
    else broadcasting with it and with its last dimension), or a ``(..., D, M)`` matrix
    with ``matrix``. Values are checked for finiteness only with ``finite``: in a
    distribution a non-finite drift or diffusion makes ``log_prob`` non-finite, so
    inference (e.g. NUTS) can reject it. A finite value that is not positive raises
    when ``positive``."""
    what = f"`{name}{call}`"
    if not isinstance(out, Tensor):
        raise TypeError(f"Expected {what} to return a torch.Tensor, actual {type(out).__name__}")
    if out.dtype != x.dtype:  # else the path would silently take the promoted dtype
        raise ValueError(
            f"Expected {what} to return x's dtype {x.dtype}, actual {out.dtype}; build the "
            "tensors it closes over (parameters, matrices) in x0's dtype"
        )
    if exact and out.shape != x.shape:
        raise ValueError(
            f"Expected {what} to return a tensor of x's shape {shape_of(x)}, "
            f"actual shape {shape_of(out)}"
        )
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
        shape = broadcast_shapes(batch, x.shape[:-1])
    except ValueError:
        raise ValueError(
            f"Expected {what} to return a tensor shaped like x, {shape_of(x)}, "
            f"actual shape {shape_of(out)}"
        ) from None
    if finite and not torch.isfinite(out).all():
        raise ValueError(f"Expected {what} to be finite, actual output contains NaN or inf")
    if positive:
        values = out[torch.isfinite(out)]
        if not (values > 0).all():
            raise ValueError(
                f"Expected {what} to be positive, actual minimum {values.min().item()}"
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


def check_positive_int(
    name: str, value, minimum: int = 1, *, strict: bool = False, reason: str = ""
) -> int:
    """``value`` is an int ``>= minimum``; return it.

    A value that is no int is a ValueError, or a TypeError with ``strict`` (the
    convention of :mod:`pyro_latdiff.unbiased`). ``reason`` is added to the message.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        if strict:
            raise TypeError(
                f"Expected `{name}` to be an int >= {minimum}{reason}, actual type "
                f"{type(value).__name__}"
            )
        raise ValueError(f"Expected `{name}` to be an int >= {minimum}{reason}, actual {value!r}")
    if value < minimum:
        raise ValueError(f"Expected `{name}` to be an int >= {minimum}{reason}, actual {value!r}")
    return value


#: Draws of a model and its guide per vectorised pass (:func:`~pyro_latdiff.log_evidence`,
#: :func:`~pyro_latdiff.inference_data.to_inference_data`) when not told.
DEFAULT_CHUNK_SIZE = 1000


def chunk_size_or_default(
    chunk_size, num_draws: int, default: int = DEFAULT_CHUNK_SIZE, *, strict: bool = False
) -> int:
    """``chunk_size`` checked, or ``min(num_draws, default)`` if it is None."""
    if chunk_size is None:
        return min(num_draws, default)
    return check_positive_int("chunk_size", chunk_size, strict=strict)


def check_provides(
    name: str, value, required: tuple[str, ...], error: type[Exception] = ValueError
) -> None:
    """``value`` has every attribute in ``required`` (duck typing), else one ``error``
    naming the argument, what it must provide and what it lacks."""
    missing = [attr for attr in required if not hasattr(value, attr)]
    if missing:
        raise error(
            f"Expected `{name}` to provide {', '.join(required)}, "
            f"actual {type(value).__name__} lacks {', '.join(missing)}"
        )


def check_positive_float(name: str, value) -> float:
    """``value`` is a positive finite number; return it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"Expected `{name}` to be a positive float, actual type {type(value).__name__}"
        )
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"Expected `{name}` to be a positive finite float, actual {value}")
    return float(value)


def check_callable(name: str, value) -> None:
    if not callable(value):
        raise TypeError(f"Expected `{name}` to be callable, actual type {type(value).__name__}")


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


def check_model_and_guide(model, guide, args: tuple, kwargs: dict) -> None:
    """``model`` and ``guide`` are callables that accept ``(*args, **kwargs)``."""
    for name, value in (("model", model), ("guide", guide)):
        check_signature(name, value, args, kwargs)


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


# ------------------------------------------------------------------ the unbiased estimators


def as_float(value):
    """A 0-d float tensor as a Python float; anything else as it is (for the caller's
    check)."""
    if isinstance(value, Tensor) and value.dim() == 0 and value.is_floating_point():
        return float(value)
    return value


def check_time_interval(t0, t1) -> float:
    """``t0 < t1``, both finite numbers (or 0-d float tensors); return ``t1 - t0``."""
    t0, t1 = as_float(t0), as_float(t1)
    for name, value in (("t0", t0), ("t1", t1)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"Expected `{name}` to be a float, actual type {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"Expected `{name}` to be finite, actual {value}")
    if not t1 > t0:
        raise ValueError(f"Expected `t1` > `t0`, actual t0 = {t0}, t1 = {t1}")
    return float(t1) - float(t0)


def check_constant_sigma(sigma, x0: Tensor) -> Tensor:
    """A constant diffusion ``sigma`` as a positive tensor broadcastable to ``x0``
    without enlarging it; a callable one is a NotImplementedError."""
    if callable(sigma) and not isinstance(sigma, Tensor):
        raise NotImplementedError(
            "Expected `sigma` to be a constant (positive float or tensor of shape "
            "(..., state_dim)), actual a callable: the estimators here need a constant diffusion "
            "coefficient (a state-dependent one needs second-order parametrix weights, "
            "Andersson & Kohatsu-Higa 2017, which are not implemented)"
        )
    check_diffusion(sigma, x0, name="sigma", callable_allowed=False)
    if not isinstance(sigma, Tensor):
        return torch.tensor(float(sigma), dtype=x0.dtype, device=x0.device)
    shape = _broadcast(sigma, x0, f"`sigma` broadcastable to x0's shape {shape_of(x0)}")
    if shape != x0.shape:
        raise ValueError(
            f"Expected `sigma` broadcastable to x0's shape {shape_of(x0)} without "
            f"enlarging it, actual shape {shape_of(sigma)}"
        )
    return sigma


def check_drift_on_samples(drift, x0: Tensor, t0: float) -> None:
    """Probe ``drift(t, x)`` once on ``x = x0[None]``, ``t`` of shape ``(1,) + (1,) * x0.dim()``
    (one time per sample): the output must have ``x``'s shape exactly and be finite."""
    check_callable("drift", drift)
    x = x0.unsqueeze(0)
    t = torch.full((1,) + (1,) * x0.dim(), t0, dtype=x0.dtype, device=x0.device)
    check_output("drift", drift(t, x), x, positive=False, call="(t, x)", exact=True, finite=True)


def check_fn_output(name: str, out, x: Tensor) -> None:
    """``out = fn(x)`` has shape ``x.shape[:-1] + event_shape`` and ``x``'s dtype."""
    if not isinstance(out, Tensor):
        raise TypeError(
            f"Expected `{name}(x)` to return a torch.Tensor, actual {type(out).__name__}"
        )
    lead = x.shape[:-1]
    if out.shape[: len(lead)] != lead:
        raise ValueError(
            f"Expected `{name}(x)` for x of shape {shape_of(x)} to return shape "
            f"{tuple(lead)} + event_shape, actual shape {shape_of(out)}"
        )
    if out.dtype != x.dtype:  # the estimators accumulate in x's dtype
        raise ValueError(
            f"Expected `{name}(x)` to return x's dtype {x.dtype} (for a probability, "
            f"(x[..., 0] > 0).to(x.dtype)), actual {out.dtype}"
        )


def check_fn(name: str, fn, x0: Tensor) -> None:
    """Probe a functional ``fn(x)`` of the state once on ``x0[None]``."""
    check_callable(name, fn)
    x = x0.unsqueeze(0)
    check_fn_output(name, fn(x), x)


def check_sde_arguments(
    drift, x0, t0, t1, sigma, num_samples, chunk_size, default_chunk: int
) -> tuple[float, Tensor, int]:
    """The arguments every unbiased estimator shares; return ``(t1 - t0, sigma as a
    tensor, chunk size)``."""
    check_x0(x0)
    duration = check_time_interval(t0, t1)
    sigma_t = check_constant_sigma(sigma, x0)
    check_positive_int("num_samples", num_samples, 2, strict=True, reason=" (for a standard error)")
    chunk = chunk_size_or_default(chunk_size, num_samples, default_chunk, strict=True)
    check_drift_on_samples(drift, x0, float(t0))
    return duration, sigma_t, chunk
