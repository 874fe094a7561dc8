r"""Unbiased expectations of diffusion functionals with a random number of layers.

Every Euler-based Monte Carlo estimate of :math:`\mathbb{E}\, g(X_T)` for

.. math::

    dX_t = b(t, X_t)\, dt + \sigma\, dW_t, \qquad X_{t_0} = x_0, \qquad t \in [t_0, t_1],

carries an :math:`O(h)` discretisation bias. This subpackage offers two estimators
whose expectation is the continuous-time value exactly (no bias at all; only a
Monte Carlo error that the returned standard error measures), and the biased
fixed-grid Euler estimator as a baseline. Time is shifted so that ``T = t1 - t0``.
One module per algorithm:

- :mod:`~pyro_latdiff.unbiased.parametrix`: the random-grid forward parametrix
  (:func:`expectation`, :func:`sample_weighted`, :func:`likelihood`), Henry-Labordère,
  Tan & Touzi (2017), on a renewal grid whose inter-arrival law is an
  :class:`ArrivalLaw` (:mod:`~pyro_latdiff.unbiased.arrivals`);
- :mod:`~pyro_latdiff.unbiased.rmlmc`: randomised multilevel Monte Carlo
  (:func:`rmlmc_expectation`), Rhee & Glynn (2015);
- :mod:`~pyro_latdiff.unbiased.euler`: plain Euler (:func:`euler_expectation`), the
  biased baseline;
- :mod:`~pyro_latdiff.unbiased.results`: what they return.

*Choosing.* The default parametrix, ``ExponentialArrivals(rate=1 / (t1 - t0))`` (mean
depth 2), pays off when the drift's Lipschitz constant ``L`` times ``T`` is about 1
or less; ``rate = 2 / (t1 - t0)`` gives lighter tails for more work. For stiffer
drifts (``L T`` of 4 and more) prefer :func:`rmlmc_expectation`. The measurements
behind this advice (variance, depth and tails of each law, MSE against cost) are in
``benchmarks/README.md``, made by ``benchmarks/unbiased.py``.

**Shapes.** ``x0`` is ``batch_shape + (D,)``; each sample is simulated for every
batch element (the random grid is shared across the batch, the Brownian
increments are not). ``drift(t, x)`` receives ``x`` of shape
``(m,) + batch_shape + (D,)`` (``m`` the samples still being simulated) and ``t``
broadcastable to ``x[..., :1]``: shape ``(m,) + (1,) * (len(batch_shape) + 1)``
for the random grid (one time per sample), a 0-d tensor for the Euler grids. It
must return a tensor of ``x``'s shape. ``fn(x)`` (resp. ``log_lik_fn(x)``)
receives states of that shape and returns ``x.shape[:-1] + event_shape``.

**Cost.** One drift evaluation of one sample counts one. The parametrix costs
:math:`N + 1` (its *depth*, the number of Euler steps: :math:`1 + \lambda T` on
average for the exponential law); RMLMC's depth is the number of fine steps.

References:

- P. Henry-Labordère, X. Tan, N. Touzi (2017), *Unbiased simulation of stochastic
  differential equations*, Ann. Appl. Probab. 27(6).
- V. Bally, A. Kohatsu-Higa (2015), *A probabilistic interpretation of the
  parametrix method*, Ann. Appl. Probab. 25(6).
- P. Andersson, A. Kohatsu-Higa (2017), *Unbiased simulation of stochastic
  differential equations using parametrix expansions*, Bernoulli 23(3).
- C.-H. Rhee, P. W. Glynn (2015), *Unbiased estimation with square root
  convergence for SDE models*, Oper. Res. 63(5).
- B. Tzen, M. Raginsky (2019), *Neural stochastic differential equations: deep
  latent Gaussian models in the diffusion limit*, §5.
- A.-M. Lyne et al. (2015), *On Russian roulette estimates for Bayesian inference
  with doubly-intractable likelihoods*, Statist. Sci. 30(4) (signed estimates in
  pseudo-marginal MCMC).

Example::

    >>> import torch
    >>> from pyro_latdiff.unbiased import expectation
    >>> _ = torch.manual_seed(0)
    >>> x0 = torch.tensor([0.5], dtype=torch.float64)
    >>> result = expectation(lambda x: x[..., 0], lambda t, x: torch.tanh(x), x0, 1.0,
    ...                      num_samples=100_000)
    >>> # Beneš SDE: E X_1 = x0 + tanh(x0) = 0.962...
    >>> bool(abs(result.estimate - 0.9621) < 4 * result.stderr)
    True
"""

from .arrivals import ArrivalLaw, ExponentialArrivals, PowerArrivals
from .euler import euler_expectation
from .parametrix import expectation, likelihood, sample_weighted
from .results import Drift as Drift  # the argument types, importable from here as before
from .results import LikelihoodEstimate, UnbiasedEstimate, WeightedSample
from .results import Sigma as Sigma
from .rmlmc import rmlmc_expectation

__all__ = [
    "ArrivalLaw",
    "ExponentialArrivals",
    "LikelihoodEstimate",
    "PowerArrivals",
    "UnbiasedEstimate",
    "WeightedSample",
    "euler_expectation",
    "expectation",
    "likelihood",
    "rmlmc_expectation",
    "sample_weighted",
]
