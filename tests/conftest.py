import pyro
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_validate():
    """Every test starts from a fixed seed, an empty parameter store and validation on."""
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    pyro.enable_validation(True)
    default_dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(default_dtype)
