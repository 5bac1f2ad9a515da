"""Writing a step's K/V into the paged pool, in PyTorch.

What the engine runs to store K/V on the CPU backends (the native one resolves the slots once per
step as a :class:`KVWrite`), to copy an adapter's prefix KV into the pool on every device, and
the reference for the Triton kernel (:mod:`prefixserve.kernels.triton_kv_write`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Scatter this step's ``key, value [T, Hkv, D]`` into ``k_cache, v_cache
    [num_blocks, block_size, Hkv, D]`` at ``slot_mapping [T]`` (int64 slots; a negative slot is
    padding and writes nothing, as in every backend)."""
    scatter_kv(key, value, k_cache, v_cache, KVWrite.of(slot_mapping))


@dataclass(frozen=True, slots=True)
class KVWrite:
    """Where a step's K/V rows go, decided once per step (so layers do not check slots)."""

    rows: torch.Tensor | None
    """(W,) int64: the token rows written; None when every row is (no padding)."""
    slots: torch.Tensor
    """(W,) int64: their pool slots."""

    @classmethod
    def of(cls, slot_mapping: torch.Tensor) -> KVWrite:
        """The rows of ``slot_mapping [T]`` with a slot (a negative slot is padding)."""
        real = slot_mapping >= 0
        if bool(real.all()):
            return cls(None, slot_mapping)
        rows = real.nonzero().squeeze(1)
        return cls(rows, slot_mapping[rows])


def scatter_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    write: KVWrite,
) -> None:
    """:func:`write_kv` with the slots resolved beforehand."""
    if write.rows is not None:
        key, value = key[write.rows], value[write.rows]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, write.slots, key.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, write.slots, value.to(v_cache.dtype))
