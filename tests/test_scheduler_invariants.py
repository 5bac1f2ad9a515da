"""Randomized runs of the engine on small pools and budgets, with requests arriving, aborting and
adapters unloading mid-run, prompts repeating and extending earlier ones (prefix cache hits): after
every event the block, prefix and cache accounting holds, and every request that finishes has the
output it gets alone on a roomy pool without a prefix cache."""

from __future__ import annotations

import random

import pytest

from prefixserve import LLM, SamplingParams
from prefixserve.request import RequestStatus

TEXTS = {
    "a": "The quick brown fox jumps",
    "b": "Paged attention stores keys and values in fixed-size blocks.",
    "c": "Numbers like 12",
}


def check_accounting(engine) -> None:
    cache = engine.block_cache
    held: dict[int, int] = {}
    for r in engine.requests.values():
        assert len(set(r.block_ids)) == len(r.block_ids)
        for b in r.block_ids:
            held[b] = held.get(b, 0) + 1
    cached = set(cache._hash_of)
    for b, n in held.items():
        assert n == 1 or b in cached, f"block {b} shared by {n} requests but not cached"
        if b in cached:
            assert cache.refs(b) == n, f"cached block {b}: {cache.refs(b)} refs, {n} holders"
    for b in cached - held.keys():
        assert cache.refs(b) == 0 and b in cache.idle
    assert set(cache.idle) == cached - held.keys()
    assert engine.allocator.num_used == len(held.keys() | cached) + engine.prefixes.resident_blocks
    for prefix in engine.prefixes.prefixes.values():
        pinning = [r for r in engine.requests.values() if r.prefix is prefix and r.prefix_pinned]
        assert prefix.users == len(pinning)
        assert prefix.requests == sum(r.prefix is prefix for r in engine.requests.values())
    for r in engine.scheduler.waiting:
        # A waiting request pins its prefix only while it waits for the prefix to be filled.
        assert r.status is RequestStatus.WAITING and not r.block_ids
        assert not r.prefix_pinned or (r.prefix is not None and r.prefix.resident)
    for r in engine.scheduler.running:
        assert r.status is RequestStatus.RUNNING and (r.prefix is None or r.prefix_pinned)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    roomy = LLM(
        str(tiny_model_dir("llama")),
        dtype="float32",
        block_size=4,
        num_kv_blocks=512,
        enable_prefix_caching=False,
    )
    for name, text in TEXTS.items():
        roomy.load_adapter(name, text=text)
    cache: dict[tuple, list[int]] = {}

    def alone(prompt: list[int], adapter: str | None, new: int) -> list[int]:
        key = (tuple(prompt), adapter, new)
        if key not in cache:
            params = SamplingParams(max_new_tokens=new, ignore_eos=True)
            cache[key] = roomy.generate([prompt], params, adapter=adapter)[0].token_ids
        return cache[key]

    return alone


@pytest.mark.parametrize("seed", range(6))
def test_random_traffic_keeps_accounting_and_outputs(seed, tiny_model_dir, reference):
    rng = random.Random(seed)
    caching = seed % 3 != 2
    llm = LLM(
        str(tiny_model_dir("llama")),
        enable_prefix_caching=caching,
        preemption_min_steps=rng.choice([0, 2]),
        dtype="float32",
        block_size=4,
        num_kv_blocks=rng.choice([14, 20, 30]),
        max_num_batched_tokens=rng.choice([3, 7, 16, 64]),
        max_num_seqs=rng.choice([2, 4, 8]),
        long_prefill_token_threshold=rng.choice([None, 5]),
    )
    engine = llm.engine
    for name, text in TEXTS.items():
        llm.load_adapter(name, text=text)
    asked: dict[str, tuple[list[int], str | None, int]] = {}
    earlier: list[tuple[list[int], str | None, str]] = []

    def submit(adapters: list[str | None]) -> None:
        adapter = rng.choice(adapters)
        tenant = rng.choice("ab")  # two tenants: preemptions for share too
        prompt = [rng.randrange(3, 300) for _ in range(rng.randint(1, 20))]
        if earlier and rng.random() < 0.6:  # a next turn, or the same prompt again
            before, before_adapter, tenant = rng.choice(earlier)
            prompt = before + prompt[: rng.choice([0, len(prompt)])]
            adapter = before_adapter if before_adapter in adapters else adapter
        prompt = prompt[:24]
        new = rng.randint(1, 12)
        try:
            rid = engine.add_request(
                prompt,
                SamplingParams(max_new_tokens=new, ignore_eos=True),
                adapter=adapter,
                tenant=tenant,
                tenant_weight=2.0 if seed % 2 else 1.0,
                priority=rng.choice([0, 0, 1]),
            )
        except ValueError:  # too long for this small pool: refused up front, nothing held
            check_accounting(engine)
            return
        asked[rid] = (prompt, adapter, new)
        earlier.append((prompt, adapter, tenant))

    for _ in range(rng.randint(6, 14)):
        submit([None, *TEXTS])
    finished: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.token_ids
        check_accounting(engine)
        if rng.random() < 0.15 and engine.requests:
            engine.abort(rng.choice(list(engine.requests)))
            check_accounting(engine)
        live = [n for n, p in engine.prefixes.prefixes.items() if not p.unloading]
        if rng.random() < 0.05 and live:
            engine.unload_adapter(rng.choice(live))
            check_accounting(engine)
        if rng.random() < 0.2:
            submit([None, *(n for n, p in engine.prefixes.prefixes.items() if not p.unloading)])
        steps += 1
        assert steps < 2000, "the engine stopped making progress"
    assert finished, "some requests must finish"
    for rid, tokens in finished.items():
        assert tokens == reference(*asked[rid]), rid
    assert engine.allocator.num_used == engine.prefixes.resident_blocks + len(
        engine.block_cache.idle
    )
    hits = engine.stats().prefix_cache_hits
    assert hits > 0 if caching else hits == 0
    engine.reset_prefix_cache()
    assert engine.allocator.num_used == engine.prefixes.resident_blocks
