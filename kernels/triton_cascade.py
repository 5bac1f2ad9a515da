"""Grouped shared-prefix decode (cascade attention, generalized to one prefix per adapter group).

Requests are sorted by prefix id (see :func:`prefixserve.kernels.triton_plan.plan_step`); for each
group and kv head the prefix part is one matrix product ``[rows, D] x [P, D]^T`` with
``rows = group_size * G`` (tiled over the group's rows), so a prefix is read once per row tile
instead of once per request. The own part runs per request (the decode kernel without its prefix
stage) and the partials meet in the log-sum-exp merge.

Reference: :func:`prefixserve.kernels.reference.naive_prefix_attention` (decode steps); the idea
is FlashInfer's cascade attention / Hydragen, vLLM's ``cascade_attention`` for a single prefix.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import LOG2E, attend_paged_keys, block_d, dot_precision, upcast_flag
from .triton_decode import launch_decode, merge_partials, store_partial
from .triton_plan import StepPlan


@triton.jit(do_not_specialize=["num_splits", "stride_pt", "stride_wb", "stride_wh"])
def _group_prefix_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    part_o_ptr,
    part_lse_ptr,
    sorted_reqs_ptr,
    tile_begin_ptr,
    tile_end_ptr,
    tile_prefix_ptr,
    prefix_lens_ptr,
    prefix_tables_ptr,
    qk_scale,
    num_splits,
    stride_qt,
    stride_qh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_pt,
    stride_wb,
    stride_wh,
    GQA: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """Program (row tile w, kv head, split s): row ``r`` is request
    ``sorted_reqs[begin + r // G]`` and query head ``kvh * G + r % G``; all rows attend (no mask)
    to prefix keys ``[s * chunk, (s + 1) * chunk)`` of the tile's prefix; partial results go to
    part ``s``.
    Reference: ``naive_prefix_attention`` restricted to the prefix keys."""
    w = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    begin = tl.load(tile_begin_ptr + w)
    end = tl.load(tile_end_ptr + w)
    prefix = tl.load(tile_prefix_ptr + w)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    member = begin + offs_m // GQA
    row_valid = member < end
    d_valid = offs_d < HEAD_DIM
    req = tl.load(sorted_reqs_ptr + member, mask=row_valid, other=0)
    head = kvh * GQA + offs_m % GQA
    q_mask = row_valid[:, None] & d_valid[None, :]
    q_ptrs = (
        q_ptr + req[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + offs_d[None, :]
    )
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # A tile with no rows (a CUDA graph's padding) reads no key.
    pre_len = tl.where(end > begin, tl.load(prefix_lens_ptr + prefix), 0)
    chunk = tl.cdiv(tl.cdiv(pre_len, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(pre_len, lo + chunk)
    table = prefix_tables_ptr + prefix.to(tl.int64) * stride_pt
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    cache = (k_cache_ptr, v_cache_ptr, stride_cb, stride_cs, stride_ch)
    m_i, l_i, acc = attend_paged_keys(
        q, m_i, l_i, acc, cache, table, lo, hi, 0, kvh,
        offs_d, d_valid, qk_scale, False, BLOCK_N, PAGE, UPCAST, PREC,
    )  # fmt: skip

    row = (req * stride_wb + head * stride_wh + split).to(tl.int64)
    store_partial(
        part_o_ptr, part_lse_ptr, row, row_valid, acc, m_i, l_i, offs_d, d_valid, HEAD_DIM
    )


def launch_group_prefix(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: StepPlan, scale: float
) -> None:
    """Prefix parts of a grouped decode step into parts ``0 .. prefix_splits - 1`` of the
    workspace. ``query [B, Hq, D]``."""
    work = plan.grouped
    assert work is not None and plan.workspace is not None
    num_tiles = work.tile_begin.numel()
    if num_tiles == 0:
        return
    meta = plan.meta
    part_o, part_lse = plan.workspace
    _, num_heads, num_parts, head_dim = part_o.shape
    gqa = num_heads // plan.num_kv_heads
    _group_prefix_kernel[(num_tiles, plan.num_kv_heads, work.prefix_splits)](
        query,
        k_cache,
        v_cache,
        part_o,
        part_lse,
        work.sorted_reqs,
        work.tile_begin,
        work.tile_end,
        work.tile_prefix,
        meta.prefix_lens,
        meta.prefix_block_tables,
        scale * LOG2E,
        work.prefix_splits,
        query.stride(0),
        query.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        meta.prefix_block_tables.stride(0),
        num_heads * num_parts,
        num_parts,
        GQA=gqa,
        HEAD_DIM=head_dim,
        BLOCK_M=work.tiles.block_m,
        BLOCK_D=block_d(head_dim),
        BLOCK_N=work.tiles.block_n,
        PAGE=meta.block_size,
        UPCAST=upcast_flag(query.dtype),
        PREC=dot_precision(query.dtype),
        num_warps=work.tiles.num_warps,
        num_stages=work.tiles.num_stages,
    )


def grouped_decode_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: StepPlan, scale: float
) -> torch.Tensor:
    """Grouped shared-prefix decode: ``query [B, Hq, D]`` -> ``[B, Hq, D]`` in three launches
    (group prefix parts, per-request own parts, merge)."""
    work = plan.grouped
    assert work is not None
    out = torch.empty_like(query)
    launch_group_prefix(query, k_cache, v_cache, plan, scale)
    launch_decode(
        query,
        k_cache,
        v_cache,
        out,
        plan,
        scale,
        num_splits=work.own_splits,
        split_offset=work.prefix_splits,
        with_prefix=False,
    )
    merge_partials(plan, out, num_prefix_parts=work.prefix_splits)
    return out
