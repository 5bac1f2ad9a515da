"""No tenant holds the others up: long prompts and long adapter prefixes are computed in chunks
that leave room for other requests, and waiting requests are admitted tenant by tenant. Counted
in engine steps (not seconds), on a small token budget."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefixserve import LLMEngine, SamplingParams
from prefixserve.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig

ONE = SamplingParams(max_new_tokens=1, ignore_eos=True)
LONG_PROMPT = [7, 8, 9, 10] * 100  # 400 tokens


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


def _engine(model_dir: Path, **scheduler) -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model=ModelConfig(str(model_dir), "float32"),
            cache=CacheConfig(block_size=4, num_kv_blocks=512),
            scheduler=SchedulerConfig(**scheduler),
        )
    )


def _steps_until_done(engine: LLMEngine, request_id: str, limit: int = 200) -> int:
    for step in range(1, limit + 1):
        if any(o.request_id == request_id and o.finished for o in engine.step()):
            return step
    raise AssertionError(f"{request_id} did not finish in {limit} steps")


def test_short_request_is_served_while_long_prompts_prefill(model_dir):
    engine = _engine(model_dir, max_num_batched_tokens=32, long_prefill_token_threshold=16)
    engine.add_request(LONG_PROMPT, ONE, "long", tenant="a")
    engine.add_request(LONG_PROMPT[1:], ONE, "long2", tenant="a")
    engine.step()  # both long prompts are running now, filling the budget
    engine.add_request([5, 6, 7], ONE, "short", tenant="b")
    assert _steps_until_done(engine, "short") == 1
    assert {"long", "long2"} <= set(engine.requests)  # still prefilling
    while engine.has_unfinished_requests():
        engine.step()


def test_prefill_chunks_never_exceed_the_threshold(model_dir):
    engine = _engine(model_dir, max_num_batched_tokens=64, long_prefill_token_threshold=16)
    engine.add_request(LONG_PROMPT, ONE, "long")
    while engine.has_unfinished_requests():
        scheduled = engine.scheduler.schedule()
        assert all(n <= 16 for n in scheduled.num_new_tokens)
        engine.scheduler.update(scheduled)  # not run: only the schedule is under test
        for request in list(scheduled.requests):
            if request.num_computed_tokens == request.num_tokens:
                engine.abort(request.request_id)


def test_a_burst_of_one_tenant_does_not_queue_the_others(model_dir):
    engine = _engine(model_dir, max_num_seqs=2)
    for i in range(12):
        engine.add_request([3, 4, 5 + i], SamplingParams(max_new_tokens=4), f"a{i}", tenant="a")
    engine.add_request([9, 9], ONE, "b0", tenant="b")
    # Two slots: 'a' gets one, 'b' (no running request) gets the other at once.
    first = engine.scheduler.schedule()
    assert {r.request_id for r in first.requests} == {"a0", "b0"}


def test_long_prefix_fills_in_chunks_while_others_decode(model_dir):
    engine = _engine(model_dir, max_num_batched_tokens=32, long_prefill_token_threshold=16)
    text = " ".join(["paged attention"] * 30)
    engine.load_adapter("long", text=text)
    prefix_tokens = engine.prefixes.get("long").num_tokens
    assert prefix_tokens > 100
    engine.add_request([5, 6], SamplingParams(max_new_tokens=30, ignore_eos=True), "talker")
    engine.step()
    engine.add_request([5, 6], ONE, "tuned", adapter="long")
    fills = []
    while "tuned" in engine.requests:
        scheduled_before = len(engine.requests["talker"].output_token_ids)
        outputs = engine.step()
        prefix = engine.prefixes.get("long")
        fills.append(prefix.filled)
        if not prefix.materialized:  # the other request got a token in the same step
            assert len(engine.requests["talker"].output_token_ids) == scheduled_before + 1
            assert not any(o.request_id == "tuned" for o in outputs)
    steps = [b - a for a, b in zip([0, *fills], fills) if b != a]
    assert max(steps) <= 16 and sum(steps) == prefix_tokens
    assert engine.prefixes.stats.materializations == 1


@pytest.mark.parametrize(
    "case", [{"max_num_seqs": 4}, {"num_kv_blocks": 14}], ids=["slots", "kv-blocks"]
)
def test_a_tenant_over_its_share_yields_and_its_outputs_stay_the_same(model_dir, case):
    """'a' fills every slot (or the pool); 'b''s one-token request preempts a request of 'a'
    once the minimum run has passed, and every request of 'a' still ends with the tokens it gets
    alone, without preemption or a prefix cache."""
    blocks = case.get("num_kv_blocks", 512)
    engine = LLMEngine(
        EngineConfig(
            model=ModelConfig(str(model_dir), "float32"),
            cache=CacheConfig(block_size=4, num_kv_blocks=blocks),
            scheduler=SchedulerConfig(
                max_num_seqs=case.get("max_num_seqs", 64), preemption_min_steps=3
            ),
        )
    )
    long = SamplingParams(max_new_tokens=40, ignore_eos=True)
    prompts = {f"a{i}": [3, 4, 5 + i, 6, 7, 8, 9, 10 + i] for i in range(4)}
    for rid, prompt in prompts.items():
        engine.add_request(prompt, long, rid, tenant="a")
    for _ in range(4):  # every request of 'a' runs past its minimum run
        engine.step()
    if blocks < 512:
        assert engine.allocator.num_free + engine.prefixes.evictable_blocks() < 3  # b needs 3
    engine.add_request([9] * 9, ONE, "b0", tenant="b")
    assert _steps_until_done(engine, "b0") <= 2
    preempted = engine.scheduler.fair.accounts["a"].preemptions
    assert preempted >= 1 and engine.scheduler.fair.accounts["b"].preemptions == 0
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.token_ids
    alone = LLMEngine(
        EngineConfig(
            model=ModelConfig(str(model_dir), "float32"),
            cache=CacheConfig(block_size=4, num_kv_blocks=512, enable_prefix_caching=False),
        )
    )
    for rid, prompt in prompts.items():
        alone.add_request(prompt, long, rid)
    expected = {}
    while alone.has_unfinished_requests():
        expected.update({o.request_id: o.token_ids for o in alone.step() if o.finished})
    assert outputs == expected
