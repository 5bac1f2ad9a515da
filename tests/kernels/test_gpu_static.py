"""Every Triton kernel variant the engine can launch, compiled for sm_80 and sm_90 on this CPU.

The Triton interpreter that runs the kernel tests here ignores GPU rules (``tl.dot`` shapes,
shared memory, registers). ``benchmarks/kernels/gpu_static.py`` compiles each variant the
planner and launch wrappers produce with the ptxas the triton wheel ships; this fails on a compile
error, shared memory over a target's limit, a register spill, or a 16-bit dot product off the
tensor cores. Results are cached per variant (``$PREFIXSERVE_CACHE/gpu_static``), so only the
first run on a machine, or a run after a kernel changed, compiles everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefixserve.kernels import (
    gpu_static,
    triton_cascade,
    triton_decode,
    triton_kv_write,
    triton_launches,
    triton_prefill,
)

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "kernels" / "gpu_static.py"
TARGETS = ("sm_80", "sm_90")
KEYS = {"kernel", "config", "target", "registers", "spills", "shared_bytes", "occupancy"}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], str]:
    """The report's rows for every shape, dtype and block size on sm_80 and sm_90."""
    if torch.cuda.is_available():
        pytest.skip("the GPU runs the kernels for real (benchmarks/gpu.sh runs the report)")
    path = tmp_path_factory.mktemp("gpu_static") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, str(SCRIPT), "--targets", ",".join(TARGETS), "--json", str(path)]
    command += ["--quiet", "--jobs", str(os.cpu_count() or 1)]
    done = subprocess.run(
        command,
        env=env,
        capture_output=True,
        text=True,
        timeout=3600,
    )
    output = done.stdout + done.stderr
    assert path.exists(), output
    assert done.returncode in (0, 1), output
    return json.loads(path.read_text()), output


def test_every_variant_compiles_without_spills_within_shared_memory(report):
    rows, output = report
    failures = [line for line in output.splitlines() if line.lstrip().startswith("FAIL")]
    assert not failures, "\n".join(failures)
    assert all(not gpu_static.problems(gpu_static.StaticRow(**row)) for row in rows)


def test_report_has_every_kernel_target_and_shape(report):
    rows, _ = report
    assert rows and all(row.keys() >= KEYS for row in rows)
    kernels = {
        name
        for module in (triton_decode, triton_cascade, triton_prefill, triton_kv_write)
        for name, value in vars(module).items()
        if name.endswith("_kernel") and hasattr(value, "arg_names")
    }
    assert kernels == {"_decode_kernel", "_merge_kernel", "_group_prefix_kernel"} | {
        "_prefill_kernel",
        "_write_kv_kernel",
    }
    for target in TARGETS:
        assert {r["kernel"] for r in rows if r["target"] == target} == kernels
    shapes = {
        s.name for s in (*triton_launches.MODEL_SHAPES.values(), *triton_launches.GRID_SHAPES)
    }
    tags = {tag for r in rows for tag in r["shapes"]}
    for shape in shapes:
        for dtype in ("bf16", "fp16", "fp32"):
            for page in (16, 32):
                assert f"{shape} {dtype} page{page}" in tags


def test_16_bit_attention_runs_on_tensor_cores(report):
    rows, _ = report
    attention = [r for r in rows if r["kernel"] != "_merge_kernel" and r["io_dtype"] != "fp32"]
    dots = [r for r in attention if r["kernel"] != "_write_kv_kernel"]
    assert dots and all(r["tensor_cores"] is True for r in dots)
    assert all(r["tensor_cores"] is None for r in rows if r["kernel"] == "_write_kv_kernel")


def test_per_step_values_compile_no_new_variants(report):
    """Split counts 1..32 and block tables one block wide or many all run on three decode
    variants (final, partial, own-only): no value of a per-step scalar compiles a new one."""
    rows, _ = report
    tag = "smollm2-135m bf16 page16"
    decode = [r for r in rows if r["kernel"] == "_decode_kernel" and r["target"] == "sm_90"]
    assert len([r for r in decode if tag in r["shapes"]]) == 3
    group = [r for r in rows if r["kernel"] == "_group_prefix_kernel" and r["target"] == "sm_90"]
    assert len([r for r in group if tag in r["shapes"]]) == 1


# -- the checks themselves, on made-up rows ----------------------------------------------------

PTXAS_LOG = """ptxas info    : Compiling entry function '_prefill_kernel' for 'sm_80'
ptxas info    : Function properties for _prefill_kernel
    5816 bytes stack frame, 26072 bytes spill stores, 39808 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 5816 bytes cumulative stack size
"""


def test_ptxas_log_is_parsed():
    assert gpu_static.parse_ptxas(PTXAS_LOG) == (32, 5816, 26072 + 39808)
    with pytest.raises(ValueError, match="no resource usage"):
        gpu_static.parse_ptxas("ptxas fatal: unknown option")


@pytest.mark.parametrize(
    "registers, warps, shared, target, expected",
    [
        (32, 4, 0, "sm_90", 1.0),  # 16 blocks of 4 warps fill 64 warp slots
        (255, 8, 0, "sm_90", 0.125),  # 256 registers x 256 threads: one block per SM
        (128, 4, 0, "sm_80", 0.25),  # 16 warps of 128 registers
        (64, 4, 100 * 1024, "sm_80", 0.0625),  # one block's shared memory per SM
        (64, 4, 100 * 1024, "sm_90", 0.125),  # two on a 228 KiB SM
    ],
)
def test_occupancy(registers, warps, shared, target, expected):
    limits = gpu_static.TARGETS[target]
    assert gpu_static.occupancy(limits, registers, warps, shared) == pytest.approx(expected)


def _row(**changes) -> gpu_static.StaticRow:
    row = gpu_static.StaticRow(
        kernel="_decode_kernel",
        config="bf16 ...",
        target="sm_80",
        registers=64,
        spills=0,
        stack_bytes=0,
        shared_bytes=20480,
        occupancy=0.5,
        tensor_cores=True,
        num_warps=4,
        io_dtype="bf16",
        shapes=[],
        compile_seconds=0.5,
    )
    for name, value in changes.items():
        setattr(row, name, value)
    return row


@pytest.mark.parametrize(
    "changes, complaint",
    [
        ({}, None),
        ({"error": "CompilationError: dot shape"}, "does not compile"),
        ({"shared_bytes": 170 * 1024}, "over the"),
        ({"spills": 16}, "spills 16 B"),
        ({"tensor_cores": False}, "without tensor-core"),
        ({"tensor_cores": False, "io_dtype": "fp32"}, None),  # IEEE fp32 runs on FMA units
        ({"occupancy": 0.0}, "no block fits"),
    ],
)
def test_problems_name_what_fails(changes, complaint):
    found = gpu_static.problems(_row(**changes))
    if complaint is None:
        assert found == []
    else:
        assert len(found) >= 1 and complaint in found[0]
