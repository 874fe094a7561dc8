"""One table of bad inputs to the public API and the message each must produce.

(The constructors' own tables in test_distribution.py, test_drift.py and test_fit.py
cover the argument checks of LatentDiffusion, NeuralDrift and fit in more detail.)
"""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_latdiff import DiffusionGuide, LatentDiffusion, NeuralDrift, fit, log_evidence
from pyro_latdiff.sde import GridBrownian, solve

D = torch.float64
TIMES = torch.linspace(0.0, 1.0, 5, dtype=D)
X0 = torch.zeros(1, dtype=D)


def model(y):
    path = pyro.sample("path", LatentDiffusion(lambda t, x: -x, 1.0, X0, TIMES))
    pyro.sample("y", dist.Normal(path[..., -1, :], 0.5).to_event(1), obs=y)


def no_path_model(y):
    pyro.sample("z", dist.Normal(0.0, 1.0))


Y = torch.tensor([0.3], dtype=D)


def make(**change):
    args = dict(drift=lambda t, x: -x, diffusion=1.0, x0=X0, times=TIMES)
    args.update(change)
    return LatentDiffusion(**args)


def guide_on_a_new_grid():
    def gridded(y, times):
        path = pyro.sample("path", LatentDiffusion(lambda t, x: -x, 1.0, X0, times))
        pyro.sample("y", dist.Normal(path[..., -1, :], 0.5).to_event(1), obs=y)

    guide = DiffusionGuide(gridded)
    guide(Y, TIMES)
    guide(Y, TIMES[:3])


TABLE = [
    # (id, call, exception, message)
    (
        "times-int-dtype",
        lambda: make(times=torch.arange(3)),
        ValueError,
        r"`times`.*floating point.*int64",
    ),
    (
        "times-duplicate",
        lambda: make(times=torch.tensor([0.0, 0.5, 0.5], dtype=D)),
        ValueError,
        r"`times`.*strictly increasing",
    ),
    (
        "times-inf",
        lambda: make(times=torch.tensor([0.0, float("inf")], dtype=D)),
        ValueError,
        r"`times`.*finite",
    ),
    (
        "times-meta",
        lambda: make(times=torch.zeros(3, device="meta", dtype=D)),
        ValueError,
        r"`times`.*meta",
    ),
    ("x0-empty", lambda: make(x0=torch.zeros(0, 1, dtype=D)), ValueError, r"`x0`.*non-empty"),
    ("x0-nan", lambda: make(x0=torch.tensor([float("nan")], dtype=D)), ValueError, r"`x0`.*finite"),
    (
        "x0-other-device",
        lambda: make(x0=torch.zeros(1, device="meta", dtype=D)),
        ValueError,
        r"`x0`.*meta",
    ),
    ("x0-float32", lambda: make(x0=torch.zeros(1)), ValueError, r"`x0` and `times`.*dtype"),
    ("diffusion-nan", lambda: make(diffusion=float("nan")), ValueError, r"`diffusion`.*positive"),
    (
        "diffusion-float32-tensor",
        lambda: make(diffusion=torch.ones(1)),
        ValueError,
        r"`diffusion`.*dtype",
    ),
    (
        "drift-not-tensor",
        lambda: make(drift=lambda t, x: 1.0),
        TypeError,
        r"`drift\(times\[0\], x0\)`.*torch.Tensor",
    ),
    (
        # a parameter built in float32 promotes the float64 path silently
        "drift-other-dtype",
        lambda: make(drift=lambda t, x: -torch.ones(1, dtype=torch.float32) * x.float()),
        ValueError,
        r"`drift\(times\[0\], x0\)` to return x's dtype torch.float64, actual torch.float32",
    ),
    (
        "diffusion-other-dtype",
        lambda: make(diffusion=lambda t, x: torch.ones(1, dtype=torch.float32)),
        ValueError,
        r"`diffusion\(times\[0\], x0\)` to return x's dtype torch.float64, actual",
    ),
    (
        # a global latent of shape (num_particles, 1) that the drift multiplies into
        # x0 of shape (series, 1) without a trailing state axis
        "drift-closure-not-broadcasting",
        lambda: make(
            drift=lambda t, x: -torch.ones(16, 1, dtype=D) * x, x0=torch.zeros(20, 1, dtype=D)
        ),
        ValueError,
        r"`drift\(times\[0\], x0\)` to run on x of shape \(20, 1\).*size of tensor.*unsqueeze",
    ),
    (
        "solve-diffusion-closure-not-broadcasting",
        lambda: solve(
            lambda t, x: -x,
            lambda t, x: torch.ones(3, 1, dtype=D) + 0 * x,
            torch.zeros(2, 1, dtype=D),
            TIMES,
        ),
        ValueError,
        r"`diffusion\(times\[0\], x0\)` to run on x of shape \(2, 1\)",
    ),
    ("value-not-tensor", lambda: make().log_prob([0.0]), TypeError, r"`value`.*torch.Tensor"),
    (
        "value-wrong-steps",
        lambda: make().log_prob(torch.zeros(3, 1, dtype=D)),
        ValueError,
        r"`value`.*\(\.\.\., 4, 1\)",
    ),
    ("sample-shape-junk", lambda: make().rsample("ab"), TypeError, r"`sample_shape`"),
    ("sample-shape-negative", lambda: make().rsample((-1,)), ValueError, r"`sample_shape`"),
    (
        "solve-noise-shape",
        lambda: solve(lambda t, x: -x, 1.0, X0, TIMES, torch.zeros(2, 1, dtype=D)),
        ValueError,
        r"`noise`.*\(4, 1\)",
    ),
    ("grid-brownian-2d", lambda: GridBrownian(torch.zeros(3, 2)), ValueError, r"`noise`"),
    (
        "neural-drift-hidden-int",
        lambda: NeuralDrift(2, hidden_dims=64),
        TypeError,
        r"`hidden_dims`",
    ),
    (
        "neural-drift-time-span",
        lambda: NeuralDrift(2, time_span=(0.0, "1")),
        ValueError,
        r"`time_span`",
    ),
    ("guide-model-not-callable", lambda: DiffusionGuide("model"), TypeError, r"`model`"),
    (
        "guide-no-path-site",
        lambda: DiffusionGuide(no_path_model)(Y),
        ValueError,
        r"at least one LatentDiffusion site.*'z'",
    ),
    (
        "guide-model-signature",
        lambda: DiffusionGuide(model)(Y, 3),
        TypeError,
        r"`model` to accept.*2 positional",
    ),
    ("guide-bridge-not-bool", lambda: DiffusionGuide(model, bridge=1), TypeError, r"`bridge`"),
    (
        "guide-init-scale",
        lambda: DiffusionGuide(model, init_scale=0.0),
        ValueError,
        r"`init_scale`",
    ),
    ("guide-name", lambda: DiffusionGuide(model, name=""), ValueError, r"`name`"),
    ("guide-context", lambda: DiffusionGuide(model, context="y"), ValueError, r"`context`"),
    (
        "guide-state-bounds",
        lambda: DiffusionGuide(model, state_bounds=(1.0, -1.0)),
        ValueError,
        r"`state_bounds`.*low < high",
    ),
    ("guide-new-grid", lambda: guide_on_a_new_grid(), ValueError, r"grid of 4 steps.*actual 2"),
    (
        "evidence-num-samples",
        lambda: log_evidence(model, DiffusionGuide(model), Y, num_samples=0),
        ValueError,
        r"`num_samples`",
    ),
    (
        "evidence-chunk",
        lambda: log_evidence(model, DiffusionGuide(model), Y, num_samples=4, chunk_size=-2),
        ValueError,
        r"`chunk_size`",
    ),
    (
        "evidence-plate-nesting",
        lambda: log_evidence(model, DiffusionGuide(model), Y, max_plate_nesting=-1),
        ValueError,
        r"`max_plate_nesting`",
    ),
    (
        "evidence-model-signature",
        lambda: log_evidence(model, DiffusionGuide(model)),
        TypeError,
        r"`model` to accept.*0 positional",
    ),
    (
        "fit-num-steps",
        lambda: fit(model, DiffusionGuide(model), Y, num_steps=-5),
        ValueError,
        r"`num_steps`",
    ),
    (
        "fit-optim",
        lambda: fit(model, DiffusionGuide(model), Y, optim=torch.optim.Adam),
        TypeError,
        r"`optim`.*pyro.optim",
    ),
    ("fit-loss", lambda: fit(model, DiffusionGuide(model), Y, loss="elbo"), TypeError, r"`loss`"),
    (
        "fit-checkpoint",
        lambda: fit(model, DiffusionGuide(model), Y, checkpoint=3),
        TypeError,
        r"`checkpoint`",
    ),
    (
        "fit-progress",
        lambda: fit(model, DiffusionGuide(model), Y, progress="yes"),
        TypeError,
        r"`progress`",
    ),
]


@pytest.mark.parametrize(
    "call, exception, message", [row[1:] for row in TABLE], ids=[row[0] for row in TABLE]
)
def test_bad_input_gets_one_clear_error(call, exception, message):
    with pytest.raises(exception, match=message):
        call()


def test_table_size():
    assert len(TABLE) >= 25
