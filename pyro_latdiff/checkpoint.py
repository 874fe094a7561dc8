"""Checkpointed blocks that keep no autograd graph inside a block.

``torch.utils.checkpoint`` (non-reentrant) drops a block's saved activations but still
records the block's autograd graph: one node, with its saved-variable placeholders,
per operation. For an Euler chain that is tens of nodes per step, and at ``N = 10^4``
steps the graph alone is hundreds of MiB, growing with ``N``. :func:`checkpoint_block`
runs the block without recording anything and stands in for it with one node; the
backward pass recomputes the block with gradients on.

Gradients reach every tensor the block uses, whether it is an argument or captured by
a closure (a network's parameters, a global latent inside a drift, a filter's tables):
the forward run is observed by a :class:`~torch.overrides.TorchFunctionMode`, and
every tensor that requires a gradient and was not made inside the block is an input
of the node. The block must be deterministic (the increments of a path are drawn
before it), as with every checkpoint.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

__all__ = ["checkpoint_block"]


def _tensors(tree):
    """The tensors in nested tuples, lists and dicts."""
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


class _Externals(TorchFunctionMode):
    """Records the tensors that require a gradient and were not made inside the mode
    (made inside: an output of an operation run under the mode)."""

    def __init__(self, arguments: tuple[Tensor, ...]):
        super().__init__()
        self._made: dict[int, weakref.ref] = {}
        self._arguments = {id(t) for t in arguments}
        self.found: dict[int, Tensor] = {}

    def _made_inside(self, tensor: Tensor) -> bool:
        ref = self._made.get(id(tensor))
        return ref is not None and ref() is tensor

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = {} if kwargs is None else kwargs
        for tensor in _arguments(args, kwargs):
            key = id(tensor)
            if (
                tensor.requires_grad
                and key not in self.found
                and key not in self._arguments
                and not self._made_inside(tensor)
            ):
                self.found[key] = tensor
        out = func(*args, **kwargs)
        for tensor in (out,) if isinstance(out, Tensor) else _tensors(out):
            if tensor.requires_grad:  # only these could be mistaken for an input
                self._made[id(tensor)] = weakref.ref(tensor)
        return out


def _arguments(args: tuple, kwargs: dict) -> list[Tensor]:
    """The tensors among an operation's arguments: :func:`_tensors` with the common
    case (tensors and numbers at the top level) first, as it runs for every operation."""
    found = []
    for item in args:
        if isinstance(item, Tensor):
            found.append(item)
        elif _holds_tensors(item):
            found.extend(_tensors(item))
    if kwargs:
        found.extend(_tensors(kwargs))
    return found


def _holds_tensors(item) -> bool:
    """Whether ``item`` is a container that may hold tensors (not a shape)."""
    if isinstance(item, dict):
        return True
    return isinstance(item, (tuple, list)) and not all(type(x) is int for x in item)


def _replace(tree, aliases: dict[int, Tensor]):
    """``tree`` with the tensors whose ids are in ``aliases`` swapped for their alias."""
    if isinstance(tree, Tensor):
        return aliases.get(id(tree), tree)
    if isinstance(tree, (tuple, list)):
        return type(tree)(_replace(item, aliases) for item in tree)
    if isinstance(tree, dict):
        return {key: _replace(item, aliases) for key, item in tree.items()}
    return tree


class _Substitute(TorchFunctionMode):
    """Runs every operation with the tensors of ``aliases`` swapped for their alias, so
    that the recomputed graph ends at the aliases and not in the graph outside."""

    def __init__(self, aliases: dict[int, Tensor]):
        super().__init__()
        self._aliases = aliases

    def __torch_function__(self, func, types, args=(), kwargs=None):
        aliases = self._aliases
        args = tuple(
            aliases.get(id(item), item)
            if isinstance(item, Tensor)
            else _replace(item, aliases)
            if _holds_tensors(item)
            else item
            for item in args
        )
        kwargs = _replace(kwargs, aliases) if kwargs else {}
        return func(*args, **kwargs)


class _Block(torch.autograd.Function):
    @staticmethod
    def forward(ctx, block, *tensors):
        ctx.block = block
        ctx.save_for_backward(*tensors)
        outputs, block.outputs = block.outputs, None  # no cycle through the graph
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        block = ctx.block
        tensors = ctx.saved_tensors
        arguments, externals = tensors[: block.num_arguments], tensors[block.num_arguments :]
        detached = tuple(t.detach().requires_grad_(t.requires_grad) for t in arguments)
        aliases = tuple(t.detach().requires_grad_() for t in externals)
        with torch.enable_grad(), _Substitute(dict(zip(map(id, externals), aliases, strict=True))):
            outputs = block.fn(*detached)
        outputs = (outputs,) if isinstance(outputs, Tensor) else tuple(outputs)
        pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if g is not None]
        pairs = [(o, g) for o, g in pairs if o.requires_grad]
        leaves = detached + aliases
        wanted = [t for t in leaves if t.requires_grad]
        found = iter(())
        if pairs and wanted:
            found = iter(
                torch.autograd.grad(
                    [o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True
                )
            )
        result = [next(found) if t.requires_grad else None for t in leaves]
        return (None, *result)


class _Run:
    def __init__(self, fn, num_arguments, outputs):
        self.fn = fn
        self.num_arguments = num_arguments
        self.outputs = outputs


def checkpoint_block(fn: Callable[..., Tensor | tuple[Tensor, ...]], *arguments: Tensor):
    """``fn(*arguments)`` (a tensor or a tuple of tensors), recorded as one autograd node
    whose backward pass recomputes ``fn`` (see the module docstring).

    With gradients off, or when nothing ``fn`` uses requires a gradient, this is just
    ``fn(*arguments)``. Supports backward passes and :func:`torch.autograd.grad`, not
    gradients of gradients through the block.
    """
    if not torch.is_grad_enabled():
        return fn(*arguments)
    mode = _Externals(arguments)
    with torch.no_grad(), mode:
        outputs = fn(*arguments)
    single = isinstance(outputs, Tensor)
    outputs = (outputs,) if single else tuple(outputs)
    externals = tuple(mode.found.values())
    if not any(t.requires_grad for t in arguments + externals):
        return outputs[0] if single else outputs
    outputs = tuple(o.detach() for o in outputs)
    result = _Block.apply(_Run(fn, len(arguments), outputs), *arguments, *externals)
    return result[0] if single else tuple(result)
