"""The discrete-time denoiser sampler of Reeves & Pfister on the channel
``Y_t = t X + W_t``, plain and covariance-matched."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..._validation import check_positive_int
from ._common import CountedCall, SampleResult, check_samples, check_time, make_times

OUTPUTS = ("mean", "scaled", "channel")


class GaussianChannel:
    r"""The observation channel ``Y_t = t X + W_t``, ``t in [0, horizon]``, ``W`` a
    standard Brownian motion: ``Y_t / \sqrt{t} = \sqrt{t} X + N(0, I)`` has
    signal-to-noise ratio ``t``, and ``Y`` solves ``dY = E[X | Y_t] dt + dB`` from
    ``Y_0 = 0``.

    :param float horizon: the largest time (signal-to-noise ratio) ``t_max``.
    """

    def __init__(self, horizon: float):
        if isinstance(horizon, bool) or not isinstance(horizon, (int, float)) or horizon <= 0:
            raise ValueError(f"Expected `horizon` to be a positive float, actual {horizon!r}")
        self.horizon = float(horizon)

    def __repr__(self) -> str:
        return f"GaussianChannel(horizon={self.horizon})"


class ScoreDenoiser:
    r"""The conditional mean ``E[X | Y_t = y]`` on the channel ``Y_t = t X + W_t`` from
    the score of a scalar-linear forward process (Tweedie), so that a trained score
    model drives :func:`denoiser_sampler`.

    ``X_\tau = a X + \sigma N`` and ``Y_t / \sqrt t = \sqrt t X + N`` are the same
    channel when ``t = a^2 / \sigma^2`` (the signal-to-noise ratio at ``\tau``), with
    ``X_\tau = \sigma^2 Y_t / a``; then ``E[X | Y_t = y] = (x + \sigma^2 s(\tau, x)) / a``
    at ``x = \sigma^2 y / a``. Channel times below the ratio at the horizon use the
    horizon; the channel ends at the ratio at ``t_min`` (``channel``). ``\tau`` is found
    by interpolation in log-ratio on a tabulated grid, with tensor operations only.

    :param callable score: ``score(tau, x)`` of ``process``.
    :param process: scalar-linear forward process (``marginal_coefs``, ``horizon``).
    :param t_min: the smallest process time used (the score's truncation), a float
        or a 0-d float tensor.
    :param int num_grid: size of the table of process times.
    """

    def __init__(self, score, process, t_min: float = 1e-3, num_grid: int = 4096):
        check_positive_int("num_grid", num_grid, minimum=2)
        horizon = float(process.horizon)
        t_min = check_time("t_min", t_min, horizon, positive=True)
        self.score = score
        self.process = process
        tau = torch.logspace(math.log10(t_min), math.log10(horizon), num_grid, dtype=torch.float64)
        a, std = (torch.as_tensor(c, dtype=torch.float64) for c in process.marginal_coefs(tau))
        log_snr = 2 * (a.log() - std.log())
        if not (log_snr.diff() < 0).all():
            raise ValueError(
                "Expected `process` to have a signal-to-noise ratio a^2 / std^2 decreasing "
                "in time, actual not monotone"
            )
        # increasing log-ratio against log-time, for searchsorted
        self._log_snr = log_snr.flip(0)
        self._log_tau = tau.log().flip(0)
        self.channel = GaussianChannel(float(log_snr[0].exp()))

    def process_time(self, t: Tensor) -> Tensor:
        """The process time whose signal-to-noise ratio is the channel time ``t``."""
        log_snr, log_tau = self._log_snr.to(t), self._log_tau.to(t)
        x = t.clamp(min=float(log_snr[0].exp())).log().clamp(max=log_snr[-1])
        j = torch.searchsorted(log_snr, x.reshape(1)).clamp(1, log_snr.shape[0] - 1)[0]
        w = (x - log_snr[j - 1]) / (log_snr[j] - log_snr[j - 1])
        return (log_tau[j - 1] + w * (log_tau[j] - log_tau[j - 1])).exp()

    def __call__(self, t: Tensor, y: Tensor) -> Tensor:
        tau = self.process_time(torch.as_tensor(t, dtype=y.dtype))
        a, std = (torch.as_tensor(c, dtype=y.dtype) for c in self.process.marginal_coefs(tau))
        x = std**2 * y / a
        return (x + std**2 * self.score(tau, x)) / a


def _matched_noise(delta: Tensor, cov: Tensor, z: Tensor) -> Tensor:
    """A draw of ``N(0, delta I + delta^2 cov)``, ``cov`` symmetrised and its negative
    eigenvalues (a network's Jacobian need not be PSD) set to zero."""
    lam, vec = torch.linalg.eigh(0.5 * (cov + cov.transpose(-1, -2)))
    std = (delta + delta**2 * lam.clamp(min=0)).sqrt()
    return (vec @ (std * (vec.transpose(-1, -2) @ z[..., None])[..., 0])[..., None])[..., 0]


def denoiser_sampler(
    denoiser: Callable[[Tensor, Tensor], Tensor],
    channel: GaussianChannel,
    num_samples: int,
    num_steps: int,
    *,
    state_dim: int,
    schedule: str | Tensor = "uniform",
    covariance: str | Callable[[Tensor, Tensor], Tensor] | None = None,
    output: str = "mean",
    dtype: torch.dtype | None = None,
) -> SampleResult:
    r"""Sample by simulating the channel ``Y_t = t X + W_t`` forward with a
    conditional-mean estimator ``f(t, y) \approx E[X | Y_t = y]`` (Reeves & Pfister):
    from ``\hat Y_0 = 0``, with ``\delta_k = t_k - t_{k-1}``,

    .. math::

        \hat Y_k = \hat Y_{k-1} + \delta_k f(t_{k-1}, \hat Y_{k-1}) + \sqrt{\delta_k} Z_k.

    With the exact ``f`` the path KL is
    ``\Delta_n = \tfrac12 \sum_k [\delta_k M(t_{k-1}) - \int_{t_{k-1}}^{t_k} M(t) dt]``,
    ``M`` the MMSE curve (:func:`~pyro_latdiff.score.bounds.denoiser_discretisation`).
    The covariance-matched variant draws the step noise from
    ``N(0, \delta_k I + \delta_k^2 \mathrm{Cov}(X | \hat Y_{k-1}))``; on this channel
    ``\mathrm{Cov}(X | Y_t = y) = \partial_y E[X | Y_t = y]`` exactly, so
    ``covariance="jacobian"`` takes it from the same network (by ``torch.func``), or a
    callable (a second head) supplies it. Its per-step KL is ``O(\delta^3)``.

    **References:** G. Reeves, H. D. Pfister, *Discrete-time diffusion sampling*, 2025.

    Example::

        channel = GaussianChannel(4.0)
        result = denoiser_sampler(lambda t, y: y.tanh(), channel, 1000, 16, state_dim=1)

    :param callable denoiser: ``denoiser(t, y)``, ``t`` a 0-d tensor, ``y`` of shape
        ``(num_samples, state_dim)``; returns ``E[X | Y_t = y]`` shaped like ``y``.
    :param GaussianChannel channel: the channel, with its ``horizon`` ``t_n``.
    :param int num_samples: number of independent samples.
    :param int num_steps: number of steps ``n``.
    :param int state_dim: dimension of ``X``.
    :param schedule: ``"uniform"`` or an increasing tensor of ``n + 1`` times from 0 to
        ``channel.horizon`` (e.g. :func:`~pyro_latdiff.score.bounds.equalised_times`).
    :type schedule: str or torch.Tensor
    :param covariance: ``None`` (plain sampler), ``"jacobian"``, or ``cov(t, y)``
        returning ``(num_samples, state_dim, state_dim)``.
    :param str output: ``"mean"``: ``f(t_n, \hat Y_n)`` (one more call); ``"scaled"``:
        ``\hat Y_n / t_n``; ``"channel"``: ``\hat Y_n`` itself.
    :param torch.dtype dtype: dtype of the samples (default: torch's default).
    :returns: the samples, the number of denoiser calls (a Jacobian counts
        ``state_dim``) and the grid.
    :rtype: SampleResult
    """
    if not isinstance(channel, GaussianChannel):
        raise ValueError(
            f"Expected `channel` to be a GaussianChannel, actual {type(channel).__name__}"
        )
    if output not in OUTPUTS:
        raise ValueError(f"Expected `output` in {OUTPUTS}, actual {output!r}")
    if not (covariance is None or covariance == "jacobian" or callable(covariance)):
        raise ValueError(
            "Expected `covariance` to be None, 'jacobian' or a callable cov(t, y), actual "
            f"{covariance!r}"
        )
    check_positive_int("num_samples", num_samples)
    check_positive_int("state_dim", state_dim)
    dtype = dtype or torch.get_default_dtype()
    times = make_times(channel.horizon, num_steps, schedule, 0.0, dtype)
    if times[0] != 0:
        raise ValueError(f"Expected `schedule` to start at 0 (Y_0 = 0), actual {times[0].item()}")
    call = CountedCall(denoiser, "denoiser", dtype_from="dtype={dtype}")
    delta = times.diff()
    y = torch.zeros(num_samples, state_dim, dtype=dtype)
    if covariance == "jacobian":
        step = _jacobian_step(call, state_dim)
    elif covariance is None:
        step = _plain_step(call)
    else:
        step = _head_step(call, CountedCall(covariance, "covariance", extra_dims=(state_dim,)))
    call.checked(times[0], y)
    call.count = 0  # the probe is not part of the sampler
    for k in range(num_steps):
        y = step(times[k], y, delta[k])
    if output == "mean":
        samples = call(times[-1], y)
    elif output == "scaled":
        samples = y / times[-1]
    else:
        samples = y
    return SampleResult(check_samples(samples, "denoiser"), call.count, times)


def _plain_step(call: CountedCall):
    def step(t: Tensor, y: Tensor, delta: Tensor) -> Tensor:
        return y + delta * call(t, y) + delta.sqrt() * torch.randn_like(y)

    return step


def _jacobian_step(call: CountedCall, state_dim: int):
    from torch.func import jacrev, vmap

    def step(t: Tensor, y: Tensor, delta: Tensor) -> Tensor:
        def one(v: Tensor) -> tuple[Tensor, Tensor]:
            out = call.fn(t, v[None])[0]
            return out, out

        jac, mean = vmap(jacrev(one, has_aux=True))(y)
        call.count += state_dim
        return y + delta * mean + _matched_noise(delta, jac, torch.randn_like(y))

    return step


def _head_step(call: CountedCall, head: CountedCall):
    def step(t: Tensor, y: Tensor, delta: Tensor) -> Tensor:
        mean = call(t, y)
        cov = head(t, y)  # (n, D, D), its shape checked on every call
        return y + delta * mean + _matched_noise(delta, cov, torch.randn_like(y))

    return step
