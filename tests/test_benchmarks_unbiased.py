"""``benchmarks/unbiased.py --smoke`` runs in seconds and its numbers are consistent."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "unbiased.py"


def _load():
    spec = importlib.util.spec_from_file_location("benchmark_unbiased", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run(tmp_path, capsys):
    bench = _load()
    results, scan = bench.main(bench.parse_args(["--smoke", "--outdir", str(tmp_path)]))
    out = capsys.readouterr().out
    assert "Table 1." in out and "Table 2." in out and "Table 3." in out
    assert (tmp_path / "unbiased_mse.png").stat().st_size > 0
    for a, (exact, rows) in results.items():
        assert exact == pytest.approx(bench.benes_cos_exact(a))
        for row in rows:
            # unbiased methods against the closed form, Euler runs against the exact
            # Euler-chain value from the density propagation: all within 3.5 stderrs
            assert abs(row["z"]) < 3.5, (a, row)
            assert row["variance"] > 0 and row["cost"] >= 1
    for row in scan:
        assert abs(row["z"]) < 3.5, row


def test_closed_form_reduces_to_classical_benes():
    bench = _load()
    x0, t = 0.5, 1.0
    classical = (
        (math.exp(x0) * math.cos(x0 + t) + math.exp(-x0) * math.cos(x0 - t))
        * math.exp(-t / 2)
        / (2 * math.cosh(x0))
    )
    assert bench.benes_cos_exact(1.0) == pytest.approx(classical, abs=1e-15)


def test_euler_grid_moments_one_step():
    """One Euler step is Gaussian: E cos(N(m, h)) = e^{-h/2} cos m."""
    bench = _load()
    for a in (1.0, 2.0):
        mean, var = bench.euler_exact_moments(a, 1, 0.01)
        m = bench.X0 + a * math.tanh(a * bench.X0)
        assert mean == pytest.approx(math.exp(-0.5) * math.cos(m), abs=1e-10)
        second = 0.5 * (1 + math.exp(-2.0) * math.cos(2 * m))
        assert var == pytest.approx(second - mean**2, abs=1e-10)
