"""Fuzz: random junk into every public constructor and function.

Each call must either succeed or raise ValueError/TypeError from pyro_latdiff's own
code (the frame that raises is in the package), never an exception from inside
torch, torchsde or Pyro.
"""

import math
import random
import traceback
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_latdiff import DiffusionGuide, LatentDiffusion, NeuralDrift, fit, log_evidence
from pyro_latdiff.sde import GridBrownian, solve
from pyro_latdiff.unbiased import expectation, rmlmc_expectation

PACKAGE = str(Path(__file__).resolve().parent.parent / "pyro_latdiff")
CASES_PER_TARGET = 70
D = torch.float64

JUNK = [
    None,
    "x",
    3,
    -1,
    0,
    1.5,
    -1.0,
    math.nan,
    math.inf,
    True,
    [],
    [1.0, 2.0],
    (2, -3),
    object(),
    torch.tensor(math.nan, dtype=D),
    torch.empty(0, dtype=D),
    torch.zeros(0, 2, dtype=D),
    torch.zeros(2, 3, dtype=torch.int64),
    torch.ones(3, dtype=D),
    torch.ones(2, 2, 2, dtype=D),
    torch.tensor([1.0, math.nan], dtype=D),
    torch.tensor(True),
    torch.ones(2, dtype=torch.cfloat),
    torch.zeros(1, dtype=torch.float32),
    torch.tensor([[0.0, 1.0]], dtype=D),
    torch.tensor([1.0, 0.0], dtype=D),
    torch.zeros(1, device="meta", dtype=D),
    lambda t, x: "not a tensor",
    lambda t, x: torch.zeros(5, dtype=D),
    lambda t, x: x * math.nan,
    lambda t, x: -torch.ones_like(x),
]


def model(y):
    with pyro.plate("series", 2):
        path = pyro.sample(
            "path",
            LatentDiffusion(
                lambda t, x: -x, 1.0, torch.zeros(2, 1, dtype=D), torch.linspace(0, 1, 4, dtype=D)
            ),
        )
        pyro.sample("y", dist.Normal(path[..., -1, 0], 0.5), obs=y)


Y = torch.tensor([0.1, -0.2], dtype=D)
GOOD_GUIDE = None


def good_guide():
    global GOOD_GUIDE
    if GOOD_GUIDE is None:
        GOOD_GUIDE = DiffusionGuide(model, name="fuzz")
    return GOOD_GUIDE


def latent_diffusion(drift, diffusion, x0, times):
    return LatentDiffusion(drift, diffusion, x0, times)


def log_prob(value):
    d = LatentDiffusion(
        lambda t, x: -x, 1.0, torch.zeros(1, dtype=D), torch.linspace(0, 1, 3, dtype=D)
    )
    return d.log_prob(value)


def rsample(sample_shape):
    d = LatentDiffusion(
        lambda t, x: -x, 1.0, torch.zeros(1, dtype=D), torch.linspace(0, 1, 3, dtype=D)
    )
    return d.rsample(sample_shape)


def neural_drift(state_dim, context_dim, hidden_dims, num_frequencies, time_span):
    return NeuralDrift(
        state_dim,
        context_dim=context_dim,
        hidden_dims=hidden_dims,
        num_frequencies=num_frequencies,
        time_span=time_span,
    )


def diffusion_guide(model_, hidden_dims, num_frequencies, context, bridge, init_scale):
    return DiffusionGuide(
        model_,
        hidden_dims=hidden_dims,
        num_frequencies=num_frequencies,
        context=context,
        bridge=bridge,
        init_scale=init_scale,
    )


def evidence(model_, num_samples, chunk_size, max_plate_nesting):
    return log_evidence(
        model_,
        good_guide(),
        Y,
        num_samples=num_samples,
        chunk_size=chunk_size,
        max_plate_nesting=max_plate_nesting,
    )


def fitting(num_steps, num_particles, clip_norm, checkpoint_every, callback, progress):
    return fit(
        model,
        good_guide(),
        Y,
        num_steps=num_steps,
        num_particles=num_particles,
        clip_norm=clip_norm,
        checkpoint_every=checkpoint_every,
        callback=callback,
        progress=progress,
    )


def inference_data(model_, num_samples, num_chains, num_prior_samples, chunk_size):
    from pyro_latdiff import to_inference_data

    return to_inference_data(
        model_,
        good_guide(),
        Y,
        num_samples=num_samples,
        num_chains=num_chains,
        num_prior_samples=num_prior_samples,
        chunk_size=chunk_size,
    )


def calibration(quantities, num_simulations, num_samples, num_steps, guide_fn):
    from pyro_latdiff import calibrate

    return calibrate(
        model,
        Y,
        quantities=quantities,
        num_simulations=num_simulations,
        num_samples=num_samples,
        num_steps=num_steps,
        guide_fn=guide_fn,
    )


def unbiased(fn, drift, x0, t1, sigma, num_samples):
    return expectation(fn, drift, x0, t1, sigma=sigma, num_samples=num_samples)


def rmlmc(fn, drift, x0, t1, sigma, num_samples):
    return rmlmc_expectation(fn, drift, x0, t1, sigma=sigma, num_samples=num_samples)


# target: (function, good arguments)
TARGETS = {
    "LatentDiffusion": (
        latent_diffusion,
        [lambda t, x: -x, 1.0, torch.zeros(1, dtype=D), torch.linspace(0, 1, 3, dtype=D)],
    ),
    "log_prob": (log_prob, [torch.zeros(2, 1, dtype=D)]),
    "rsample": (rsample, [(2,)]),
    "solve": (
        solve,
        [
            lambda t, x: -x,
            1.0,
            torch.zeros(1, dtype=D),
            torch.linspace(0, 1, 3, dtype=D),
            torch.zeros(2, 1, dtype=D),
        ],
    ),
    "GridBrownian": (GridBrownian, [torch.zeros(2, 1, 1, dtype=D)]),
    "NeuralDrift": (neural_drift, [2, 1, (4,), 2, (0.0, 1.0)]),
    "DiffusionGuide": (diffusion_guide, [model, (4,), 2, "auto", True, 0.1]),
    "log_evidence": (evidence, [model, 4, 2, 1]),
    "fit": (fitting, [model, 2, 2, None, 5, None, False]),
    "expectation": (
        unbiased,
        [lambda x: x.cos().sum(-1), lambda t, x: -x, torch.zeros(1, dtype=D), 1.0, 1.0, 16],
    ),
    "rmlmc_expectation": (
        rmlmc,
        [lambda x: x.cos().sum(-1), lambda t, x: -x, torch.zeros(1, dtype=D), 1.0, 1.0, 16],
    ),
}
TARGETS["fit"] = (fitting, TARGETS["fit"][1][1:])
TARGETS["to_inference_data"] = (inference_data, [model, 3, 2, 0, None])
TARGETS["calibrate"] = (calibration, [["path"], 2, 3, 1, DiffusionGuide])


def cases():
    rng = random.Random(0)
    for name, (function, good) in TARGETS.items():
        for i in range(CASES_PER_TARGET):
            args = list(good)
            for position in rng.sample(range(len(good)), rng.randint(1, min(2, len(good)))):
                args[position] = rng.choice(JUNK)
            yield pytest.param(function, args, id=f"{name}-{i}")


def raised_by_package(error: BaseException) -> bool:
    """Raised by our code, or by a junk callable of this file that the package called
    as a user's function (a user's own error is theirs to see)."""
    filename = traceback.extract_tb(error.__traceback__)[-1].filename
    return filename.startswith(PACKAGE) or filename == __file__


@pytest.mark.parametrize("function, args", list(cases()))
def test_junk_gets_our_own_error(function, args):
    try:
        function(*args)
    except (ValueError, TypeError, NotImplementedError) as error:
        assert raised_by_package(error), "".join(traceback.format_exception(error))
    except Exception as error:  # anything else escaped
        pytest.fail("".join(traceback.format_exception(error)))


def test_enough_cases():
    assert len(list(cases())) >= 500
