r"""Data-parallel SVI over a plate of series, with :mod:`torch.distributed`.

Each process (rank) holds a shard of the series of one plate, computes the ELBO of its
shard, and the gradients of the global parameters are summed across ranks before every
optimiser step, as in PyTorch's ``DistributedDataParallel``. The sum is weighted so that
the objective is the full-data ELBO whatever the number of processes:

.. math::

    \mathcal L = \sum_{s=1}^{S} \frac{m_s}{M} \mathcal L_s,
    \qquad \mathcal L_s = \frac{M}{m_s} \sum_{i \in s} \ell_i + \ell_{\text{global}},

where shard ``s`` holds ``m_s`` of the ``M`` series and :math:`\mathcal L_s` is the
usual ELBO of a subsampled plate (Pyro scales the plate's sites by ``M / m_s``): the
weighted sum is exactly :math:`\sum_i \ell_i + \ell_{\text{global}}`, the full-data
ELBO, for any partition.

**Random numbers.** The draws of shard ``s`` at step ``t`` come from the torch
generator seeded by ``(seed, t, s)``, whichever process computes the shard. So a run of
``S`` shards on ``S`` processes and a run of the same ``S`` shards in one process
(``num_shards=S``, the shards computed one after the other) use the same random numbers
and give the same parameters (to rounding); and the ELBO of the shards, summed, is the
full-data ELBO evaluated on the same draws. The global random state of each process is
left as it was.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import pyro
import torch
import torch.distributed as torch_dist
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO
from pyro.optim import PyroOptim
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from ._validation import check_positive_int
from .distribution import latent_diffusion_of
from .infer import FitDivergedError

__all__ = ["DataParallelSVI", "destroy_process_group", "init_process_group", "shard_slice"]


def shard_slice(num_items: int, shard: int, num_shards: int) -> slice:
    """The contiguous block of ``range(num_items)`` that shard ``shard`` of
    ``num_shards`` holds; block sizes differ by at most one.

    Example::

        >>> shard_slice(10, 1, 3)
        slice(3, 6, None)

    :param int num_items: number of series ``M``.
    :param int shard: the shard, ``0 <= shard < num_shards``.
    :param int num_shards: number of shards ``S <= M``.
    :rtype: slice
    """
    check_positive_int("num_items", num_items)
    check_positive_int("num_shards", num_shards)
    if num_shards > num_items:
        raise ValueError(f"Expected `num_shards` <= num_items = {num_items}, actual {num_shards}")
    if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < num_shards:
        raise ValueError(f"Expected `shard` in [0, {num_shards}), actual {shard!r}")
    return slice(shard * num_items // num_shards, (shard + 1) * num_items // num_shards)


def init_process_group(backend: str | None = None) -> tuple[int, int]:
    """Join the process group that ``torchrun`` (or any ``env://`` launcher) describes
    in the environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``).

    The backend defaults to NCCL when CUDA is available, else gloo; with NCCL the
    process's CUDA device is set to ``LOCAL_RANK``. Joining twice is a no-op.

    :param str backend: ``"gloo"``, ``"nccl"`` or ``None`` (choose as above).
    :returns: ``(rank, world_size)``.
    """
    if backend not in (None, "gloo", "nccl", "mpi"):
        raise ValueError(
            f"Expected `backend` to be 'gloo', 'nccl', 'mpi' or None, actual {backend!r}"
        )
    if not torch_dist.is_initialized():
        missing = [
            k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ
        ]
        if missing:
            raise ValueError(
                f"Expected the environment variables of an env:// launcher such as torchrun, "
                f"actual: {missing} not set"
            )
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch_dist.init_process_group(backend, init_method="env://")
    return torch_dist.get_rank(), torch_dist.get_world_size()


def destroy_process_group() -> None:
    """Leave the process group :func:`init_process_group` joined, after a barrier.

    Without the barrier a rank that finishes first can tear down its gloo pairs while
    another is still talking to it, and that rank aborts at exit ("terminate called
    without an active exception"). A no-op when no group is initialised.
    """
    if torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def _shard_seed(seed: int, step: int, shard: int) -> int:
    """A seed for the draws of ``shard`` at ``step`` (``step = -1``: initialisation)."""
    return int(np.random.SeedSequence([seed, step + 1, shard]).generate_state(1, np.uint64)[0] >> 1)


def _check_sharded_latents(model_trace, plate: str) -> None:
    """Under the sharded plate, only paths are latent: a guide's per-series parameters
    (a normal site's ``loc`` of the plate's full size) would be indexed by the guide's
    own draw of the plate's indices, not by the shard's series, and trained on another
    series' data, silently."""
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        if latent_diffusion_of(site["fn"]) is not None:
            continue
        if any(frame.name == plate for frame in site["cond_indep_stack"]):
            raise ValueError(
                f"DataParallelSVI: expected the latents under the sharded plate '{plate}' to "
                f"be paths (their guide is amortised), actual site '{name}' is a per-series "
                "latent: its guide's parameters would be read at the guide's own indices of "
                "the plate, not the shard's series; make it part of the path's state, or a "
                "latent outside the plate"
            )


def _subsampled_plates(trace) -> dict[str, tuple[int, int]]:
    """``{name: (size, full_size)}`` of the subsampled plates around the trace's sites."""
    plates = {}
    for site in trace.nodes.values():
        if site["type"] != "sample":
            continue
        for frame in site["cond_indep_stack"]:
            full_size = getattr(frame, "full_size", None)
            if full_size is not None and full_size != frame.size:
                plates[frame.name] = (frame.size, full_size)
    return plates


def _plate_nesting(trace) -> int:
    dims = [
        -frame.dim
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized
    ]
    return max(dims, default=0)


class DataParallelSVI:
    r"""SVI whose ELBO is spread over shards of a plate of series, one shard per process
    of a :mod:`torch.distributed` group (or several shards in one process).

    The model subsamples the plate of series the way Pyro's minibatch SVI does: it is
    given the shard's data and the full number of series, and opens
    ``pyro.plate(name, num_series, subsample_size=len(shard))``, so Pyro scales the
    shard's sites by ``M / m_s``. Sites outside that plate are global. A step computes
    the weighted shard ELBOs (see the module docstring), sums the gradients over the
    group with one ``all_reduce``, and applies one optimiser step on every rank; the
    parameters start from rank 0's and stay equal on all ranks.

    Example (``torchrun --nproc-per-node 2 script.py``)::

        rank, world = init_process_group()              # gloo on CPU, NCCL on GPU

        def model(y, num_series):                       # y: this shard's series
            theta = pyro.sample("theta", dist.LogNormal(0.0, 0.5))
            with pyro.plate("series", num_series, subsample_size=y.shape[0]):
                ...

        def shard_fn(shard, num_shards, y):
            return (y[shard_slice(len(y), shard, num_shards)], len(y)), {}

        svi = DataParallelSVI(model, DiffusionGuide(model), pyro.optim.Adam({"lr": 1e-2}),
                              shard_fn=shard_fn)
        for step in range(1000):
            loss = svi.step(y)                         # the same loss on every rank
        destroy_process_group()                         # barrier, then leave

    :param callable model: Pyro model whose arguments are a shard's data.
    :param callable guide: its guide (e.g. :class:`~pyro_latdiff.DiffusionGuide`); its
        parameters must not depend on the shard (an amortised path guide and global
        latents; a per-series latent outside the path is not supported).
    :param optim: a Pyro optimiser (:mod:`pyro.optim`).
    :param loss: an ELBO with ``differentiable_loss``; ``Trace_ELBO(num_particles=16,
        vectorize_particles=True)`` if omitted.
    :param callable shard_fn: ``shard_fn(shard, num_shards, *args, **kwargs)`` returns
        ``(shard_args, shard_kwargs)``, the model arguments of one shard, from the
        arguments given to :meth:`step`. If omitted, the arguments given to
        :meth:`step` are this process's shard already (one shard per process).
    :param int num_shards: shards computed in this process when no process group is
        initialised (default 1); with a process group, one shard per rank.
    :param int seed: seed of the per-shard, per-step random numbers.
    :param process_group: a :mod:`torch.distributed` group; the default group if
        initialised, else none.
    """

    def __init__(
        self,
        model: Callable,
        guide: Callable,
        optim: PyroOptim,
        loss: ELBO | None = None,
        *,
        shard_fn: Callable | None = None,
        num_shards: int | None = None,
        seed: int = 0,
        process_group=None,
    ):
        for name, value in (("model", model), ("guide", guide)):
            if not callable(value):
                raise TypeError(f"Expected `{name}` to be callable, actual {type(value).__name__}")
        if not isinstance(optim, PyroOptim):
            raise TypeError(
                f"Expected `optim` to be a pyro.optim optimiser, actual {type(optim).__name__}"
            )
        if loss is not None and not hasattr(loss, "differentiable_loss"):
            raise TypeError(
                "Expected `loss` to be a pyro.infer ELBO with differentiable_loss, actual "
                f"{type(loss).__name__}"
            )
        if shard_fn is not None and not callable(shard_fn):
            raise TypeError(
                f"Expected `shard_fn` to be callable or None, actual {type(shard_fn).__name__}"
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Expected `seed` to be an int >= 0, actual {seed!r}")
        distributed = process_group is not None or torch_dist.is_initialized()
        if distributed:
            if num_shards is not None:
                raise ValueError(
                    "Expected `num_shards` = None in a process group (one shard per rank), "
                    f"actual {num_shards!r}"
                )
            self.rank = torch_dist.get_rank(process_group)
            self.num_shards = torch_dist.get_world_size(process_group)
            self._local_shards = [self.rank]
        else:
            num_shards = 1 if num_shards is None else num_shards
            check_positive_int("num_shards", num_shards)
            if num_shards > 1 and shard_fn is None:
                raise ValueError(
                    f"Expected a `shard_fn` to split the data into num_shards = {num_shards} "
                    "shards, actual None"
                )
            self.rank, self.num_shards = 0, num_shards
            self._local_shards = list(range(num_shards))
        self.model = model
        self.guide = guide
        self.optim = optim
        self.loss = Trace_ELBO(num_particles=16, vectorize_particles=True) if loss is None else loss
        self.shard_fn = shard_fn
        self.seed = seed
        self.process_group = process_group
        self.distributed = distributed
        self.num_steps = 0  # steps taken
        self._weights: dict[int, float] | None = None
        self._param_names: list[str] = []
        self._losses: list[float] = []

    def _shard_args(self, shard: int, args, kwargs):
        if self.shard_fn is None:
            return args, kwargs
        out = self.shard_fn(shard, self.num_shards, *args, **kwargs)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)):
            raise ValueError(
                "Expected `shard_fn` to return (args, kwargs), a tuple and a dict, actual "
                f"{type(out).__name__}"
            )
        return tuple(out[0]), out[1]

    def _devices(self) -> list[int]:
        return [torch.cuda.current_device()] if torch.cuda.is_initialized() else []

    def _all_reduce(self, tensor: Tensor) -> None:
        if self.distributed:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM, group=self.process_group)

    def _setup(self, args, kwargs) -> None:
        """Initialise the guide on this process's first shard with the initialisation
        seed, find the shard weights and the plate nesting, check that the shards cover
        the plate, and start every rank from rank 0's parameters."""
        sizes: dict[int, tuple[str | None, int, int]] = {}
        nesting = 0
        for shard in self._local_shards:
            shard_args, shard_kwargs = self._shard_args(shard, args, kwargs)
            with torch.random.fork_rng(devices=self._devices()), poutine.block():
                torch.manual_seed(_shard_seed(self.seed, -1, 0))
                with torch.no_grad():
                    model_trace = poutine.trace(self.model).get_trace(*shard_args, **shard_kwargs)
            nesting = max(nesting, _plate_nesting(model_trace))
            plates = _subsampled_plates(model_trace)
            if len(plates) > 1:
                raise ValueError(
                    "Expected the model to subsample one plate of series, actual subsampled "
                    f"plates {sorted(plates)}"
                )
            if plates:
                ((name, (size, full_size)),) = plates.items()
            else:
                name, size, full_size = None, 1, 1
            sizes[shard] = (name, size, full_size)
        plate_names = {name for name, _, _ in sizes.values()}
        if len(plate_names) > 1:
            raise ValueError(
                "Expected every shard to subsample the same plate, actual "
                f"{sorted(map(str, plate_names))}"
            )
        (plate,) = plate_names
        full_size = next(iter(sizes.values()))[2]
        if len({size for _, size, _ in sizes.values()}) > 1:
            raise ValueError(
                "Expected `shard_fn` to give shards of equal size when one process computes "
                f"several (the guide's plate has one size), actual sizes "
                f"{[sizes[s][1] for s in self._local_shards]}"
            )
        counts = torch.tensor([float(sum(size for _, size, _ in sizes.values())), 1.0])
        if self.distributed and torch_dist.get_backend(self.process_group) == "nccl":
            counts = counts.cuda()
        self._all_reduce(counts)
        covered, ranks = int(counts[0].item()), int(counts[1].item())
        if self.num_shards > 1 and plate is None:
            raise ValueError(
                f"Expected the model to subsample a plate over the {self.num_shards} shards "
                "(pyro.plate(name, num_series, subsample_size=len(shard))), actual no "
                "subsampled plate: each shard's ELBO would count as the full data's"
            )
        if plate is not None and covered != full_size:
            raise ValueError(
                f"Expected the shards given by `shard_fn` to cover plate '{plate}' of size "
                f"{full_size} exactly, actual {covered} series over {ranks} process(es)"
            )
        self._weights = {shard: size / full_size for shard, (_, size, _) in sizes.items()}
        shard_args, shard_kwargs = self._shard_args(self._local_shards[0], args, kwargs)
        with torch.random.fork_rng(devices=self._devices()), poutine.block():
            torch.manual_seed(_shard_seed(self.seed, -1, 0))
            with torch.no_grad(), poutine.trace(param_only=True) as params:
                guide_trace = poutine.trace(self.guide).get_trace(*shard_args, **shard_kwargs)
                model_trace = poutine.trace(
                    poutine.replay(self.model, trace=guide_trace)
                ).get_trace(*shard_args, **shard_kwargs)
        names = set(params.trace.nodes)
        if plate is not None:
            _check_sharded_latents(model_trace, plate)
        nesting = max(nesting, _plate_nesting(guide_trace), _plate_nesting(model_trace))
        if getattr(self.loss, "max_plate_nesting", 0) == float("inf"):
            # As ELBO's own guess (made here once, not on a shard's first step, so that
            # every shard's random numbers are the same in every layout).
            vectorize = getattr(self.loss, "vectorize_particles", False)
            vectorize = vectorize and getattr(self.loss, "num_particles", 1) > 1
            self.loss.max_plate_nesting = nesting + int(vectorize)
        store = pyro.get_param_store()
        self._param_names = sorted(names)
        if self.distributed:  # every rank starts from rank 0's parameters
            for name in self._param_names:
                value = store[name].unconstrained()
                with torch.no_grad():
                    torch_dist.broadcast(value.data, src=0, group=self.process_group)

    def step(self, *args, **kwargs) -> float:
        """One optimiser step on the full-data ELBO.

        :param args: the model arguments (all the data with a ``shard_fn``, this
            process's shard without one).
        :returns: the loss (negative full-data ELBO estimate), the same on every rank.
        :raises FitDivergedError: if the loss or a gradient is not finite (the update
            is then not applied, on any rank).
        """
        if self._weights is None:
            self._setup(args, kwargs)
        total = None
        params: dict[str, Tensor] = {}
        for shard in self._local_shards:
            shard_args, shard_kwargs = self._shard_args(shard, args, kwargs)
            with torch.random.fork_rng(devices=self._devices()):
                torch.manual_seed(_shard_seed(self.seed, self.num_steps, shard))
                with poutine.trace(param_only=True) as capture:
                    loss = self.loss.differentiable_loss(
                        self.model, self.guide, *shard_args, **shard_kwargs
                    )
                weighted = loss * self._weights[shard]
                if isinstance(weighted, Tensor) and weighted.requires_grad:
                    weighted.backward()
            for name, site in capture.trace.nodes.items():
                params[name] = site["value"].unconstrained()
            weighted = torch.as_tensor(weighted).detach()
            total = weighted if total is None else total + weighted
        store = pyro.get_param_store()
        for name in self._param_names:  # parameters not reached by this step's shards
            params.setdefault(name, store[name].unconstrained())
        names = sorted(params)
        tensors = [params[name] for name in names]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in tensors]
        flat = torch.cat([g.reshape(-1) for g in grads] + [total.reshape(1).to(grads[0])])
        self._all_reduce(flat)
        value = float(flat[-1])
        offset = 0
        for p, g in zip(tensors, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).clone()
            offset += n
        bad = [
            name for name, p in zip(names, tensors, strict=True) if not torch.isfinite(p.grad).all()
        ]
        if not math.isfinite(value) or bad:
            pyro.infer.util.zero_grads(set(tensors))
            what = f"the loss is {value}" if not math.isfinite(value) else f"gradients of {bad}"
            raise FitDivergedError(
                f"DataParallelSVI stopped at step {self.num_steps}: {what} not finite; the "
                "update was not applied. Lower the learning rate or refine the time grid.",
                self.num_steps,
                list(self._losses),
            )
        self.optim(tensors)
        pyro.infer.util.zero_grads(set(tensors))
        self.num_steps += 1
        self._losses.append(value)
        return value

    def parameters(self) -> dict[str, Tensor]:
        """The constrained values of the parameters the step trains, by name."""
        store = pyro.get_param_store()
        return {name: store[name].detach().clone() for name in self._param_names}
