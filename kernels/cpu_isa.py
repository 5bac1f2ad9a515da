"""The instruction sets the native CPU ops (attention and linear) run on this CPU.

Each op's kernel is built once per instruction set (:mod:`prefixserve.kernels.cpu_build`) and a
call names the build to run; these helpers list the builds this CPU runs and pick one. The ops
must be loaded first (``cpu_attention.load`` or ``cpu_linear.load``).
"""

from __future__ import annotations

import torch

__all__ = ["BF16_ISAS", "cpu_isas", "default_isa"]

BF16_ISAS = ("amx", "avx512_bf16")
"""Builds with a native bf16 dot product (``vdpbf16ps``, and AMX tiles): where bf16 linears run
on the native op and bf16 decode tiles run row by row."""


def cpu_isas() -> list[str]:
    """Instruction sets the ops can run on this CPU, best first, of ``amx`` (AMX bf16 tiles, where
    the OS grants them), ``avx512_bf16`` (AVX-512 with vdpbf16ps), ``avx512``, ``avx2`` and
    ``baseline``."""
    return list(torch.ops.prefixserve.cpu_isas())


def default_isa(forced: str | None = None) -> str:
    """``forced`` (a lower instruction set the user asked for: the engine passes
    ``$PREFIXSERVE_CPU_ISA``), else the best one this CPU runs; raises ``ValueError`` where the
    CPU does not run ``forced``."""
    supported = cpu_isas()
    isa = forced or supported[0]
    if isa not in supported:
        raise ValueError(
            f"PREFIXSERVE_CPU_ISA={isa!r} is not one this CPU runs: {', '.join(supported)}"
        )
    return isa
