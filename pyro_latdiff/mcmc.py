r"""MCMC started from a fitted guide: initial points and mass matrices for Pyro's NUTS.

A fitted :class:`~pyro_latdiff.DiffusionGuide` is close to the posterior over the whole
path and the global parameters; Pyro's default start (:func:`init_to_uniform`, every
unconstrained coordinate uniform in (-2, 2)) puts a path far into the tails of its
prior. Starting NUTS from a draw of the guide, and optionally with the guide's
covariance as the inverse mass matrix, shortens the warm-up.

Example::

    guide = DiffusionGuide(model)
    fit(model, guide, y, num_steps=2000)
    kernel = NUTS(model, init_strategy=init_to_guide(guide, y))
    MCMC(kernel, num_samples=500, warmup_steps=200).run(y)

    # several chains, each from its own guide draw, and the guide's covariance:
    kernel = GuidedNUTS(model, inverse_mass_matrix=guide_inverse_mass_matrix(model, guide, y))
    initial = guide_initial_params(model, guide, y, num_chains=2)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from pyro import poutine
from pyro.infer import Predictive
from pyro.infer.autoguide.initialization import init_to_uniform, init_to_value
from pyro.infer.mcmc import NUTS
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import biject_to

from ._validation import check_positive_int, check_signature

__all__ = [
    "GuidedNUTS",
    "guide_initial_params",
    "guide_inverse_mass_matrix",
    "init_to_guide",
]


def _latent_sites(trace) -> dict[str, dict]:
    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
    }


def _guide_draw(model: Callable, guide: Callable, args, kwargs) -> tuple[dict[str, Tensor], dict]:
    """One guide draw of every latent site of the model, and the model's latent sites
    (with their supports) replayed on it."""
    check_signature("model", model, args, kwargs)
    check_signature("guide", guide, args, kwargs)
    with poutine.block(), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
            *args, **kwargs
        )
    latents = _latent_sites(model_trace)
    missing = [name for name in latents if name not in guide_trace.nodes]
    if missing:
        raise ValueError(
            f"Expected `guide` to draw every latent site of the model, actual {missing} missing"
        )
    return {name: guide_trace.nodes[name]["value"].detach() for name in latents}, latents


def init_to_guide(
    guide: Callable, *args, fallback: Callable | None = init_to_uniform, **kwargs
) -> Callable:
    r"""An MCMC init strategy that starts every latent site at one draw of ``guide``.

    ``NUTS(model, init_strategy=init_to_guide(guide, *args))``: the chain's first
    state is the guide's draw (path sites and global parameters together). The draw is
    made once, when this function is called.

    :param callable guide: a fitted guide of the model (e.g.
        :class:`~pyro_latdiff.DiffusionGuide`).
    :param args: the model's arguments (the guide's, as in ``fit``).
    :param callable fallback: init strategy for sites the guide does not draw.
    :returns: an init strategy ``init(site) -> value`` as Pyro's
        :func:`~pyro.infer.autoguide.initialization.init_to_value` builds it.
    """
    check_signature("guide", guide, args, kwargs)
    if fallback is not None and not callable(fallback):
        raise TypeError(f"Expected `fallback` to be callable or None, actual {fallback!r}")
    with poutine.block(), torch.no_grad():
        trace = poutine.trace(guide).get_trace(*args, **kwargs)
    values = {name: site["value"].detach() for name, site in _latent_sites(trace).items()}
    return init_to_value(values=values, fallback=fallback)


def guide_initial_params(
    model: Callable, guide: Callable, *args, num_chains: int = 1, **kwargs
) -> dict[str, Tensor]:
    r"""Independent guide draws in the unconstrained space of Pyro's HMC, one per chain,
    for ``MCMC(kernel, ..., num_chains=num_chains, initial_params=...)``.

    :param int num_chains: number of chains (draws).
    :returns: ``{site: tensor of shape (num_chains,) + unconstrained site shape}``.
    """
    check_positive_int("num_chains", num_chains)
    draws = []
    for _ in range(num_chains):
        values, latents = _guide_draw(model, guide, args, kwargs)
        draws.append(
            {
                name: biject_to(latents[name]["fn"].support).inv(value)
                for name, value in values.items()
            }
        )
    return {name: torch.stack([d[name] for d in draws]) for name in draws[0]}


def guide_inverse_mass_matrix(
    model: Callable,
    guide: Callable,
    *args,
    num_samples: int = 1000,
    full_mass: bool | Sequence[tuple[str, ...]] = False,
    **kwargs,
) -> dict[tuple[str, ...], Tensor]:
    r"""The guide's covariance in HMC's unconstrained space, laid out as Pyro's NUTS
    lays out its inverse mass matrix: a dict from tuples of site names (blocks) to a
    dense ``(d, d)`` matrix, or to a diagonal ``(d,)`` for the remaining sites.

    Estimated from ``num_samples`` vectorised guide draws. Pass it to
    :class:`GuidedNUTS` with the same ``full_mass``.

    :param int num_samples: guide draws for the estimate (``>= 2``).
    :param full_mass: as NUTS's ``full_mass``: ``False`` (diagonal), ``True`` (one dense
        block of all sites) or a list of tuples of site names (dense blocks; the other
        sites diagonal).
    :returns: ``{tuple of site names: inverse mass matrix}``.
    """
    check_positive_int("num_samples", num_samples, minimum=2)
    values, latents = _guide_draw(model, guide, args, kwargs)
    names = sorted(latents)
    if full_mass is False:
        blocks: list[tuple[str, ...]] = []
    elif full_mass is True:
        blocks = [tuple(names)]
    else:
        if not isinstance(full_mass, (list, tuple)) or not all(
            isinstance(b, tuple) and b and all(n in latents for n in b) for b in full_mass
        ):
            raise ValueError(
                "Expected `full_mass` to be a bool or a list of tuples of latent site names "
                f"{names}, actual {full_mass!r}"
            )
        blocks = [tuple(b) for b in full_mass]
    in_blocks = {n for b in blocks for n in b}
    predictive = Predictive(
        model, guide=guide, num_samples=num_samples, parallel=True, return_sites=names
    )
    with torch.no_grad():
        samples = predictive(*args, **kwargs)
    flat = {}
    for name in names:
        value = samples[name].reshape((num_samples,) + values[name].shape)
        unconstrained = biject_to(latents[name]["fn"].support).inv(value)
        flat[name] = unconstrained.reshape(num_samples, -1)
    result: dict[tuple[str, ...], Tensor] = {}
    for block in blocks:
        z = torch.cat([flat[n] for n in block], dim=-1)
        centred = z - z.mean(0)
        cov = centred.T @ centred / (num_samples - 1)
        result[block] = cov + 1e-10 * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    rest = tuple(n for n in names if n not in in_blocks)
    if rest:
        z = torch.cat([flat[n] for n in rest], dim=-1)
        result[rest] = z.var(0).clamp(min=1e-10)
    return result


class GuidedNUTS(NUTS):
    r"""Pyro's :class:`~pyro.infer.mcmc.NUTS` with an initial inverse mass matrix.

    Pyro's NUTS starts from the identity; this kernel starts from
    ``inverse_mass_matrix`` (e.g. :func:`guide_inverse_mass_matrix`) and then finds a
    reasonable step size for it. With ``adapt_mass_matrix=True`` (default) the warm-up
    windows still adapt it (it replaces the identity only until the first window ends);
    with ``adapt_mass_matrix=False`` it is used throughout, which lets a short warm-up
    tune the step size alone.

    :param inverse_mass_matrix: ``{tuple of site names: (d, d) or (d,) tensor}``, with
        the blocks NUTS builds for ``full_mass`` (sorted site names).
    :param kwargs: the arguments of :class:`~pyro.infer.mcmc.NUTS`.
    """

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable | None = None,
        *,
        inverse_mass_matrix: dict[tuple[str, ...], Tensor] | None = None,
        **kwargs,
    ):
        if inverse_mass_matrix is not None and not (
            isinstance(inverse_mass_matrix, dict)
            and all(
                isinstance(k, tuple) and isinstance(v, Tensor)
                for k, v in inverse_mass_matrix.items()
            )
        ):
            raise ValueError(
                "Expected `inverse_mass_matrix` to be a dict from tuples of site names to "
                f"tensors, actual {type(inverse_mass_matrix).__name__}"
            )
        super().__init__(model, potential_fn, **kwargs)
        self._start_inverse_mass_matrix = inverse_mass_matrix

    def setup(self, warmup_steps, *args, **kwargs):
        super().setup(warmup_steps, *args, **kwargs)
        given = self._start_inverse_mass_matrix
        if given is None:
            return
        current = self.inverse_mass_matrix
        expected = {k: tuple(v.shape) for k, v in current.items()}
        actual = {k: tuple(v.shape) for k, v in given.items()}
        if expected != actual:
            raise ValueError(
                f"Expected `inverse_mass_matrix` with blocks {expected} (as full_mass lays "
                f"them out), actual {actual}"
            )
        like = next(iter(current.values()))
        self.mass_matrix_adapter.inverse_mass_matrix = {
            k: v.to(dtype=like.dtype, device=like.device) for k, v in given.items()
        }
        if self._adapter.adapt_step_size:
            self._adapter.reset_step_size_adaptation(self._initial_params)
