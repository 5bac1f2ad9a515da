"""Random paged-attention scenarios for the kernel tests (test helpers, not shipped).

A scenario is a batch of requests with given query lengths, own lengths and prefix assignment,
laid out in a shuffled paged pool exactly as the engine would lay it out (prefix blocks shared by
all requests of an adapter, own blocks private, a prefix's last block possibly partial).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from prefixserve.kernels.metadata import AttentionMetadata


@dataclass(slots=True)
class Scenario:
    query: torch.Tensor
    """(T, Hq, D): this step's queries."""
    key: torch.Tensor
    """(T, Hkv, D): this step's new keys (already written into the cache)."""
    value: torch.Tensor
    """(T, Hkv, D)."""
    k_cache: torch.Tensor
    """(num_blocks, block_size, Hkv, D)."""
    v_cache: torch.Tensor
    meta: AttentionMetadata
    scale: float

    def to(self, device: str | torch.device) -> Scenario:
        return Scenario(
            query=self.query.to(device),
            key=self.key.to(device),
            value=self.value.to(device),
            k_cache=self.k_cache.to(device),
            v_cache=self.v_cache.to(device),
            meta=self.meta.to(device),
            scale=self.scale,
        )


def adapter_mix(kind: str, batch: int, num_prefixes: int, seed: int = 0) -> list[int]:
    """Prefix index per request (-1 = none) for a named popularity mix:
    ``distinct``, ``zipf``, ``identical``, ``half_none`` or ``none``."""
    rng = random.Random(seed)
    if kind == "none" or num_prefixes == 0:
        return [-1] * batch
    if kind == "distinct":
        return [b % num_prefixes for b in range(batch)]
    if kind == "identical":
        return [0] * batch
    if kind == "zipf":
        weights = [1.0 / (r + 1) for r in range(num_prefixes)]
        return rng.choices(range(num_prefixes), weights=weights, k=batch)
    if kind == "half_none":
        return [(b % num_prefixes) if b % 2 else -1 for b in range(batch)]
    raise ValueError(f"unknown adapter mix {kind!r}")


def make_scenario(
    q_lens: list[int],
    own_lens: list[int],
    prefix_index: list[int],
    prefix_lens: list[int],
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    spare_first_block: bool = False,
) -> Scenario:
    """Build a scenario; request ``b`` has ``own_lens[b] >= q_lens[b]`` own tokens after the step,
    of which the last ``q_lens[b]`` are this step's queries (written via ``slot_mapping``).
    ``spare_first_block``: no table uses block 0 (where padded table entries point), so a kernel
    that reads padding shows up once unreadable slots are poisoned."""
    if not (len(q_lens) == len(own_lens) == len(prefix_index)):
        raise ValueError("q_lens, own_lens and prefix_index must have one entry per request")
    if any(q > n or q < 1 for q, n in zip(q_lens, own_lens)):
        raise ValueError("each request needs 1 <= q_len <= own_len")
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)

    def blocks_for(n: int) -> int:
        return (n + block_size - 1) // block_size

    need = sum(blocks_for(n) for n in own_lens) + sum(blocks_for(p) for p in prefix_lens)
    num_blocks = need + 3  # a few unused blocks so stray reads show up as wrong values
    free = list(range(1 if spare_first_block else 0, num_blocks))
    rng.shuffle(free)

    prefix_tables = [[free.pop() for _ in range(blocks_for(p))] for p in prefix_lens]
    own_tables = [[free.pop() for _ in range(blocks_for(n))] for n in own_lens]
    width = max([len(t) for t in own_tables] + [1])
    pwidth = max([len(t) for t in prefix_tables] + [1])

    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    slots: list[int] = []
    for table, n, q in zip(own_tables, own_lens, q_lens):
        slots += [table[t // block_size] * block_size + t % block_size for t in range(n - q, n)]
    total = sum(q_lens)
    query = torch.randn(total, num_q_heads, head_dim, generator=gen).to(dtype)
    key = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
    value = torch.randn(total, num_kv_heads, head_dim, generator=gen).to(dtype)
    slot_mapping = torch.tensor(slots, dtype=torch.int64)
    k_cache.view(-1, num_kv_heads, head_dim)[slot_mapping] = key
    v_cache.view(-1, num_kv_heads, head_dim)[slot_mapping] = value

    cu = [0]
    for q in q_lens:
        cu.append(cu[-1] + q)
    meta = AttentionMetadata(
        cu_q_lens=torch.tensor(cu, dtype=torch.int32),
        own_lens=torch.tensor(own_lens, dtype=torch.int32),
        block_tables=torch.tensor(
            [t + [0] * (width - len(t)) for t in own_tables], dtype=torch.int32
        ),
        slot_mapping=slot_mapping,
        prefix_index=torch.tensor(prefix_index, dtype=torch.int32),
        prefix_lens=torch.tensor(prefix_lens, dtype=torch.int32),
        prefix_block_tables=torch.tensor(
            [t + [0] * (pwidth - len(t)) for t in prefix_tables] or [[0]], dtype=torch.int32
        )[: len(prefix_lens)],
        block_size=block_size,
        max_q_len=max(q_lens),
    )
    scenario = Scenario(
        query=query,
        key=key,
        value=value,
        k_cache=k_cache,
        v_cache=v_cache,
        meta=meta,
        scale=head_dim**-0.5,
    )
    return scenario.to(device) if str(device) != "cpu" else scenario


def readable_slots(meta: AttentionMetadata) -> torch.Tensor:
    """(S,) int64: every pool slot some request of ``meta`` may read (its own tokens and its
    prefix's). The rest of the pool (free blocks, other tenants' data, the unwritten tails of
    partly filled blocks) must never influence any output."""
    bs = meta.block_size
    slots: list[torch.Tensor] = []
    for b in range(meta.num_requests):
        n_own = int(meta.own_lens[b])
        pos = torch.arange(n_own)
        slots.append(meta.block_tables[b].long().cpu()[pos // bs] * bs + pos % bs)
        pid = int(meta.prefix_index[b])
        if pid >= 0:
            pos = torch.arange(int(meta.prefix_lens[pid]))
            slots.append(meta.prefix_block_tables[pid].long().cpu()[pos // bs] * bs + pos % bs)
    return torch.cat(slots).unique()


def poison_unreadable(scenario: Scenario, value: float) -> None:
    """Fill every slot no request of ``scenario`` may read with ``value`` (NaN, inf or a huge
    finite number), in place: a kernel whose output changes has read what it must not."""
    for cache in (scenario.k_cache, scenario.v_cache):
        flat = cache.view(-1, *cache.shape[2:])
        keep = torch.zeros(flat.shape[0], dtype=torch.bool)
        keep[readable_slots(scenario.meta)] = True
        flat[(~keep).to(flat.device)] = value
