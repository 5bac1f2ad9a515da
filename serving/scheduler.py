"""Continuous batching under a token budget, with chunked prefill and preemption by recompute.

There is no prefill or decode phase: every step, each running request's computed-token count
catches up with its token count as far as the budget allows (a decode is one token, a prefill
chunk at most ``long_prefill_token_threshold``), running requests first, then waiting ones.
When blocks run out, unused cached blocks and adapter prefixes are evicted first; then a running
request is preempted: its blocks are released, its prefix unpinned, and it waits again (first
of its tenant) to recompute its tokens later.

Many tenants share the engine, so no tenant may hold the others up (``scheduling_policy="fair"``,
the default; ``"fcfs"`` is one queue in arrival order, preempting the latest admitted):
* waiting requests are admitted from the tenant that has received the least service, weighted
  (:mod:`~prefixserve.fair_share`: the Virtual Token Counter); by priority, then queue order
  (preempted requests first), within a tenant. One tenant alone, at one priority, is
  scheduled exactly as with ``fcfs``;
* a tenant whose next request cannot run for want of slots or blocks, while it holds less than
  its fair share of them, preempts the latest request (lowest priority first) of the tenant
  furthest over its share; at its share, it preempts its own running requests of lower priority
  than that one (vLLM's priority scheduling, within a tenant). A request runs
  ``preemption_min_steps`` steps before that may hit it again, so the pool does not thrash;
  the request room was made for is admitted first in that step, its victims in a later one.
  When a running request needs a block and none is left, the victim is likewise the latest of
  the tenant furthest over its share of blocks;
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

import itertools
import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .block_cache import BlockHash, block_hash
from .config import SchedulerConfig
from .fair_share import FairShare
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
        self.fair = FairShare()
        """Each tenant's service, weight and share (one owner: this scheduler)."""
        self.fair_policy = config.scheduling_policy == "fair"
        self._steps = 0

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, request: Request) -> None:
        self.fair.arrive(request.tenant, request.tenant_weight)
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._steps += 1
        favoured = None
        if self.fair_policy and self.waiting:
            favoured = self._preempt_for_share(out)
        budget = self.config.max_num_batched_tokens
        out_of_blocks = False
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = self._chunk(request, budget - self._reserve(request))
            if n < 1:  # a prefill leaves the rest of the budget to waiting requests
                i += 1
                continue
            if self._allocate(request, n, out):
                self._schedule(out, request, n)
                budget -= n
                i += 1
                continue
            out_of_blocks = True
            victim = self._victim_for_blocks(self.running[i:])
            self.running.remove(victim)
            self._preempt(victim, out)
        if not out_of_blocks:
            self._admit(out, budget, favoured)
        return out

    def _schedule(self, out: SchedulerOutput, request: Request, n: int) -> None:
        """Put ``n`` tokens of ``request`` in the step and charge its tenant for them."""
        out.requests.append(request)
        out.num_new_tokens.append(n)
        decode = int(n == 1 and request.num_computed_tokens >= request.num_prompt_tokens)
        self.fair.charge(request.tenant, n - decode, decode)

    # -- shares -------------------------------------------------------------------------------

    def _preempt_for_share(self, out: SchedulerOutput) -> Request | None:
        """If the next request to admit cannot run for want of a slot or of blocks, find the
        first tenant in admission order that may take them: one under its fair share preempts
        requests of the tenant furthest over its share; one at its share preempts its own
        requests of lower priority than its next one. Until that request can run, or no
        request may be preempted. Returns the request the room was made for (admitted first
        in this step), or None."""
        seen: set[str] = set()
        for head in self._admission_order():
            if head.tenant in seen:
                continue
            seen.add(head.tenant)
            if head.prefix is not None and not head.prefix.materialized:
                continue  # it needs its prefix filled first, not a slot
            preempted = False
            while True:
                slots = len(self.running) >= self.config.max_num_seqs
                if not slots and self._blocks_to_admit(head) <= self._room_for(head):
                    return head if preempted else None  # it can run now
                total = self.config.max_num_seqs if slots else self.allocator.num_blocks
                held = self._held(slots)
                under = held[head.tenant] < self.fair.share(head.tenant, total)
                victim = (
                    self._victim(held, total, exclude=head.tenant, eligible_only=True)
                    if under
                    else self._lower_priority(head)
                )
                if victim is None:
                    break  # this tenant waits its turn (or nobody may be preempted for it)
                self.running.remove(victim)
                self._preempt(victim, out)
                preempted = True
            if preempted:
                return None  # made what room it could, not enough: no one else overtakes
        return None

    def _lower_priority(self, head: Request) -> Request | None:
        """The running request of ``head``'s tenant with the lowest priority below ``head``'s
        (the latest of them) that ran its minimum steps; None if there is none."""
        floor = self._steps - self.config.preemption_min_steps
        mine = [
            r
            for r in self.running
            if r.tenant == head.tenant and r.priority > head.priority and r.admitted_step <= floor
        ]
        return max(reversed(mine), key=lambda r: r.priority) if mine else None

    def _held(self, slots: bool) -> Counter[str]:
        """Running slots (``slots``) or KV blocks held by each tenant's running requests; a
        cached block that ``n`` requests hold counts ``1 / n`` for each (what preempting them
        all would free)."""
        held: Counter[str] = Counter()
        cache = self.cache
        for r in self.running:
            if slots:
                held[r.tenant] += 1
                continue
            shared = sum(1 - 1 / cache.refs(b) for b in r.block_ids if cache.is_cached(b))
            held[r.tenant] += len(r.block_ids) - shared  # type: ignore[assignment]
        return held

    def _victim(
        self,
        held: Counter[str],
        total: int,
        candidates: Sequence[Request] | None = None,
        exclude: str | None = None,
        eligible_only: bool = False,
    ) -> Request | None:
        """The latest (lowest priority first) of ``candidates`` (default: running) of the
        tenant furthest over its share of ``total``; only a tenant over its share gives one up
        for another's (``exclude``), and only a request that ran ``preemption_min_steps`` since
        it was admitted (``eligible_only``)."""
        pool = self.running if candidates is None else candidates
        if eligible_only:
            floor = self._steps - self.config.preemption_min_steps
            pool = [r for r in pool if r.admitted_step <= floor]
        tenants = {r.tenant for r in pool} - {exclude}
        over = {t: held[t] / self.fair.share(t, total) for t in tenants}
        if exclude is not None:
            over = {t: ratio for t, ratio in over.items() if ratio > 1.0}
        if not over:
            return None
        tenant = max(over, key=lambda t: (over[t], t))
        mine = [r for r in pool if r.tenant == tenant]  # in admission order
        return max(reversed(mine), key=lambda r: r.priority)  # the latest of the lowest priority

    def _victim_for_blocks(self, unscheduled: list[Request]) -> Request:
        """Which of the requests not yet scheduled this step (the last is the one asking) gives
        up its blocks: the latest admitted (``fcfs``), or the latest of the tenant furthest
        over its share of blocks."""
        if not self.fair_policy:
            return unscheduled[-1]
        victim = self._victim(self._held(False), self.allocator.num_blocks, unscheduled)
        assert victim is not None
        return victim

    def _blocks_to_admit(self, request: Request) -> int:
        """Blocks the request's prefix (if not resident) and first chunk need (ignoring cache
        hits: an upper bound)."""
        prefix = request.prefix
        need = (
            0
            if prefix is None or prefix.resident
            else blocks_for(prefix.num_tokens, self.block_size)
        )
        return need + blocks_for(min(request.num_tokens, self._max_chunk()), self.block_size)

    def _room_for(self, request: Request) -> int:
        """Blocks that could be freed for ``request``: free ones, and unused cached blocks and
        prefixes, but not its own cache hits or idle prefix (it takes those, not frees them)."""
        room = self.allocator.num_free + self.prefix_store.evictable_blocks()
        prefix = request.prefix
        if prefix is not None and prefix.resident and prefix.users == 0:
            room -= len(prefix.block_ids)
        if request.cache_root is not None and not request.block_ids:
            usable = (request.num_tokens - 1) // self.block_size
            hits = self.cache.lookup(self._hashes(request, usable)[:usable])
            room -= sum(1 for b in hits if self.cache.refs(b) == 0)
        return room

    def _admit(self, out: SchedulerOutput, budget: int, favoured: Request | None = None) -> None:
        """Admit waiting requests fairly across tenants while budget, slots and blocks last;
        schedule fills of the prefixes they wait for.

        A waiting request pins its prefix while it waits for the prefix to be filled. When a
        request finds no room, every waiting request lets go of its pin (taking it again when
        its turn comes; an unpinned prefix may be evicted and filled again): otherwise prefixes
        pinned by requests that cannot run yet could keep the room from the request at the head
        of the queue forever. ``favoured``: the request that preemptions made room for, admitted
        first; requests preempted in this step wait for a later one."""
        if self._admit_in_order(out, budget, favoured):
            for request in self.waiting:
                self._unpin_prefix(request)

    def _admit_in_order(
        self, out: SchedulerOutput, budget: int, favoured: Request | None = None
    ) -> bool:
        """The admission loop of :meth:`_admit`; True if it stopped for want of blocks."""
        filling: set[Prefix] = set()
        preempted = set(out.preempted)
        order = self._admission_order()
        if favoured is not None:
            order = itertools.chain([favoured], (r for r in order if r is not favoured))
        for request in order:
            if request in preempted:
                continue  # preempted for someone's share this step: not re-admitted at once
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
            request.admitted_step = self._steps
            if request.queue_seconds is None:
                request.queue_seconds = time.monotonic() - request.arrival_time
            self.running.append(request)
            self._schedule(out, request, n)
            budget -= n
        return False

    def _admission_order(self) -> Iterator[Request]:
        """Waiting requests in the order to admit them: ``fcfs``, as they came (preempted ones
        first); ``fair``, each time from the tenant with the lowest service counter as it is now
        (admitting charges it; ties: the tenant whose next request is first in the queue), by
        priority, then queue order within a tenant."""
        if not self.fair_policy:
            yield from list(self.waiting)
            return
        queues: dict[str, deque[Request]] = {}
        order = {request: i for i, request in enumerate(self.waiting)}
        for request in sorted(self.waiting, key=lambda r: r.priority):  # stable: queue order
            queues.setdefault(request.tenant, deque()).append(request)
        while queues:
            tenant = min(queues, key=lambda t: (self.fair.served(t), order[queues[t][0]]))
            request = queues[tenant].popleft()
            if not queues[tenant]:
                del queues[tenant]
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
        matcher = request.matcher
        if matcher is not None and not matcher.is_terminated():
            matcher.accept_token(token)  # allowed: its mask let only such tokens through
        reason: FinishReason | None = None
        delta = ""
        if token in request.eos_token_ids or token in (params.stop_token_ids or ()):
            reason = FinishReason.STOP
        else:
            delta = request.detokenizer.append(token)
            if request.detokenizer.stopped or (matcher is not None and matcher.is_terminated()):
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
        if request.status is not RequestStatus.FINISHED:
            self.fair.leave(request.tenant)
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

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Take a running request (already out of ``running``) back to the queue."""
        self._free(request)
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1
        self.fair.accounts[request.tenant].preemptions += 1
        out.preempted.append(request)

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
