"""Neural drifts ``c(t, x, context)`` for controlled diffusions."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ._validation import check_ordered_pair, check_positive_int, check_widths

__all__ = ["NeuralDrift"]


class NeuralDrift(nn.Module):
    r"""A multilayer perceptron ``c(t, x, context)`` with Fourier time features.

    The input is ``[x, sin(pi j tau), cos(pi j tau) for j = 1..F, context]`` with
    ``tau = (t - t_start) / (t_end - t_start)``; the output layer is initialised at
    zero, so a controlled drift ``b + sigma * c`` starts at the prior drift ``b``.

    ``t`` is a 0-d tensor, or has shape ``(N, 1, ..., 1)`` with as many dimensions as
    ``x`` (the layout :class:`~pyro_latdiff.LatentDiffusion` uses in ``log_prob``);
    ``context`` has shape ``(..., context_dim)`` broadcasting with
    ``x.shape[:-1]``. The output has shape ``x.shape[:-1] + (out_dim,)``.

    Example::

        net = NeuralDrift(state_dim=2, context_dim=1)
        c = net(torch.tensor(0.5), torch.randn(10, 2), torch.randn(10, 1))  # zeros

    :param int state_dim: dimension ``D`` of ``x``.
    :param int context_dim: dimension of ``context`` (0 for none).
    :param int out_dim: output dimension, ``state_dim`` by default.
    :param hidden_dims: widths of the hidden layers.
    :param int num_frequencies: number ``F`` of Fourier time frequencies.
    :param time_span: ``(t_start, t_end)`` mapped to ``tau`` in ``[0, 1]``.
    """

    def __init__(
        self,
        state_dim: int,
        *,
        context_dim: int = 0,
        out_dim: int | None = None,
        hidden_dims: Sequence[int] = (64, 64),
        num_frequencies: int = 4,
        time_span: tuple[float, float] = (0.0, 1.0),
    ):
        super().__init__()
        check_positive_int("state_dim", state_dim)
        check_positive_int("context_dim", context_dim, minimum=0)
        check_positive_int("num_frequencies", num_frequencies, minimum=0)
        out_dim = state_dim if out_dim is None else out_dim
        check_positive_int("out_dim", out_dim)
        check_widths(hidden_dims)
        t_start, t_end = check_ordered_pair("time_span", time_span, "(t_start, t_end)")
        self.state_dim = state_dim
        self.context_dim = context_dim
        self.out_dim = out_dim
        self.time_span = (t_start, t_end)
        self.register_buffer(
            "frequencies", math.pi * torch.arange(1, num_frequencies + 1, dtype=torch.float)
        )
        # The first layer acts on [x, time features, context]; it is split into three
        # maps whose outputs broadcast, so no input is expanded or concatenated.
        widths = [*hidden_dims, out_dim]
        sizes = [state_dim, 2 * num_frequencies, context_dim]
        first = nn.Linear(sum(sizes), widths[0])  # initialised as one layer on the whole input
        self.input_x = nn.Linear(state_dim, widths[0])
        self.input_time = nn.Linear(sizes[1], widths[0], bias=False) if sizes[1] else None
        self.input_context = nn.Linear(context_dim, widths[0], bias=False) if context_dim else None
        with torch.no_grad():
            self.input_x.bias.copy_(first.bias)
            parts = (self.input_x, self.input_time, self.input_context)
            for part, weight in zip(parts, first.weight.split(sizes, 1), strict=True):
                if part is not None:
                    part.weight.copy_(weight)
        layers: list[nn.Module] = []
        for w_in, w_out in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.SiLU(), nn.Linear(w_in, w_out)]
        self.hidden = nn.Sequential(*layers)
        for module in layers[-1:] or parts:  # zero output layer: c = 0 at initialisation
            for param in [] if module is None else module.parameters():
                nn.init.zeros_(param)

    def time_features(self, t: Tensor) -> Tensor:
        """Fourier features of ``t``, shape ``t.shape + (2F,)``."""
        t_start, t_end = self.time_span
        tau = (t - t_start) / (t_end - t_start)
        angles = tau.unsqueeze(-1) * self.frequencies.to(tau.dtype)
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    def forward(self, t: Tensor, x: Tensor, context: Tensor | None = None) -> Tensor:
        if t.dim():
            t = t[..., 0]  # drop the state axis of (N, 1, ..., 1)
        hidden = self.input_x(x)
        if self.input_time is not None:
            hidden = hidden + self.input_time(self.time_features(t.to(x.dtype)))
        if self.context_dim:
            if context is None:
                raise ValueError(
                    f"Expected `context` of shape (..., {self.context_dim}), actual None"
                )
            hidden = hidden + self.input_context(context)
        return self.hidden(hidden)

    def on_grid(
        self, times: Tensor, context: Tensor | None = None, tables: Sequence[Tensor] = ()
    ) -> Callable[[int, Tensor], Tensor | tuple[Tensor, tuple[Tensor, ...]]]:
        """``c(times[k], x, context)`` as ``step(k, x)``, for one simulation on a grid.

        The time and context parts of the first layer are computed once for the whole
        grid instead of at every Euler step, and split into rows once; ``step(k, x)``,
        with ``k`` the step index (an ``int``), equals ``self(times[k], x, context)``.

        :param tables: per-step tables ``(N, width)`` of the caller (e.g. per-step
            terms added to the network's output), split into rows with the network's
            own; then ``step(k, x)`` returns ``(output, (table[k], ...))``.
        """
        if self.context_dim and context is None:
            raise ValueError(f"Expected `context` of shape (..., {self.context_dim}), actual None")
        weight, bias = self.input_x.weight, self.input_x.bias
        rows = bias.expand(times.shape + bias.shape)  # the bias of the first layer, per step
        if self.input_time is not None:
            rows = rows + self.input_time(self.time_features(times.to(bias.dtype)))
        rows = rows.unbind(0)
        table_rows = list(zip(*(table.unbind(0) for table in tables), strict=True))  # per step
        shift = None if not self.context_dim else self.input_context(context)

        def step(k: int, x: Tensor):
            hidden = nn.functional.linear(x, weight, rows[k])
            if shift is not None:
                hidden = hidden + shift
            out = self.hidden(hidden)
            return (out, table_rows[k]) if tables else out

        return step
