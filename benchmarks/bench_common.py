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
        info["processor"] = platform.processor()
    return info


def write_report(path: str | Path, report: dict[str, Any]) -> Path:
    """Write ``report`` to ``path`` as indented JSON (creating its folder) and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return out
