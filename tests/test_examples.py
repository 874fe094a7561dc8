"""Every example runs with --smoke; a script missing from the list fails the test."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
EXAMPLES = [
    "data_parallel.py",
    "double_well.py",
    "fitzhugh_nagumo.py",
    "global_parameter.py",
    "posterior_checks.py",
    "quickstart.py",
    "sample_gmm.py",
    "score_2d.py",
    "state_space.py",
]
WRITES_FILES = {
    "posterior_checks.py",
    "quickstart.py",
    "sample_gmm.py",
    "score_2d.py",
    "state_space.py",
}


def test_every_example_is_listed():
    assert sorted(p.name for p in EXAMPLES_DIR.glob("*.py")) == sorted(EXAMPLES)


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_with_smoke(name, tmp_path):
    spec = importlib.util.spec_from_file_location(name[:-3], EXAMPLES_DIR / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--smoke"] + (["--outdir", str(tmp_path)] if name in WRITES_FILES else [])
    result = module.main(module.parse_args(argv))
    assert isinstance(result, dict) and result
    if name == "quickstart.py":
        assert (tmp_path / "quickstart_paths.png").stat().st_size > 0
        assert (tmp_path / "quickstart_loss.png").stat().st_size > 0
    if name == "score_2d.py":
        assert (tmp_path / "score_2d_samples.png").stat().st_size > 0
        assert (tmp_path / "score_2d_training.png").stat().st_size > 0
    if name == "sample_gmm.py":
        assert (tmp_path / "sample_gmm.png").stat().st_size > 0
        assert (tmp_path / "sample_gmm_drift.png").stat().st_size > 0
    if name == "posterior_checks.py":
        assert (tmp_path / "posterior_checks_bench_a.png").stat().st_size > 0
    if name == "state_space.py":
        assert (tmp_path / "state_space_paths.png").stat().st_size > 0
        assert (tmp_path / "state_space_theta.png").stat().st_size > 0
