r"""Score networks :math:`s_\theta(t, x) \approx \nabla_x \log q_t(x)` and their contract."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .._validation import check_positive_int, shape_of
from ..drift import NeuralDrift

__all__ = ["ScoreNetwork", "check_score"]


class ScoreNetwork(nn.Module):
    r"""The default score network for tabular data: a :class:`~pyro_latdiff.NeuralDrift`
    (MLP with Fourier time features) around the exact score of Gaussian data,

    .. math::

        s_\theta(t, x) = -\frac{x}{v_t} + \frac{\mathrm{net}(t, x / \sqrt{v_t})}{\sigma_t},
        \qquad v_t = a_t^2 v_{\text{data}} + \sigma_t^2,

    with :math:`(a_t, \sigma_t)` the forward process's ``marginal_coefs(t)``. The
    network's output layer starts at zero, so at initialisation :math:`s_\theta` is the
    exact score of :math:`\mathcal N(0, v_{\text{data}} I)` data; the net learns the
    rest, as a noise prediction scaled by :math:`1/\sigma_t` (Song et al. 2021;
    Karras et al. 2022 precondition the same way). Data standardised to unit variance
    suit the default ``data_var = 1``.

    ``t`` is a 0-d tensor or has shape ``(N, 1, ..., 1)`` (``x.dim()`` dimensions), as
    :class:`~pyro_latdiff.LatentDiffusion` passes it; the output has ``x``'s shape.

    Example::

        from pyro_latdiff.score import ScoreNetwork, VariancePreserving
        vp = VariancePreserving()
        score = ScoreNetwork(vp, state_dim=2)
        s = score(torch.tensor(0.5), torch.randn(10, 2))  # = -x at initialisation

    :param process: the forward process (``marginal_coefs``, ``horizon``).
    :param int state_dim: dimension ``D`` of the data.
    :param hidden_dims: widths of the MLP's hidden layers.
    :param int num_frequencies: Fourier time frequencies of the MLP.
    :param float data_var: :math:`v_{\text{data}}`, the data's variance per coordinate.
    """

    def __init__(
        self,
        process,
        state_dim: int,
        *,
        hidden_dims: Sequence[int] = (128, 128),
        num_frequencies: int = 8,
        data_var: float = 1.0,
    ):
        super().__init__()
        check_positive_int("state_dim", state_dim)
        if isinstance(data_var, bool) or not (
            isinstance(data_var, (int, float)) and data_var > 0 and data_var < float("inf")
        ):
            raise ValueError(f"Expected `data_var` to be a positive float, actual {data_var!r}")
        self.process = process
        self.state_dim = state_dim
        self.data_var = float(data_var)
        self.net = NeuralDrift(
            state_dim,
            hidden_dims=hidden_dims,
            num_frequencies=num_frequencies,
            time_span=(0.0, float(process.horizon)),
        )

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        mean_scale, std = self.process.marginal_coefs(t.to(x.dtype))
        var = mean_scale.square() * self.data_var + std.square()
        return -x / var + self.net(t, x / var.sqrt()) / std


def check_score(score, state_dim: int, horizon: float, name: str = "score") -> None:
    """Probe ``score(t, x)`` once, torchsde style: a callable returning a finite tensor of
    ``x``'s shape for ``t`` 0-d, of shape ``(N, 1, 1)`` against ``x`` of shape
    ``(N, B, D)``, and of shape ``(B, 1)`` (one time per point) against ``(B, D)``.

    :raises TypeError: if ``score`` is not callable or returns no tensor.
    :raises ValueError: "Expected `score(t, x)` ..., actual ..." on a wrong shape or a
        non-finite output.
    """
    if not callable(score):
        raise TypeError(
            f"Expected `{name}` to be a callable score(t, x) (an nn.Module), actual type "
            f"{type(score).__name__}"
        )
    dtype = torch.get_default_dtype()
    try:  # follow the module's own dtype and device
        param = next(score.parameters())
        dtype, device = param.dtype, param.device
    except (AttributeError, StopIteration):
        device = None
    t = torch.tensor(0.5 * horizon, dtype=dtype, device=device)
    x = torch.linspace(-1, 1, 3 * state_dim, dtype=dtype, device=device).reshape(3, state_dim)
    probes = [
        (t, x),  # one time for all points (simulation)
        (t.reshape(1, 1, 1).expand(2, 1, 1), x.expand(2, 3, state_dim)),  # log_prob's layout
        (t.expand(3, 1), x),  # one time per point (the continuous-time losses)
    ]
    for tt, xx in probes:
        what = f"`{name}(t, x)` with t of shape {shape_of(tt)}"
        try:
            with torch.no_grad():
                out = score(tt, xx)
        except Exception as error:  # the user's module: say which layout it failed on
            raise ValueError(
                f"Expected {what} and x of shape {shape_of(xx)} to run, actual "
                f"{type(error).__name__}: {error}"
            ) from error
        if not isinstance(out, Tensor):
            raise TypeError(
                f"Expected {what} to return a torch.Tensor, actual {type(out).__name__}"
            )
        if out.shape != xx.shape:
            raise ValueError(
                f"Expected {what} to return a tensor of x's shape {shape_of(xx)} "
                f"(state_dim = {state_dim}), actual shape {shape_of(out)}"
            )
        if not torch.isfinite(out).all():
            raise ValueError(f"Expected {what} to be finite, actual output contains NaN or inf")
