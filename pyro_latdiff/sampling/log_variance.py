r"""The log-variance loss, off-policy, as a Pyro ELBO."""

from __future__ import annotations

import math

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO
from pyro.poutine.messenger import Messenger
from torch import Tensor

from .._validation import check_positive_int
from ..distribution import EulerChain
from .replay import ReplayBuffer

__all__ = ["LogVarianceELBO"]


def _euler_chain(fn) -> EulerChain | None:
    while fn is not None and not isinstance(fn, EulerChain):
        fn = getattr(fn, "base_dist", None)
    return fn


class _WiderChain(EulerChain):
    """``chain`` with its noise scale multiplied by ``noise_scale`` (simulation only)."""

    def __init__(self, chain: EulerChain, noise_scale: float):
        self.chain = chain
        self.noise_scale = noise_scale
        self.x0, self.times = chain.x0, chain.times
        self.noise_type, self.noise_dim = chain.noise_type, chain.noise_dim
        self.block_size = chain.block_size
        self._init_chain(chain.batch_shape, validate_args=False)

    def window(self, steps: slice) -> _WiderChain:
        return _WiderChain(self.chain.window(steps), self.noise_scale)

    def step(self, k: int, x: Tensor) -> tuple[Tensor, Tensor]:
        drift, scale = self.chain.step(k, x)
        return drift, self.noise_scale * scale

    def path_coefficients(self, t: Tensor, previous: Tensor) -> tuple[Tensor, Tensor]:
        drift, scale = self.chain.path_coefficients(t, previous)
        return drift, self.noise_scale * scale


class _Proposal(Messenger):
    """Draws the guide's latent values from the proposal, detached: path sites from the
    guide's chain with its noise scaled by ``noise_scale``, other sites from the
    guide's own distribution. With ``paths`` the site ``site`` takes those paths
    instead (the replay buffer's); the chain of ``site`` is kept in :attr:`chain`."""

    def __init__(self, noise_scale: float, site: str | None = None, paths: Tensor | None = None):
        super().__init__()
        self.noise_scale = noise_scale
        self.site, self.paths = site, paths
        self.chain: EulerChain | None = None

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg.get("done"):
            return
        chain = _euler_chain(msg["fn"])
        if msg["name"] == self.site:
            self.chain = chain
        with torch.no_grad():
            if msg["name"] == self.site and self.paths is not None:
                value = self.paths
            elif chain is None or self.noise_scale == 1.0:
                value = msg["fn"].sample()
            else:
                value = _WiderChain(chain, self.noise_scale).sample()
        msg["value"] = value.detach()
        msg["done"] = True


def _per_particle(log_prob: Tensor, num_particles: int, particle_dim: int) -> Tensor:
    """Sum a site's log-density over every dimension right of the particle dimension."""
    ndim = -particle_dim
    if log_prob.dim() < ndim:
        log_prob = log_prob.reshape((1,) * (ndim - log_prob.dim()) + log_prob.shape)
    log_prob = log_prob.reshape(log_prob.shape[log_prob.dim() - ndim :])
    return log_prob.reshape(log_prob.shape[0], -1).sum(-1).expand(num_particles)


class LogVarianceELBO(ELBO):
    r"""The log-variance loss (Richter, Boustati, Nüsken, Ruiz & Akyildiz 2020; Nüsken &
    Richter 2021): the variance, over paths :math:`z_i` from a proposal
    :math:`\tilde q`, of the log-ratio

    .. math::

        \mathcal L(\phi) = \widehat{\mathrm{Var}}_{z \sim \tilde q}
            \big[\log p(z, y) - \log q_\phi(z)\big],

    with :math:`\tilde q` not differentiated (off-policy). It is zero exactly when
    :math:`q_\phi \propto p(\cdot, y)`, the posterior, whatever the proposal; its
    gradient at the optimum has zero variance, unlike the reverse KL's. The proposal is
    the guide itself with its paths' noise scaled by ``noise_scale`` (``> 1``
    explores: the paths reach modes the guide has not found yet), detached; other
    latent sites are drawn from the guide, detached.

    ``loss`` returns the variance (not an ELBO; :func:`~pyro_latdiff.fit` records it),
    ``differentiable_loss`` a differentiable tensor, and ``loss_and_grads`` calls its
    ``backward``, so :class:`~pyro.infer.SVI` and ``fit(loss=...)`` take it.

    The guide's log-density must carry its parameters' gradient: build a
    :class:`~pyro_latdiff.DiffusionGuide` with ``path_derivative=False``.

    **Replay.** With ``replay=`` a :class:`~pyro_latdiff.sampling.ReplayBuffer`, each
    step adds ``replay_particles`` paths to the ones above: the reference's bridge
    paths to terminal states drawn from the buffer, at the path site ``replay_site``
    (the buffer's grid must be that site's). The on-policy paths' terminal states are
    then given to the buffer (:meth:`~pyro_latdiff.sampling.ReplayBuffer.update`). The
    variance is over all the paths together, so the guide's log-ratio is asked to be
    the same constant on both: a mode the buffer holds keeps its weight in the guide
    even after the guide's own paths stop reaching it. Other latent sites of those
    particles are drawn from the guide, as above. The path site must be one path per
    particle (no plate around it). Every evaluation feeds the buffer, ``loss`` too.

    **Robustness.** Particles whose log-ratio is not finite, or more than
    ``outlier_threshold`` nats below the median (a target floored for a non-finite
    value, see :class:`~pyro_latdiff.sampling.TargetDensity`), are left out of the
    variance and counted in :attr:`num_dropped`.

    Example::

        guide = DiffusionGuide(model, path_derivative=False)
        fit(model, guide, loss=LogVarianceELBO(num_particles=64, noise_scale=1.2))

    :param int num_particles: paths per step (vectorised).
    :param float noise_scale: the proposal's noise scale relative to the guide's.
    :param int max_plate_nesting: as in :class:`~pyro.infer.ELBO` (found if omitted).
    :param float outlier_threshold: see above.
    :param ReplayBuffer replay: a replay buffer (see above), or ``None``.
    :param int replay_particles: its paths per step (default ``num_particles``).
    :param str replay_site: the path site the buffer's paths go to.

    References: Richter, Boustati, Nüsken, Ruiz & Akyildiz (2020), *VarGrad: a
    low-variance gradient estimator for variational inference*; Nüsken & Richter
    (2021), *Solving high-dimensional Hamilton–Jacobi–Bellman PDEs using neural
    networks: perspectives from the theory of controlled diffusions and measures on
    path space*; Richter & Berner (2024), *Improved sampling via learned diffusions*.
    """

    def __init__(
        self,
        num_particles: int = 16,
        *,
        noise_scale: float = 1.0,
        max_plate_nesting: float = float("inf"),
        outlier_threshold: float = 1e3,
        replay: ReplayBuffer | None = None,
        replay_particles: int | None = None,
        replay_site: str = "path",
    ):
        if isinstance(num_particles, bool) or not isinstance(num_particles, int):
            raise ValueError(
                f"Expected `num_particles` to be an int >= 2, actual {num_particles!r}"
            )
        if num_particles < 2:
            raise ValueError(f"Expected `num_particles` to be an int >= 2, actual {num_particles}")
        if not (isinstance(noise_scale, (int, float)) and math.isfinite(noise_scale)):
            raise ValueError(
                f"Expected `noise_scale` to be a positive float, actual {noise_scale!r}"
            )
        if not noise_scale > 0:
            raise ValueError(
                f"Expected `noise_scale` to be a positive float, actual {noise_scale!r}"
            )
        super().__init__(
            num_particles=num_particles,
            max_plate_nesting=max_plate_nesting,
            vectorize_particles=True,
        )
        if replay is not None and not isinstance(replay, ReplayBuffer):
            raise ValueError(
                f"Expected `replay` to be a ReplayBuffer or None, actual {type(replay).__name__}"
            )
        if replay_particles is not None:
            check_positive_int("replay_particles", replay_particles)
        self.noise_scale = float(noise_scale)
        self.outlier_threshold = float(outlier_threshold)
        self.replay = replay
        self.replay_particles = num_particles if replay_particles is None else replay_particles
        self.replay_site = replay_site
        self.num_dropped = 0

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("LogVarianceELBO draws all its particles at once")

    def _find_plate_nesting(self, model, guide, args, kwargs) -> None:
        with poutine.block(), torch.no_grad():
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs
            )
        dims = [
            -f.dim
            for tr in (guide_trace, model_trace)
            for s in tr.nodes.values()
            if s["type"] == "sample"
            for f in s["cond_indep_stack"]
            if f.vectorized
        ]
        self.max_plate_nesting = max(dims, default=0)

    def _log_ratios(self, model, guide, args, kwargs, n: int, proposal: _Proposal):
        """``n`` log-ratios of paths from ``proposal``, and the guide's trace."""
        particle_dim = -self.max_plate_nesting - 1

        def vectorised(fn):
            def wrapped(*a, **k):
                with pyro.plate("num_particles_vectorized", n, dim=particle_dim):
                    return fn(*a, **k)

            return wrapped

        with proposal:
            guide_trace = poutine.trace(vectorised(guide)).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(vectorised(model), trace=guide_trace)).get_trace(
            *args, **kwargs
        )
        log_ratio = torch.zeros(n)
        for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
            trace.compute_log_prob()
            for site in trace.nodes.values():
                if site["type"] == "sample" and "log_prob" in site:
                    term = _per_particle(site["log_prob"], n, particle_dim)
                    log_ratio = log_ratio.to(term.dtype) + sign * term
        return log_ratio, guide_trace

    def _replay_terminal_states(self, guide_trace, chain: EulerChain | None) -> Tensor:
        """The on-policy paths' terminal states at the replay site, ``(n, D)``, after
        checking that the buffer's paths fit that site."""
        site = guide_trace.nodes.get(self.replay_site)
        if site is None or site["type"] != "sample" or chain is None:
            raise ValueError(
                f"Expected `replay_site` {self.replay_site!r} to name a path site of the "
                "guide (a LatentDiffusion's chain), actual "
                + ("no such site" if site is None else "a site that is no path")
            )
        value = site["value"]
        ones = value.shape[1:-2]  # the plates' dims right of the particles', all size 1
        if value.shape != (self.num_particles,) + ones + chain.event_shape or any(
            size != 1 for size in ones
        ):
            raise ValueError(
                f"Expected the replay site {self.replay_site!r} to hold one path per particle, "
                f"shape ({self.num_particles}, {chain.num_steps}, {chain.state_dim}), actual "
                f"{tuple(value.shape)} (replay does not support a plate around the path)"
            )
        times = self.replay.times
        if times.shape != chain.times.shape or not torch.allclose(
            times.to(chain.times), chain.times
        ):
            raise ValueError(
                f"Expected the ReplayBuffer's `times` to be the grid of the site "
                f"{self.replay_site!r} ({chain.times.shape[0]} times), actual a different grid"
            )
        if chain.state_dim != self.replay.dim:
            raise ValueError(
                f"Expected the ReplayBuffer's `dim` to be the site's state dimension "
                f"{chain.state_dim}, actual {self.replay.dim}"
            )
        return value.reshape(self.num_particles, chain.num_steps, chain.state_dim)[:, -1, :]

    def _all_log_ratios(self, model, guide, args, kwargs) -> Tensor:
        if getattr(guide, "path_derivative", False):
            raise ValueError(
                "Expected a guide with path_derivative=False for LogVarianceELBO (it "
                "differentiates log q at fixed proposal paths), actual path_derivative=True"
            )
        if self.max_plate_nesting == float("inf"):
            self._find_plate_nesting(model, guide, args, kwargs)
        site = None if self.replay is None else self.replay_site
        proposal = _Proposal(self.noise_scale, site)
        log_ratio, guide_trace = self._log_ratios(
            model, guide, args, kwargs, self.num_particles, proposal
        )
        if self.replay is None:
            return log_ratio
        terminal = self._replay_terminal_states(guide_trace, proposal.chain)
        parts = [log_ratio]
        if len(self.replay):
            shape = guide_trace.nodes[self.replay_site]["value"].shape[1:]
            paths = self.replay.paths(self.replay_particles).to(terminal.dtype)
            paths = paths.reshape((self.replay_particles,) + shape)
            replayed, _ = self._log_ratios(
                model,
                guide,
                args,
                kwargs,
                self.replay_particles,
                _Proposal(self.noise_scale, site, paths),
            )
            parts.append(replayed)
        self.replay.update(terminal)
        return torch.cat(parts)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        log_ratio = self._all_log_ratios(model, guide, args, kwargs)
        detached = log_ratio.detach()
        keep = torch.isfinite(detached)
        if keep.any():
            median = detached[keep].median()
            keep = keep & (detached > median - self.outlier_threshold)
        self.num_dropped += int((~keep).sum())
        kept = log_ratio[keep]
        if kept.numel() < 2:
            return (log_ratio * 0.0).nansum()
        return kept.var()

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return float(loss.detach())
