"""The benchmark scripts run (tiny sizes), so they do not rot between measurements."""

import importlib.util
import os
import shutil
import subprocess
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


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("cc") is None,
    reason="the heap counter wraps glibc's allocator and is built with cc",
)
def test_the_heap_counter_counts_a_tensor_while_it_lives(tmp_path):
    module = load("memory")
    library = module.build_heap_counter(str(tmp_path))
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import memory, torch\n"
        "lib = memory._heap_counter(); before = lib.heap_counter_reset()\n"
        "x = torch.ones(10_000_000); del x\n"  # 40 MB, freed at once
        "y = torch.ones(1_000_000)\n"  # 4 MB, still in use
        "print(lib.heap_counter_peak() - before, lib.heap_counter_reset() - before)\n"
    )
    env = dict(os.environ, LD_PRELOAD=library, OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", script, str(BENCHMARKS)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    peak, in_use = (int(v) for v in out.stdout.split())
    assert 40e6 <= peak < 42e6  # the 40 MB one, counted while it lived
    assert 4e6 <= in_use < 5e6  # the 4 MB one only: the freed one was taken off


def test_nuts_reference_runs_with_smoke(tmp_path):
    module = load("nuts_reference")
    out = tmp_path / "reference.json"
    result = module.main(module.parse_args(["--smoke", "--no-jit", "--out", str(out)]))
    assert out.stat().st_size > 0
    assert set(result) == {"theta1", "theta2", "settings"}
