"""The kernel benchmark's code paths on tiny shapes (timings meaningless here; runs on CPU)."""

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "benchmarks" / "kernels" / "bench_attention.py"


def test_benchmark_smoke_paths(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("bench_attention", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(
        sys.modules, spec.name, bench
    )  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(bench)
    sweep = bench.Sweep((2,), (40,), (21,), 4, (1, 4), (40,), 5, (1,), (20,), (17,))
    results = bench.run_benchmarks(sweep, bench.SMOKE_SHAPE)
    assert [len(results[k]) for k in ("decode", "grouped", "prefill")] == [1, 2, 1]
    assert all(r["ms"] > 0 for r in results["decode"] + results["prefill"])
    bench.print_table("grouped", results["grouped"])
    assert "speedup" in capsys.readouterr().out
