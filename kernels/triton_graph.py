"""Decode plans in persistent buffers, for decode steps replayed from CUDA graphs.

A captured graph replays the launches it recorded: the same grids, the same pointers. So the
attention plan of a graph is a :class:`~prefixserve.kernels.triton_plan.StepPlan` whose tensors
are views of buffers that outlive the capture, sized for the graph's padded batch ``Bp``, and
every replayed step writes its metadata into them (:meth:`GraphPlans.fill`) instead of
allocating. The grids stay valid for any step of up to ``Bp`` requests because:

* plain decode runs ``(Bp, Hkv, S)`` programs with ``S`` fixed per graph, each computing its key
  range from its request's length at run time (a split past the end sees no key: its
  log-sum-exp is -inf and the merge gives it weight 0);
* grouped decode lists ``Bp`` row tiles; tiles beyond the step's have ``begin == end`` (no rows);
* a padding request has one own key, no prefix, block table row 0 and no K/V write (slot -1);
  nothing reads its output, and no real request reads anything it computes.

    plans = GraphPlans(32, 8, 128, dtype=torch.bfloat16, max_batch=256, max_model_len=8192,
                       block_size=16, device=dev)
    plan = plans.plan(64, "grouped")       # once, before capturing the graph (64, grouped)
    choice = plans.choose(meta)            # per step: plain or grouped (None: no graph fits)
    plans.fill(plan, meta, choice)         # per step: the metadata into the graph's buffers

Reference: the plans :func:`~prefixserve.kernels.triton_plan.plan_step` makes per step (the
tests compare the kernels' outputs under both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .metadata import AttentionMetadata
from .triton_common import num_sms
from .triton_plan import (
    DecodeChoice,
    DispatchRule,
    GroupedWork,
    HostStep,
    StepPlan,
    choose_decode,
    group_tiles,
    host_step,
    num_splits_for,
)

GRAPH_MODES = ("decode", "grouped")
"""The decode kernels a graph can hold: one graph per (padded batch size, mode)."""


@dataclass(slots=True)
class _Staged:
    """A device buffer and the host buffer its rows are staged in (pinned towards a GPU)."""

    device: torch.Tensor
    host: torch.Tensor

    @classmethod
    def zeros(cls, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> _Staged:
        pinned = device.type == "cuda"
        return cls(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, pin_memory=pinned),
        )

    def upload(self, rows: int) -> None:
        """Copy the first ``rows`` rows to the device. Asynchronous from pinned memory: safe
        because the engine reads each step's sampled tokens (a synchronization) before it stages
        the next step."""
        self.device[:rows].copy_(self.host[:rows], non_blocking=self.host.is_pinned())


class GraphPlans:
    """The persistent buffers of every decode graph of one engine, and the plans over them.

    Graphs replay one at a time, so they share one set of buffers (each uses its first ``Bp``
    rows) and one split-KV workspace."""

    def __init__(
        self,
        num_q_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        max_batch: int,
        max_model_len: int,
        block_size: int,
        device: torch.device | str,
        decode_mode: str = "auto",
        rule: DispatchRule | None = None,
    ) -> None:
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.dtype = dtype
        self.max_batch, self.max_model_len, self.block_size = max_batch, max_model_len, block_size
        self.device = torch.device(device)
        self.decode_mode, self.rule = decode_mode, rule or DispatchRule()
        self.table_width = -(-max_model_len // block_size)
        """Columns of the block tables: enough for any sequence (and any prefix)."""
        n, dev, i32 = max_batch, self.device, torch.int32
        self.own_lens = _Staged.zeros((n,), i32, dev)
        self.prefix_index = _Staged.zeros((n,), i32, dev)
        self.prefix_lens = _Staged.zeros((n,), i32, dev)
        self.block_tables = _Staged.zeros((n, self.table_width), i32, dev)
        self.prefix_block_tables = _Staged.zeros((n, self.table_width), i32, dev)
        self.slot_mapping = _Staged.zeros((n,), torch.int64, dev)
        self.sorted_reqs = _Staged.zeros((n,), i32, dev)
        self.tile_begin = _Staged.zeros((n,), i32, dev)
        self.tile_end = _Staged.zeros((n,), i32, dev)
        self.tile_prefix = _Staged.zeros((n,), i32, dev)
        self.cu_q_lens = torch.arange(n + 1, dtype=i32, device=dev)  # one query each, always
        self._splits: dict[tuple[int, str], tuple[int, int]] = {}
        self._workspace: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- once per graph, before its capture ---------------------------------------------------

    def splits(self, size: int, mode: str) -> tuple[int, int]:
        """KV splits a graph of ``size`` requests is captured with, ``(prefix, own)`` for
        grouped and ``(0, splits)`` for plain decode: sized for the longest context the engine
        admits, so that long steps run as fast as with per-step splits; short steps leave the
        splits past their end empty."""
        if (size, mode) not in self._splits:
            sms, rule, longest = num_sms(self.device), self.rule, self.max_model_len
            # Prefix tiles are at most one per request: the same bound as the own parts.
            splits = num_splits_for(size * self.num_kv_heads, longest, sms, rule)
            self._splits[size, mode] = (splits, splits) if mode == "grouped" else (0, splits)
        return self._splits[size, mode]

    def plan(self, size: int, mode: str) -> StepPlan:
        """The plan a graph of ``size`` requests in ``mode`` is captured with (and replays)."""
        if mode not in GRAPH_MODES:
            raise ValueError(f"a graph's mode is one of {GRAPH_MODES}, got {mode!r}")
        if not 1 <= size <= self.max_batch:
            raise ValueError(f"graph size must be in 1..{self.max_batch}, got {size}")
        meta = AttentionMetadata(
            cu_q_lens=self.cu_q_lens[: size + 1],
            own_lens=self.own_lens.device[:size],
            block_tables=self.block_tables.device[:size],
            slot_mapping=self.slot_mapping.device[:size],
            prefix_index=self.prefix_index.device[:size],
            prefix_lens=self.prefix_lens.device[:size],
            prefix_block_tables=self.prefix_block_tables.device[:size],
            block_size=self.block_size,
            max_q_len=1,
        )
        empty = torch.zeros(0, dtype=torch.int64)
        host = HostStep(empty, empty, empty, empty, empty)  # decided per step, in fill()
        plan = StepPlan(meta, host, mode, None, self.rule, mode=mode)
        plan.num_q_heads, plan.num_kv_heads, plan.head_dim = (
            self.num_q_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        plan.dtype = self.dtype
        prefix_splits, own_splits = self.splits(size, mode)
        if mode == "decode":
            plan.decode_splits = own_splits
            parts = own_splits if own_splits > 1 else 0
        else:
            gqa = self.num_q_heads // self.num_kv_heads
            plan.grouped = GroupedWork(
                self.sorted_reqs.device[:size],
                self.tile_begin.device[:size],
                self.tile_end.device[:size],
                self.tile_prefix.device[:size],
                prefix_splits,
                own_splits,
                group_tiles(gqa, self.head_dim, self.dtype),
            )
            parts = prefix_splits + own_splits
        if parts:
            part_o, part_lse = self._workspace_for(size * self.num_q_heads * parts)
            plan.workspace = (
                part_o.view(size, self.num_q_heads, parts, self.head_dim),
                part_lse.view(size, self.num_q_heads, parts),
            )
        return plan

    def _workspace_for(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the one shared split-KV workspace with ``rows`` (request, head, part) rows;
        it grows to the largest asked for (graphs are captured largest first)."""
        if self._workspace is None or self._workspace[1].numel() < rows:
            self._workspace = (
                torch.empty(rows * self.head_dim, dtype=torch.float32, device=self.device),
                torch.empty(rows, dtype=torch.float32, device=self.device),
            )
        part_o, part_lse = self._workspace
        return part_o[: rows * self.head_dim], part_lse[:rows]

    def pad(self, plan: StepPlan) -> None:
        """Make every row of ``plan`` padding (a step of no request): what a graph is captured
        with."""
        size = plan.meta.num_requests
        for buffer, value in (
            (self.own_lens, 1),
            (self.prefix_index, -1),
            (self.slot_mapping, -1),
            (self.block_tables, 0),
            (self.sorted_reqs, 0),
            (self.tile_begin, 0),
            (self.tile_end, 0),
            (self.tile_prefix, 0),
        ):
            buffer.host[:size] = value
            buffer.upload(size)

    # -- every replayed step ------------------------------------------------------------------

    def choose(self, meta: AttentionMetadata) -> DecodeChoice | None:
        """Plain or grouped decode for this step (the rule of per-step plans), or None when no
        graph can run it: not a decode step, too many requests, or tables wider than any graph's."""
        if meta.max_q_len != 1 or not 1 <= meta.num_requests <= self.max_batch:
            return None
        if (
            meta.block_tables.shape[1] > self.table_width
            or meta.prefix_block_tables.shape[1] > self.table_width
        ):
            return None
        gqa = self.num_q_heads // self.num_kv_heads
        return choose_decode(
            host_step(meta), gqa, self.head_dim, self.dtype, self.decode_mode, self.rule
        )

    def fill(self, plan: StepPlan, meta: AttentionMetadata, choice: DecodeChoice) -> None:
        """Write host-side ``meta`` of a decode step of ``B <= Bp`` requests into the buffers
        ``plan`` reads, padding rows ``B..Bp`` (see the module docstring), and upload them."""
        size, num = plan.meta.num_requests, meta.num_requests
        num_prefixes = meta.prefix_lens.shape[0]
        if num > size or plan.mode != ("grouped" if choice.grouped else "decode"):
            raise ValueError(f"a step of {num} requests does not fit graph ({size}, {plan.mode})")
        _put(self.own_lens.host, meta.own_lens, num, size, pad=1)
        _put(self.prefix_index.host, meta.prefix_index, num, size, pad=-1)
        _put(self.slot_mapping.host, meta.slot_mapping, num, size, pad=-1)
        _put(self.prefix_lens.host, meta.prefix_lens, num_prefixes, size, pad=0)
        tables = self.block_tables.host
        tables[:num, : meta.block_tables.shape[1]] = meta.block_tables
        tables[num:size] = 0
        prefix_tables = self.prefix_block_tables.host
        prefix_tables[:num_prefixes, : meta.prefix_block_tables.shape[1]] = meta.prefix_block_tables
        staged = [self.own_lens, self.prefix_index, self.slot_mapping, self.block_tables]
        if num_prefixes:
            staged += [self.prefix_lens, self.prefix_block_tables]
        if choice.grouped:
            sorted_reqs, begin, end, tile_prefix = choice.work
            _put(self.sorted_reqs.host, sorted_reqs, sorted_reqs.shape[0], size, pad=0)
            for buffer, values in (
                (self.tile_begin, begin),
                (self.tile_end, end),
                (self.tile_prefix, tile_prefix),
            ):
                _put(buffer.host, values, values.shape[0], size, pad=0)
            staged += [self.sorted_reqs, self.tile_begin, self.tile_end, self.tile_prefix]
        for buffer in staged:
            buffer.upload(size)


def _put(dest: torch.Tensor, values: torch.Tensor, num: int, size: int, pad: int) -> None:
    """``dest[:num] = values``, ``dest[num:size] = pad``."""
    dest[:num] = values
    dest[num:size] = pad
