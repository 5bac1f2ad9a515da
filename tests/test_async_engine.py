"""AsyncEngine: concurrent streams equal offline outputs; leaving a stream aborts its request."""

from __future__ import annotations

import asyncio

import pytest

from prefixserve import LLM, SamplingParams
from prefixserve.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from prefixserve.engine import StepError

PROMPTS = [[5, 9, 33, 7], [11, 12], [40, 41, 42, 43, 44, 45, 46, 47, 48], [100], [7, 7, 8]]


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=4, num_kv_blocks=128)


async def _collect(engine: AsyncEngine, prompt, params):
    deltas, last = [], None
    async for out in engine.generate(prompt, params):
        deltas.extend(out.delta_token_ids)
        last = out
    return deltas, last


def test_concurrent_streams_equal_offline(tiny_llm):
    params = SamplingParams(max_new_tokens=12)
    expected = [o.token_ids for o in tiny_llm.generate(PROMPTS, params)]

    async def main():
        engine = AsyncEngine(tiny_llm.engine)
        try:
            results = await asyncio.gather(*(_collect(engine, p, params) for p in PROMPTS))
        finally:
            await engine.shutdown()
        return results

    results = asyncio.run(main())
    for (deltas, last), want in zip(results, expected):
        assert deltas == want and last.token_ids == want and last.finished
    assert tiny_llm.engine.allocator.num_used == len(tiny_llm.engine.block_cache.idle)


def test_leaving_a_stream_aborts_and_frees(tiny_llm):
    blocks = tiny_llm.engine.allocator

    async def all_free() -> None:
        for _ in range(200):
            if (
                blocks.num_used == len(tiny_llm.engine.block_cache.idle)
                and not tiny_llm.engine.requests
            ):
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"{blocks.num_used} blocks still used: {tiny_llm.engine.requests}")

    async def main():
        engine = AsyncEngine(tiny_llm.engine)
        params = SamplingParams(max_new_tokens=200, ignore_eos=True)
        stream = engine.generate(PROMPTS[2], params)
        first = await anext(stream)
        assert not first.finished
        await stream.aclose()  # the client went away
        await all_free()

        async def consume():
            async for _ in engine.generate(PROMPTS[0], params):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.2)
        assert tiny_llm.engine.requests
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await all_free()
        with pytest.raises(ValueError, match="prompt must not be empty"):
            await anext(engine.generate([], params))
        deltas, last = await _collect(engine, PROMPTS[1], SamplingParams(max_new_tokens=3))
        assert last.finished and len(deltas) == 3
        await all_free()
        await engine.shutdown()
        with pytest.raises(EngineDeadError):
            await anext(engine.generate(PROMPTS[1], params))

    asyncio.run(main())


def test_a_failed_step_fails_its_streams_only(tiny_llm, monkeypatch):
    runner = tiny_llm.engine.runner
    real = runner.execute
    calls = {"n": 0}

    def flaky(scheduled):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("transient failure")
        return real(scheduled)

    monkeypatch.setattr(runner, "execute", flaky)

    async def main():
        engine = AsyncEngine(tiny_llm.engine)
        try:
            with pytest.raises(StepError, match="transient failure"):
                await _collect(engine, PROMPTS[0], SamplingParams(max_new_tokens=5))
            deltas, last = await _collect(engine, PROMPTS[1], SamplingParams(max_new_tokens=3))
            assert last.finished and len(deltas) == 3
        finally:
            await engine.shutdown()

    asyncio.run(main())
    assert tiny_llm.engine.allocator.num_used == len(tiny_llm.engine.block_cache.idle)


def test_shutdown_ends_streams_that_raced_it(tiny_llm):
    async def main():
        engine = AsyncEngine(tiny_llm.engine)
        params = SamplingParams(max_new_tokens=50, ignore_eos=True)
        started = asyncio.create_task(_collect(engine, PROMPTS[0], params))
        await asyncio.sleep(0.05)
        late = asyncio.create_task(_collect(engine, PROMPTS[1], params))
        await engine.shutdown()
        for task in (started, late):
            try:
                _, last = await asyncio.wait_for(task, timeout=10)
                assert last.finished
            except EngineDeadError:
                pass

    asyncio.run(main())
    assert not tiny_llm.engine.requests
    assert tiny_llm.engine.allocator.num_used == len(tiny_llm.engine.block_cache.idle)


def test_bounded_queue_refuses_instead_of_growing(tiny_llm):
    async def main():
        engine = AsyncEngine(tiny_llm.engine, max_waiting=0)
        try:
            with pytest.raises(QueueFullError, match="retry later"):
                await anext(engine.generate(PROMPTS[0], SamplingParams(max_new_tokens=2)))
        finally:
            await engine.shutdown()

    asyncio.run(main())
