"""The benchmark scripts run (tiny sizes), so they do not rot between measurements."""

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "name, argv",
    [
        ("svi_step", ["--smoke"]),
        ("gpu_check", ["--device", "cpu", "--smoke"]),
        ("memory", ["--smoke"]),
        ("samplers", ["--smoke", "--targets", "gmm9", "funnel", "manywell"]),
        ("samplers", ["--smoke", "--bias-vs-k"]),
        ("samplers", ["--smoke", "--targets", "manywell", "--losses", "log_variance+replay"]),
        ("parallel", ["--smoke"]),
        ("scoring", ["--smoke"]),
        # About a minute where numpyro and pymc are installed (JIT and C compilation);
        # seconds where they are not (each missing peer is skipped with a line).
        pytest.param("peers", ["--smoke"], marks=pytest.mark.slow),
    ],
)
def test_benchmark_runs_with_smoke(name, argv):
    module = load(name)
    module.main(module.parse_args(argv))


def test_nuts_reference_runs_with_smoke(tmp_path):
    module = load("nuts_reference")
    out = tmp_path / "reference.json"
    result = module.main(module.parse_args(["--smoke", "--no-jit", "--out", str(out)]))
    assert out.stat().st_size > 0
    assert set(result) == {"theta1", "theta2", "settings"}
