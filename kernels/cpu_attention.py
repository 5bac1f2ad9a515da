"""The native CPU attention op (``csrc/cpu_attention*.cpp``) behind a typed Python call.

    plan = plan_cpu_step(meta, default_isa())                                # once per step
    out = paged_prefix_attention(query, k_cache, v_cache, plan, scale)       # per layer

The op reads K/V where they lie in the paged pool (nothing is gathered or padded), runs its
tiles on torch's intra-op threads, and is opaque to ``torch.compile`` (a fake implementation
gives its output's shape). Reference: :func:`prefixserve.kernels.reference.paged_prefix_attention`.
"""

from __future__ import annotations

import functools
import os

import torch

from .cpu_build import load_cpu_ops
from .cpu_plan import CPUStepPlan, plan_cpu_step

__all__ = [
    "CPUStepPlan",
    "cpu_isas",
    "default_isa",
    "load",
    "paged_prefix_attention",
    "plan_cpu_step",
]

ISA_ENV = "PREFIXSERVE_CPU_ISA"


@functools.cache
def load() -> None:
    """Build (once per machine and source version) and load the op; raises
    :class:`~prefixserve.kernels.cpu_build.NativeBuildError` where it cannot."""
    load_cpu_ops()
    torch.library.register_fake("prefixserve::paged_prefix_attention")(_fake_attention)


def cpu_isas() -> list[str]:
    """Instruction sets the op can run on this CPU, best first (``avx512``, ``avx2``,
    ``baseline``)."""
    load()
    return list(torch.ops.prefixserve.cpu_isas())


def default_isa() -> str:
    """``$PREFIXSERVE_CPU_ISA`` if set (to force a lower instruction set), else the best one."""
    supported = cpu_isas()
    isa = os.environ.get(ISA_ENV) or supported[0]
    if isa not in supported:
        raise ValueError(f"{ISA_ENV}={isa!r} is not one this CPU runs: {', '.join(supported)}")
    return isa


def paged_prefix_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: CPUStepPlan,
    scale: float,
) -> torch.Tensor:
    """Attention of ``query [T, Hq, D]`` (unit stride in D) over each request's prefix and own
    paged KV, ``k_cache, v_cache [num_blocks, block_size, Hkv, D]`` contiguous, all of one dtype
    (fp32, bf16 or fp16; fp32 accumulation). This step's K/V must already be in the pool, and
    the op loaded (:func:`load`, which :func:`default_isa` calls). Returns ``[T, Hq, D]``
    contiguous in the query's dtype."""
    meta = plan.meta
    return torch.ops.prefixserve.paged_prefix_attention(
        query,
        k_cache,
        v_cache,
        meta.cu_q_lens,
        meta.own_lens,
        meta.block_tables,
        meta.prefix_index,
        meta.prefix_lens,
        meta.prefix_block_tables,
        plan.query_tiles,
        plan.prefix_tiles,
        plan.prefix_tokens,
        scale,
        plan.isa,
    )


def _fake_attention(query: torch.Tensor, *args: object) -> torch.Tensor:
    return query.new_empty(query.shape)
