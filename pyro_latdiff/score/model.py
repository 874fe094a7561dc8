r"""A score-based diffusion model as a Pyro model with a latent diffusion path.

Huang, Lim & Courville (2021) observe that the plug-in reverse SDE of a score-based
model is a latent-diffusion model. On the forward grid :math:`0 = t_0 < \dots < t_N =
T`, written in the model's own time :math:`u = T - t` (so :math:`u_j = T - t_{N-j}`):

- **model** (:func:`score_model`): the noise :math:`y_0` is drawn from the forward
  process's limit law (site ``"noise"``); the reverse Euler chain

  .. math::

      y_{j+1} = y_j + \big(g(t)^2 s_\theta(t, y_j) - f(t)\, y_j\big) h_j
      + g(t) \sqrt{h_j}\, \xi_j, \qquad t = T - u_j,

  runs for :math:`N - 1` steps as a :class:`~pyro_latdiff.LatentDiffusion` (site
  ``"path"``), and its last step *observes* the data point (site ``"x"``);
- **guide** (:func:`noising_guide`): the forward noising chain from the data,
  :class:`ForwardNoising`, exact in its Gaussian transitions and presented in the
  model's time order. It has no parameters; the chain is drawn once as an auxiliary
  site and its pieces fill ``"noise"`` and ``"path"``, so the guide's density is the
  product of the forward transitions.

Both run inside ``pyro.plate("data", len(data), subsample_size=...)``, so
``SVI(model, guide, optim, Trace_ELBO())`` is maximum-ELBO training with minibatches.
The ELBO that Trace_ELBO estimates is **exactly that of the Euler chain**:

.. math::

    \log p_\theta(x) \ge \mathbb E_q\Big[\log p(y_0) + \sum_j \log
    p_\theta(y_{j+1} \mid y_j) - \sum_k \log q(x_{t_{k+1}} \mid x_{t_k})\Big].

As the grid is refined (:math:`h \to 0`, :math:`t_1 \to 0`) this discrete ELBO
converges to Huang et al.'s continuous-time ELBO
:math:`\mathbb E[\log p_T(Y_T) - \int_0^T (\tfrac12 g^2 |s_\theta|^2 + \nabla\cdot(g^2
s_\theta - f x))\, dt]` (:class:`~pyro_latdiff.score.ContinuousTimeELBO`): the Euler
chain's Gaussian log-ratios are the discretised Girsanov terms, and the last step's
observation density tends to a point mass. For a finite grid the Euler chain is a
model of its own and its ELBO has an :math:`O(h)` gap to the continuous one; the
tests measure it.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from .._validation import check_positive_int, check_provides, check_times, shape_of
from ..distribution import LatentDiffusion
from .network import ScoreNetwork, check_score
from .noising import ForwardNoising

__all__ = ["ScoreModel", "check_data", "noising_guide", "reverse_drift", "score_model"]


def reverse_drift(process, score: Callable[[Tensor, Tensor], Tensor]):
    r"""The reverse-time drift in model time, :math:`b(u, y) = g(t)^2 s(t, y) - f(t) y`
    with :math:`t = T - u`, as ``drift(u, y)`` for :class:`~pyro_latdiff.LatentDiffusion`
    (``u`` 0-d or ``(N, 1, ..., 1)``)."""
    horizon = process.horizon

    def drift(u: Tensor, y: Tensor) -> Tensor:
        t = horizon - u
        return process.diffusion_coef(t).square() * score(t, y) - process.drift_coef(t) * y

    return drift


def _reverse_diffusion(process):
    horizon = process.horizon

    def diffusion(u: Tensor, y: Tensor) -> Tensor:
        return process.diffusion_coef(horizon - u).expand(y.shape)

    return diffusion


def _plate(data: Tensor, subsample_size: int | None):
    n = data.shape[0]
    size = None if subsample_size is None or subsample_size >= n else subsample_size
    return pyro.plate("data", n, subsample_size=size)


def score_model(
    data: Tensor,
    process,
    score: Callable[[Tensor, Tensor], Tensor],
    times: Tensor,
    subsample_size: int | None = None,
) -> Tensor:
    """The reverse chain whose last step observes each data point (see the module).

    :param torch.Tensor data: ``(num_data, D)``.
    :param process: the forward process.
    :param score: ``score(t, x)``, e.g. a :class:`ScoreNetwork`; an ``nn.Module`` is
        registered with ``pyro.module("score", ...)``.
    :param torch.Tensor times: the forward grid ``0 <= t_0 < ... < t_N = T``, ``N >= 2``.
    :param int subsample_size: minibatch size of the data plate (all if ``None``).
    :returns: the last state of the latent path, ``(batch, D)``.
    """
    if isinstance(score, nn.Module):
        pyro.module("score", score)
    u = process.horizon - times.flip(0)  # model time, 0 = T - t_N, ..., T - t_0
    drift = reverse_drift(process, score)
    diffusion = _reverse_diffusion(process)
    with _plate(data, subsample_size) as index:
        x = data[index]
        noise = pyro.sample("noise", process.prior(x.shape, dtype=x.dtype, device=x.device))
        path = pyro.sample("path", LatentDiffusion(drift, diffusion, noise, u[:-1]))
        last = path[..., -1, :]
        h = u[-1] - u[-2]
        loc = last + drift(u[-2], last) * h
        scale = diffusion(u[-2], last) * h.sqrt()
        pyro.sample("x", dist.Normal(loc, scale).to_event(1), obs=x)
    return last


def noising_guide(
    data: Tensor, process, times: Tensor, subsample_size: int | None = None
) -> Tensor:
    """The forward noising chain from each data point, in model time order (see the
    module). Arguments as :func:`score_model`; returns the chain ``(batch, N, D)``."""
    with _plate(data, subsample_size) as index:
        x = data[index]
        chain = pyro.sample(
            "forward_chain", ForwardNoising(process, x, times), infer={"is_auxiliary": True}
        )
        pyro.sample("noise", dist.Delta(chain[..., 0, :], event_dim=1))
        pyro.sample("path", dist.Delta(chain[..., 1:, :], event_dim=2))
    return chain


def check_data(data, state_dim: int, name: str = "data") -> None:
    """``data`` is a finite ``(num_data >= 1, state_dim)`` floating point tensor."""
    if not isinstance(data, Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor, actual {type(data).__name__}")
    if data.dim() != 2 or data.shape[1] != state_dim:
        raise ValueError(
            f"Expected `{name}` of shape (num_data, {state_dim}) (state_dim = {state_dim}), "
            f"actual shape {shape_of(data)}"
        )
    if data.shape[0] == 0:
        raise ValueError(
            f"Expected `{name}` to hold at least one point, actual shape (0, {state_dim})"
        )
    if not data.is_floating_point():
        raise ValueError(f"Expected `{name}` to be floating point, actual dtype {data.dtype}")
    if not torch.isfinite(data).all():
        bad = (~torch.isfinite(data)).any(1).nonzero()[:, 0]
        raise ValueError(
            f"Expected `{name}` to be finite, actual {bad.numel()} rows with NaN or inf "
            f"(first: row {int(bad[0])})"
        )


class ScoreModel:
    r"""A score-based generative model for tabular data, trained through its ELBO.

    A thin shell over :func:`score_model` and :func:`noising_guide`: it holds the forward
    process, the score network, the grid and the minibatch size, and checks the data
    once per call.

    Example::

        import pyro
        from pyro_latdiff import fit
        from pyro_latdiff.score import ScoreModel, VariancePreserving

        sm = ScoreModel(VariancePreserving(), state_dim=2, num_steps=100, subsample_size=256)
        losses = fit(sm.model, sm.guide, data, num_steps=2000, num_particles=1)
        samples = sm.sample(1000)

    :param process: a scalar-coefficient linear forward process
        (:mod:`~pyro_latdiff.score.forward`).
    :param int state_dim: dimension ``D`` of the data.
    :param score: ``score(t, x)``, any ``nn.Module`` (checked once: x's shape, finite);
        a :class:`ScoreNetwork` if omitted.
    :param int num_steps: number ``N`` of steps of the uniform grid on
        ``[0, T]`` (ignored if ``times`` is given).
    :param torch.Tensor times: a forward grid ``0 <= t_0 < ... < t_N = T`` of your own,
        e.g. finer near 0.
    :param int subsample_size: minibatch size of the data plate (all data if ``None``).
    :param score_kwargs: keyword arguments of the default :class:`ScoreNetwork`.
    """

    def __init__(
        self,
        process,
        state_dim: int,
        *,
        score: nn.Module | None = None,
        num_steps: int = 100,
        times: Tensor | None = None,
        subsample_size: int | None = None,
        **score_kwargs,
    ):
        check_positive_int("state_dim", state_dim)
        check_positive_int("num_steps", num_steps, minimum=2)
        if subsample_size is not None:
            check_positive_int("subsample_size", subsample_size)
        check_provides(
            "process",
            process,
            ("transition_coefs", "marginal_coefs", "drift_coef", "diffusion_coef"),
            TypeError,
        )
        horizon = float(process.horizon)
        if times is None:
            times = torch.linspace(0.0, horizon, num_steps + 1)
        else:
            check_times(times)
            if times.shape[0] < 3:
                raise ValueError(
                    f"Expected `times` of at least 3 points, actual shape {shape_of(times)}"
                )
            if float(times[0]) < 0 or abs(float(times[-1]) - horizon) > 1e-6 * horizon:
                raise ValueError(
                    f"Expected `times` from t_0 >= 0 to the horizon {horizon}, actual "
                    f"[{float(times[0])}, {float(times[-1])}]"
                )
        if score is None:
            score = ScoreNetwork(process, state_dim, **score_kwargs)
        elif score_kwargs:
            raise TypeError(
                f"Expected no score keyword arguments with a given `score`, actual "
                f"{sorted(score_kwargs)}"
            )
        check_score(score, state_dim, horizon)
        self.process = process
        self.state_dim = state_dim
        self.score = score
        self.times = times
        self.subsample_size = subsample_size

    @property
    def num_steps(self) -> int:
        return self.times.shape[0] - 1

    def check_data(self, data) -> None:
        """:func:`check_data`, and ``data`` has the score network's dtype."""
        check_data(data, self.state_dim)
        if isinstance(self.score, nn.Module):
            param = next(self.score.parameters(), None)
            if param is not None and param.dtype != data.dtype:
                raise ValueError(
                    f"Expected `data` of dtype {param.dtype} (the score network's), actual "
                    f"{data.dtype}"
                )

    def _times_like(self, data: Tensor) -> Tensor:
        return self.times.to(dtype=data.dtype, device=data.device)

    def model(self, data: Tensor) -> Tensor:
        """:func:`score_model` on ``data`` with this model's process, score, grid and
        minibatch size."""
        self.check_data(data)
        return score_model(
            data, self.process, self.score, self._times_like(data), self.subsample_size
        )

    def guide(self, data: Tensor) -> Tensor:
        """:func:`noising_guide` on ``data``."""
        self.check_data(data)
        return noising_guide(data, self.process, self._times_like(data), self.subsample_size)

    def full_model(self, data: Tensor) -> Tensor:
        """:meth:`model` on all of ``data`` at once (no subsampling), for evaluation."""
        self.check_data(data)
        return score_model(data, self.process, self.score, self._times_like(data))

    def full_guide(self, data: Tensor) -> Tensor:
        """:meth:`guide` on all of ``data`` at once (no subsampling)."""
        self.check_data(data)
        return noising_guide(data, self.process, self._times_like(data))

    @torch.no_grad()
    def sample(self, num_samples: int, *, mean: bool = True) -> Tensor:
        r"""Draw from the model: the reverse chain from the prior, then its last step.

        :param int num_samples: how many points.
        :param bool mean: return the last step's mean (the usual denoised output) rather
            than a draw of its Gaussian observation density.
        :returns: ``(num_samples, D)``.
        """
        check_positive_int("num_samples", num_samples)
        params = self.score.parameters() if isinstance(self.score, nn.Module) else iter(())
        dtype = next(params, torch.empty(0)).dtype
        placeholder = torch.zeros(num_samples, self.state_dim, dtype=dtype)
        with pyro.poutine.block():
            trace = pyro.poutine.trace(pyro.poutine.uncondition(self.full_model)).get_trace(
                placeholder
            )
        site = trace.nodes["x"]
        return site["fn"].mean if mean else site["value"]
