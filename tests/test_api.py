import importlib

import pytest

import pyro_latdiff

MODULES = [
    "pyro_latdiff",
    "pyro_latdiff.testing",
    "pyro_latdiff.unbiased",
    "pyro_latdiff.inference_data",
    "pyro_latdiff.calibration",
    "pyro_latdiff.plots",
    "pyro_latdiff.sde",
    "pyro_latdiff.infer",
    "pyro_latdiff.mcmc",
    "pyro_latdiff.parallel",
]


@pytest.mark.parametrize("module_name", MODULES)
def test_all_names_resolve_and_are_sorted(module_name):
    module = importlib.import_module(module_name)
    assert list(module.__all__) == sorted(module.__all__)
    for name in module.__all__:
        assert getattr(module, name) is not None


def test_contract_names_are_public():
    for name in [
        "LatentDiffusion",
        "NeuralDrift",
        "DiffusionGuide",
        "log_evidence",
        "fit",
        "to_inference_data",
    ]:
        assert name in pyro_latdiff.__all__
    from pyro_latdiff import to_inference_data  # noqa: F401  (loads ArviZ lazily)


def test_the_package_never_imports_the_peers():
    """numpyro, jax, pymc (benchmark peers) and lightning (the optional extra, loaded only
    by pyro_latdiff.lightning) stay out of every other module's imports."""
    import subprocess
    import sys

    code = (
        "import sys, importlib\n"
        f"for name in {MODULES!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in ('lightning', 'numpyro', 'jax', 'pymc', 'pytensor') "
        "if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
