"""Per-step planning for the Triton attention kernels: everything that is the same for every layer
of one step (which kernel, work lists, KV splits, scratch buffers) is decided here, once.

    plan = plan_step(meta_on_cpu, device="cuda")  # head counts and head_dim optional
    for layer in layers:
        out = prefix_paged_attention(q, k_cache[layer], v_cache[layer], plan, scale)

Give :func:`plan_step` host (CPU) metadata and a ``device`` when you have it: the host-side
decisions then need no device synchronization, and the metadata is copied to ``device`` once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton

from .metadata import AttentionMetadata
from .triton_common import INTERPRET, num_sms


@dataclass(frozen=True, slots=True)
class DispatchRule:
    """Knobs of the decode dispatch (:func:`prefer_grouped`) and of KV splitting. The defaults
    are estimates, not measurements: re-measure with ``benchmarks/kernels/bench_attention.py``
    (table (b) says whether the rule picked the faster kernel) on the target GPU."""

    min_saved_fraction: float = 0.2
    """Grouped only if it saves this fraction of the KV tokens plain decode reads..."""
    min_saved_tokens: int = 4096
    """...and at least this many tokens (per layer; each token is ``2 * Hkv * D`` elements)."""
    waves: float = 2.0
    """KV splitting aims for ``waves * num_SMs`` programs when the batch alone gives fewer."""
    min_split_tokens: int = 256
    """No split covers fewer keys than this (below it the merge costs more than it saves)."""
    max_splits: int = 32


@dataclass(frozen=True, slots=True)
class TileConfig:
    block_m: int
    """Rows of the query tile (query tokens x query heads of one kv head)."""
    block_n: int
    """Keys per inner-loop tile."""
    num_warps: int = 4
    num_stages: int = 2


def _tensor_cores(dtype: torch.dtype) -> bool:
    """16-bit dot products run on tensor cores; fp32 ones (IEEE, no TF32) on FMA units, whose
    operands and accumulators all sit in registers: fp32 needs much smaller tiles."""
    return dtype in (torch.float16, torch.bfloat16)


# The GPU tiles below are the largest that compile without register spills for every
# head_dim 64..256 and GQA 1..8 on sm_80 and sm_90 (benchmarks/kernels/gpu_static.py checks every
# variant the engine launches; tests/kernels/test_gpu_static.py fails on a new spill).


def prefill_tiles(gqa: int, head_dim: int, dtype: torch.dtype) -> TileConfig:
    """Prefill tile: ``block_m // gqa`` query tokens times ``gqa`` heads (one config, no
    autotune)."""
    if INTERPRET:  # few, large tiles: the interpreter's cost is per operation, not per element
        return TileConfig(block_m=max(32, 8 * triton.next_power_of_2(gqa)), block_n=32)
    if not _tensor_cores(dtype):
        return TileConfig(max(16, triton.next_power_of_2(gqa)), 16, num_warps=8, num_stages=2)
    block_m, block_n = (128, 64) if head_dim <= 64 else (128, 32) if head_dim <= 128 else (64, 32)
    return TileConfig(max(block_m, triton.next_power_of_2(gqa)), block_n, num_warps=8, num_stages=2)


def decode_tiles(gqa: int, head_dim: int, dtype: torch.dtype) -> TileConfig:
    """Decode tile: the ``gqa`` heads of one kv head, padded to >= 16 rows (``tl.dot``'s
    minimum)."""
    if INTERPRET:
        return TileConfig(block_m=max(16, triton.next_power_of_2(gqa)), block_n=32)
    block_m = max(16, triton.next_power_of_2(gqa))
    if not _tensor_cores(dtype):
        return TileConfig(block_m, 16, num_warps=4, num_stages=2)
    if head_dim > 128:
        return TileConfig(block_m, 32, num_warps=4, num_stages=2)
    return TileConfig(block_m, 64, num_warps=8 if head_dim > 64 else 4, num_stages=2)


def group_tiles(gqa: int, head_dim: int, dtype: torch.dtype) -> TileConfig:
    """Grouped-prefix tile: ``block_m // gqa`` requests of one group times their ``gqa`` heads."""
    if INTERPRET:
        return TileConfig(block_m=max(32, 4 * triton.next_power_of_2(gqa)), block_n=32)
    if not _tensor_cores(dtype):
        return TileConfig(max(16, triton.next_power_of_2(gqa)), 16, num_warps=4, num_stages=2)
    return TileConfig(
        block_m=max(64, triton.next_power_of_2(gqa)),
        block_n=64 if head_dim <= 128 else 32,
        num_warps=8 if head_dim > 64 else 4,
        num_stages=2,
    )


@dataclass(slots=True)
class PrefillWork:
    """Query tiles of a varlen step, longest first (each: ``block_m // G`` tokens of a request)."""

    tile_req: torch.Tensor
    """(W,) int32: request of each tile."""
    tile_q0: torch.Tensor
    """(W,) int32: first query (index within the request) of each tile."""
    tiles: TileConfig


@dataclass(slots=True)
class GroupedWork:
    """Row tiles of the grouped shared-prefix decode: requests sorted by prefix, cut into tiles
    of at most ``tiles.block_m // G`` requests of one prefix."""

    sorted_reqs: torch.Tensor
    """(Bp,) int32: the requests that have a prefix, sorted by prefix id."""
    tile_begin: torch.Tensor
    """(W,) int32: first entry of ``sorted_reqs`` in each tile."""
    tile_end: torch.Tensor
    """(W,) int32: one past the last entry of ``sorted_reqs`` in each tile."""
    tile_prefix: torch.Tensor
    """(W,) int32: prefix id of each tile."""
    prefix_splits: int
    own_splits: int
    tiles: TileConfig


@dataclass(slots=True)
class HostStep:
    """CPU copies (int64) of what the planner reads, taken once in :func:`plan_step`."""

    q_lens: torch.Tensor
    own_lens: torch.Tensor
    prefix_index: torch.Tensor
    prefix_lens: torch.Tensor
    request_prefix_lens: torch.Tensor


@dataclass(slots=True)
class StepPlan:
    """Layer-independent launch plan of one step (see the module docstring). The model-shape
    dependent part (``mode`` onwards) is filled by :func:`specialize`, in :func:`plan_step` when
    it is given the head counts, else at the first attention call of the step."""

    meta: AttentionMetadata
    """The step's metadata on the kernels' device; empty prefix tables are padded to one row."""
    host: HostStep
    decode_mode: str
    forced_splits: int | None
    rule: DispatchRule
    mode: str = ""
    """``"prefill"`` (varlen kernel), ``"decode"`` (plain) or ``"grouped"`` (cascade decode)."""
    num_q_heads: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    dtype: torch.dtype = torch.float32
    """Of the queries and the KV pool (the tiles depend on it)."""
    prefill: PrefillWork | None = None
    decode_splits: int = 1
    grouped: GroupedWork | None = None
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None
    """Partial outputs ``(B, Hq, S, D)`` fp32 and their base-2 lse ``(B, Hq, S)`` fp32."""
    stats: dict[str, int] = field(default_factory=dict)
    """Token counts behind the decision (``plain_tokens``, ``grouped_tokens``) for benchmarks."""

    @property
    def specialized(self) -> bool:
        return self.num_q_heads > 0


def prefer_grouped(plain_tokens: int, grouped_tokens: int, rule: DispatchRule) -> bool:
    """The decode dispatch rule: grouped shared-prefix decode or plain decode?

    Plain decode reads ``plain_tokens = sum_b (P_b + N_b)`` cached tokens (each request's prefix
    and own keys). Grouped decode reads each group's prefix once per row tile, i.e.
    ``ceil(size_g * G / block_m)`` times for a group of ``size_g`` requests with ``G`` query heads
    per kv head (``block_m`` = 64 rows on a GPU), plus every request's own tokens:
    ``grouped_tokens = sum_g P_g * ceil(size_g * G / block_m) + sum_b N_b``. It pays one more
    launch and a log-sum-exp merge (a few microseconds, i.e. several MB of HBM reads). So::

        saved = plain_tokens - grouped_tokens
        grouped  iff  saved >= min_saved_fraction * plain_tokens  and  saved >= min_saved_tokens

    Hence: groups of one, or prefixes short next to the own contexts, stay plain; a long prefix
    shared by a few requests goes grouped (e.g. 16 requests on a 2k prefix with 100 own tokens:
    plain 33.6k tokens, grouped 2k + 1.6k).
    """
    saved = plain_tokens - grouped_tokens
    return saved >= rule.min_saved_fraction * plain_tokens and saved >= rule.min_saved_tokens


def num_splits_for(programs: int, max_len: int, sms: int, rule: DispatchRule) -> int:
    """KV splits for a decode launch of ``programs`` (request or row tile, kv head) programs:
    none when they already fill ``waves * sms``, else enough to, with >= ``min_split_tokens``
    keys each and at most ``max_splits``."""
    target = int(rule.waves * sms)
    if programs >= target or max_len <= rule.min_split_tokens:
        return 1
    want = triton.cdiv(target, max(programs, 1))
    return max(1, min(want, max_len // rule.min_split_tokens, rule.max_splits))


def _prefill_work(
    q_lens, own_lens, pre_lens, block_q: int, tiles: TileConfig, device
) -> PrefillWork:
    n_tiles = (q_lens + block_q - 1) // block_q
    req = torch.repeat_interleave(torch.arange(q_lens.numel()), n_tiles)
    first = torch.repeat_interleave(torch.cumsum(n_tiles, 0) - n_tiles, n_tiles)
    q0 = (torch.arange(req.numel()) - first) * block_q
    # Keys a tile visits: the prefix, the earlier chunks and its own causal window.
    work = pre_lens[req] + own_lens[req] - q_lens[req] + torch.minimum(q0 + block_q, q_lens[req])
    order = torch.argsort(work, descending=True, stable=True)
    return PrefillWork(
        tile_req=req[order].to(device, torch.int32),
        tile_q0=q0[order].to(device, torch.int32),
        tiles=tiles,
    )


def _grouped_work(prefix_index, prefix_lens, rows_per_tile: int, tiles: TileConfig):
    """Host-side grouping; returns ``(work tensors on CPU, tokens read per tile)``."""
    with_prefix = torch.nonzero(prefix_index >= 0).flatten()
    order = torch.argsort(prefix_index[with_prefix], stable=True)
    sorted_reqs = with_prefix[order]
    ids, counts = torch.unique_consecutive(prefix_index[sorted_reqs], return_counts=True)
    per_group = (counts + rows_per_tile - 1) // rows_per_tile
    group = torch.repeat_interleave(torch.arange(ids.numel()), per_group)
    group_first = torch.cumsum(counts, 0) - counts
    k = torch.arange(group.numel()) - torch.repeat_interleave(
        torch.cumsum(per_group, 0) - per_group, per_group
    )
    begin = group_first[group] + k * rows_per_tile
    end = torch.minimum(begin + rows_per_tile, (group_first + counts)[group])
    tile_prefix = ids[group]
    tile_len = prefix_lens[tile_prefix.long()]
    order = torch.argsort(tile_len, descending=True, stable=True)  # longest prefixes first
    work = (sorted_reqs, begin[order], end[order], tile_prefix[order])
    return work, tile_len


def plan_step(
    meta: AttentionMetadata,
    *,
    num_q_heads: int | None = None,
    num_kv_heads: int | None = None,
    head_dim: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    decode_mode: str = "auto",
    num_splits: int | None = None,
    rule: DispatchRule = DispatchRule(),
) -> StepPlan:
    """Plan one step (once; every layer reuses the plan).

    ``meta`` on the CPU plus ``device`` avoids any device synchronization; ``meta`` already on
    the device costs one copy of a few small tensors to the host. Head counts, ``head_dim`` and
    ``dtype`` (of the queries and the pool) may be left out: the plan then completes itself at
    the step's first attention call.
    ``decode_mode``: ``"auto"`` (:class:`DispatchRule`), ``"plain"`` or ``"grouped"`` (forced;
    tests and benchmarks). ``num_splits`` forces the KV splits of every decode kernel."""
    if decode_mode not in ("auto", "plain", "grouped"):
        raise ValueError(f"decode_mode must be auto, plain or grouped, got {decode_mode!r}")
    if meta.block_size < 1:
        raise ValueError(f"block_size must be positive, got {meta.block_size}")
    host = host_step(meta)
    if host.own_lens.numel() == 0:
        raise ValueError("a step needs at least one request")
    if torch.any(host.q_lens > host.own_lens) or torch.any(host.q_lens < 1):
        raise ValueError("every request needs 1 <= q_len <= own_len")
    device = torch.device(device) if device is not None else meta.own_lens.device
    dev_meta = meta.to(device)
    if dev_meta.prefix_lens.numel() == 0:  # kernels always get a valid pointer
        dev_meta.prefix_lens = torch.zeros(1, dtype=torch.int32, device=device)
        dev_meta.prefix_block_tables = torch.zeros(1, 1, dtype=torch.int32, device=device)
    plan = StepPlan(dev_meta, host, decode_mode, num_splits, rule)
    shape = (num_q_heads, num_kv_heads, head_dim, dtype)
    if any(x is not None for x in shape):
        if num_q_heads is None or num_kv_heads is None or head_dim is None or dtype is None:
            raise ValueError("give all of num_q_heads, num_kv_heads, head_dim and dtype, or none")
        specialize(plan, num_q_heads, num_kv_heads, head_dim, dtype)
    return plan


@dataclass(slots=True)
class DecodeChoice:
    """Plain or grouped decode for one step, and the host-side work behind the choice."""

    grouped: bool
    work: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    """Grouped row tiles on the host: sorted requests, tile begin, tile end, tile prefix."""
    tile_len: torch.Tensor
    """(W,) prefix length of each row tile."""
    kv_lens: torch.Tensor
    """(B,) keys each request attends to (prefix + own)."""
    tiles: TileConfig
    stats: dict[str, int]


def choose_decode(
    host: HostStep,
    gqa: int,
    head_dim: int,
    dtype: torch.dtype,
    decode_mode: str,
    rule: DispatchRule,
) -> DecodeChoice:
    """Apply :func:`prefer_grouped` (or the forced ``decode_mode``) to a decode step."""
    tiles = group_tiles(gqa, head_dim, dtype)
    work, tile_len = _grouped_work(host.prefix_index, host.prefix_lens, tiles.block_m // gqa, tiles)
    kv_lens = host.request_prefix_lens + host.own_lens
    plain_tokens = int(kv_lens.sum())
    grouped_tokens = int(tile_len.sum() + host.own_lens.sum())
    grouped = decode_mode == "grouped" or (
        decode_mode == "auto" and prefer_grouped(plain_tokens, grouped_tokens, rule)
    )
    stats = {"plain_tokens": plain_tokens, "grouped_tokens": grouped_tokens}
    return DecodeChoice(grouped, work, tile_len, kv_lens, tiles, stats)


def host_step(meta: AttentionMetadata) -> HostStep:
    """The host copies the planner reads (one device-to-host copy if ``meta`` is on a GPU)."""
    return HostStep(
        q_lens=meta.q_lens.cpu().long(),
        own_lens=meta.own_lens.cpu().long(),
        prefix_index=meta.prefix_index.cpu().long(),
        prefix_lens=meta.prefix_lens.cpu().long(),
        request_prefix_lens=meta.request_prefix_lens.cpu().long(),
    )


def specialize(
    plan: StepPlan, num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
) -> None:
    """Fill the model-shape dependent part of ``plan``: kernel choice, work lists, splits and the
    split-KV workspace."""
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}"
        )
    plan.num_q_heads, plan.num_kv_heads, plan.head_dim = num_q_heads, num_kv_heads, head_dim
    plan.dtype = dtype
    host, rule, splits = plan.host, plan.rule, plan.forced_splits
    device = plan.meta.own_lens.device
    gqa = num_q_heads // num_kv_heads
    batch = host.own_lens.numel()
    if plan.meta.max_q_len > 1:
        plan.mode = "prefill"
        tiles = prefill_tiles(gqa, head_dim, dtype)
        block_q = tiles.block_m // gqa
        plan.prefill = _prefill_work(
            host.q_lens, host.own_lens, host.request_prefix_lens, block_q, tiles, device
        )
        return

    sms = num_sms(device)
    choice = choose_decode(host, gqa, head_dim, dtype, plan.decode_mode, rule)
    plan.stats = choice.stats
    work, tile_len, kv_lens = choice.work, choice.tile_len, choice.kv_lens
    if not choice.grouped:
        plan.mode = "decode"
        max_len = int(kv_lens.max())
        plan.decode_splits = splits or num_splits_for(batch * num_kv_heads, max_len, sms, rule)
        parts = plan.decode_splits if plan.decode_splits > 1 else 0
    else:
        plan.mode = "grouped"
        num_tiles = work[1].numel()
        max_pre = int(tile_len.max()) if num_tiles else 0
        max_own = int(host.own_lens.max())
        pre_splits = splits or num_splits_for(num_tiles * num_kv_heads, max_pre, sms, rule)
        own_splits = splits or num_splits_for(batch * num_kv_heads, max_own, sms, rule)
        sorted_reqs, begin, end, tile_prefix = (t.to(device, torch.int32) for t in work)
        plan.grouped = GroupedWork(
            sorted_reqs, begin, end, tile_prefix, pre_splits, own_splits, choice.tiles
        )
        parts = pre_splits + own_splits
    if parts:
        plan.workspace = (
            torch.empty(batch, num_q_heads, parts, head_dim, dtype=torch.float32, device=device),
            torch.empty(batch, num_q_heads, parts, dtype=torch.float32, device=device),
        )
