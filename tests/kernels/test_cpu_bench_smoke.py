"""The CPU kernel benchmarks' code paths on tiny shapes (timings meaningless here)."""

import sys
from pathlib import Path

BENCH_DIR = Path(__file__).parents[2] / "benchmarks" / "kernels"


def test_cpu_benchmark_smoke_paths(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    monkeypatch.delitem(sys.modules, "bench_cpu_attention", raising=False)
    import bench_cpu_attention

    results = bench_cpu_attention.main(["--smoke", "--out", str(tmp_path / "cpu.json")])
    assert [len(results[k]) for k in ("decode", "grouped")] == [2, 4]
    assert all(r["op_ms"] > 0 and r["reference_ms"] > 0 for r in results["decode"])
    assert (tmp_path / "cpu.json").is_file()


def test_cpu_linear_benchmark_smoke_paths(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH_DIR))
    monkeypatch.delitem(sys.modules, "bench_cpu_linear", raising=False)
    import bench_cpu_linear

    report = bench_cpu_linear.main(["--smoke", "--out", str(tmp_path / "linear.json")])
    assert [r["rows"] for r in report["results"]] == [1, 2, 38]
    assert all(ms > 0 for r in report["results"] for ms in r["ms"].values())
    vectorized = [isa for isa in report["isas"] if isa != "baseline"]
    assert list(report["results"][0]["ms"]) == ["aten"] + [f"packed {isa}" for isa in vectorized]
    assert (tmp_path / "linear.json").is_file()
