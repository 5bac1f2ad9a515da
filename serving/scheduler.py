"""Continuous batching under a token budget, with chunked prefill and preemption by recompute.

There is no prefill or decode phase: every step, each running request's computed-token count
catches up with its token count as far as the budget allows (a decode is one token, a prefill
chunk at most ``long_prefill_token_threshold``), running requests first, then waiting ones.
When blocks run out, unused adapter prefixes are evicted first; then the most recently admitted
running request is preempted: its blocks are freed, its prefix unpinned, and it goes back to the
front of the queue to recompute its tokens later.

Many tenants share the engine, so no request may hold the others up:
* waiting requests are admitted tenant by tenant, the tenant with the fewest running requests
  first (arrival order within a tenant);
* while requests wait, running prefills leave ``long_prefill_token_threshold`` tokens of the
  budget to them, so a short request starts at the next step even behind a long prompt;
* an adapter's prefix is filled in chunks, like a prompt, as steps of their own (``fills``);
  requests of that adapter wait for it without blocking the queue behind them.
A request is admitted only when blocks exist for its prefix (shared, filled once) and its first
chunk.

With prefix caching (:mod:`~prefixserve.block_cache`), an admitted request first takes the cached
blocks of its leading tokens and computes only the rest. Each block a step will fill is cached as
the step is scheduled, so that requests admitted later in the same step take it too: every layer
writes the step's K/V before any request of the step reads them, so a prompt that many requests
of one step share is computed once (if the step fails, those blocks are forgotten). A request's
blocks are released, not freed, when it ends or is preempted (a preempted request finds its own
blocks again when it resumes, unless they were evicted).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .block_cache import BlockHash, block_hash
from .config import SchedulerConfig
from .kv_cache import BlockAllocator, blocks_for
from .prefix_store import Prefix, PrefixStore
from .request import FinishReason, Request, RequestStatus
from .sampler import TokenLogprobs


@dataclass(frozen=True, slots=True)
class TokenUpdate:
    """A token a request appended in a step, and the text it added (finished requests are
    finished already)."""

    request: Request
    token: int
    delta_text: str


@dataclass(frozen=True, slots=True)
class PrefixFill:
    """Tokens ``[start, start + num_tokens)`` of a prefix to compute into its blocks."""

    prefix: Prefix
    start: int
    num_tokens: int


@dataclass(slots=True)
class SchedulerOutput:
    """The work of one step: ``num_new_tokens[i]`` tokens of ``requests[i]``, after ``fills``."""

    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    fills: list[PrefixFill] = field(default_factory=list)
    """Chunks of adapter prefixes to fill before the forward pass (no request reads them yet)."""
    new_cached_blocks: list[int] = field(default_factory=list)
    """Blocks cached as this step was scheduled, written by it: to forget if it fails."""

    @property
    def is_empty(self) -> bool:
        return not self.requests and not self.fills


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
        self.cache = prefix_store.cache
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
            n = self._chunk(request, budget - self._reserve(request))
            if n < 1:  # a prefill leaves the rest of the budget to waiting requests
                i += 1
                continue
            if self._allocate(request, n, out):
                out.requests.append(request)
                out.num_new_tokens.append(n)
                budget -= n
                i += 1
                continue
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
        if not out.preempted:
            self._admit(out, budget)
        return out

    def _admit(self, out: SchedulerOutput, budget: int) -> None:
        """Admit waiting requests fairly across tenants while budget, slots and blocks last;
        schedule fills of the prefixes they wait for.

        A waiting request pins its prefix only while the prefix is being filled: once it is
        filled, the pin is dropped until the request is admitted (its prefix may then be
        evicted, and filled again), and when a request finds no room every waiting request's
        pin is dropped. Otherwise prefixes pinned by requests that cannot run yet could keep
        the pool from the request at the head of the queue, or force preemptions, forever."""
        blocked = self._admit_in_order(out, budget)
        for request in self.waiting:
            prefix = request.prefix
            if request.prefix_pinned and (blocked or prefix is None or prefix.materialized):
                self._unpin_prefix(request)

    def _admit_in_order(self, out: SchedulerOutput, budget: int) -> bool:
        """The admission loop of :meth:`_admit`; True if it stopped for want of blocks."""
        filling: set[Prefix] = set()
        for request in self._admission_order():
            if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                return False
            if not self._pin_prefix(request):
                return True  # no room for its prefix now: later arrivals must not overtake it
            prefix = request.prefix
            if prefix is not None and not prefix.materialized:
                if prefix not in filling:  # one fill chunk per prefix and step
                    filling.add(prefix)
                    budget -= self._fill(out, prefix, budget)
                continue  # waits, pinning its prefix, until the prefix is filled
            hits = self._take_cached(request)
            n = self._chunk(request, budget)
            if not self._allocate(request, n, out):
                self._release_blocks(request)  # the cached ones too: taken again next time
                self._unpin_prefix(request)
                return True
            self._count_lookup(request, hits)
            self.waiting.remove(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.requests.append(request)
            out.num_new_tokens.append(n)
            budget -= n
        return False

    def _admission_order(self) -> Iterator[Request]:
        """Waiting requests, each time from the tenant with the fewest running requests (ties:
        the tenant whose next request came first); arrival order within a tenant."""
        queues: dict[str, deque[Request]] = {}
        for request in self.waiting:
            queues.setdefault(request.tenant, deque()).append(request)
        running = Counter(r.tenant for r in self.running)
        order = {request: i for i, request in enumerate(self.waiting)}
        while queues:
            tenant = min(queues, key=lambda t: (running[t], order[queues[t][0]]))
            request = queues[tenant].popleft()
            if not queues[tenant]:
                del queues[tenant]
            running[tenant] += 1
            yield request

    def _fill(self, out: SchedulerOutput, prefix: Prefix, budget: int) -> int:
        """Schedule the next chunk of ``prefix``; returns the budget it uses (a copy of stored
        K/V runs no forward pass and uses none)."""
        remaining = prefix.num_tokens - prefix.filled
        if prefix.adapter.kind.is_kv:
            out.fills.append(PrefixFill(prefix, prefix.filled, remaining))
            return 0
        n = min(remaining, budget, self._max_chunk())
        out.fills.append(PrefixFill(prefix, prefix.filled, n))
        return n

    def update(
        self,
        scheduled: SchedulerOutput,
        sampling: Sequence[Request] = (),
        tokens: Sequence[int] = (),
        logprobs: Sequence[TokenLogprobs | None] = (),
    ) -> list[TokenUpdate]:
        """Apply a step that ran: requests computed their scheduled tokens, prefixes their
        filled chunks, and each request of ``sampling`` appends its sampled token (with its
        ``logprobs``), checks its stops and, when done, finishes (blocks freed, prefix let go).
        The one place where a step changes request and prefix state."""
        for request, n in zip(scheduled.requests, scheduled.num_new_tokens):
            request.num_computed_tokens += n
        for fill in scheduled.fills:
            if fill.prefix.resident:  # not dropped meanwhile
                fill.prefix.filled = fill.start + fill.num_tokens
                if fill.prefix.materialized:
                    self.prefix_store.stats.materializations += 1
        return [self._append(r, t, lp) for r, t, lp in zip(sampling, tokens, logprobs)]

    def _append(self, request: Request, token: int, logprobs: TokenLogprobs | None) -> TokenUpdate:
        request.token_ids.append(token)
        if logprobs is not None:
            request.logprobs.append(logprobs)
        params = request.params
        reason: FinishReason | None = None
        delta = ""
        if token in request.eos_token_ids or token in (params.stop_token_ids or ()):
            reason = FinishReason.STOP
        else:
            delta = request.detokenizer.append(token)
            if request.detokenizer.stopped:
                reason = FinishReason.STOP
            elif request.num_output_tokens >= params.max_new_tokens:
                reason = FinishReason.LENGTH
        if reason is not None:
            delta += request.detokenizer.flush()
            self.finish(request, reason)
        return TokenUpdate(request, token, delta)

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

    def _max_chunk(self) -> int:
        threshold = self.config.long_prefill_token_threshold
        return threshold if threshold is not None else self.config.max_num_batched_tokens

    def _chunk(self, request: Request, budget: int) -> int:
        """Tokens of ``request`` to compute this step (< 1 when ``budget`` is used up)."""
        remaining = request.num_tokens - request.num_computed_tokens
        assert remaining >= 1, f"request {request.request_id} has no token to compute"
        return min(remaining, budget, self._max_chunk())

    def _reserve(self, request: Request) -> int:
        """Budget a running prefill must leave to waiting requests (decodes need none)."""
        if (
            not self.waiting
            or len(self.running) >= self.config.max_num_seqs
            or request.num_tokens - request.num_computed_tokens <= 1
        ):
            return 0
        return min(self._max_chunk(), self.config.max_num_batched_tokens // 2)

    def _allocate(self, request: Request, num_new_tokens: int, out: SchedulerOutput) -> bool:
        """Give ``request`` the blocks its next ``num_new_tokens`` tokens need, and cache those
        that the step fills."""
        total = request.num_computed_tokens + num_new_tokens
        needed = blocks_for(total, self.block_size) - len(request.block_ids)
        if needed > 0:
            if not self.prefix_store.make_room(needed):
                return False
            blocks = self.allocator.allocate(needed)
            assert blocks is not None, "make_room guaranteed the blocks"
            request.block_ids.extend(blocks)
        self._offer_blocks(request, total, out)
        return True

    def _preempt(self, request: Request) -> None:
        self._free(request)
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _free(self, request: Request) -> None:
        self._release_blocks(request)
        self._unpin_prefix(request)

    def _release_blocks(self, request: Request) -> None:
        """Give back the request's blocks (cached ones stay cached) and forget its progress."""
        self.cache.release(request.block_ids)
        request.block_ids = []
        request.num_offered_blocks = 0
        request.num_computed_tokens = 0

    # -- prefix caching ---------------------------------------------------------------------

    def _hashes(self, request: Request, num_blocks: int) -> list[BlockHash]:
        """The hashes of the request's first ``num_blocks`` full blocks (computed once)."""
        hashes, bs = request.block_hashes, self.block_size
        assert request.cache_root is not None
        parent = hashes[-1] if hashes else request.cache_root
        for i in range(len(hashes), num_blocks):
            parent = block_hash(parent, request.token_ids[i * bs : (i + 1) * bs])
            hashes.append(parent)
        return hashes

    def _take_cached(self, request: Request) -> int:
        """A request about to be admitted takes the cached blocks of its leading tokens (all
        but the last token's: that one is always computed, so no cached block is written);
        returns how many."""
        if request.cache_root is None:
            return 0
        assert not request.block_ids and request.num_computed_tokens == 0
        usable = (request.num_tokens - 1) // self.block_size
        blocks = self.cache.lookup(self._hashes(request, usable)[:usable])
        self.cache.take(blocks)
        request.block_ids = blocks
        request.num_offered_blocks = len(blocks)
        request.num_computed_tokens = len(blocks) * self.block_size
        return len(blocks)

    def _count_lookup(self, request: Request, hits: int) -> None:
        if request.cache_root is None:
            return
        stats = self.cache.stats
        stats.queries += request.num_tokens
        stats.hits += hits * self.block_size
        if request.num_cached_tokens is None:  # a resumed request keeps its first count
            request.num_cached_tokens = hits * self.block_size

    def _offer_blocks(self, request: Request, num_tokens: int, out: SchedulerOutput) -> None:
        """Cache the blocks that hold the request's first ``num_tokens`` tokens once the step
        ran (the full ones not offered yet)."""
        full = num_tokens // self.block_size
        if request.cache_root is None or full <= request.num_offered_blocks:
            return
        hashes = self._hashes(request, full)
        for i in range(request.num_offered_blocks, full):
            if self.cache.register(request.block_ids[i], hashes[i]):
                out.new_cached_blocks.append(request.block_ids[i])
        request.num_offered_blocks = full

    def _pin_prefix(self, request: Request) -> bool:
        if request.prefix is None or request.prefix_pinned:
            return True
        request.prefix_pinned = self.prefix_store.acquire(request.prefix)
        return request.prefix_pinned

    def _unpin_prefix(self, request: Request) -> None:
        if request.prefix is not None and request.prefix_pinned:
            self.prefix_store.release(request.prefix)
            request.prefix_pinned = False
