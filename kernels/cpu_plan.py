"""Per-step planning for the native CPU attention op: the step's work as tiles, decided once from
host metadata and reused by every layer (the op runs each tile once per kv head).

    plan = plan_cpu_step(meta)                                             # once per step
    out = paged_prefix_attention(query, k_cache, v_cache, plan, scale)     # per layer

* A **query tile** is up to ``QUERY_TILE_TOKENS`` consecutive queries of one request. It attends
  to the request's prefix (unless its prefix is grouped) and, causally, to its own keys.
* A **prefix tile** is up to ``QUERY_TILE_TOKENS`` query tokens of the requests that share one
  adapter prefix (decodes and prefill chunks alike: every query sees the whole prefix). It reads
  the prefix once for all of them, as one matrix product per chunk of keys, and leaves a partial
  softmax state that their query tiles continue from (the log-sum-exp merge).

Which prefixes are grouped is :func:`prefer_grouped`'s call. Tiles are listed longest first so
that the op's threads, taking the next tile as they finish one, end together.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .cpu_isa import BF16_ISAS
from .kv_write import KVWrite
from .metadata import AttentionMetadata

QUERY_TILE_TOKENS = 32
"""Most query tokens in one tile (times the query heads of a kv head: the tile's rows)."""
MIN_PREFIX_TILE_TOKENS = 8
"""A group is split into at least one tile per thread, but not below this many tokens a tile."""
NO_PREFIX, READ_PREFIX, GROUPED_PREFIX = 0, 1, 2
"""Prefix mode of a query tile: none, read by the tile itself, continued from a prefix tile."""


@dataclass(frozen=True, slots=True)
class DispatchRule:
    """When to group a prefix's requests (see :func:`prefer_grouped`)."""

    min_saved_keys: int = 256
    """Group iff it saves reading at least this many prefix keys (per kv head and layer)."""
    min_reads_per_tile: int = 1
    """... and the plain reads are at least this many per prefix tile ..."""
    min_prefix_len: int = 0
    """... and the prefix has at least this many tokens."""

    @classmethod
    def for_step(cls, isa: str, dtype: torch.dtype, head_dim: int) -> DispatchRule:
        """The rule measured for the kernel a step runs. With bf16 caches on AVX512-BF16 the
        op's decode tiles run row by row (``attend_rowwise``: a key's scores by ``vdpbf16ps``
        on the bf16 row in place) at about a third of the row-vector tiles' time, which prefix
        tiles keep (scores on bf16 pairs, values in fp32); grouping then pays only from 4
        requests per prefix tile and 32 prefix tokens (``bench_cpu_attention.py --dtype
        bfloat16``: a 512-token prefix shared by 2 decodes, grouped 1.51 ms against plain 1.28;
        by 4, 0.80 against 1.06)."""
        if isa in BF16_ISAS and dtype == torch.bfloat16 and head_dim % 64 == 0:
            return cls(min_saved_keys=256, min_reads_per_tile=4, min_prefix_len=32)
        return cls()


@dataclass(slots=True)
class CPUStepPlan:
    """Layer-independent work of one step for ``torch.ops.prefixserve.paged_prefix_attention``."""

    meta: AttentionMetadata
    """The step's host metadata (int32 tensors, as the op reads them)."""
    query_tiles: torch.Tensor
    """(NQ, 4) int32: request, first query (within the request), queries, prefix mode."""
    prefix_tiles: torch.Tensor
    """(NG, 3) int32: prefix row, begin, end: the tile's tokens are ``prefix_tokens[begin:end]``."""
    prefix_tokens: torch.Tensor
    """(TG,) int32: packed query tokens of the grouped requests, each group's together."""
    isa: str
    """Instruction set the op runs with (one of :func:`~prefixserve.kernels.cpu_isa.cpu_isas`)."""
    kv_write: KVWrite
    """Where each layer writes the step's K/V (padding rows left out), resolved once."""
    stats: dict[str, int] = field(default_factory=dict)
    """Prefix keys read per kv head with this plan (``prefix_keys``) and with no grouping
    (``plain_prefix_keys``), grouped prefixes and tile counts: for tests and benchmarks."""


def prefer_grouped(
    plain_reads: int, grouped_reads: int, prefix_len: int, rule: DispatchRule
) -> bool:
    """The dispatch rule: read a prefix once per prefix tile (grouped) or once per query tile of
    each request using it (plain)?

    Plain reads the prefix ``plain_reads = sum_b ceil(q_len_b / 32)`` times per kv head; grouped
    ``grouped_reads`` times (its tiles of up to 32 tokens), plus one store and one load of a
    partial state per query row. Each read is a ``[rows, D] x [D, P]`` product whose rows fill
    whole vectors, so grouping also stops decodes (``Hq / Hkv`` rows each) from padding a vector
    apiece. Hence::

        grouped  iff  (plain_reads - grouped_reads) * prefix_len >= min_saved_keys

    (and the further conditions of :meth:`DispatchRule.for_step` where decodes run row by
    row). Measured with ``benchmarks/kernels/bench_cpu_attention.py`` (table "grouped vs
    plain").
    """
    return (
        (plain_reads - grouped_reads) * prefix_len >= rule.min_saved_keys
        and plain_reads >= rule.min_reads_per_tile * grouped_reads
        and prefix_len >= rule.min_prefix_len
    )


def plan_cpu_step(
    meta: AttentionMetadata,
    isa: str,
    *,
    prefix_mode: str = "auto",
    rule: DispatchRule = DispatchRule(),
    num_threads: int | None = None,
) -> CPUStepPlan:
    """Plan one step from host metadata. ``prefix_mode``: ``"auto"`` (:func:`prefer_grouped`),
    ``"plain"`` or ``"grouped"`` (every prefix in use; tests and benchmarks). ``num_threads``
    (default: torch's) sets how finely groups are split."""
    if prefix_mode not in ("auto", "plain", "grouped"):
        raise ValueError(f"prefix_mode must be auto, plain or grouped, got {prefix_mode!r}")
    if meta.own_lens.device.type != "cpu":
        raise ValueError(f"plan_cpu_step takes host metadata, got it on {meta.own_lens.device}")
    cu = meta.cu_q_lens.numpy().astype(np.int64)
    q_lens = np.diff(cu)
    own_lens = meta.own_lens.numpy().astype(np.int64)
    prefix_index = meta.prefix_index.numpy().astype(np.int64)
    prefix_lens = meta.prefix_lens.numpy().astype(np.int64)
    threads = num_threads or torch.get_num_threads()

    groups = _prefix_groups(cu, prefix_index, prefix_lens, threads)
    grouped = np.zeros(len(prefix_lens), dtype=bool)
    for group in groups:
        grouped[group.prefix] = prefix_mode == "grouped" or (
            prefix_mode == "auto"
            and prefer_grouped(group.plain_reads, len(group.tiles), group.prefix_len, rule)
        )
    has_prefix = prefix_index >= 0
    request_grouped = np.zeros(len(q_lens), dtype=bool)
    request_grouped[has_prefix] = grouped[prefix_index[has_prefix]]
    request_prefix_lens = np.zeros(len(q_lens), dtype=np.int64)
    request_prefix_lens[has_prefix] = prefix_lens[prefix_index[has_prefix]]
    modes = np.where(has_prefix, np.where(request_grouped, GROUPED_PREFIX, READ_PREFIX), NO_PREFIX)
    query_tiles = _query_tiles(q_lens, own_lens, request_prefix_lens, modes)
    kept = [g for g in groups if grouped[g.prefix]]
    prefix_tiles, prefix_tokens = _pack_prefix_tiles(kept)
    reads = [(len(g.tiles) if grouped[g.prefix] else g.plain_reads, g) for g in groups]
    return CPUStepPlan(
        meta=meta,
        query_tiles=torch.from_numpy(query_tiles),
        prefix_tiles=torch.from_numpy(prefix_tiles),
        prefix_tokens=torch.from_numpy(prefix_tokens),
        isa=isa,
        kv_write=KVWrite.of(meta.slot_mapping),
        stats={
            "grouped_prefixes": len(kept),
            "query_tiles": len(query_tiles),
            "prefix_tiles": len(prefix_tiles),
            "plain_prefix_keys": sum(g.plain_reads * g.prefix_len for g in groups),
            "prefix_keys": sum(n * g.prefix_len for n, g in reads),
        },
    )


@dataclass(slots=True)
class _Group:
    """The requests of one prefix in this step, cut into candidate prefix tiles."""

    prefix: int
    prefix_len: int
    plain_reads: int
    """Query tiles of its requests (each would read the prefix)."""
    tiles: list[np.ndarray]
    """Token indices of each prefix tile."""


def _prefix_groups(
    cu: np.ndarray, prefix_index: np.ndarray, prefix_lens: np.ndarray, threads: int
) -> list[_Group]:
    """Every prefix in use, its query tokens cut into tiles of 8-32 tokens: at least one tile
    per thread where the group is large enough, so that a single group keeps all threads busy."""
    groups = []
    for prefix in np.unique(prefix_index[prefix_index >= 0]):
        requests = np.flatnonzero(prefix_index == prefix)
        tokens = np.concatenate([np.arange(cu[b], cu[b + 1]) for b in requests])
        size = -(-len(tokens) // threads)
        size = min(QUERY_TILE_TOKENS, max(MIN_PREFIX_TILE_TOKENS, size))
        q_tiles = -(-(cu[requests + 1] - cu[requests]) // QUERY_TILE_TOKENS)
        groups.append(
            _Group(
                prefix=int(prefix),
                prefix_len=int(prefix_lens[prefix]),
                plain_reads=int(q_tiles.sum()),
                tiles=np.array_split(tokens, -(-len(tokens) // size)),
            )
        )
    return groups


def _query_tiles(
    q_lens: np.ndarray, own_lens: np.ndarray, prefix_lens: np.ndarray, modes: np.ndarray
) -> np.ndarray:
    """(NQ, 4) int32 query tiles, costliest first (cost: queries x keys visited)."""
    per_request = -(-q_lens // QUERY_TILE_TOKENS)
    request = np.repeat(np.arange(len(q_lens)), per_request)
    first_tile = np.repeat(np.cumsum(per_request) - per_request, per_request)
    first = (np.arange(len(request)) - first_tile) * QUERY_TILE_TOKENS
    count = np.minimum(QUERY_TILE_TOKENS, q_lens[request] - first)
    keys = own_lens[request] - q_lens[request] + first + count
    keys = keys + np.where(modes[request] == READ_PREFIX, prefix_lens[request], 0)
    order = np.argsort(-(count * keys), kind="stable")
    tiles = np.stack([request, first, count, modes[request]], axis=1)[order]
    return np.ascontiguousarray(tiles, dtype=np.int32)


def _pack_prefix_tiles(groups: list[_Group]) -> tuple[np.ndarray, np.ndarray]:
    """(NG, 3) int32 prefix tiles, costliest first, and the (TG,) int32 tokens they index."""
    rows, tokens, begin = [], [], 0
    for group in groups:
        for tile in group.tiles:
            rows.append((group.prefix, begin, begin + len(tile), len(tile) * group.prefix_len))
            tokens.append(tile)
            begin += len(tile)
    if not rows:
        return np.zeros((0, 3), dtype=np.int32), np.zeros((0,), dtype=np.int32)
    table = np.array(rows, dtype=np.int64)
    order = np.argsort(-table[:, 3], kind="stable")
    return (
        np.ascontiguousarray(table[order, :3], dtype=np.int32),
        np.concatenate(tokens).astype(np.int32),
    )
