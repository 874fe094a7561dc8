"""The benchmark scripts run (tiny sizes), so they do not rot between measurements."""

import importlib.util
import sys
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
        ("memory", ["--smoke", "--live"]),
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallinfo2")
def test_the_live_heap_probe_sees_a_tensor_freed_between_operators():
    import torch

    module = load("memory")
    with module._peak_heap_mode():  # its first use allocates once
        torch.zeros(1)
    before = module._live_heap()
    with module._peak_heap_mode() as probe:
        x = torch.ones(10_000_000)  # 40 MB, freed before the next operator
        del x
        torch.zeros(1)
    assert probe.peak - before >= 40e6
    assert module._live_heap() - before < 20e6


def test_nuts_reference_runs_with_smoke(tmp_path):
    module = load("nuts_reference")
    out = tmp_path / "reference.json"
    result = module.main(module.parse_args(["--smoke", "--no-jit", "--out", str(out)]))
    assert out.stat().st_size > 0
    assert set(result) == {"theta1", "theta2", "settings"}
