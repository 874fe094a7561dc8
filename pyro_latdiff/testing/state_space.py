r"""Linear-Gaussian state-space references: paths observed at many times, in closed form.

The Euler–Maruyama chain of a linear SDE with constant (general) noise,

.. math::

    x_{k+1} = x_k + (B x_k + c) h_k + G \sqrt{h_k}\, \xi_k
            = A_k x_k + a_k + \varepsilon_k,
    \qquad A_k = I + B h_k,\ a_k = c h_k,\ \varepsilon_k \sim \mathcal{N}(0, Q_k),
    \ Q_k = h_k G G^\top,

observed at some steps as :math:`y_k = C x_k + \eta_k`, :math:`\eta_k \sim
\mathcal{N}(0, R)`, is a linear-Gaussian state-space model: a Kalman filter gives the
exact log-evidence on the chain, a backward information filter gives the exact
posterior Markov kernel (the target of a backward-filtered guided proposal), and a
global parameter is integrated out by quadrature over a grid of Kalman evidences.

Three references live here:

- :class:`LinearGaussianSSM`: one path, any grid, any subset of observed steps, partial
  observation, general noise; evidence, filtered and smoothed moments, the backward
  filter and the posterior transition kernel.
- :class:`SharedParameterSSM`: a plate of independent series sharing one unknown rate
  ``theta`` (``B = theta B0``) with a log-normal prior; exact posterior of ``theta`` and
  exact ``log p(y)`` by quadrature.
- :class:`EulerMaruyamaExample`: the shape of PyMC's Euler–Maruyama example (1-D OU,
  unknown rate and noise scale, observed at every step); exact posterior by 2-D
  quadrature.

All computations run in the dtype of the problem's tensors (use float64 where
exactness is checked). References: Schauer, van der Meulen & van Zanten (2017),
*Guided proposals for simulating multi-dimensional diffusion bridges*; Mider, Schauer &
van der Meulen (2021), *Continuous-discrete smoothing of diffusions*.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from ..distribution import LatentDiffusion

__all__ = [
    "EulerMaruyamaExample",
    "EulerMaruyamaPosterior",
    "LinearGaussianSSM",
    "ScalarPosterior",
    "SharedParameterSSM",
]

_LOG_TWO_PI = math.log(2 * math.pi)


# --------------------------------------------------------------------------- kernels


def _euler_transitions(B: Tensor, c: Tensor, G: Tensor, times: Tensor):
    """``A (..., N, D, D)``, ``a (..., N, D)``, ``Q (..., N, D, D)`` of the Euler chain of
    ``dX = (B X + c) dt + G dW``; ``B`` may carry leading batch dimensions."""
    h = times.diff()
    eye = torch.eye(B.shape[-1], dtype=B.dtype, device=B.device)
    A = eye + B.unsqueeze(-3) * h[:, None, None]
    a = c.unsqueeze(-2) * h[:, None]
    Q = (G @ G.mT).unsqueeze(-3) * h[:, None, None]
    return A, a, Q


def _symmetrise(P: Tensor) -> Tensor:
    return 0.5 * (P + P.mT)


def _mv(M: Tensor, v: Tensor) -> Tensor:
    return (M @ v.unsqueeze(-1)).squeeze(-1)


def _whiten(C: Tensor, R: Tensor, y: Tensor):
    """``L^{-1} C``, ``L^{-1} y`` and ``log det L`` with ``R = L L^T``: the observation
    ``y = C x + N(0, R)`` as ``Dy`` independent unit-variance scalar observations."""
    L = torch.linalg.cholesky(R)
    Cw = torch.linalg.solve_triangular(L, C, upper=False)
    yw = torch.linalg.solve_triangular(L, y.unsqueeze(-1), upper=False).squeeze(-1)
    return Cw, yw, L.diagonal().log().sum()


def _kalman_filter(A, a, Q, x0, C, R, y, mask):
    """Kalman filter of ``x_{k+1} = A_k x_k + a_k + N(0, Q_k)`` from the point ``x0``,
    with ``y_k = C x_k + N(0, R)`` at the steps ``k = 1..N`` where ``mask[..., k-1]``.

    The observation is whitened and processed one scalar component at a time, so the
    update needs no matrix inverse and vectorises over any batch (a grid of parameter
    values times a plate of series). ``y (..., N, Dy)`` holds finite values (ignored where
    ``mask`` is false).

    :returns: ``log p(y)`` (batch), filtered means ``(..., N, D)`` and covariances
        ``(..., N, D, D)``, predicted means and covariances (the same shapes).
    """
    num_steps, state_dim = A.shape[-3], A.shape[-1]
    Cw, yw, log_det_l = _whiten(C, R, y)
    batch = torch.broadcast_shapes(
        A.shape[:-3], a.shape[:-2], Q.shape[:-3], x0.shape[:-1], yw.shape[:-2], mask.shape[:-1]
    )
    m = x0.expand(batch + (state_dim,))
    P = x0.new_zeros(batch + (state_dim, state_dim))
    log_evidence = x0.new_zeros(batch)
    filtered_m, filtered_P, predicted_m, predicted_P = [], [], [], []
    for k in range(num_steps):
        Ak = A[..., k, :, :]
        m = _mv(Ak, m) + a[..., k, :]
        P = _symmetrise(Ak @ P @ Ak.mT + Q[..., k, :, :])
        predicted_m.append(m)
        predicted_P.append(P)
        observed = mask[..., k]
        if bool(observed.any()):
            m_obs, P_obs = m, P
            increment = x0.new_zeros(batch)
            for i in range(Cw.shape[0]):
                row = Cw[i]
                Pc = P_obs @ row  # (..., D)
                s = (Pc * row).sum(-1) + 1.0
                v = yw[..., k, i] - (m_obs * row).sum(-1)
                increment = increment - 0.5 * (v.square() / s + s.log() + _LOG_TWO_PI)
                m_obs = m_obs + Pc * (v / s).unsqueeze(-1)
                P_obs = _symmetrise(
                    P_obs - Pc.unsqueeze(-1) * Pc.unsqueeze(-2) / s[..., None, None]
                )
            m = torch.where(observed.unsqueeze(-1), m_obs, m)
            P = torch.where(observed[..., None, None], P_obs, P)
            log_evidence = log_evidence + torch.where(observed, increment - log_det_l, 0.0)
        filtered_m.append(m)
        filtered_P.append(P)
    return (
        log_evidence,
        torch.stack(filtered_m, -2),
        torch.stack(filtered_P, -3),
        torch.stack(predicted_m, -2),
        torch.stack(predicted_P, -3),
    )


def _backward_filter(A, a, Q, C, R, y, mask):
    """Backward information filter: ``h_k(x) = p(y_j, j >= k | x_k = x) =
    exp(-x^T H_k x / 2 + F_k^T x + c_k)`` for ``k = 0..N`` (step 0 is never observed).

    One step back through the kernel ``N(x'; A x + a, Q)``, with ``M = I + H Q``:
    ``H~ = M^{-1} H``, ``F~ = M^{-1} F``, ``c~ = c - log det(M) / 2 + F^T Q F~ / 2``, then
    ``H = A^T H~ A``, ``F = A^T (F~ - H~ a)``, ``c = c~ - a^T H~ a / 2 + F~^T a``; an
    observation at step k adds ``C^T R^{-1} C``, ``C^T R^{-1} y_k`` and its constant.
    No covariance is inverted, so singular ``Q`` (fewer noise channels than states) is
    fine.

    :returns: ``H (..., N+1, D, D)``, ``F (..., N+1, D)``, ``c (..., N+1)``.
    """
    num_steps, state_dim = A.shape[-3], A.shape[-1]
    Cw, yw, log_det_l = _whiten(C, R, y)
    batch = torch.broadcast_shapes(
        A.shape[:-3], a.shape[:-2], Q.shape[:-3], yw.shape[:-2], mask.shape[:-1]
    )
    eye = torch.eye(state_dim, dtype=A.dtype, device=A.device)
    info = Cw.mT @ Cw
    obs_const = -log_det_l - 0.5 * Cw.shape[0] * _LOG_TWO_PI

    def observe(k, H, F, c):
        observed = mask[..., k - 1]
        yk = yw[..., k - 1, :]
        H = H + torch.where(observed[..., None, None], info, 0.0)
        F = F + torch.where(observed.unsqueeze(-1), yk @ Cw, 0.0)
        c = c + torch.where(observed, obs_const - 0.5 * yk.square().sum(-1), 0.0)
        return H, F, c

    H = A.new_zeros(batch + (state_dim, state_dim))
    F = A.new_zeros(batch + (state_dim,))
    c = A.new_zeros(batch)
    H, F, c = observe(num_steps, H, F, c)
    Hs, Fs, cs = [H], [F], [c]
    for k in range(num_steps - 1, -1, -1):
        Ak, ak, Qk = A[..., k, :, :], a[..., k, :], Q[..., k, :, :]
        M = eye + H @ Qk
        Ht = _symmetrise(torch.linalg.solve(M, H))
        Ft = torch.linalg.solve(M, F.unsqueeze(-1)).squeeze(-1)
        c = c - 0.5 * torch.linalg.slogdet(M)[1] + 0.5 * (F * _mv(Qk, Ft)).sum(-1)
        c = c - 0.5 * (ak * _mv(Ht, ak)).sum(-1) + (Ft * ak).sum(-1)
        H = _symmetrise(Ak.mT @ Ht @ Ak)
        F = _mv(Ak.mT, Ft - _mv(Ht, ak))
        if k >= 1:
            H, F, c = observe(k, H, F, c)
        Hs.append(H)
        Fs.append(F)
        cs.append(c)
    return torch.stack(Hs[::-1], -3), torch.stack(Fs[::-1], -2), torch.stack(cs[::-1], -1)


def _tilt(mean: Tensor, cov: Tensor, H: Tensor, F: Tensor):
    """Moments of ``N(mean, cov) * exp(-x^T H x / 2 + F^T x)``, renormalised:
    ``cov' = (I + cov H)^{-1} cov``, ``mean' = (I + cov H)^{-1} (mean + cov F)``
    (no inverse of ``cov``, which may be singular)."""
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    M = eye + cov @ H
    new_cov = _symmetrise(torch.linalg.solve(M, cov))
    new_mean = torch.linalg.solve(M, (mean + _mv(cov, F)).unsqueeze(-1)).squeeze(-1)
    return new_mean, new_cov


def _diagonal_or_none(G: Tensor) -> Tensor | None:
    """The positive diagonal of a constant noise matrix, or None if it is not diagonal."""
    if G.dim() != 2 or G.shape[0] != G.shape[1]:
        return None
    diagonal = G.diagonal()
    if torch.count_nonzero(G - torch.diag(diagonal)) or not bool((diagonal != 0).all()):
        return None
    return diagonal.abs()


def _path_distribution(drift, G: Tensor, x0: Tensor, times: Tensor) -> LatentDiffusion:
    """``LatentDiffusion`` with constant noise ``G``: diagonal noise when ``G`` is a
    diagonal matrix (runs on every version), ``noise_type="general"`` otherwise."""
    diagonal = _diagonal_or_none(G)
    if diagonal is not None:
        return LatentDiffusion(drift, diagonal, x0, times)
    if "noise_type" not in inspect.signature(LatentDiffusion).parameters:
        raise NotImplementedError(
            f"Expected a diagonal noise matrix `G` (this LatentDiffusion has diagonal noise "
            f"only), actual G of shape {tuple(G.shape)} that is not diagonal"
        )
    return LatentDiffusion(drift, G, x0, times, noise_type="general")


def _generator(seed: int | torch.Generator | None) -> torch.Generator | None:
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(int(seed))


def _simulate_chain(A, a, G, times, x0, generator):
    """Euler chain ``x_{k+1} = A_k x_k + a_k + G sqrt(h_k) xi_k``, ``x0 (..., D)``."""
    h = times.diff()
    xi = torch.randn(
        (h.shape[0],) + x0.shape[:-1] + (G.shape[-1],),
        generator=generator,
        dtype=x0.dtype,
    )
    x, states = x0, []
    for k in range(h.shape[0]):
        x = _mv(A[..., k, :, :], x) + a[..., k, :] + h[k].sqrt() * _mv(G, xi[k])
        states.append(x)
    return torch.stack(states, -2)


# --------------------------------------------------------------------------- one path


@dataclass
class LinearGaussianSSM:
    r"""The Euler chain of ``dX = (B X + c) dt + G dW`` observed at some steps.

    .. math::

        x_{k+1} = x_k + (B x_k + c)\, h_k + G \sqrt{h_k}\, \xi_k,
        \quad \xi_k \sim \mathcal{N}(0, I_M),\quad k = 0, \dots, N - 1,
        \qquad y_j = C x_{s_j} + \eta_j,\quad \eta_j \sim \mathcal{N}(0, R),

    from ``x_0 = x0`` on ``times = (t_0, ..., t_N)`` (any grid), with ``s_j`` the entries
    of ``obs_steps`` (indices into ``1..N``: state ``x_k`` sits at ``times[k]`` and is
    ``path[k - 1]``). ``R`` is ``obs_cov`` or ``diag(obs_scale^2)`` (give exactly one).

    Site names of :meth:`model`: ``"path"`` (a :class:`~pyro_latdiff.LatentDiffusion`,
    value ``(N, D)``) and the observed ``"y"`` (value ``(num_obs, Dy)``).

    Example::

        ssm = LinearGaussianSSM(B=-torch.eye(2), c=torch.zeros(2), G=torch.eye(2),
                                x0=torch.zeros(2), times=torch.linspace(0, 1, 21),
                                obs_steps=torch.arange(2, 21, 2), C=torch.eye(1, 2),
                                obs_scale=torch.tensor([0.1]))
        path, y = ssm.simulate(0)
        ssm.log_evidence(y)  # exact on the Euler chain

    :param torch.Tensor B: drift matrix ``(D, D)``.
    :param torch.Tensor c: drift offset ``(D,)``.
    :param torch.Tensor G: constant noise matrix ``(D, M)``.
    :param torch.Tensor x0: initial state ``(D,)``.
    :param torch.Tensor times: grid ``(N + 1,)``, strictly increasing.
    :param torch.Tensor obs_steps: strictly increasing step indices in ``1..N``,
        ``(num_obs,)``.
    :param torch.Tensor C: observation matrix ``(Dy, D)``, ``Dy <= D`` allowed.
    :param torch.Tensor obs_scale: observation sd ``(Dy,)`` (diagonal ``R``), or None.
    :param torch.Tensor obs_cov: observation covariance ``R`` ``(Dy, Dy)``, or None.
    """

    B: Tensor
    c: Tensor
    G: Tensor
    x0: Tensor
    times: Tensor
    obs_steps: Tensor
    C: Tensor
    obs_scale: Tensor | None = None
    obs_cov: Tensor | None = None

    def __post_init__(self):
        D, N = self.x0.shape[-1], self.times.shape[0] - 1
        expected = {"B": (D, D), "c": (D,), "x0": (D,), "times": (N + 1,)}
        for name, shape in expected.items():
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(
                    f"Expected `{name}` of shape {shape}, actual {tuple(getattr(self, name).shape)}"
                )
        if self.G.dim() != 2 or self.G.shape[0] != D:
            raise ValueError(f"Expected `G` of shape ({D}, M), actual {tuple(self.G.shape)}")
        if self.C.dim() != 2 or self.C.shape[1] != D:
            raise ValueError(f"Expected `C` of shape (Dy, {D}), actual {tuple(self.C.shape)}")
        steps = self.obs_steps
        if (
            steps.dim() != 1
            or steps.numel() == 0
            or steps.is_floating_point()
            or not bool((steps >= 1).all() and (steps <= N).all())
            or not bool((steps.diff() > 0).all())
        ):
            raise ValueError(
                f"Expected `obs_steps` to be strictly increasing integers in 1..{N}, "
                f"actual {steps.tolist()}"
            )
        if (self.obs_scale is None) == (self.obs_cov is None):
            raise ValueError("Expected exactly one of `obs_scale` and `obs_cov`")
        dy = self.C.shape[0]
        if self.obs_scale is not None and tuple(self.obs_scale.shape) != (dy,):
            raise ValueError(
                f"Expected `obs_scale` of shape ({dy},), actual {tuple(self.obs_scale.shape)}"
            )
        if self.obs_cov is not None and tuple(self.obs_cov.shape) != (dy, dy):
            raise ValueError(
                f"Expected `obs_cov` of shape ({dy}, {dy}), actual {tuple(self.obs_cov.shape)}"
            )

    # -- sizes and pieces

    @property
    def state_dim(self) -> int:
        """State dimension ``D``."""
        return self.x0.shape[-1]

    @property
    def noise_dim(self) -> int:
        """Number ``M`` of Brownian components."""
        return self.G.shape[-1]

    @property
    def obs_dim(self) -> int:
        """Observation dimension ``Dy``."""
        return self.C.shape[0]

    @property
    def num_steps(self) -> int:
        """Number of Euler steps ``N``."""
        return self.times.shape[0] - 1

    @property
    def num_obs(self) -> int:
        """Number of observed steps."""
        return self.obs_steps.shape[0]

    @property
    def obs_index(self) -> Tensor:
        """Indices of the observed states in the path value: ``obs_steps - 1``."""
        return self.obs_steps - 1

    @property
    def R(self) -> Tensor:
        """Observation covariance ``(Dy, Dy)``."""
        return self.obs_cov if self.obs_cov is not None else torch.diag(self.obs_scale.square())

    def obs_mask(self) -> Tensor:
        """Boolean ``(N,)``: which of the states ``x_1..x_N`` are observed."""
        mask = torch.zeros(self.num_steps, dtype=torch.bool, device=self.x0.device)
        mask[self.obs_index] = True
        return mask

    def euler_transitions(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(A, a, Q)`` of the chain ``x_{k+1} = A_k x_k + a_k + N(0, Q_k)``:
        ``A_k = I + B h_k`` ``(N, D, D)``, ``a_k = c h_k`` ``(N, D)``,
        ``Q_k = h_k G G^T`` ``(N, D, D)``."""
        return _euler_transitions(self.B, self.c, self.G, self.times)

    def _full_observations(self, y: Tensor) -> Tensor:
        if tuple(y.shape) != (self.num_obs, self.obs_dim):
            raise ValueError(
                f"Expected `y` of shape ({self.num_obs}, {self.obs_dim}) (num_obs, obs_dim), "
                f"actual {tuple(y.shape)}"
            )
        full = y.new_zeros(self.num_steps, self.obs_dim)
        full[self.obs_index] = y
        return full

    # -- Pyro

    def drift(self, t: Tensor, x: Tensor) -> Tensor:
        """``B x + c`` for ``x`` of any batch shape."""
        return x @ self.B.T + self.c

    def distribution(self) -> LatentDiffusion:
        """The prior path as a :class:`~pyro_latdiff.LatentDiffusion` (diagonal noise
        when ``G`` is diagonal, ``noise_type="general"`` otherwise)."""
        return _path_distribution(self.drift, self.G, self.x0, self.times)

    def observation_distribution(self, path: Tensor) -> dist.TorchDistribution:
        """``p(y | path)``: event shape ``(num_obs, Dy)``."""
        loc = path[..., self.obs_index, :] @ self.C.T
        if self.obs_scale is not None:
            return dist.Normal(loc, self.obs_scale).to_event(2)
        tril = torch.linalg.cholesky(self.obs_cov)
        return dist.MultivariateNormal(loc, scale_tril=tril).to_event(1)

    def model(self, y: Tensor | None = None) -> Tensor:
        """Pyro model: latent site ``"path"`` ``(N, D)``, observed site ``"y"``
        ``(num_obs, Dy)``; returns ``y`` (sampled if not given)."""
        path = pyro.sample("path", self.distribution())
        return pyro.sample("y", self.observation_distribution(path), obs=y)

    def simulate(self, seed: int | torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """One draw of the path ``(N, D)`` and of ``y`` ``(num_obs, Dy)``, with plain
        torch (no torchsde), reproducible from ``seed`` (an int or a generator)."""
        generator = _generator(seed)
        A, a, _ = self.euler_transitions()
        path = _simulate_chain(A, a, self.G, self.times, self.x0, generator)
        noise = torch.randn(self.num_obs, self.obs_dim, generator=generator, dtype=path.dtype)
        y = path[self.obs_index] @ self.C.T + noise @ torch.linalg.cholesky(self.R).T
        return path, y

    # -- exact answers

    def _filter(self, y: Tensor):
        A, a, Q = self.euler_transitions()
        return _kalman_filter(
            A, a, Q, self.x0, self.C, self.R, self._full_observations(y), self.obs_mask()
        )

    def log_evidence(self, y: Tensor) -> Tensor:
        """Exact ``log p(y)`` on the Euler chain (Kalman filter), a 0-d tensor."""
        return self._filter(y)[0]

    def filtered_moments(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Means ``(N, D)`` and covariances ``(N, D, D)`` of ``x_k | y_j, s_j <= k``."""
        return self._filter(y)[1:3]

    def backward_filter(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        r"""The backward information filter ``h_k(x) = p(y_j, s_j \ge k | x_k = x) =
        exp(-x^T H_k x / 2 + F_k^T x + c_k)``, ``k = 0..N`` (it includes the observation
        at step ``k``); ``log p(y) = -x0^T H_0 x0 / 2 + F_0^T x0 + c_0``.

        :returns: ``H (N + 1, D, D)``, ``F (N + 1, D)``, ``c (N + 1,)``.
        """
        A, a, Q = self.euler_transitions()
        return _backward_filter(
            A, a, Q, self.C, self.R, self._full_observations(y), self.obs_mask()
        )

    def smoothed_moments(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """Means ``(N, D)`` and covariances ``(N, D, D)`` of ``x_k | y`` (all
        observations), ``k = 1..N``.

        Two-filter form of the Rauch–Tung–Striebel smoother: the predicted moments of
        the Kalman filter tilted by the backward filter's ``h_k``. It never inverts a
        predicted covariance, which is singular when ``M < D`` (at step 1 always).
        """
        _, _, _, predicted_m, predicted_P = self._filter(y)
        H, F, _ = self.backward_filter(y)
        return _tilt(predicted_m, predicted_P, H[1:], F[1:])

    def posterior_transition(self, k: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The exact posterior kernel ``x_{k+1} | x_k = x, y`` (``k = 0..N-1``): the prior
        Euler kernel ``N(A_k x + a_k, Q_k)`` tilted by ``h_{k+1}`` of
        :meth:`backward_filter`, renormalised,

        ``cov = (I + Q_k H_{k+1})^{-1} Q_k``,
        ``mean = (I + Q_k H_{k+1})^{-1} (A_k x + a_k + Q_k F_{k+1})``.

        :param int k: step index.
        :param torch.Tensor x: state(s) ``(..., D)``.
        :param torch.Tensor y: observations ``(num_obs, Dy)``.
        :returns: mean ``(..., D)`` and covariance ``(D, D)``.
        """
        if not 0 <= k < self.num_steps:
            raise ValueError(f"Expected `k` in 0..{self.num_steps - 1}, actual {k}")
        A, a, Q = self.euler_transitions()
        H, F, _ = self.backward_filter(y)
        mean, cov = _tilt(_mv(A[k], x) + a[k], Q[k], H[k + 1], F[k + 1])
        return mean, cov

    def posterior_kernels(self, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """All posterior kernels at once, as affine-Gaussian steps
        ``x_{k+1} | x_k, y ~ N(M_k x_k + b_k, S_k)``, ``k = 0..N-1``, with
        ``M_k = (I + Q_k H_{k+1})^{-1} A_k``, ``b_k = (I + Q_k H_{k+1})^{-1} (a_k + Q_k
        F_{k+1})`` and ``S_k = (I + Q_k H_{k+1})^{-1} Q_k`` (see
        :meth:`posterior_transition`): what a guide's chain should equal step by step.

        :returns: ``M (N, D, D)``, ``b (N, D)``, ``S (N, D, D)``.
        """
        A, a, Q = self.euler_transitions()
        H, F, _ = self.backward_filter(y)
        eye = torch.eye(self.state_dim, dtype=A.dtype, device=A.device)
        factor = eye + Q @ H[1:]
        M = torch.linalg.solve(factor, A)
        b = torch.linalg.solve(factor, (a + _mv(Q, F[1:])).unsqueeze(-1)).squeeze(-1)
        S = _symmetrise(torch.linalg.solve(factor, Q))
        return M, b, S


# --------------------------------------------------------------------------- quadrature


def _adaptive_grid(log_density, ranges, sizes, grid_size, drop=40.0):
    """A uniform grid (per coordinate) on the box where ``log_density`` is within
    ``drop`` nats of its maximum, found by successively refined scans of ``ranges``.

    :param log_density: ``log_density(*mesh)`` on an ``indexing="ij"`` mesh.
    :returns: the 1-D coordinate tensors and ``log_density`` on their mesh.
    """
    box = list(ranges)
    for size in list(sizes) + [grid_size]:
        axes = [torch.linspace(lo, hi, size, dtype=torch.float64) for lo, hi in box]
        values = log_density(*torch.meshgrid(*axes, indexing="ij"))
        # Far out (an unstable Euler chain) the filter overflows: no mass there.
        values = torch.where(torch.isfinite(values), values, -math.inf)
        if not bool(torch.isfinite(values.max())):
            raise ValueError(f"the log-density is not finite anywhere on the box {box}")
        if size == grid_size:
            return axes, values
        keep = values > values.max() - drop
        box = []
        for d, axis in enumerate(axes):
            others = tuple(i for i in range(len(axes)) if i != d)
            hit = keep.any(dim=others) if others else keep
            index = hit.nonzero().squeeze(-1)
            lo, hi = max(int(index[0]) - 1, 0), min(int(index[-1]) + 1, size - 1)
            box.append((float(axis[lo]), float(axis[hi])))
    raise AssertionError("unreachable")


class ScalarPosterior(NamedTuple):
    """Posterior of one scalar parameter by quadrature.

    :ivar grid: the parameter values ``(G,)``.
    :ivar density: posterior density at ``grid`` (per unit of the parameter).
    :ivar mean: posterior mean (0-d).
    :ivar sd: posterior standard deviation (0-d).
    """

    grid: Tensor
    density: Tensor
    mean: Tensor
    sd: Tensor


@dataclass
class SharedParameterSSM:
    r"""``S`` independent series of a ``D``-dim linear SDE sharing one unknown rate.

    .. math::

        \theta &\sim \mathrm{LogNormal}(\mu_0, s_0), \\
        x^{(i)}_{k+1} &= x^{(i)}_k + (\theta B_0 x^{(i)}_k + c)\, h_k
            + G \sqrt{h_k}\, \xi^{(i)}_k,\quad x^{(i)}_0 = x_0^{(i)}, \\
        y^{(i)}_k &\sim \mathcal{N}(C x^{(i)}_k, \mathrm{diag}(\sigma_y^2))
            \quad\text{at the steps } k \text{ where } \mathrm{obs\_mask}[i, k-1],

    for ``i = 1..S`` (``B_0 = -I`` by default: a ``D``-dim OU with mean-reversion rate
    ``theta``). Each series has its own subset of observed steps; ``y`` is passed as a
    full ``(S, N, Dy)`` tensor whose entries at unobserved steps are ignored (they must be
    finite; :meth:`simulate` sets them to 0).

    Site names of :meth:`model`: ``"theta"`` (scalar), plate ``"series"`` (size ``S``,
    dim -1), ``"path"`` (``(S, N, D)`` in the plate), observed ``"y"`` (``(S, N, Dy)``,
    masked by ``obs_mask``).

    Given ``theta`` every series is a :class:`LinearGaussianSSM`, so ``p(y | theta)`` is
    a product of Kalman evidences, and the posterior of ``theta`` and ``log p(y)`` follow
    by quadrature (:meth:`exact_posterior`, :meth:`log_evidence`).

    Example::

        mask = torch.rand(12, 30) < 0.5  # each series observed at about half the steps
        ssm = SharedParameterSSM(torch.linspace(0, 3, 31), mask, torch.ones(2))
        _, y = ssm.simulate(theta=1.2, seed=0)
        grid, density, mean, sd = ssm.exact_posterior(y)

    :param torch.Tensor times: grid ``(N + 1,)``; its dtype is the problem's.
    :param torch.Tensor obs_mask: boolean ``(S, N)``: ``obs_mask[i, k - 1]`` if ``x_k``
        of series ``i`` is observed.
    :param torch.Tensor x0: initial states ``(D,)`` or ``(S, D)``.
    :param torch.Tensor drift_matrix: ``B_0`` ``(D, D)``; default ``-I``.
    :param torch.Tensor c: drift offset ``(D,)``; default 0.
    :param torch.Tensor G: noise matrix ``(D, M)``; default ``I``.
    :param torch.Tensor C: observation matrix ``(Dy, D)``; default ``I``.
    :param torch.Tensor obs_scale: observation sd ``(Dy,)``; default 0.1.
    :param float prior_loc: ``mu_0``.
    :param float prior_scale: ``s_0``.
    """

    times: Tensor
    obs_mask: Tensor
    x0: Tensor
    drift_matrix: Tensor | None = None
    c: Tensor | None = None
    G: Tensor | None = None
    C: Tensor | None = None
    obs_scale: Tensor | None = None
    prior_loc: float = 0.0
    prior_scale: float = 0.5

    def __post_init__(self):
        D, dtype = self.x0.shape[-1], self.times.dtype
        eye = torch.eye(D, dtype=dtype)
        if self.drift_matrix is None:
            self.drift_matrix = -eye
        if self.c is None:
            self.c = torch.zeros(D, dtype=dtype)
        if self.G is None:
            self.G = eye
        if self.C is None:
            self.C = eye
        if self.obs_scale is None:
            self.obs_scale = torch.full((self.C.shape[0],), 0.1, dtype=dtype)
        N = self.times.shape[0] - 1
        if self.obs_mask.dim() != 2 or self.obs_mask.shape[1] != N:
            raise ValueError(
                f"Expected `obs_mask` of shape (num_series, {N}), actual "
                f"{tuple(self.obs_mask.shape)}"
            )
        if self.obs_mask.dtype != torch.bool:
            raise ValueError(f"Expected `obs_mask` of dtype bool, actual {self.obs_mask.dtype}")
        if self.x0.shape not in (torch.Size((D,)), torch.Size((self.num_series, D))):
            raise ValueError(
                f"Expected `x0` of shape ({D},) or ({self.num_series}, {D}), actual "
                f"{tuple(self.x0.shape)}"
            )

    @property
    def num_series(self) -> int:
        """Number ``S`` of series."""
        return self.obs_mask.shape[0]

    @property
    def num_steps(self) -> int:
        """Number of Euler steps ``N``."""
        return self.times.shape[0] - 1

    @property
    def state_dim(self) -> int:
        """State dimension ``D``."""
        return self.x0.shape[-1]

    @property
    def obs_dim(self) -> int:
        """Observation dimension ``Dy``."""
        return self.C.shape[0]

    def prior(self) -> dist.LogNormal:
        """The prior of ``theta``."""
        loc = torch.tensor(self.prior_loc, dtype=self.times.dtype)
        return dist.LogNormal(loc, self.prior_scale)

    def series(self, theta: float) -> list[LinearGaussianSSM]:
        """The ``S`` series given ``theta``, each a :class:`LinearGaussianSSM` with its
        own ``obs_steps`` (every series needs at least one observed step here)."""
        x0 = self.x0.expand(self.num_series, self.state_dim)
        steps = torch.arange(1, self.num_steps + 1)
        return [
            LinearGaussianSSM(
                B=theta * self.drift_matrix,
                c=self.c,
                G=self.G,
                x0=x0[i],
                times=self.times,
                obs_steps=steps[self.obs_mask[i]],
                C=self.C,
                obs_scale=self.obs_scale,
            )
            for i in range(self.num_series)
        ]

    def _series_x0(self) -> Tensor:
        return self.x0.expand(self.num_series, self.state_dim)

    def model(self, y: Tensor) -> None:
        """Pyro model: ``"theta"``, plate ``"series"``, ``"path"``, observed ``"y"``.

        :param torch.Tensor y: ``(S, N, Dy)``, finite; entries where ``obs_mask`` is
            false are ignored.
        """
        theta = pyro.sample("theta", self.prior())
        rate = theta.unsqueeze(-1)  # (P, 1, 1) under particles: broadcasts over series, state
        drift_matrix, c = self.drift_matrix, self.c

        def drift(t, x):
            return rate * (x @ drift_matrix.T) + c

        with pyro.plate("series", self.num_series):
            path = pyro.sample(
                "path", _path_distribution(drift, self.G, self._series_x0(), self.times)
            )
            obs = dist.Normal(path @ self.C.T, self.obs_scale).mask(self.obs_mask.unsqueeze(-1))
            pyro.sample("y", obs.to_event(2), obs=y)

    def simulate(
        self, theta: float, seed: int | torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """Paths ``(S, N, D)`` and observations ``y`` ``(S, N, Dy)`` (0 where unobserved)
        drawn given ``theta``, with plain torch."""
        generator = _generator(seed)
        A, a, _ = _euler_transitions(theta * self.drift_matrix, self.c, self.G, self.times)
        paths = _simulate_chain(A, a, self.G, self.times, self._series_x0(), generator)
        noise = torch.randn(
            paths.shape[:-1] + (self.obs_dim,), generator=generator, dtype=paths.dtype
        )
        y = paths @ self.C.T + noise * self.obs_scale
        return paths, torch.where(self.obs_mask.unsqueeze(-1), y, 0.0)

    def log_likelihood(self, theta: Tensor, y: Tensor) -> Tensor:
        """``log p(y | theta)`` on the Euler chain (Kalman filters), vectorised over a
        tensor ``theta`` of any shape."""
        B = theta[..., None, None, None] * self.drift_matrix  # (..., 1, D, D): series dim
        A, a, Q = _euler_transitions(B, self.c, self.G, self.times)
        R = torch.diag(self.obs_scale.square())
        log_ev = _kalman_filter(A, a, Q, self._series_x0(), self.C, R, y, self.obs_mask)[0]
        return log_ev.sum(-1)

    def _log_joint_on_log_theta(self, y):
        def log_density(log_theta):
            theta = log_theta.to(self.times.dtype).exp()
            return self.prior().log_prob(theta) + log_theta + self.log_likelihood(theta, y)

        return log_density

    def _grid(self, y, grid_size):
        half = 20.0 * self.prior_scale + 5.0
        ranges = [(self.prior_loc - half, self.prior_loc + half)]
        (log_theta,), log_density = _adaptive_grid(
            self._log_joint_on_log_theta(y), ranges, (801, 201), grid_size
        )
        return log_theta.to(self.times.dtype), log_density

    def exact_posterior(self, y: Tensor, grid_size: int = 256) -> ScalarPosterior:
        """Posterior of ``theta`` by quadrature on a uniform grid in ``log theta``
        placed around the posterior (where it is within 40 nats of its maximum).

        :returns: :class:`ScalarPosterior` ``(grid, density, mean, sd)``.
        """
        log_theta, log_density = self._grid(y, grid_size)
        theta = log_theta.exp()
        weights = torch.softmax(log_density, 0)
        mean = (weights * theta).sum()
        sd = (weights * (theta - mean).square()).sum().sqrt()
        density = weights / (theta * (log_theta[1] - log_theta[0]))
        return ScalarPosterior(theta, density, mean, sd)

    def log_evidence(self, y: Tensor, grid_size: int = 256) -> Tensor:
        """Exact ``log p(y) = log ∫ p(theta) p(y | theta) d theta`` by quadrature."""
        log_theta, log_density = self._grid(y, grid_size)
        return torch.logsumexp(log_density, 0) + (log_theta[1] - log_theta[0]).log()


# --------------------------------------------------------------------------- PyMC shape


class EulerMaruyamaPosterior(NamedTuple):
    """Posterior of ``(l, s)`` by 2-D quadrature.

    :ivar l_grid: values of ``l`` ``(G,)``.
    :ivar s_grid: values of ``s`` ``(G,)``.
    :ivar weights: posterior mass at the grid points ``(G, G)`` (sums to one).
    :ivar density: posterior density per unit of ``(l, s)`` at the grid points ``(G, G)``.
    :ivar l_mean: posterior mean of ``l`` (0-d).
    :ivar l_sd: posterior standard deviation of ``l`` (0-d).
    :ivar s_mean: posterior mean of ``s`` (0-d).
    :ivar s_sd: posterior standard deviation of ``s`` (0-d).
    :ivar log_evidence: exact ``log p(y)`` (0-d).
    """

    l_grid: Tensor
    s_grid: Tensor
    weights: Tensor
    density: Tensor
    l_mean: Tensor
    l_sd: Tensor
    s_mean: Tensor
    s_sd: Tensor
    log_evidence: Tensor


@dataclass
class EulerMaruyamaExample:
    r"""The shape of PyMC's Euler–Maruyama example: a 1-D OU observed at every step.

    .. math::

        l &\sim \mathrm{HalfCauchy}(l_0),\qquad s \sim \mathrm{Uniform}(s_{lo}, s_{hi}), \\
        x_{k+1} &= x_k - l x_k\, \Delta t + s \sqrt{\Delta t}\, \xi_k,\quad x_0 = 0.1, \\
        y_k &\sim \mathcal{N}(x_k, \sigma_y^2),\quad k = 1, \dots, N,

    on the uniform grid ``t_k = k dt`` (``s`` is a standard deviation per unit time).
    PyMC simulated with ``l = 0.78``, ``s = 5e-3``; that ``s`` sits on the lower edge
    of the prior's support, where the posterior of ``s`` piles up against the bound, so
    :meth:`simulate` defaults to ``s = 0.05``, which the data identify.

    Site names of :meth:`model`: ``"l"``, ``"s"``, ``"path"`` (``(N, 1)``) and the
    observed ``"y"`` (``(N,)``, as in PyMC).

    Example::

        example = EulerMaruyamaExample()
        _, y = example.simulate(l=0.6, s=0.08, seed=3)
        exact = example.exact_posterior(y)  # exact.l_mean, exact.l_sd, exact.s_mean, ...

    :param int num_steps: ``N``.
    :param float dt: step.
    :param float x0: initial state.
    :param float obs_scale: ``sigma_y``.
    :param float l_scale: ``l_0``, the HalfCauchy scale.
    :param float s_low: lower bound of ``s``.
    :param float s_high: upper bound of ``s``.
    :param torch.dtype dtype: dtype of every tensor.
    """

    num_steps: int = 200
    dt: float = 0.1
    x0: float = 0.1
    obs_scale: float = 5e-3
    l_scale: float = 1.0
    s_low: float = 0.005
    s_high: float = 0.5
    dtype: torch.dtype = torch.float64

    def __post_init__(self):
        if not (0 < self.s_low < self.s_high):
            raise ValueError(f"Expected 0 < `s_low` < `s_high`, actual {self.s_low}, {self.s_high}")

    @property
    def times(self) -> Tensor:
        """The grid ``(N + 1,)``: ``k dt``."""
        return torch.arange(self.num_steps + 1, dtype=self.dtype) * self.dt

    def _x0(self) -> Tensor:
        return torch.tensor([self.x0], dtype=self.dtype)

    def l_prior(self) -> dist.HalfCauchy:
        """Prior of ``l``."""
        return dist.HalfCauchy(torch.tensor(self.l_scale, dtype=self.dtype))

    def s_prior(self) -> dist.Uniform:
        """Prior of ``s``."""
        low = torch.tensor(self.s_low, dtype=self.dtype)
        return dist.Uniform(low, torch.tensor(self.s_high, dtype=self.dtype))

    def model(self, y: Tensor | None = None) -> Tensor:
        """Pyro model: ``"l"``, ``"s"``, ``"path"`` ``(N, 1)``, observed ``"y"`` ``(N,)``."""
        l = pyro.sample("l", self.l_prior())  # noqa: E741  (PyMC's name)
        s = pyro.sample("s", self.s_prior())
        rate = l.unsqueeze(-1)  # (..., 1): broadcasts over the state dimension

        def drift(t, x):
            return -rate * x

        path = pyro.sample("path", LatentDiffusion(drift, s.unsqueeze(-1), self._x0(), self.times))
        return pyro.sample("y", dist.Normal(path[..., 0], self.obs_scale).to_event(1), obs=y)

    def simulate(
        self,
        l: float = 0.78,  # noqa: E741  (PyMC's name)
        s: float = 0.05,
        seed: int | torch.Generator | None = 0,
    ) -> tuple[Tensor, Tensor]:
        """A path ``(N, 1)`` and observations ``y`` ``(N,)`` given ``l`` and ``s``."""
        generator = _generator(seed)
        B = torch.tensor([[-l]], dtype=self.dtype)
        G = torch.tensor([[s]], dtype=self.dtype)
        A, a, _ = _euler_transitions(B, torch.zeros(1, dtype=self.dtype), G, self.times)
        path = _simulate_chain(A, a, G, self.times, self._x0(), generator)
        noise = torch.randn(self.num_steps, generator=generator, dtype=self.dtype)
        return path, path[:, 0] + self.obs_scale * noise

    def log_likelihood(self, l: Tensor, s: Tensor, y: Tensor) -> Tensor:  # noqa: E741
        """``log p(y | l, s)`` on the Euler chain (Kalman filter), vectorised over ``l``
        and ``s`` of one broadcast shape."""
        shape = torch.broadcast_shapes(l.shape, s.shape)
        B = -l.expand(shape)[..., None, None]
        G = s.expand(shape)[..., None, None]
        A, a, Q = _euler_transitions(B, torch.zeros(1, dtype=self.dtype), G, self.times)
        R = torch.tensor([[self.obs_scale**2]], dtype=self.dtype)
        mask = torch.ones(self.num_steps, dtype=torch.bool)
        return _kalman_filter(
            A, a, Q, self._x0(), torch.eye(1, dtype=self.dtype), R, y.unsqueeze(-1), mask
        )[0]

    def _unconstrained_log_density(self, y):
        width = self.s_high - self.s_low

        def log_density(u_l, u_s):
            u_l, u_s = u_l.to(self.dtype), u_s.to(self.dtype)
            l, s = u_l.exp(), self.s_low + width * torch.sigmoid(u_s)  # noqa: E741
            log_prior = self.l_prior().log_prob(l) + u_l  # d l = l d u_l
            # Uniform density 1 / width times d s / d u_s = width sigmoid (1 - sigmoid).
            log_prior = (
                log_prior - torch.nn.functional.softplus(-u_s) - torch.nn.functional.softplus(u_s)
            )
            return log_prior + self.log_likelihood(l, s, y)

        return log_density

    def exact_posterior(self, y: Tensor, grid_size: int = 128) -> EulerMaruyamaPosterior:
        """Posterior of ``(l, s)`` by quadrature on a ``grid_size x grid_size`` uniform grid
        in the unconstrained coordinates ``(log l, logit((s - s_low) / (s_high - s_low)))``
        (where the density is smooth and vanishes at the ends), placed around the
        posterior by two coarser scans; the path is integrated out exactly by the Kalman
        filter.
        """
        (u_l, u_s), log_density = _adaptive_grid(
            self._unconstrained_log_density(y),
            [(-10.0, 6.0), (-25.0, 25.0)],
            (161, 81),
            grid_size,
        )
        u_l, u_s = u_l.to(self.dtype), u_s.to(self.dtype)
        l_grid = u_l.exp()
        sig = torch.sigmoid(u_s)
        width = self.s_high - self.s_low
        s_grid = self.s_low + width * sig
        du = (u_l[1] - u_l[0]) * (u_s[1] - u_s[0])
        log_evidence = torch.logsumexp(log_density.reshape(-1), 0) + du.log()
        weights = torch.softmax(log_density.reshape(-1), 0).reshape(log_density.shape)
        l_w, s_w = weights.sum(1), weights.sum(0)
        l_mean = (l_w * l_grid).sum()
        s_mean = (s_w * s_grid).sum()
        l_sd = (l_w * (l_grid - l_mean).square()).sum().sqrt()
        s_sd = (s_w * (s_grid - s_mean).square()).sum().sqrt()
        jacobian = l_grid[:, None] * (width * sig * (1 - sig))[None, :]
        density = weights / (du * jacobian)
        return EulerMaruyamaPosterior(
            l_grid, s_grid, weights, density, l_mean, l_sd, s_mean, s_sd, log_evidence
        )
