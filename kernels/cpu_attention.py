"""The native CPU attention op (``csrc/cpu_attention*.cpp``) behind a typed Python call.

    load(cache_dir)                                                     # once per process
    plan = plan_cpu_step(meta, default_isa())                           # once per step
    out = paged_prefix_attention(query, k_cache, v_cache, plan, scale)  # per layer

``default_isa`` (:mod:`prefixserve.kernels.cpu_isa`) picks the instruction set. The op reads
K/V where they lie in the paged pool (nothing is gathered or padded), runs its tiles on torch's
intra-op threads, and is opaque to ``torch.compile`` (a fake implementation gives its output's
shape). Reference: :func:`prefixserve.kernels.reference.paged_prefix_attention`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .cpu_build import load_cpu_ops
from .cpu_plan import CPUStepPlan, plan_cpu_step

__all__ = ["CPUStepPlan", "load", "paged_prefix_attention", "plan_cpu_step"]


def load(cache_dir: Path) -> None:
    """Build (once per machine and source version, into ``cache_dir``) and load the op; raises
    :class:`~prefixserve.kernels.cpu_build.NativeBuildError` where it cannot."""
    load_cpu_ops(cache_dir)
    _register_fake()


@functools.cache
def _register_fake() -> None:
    torch.library.register_fake("prefixserve::paged_prefix_attention")(_fake_attention)


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
    the op loaded (:func:`load`). Returns ``[T, Hq, D]`` contiguous in the query's dtype."""
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
