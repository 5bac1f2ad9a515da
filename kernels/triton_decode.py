"""Triton decode attention (one query token per request) with split-KV and a log-sum-exp merge.

Reference: :func:`prefixserve.kernels.reference.naive_prefix_attention` with every ``q_len == 1``
(the query is the request's last own token, so it sees the whole prefix and all own keys).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import LOG2E, attend_paged_keys, block_d, dot_precision, upcast_flag
from .triton_plan import StepPlan, decode_tiles

# Scalars that change from step to step (see triton_common: no value specialization).
_PER_STEP_DECODE = [
    "num_splits",
    "split_offset",
    "stride_bt",
    "stride_pt",
    "stride_wb",
    "stride_wh",
]


@triton.jit(do_not_specialize=_PER_STEP_DECODE)
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    part_o_ptr,
    part_lse_ptr,
    own_lens_ptr,
    block_tables_ptr,
    prefix_index_ptr,
    prefix_lens_ptr,
    prefix_tables_ptr,
    qk_scale,
    num_splits,
    split_offset,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    stride_pt,
    stride_wb,
    stride_wh,
    GQA: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    WITH_PREFIX: tl.constexpr,
    WRITE_PARTIAL: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """Program (request b, kv head, split s): the ``GQA`` query heads of kv head ``kvh`` against
    keys ``[s * chunk, (s + 1) * chunk)`` of ``[prefix ; own]`` (``WITH_PREFIX=False``: own only).
    Writes the final ``out[b, heads]`` or, with ``WRITE_PARTIAL``, the normalized partial output
    and its base-2 lse to ``part_o[b, heads, split_offset + s]``.
    Reference: ``naive_prefix_attention`` restricted to the split's keys."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    head = kvh * GQA + offs_h
    h_valid = offs_h < GQA
    d_valid = offs_d < HEAD_DIM
    q_mask = h_valid[:, None] & d_valid[None, :]
    q = tl.load(
        q_ptr + b * stride_qt + head[:, None] * stride_qh + offs_d[None, :], mask=q_mask, other=0.0
    )
    if UPCAST:
        q = q.to(tl.float32)

    own_len = tl.load(own_lens_ptr + b)
    pre_len = own_len * 0
    prefix = tl.load(prefix_index_ptr + b)
    if WITH_PREFIX:
        pre_len = tl.where(prefix >= 0, tl.load(prefix_lens_ptr + tl.maximum(prefix, 0)), 0)
    total = pre_len + own_len
    chunk = tl.cdiv(tl.cdiv(total, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(total, lo + chunk)

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    cache = (k_cache_ptr, v_cache_ptr, stride_cb, stride_cs, stride_ch)
    if WITH_PREFIX:  # stage 1: prefix keys [lo, min(hi, P))
        table = prefix_tables_ptr + tl.maximum(prefix, 0).to(tl.int64) * stride_pt
        m_i, l_i, acc = attend_paged_keys(
            q, m_i, l_i, acc, cache, table, lo, tl.minimum(hi, pre_len), 0, kvh,
            offs_d, d_valid, qk_scale, False, BLOCK_N, PAGE, UPCAST, PREC,
        )  # fmt: skip
    # stage 2: own keys, own positions [max(lo, P) - P, hi - P); all visible to the last token
    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    own_lo = tl.maximum(lo, pre_len) - pre_len
    m_i, l_i, acc = attend_paged_keys(
        q, m_i, l_i, acc, cache, table, own_lo, hi - pre_len, 0, kvh,
        offs_d, d_valid, qk_scale, False, BLOCK_N, PAGE, UPCAST, PREC,
    )  # fmt: skip

    if WRITE_PARTIAL:
        row = (b * stride_wb + head * stride_wh + split_offset + split).to(tl.int64)
        store_partial(
            part_o_ptr, part_lse_ptr, row, h_valid, acc, m_i, l_i, offs_d, d_valid, HEAD_DIM
        )
    else:
        out = out_ptr + b * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(out, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def store_partial(
    part_o_ptr, part_lse_ptr, row, row_valid, acc, m_i, l_i, offs_d, d_valid, HEAD_DIM: tl.constexpr
):
    """Store one program's partial result: ``part_o[row] = acc / l`` and
    ``part_lse[row] = m + log2(l)`` (zeros and -inf for rows that saw no key).
    ``row [M]`` indexes the flattened ``(B, Hq, S)`` of the workspace."""
    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    lse = tl.where(seen, m_i + tl.log2(l_safe), float("-inf"))
    mask = row_valid[:, None] & d_valid[None, :]
    tl.store(
        part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None], mask=mask
    )
    tl.store(part_lse_ptr + row, lse, mask=row_valid)


@triton.jit(do_not_specialize=["num_parts", "num_prefix_parts"])
def _merge_kernel(
    part_o_ptr,
    part_lse_ptr,
    out_ptr,
    prefix_index_ptr,
    num_parts,
    num_prefix_parts,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SKIP_ABSENT_PREFIX: tl.constexpr,
):
    """Program (request b, query head h): ``out[b, h] = sum_s w_s part_o[b, h, s]`` with
    ``w_s = 2^(lse_s - logsumexp2(lse))``. With ``SKIP_ABSENT_PREFIX``, the first
    ``num_prefix_parts`` parts are ignored (never written) for requests without a prefix.
    Reference: FlashInfer ``merge_states`` / vLLM ``merge_attn_states`` (in base 2)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    num_heads = tl.num_programs(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    valid = offs_s < num_parts
    if SKIP_ABSENT_PREFIX:
        first = tl.where(tl.load(prefix_index_ptr + b) >= 0, 0, num_prefix_parts)
        valid = valid & (offs_s >= first)
    row = (b.to(tl.int64) * num_heads + h) * num_parts + offs_s
    lse = tl.load(part_lse_ptr + row, mask=valid, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))  # some own part always saw a key: the max is finite
    d_valid = offs_d < HEAD_DIM
    part = tl.load(
        part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
        mask=valid[:, None] & d_valid[None, :],
        other=0.0,
    )
    o = tl.sum(weight[:, None] * part, 0) / tl.sum(weight, 0)
    tl.store(
        out_ptr + b * stride_ot + h * stride_oh + offs_d,
        o.to(out_ptr.dtype.element_ty),
        mask=d_valid,
    )


def merge_partials(plan: StepPlan, out: torch.Tensor, num_prefix_parts: int) -> None:
    """Merge the workspace's ``S`` partials of every (request, head) into ``out [B, Hq, D]``."""
    assert plan.workspace is not None
    part_o, part_lse = plan.workspace
    batch, num_heads, num_parts, head_dim = part_o.shape
    _merge_kernel[(batch, num_heads)](
        part_o,
        part_lse,
        out,
        plan.meta.prefix_index,
        num_parts,
        num_prefix_parts,
        out.stride(0),
        out.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d(head_dim),
        BLOCK_S=max(2, triton.next_power_of_2(num_parts)),
        SKIP_ABSENT_PREFIX=num_prefix_parts > 0,
    )


def launch_decode(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    plan: StepPlan,
    scale: float,
    *,
    num_splits: int,
    split_offset: int = 0,
    with_prefix: bool = True,
) -> None:
    """Run :func:`_decode_kernel` over ``(B, Hkv, num_splits)`` programs; ``query, out``:
    ``[B, Hq, D]``. With ``num_splits == 1`` and ``with_prefix`` the result goes straight to
    ``out``; otherwise the partials go to ``plan.workspace`` at parts ``split_offset ..`` and
    need :func:`merge_partials`."""
    meta = plan.meta
    batch, num_heads, head_dim = query.shape
    gqa = num_heads // plan.num_kv_heads
    tiles = decode_tiles(gqa, head_dim, plan.dtype)
    partial = num_splits > 1 or not with_prefix
    if partial:
        assert plan.workspace is not None, "plan_step allocates a workspace for split decode"
        part_o, part_lse = plan.workspace
    else:  # the partial outputs are not written: any pointer will do
        part_o, part_lse = out, out
    num_parts = part_o.shape[2] if partial else 1
    _decode_kernel[(batch, plan.num_kv_heads, num_splits)](
        query,
        k_cache,
        v_cache,
        out,
        part_o,
        part_lse,
        meta.own_lens,
        meta.block_tables,
        meta.prefix_index,
        meta.prefix_lens,
        meta.prefix_block_tables,
        scale * LOG2E,
        num_splits,
        split_offset,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        meta.block_tables.stride(0),
        meta.prefix_block_tables.stride(0),
        num_heads * num_parts,
        num_parts,
        GQA=gqa,
        HEAD_DIM=head_dim,
        BLOCK_H=tiles.block_m,
        BLOCK_D=block_d(head_dim),
        BLOCK_N=tiles.block_n,
        PAGE=meta.block_size,
        WITH_PREFIX=with_prefix,
        WRITE_PARTIAL=partial,
        UPCAST=upcast_flag(query.dtype),
        PREC=dot_precision(query.dtype),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )


def decode_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: StepPlan, scale: float
) -> torch.Tensor:
    """Plain decode: ``query [B, Hq, D]`` (one token per request) -> ``[B, Hq, D]``, split over
    the KV length by ``plan.decode_splits`` and merged by log-sum-exp when it is above 1."""
    out = torch.empty_like(query)
    launch_decode(query, k_cache, v_cache, out, plan, scale, num_splits=plan.decode_splits)
    if plan.decode_splits > 1:
        merge_partials(plan, out, num_prefix_parts=0)
    return out
