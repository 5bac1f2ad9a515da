"""The paged KV pool: block tensors for every layer and a block allocator.

A block is owned either by one request (its own tokens) or by an adapter's prefix (read by every
request of that adapter through the prefix table, never copied), never by both: prefixes are
shared by reference to the prefix, not by counting a block's owners.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that ``num_tokens`` tokens occupy."""
    return -(-num_tokens // block_size)


class BlockAllocator:
    """Hands out block ids of a pool of ``num_blocks``; each block has one owner (a request or
    a prefix) until it is freed, and a double free is caught where it happens."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._in_use = [False] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """Take ``n`` free blocks, or ``None`` if fewer are free."""
        if n > len(self._free):
            return None
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._in_use[b] = True
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Give ``blocks`` back to the pool."""
        for b in blocks:
            assert self._in_use[b], f"block {b} freed twice"
            self._in_use[b] = False
            self._free.append(b)

    def in_use(self, block: int) -> bool:
        return self._in_use[block]


@dataclass(frozen=True, slots=True)
class KVCacheSpec:
    """The shape of the pool, derived from the model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def bytes_per_block(self) -> int:
        """K and V of one block across every layer."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem


class KVCachePool:
    """K and V tensors of shape ``[num_layers, num_blocks, block_size, num_kv_heads, head_dim]``."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, device: torch.device) -> None:
        shape = (spec.num_layers, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
        self.spec = spec
        self.num_blocks = num_blocks
        self.device = device
        self.k = torch.zeros(shape, dtype=spec.dtype, device=device)
        self.v = torch.zeros(shape, dtype=spec.dtype, device=device)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k_cache, v_cache)`` of one layer, each ``[num_blocks, block_size, Hkv, D]``."""
        return self.k[index], self.v[index]


def size_pool(
    spec: KVCacheSpec,
    device: torch.device,
    num_blocks: int | None,
    memory_fraction: float,
    cpu_memory_gib: float,
) -> int:
    """Number of blocks for the pool: explicit, else from free CUDA memory or a CPU budget."""
    if num_blocks is not None:
        return num_blocks
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * memory_fraction)
    else:
        budget = int(cpu_memory_gib * 2**30)
    blocks = budget // spec.bytes_per_block
    if blocks < 1:
        raise ValueError(
            f"not enough memory for one KV block ({spec.bytes_per_block} bytes); "
            "lower block_size or give the pool more memory"
        )
    return blocks
