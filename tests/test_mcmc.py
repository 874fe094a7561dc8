"""NUTS started from a guide draw, with the guide's covariance as mass matrix."""

import pyro
import pytest
import torch
from pyro.infer import MCMC, NUTS
from torch.distributions import biject_to, constraints

from pyro_latdiff import DiffusionGuide, fit
from pyro_latdiff.mcmc import (
    GuidedNUTS,
    guide_initial_params,
    guide_inverse_mass_matrix,
    init_to_guide,
)
from pyro_latdiff.testing import SharedRateOU


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)


@pytest.fixture
def fitted():
    problem = SharedRateOU(torch.linspace(0.0, 1.0, 9))
    y = torch.tensor([0.4, -0.3, 0.9])
    guide = DiffusionGuide(problem.model, hidden_dims=(8,))
    fit(problem.model, guide, y, num_steps=5, num_particles=4, progress=False)
    return problem, y, guide


def test_nuts_starts_at_the_guide_draw(fitted):
    problem, y, guide = fitted
    strategy = init_to_guide(guide, y)
    values = strategy.keywords["values"]
    assert set(values) == {"theta", "path"}
    kernel = NUTS(problem.model, init_strategy=strategy)
    kernel.setup(0, y)
    for name, value in values.items():
        support = constraints.positive if name == "theta" else constraints.real
        expected = biject_to(support).inv(value)
        assert torch.allclose(kernel.initial_params[name], expected, rtol=1e-12, atol=1e-12)


def test_first_sample_equals_the_guide_draw(fitted):
    """With a negligible step (1e-9) and one tree level, the first NUTS sample is the
    chain's first state: the guide draw."""
    problem, y, guide = fitted
    strategy = init_to_guide(guide, y)
    kernel = NUTS(
        problem.model,
        init_strategy=strategy,
        step_size=1e-9,
        adapt_step_size=False,
        max_tree_depth=1,
    )
    mcmc = MCMC(kernel, num_samples=1, warmup_steps=0, disable_progbar=True)
    mcmc.run(y)
    samples = mcmc.get_samples()
    for name, value in strategy.keywords["values"].items():
        assert torch.allclose(samples[name][0], value, atol=1e-6), name


def test_guided_nuts_uses_the_guide_mass_matrix_and_samples(fitted):
    problem, y, guide = fitted
    pyro.set_rng_seed(1)
    matrix = guide_inverse_mass_matrix(problem.model, guide, y, num_samples=200)
    ((block, diagonal),) = matrix.items()
    assert block == ("path", "theta") and diagonal.shape == (3 * 8 + 1,)
    assert (diagonal > 0).all()
    pyro.set_rng_seed(1)  # the same draws
    dense = guide_inverse_mass_matrix(problem.model, guide, y, num_samples=200, full_mass=True)
    assert dense[block].shape == (25, 25)
    assert torch.allclose(dense[block].diagonal(), diagonal, rtol=1e-6)
    kernel = GuidedNUTS(
        problem.model,
        init_strategy=init_to_guide(guide, y),
        inverse_mass_matrix=matrix,
        adapt_mass_matrix=False,
    )
    mcmc = MCMC(kernel, num_samples=5, warmup_steps=5, disable_progbar=True)
    mcmc.run(y)
    assert torch.equal(kernel.inverse_mass_matrix[block], matrix[block])
    assert mcmc.get_samples()["theta"].shape == (5,)


def test_initial_params_one_draw_per_chain(fitted):
    problem, y, guide = fitted
    initial = guide_initial_params(problem.model, guide, y, num_chains=3)
    assert initial["path"].shape == (3, 3, 8, 1) and initial["theta"].shape == (3,)
    assert not torch.equal(initial["theta"][0], initial["theta"][1])


def test_bad_input_names_the_argument(fitted):
    problem, y, guide = fitted
    with pytest.raises(ValueError, match="`num_chains`"):
        guide_initial_params(problem.model, guide, y, num_chains=0)
    with pytest.raises(ValueError, match="`num_samples`"):
        guide_inverse_mass_matrix(problem.model, guide, y, num_samples=1)
    with pytest.raises(ValueError, match="`full_mass`"):
        guide_inverse_mass_matrix(problem.model, guide, y, full_mass=[("nope",)])
    with pytest.raises(ValueError, match="`inverse_mass_matrix`"):
        GuidedNUTS(problem.model, inverse_mass_matrix=[1.0])
    wrong = {("path", "theta"): torch.ones(3)}
    kernel = GuidedNUTS(problem.model, inverse_mass_matrix=wrong)
    with pytest.raises(ValueError, match="`inverse_mass_matrix` with blocks"):
        kernel.setup(0, y)
    pyro.clear_param_store()
