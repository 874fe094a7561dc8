"""Lightning trains the quickstart model (skipped without lightning)."""

import pyro
import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from pyro_latdiff import DiffusionGuide, log_evidence  # noqa: E402
from pyro_latdiff.lightning import SVIModule  # noqa: E402
from pyro_latdiff.testing import ou_problem  # noqa: E402


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)


def test_lightning_trains_the_quickstart_model(tmp_path):
    problem = ou_problem()  # bench A: y = 1.5 observed at T with sd 0.1
    y = torch.tensor([1.5])
    guide = DiffusionGuide(problem.model, bridge=False)  # starts at the prior chain
    before = log_evidence(problem.model, guide, y, num_samples=200)
    module = SVIModule(problem.model, guide, y, num_particles=8, lr=2e-2)
    store = pyro.get_param_store()
    names = module.param_names
    assert names and all(
        store[n].unconstrained() is p for n, p in zip(names, module.parameters(), strict=True)
    )
    start = {n: store[n].detach().clone() for n in names}
    loader = torch.utils.data.DataLoader([(y,)], batch_size=None)
    trainer = pl.Trainer(
        max_epochs=60,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader)
    assert trainer.global_step == 60
    moved = [n for n in names if not torch.equal(store[n].detach(), start[n])]
    assert moved  # the store's parameters are the ones Lightning trained
    after = log_evidence(problem.model, guide, y, num_samples=200)
    # The ESS of the guide as a proposal grows from the prior's (the observation is
    # sharp, sd 0.1): training moved the guide towards the posterior.
    assert after.ess > before.ess


def test_bad_input_names_the_argument():
    problem = ou_problem()
    guide = DiffusionGuide(problem.model)
    with pytest.raises(ValueError, match="`lr`"):
        SVIModule(problem.model, guide, torch.tensor([1.5]), lr=0.0)
    with pytest.raises(ValueError, match="`num_particles`"):
        SVIModule(problem.model, guide, torch.tensor([1.5]), num_particles=0)
