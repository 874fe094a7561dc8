r"""A learned Föllmer sampler: a Brownian-path Pyro model, a DiffusionGuide, SVI."""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO
from pyro.infer.importance import vectorized_importance_weights
from torch import Tensor

from .._validation import check_positive_float, check_positive_int, check_times
from .._warnings import LatentDiffusionWarning
from ..distribution import EulerChain, LatentDiffusion
from ..guide import DiffusionGuide
from ..infer import fit, log_evidence
from .density import TargetDensity, check_dtype
from .estimate import LogNormalizerEstimate
from .follmer_drift import ESTIMATORS, MonteCarloFollmerDrift
from .log_variance import LogVarianceELBO
from .replay import ReplayBuffer

__all__ = ["FollmerSampler"]

_LOSSES = ("kl", "log_variance")
_CONTROLS = ("target_aware", "network")
_BASE_DRIFTS = (None, "monte_carlo")
_SAMPLER_NUMBERS = itertools.count()


class FollmerSampler:
    r"""Samples a target :math:`\pi` known up to its normaliser :math:`Z` with a learned
    Föllmer drift, and estimates :math:`\log Z` (Tzen & Raginsky 2019; Zhang & Chen
    2022).

    Underneath is a plain Pyro model, :attr:`model`, and a
    :class:`~pyro_latdiff.DiffusionGuide`, :attr:`guide`. The model is a Brownian path
    from 0 on [0, 1] (``num_steps`` Euler steps, noise ``sigma``) whose terminal state
    "observes" the target through a factor (``times`` may be any grid, the reference
    is then :math:`\mathcal N(0, \sigma^2 T)` with ``T`` the horizon):

    .. code-block:: python

        def model():
            path = pyro.sample("path", LatentDiffusion(zero_drift, sigma, torch.zeros(dim), times))
            x1 = path[..., -1, :]
            pyro.factor("target", log_pi(x1) - Normal(0, sigma).log_prob(x1).sum(-1))

    so :math:`p(\mathrm{obs}) = \int \pi = Z`, the posterior of :math:`x_1` is
    :math:`\pi / Z`, the posterior path law is the Föllmer process, the ELBO is the
    path-KL (control-cost) bound and :func:`~pyro_latdiff.log_evidence` is the
    importance-weighted :math:`\log Z`. To add structure (another prior, another
    horizon, a target with its own Pyro latents), write such a model and give it to
    ``DiffusionGuide`` and :func:`~pyro_latdiff.fit` directly.

    **Control.** The guide's drift is the model's drift plus ``sigma`` times its
    control :math:`c_k(x) = \mathrm{NN}(t_k, x) + \text{per-step terms}`; with
    ``control="target_aware"`` (default) the control also has the path integral
    sampler's term :math:`g_k \odot \mathrm{clip}(\sigma \nabla \log \pi(x))` at the
    current state, with a learned gain :math:`g_k` per step (the guide's ``target=``
    option, :class:`~pyro_latdiff.chain.TargetGradient`; on a grid a per-step gain is
    the :math:`\mathrm{NN}_2(t)` of Zhang & Chen 2022). The gradient is scaled by
    ``sigma`` because near :math:`t = 1` the Föllmer control is
    :math:`\sigma \nabla \log \pi(x) + x / \sigma`: the gain's optimum is then near 1
    whatever ``sigma``, which a gain that starts at 0 and moves by the learning rate
    per step can reach (unscaled, ``sigma = 5`` needs a gain of 5: measured on the
    9-mode mixture, the loss stayed about 10 times higher after 1200 steps).

    **Base drift.** To start the guide from a better drift ``b`` than zero without
    changing the model, the model's path uses drift ``b`` and adds the factor
    ``"reference"`` :math:`= \log P_0(\mathrm{path}) - \log P_b(\mathrm{path})` (the
    discretised Girsanov ratio), so the joint density is exactly the Brownian one's
    and :math:`Z` is unchanged. With ``base_drift="monte_carlo"`` ``b`` is the
    training-free Monte Carlo Föllmer drift (:class:`MonteCarloFollmerDrift`,
    ``num_inner`` inner samples, new ones on every model run), which the learned
    control then corrects; any callable ``drift(t, x)`` works too.

    **Losses.** ``loss="kl"`` (default) is :class:`~pyro.infer.Trace_ELBO` with the
    path-derivative gradient (reverse KL); ``loss="log_variance"`` is
    :class:`LogVarianceELBO`, with paths from the guide with noise scaled by
    ``noise_scale``. With ``replay=True`` (log-variance only) the loss also trains on
    the reference's bridge paths to terminal states kept in a
    :class:`ReplayBuffer` (:attr:`replay`): the guide's past draws, improved by local
    search. This keeps modes that on-policy training loses (ManyWell's minor wells,
    benchmarks/README.md).

    Example::

        from pyro_latdiff.sampling import FollmerSampler
        from pyro_latdiff.testing import gmm9

        sampler = FollmerSampler(gmm9().log_prob, dim=2, sigma=5.0)
        sampler.fit(num_steps=2000)
        x = sampler.sample(1000)                   # (1000, 2)
        print(sampler.log_normalizer(10000))       # log Z, stderr, ESS, ELBO

    :param callable log_density: unnormalised :math:`\log \pi(x)`, a function of a
        tensor ``batch_shape + (dim,)`` returning ``batch_shape``.
    :param int dim: the state dimension.
    :param int num_steps: Euler steps on [0, 1] (a uniform grid), 100 by default.
    :param torch.Tensor times: a grid instead (any horizon, uniform or not; with
        ``num_steps`` too, they must agree: ``len(times) == num_steps + 1``). A grid
        finer near its end, e.g. ``1 - (1 - torch.linspace(0, 1, 51))**2``, keeps the
        last steps' noise ``sigma * sqrt(h)`` below the target's finest scale at no
        extra cost.
    :param float sigma: the Brownian reference's noise scale (reference
        :math:`\mathcal N(0, \sigma^2 I)` at time 1): about the target's spread.
    :param str control: ``"target_aware"`` or ``"network"`` (the guide's network only).
    :param base_drift: ``None``, ``"monte_carlo"`` or a callable ``drift(t, x)`` (e.g.
        an exact Föllmer drift).
    :param int num_inner: inner samples of the Monte Carlo base drift.
    :param str estimator: its estimator, ``"stein"`` (default: no second derivatives
        of the target in the ELBO gradient) or ``"gradient"``.
    :param str loss: ``"kl"`` or ``"log_variance"``.
    :param float noise_scale: the log-variance loss's proposal noise scale.
    :param replay: ``True`` for a :class:`ReplayBuffer` with its defaults on the
        sampler's grid, a buffer built on that grid, or ``False``.
    :param float clip: clip of :math:`\nabla \log \pi` in the target-aware term.
    :param hidden_dims: hidden widths of the guide's network.
    :param torch.dtype dtype: dtype of the paths, a floating point one (default torch's
        default).
    :param str name: prefix of the parameter names (unique per instance by default).

    References: Tzen & Raginsky (2019), *Theoretical guarantees for sampling and
    inference in generative models with latent diffusions*; Zhang & Chen (2022),
    *Path integral sampler*; Huang et al. (2021), *Schrödinger–Föllmer sampler*;
    Richter & Berner (2024), *Improved sampling via learned diffusions*.
    """

    def __init__(
        self,
        log_density: Callable[[Tensor], Tensor],
        dim: int,
        *,
        num_steps: int | None = None,
        times: Tensor | None = None,
        sigma: float = 1.0,
        control: str = "target_aware",
        base_drift: str | None = None,
        num_inner: int = 16,
        estimator: str = "stein",
        loss: str = "kl",
        noise_scale: float = 1.0,
        replay: bool | ReplayBuffer = False,
        clip: float = 100.0,
        hidden_dims: Sequence[int] = (64, 64),
        dtype: torch.dtype | None = None,
        name: str | None = None,
    ):
        for arg, value, allowed in (
            ("control", control, _CONTROLS),
            ("loss", loss, _LOSSES),
            ("estimator", estimator, ESTIMATORS),
        ):
            if value not in allowed:
                raise ValueError(f"Expected `{arg}` in {allowed}, actual {value!r}")
        if not (base_drift in _BASE_DRIFTS or callable(base_drift)):
            raise ValueError(
                f"Expected `base_drift` in {_BASE_DRIFTS} or a callable drift(t, x), "
                f"actual {base_drift!r}"
            )
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"Expected `sigma` to be a positive float, actual {sigma!r}")
        if base_drift == "monte_carlo" and isinstance(num_inner, int) and num_inner % 2:
            raise ValueError(
                "Expected `num_inner` to be even with base_drift='monte_carlo' (its inner "
                f"samples come in antithetic pairs), actual {num_inner!r}"
            )
        self.dtype = check_dtype(dtype)
        self.density = TargetDensity(log_density, dim, dtype=self.dtype)
        self.dim = dim
        self.sigma = float(sigma)
        if times is None:
            num_steps = 100 if num_steps is None else check_positive_int("num_steps", num_steps)
            times = torch.linspace(0.0, 1.0, num_steps + 1, dtype=self.dtype)
        else:
            check_times(times)
            if num_steps is not None and num_steps != times.shape[0] - 1:
                raise ValueError(
                    f"Expected `num_steps` = len(times) - 1 = {times.shape[0] - 1} when both "
                    f"are given (or only one of them), actual {num_steps!r}"
                )
        self.times = times.to(self.dtype)
        self.horizon = float(self.times[-1] - self.times[0])
        if base_drift == "monte_carlo" and (self.times[0] != 0 or self.times[-1] != 1):
            raise ValueError(
                "Expected `times` from 0 to 1 with base_drift='monte_carlo', actual from "
                f"{self.times[0].item()} to {self.times[-1].item()}"
            )
        if replay is not False and loss != "log_variance":
            raise ValueError(
                f"Expected loss='log_variance' with `replay` (reverse KL is on-policy), "
                f"actual loss={loss!r}"
            )
        if replay is True:
            replay = ReplayBuffer(self.density, dim, self.times, self.sigma, dtype=self.dtype)
        elif not (replay is False or isinstance(replay, ReplayBuffer)):
            raise ValueError(f"Expected `replay` to be a bool or a ReplayBuffer, actual {replay!r}")
        #: The :class:`ReplayBuffer` of the log-variance loss, or ``None``.
        self.replay = None if replay is False else replay
        self.base_drift = base_drift
        self.num_inner = check_positive_int("num_inner", num_inner)
        self.estimator = estimator
        check_positive_float("clip", clip)
        self.loss_name = loss
        self.noise_scale = check_positive_float("noise_scale", noise_scale)
        # A fresh name per sampler in this process (an id() is reused once its object is
        # freed, and the dead sampler's parameters stay in Pyro's parameter store).
        self.name = f"FollmerSampler_{next(_SAMPLER_NUMBERS)}" if name is None else name
        self.guide = DiffusionGuide(
            self.model,
            hidden_dims=hidden_dims,
            context=None,
            bridge=False,
            path_derivative=loss == "kl",
            target=self._scaled_log_density if control == "target_aware" else None,
            target_clip=clip * self.sigma,
            name=f"{self.name}.guide",
        )

    def _scaled_log_density(self, x: Tensor) -> Tensor:
        # sigma log pi: near t = 1 the Föllmer control is sigma grad log pi + x / sigma,
        # so the guide's per-step gain (zero at first) has its optimum near 1 there.
        return self.sigma * self.density(x)

    def _log_ratio(self, x: Tensor) -> Tensor:
        # log pi - log N(0, sigma^2 T): the Brownian path's terminal law; a constant floor
        # where log pi is not finite (TargetDensity.log_ratio).
        return self.density.log_ratio(x, self.sigma * math.sqrt(self.horizon))

    def _drift(self) -> Callable[[Tensor, Tensor], Tensor] | None:
        terms: list[Callable[[Tensor, Tensor], Tensor]] = []
        if callable(self.base_drift):
            terms.append(self.base_drift)
        elif self.base_drift == "monte_carlo":
            terms.append(
                MonteCarloFollmerDrift(
                    self.density,
                    self.dim,
                    num_inner=self.num_inner,
                    estimator=self.estimator,
                    sigma=self.sigma,
                    dtype=self.dtype,
                )
            )
        if not terms:
            return None

        def drift(t: Tensor, x: Tensor) -> Tensor:
            out = terms[0](t, x)
            for term in terms[1:]:
                out = out + term(t, x)
            return out

        return drift

    def model(self) -> Tensor:
        """The Pyro model: Brownian path, Girsanov ``"reference"`` factor for a base
        drift, ``"target"`` factor; returns the terminal state."""
        x0 = torch.zeros(self.dim, dtype=self.dtype)
        drift = self._drift()
        if drift is None:
            prior = LatentDiffusion(lambda t, x: torch.zeros_like(x), self.sigma, x0, self.times)
            path = pyro.sample("path", prior)
        else:
            prior = LatentDiffusion(drift, self.sigma, x0, self.times, validate_args=False)
            path = pyro.sample("path", prior)
            brownian = LatentDiffusion(
                lambda t, x: torch.zeros_like(x), self.sigma, x0, self.times, validate_args=False
            )
            pyro.factor("reference", brownian.log_prob(path) - prior.log_prob(path))
        x1 = path[..., -1, :]
        pyro.factor("target", self._log_ratio(x1))
        return x1

    def make_loss(self, num_particles: int = 64) -> pyro.infer.ELBO:
        """The loss chosen at construction, with ``num_particles`` paths per step."""
        if self.loss_name == "kl":
            return Trace_ELBO(
                num_particles=num_particles, vectorize_particles=True, max_plate_nesting=0
            )
        return LogVarianceELBO(
            num_particles, noise_scale=self.noise_scale, max_plate_nesting=0, replay=self.replay
        )

    def fit(
        self,
        num_steps: int = 2000,
        *,
        num_particles: int = 64,
        lr: float = 5e-3,
        final_lr: float = 5e-4,
        gain_lr: float | None = None,
        progress: bool = False,
        **kwargs,
    ) -> list[float]:
        """Fit the guide with :func:`~pyro_latdiff.fit` (clipped Adam, learning rate
        decaying from ``lr`` to ``final_lr``; the per-step gains of the target-aware
        term at ``gain_lr``, ``10 * lr`` by default: one number per step, zero at
        first, they would otherwise need about ``1 / lr`` steps to reach their optimum
        near 1); other keywords go to ``fit``. Non-finite
        target values met while fitting are reported by a ``LatentDiffusionWarning``.

        :returns: the loss at every step.
        """
        check_positive_int("num_steps", num_steps)
        check_positive_int("num_particles", num_particles)
        check_positive_float("lr", lr)
        check_positive_float("final_lr", final_lr)
        if gain_lr is not None:
            check_positive_float("gain_lr", gain_lr)
        optim = kwargs.pop("optim", None) or self._optim(num_steps, lr, final_lr, gain_lr)
        loss = kwargs.pop("loss", None) or self.make_loss(num_particles)
        nonfinite = self.density.num_nonfinite
        dropped = getattr(loss, "num_dropped", 0)
        losses = fit(
            self.model,
            self.guide,
            num_steps=num_steps,
            optim=optim,
            loss=loss,
            progress=progress,
            **kwargs,
        )
        nonfinite = self.density.num_nonfinite - nonfinite
        if nonfinite:
            dropped = getattr(loss, "num_dropped", 0) - dropped
            warnings.warn(
                f"FollmerSampler.fit: {nonfinite} target evaluations were NaN or infinite; "
                f"the log-ratio to the reference was given a constant floor "
                f"({self.density.margin:g} nats below the lowest finite log-density met, "
                f"minus the reference's peak) and zero gradient"
                + (
                    f", and {dropped} paths were left out of the log-variance loss"
                    if dropped
                    else ""
                )
                + ". Check `log_density` if this is not expected (e.g. a support boundary)",
                LatentDiffusionWarning,
                stacklevel=2,
            )
        return losses

    @staticmethod
    def _optim(num_steps: int, lr: float, final_lr: float, gain_lr: float | None):
        decay = (final_lr / lr) ** (1.0 / num_steps)
        gain_lr = 10 * lr if gain_lr is None else gain_lr

        def args(name: str) -> dict:
            rate = gain_lr if name.endswith("target_gain") else lr
            return {"lr": rate, "lrd": decay, "clip_norm": 10.0}

        return pyro.optim.ClippedAdam(args)

    @torch.no_grad()
    def drift(self, k: int, x: Tensor) -> Tensor:
        """The guide's learned drift (base drift plus ``sigma`` times the control) at
        grid time ``times[k]``, ``k`` an int in ``0 .. num_steps - 1``, for states ``x``
        of shape ``(..., dim)``."""
        num_steps = self.times.shape[0] - 1
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < num_steps:
            raise ValueError(
                f"Expected `k` to be an int step index in 0..{num_steps - 1} "
                f"(num_steps = {num_steps}), actual {k!r}"
            )
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.dim:
            actual = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"Expected `x` of shape (..., dim) with dim = {self.dim}, actual {actual}"
            )
        with poutine.block():
            trace = poutine.trace(self.guide).get_trace()
        fn = trace.nodes["path"]["fn"]
        while not isinstance(fn, EulerChain):  # Pyro's and the guide's wrappers
            fn = getattr(fn, "base_dist", None) or fn.fn
        drift, _ = fn.step(k, x.to(self.dtype))
        return drift

    @torch.no_grad()
    def sample_paths(self, num_samples: int, chunk_size: int = 1000) -> Tensor:
        """Paths from the guide, shape ``(num_samples, num_steps, dim)``."""
        check_positive_int("num_samples", num_samples)
        check_positive_int("chunk_size", chunk_size)
        chunks = []
        for start in range(0, num_samples, chunk_size):
            size = min(chunk_size, num_samples - start)
            with poutine.block(), pyro.plate("samples", size, dim=-1):
                trace = poutine.trace(self.guide).get_trace()
            chunks.append(trace.nodes["path"]["value"].reshape(size, -1, self.dim))
        return torch.cat(chunks)

    def sample(
        self, num_samples: int, *, resample: bool = False, pool_size: int | None = None
    ) -> Tensor:
        r"""Terminal states of the guide's paths, shape ``(num_samples, dim)``: samples
        from the learned approximation of :math:`\pi / Z`.

        With ``resample=True``, sampling-importance-resampling: ``pool_size`` paths
        (default ``4 * num_samples``) are drawn and ``num_samples`` terminal states
        resampled in proportion to their importance weights, which removes the guide's
        bias as the pool grows (at the cost of repeated points). The draws are with
        replacement, so any ``pool_size`` is valid, also one below ``num_samples``: the
        bias depends on ``pool_size`` alone, the repeats grow as it shrinks."""
        check_positive_int("num_samples", num_samples)
        if not resample:
            return self.sample_paths(num_samples)[:, -1]
        pool_size = 4 * num_samples if pool_size is None else pool_size
        check_positive_int("pool_size", pool_size)
        states, log_weights = self.sample_with_log_weights(pool_size)
        index = torch.multinomial(torch.softmax(log_weights, 0), num_samples, replacement=True)
        return states[index]

    @torch.no_grad()
    def sample_with_log_weights(
        self, num_samples: int, chunk_size: int = 500
    ) -> tuple[Tensor, Tensor]:
        r"""Terminal states ``(num_samples, dim)`` and their importance log-weights
        :math:`\log p(\mathrm{path}, \mathrm{obs}) - \log q(\mathrm{path})`."""
        check_positive_int("num_samples", num_samples)
        check_positive_int("chunk_size", chunk_size)
        states, weights = [], []
        for start in range(0, num_samples, chunk_size):
            size = min(chunk_size, num_samples - start)
            log_w, model_trace, _ = vectorized_importance_weights(
                self.model, self.guide, num_samples=size, max_plate_nesting=0
            )
            states.append(model_trace.nodes["path"]["value"].reshape(size, -1, self.dim)[:, -1])
            weights.append(log_w.reshape(size))
        return torch.cat(states), torch.cat(weights)

    def log_normalizer(
        self, num_samples: int = 1000, chunk_size: int = 500
    ) -> LogNormalizerEstimate:
        """Importance-weighted :math:`\\log Z` with the guide as proposal
        (:func:`~pyro_latdiff.log_evidence`), its standard error and ESS, and the ELBO."""
        before = self.density.num_evaluations
        estimate = log_evidence(
            self.model,
            self.guide,
            num_samples=num_samples,
            chunk_size=chunk_size,
            max_plate_nesting=0,
        )
        return LogNormalizerEstimate.from_log_weights(
            estimate.log_weights, self.density.num_evaluations - before
        )
