"""Pure-PyTorch prefix-augmented paged attention: the reference for every kernel (the torch
backend runs it, also as the CPU fallback), and :func:`naive_prefix_attention`, the plain loop
that is the oracle for it and for the kernels. Writing K/V into the pool is
:mod:`prefixserve.kernels.kv_write`.

For request ``b`` with prefix ``p = prefix_index[b]`` (``P = prefix_lens[p]``, or 0) and own length
``N = own_lens[b]``, its keys are the concatenation ``[K_prefix(p) ; K_own(b)]`` of length
``P + N``, gathered from the paged pool. Query ``i`` of the request (own index
``N - q_len + i``) sees every prefix key and the own keys up to and including its own index:

    out_i = softmax(q_i [K_prefix ; K_own]^T * scale + mask_i) [V_prefix ; V_own]

The layer-independent work (which slots to gather, which query sees which key) is done once per
step by :func:`build_gather_plan`; each layer then costs one gather and one SDPA call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .metadata import AttentionMetadata


@dataclass(slots=True)
class GatherGroup:
    """Padded view of a group of requests with similar query lengths."""

    kv_slots: torch.Tensor
    """(B, L) int64: pool slot of each request's j-th key (prefix first, then own)."""
    q_index: torch.Tensor
    """(B, Q) int64: packed index of each request's i-th query (0 where padded)."""
    q_valid: torch.Tensor
    """(B, Q) bool: which padded query rows are real."""
    mask: torch.Tensor
    """(B, 1, Q, L) bool: True where query i may attend to key j."""
    out_index: torch.Tensor
    """(N,) int64: packed index of each real query, in the order SDPA returns them."""


@dataclass(slots=True)
class GatherPlan:
    """The step as padded groups (shared by all layers). Requests are grouped by kind (decode or
    prefill chunk) and by KV length within a factor of two, so one long prompt or context does
    not pad every other request to its length."""

    groups: list[GatherGroup]
    slot_mapping: torch.Tensor
    """(T,) int64: where this step's K/V are written."""


def build_gather_plan(meta: AttentionMetadata) -> GatherPlan:
    """Turn ``meta`` into gather indices and boolean masks (see the module docstring)."""
    kv_lens = (meta.request_prefix_lens + meta.own_lens).long()
    key = torch.log2(kv_lens.double()).floor().long() * 2 + (meta.q_lens > 1).long()
    groups = [_gather_group(meta, (key == k).nonzero().squeeze(1)) for k in key.unique()]
    return GatherPlan(groups=groups, slot_mapping=meta.slot_mapping)


def _gather_group(meta: AttentionMetadata, rows: torch.Tensor) -> GatherGroup:
    device = meta.own_lens.device
    bs = meta.block_size
    q_lens = meta.q_lens.long()[rows]
    own_lens = meta.own_lens.long()[rows]
    pre_lens = meta.request_prefix_lens.long()[rows]
    block_tables = meta.block_tables.long()[rows]
    num_q, num_kv = int(q_lens.max()), int((pre_lens + own_lens).max())

    j = torch.arange(num_kv, device=device).unsqueeze(0)  # [1, L]
    is_prefix = j < pre_lens[:, None]
    own_j = (j - pre_lens[:, None]).clamp(min=0)
    own_col = (own_j // bs).clamp(max=block_tables.shape[1] - 1)
    own_slot = block_tables.gather(1, own_col) * bs + own_j % bs
    if meta.prefix_block_tables.numel() > 0:
        tables = meta.prefix_block_tables.long()[meta.prefix_index[rows].clamp(min=0).long()]
        pre_col = (j // bs).clamp(max=tables.shape[1] - 1).expand(tables.shape[0], -1)
        pre_slot = tables.gather(1, pre_col) * bs + j % bs
        kv_slots = torch.where(is_prefix, pre_slot, own_slot)
    else:
        kv_slots = own_slot
    kv_valid = j < (pre_lens + own_lens)[:, None]
    # A padded key repeats the request's own first key (a slot it may read anyway), never another
    # slot of the pool: SDPA masks by adding -inf, and a score that overflowed to +inf would turn
    # into NaN. So no value stored for another request or adapter can reach this one's output.
    kv_slots = torch.where(kv_valid, kv_slots, kv_slots[:, :1])

    i = torch.arange(num_q, device=device).unsqueeze(0)  # [1, Q]
    q_valid = i < q_lens[:, None]
    starts = meta.cu_q_lens[:-1].long()[rows]
    q_index = torch.where(q_valid, starts[:, None] + i, starts[:, None])  # padded: own first
    q_own_index = (own_lens - q_lens)[:, None] + i  # [B, Q]
    visible = is_prefix[:, None, :] | (own_j[:, None, :] <= q_own_index[:, :, None])
    mask = visible & kv_valid[:, None, :]
    # Padded query rows attend to the request's first key so SDPA returns finite values; they
    # are dropped.
    mask = mask | (~q_valid[:, :, None] & (j == 0)[:, None, :])
    return GatherGroup(
        kv_slots=kv_slots,
        q_index=q_index,
        q_valid=q_valid,
        mask=mask[:, None],
        out_index=q_index[q_valid],
    )


def paged_prefix_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: GatherPlan,
    scale: float,
) -> torch.Tensor:
    """Attention of ``query [T, Hq, D]`` over each request's prefix and own paged KV.

    ``k_cache, v_cache``: ``[num_blocks, block_size, Hkv, D]`` with ``Hq % Hkv == 0``.
    Returns ``[T, Hq, D]`` in the query's dtype; softmax and accumulation follow SDPA.
    """
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    if len(plan.groups) == 1:
        return _attend_group(query, flat_k, flat_v, plan.groups[0], scale)
    out = torch.empty_like(query)
    for group in plan.groups:
        out[group.out_index] = _attend_group(query, flat_k, flat_v, group, scale)
    return out


def _attend_group(
    query: torch.Tensor,
    flat_k: torch.Tensor,
    flat_v: torch.Tensor,
    group: GatherGroup,
    scale: float,
) -> torch.Tensor:
    """``[N, Hq, D]`` for the group's real queries, in ``group.out_index`` order."""
    keys = flat_k[group.kv_slots]  # [B, L, Hkv, D]
    values = flat_v[group.kv_slots]
    q = query[group.q_index]  # [B, Q, Hq, D]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        keys.transpose(1, 2).to(q.dtype),
        values.transpose(1, 2).to(q.dtype),
        attn_mask=group.mask,
        scale=scale,
        enable_gqa=query.shape[1] != flat_k.shape[1],
    )  # [B, Hq, Q, D]
    return out.transpose(1, 2)[group.q_valid]


def paged_prefix_attention_from_metadata(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """One-shot form of :func:`paged_prefix_attention` (builds the plan; for tests)."""
    return paged_prefix_attention(query, k_cache, v_cache, build_gather_plan(meta), scale)


def naive_prefix_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The same attention written as a plain per-request loop in fp32 (or ``compute_dtype``:
    float64 bounds the error of bf16 kernels): the oracle for the vectorized reference and for
    the kernels. Returns ``[T, Hq, D]`` in ``compute_dtype``."""
    bs = meta.block_size
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    groups = query.shape[1] // num_kv_heads
    flat_k = k_cache.reshape(-1, num_kv_heads, head_dim).to(compute_dtype)
    flat_v = v_cache.reshape(-1, num_kv_heads, head_dim).to(compute_dtype)

    def slots(table: torch.Tensor, n: int) -> torch.Tensor:
        pos = torch.arange(n, device=table.device)
        return table.long()[pos // bs] * bs + pos % bs

    out = torch.empty(query.shape, dtype=compute_dtype, device=query.device)
    for b in range(meta.num_requests):
        start, end = int(meta.cu_q_lens[b]), int(meta.cu_q_lens[b + 1])
        n_own, q_len = int(meta.own_lens[b]), end - start
        pid = int(meta.prefix_index[b])
        n_pre = int(meta.prefix_lens[pid]) if pid >= 0 else 0
        kv = slots(meta.block_tables[b], n_own)
        if n_pre:
            kv = torch.cat([slots(meta.prefix_block_tables[pid], n_pre), kv])
        k = flat_k[kv].repeat_interleave(groups, dim=1)  # [L, Hq, D]
        v = flat_v[kv].repeat_interleave(groups, dim=1)
        q = query[start:end].to(compute_dtype)  # [q_len, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", q, k) * scale
        own_index = torch.arange(n_own - q_len, n_own, device=q.device)[:, None]
        key_own = torch.arange(n_own, device=q.device)[None, :]
        allowed = torch.cat(
            [torch.ones(q_len, n_pre, dtype=torch.bool, device=q.device), key_own <= own_index],
            dim=1,
        )
        scores = scores.masked_fill(~allowed, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out
