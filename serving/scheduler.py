"""Continuous batching under a token budget, with chunked prefill and preemption by recompute.

There is no prefill or decode phase: every step, each running request's computed-token count
catches up with its token count as far as the budget allows (a decode is one token, a prefill
chunk many), running requests first in arrival order, then waiting requests in arrival order.
When blocks run out, unused adapter prefixes are evicted first; then the most recently admitted
running request is preempted: its blocks are freed, its prefix unpinned, and it goes back to the
front of the queue to recompute its tokens later. A request is admitted only when blocks exist
for its prefix (shared, materialized once) and its first chunk.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .config import SchedulerConfig
from .kv_cache import BlockAllocator
from .prefix_store import Prefix, PrefixStore
from .request import FinishReason, Request, RequestStatus


@dataclass(slots=True)
class SchedulerOutput:
    """The work of one step: ``num_new_tokens[i]`` tokens of ``requests[i]``."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    materialize: list[Prefix] = field(default_factory=list)
    """Prefixes that got blocks this step and must be filled before the forward pass."""

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.requests


class Scheduler:
    """Decides which requests run each step and owns their block allocation."""

    def __init__(
        self,
        config: SchedulerConfig,
        allocator: BlockAllocator,
        prefix_store: PrefixStore,
        block_size: int,
    ) -> None:
        self.config = config
        self.allocator = allocator
        self.prefix_store = prefix_store
        self.block_size = block_size
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = self._chunk(request, budget)
            if self._allocate(request, n):
                out.requests.append(request)
                out.num_new_tokens.append(n)
                budget -= n
                i += 1
                continue
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
        while (
            self.waiting
            and budget > 0
            and not out.preempted
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]
            n = self._chunk(request, budget)
            if not self._pin_prefix(request):
                break
            if not self._allocate(request, n):
                self._unpin_prefix(request)
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.requests.append(request)
            out.num_new_tokens.append(n)
            budget -= n
        out.materialize = list(
            {r.prefix: None for r in out.requests if r.prefix and not r.prefix.materialized}
        )
        return out

    def finish(self, request: Request, reason: FinishReason) -> None:
        """Take ``request`` out of the queues, free its blocks and mark it finished."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        self._free(request)
        if request.prefix is not None:
            self.prefix_store.detach(request.prefix)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason

    def _chunk(self, request: Request, budget: int) -> int:
        n = min(request.num_tokens - request.num_computed_tokens, budget)
        if self.config.long_prefill_token_threshold is not None:
            n = min(n, self.config.long_prefill_token_threshold)
        assert n >= 1, f"request {request.request_id} has no token to compute"
        return n

    def _allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Give ``request`` the blocks its next ``num_new_tokens`` tokens need."""
        total = request.num_computed_tokens + num_new_tokens
        needed = -(-total // self.block_size) - len(request.block_ids)
        if needed <= 0:
            return True
        if not self.prefix_store.make_room(needed):
            return False
        blocks = self.allocator.allocate(needed)
        assert blocks is not None, "make_room guaranteed the blocks"
        request.block_ids.extend(blocks)
        return True

    def _preempt(self, request: Request) -> None:
        self._free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _free(self, request: Request) -> None:
        self.allocator.free(request.block_ids)
        request.block_ids = []
        self._unpin_prefix(request)

    def _pin_prefix(self, request: Request) -> bool:
        if request.prefix is None or request.prefix_pinned:
            return True
        request.prefix_pinned = self.prefix_store.acquire(request.prefix)
        return request.prefix_pinned

    def _unpin_prefix(self, request: Request) -> None:
        if request.prefix is not None and request.prefix_pinned:
            self.prefix_store.release(request.prefix)
            request.prefix_pinned = False
