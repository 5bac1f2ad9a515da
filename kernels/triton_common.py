"""Pieces shared by the Triton attention kernels: interpreter detection, per-dtype flags,
input validation and the two jit helpers every attention kernel is built from.

Conventions used by all kernels:

* The paged pool of one layer is ``k_cache, v_cache [num_blocks, block_size, Hkv, D]``; a key's
  *logical position* ``j`` in a block table maps to ``table[j // block_size]`` and offset
  ``j % block_size``. Any positive ``block_size`` works (it is a compile-time constant).
* Query heads ``kvh * G .. kvh * G + G - 1`` share kv head ``kvh`` (``G = Hq // Hkv``); one program
  stacks them on the M side of its tile so each K/V tile is loaded once for the whole group.
* Softmax runs in base 2: scores are multiplied by ``scale * log2(e)``; a partial result's
  log-sum-exp (``lse``) is stored in base 2 as well (``m + log2(l)``, ``-inf`` when it saw no key).
* Scalars that change from step to step (split counts and offsets, block-table widths, workspace
  strides) are listed in each kernel's ``do_not_specialize``: Triton would otherwise compile a new
  variant in the middle of serving whenever one of them happens to equal 1 or a multiple of 16
  (a step whose block tables are one block wide, 16 KV splits). Strides fixed by the model (the
  pool's, and the queries' multiples of ``head_dim``) stay specialized: their divisibility is what
  lets K/V rows load as wide vectors. ``prefixserve.kernels.triton_launches`` enumerates the
  variants the engine can launch.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

INTERPRET: bool = os.environ.get("TRITON_INTERPRET") == "1"
"""True when the kernels run under the Triton CPU interpreter. The application (or a test suite)
sets ``TRITON_INTERPRET=1`` in the environment before Triton is first imported; this library
never sets it."""

LOG2E = math.log2(math.e)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def upcast_flag(dtype: torch.dtype) -> bool:
    """Whether kernels must upcast loaded tiles to fp32: bf16 ``tl.dot`` and bf16 arithmetic are
    wrong under the interpreter (triton issue 11584); fp16 and fp32 run natively there."""
    return INTERPRET and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: IEEE for fp32 (no TF32); ignored for fp16/bf16."""
    return "ieee" if dtype == torch.float32 else "tf32"


def block_d(head_dim: int) -> int:
    """Padded head-dim tile (a power of two, >= 16 so ``tl.dot`` compiles on a GPU)."""
    return max(16, triton.next_power_of_2(head_dim))


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small fixed number under the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def check_launchable(device: torch.device) -> None:
    """Raise a clear error where a Triton launch could only fail with '0 active drivers'."""
    if not INTERPRET and device.type != "cuda":
        raise RuntimeError(
            f"Triton kernels need CUDA tensors (got {device}); on a CPU they run only under the "
            "Triton interpreter: set TRITON_INTERPRET=1 in the environment before starting"
        )


def check_kv_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Validate ``k_cache, v_cache [num_blocks, block_size, Hkv, D]`` (same shape, dtype, device,
    unit stride on the head dimension)."""
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4:
            raise ValueError(
                f"{name} must be [num_blocks, block_size, Hkv, D], got {tuple(cache.shape)}"
            )
        if cache.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype {cache.dtype} not in {SUPPORTED_DTYPES}")
        if cache.stride(-1) != 1:
            raise ValueError(f"{name} needs unit stride on head_dim, got strides {cache.stride()}")
    if k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype:
        raise ValueError(
            f"k_cache {tuple(k_cache.shape)} {k_cache.dtype} and v_cache {tuple(v_cache.shape)} "
            f"{v_cache.dtype} must match"
        )
    if k_cache.device != v_cache.device:
        raise ValueError(f"k_cache on {k_cache.device} but v_cache on {v_cache.device}")
    check_launchable(k_cache.device)


def check_tokens(name: str, x: torch.Tensor, k_cache: torch.Tensor, heads: int | None) -> None:
    """Validate a packed per-token tensor ``x [T, H, D]`` against the cache (dtype, device, D)."""
    if x.dim() != 3:
        raise ValueError(f"{name} must be [T, heads, head_dim], got {tuple(x.shape)}")
    if x.dtype != k_cache.dtype:
        raise ValueError(f"{name} dtype {x.dtype} differs from the cache dtype {k_cache.dtype}")
    if x.device != k_cache.device:
        raise ValueError(f"{name} on {x.device} but the cache on {k_cache.device}")
    if x.shape[2] != k_cache.shape[3]:
        raise ValueError(f"{name} head_dim {x.shape[2]} != cache head_dim {k_cache.shape[3]}")
    if heads is not None and x.shape[1] != heads:
        raise ValueError(f"{name} has {x.shape[1]} heads, expected {heads}")
    if x.stride(-1) != 1:
        raise ValueError(f"{name} needs unit stride on head_dim, got strides {x.stride()}")


def check_index(name: str, x: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    """Validate an index tensor of the metadata (dtype and device; contiguous rows)."""
    if x.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} on {x.device} but the cache on {device}")
    if x.numel() and x.stride(-1) != 1:
        raise ValueError(f"{name} needs unit stride on its last dimension, got {x.stride()}")


@triton.jit
def attend_paged_keys(
    q,
    m_i,
    l_i,
    acc,
    cache,
    table_ptr,
    lo,
    hi,
    query_pos,
    kv_head,
    offs_d,
    d_valid,
    qk_scale,
    CAUSAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """Flash-attention updates of ``(m_i [M], l_i [M], acc [M, BLOCK_D])`` for queries
    ``q [M, BLOCK_D]`` over the keys/values of one kv head at logical positions ``[lo, hi)`` of
    the block table at ``table_ptr``, ``BLOCK_N`` keys at a time. ``cache`` is
    ``(k_cache_ptr, v_cache_ptr, stride_block, stride_slot, stride_head)`` of the paged pool.
    With ``CAUSAL``, row ``r`` sees position ``j`` only if ``j <= query_pos[r]`` (``query_pos
    [M]``: each row's own index); without, every position (``query_pos`` is not read).
    ``m_i`` starts at a large negative finite value, so a row that sees no key never produces
    NaN (its ``l_i`` stays 0)."""
    k_cache_ptr, v_cache_ptr, stride_block, stride_slot, stride_head = cache
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n
        pos_valid = pos < hi
        if CAUSAL:
            visible = pos_valid[None, :] & (pos[None, :] <= query_pos[:, None])
        else:
            visible = pos_valid[None, :]
        page = tl.load(table_ptr + pos // PAGE, mask=pos_valid, other=0).to(tl.int64)
        row = page * stride_block + (pos % PAGE) * stride_slot + kv_head * stride_head
        ptrs = row[:, None] + offs_d[None, :]
        mask = pos_valid[:, None] & d_valid[None, :]
        k = tl.load(k_cache_ptr + ptrs, mask=mask, other=0.0)
        v = tl.load(v_cache_ptr + ptrs, mask=mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    return m_i, l_i, acc
