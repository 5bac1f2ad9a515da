"""The Triton attention backend's entry points, called by the engine once per layer.

    plan = plan_step(meta)                                                  # once per step
    write_kv(key, value, k_cache, v_cache, meta.slot_mapping)               # per layer
    out = prefix_paged_attention(query, k_cache, v_cache, plan, scale)      # per layer

Dispatch (decided once per step by :func:`~prefixserve.kernels.triton_plan.specialize`):

* ``meta.max_q_len > 1`` (prefill, chunked prefill, or prefill mixed with decodes): the varlen
  kernel (:mod:`.triton_prefill`).
* ``meta.max_q_len == 1`` (pure decode): grouped shared-prefix decode (:mod:`.triton_cascade`)
  when :class:`~prefixserve.kernels.triton_plan.DispatchRule` says the prefix reads it saves pay
  for its extra launch, else plain split-KV decode (:mod:`.triton_decode`).

On CPU the kernels run under the Triton interpreter: set ``TRITON_INTERPRET=1`` before this
module is imported. Reference: :func:`prefixserve.kernels.reference.paged_prefix_attention`.
"""

from __future__ import annotations

import torch

from .metadata import AttentionMetadata
from .triton_cascade import grouped_decode_attention
from .triton_common import check_index, check_kv_cache, check_tokens
from .triton_decode import decode_attention
from .triton_kv_write import launch_write_kv, write_kv
from .triton_plan import DispatchRule, StepPlan, plan_step, specialize
from .triton_prefill import prefill_attention

__all__ = [
    "DispatchRule",
    "StepPlan",
    "launch_write_kv",
    "plan_step",
    "prefix_paged_attention",
    "run_planned",
    "write_kv",
]


def _check_plan(query: torch.Tensor, k_cache: torch.Tensor, plan: StepPlan) -> None:
    meta = plan.meta
    device = k_cache.device
    if query.shape[1] != plan.num_q_heads or k_cache.shape[2] != plan.num_kv_heads:
        raise ValueError(
            f"plan is for {plan.num_q_heads} query / {plan.num_kv_heads} kv heads, got query "
            f"{tuple(query.shape)} and cache {tuple(k_cache.shape)}"
        )
    if query.shape[2] != plan.head_dim:
        raise ValueError(f"plan is for head_dim {plan.head_dim}, got query {tuple(query.shape)}")
    if query.dtype != plan.dtype:
        raise ValueError(f"plan is for {plan.dtype}, got a {query.dtype} query")
    if k_cache.shape[1] != meta.block_size:
        raise ValueError(
            f"cache block_size {k_cache.shape[1]} != metadata block_size {meta.block_size}"
        )
    if query.shape[0] != meta.num_tokens:
        raise ValueError(f"query has {query.shape[0]} tokens, metadata {meta.num_tokens}")
    for name in (
        "cu_q_lens",
        "own_lens",
        "block_tables",
        "prefix_index",
        "prefix_lens",
        "prefix_block_tables",
    ):
        check_index(name, getattr(meta, name), torch.int32, device)
    if plan.workspace is not None and plan.workspace[0].device != device:
        raise ValueError(f"plan workspace on {plan.workspace[0].device} but the cache on {device}")


def prefix_paged_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: StepPlan | AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Attention of ``query [T, Hq, D]`` over each request's prefix and own paged KV.

    ``k_cache, v_cache``: ``[num_blocks, block_size, Hkv, D]``, same dtype as ``query`` (fp16,
    bf16 or fp32; accumulation is fp32, fp32 products are IEEE). ``plan``: from
    :func:`plan_step` (reuse it for every layer of the step; it completes itself from these
    shapes at the first call if it was planned without them), or the step's metadata (planned
    on the spot; fine for tests). This step's K/V must already be written (:func:`write_kv`).
    Returns ``[T, Hq, D]`` in the query's dtype.
    """
    check_kv_cache(k_cache, v_cache)
    if k_cache.stride() != v_cache.stride():
        raise ValueError(
            f"k_cache strides {k_cache.stride()} != v_cache strides {v_cache.stride()}"
        )
    check_tokens("query", query, k_cache, None)
    if query.shape[1] % k_cache.shape[2]:
        raise ValueError(
            f"query heads {query.shape[1]} not a multiple of kv heads {k_cache.shape[2]}"
        )
    if isinstance(plan, AttentionMetadata):
        plan = plan_step(plan, device=query.device)
    if not plan.specialized:  # first layer of the step: fill in the model's shape
        specialize(plan, query.shape[1], k_cache.shape[2], query.shape[2], query.dtype)
    _check_plan(query, k_cache, plan)
    return run_planned(query, k_cache, v_cache, plan, scale)


def run_planned(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: StepPlan, scale: float
) -> torch.Tensor:
    """:func:`prefix_paged_attention` without its checks, for a finished ``plan`` of these
    shapes (the engine's backend plans knowing the model; its layers only launch)."""
    if query.shape[0] == 0:
        return torch.empty_like(query)
    if plan.mode == "prefill":
        return prefill_attention(query, k_cache, v_cache, plan, scale)
    if plan.mode == "grouped":
        return grouped_decode_attention(query, k_cache, v_cache, plan, scale)
    return decode_attention(query, k_cache, v_cache, plan, scale)
