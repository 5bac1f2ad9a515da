"""Triton KV write: scatter this step's keys and values into their slots of the paged pool.

Reference: :func:`prefixserve.kernels.kv_write.write_kv`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import block_d, check_index, check_kv_cache, check_tokens


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_cs,
    stride_ch,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr,
):
    """One program per token: copy ``key[t], value[t] [Hkv, D]`` to slot ``slot_mapping[t]``.
    Reference: ``kv_write.write_kv`` (a negative slot means "padding, write nothing")."""
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_KV_HEADS)[:, None] & (offs_d < HEAD_DIM)[None, :]
    src_k = key_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :]
    src_v = value_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
    dst = (slot // PAGE) * stride_cb + (slot % PAGE) * stride_cs
    dst += offs_h[:, None] * stride_ch + offs_d[None, :]
    tl.store(k_cache_ptr + dst, tl.load(src_k, mask=mask), mask=mask)
    tl.store(v_cache_ptr + dst, tl.load(src_v, mask=mask), mask=mask)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter ``key, value [T, Hkv, D]`` into ``k_cache, v_cache [num_blocks, block_size, Hkv, D]``
    at ``slot_mapping [T]`` (int64; slot = block * block_size + offset; -1 skips a token).

    ``key``/``value`` must have the cache's dtype and device; ``k_cache`` and ``v_cache`` must
    share strides (they are two halves of one pool in the engine, or two equal tensors).
    """
    check_kv_cache(k_cache, v_cache)
    num_kv_heads = k_cache.shape[2]
    check_tokens("key", key, k_cache, num_kv_heads)
    check_tokens("value", value, k_cache, num_kv_heads)
    check_index("slot_mapping", slot_mapping, torch.int64, k_cache.device)
    if key.shape[0] != slot_mapping.shape[0] or value.shape[0] != slot_mapping.shape[0]:
        raise ValueError(
            f"key {tuple(key.shape)}, value {tuple(value.shape)} and slot_mapping "
            f"{tuple(slot_mapping.shape)} need the same number of tokens"
        )
    if k_cache.stride() != v_cache.stride():
        raise ValueError(
            f"k_cache strides {k_cache.stride()} != v_cache strides {v_cache.stride()}"
        )
    launch_write_kv(key, value, k_cache, v_cache, slot_mapping)


def launch_write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """:func:`write_kv` without its checks (the engine's layers, whose shapes were planned)."""
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    num_kv_heads = k_cache.shape[2]
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=k_cache.shape[3],
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=block_d(k_cache.shape[3]),
        PAGE=k_cache.shape[1],
    )
