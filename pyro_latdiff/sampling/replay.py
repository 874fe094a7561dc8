r"""A replay buffer of terminal states for off-policy training of samplers, with local
search, and the Brownian reference's bridge paths to them."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .._validation import check_positive_float, check_positive_int, check_times
from .density import TargetDensity

__all__ = ["ReplayBuffer", "brownian_bridge"]

_PRIORITIES = ("rank", "uniform")


def brownian_bridge(x1: Tensor, times: Tensor, sigma: float | Tensor = 1.0, x0=None) -> Tensor:
    r"""Paths of the Brownian reference :math:`x_0 + \sigma W` on ``times`` conditioned
    to end at ``x1``: the reference's backward law, shape
    ``x1.shape[:-1] + (N, D)`` (the states at ``times[1:]``, the last one ``x1``).

    One Brownian path per state, pinned: :math:`B_{t} = x_0 + \sigma (W_t - \tfrac{t -
    t_0}{T} W_{t_N}) + \tfrac{t - t_0}{T} (x_1 - x_0)`, vectorised over time and states.
    If ``x1`` is drawn from the reference's terminal law :math:`\mathcal N(x_0, \sigma^2
    T)`, the paths are the reference's (the test checks this).

    :param torch.Tensor x1: terminal states ``(..., D)``.
    :param torch.Tensor times: the grid ``(N + 1,)``, increasing.
    :param sigma: the reference's noise, a positive float or a tensor ``(D,)``.
    :param x0: the start (default 0), broadcastable to ``x1``.
    """
    if not (isinstance(x1, Tensor) and x1.dim() >= 1):
        raise ValueError(f"Expected `x1` to be a tensor of shape (..., D), actual {x1!r}")
    check_times(times)
    times = times.to(x1)
    steps = times.diff()
    x0 = torch.zeros_like(x1) if x0 is None else torch.as_tensor(x0).to(x1).expand_as(x1)
    sigma = torch.as_tensor(sigma).to(x1)
    shape = x1.shape[:-1] + (steps.shape[0],) + x1.shape[-1:]
    noise = torch.randn(shape, dtype=x1.dtype, device=x1.device)
    walk = (noise * steps.sqrt().unsqueeze(-1)).cumsum(-2)  # W at times[1:]
    fraction = ((times[1:] - times[0]) / (times[-1] - times[0])).unsqueeze(-1)
    pinned = walk - fraction * walk[..., -1:, :]
    return x0.unsqueeze(-2) + sigma * pinned + fraction * (x1 - x0).unsqueeze(-2)


class ReplayBuffer:
    r"""Terminal states a sampler has visited, kept to train it off-policy: the paths
    to them are drawn from the reference's bridge (:func:`brownian_bridge`) and scored
    under the guide by :class:`~pyro_latdiff.sampling.LogVarianceELBO` (``replay=``),
    whose optimum, the target's path law, is the same whatever the proposal. This is
    the replay-buffer-with-local-search recipe of Sendera et al. (2024).

    - **Why.** Reverse KL and on-policy losses only see where the guide already goes:
      a mode it stops visiting gets no gradient and is lost for good (ManyWell's minor
      wells, benchmarks/README.md). States kept here go on pulling the guide towards
      every mode they hold, in the target's proportions (the loss asks the guide's
      log-ratio to be constant on every path, whichever mode it ends in).
    - **Contents.** :meth:`update` adds the guide's terminal states of a training step
      (``add``) and, every ``local_search_every`` updates, runs :meth:`local_search`.
      The oldest states leave first once ``capacity`` is reached. States whose
      log-density is not finite are not kept (decided by ``torch.isfinite`` on the raw
      values, whatever their offset).
    - **Local search.** ``local_search_steps`` Metropolis-adjusted Langevin (MALA)
      steps from ``local_search_size`` states drawn from the buffer, the results added:
      they move towards the target's typical set without leaving their mode, and keep
      early states (which saw more modes) in the buffer. The step size adapts towards
      an acceptance rate of ``target_accept``.
    - **Priority.** :meth:`sample` draws states uniformly (``"uniform"``) or by the
      rank of their log-density (``"rank"``, weight :math:`1 / (k M + \mathrm{rank})`
      for ``M`` states, Tripp et al. 2020), which favours high-density states mildly.
      Uniform is the default: on ManyWell the rank priority, which favours the major
      wells, let the buffer and the guide lose the minor wells together (share of
      draws 0.26 at step 300, 0.016 at step 2400; uniform held 0.30).

    Example::

        from pyro_latdiff.sampling import FollmerSampler

        sampler = FollmerSampler(log_pi, dim, loss="log_variance", replay=True)
        sampler.fit(3000)
        print(len(sampler.replay), sampler.replay.acceptance_rate)

    :param callable log_density: unnormalised :math:`\log \pi` (or a
        :class:`TargetDensity`, whose evaluations are then counted with the sampler's).
    :param int dim: the state dimension.
    :param torch.Tensor times: the model's grid (the bridge paths' times).
    :param sigma: the Brownian reference's noise (float or ``(D,)``).
    :param int capacity: the most states kept.
    :param str priority: ``"rank"`` or ``"uniform"``.
    :param float rank_weight: ``k`` above.
    :param int local_search_every: updates between local searches (0: never).
    :param int local_search_size: states per local search.
    :param int local_search_steps: MALA steps per local search.
    :param float step_size: MALA's initial step size (adapted).
    :param float target_accept: the acceptance rate the step size adapts to.
    :param x0: the reference's start (default 0).

    Reference: Sendera, Kim, Mittal, Lemos, Scimeca, Rector-Brooks, Adam, Bengio &
    Malkin (2024), *Improved off-policy training of diffusion samplers*.
    """

    def __init__(
        self,
        log_density: Callable[[Tensor], Tensor],
        dim: int,
        times: Tensor,
        sigma: float | Tensor = 1.0,
        *,
        capacity: int = 20_000,
        priority: str = "uniform",
        rank_weight: float = 0.01,
        local_search_every: int = 10,
        local_search_size: int = 512,
        local_search_steps: int = 20,
        step_size: float = 0.05,
        target_accept: float = 0.574,
        x0: Tensor | None = None,
        dtype: torch.dtype | None = None,
    ):
        check_positive_int("capacity", capacity)
        check_positive_int("local_search_size", local_search_size)
        check_positive_int("local_search_steps", local_search_steps)
        check_positive_int("local_search_every", local_search_every, minimum=0)
        if priority not in _PRIORITIES:
            raise ValueError(f"Expected `priority` in {_PRIORITIES}, actual {priority!r}")
        check_positive_float("rank_weight", rank_weight)
        check_positive_float("step_size", step_size)
        if not (isinstance(target_accept, float) and 0 < target_accept < 1):
            raise ValueError(
                f"Expected `target_accept` to be a float in (0, 1), actual {target_accept!r}"
            )
        self.dtype = dtype or torch.get_default_dtype()
        self.density = (
            log_density
            if isinstance(log_density, TargetDensity)
            else TargetDensity(log_density, dim, dtype=self.dtype)
        )
        if self.density.dim != dim:
            raise ValueError(
                f"Expected `dim` to equal the density's dim {self.density.dim}, actual {dim}"
            )
        check_times(times)
        self.dim = dim
        self.times = times.to(self.dtype)
        self.sigma = sigma
        self.x0 = x0
        self.capacity = capacity
        self.priority = priority
        self.rank_weight = float(rank_weight)
        self.local_search_every = local_search_every
        self.local_search_size = local_search_size
        self.local_search_steps = local_search_steps
        # log(step size), a tensor: adapted inside MALA's loop without host syncs.
        self._log_step_size = torch.tensor(math.log(step_size), dtype=self.dtype)
        self.target_accept = target_accept
        #: MALA's acceptance rate in the last local search (NaN before the first).
        self.acceptance_rate = float("nan")
        self.num_updates = 0
        self.states = torch.empty(0, dim, dtype=self.dtype)
        self.log_densities = torch.empty(0, dtype=self.dtype)

    @property
    def step_size(self) -> float:
        """MALA's current (adapted) step size."""
        return float(self._log_step_size.exp())

    def __len__(self) -> int:
        return self.states.shape[0]

    @torch.no_grad()
    def add(self, states: Tensor, log_densities: Tensor | None = None) -> None:
        """Keep ``states`` ``(M, dim)`` (their log-densities evaluated unless given);
        the oldest states leave beyond ``capacity``."""
        if not (isinstance(states, Tensor) and states.dim() == 2 and states.shape[1] == self.dim):
            raise ValueError(
                f"Expected `states` of shape (M, {self.dim}), actual "
                f"{tuple(states.shape) if isinstance(states, Tensor) else type(states).__name__}"
            )
        states = states.detach().to(self.dtype)
        if log_densities is None:
            log_densities, keep = self.density.evaluate(states)
        else:
            keep = torch.isfinite(log_densities)
        kept = self.states.to(states.device), states[keep]  # the buffer follows the states
        self.states = torch.cat(kept)[-self.capacity :]
        values = self.log_densities.to(states.device), log_densities.to(self.dtype)[keep]
        self.log_densities = torch.cat(values)[-self.capacity :]

    def sample(self, num: int) -> Tensor:
        """``num`` states drawn with replacement by the buffer's priority."""
        check_positive_int("num", num)
        if not len(self):
            raise RuntimeError("ReplayBuffer.sample: the buffer is empty (call add first)")
        if self.priority == "uniform":
            index = torch.randint(len(self), (num,), device=self.states.device)
        else:
            rank = torch.argsort(torch.argsort(self.log_densities, descending=True))
            weight = 1.0 / (self.rank_weight * len(self) + rank.to(self.dtype))
            index = torch.multinomial(weight, num, replacement=True)
        return self.states[index]

    def paths(self, num: int) -> Tensor:
        """``num`` paths ``(num, N, dim)``: the reference's bridge to states drawn by
        :meth:`sample`."""
        return brownian_bridge(self.sample(num), self.times, self.sigma, self.x0)

    @torch.no_grad()
    def local_search(self) -> None:
        """MALA from ``local_search_size`` uniformly drawn states; the results are added."""
        if not len(self):
            return
        index = torch.randint(len(self), (self.local_search_size,), device=self.states.device)
        x = self.states[index]
        value, grad = self.density.value_and_grad(x)
        accepted = torch.zeros((), dtype=self.dtype, device=x.device)
        self._log_step_size = self._log_step_size.to(x.device)
        for _ in range(self.local_search_steps):
            eps = self._log_step_size.exp()
            y = x + eps * grad + (2 * eps).sqrt() * torch.randn_like(x)
            value_y, grad_y = self.density.value_and_grad(y)
            forward = (y - x - eps * grad).square().sum(-1)
            backward = (x - y - eps * grad_y).square().sum(-1)
            log_accept = value_y - value + (forward - backward) / (4 * eps)
            accept = torch.rand_like(log_accept).log() < log_accept
            x = torch.where(accept.unsqueeze(-1), y, x)
            value = torch.where(accept, value_y, value)
            grad = torch.where(accept.unsqueeze(-1), grad_y, grad)
            rate = accept.to(self.dtype).mean()
            accepted = accepted + rate
            self._log_step_size = self._log_step_size + 0.1 * (rate - self.target_accept)
        self.acceptance_rate = float(accepted) / self.local_search_steps
        self.add(x, value)

    def update(self, states: Tensor) -> None:
        """One training step's terminal states: :meth:`add`, then :meth:`local_search`
        every ``local_search_every`` updates."""
        self.add(states)
        self.num_updates += 1
        if self.local_search_every and self.num_updates % self.local_search_every == 0:
            self.local_search()
