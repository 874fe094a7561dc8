"""``benchmarks/score_samplers.py --smoke`` runs in seconds and its numbers are consistent."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "score_samplers.py"


def _load():
    spec = importlib.util.spec_from_file_location("benchmark_score_samplers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run(tmp_path, capsys):
    bench = _load()
    results = bench.main(bench.parse_args(["--smoke", "--outdir", str(tmp_path)]))
    out = capsys.readouterr().out
    assert all(f"Table {i}." in out for i in (1, 2, 3, 4, 5, 6))
    assert (tmp_path / "score_samplers.png").stat().st_size > 0
    binary = {(name, n): kl for name, n, _, kl in results["binary"]}
    assert binary[("plain-uniform", 4)] == pytest.approx(0.269748, abs=1e-6)
    assert binary[("Delta_n (identity)", 8)] == pytest.approx(binary[("plain-uniform", 8)], 1e-4)
    for n in (4, 8):
        assert binary[("matched-uniform", n)] < binary[("plain-uniform", n)]
    gaussian = {(name, n): kl for name, n, _, kl in results["gaussian"]}
    for name in ("euler", "exponential", "ode-heun", "cld"):
        assert gaussian[(name, 20)] < gaussian[(name, 5)]
    for _, _, bound in results["bounds"]:
        assert bound.bound > 0
    for _, _, uniform, equalised in results["deltas"]:
        assert 0 < equalised < uniform
