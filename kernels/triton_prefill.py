"""Triton prefill / extend attention over packed variable-length queries (chunked prefill too).

Each program takes ``BLOCK_Q = block_m // G`` consecutive queries of one request times the ``G``
query heads of one kv head, then runs one online softmax over two key sources without
concatenating them: stage 1 the request's prefix blocks (no mask), stage 2 its own blocks with
the causal mask (earlier chunks included).

Reference: :func:`prefixserve.kernels.reference.naive_prefix_attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import LOG2E, attend_paged_keys, block_d, dot_precision, upcast_flag
from .triton_plan import StepPlan


@triton.jit(do_not_specialize=["stride_bt", "stride_pt"])
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    cu_q_lens_ptr,
    own_lens_ptr,
    block_tables_ptr,
    prefix_index_ptr,
    prefix_lens_ptr,
    prefix_tables_ptr,
    tile_req_ptr,
    tile_q0_ptr,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    stride_pt,
    GQA: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """Program (work tile w, kv head): row ``r`` is query ``q0 + r // G`` of request
    ``tile_req[w]`` and head ``kvh * G + r % G``. Query ``i`` has own index ``N - q_len + i`` and
    sees every prefix key and own keys ``0 ..`` that index.
    Reference: ``naive_prefix_attention``."""
    w = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.load(tile_req_ptr + w)
    q0 = tl.load(tile_q0_ptr + w)
    q_start = tl.load(cu_q_lens_ptr + b)
    q_len = tl.load(cu_q_lens_ptr + b + 1) - q_start
    own_len = tl.load(own_lens_ptr + b)
    prefix = tl.load(prefix_index_ptr + b)
    pre_len = tl.where(prefix >= 0, tl.load(prefix_lens_ptr + tl.maximum(prefix, 0)), 0)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tok = q0 + offs_m // GQA
    head = kvh * GQA + offs_m % GQA
    row_valid = (offs_m < BLOCK_Q * GQA) & (tok < q_len)
    d_valid = offs_d < HEAD_DIM
    q_mask = row_valid[:, None] & d_valid[None, :]
    t = (q_start + tok).to(tl.int64)
    q = tl.load(
        q_ptr + t[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
        mask=q_mask,
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
    own_index = own_len - q_len + tok  # [BLOCK_M]

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    cache = (k_cache_ptr, v_cache_ptr, stride_cb, stride_cs, stride_ch)
    # stage 1: prefix keys, all visible
    table = prefix_tables_ptr + tl.maximum(prefix, 0).to(tl.int64) * stride_pt
    m_i, l_i, acc = attend_paged_keys(
        q, m_i, l_i, acc, cache, table, 0, pre_len, own_index, kvh,
        offs_d, d_valid, qk_scale, False, BLOCK_N, PAGE, UPCAST, PREC,
    )  # fmt: skip
    # stage 2: own keys up to the tile's last query, causal
    table = block_tables_ptr + b.to(tl.int64) * stride_bt
    own_hi = own_len - q_len + tl.minimum(q0 + BLOCK_Q, q_len)
    m_i, l_i, acc = attend_paged_keys(
        q, m_i, l_i, acc, cache, table, 0, own_hi, own_index, kvh,
        offs_d, d_valid, qk_scale, True, BLOCK_N, PAGE, UPCAST, PREC,
    )  # fmt: skip

    out = out_ptr + t[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    tl.store(out, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=q_mask)


def prefill_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: StepPlan, scale: float
) -> torch.Tensor:
    """Varlen attention: ``query [T, Hq, D]`` packed by ``plan.meta.cu_q_lens`` -> ``[T, Hq, D]``.
    Handles any mix of prefill chunks and single-token requests in one launch."""
    work = plan.prefill
    assert work is not None
    meta = plan.meta
    out = torch.empty_like(query)
    num_tiles = work.tile_req.numel()
    head_dim = query.shape[2]
    gqa = query.shape[1] // plan.num_kv_heads
    _prefill_kernel[(num_tiles, plan.num_kv_heads)](
        query,
        k_cache,
        v_cache,
        out,
        meta.cu_q_lens,
        meta.own_lens,
        meta.block_tables,
        meta.prefix_index,
        meta.prefix_lens,
        meta.prefix_block_tables,
        work.tile_req,
        work.tile_q0,
        scale * LOG2E,
        query.stride(0),
        query.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        meta.block_tables.stride(0),
        meta.prefix_block_tables.stride(0),
        GQA=gqa,
        HEAD_DIM=head_dim,
        BLOCK_M=work.tiles.block_m,
        BLOCK_Q=work.tiles.block_m // gqa,
        BLOCK_D=block_d(head_dim),
        BLOCK_N=work.tiles.block_n,
        PAGE=meta.block_size,
        UPCAST=upcast_flag(query.dtype),
        PREC=dot_precision(query.dtype),
        num_warps=work.tiles.num_warps,
        num_stages=work.tiles.num_stages,
    )
    return out
