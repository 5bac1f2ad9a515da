"""Decode steps replayed from CUDA graphs.

On a GPU a decode step of a large model takes milliseconds, and launching its kernels one
Python call at a time would take about as long. So at start the engine captures the whole
decode forward (the compiled model and our attention kernels) as CUDA graphs, one per padded
batch size and decode kernel (plain or grouped), and a decode step of ``B`` requests replays the
graph of the smallest captured size ``Bp >= B``:

1. the step's token ids and positions go into static input buffers (rows ``B..Bp`` are padding),
2. its attention metadata goes into the graph's persistent plan
   (:class:`~prefixserve.kernels.triton_graph.GraphPlans`: padding rows write no K/V and are
   read by no one),
3. the graph replays, writing logits into one static buffer, of which the step returns rows
   ``:B``.

Prefill and mixed steps, prefix fills and batches over the largest size run without graphs.
Graphs replay one at a time, so they share one memory pool, one set of buffers and one split-KV
workspace; they are captured largest first so that smaller ones reuse the pool.

``capture=False`` runs the same bodies directly instead of replaying captured graphs: the
padding and buffer logic, with everything but the capture itself, is tested on a CPU that way.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .attention import StepContext
from .kernels.metadata import AttentionMetadata
from .kernels.progress import say
from .kernels.triton_graph import GRAPH_MODES, GraphPlans
from .kernels.triton_plan import StepPlan
from .kv_cache import KVCachePool
from .triton_backend import TritonBackend

Forward = Callable[[StepContext[StepPlan], torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(step, input_ids [T], positions [T], logits_indices [R]) -> logits [R, V]``: the model."""


def capture_sizes(max_batch: int) -> list[int]:
    """Padded batch sizes to capture: 1, 2, 4, then every multiple of 8, up to ``max_batch``
    (included, so that every batch the scheduler may form has a graph). A batch pads by at
    most 7 rows, at most 12% from size 64 up."""
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch, 8))
    return [*sizes, max_batch]


@dataclass(slots=True)
class _Graph:
    plan: StepPlan
    body: Callable[[], None]
    """Runs the forward over the static buffers into the logits buffer (what was captured)."""
    graph: torch.cuda.CUDAGraph | None


class DecodeGraphs:
    """Captured decode graphs of one engine, for batches of up to ``max(sizes)`` requests."""

    def __init__(
        self,
        forward: Forward,
        kv_cache: KVCachePool,
        backend: TritonBackend,
        *,
        sizes: list[int],
        max_model_len: int,
        capture: bool = True,
    ) -> None:
        if not sizes or min(sizes) < 1:
            raise ValueError(f"capture sizes must be positive, got {sizes}")
        self.forward, self.kv_cache, self.backend = forward, kv_cache, backend
        self.sizes = sorted(set(sizes))
        self.capture = capture
        n, device = self.sizes[-1], kv_cache.device
        shape = backend.shape
        self.plans = GraphPlans(
            shape.num_q_heads,
            shape.num_kv_heads,
            shape.head_dim,
            dtype=shape.dtype,
            max_batch=n,
            max_model_len=max_model_len,
            block_size=kv_cache.spec.block_size,
            device=device,
            decode_mode=backend.decode_mode,
        )
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.logits_indices = torch.arange(n, dtype=torch.int64, device=device)
        self.logits: torch.Tensor | None = None
        """(max size, V): every graph's output rows (allocated by the first capture)."""
        self._graphs: dict[tuple[int, str], _Graph] = {}
        self.replays = 0
        """Steps served from a graph (for tests and benchmarks)."""

    def capture_all(self) -> None:
        """Warm up and capture every (size, mode), largest first, saying how long it took."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle() if self.capture else None
        todo = [(s, m) for s in reversed(self.sizes) for m in GRAPH_MODES]
        say(f"capturing {len(todo)} CUDA graphs of decode steps (batches 1-{self.sizes[-1]}) ...")
        for size, mode in todo:
            self._graphs[size, mode] = self._capture(size, mode, pool)
        say(f"captured {len(todo)} CUDA graphs in {time.perf_counter() - start:.1f} s")

    def _capture(self, size: int, mode: str, pool: Any) -> _Graph:
        plan = self.plans.plan(size, mode)
        self.plans.pad(plan)
        step = StepContext(self.kv_cache, self.backend, plan)
        ids, positions = self.input_ids[:size], self.positions[:size]
        indices = self.logits_indices[:size]
        warm = self.forward(step, ids, positions, indices)  # compiles the kernels of this shape
        if self.logits is None:
            self.logits = warm.new_empty((self.sizes[-1], warm.shape[-1]))
        logits = self.logits[:size]

        def body() -> None:
            logits.copy_(self.forward(step, ids, positions, indices))

        if not self.capture:
            return _Graph(plan, body, None)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            body()
        torch.cuda.synchronize()
        return _Graph(plan, body, graph)

    def size_for(self, num_requests: int) -> int | None:
        """The captured size a batch of ``num_requests`` pads to (None: larger than any)."""
        for size in self.sizes:
            if size >= num_requests:
                return size
        return None

    def run(
        self, meta: AttentionMetadata, input_ids: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor | None:
        """Logits ``[B, V]`` of a decode step in which every request samples, from its graph;
        None when no graph fits (not a pure decode step, or too large a batch): run it without.
        The logits are a view of the static buffer, valid until the next replay."""
        num = meta.num_requests
        size = self.size_for(num)
        choice = self.plans.choose(meta) if size is not None else None
        if size is None or choice is None or self.logits is None:
            return None
        entry = self._graphs[size, "grouped" if choice.grouped else "decode"]
        self.plans.fill(entry.plan, meta, choice)
        self.input_ids[:num].copy_(input_ids, non_blocking=True)
        self.positions[:num].copy_(positions, non_blocking=True)
        if entry.graph is not None:
            entry.graph.replay()
        else:
            entry.body()
        self.replays += 1
        return self.logits[:num]
