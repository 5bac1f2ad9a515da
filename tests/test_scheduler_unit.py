"""The scheduler, the prefix store and the block allocator on their own: plain requests and
adapters, no model. (End-to-end behaviour is in test_scheduler_invariants and test_fairness.)"""

from __future__ import annotations

import pytest

from prefixserve.adapters import Adapter, AdapterKind, AdapterNameTakenError, AdapterNotFoundError
from prefixserve.block_cache import BlockCache
from prefixserve.config import SchedulerConfig
from prefixserve.kv_cache import BlockAllocator, blocks_for
from prefixserve.prefix_store import PrefixStore
from prefixserve.request import FinishReason, Request, RequestStatus
from prefixserve.sampling_params import SamplingParams
from prefixserve.scheduler import Scheduler

BS = 4


def text_adapter(name: str, tokens: int, kind: AdapterKind = AdapterKind.TEXT) -> Adapter:
    return Adapter(name, kind, tokens, token_ids=list(range(tokens)))


def request(rid: str, tokens: int, tenant: str = "", prefix=None) -> Request:
    return Request(
        request_id=rid,
        token_ids=list(range(tokens)),
        params=SamplingParams(max_new_tokens=4),
        num_prompt_tokens=tokens,
        detokenizer=None,  # type: ignore[arg-type]  # not reached: nothing is sampled here
        prefix=prefix,
        tenant=tenant,
    )


def make(blocks: int = 64, **config) -> tuple[Scheduler, PrefixStore, BlockAllocator]:
    allocator = BlockAllocator(blocks)
    store = PrefixStore(allocator, BS, bytes_per_block=1, cache=BlockCache(allocator, BS))
    return Scheduler(SchedulerConfig(**config), allocator, store, BS), store, allocator


def run(scheduler: Scheduler):
    """Schedule one step and apply it as if it ran: a request that computed all its tokens gets
    one more, as a sampled token would (appended directly: no detokenizer here)."""
    out = scheduler.schedule()
    scheduler.update(out)
    for r in out.requests:
        if r.num_computed_tokens == r.num_tokens:
            r.token_ids.append(0)
    return out


# -- allocator ------------------------------------------------------------------------------------


def test_allocator_hands_out_and_takes_back():
    allocator = BlockAllocator(4)
    first = allocator.allocate(3)
    assert first == [0, 1, 2] and allocator.num_free == 1
    assert allocator.allocate(2) is None and allocator.num_free == 1  # all or nothing
    allocator.free(first)
    assert allocator.num_free == 4 and not allocator.in_use(0)
    with pytest.raises(AssertionError, match="freed twice"):
        allocator.free([0])
    assert blocks_for(0, BS) == 0 and blocks_for(1, BS) == 1 and blocks_for(8, BS) == 2


# -- prefix store ---------------------------------------------------------------------------------


def test_prefix_store_pins_evicts_least_recently_used_and_drops_on_last_request():
    _, store, allocator = make(blocks=4)
    a, b = store.add(text_adapter("a", 8)), store.add(text_adapter("b", 8))
    with pytest.raises(AdapterNameTakenError):
        store.add(text_adapter("a", 3))
    assert store.acquire(a) and allocator.num_used == 2
    assert store.acquire(b) and allocator.num_used == 4
    store.release(a)
    c = store.add(text_adapter("c", 4))
    assert store.acquire(c)  # evicts 'a' (idle), never 'b' (pinned)
    assert not a.resident and b.resident and c.resident
    assert store.stats.evictions == 1
    store.attach("b")
    assert not store.remove("b")  # a request holds it: goes with that request
    with pytest.raises(AdapterNotFoundError, match="being unloaded"):
        store.attach("b")
    store.release(b)
    store.detach(b)
    assert "b" not in store.prefixes and allocator.num_used == 1  # only 'c'


# -- scheduler ------------------------------------------------------------------------------------


def test_chunks_respect_threshold_and_leave_budget_to_waiting_requests():
    scheduler, _, _ = make(max_num_batched_tokens=32, long_prefill_token_threshold=16)
    long1, long2 = request("long1", 100, "a"), request("long2", 100, "a")
    scheduler.add(long1)
    scheduler.add(long2)
    first = run(scheduler)
    assert first.num_new_tokens == [16, 16]
    scheduler.add(request("short", 3, "b"))
    second = run(scheduler)
    # one long prefill keeps going, the other leaves its share to the waiting request
    assert [r.request_id for r in second.requests] == ["long1", "short"]
    assert second.num_new_tokens == [16, 3]


def test_waiting_requests_are_admitted_tenant_by_tenant():
    scheduler, _, _ = make(max_num_seqs=3)
    for i in range(4):
        scheduler.add(request(f"a{i}", 2, "a"))
    scheduler.add(request("b0", 2, "b"))
    scheduler.add(request("c0", 2, "c"))
    out = run(scheduler)
    assert [r.request_id for r in out.requests] == ["a0", "b0", "c0"]


def test_preemption_frees_the_latest_request_and_requeues_it_first():
    scheduler, _, allocator = make(blocks=4, max_num_batched_tokens=64)
    first, second = request("first", 8), request("second", 8)
    scheduler.add(first)
    scheduler.add(second)
    run(scheduler)
    assert allocator.num_free == 0  # each got a token: 'first' now needs a third block
    out = run(scheduler)
    assert out.preempted == [second] and second.status is RequestStatus.WAITING
    assert second.num_computed_tokens == 0 and not second.block_ids
    assert scheduler.waiting[0] is second and out.requests == [first]


def test_a_prefix_fills_in_chunks_without_holding_up_the_queue():
    scheduler, store, _ = make(max_num_batched_tokens=16, long_prefill_token_threshold=8)
    prefix = store.add(text_adapter("sys", 20))
    tuned = request("tuned", 2, "a", prefix=store.attach("sys"))
    scheduler.add(tuned)
    scheduler.add(request("plain", 2, "b"))
    steps = []
    while tuned.status is RequestStatus.WAITING:
        out = run(scheduler)
        steps.append(([(f.start, f.num_tokens) for f in out.fills], out.num_new_tokens))
    assert [fills for fills, _ in steps] == [[(0, 8)], [(8, 8)], [(16, 4)], []]
    assert steps[0][1] == [2]  # 'plain' ran in the first step, behind nothing
    assert prefix.materialized and store.stats.materializations == 1


def test_stored_kv_prefixes_are_copied_whole_without_budget():
    scheduler, store, _ = make(max_num_batched_tokens=4, long_prefill_token_threshold=2)
    store.add(Adapter("kv", AdapterKind.PREFIX_TUNING, 30, kv=None))
    scheduler.add(request("r", 2, prefix=store.attach("kv")))
    out = run(scheduler)
    assert [(f.start, f.num_tokens) for f in out.fills] == [(0, 30)]
    assert run(scheduler).num_new_tokens == [2]


def test_finishing_frees_blocks_and_lets_go_of_the_prefix():
    scheduler, store, allocator = make()
    store.add(text_adapter("sys", 3, AdapterKind.TEXT))
    r = request("r", 5, prefix=store.attach("sys"))
    scheduler.add(r)
    while r.status is RequestStatus.WAITING:
        run(scheduler)
    prefix = store.prefixes["sys"]
    assert prefix.users == 1 and prefix.requests == 1
    scheduler.finish(r, FinishReason.ABORT)
    assert prefix.users == 0 and prefix.requests == 0
    assert allocator.num_used == len(prefix.block_ids)  # only the idle, resident prefix


# -- prefix cache ---------------------------------------------------------------------------------


def test_a_thousand_random_requests_leave_the_pool_as_they_found_it():
    """Requests repeating and extending each other's tokens, behind adapters or none, on a pool
    small enough to evict and preempt, some aborted: every step, cached blocks are counted by
    their holders; at the end only idle cached blocks and idle prefixes remain, and evicting
    them frees the whole pool."""
    import random

    from prefixserve.block_cache import cache_root

    rng = random.Random(0)
    scheduler, store, allocator = make(blocks=20, max_num_batched_tokens=24, max_num_seqs=6)
    cache = store.cache
    for name, n in (("a", 5), ("b", 8)):
        store.add(text_adapter(name, n))
    stems = [[rng.randrange(100) for _ in range(rng.randint(1, 30))] for _ in range(12)]
    live: list[Request] = []
    hits = 0
    for i in range(1000):
        adapter = rng.choice([None, "a", "b"])
        tokens = [*rng.choice(stems)[: rng.randint(1, 30)], *range(rng.randint(0, 6))]
        r = request(f"r{i}", 1, rng.choice("xy"), store.attach(adapter) if adapter else None)
        r.token_ids = tokens
        r.num_prompt_tokens = len(tokens)
        r.params = SamplingParams(max_new_tokens=rng.randint(1, 5))
        prefix = r.prefix
        r.cache_root = cache_root(prefix and (prefix.name, prefix.serial), r.tenant, None)
        scheduler.add(r)
        live.append(r)
        for _ in range(rng.randint(0, 3)):
            run(scheduler)
            for done in [
                q for q in scheduler.running if q.num_output_tokens >= q.params.max_new_tokens
            ]:
                hits += done.num_cached_tokens or 0
                scheduler.finish(done, FinishReason.LENGTH)
            if rng.random() < 0.05 and (pending := [q for q in live if not q.is_finished]):
                scheduler.finish(rng.choice(pending), FinishReason.ABORT)
            holders: dict[int, int] = {}
            for q in scheduler.running:
                for b in q.block_ids:
                    holders[b] = holders.get(b, 0) + 1
            assert all(cache.refs(b) == n for b, n in holders.items() if cache.is_cached(b))
            assert all(n == 1 for b, n in holders.items() if not cache.is_cached(b))
        live = [q for q in live if not q.is_finished]
    while scheduler.has_unfinished:
        run(scheduler)
        for done in [
            q for q in scheduler.running if q.num_output_tokens >= q.params.max_new_tokens
        ]:
            scheduler.finish(done, FinishReason.LENGTH)
    assert hits > 0 and cache.stats.evictions > 0 and scheduler.num_preemptions > 0
    assert (
        allocator.num_used
        == store.resident_blocks + len(cache.idle)
        == store.resident_blocks + cache.num_cached
    )
    cache.clear_idle()
    for name in ("a", "b"):
        assert store.remove(name)
    assert allocator.num_free == allocator.num_blocks
