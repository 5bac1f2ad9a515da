"""The kernel benchmark's code paths on tiny shapes (timings meaningless here; runs on CPU)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels for real")
def test_kernels_compile_for_sm90():
    """The interpreter skips GPU rules (dot shapes, types): compile for an H100 without one."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    script = BENCH.parent / "compile_sm90.py"
    done = subprocess.run(
        [sys.executable, str(script), "--quick"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all kernels compiled" in done.stdout
    spills = [
        line for line in done.stdout.splitlines() if "STACK:" in line and "STACK:0 " not in line
    ]
    assert not spills, spills  # register spills on sm_90 (cuobjdump's resource report)
