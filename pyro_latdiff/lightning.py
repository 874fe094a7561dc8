r"""PyTorch Lightning as the high-level trainer: Pyro's SVI-with-Lightning pattern.

A :class:`~lightning.pytorch.LightningModule` whose ``training_step`` returns the ELBO
loss from ``Trace_ELBO().differentiable_loss(model, guide, *batch)``; Lightning then
does the backward pass, the optimiser step, logging, checkpoints and, with
``strategy="ddp"``, data parallelism (each process sees its batches; DDP averages the
gradients). For the average to be the full-data gradient the model must scale a
minibatch of series to the full data, as Pyro's minibatch SVI does:
``pyro.plate("series", num_series, subsample_size=len(batch))``.

Requires the optional extra: ``pip install "pyro-latdiff[lightning]"``. Only this
module imports Lightning.

Example::

    from pyro_latdiff.lightning import SVIModule

    module = SVIModule(model, guide, y, lr=1e-2)          # y: example arguments
    loader = torch.utils.data.DataLoader([(y,)], batch_size=None)
    trainer = lightning.pytorch.Trainer(max_epochs=1000, logger=False)
    trainer.fit(module, loader)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pyro
import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO
from torch import Tensor, nn

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - exercised only without lightning
    raise ImportError(
        "pyro_latdiff.lightning needs PyTorch Lightning: pip install 'pyro-latdiff[lightning]'"
    ) from error

__all__ = ["SVIModule"]


class SVIModule(pl.LightningModule):
    r"""A LightningModule that trains a Pyro guide (and model parameters) on the ELBO.

    The guide's parameters are created by one run on ``example_args`` and registered as
    this module's parameters (the same tensors as in Pyro's parameter store, so the
    guide keeps working outside Lightning). ``training_step(batch, batch_idx)`` calls
    ``loss.differentiable_loss(model, guide, *batch, **model_kwargs)``: a batch is the
    tuple of the model's positional arguments (a tensor alone counts as one).

    :param callable model: Pyro model.
    :param callable guide: its guide, e.g. :class:`~pyro_latdiff.DiffusionGuide`.
    :param example_args: model arguments to initialise the guide's parameters with.
    :param loss: an ELBO with ``differentiable_loss``; ``Trace_ELBO(num_particles,
        vectorize_particles=True)`` if omitted.
    :param int num_particles: particles of the default loss.
    :param float lr: Adam learning rate.
    :param dict model_kwargs: keyword arguments passed to the model at every step.
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        *example_args,
        loss: ELBO | None = None,
        num_particles: int = 16,
        lr: float = 1e-2,
        model_kwargs: dict | None = None,
    ):
        super().__init__()
        for name, value in (("model", model), ("guide", guide)):
            if not callable(value):
                raise TypeError(f"Expected `{name}` to be callable, actual {type(value).__name__}")
        if loss is not None and not hasattr(loss, "differentiable_loss"):
            raise TypeError(
                "Expected `loss` to be a pyro.infer ELBO with differentiable_loss, actual "
                f"{type(loss).__name__}"
            )
        if (
            isinstance(num_particles, bool)
            or not isinstance(num_particles, int)
            or num_particles < 1
        ):
            raise ValueError(
                f"Expected `num_particles` to be an int >= 1, actual {num_particles!r}"
            )
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise ValueError(f"Expected `lr` to be a positive float, actual {lr!r}")
        if model_kwargs is not None and not isinstance(model_kwargs, dict):
            raise TypeError(
                "Expected `model_kwargs` to be a dict or None, actual "
                f"{type(model_kwargs).__name__}"
            )
        self._fns = (model, guide)  # a tuple: a guide that is an nn.Module stays out
        self.model_kwargs = dict(model_kwargs or {})
        self.lr = float(lr)
        self.loss = (
            Trace_ELBO(num_particles=num_particles, vectorize_particles=True)
            if loss is None
            else loss
        )
        with poutine.block(), torch.no_grad(), poutine.trace(param_only=True) as capture:
            guide_trace = poutine.trace(guide).get_trace(*example_args, **self.model_kwargs)
            poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *example_args, **self.model_kwargs
            )
        store = pyro.get_param_store()
        state = store.get_state()
        self.param_names = sorted(capture.trace.nodes)
        params = {}
        for name in self.param_names:
            value = state["params"][name]
            if not isinstance(value, nn.Parameter):  # the store then holds this Parameter
                value = nn.Parameter(value.detach())
                state["params"][name] = value
            params[name] = value
        store.set_state(state)
        # In the order of param_names (a ParameterDict built from a dict sorts its keys,
        # which would pair "p10" with the third name).
        self.pyro_params = nn.ParameterList([params[name] for name in self.param_names])

    @property
    def model(self) -> Callable:
        return self._fns[0]

    @property
    def guide(self) -> Callable:
        return self._fns[1]

    def training_step(self, batch, batch_idx: int) -> Tensor:
        """The ELBO loss of one batch of model arguments."""
        args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        loss = self.loss.differentiable_loss(self.model, self.guide, *args, **self.model_kwargs)
        self.log("elbo_loss", loss, prog_bar=True, batch_size=1)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)
