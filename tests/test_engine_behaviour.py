"""Engine behaviour beyond exactness: sampling, stopping, aborting, block accounting, bad input."""

from __future__ import annotations

import pytest

from prefixserve import LLM, SamplingParams
from prefixserve.engine import StepError

PROMPTS = [[5, 9, 33, 7], [11, 12], [40, 41, 42, 43, 44, 45, 46, 47, 48], [100]]


@pytest.fixture(scope="module")
def tiny_llm(tiny_model_dir) -> LLM:
    return LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=4, num_kv_blocks=128)


def test_seeded_sampling_is_independent_of_the_batch(tiny_llm):
    seeded = SamplingParams(
        temperature=1.0, top_p=0.95, seed=1234, max_new_tokens=20, ignore_eos=True
    )
    alone = tiny_llm.generate([PROMPTS[0]], seeded)[0]
    others = [SamplingParams(temperature=0.8, seed=s, max_new_tokens=12) for s in (1, 2, 3)]
    mixed = tiny_llm.generate(
        [PROMPTS[1], PROMPTS[0], PROMPTS[2], PROMPTS[3]], [others[0], seeded, others[1], others[2]]
    )
    assert mixed[1].token_ids == alone.token_ids
    assert len(set(alone.token_ids)) > 3, "sampling at temperature 1 should vary"
    reseeded = tiny_llm.generate(
        [PROMPTS[0]],
        SamplingParams(temperature=1.0, top_p=0.95, seed=4321, max_new_tokens=20, ignore_eos=True),
    )[0]
    assert reseeded.token_ids != alone.token_ids


def test_top_k_one_equals_greedy(tiny_llm):
    greedy = tiny_llm.generate(PROMPTS, SamplingParams(max_new_tokens=16))
    top1 = tiny_llm.generate(
        PROMPTS, SamplingParams(temperature=1.5, top_k=1, max_new_tokens=16, seed=3)
    )
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]


def test_stop_token_id_ends_generation(tiny_llm):
    free = SamplingParams(max_new_tokens=16, ignore_eos=True)
    full = tiny_llm.generate([PROMPTS[0]], free)[0].token_ids
    k = next(i for i, t in enumerate(full) if i >= 2 and t not in full[:i])
    out = tiny_llm.generate(
        [PROMPTS[0]], SamplingParams(max_new_tokens=16, ignore_eos=True, stop_token_ids=[full[k]])
    )[0]
    assert out.token_ids == full[: k + 1]
    assert out.finish_reason == "stop"


def test_max_new_tokens_gives_length(tiny_llm):
    out = tiny_llm.generate([PROMPTS[0]], SamplingParams(max_new_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_string_cuts_text(default_llm):
    prompt = default_llm.apply_chat_template([{"role": "user", "content": "Describe Paris."}])
    full = default_llm.generate([prompt], SamplingParams(max_new_tokens=40))[0]
    words = full.text.split()
    stop = " " + words[len(words) // 2]
    cut = full.text.index(stop)
    out = default_llm.generate([prompt], SamplingParams(max_new_tokens=40, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:cut]
    assert out.token_ids == full.token_ids[: len(out.token_ids)]
    kept = default_llm.generate(
        [prompt], SamplingParams(max_new_tokens=40, stop=stop, include_stop_str_in_output=True)
    )[0]
    assert kept.text == full.text[: cut + len(stop)]


def test_abort_and_finish_free_every_block(tiny_llm):
    engine = tiny_llm.engine
    ids = [
        engine.add_request(p, SamplingParams(max_new_tokens=30, ignore_eos=True)) for p in PROMPTS
    ]
    for _ in range(3):
        engine.step()
    assert engine.allocator.num_free < engine.allocator.num_blocks
    aborted = engine.abort(ids[1])
    assert aborted is not None and aborted.finished and aborted.finish_reason == "abort"
    assert engine.abort(ids[1]) is None
    engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=4), request_id="late")
    engine.abort(ids[3])
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.allocator.num_used == len(engine.block_cache.idle)
    assert not engine.requests


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": 2.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_invalid_sampling_params_name_field_and_value(kwargs, field):
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**kwargs)
    assert str(next(iter(kwargs.values()))) in str(info.value)


def test_invalid_requests_fail_alone(tiny_llm):
    engine = tiny_llm.engine
    with pytest.raises(ValueError, match="prompt must not be empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="prompt must not be empty"):
        engine.add_request("", SamplingParams())
    with pytest.raises(ValueError, match=r"exceeds the context of 512 tokens"):
        engine.add_request([5] * 500, SamplingParams(max_new_tokens=13))
    with pytest.raises(ValueError, match=r"token ids must be ints in \[0, "):
        engine.add_request([5, 10**6], SamplingParams())
    with pytest.raises(ValueError, match="need 33 KV blocks but the pool has 32"):
        small = LLM(str(engine.model_path), dtype="float32", block_size=4, num_kv_blocks=32)
        small.engine.add_request([5] * 100, SamplingParams(max_new_tokens=29))
    assert not engine.requests and engine.allocator.num_used == len(engine.block_cache.idle)
    assert tiny_llm.generate([PROMPTS[0]], SamplingParams(max_new_tokens=3))[0].finish_reason


@pytest.mark.parametrize("dtype", ["float64", "int8", "fp8"])
def test_unknown_dtype_is_rejected(dtype):
    with pytest.raises(ValueError, match=f"dtype must be one of .* got '{dtype}'"):
        LLM("unused", dtype=dtype)


def test_failed_step_finishes_its_requests_and_the_engine_goes_on(tiny_llm, monkeypatch):
    engine = tiny_llm.engine
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=4)) for p in PROMPTS[:2]]

    def broken(scheduled):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "execute", broken)
    with pytest.raises(StepError, match="device lost") as info:
        engine.step()
    assert sorted(info.value.request_ids) == sorted(ids)
    assert not engine.requests and not engine.has_unfinished_requests()
    assert engine.allocator.num_used == len(engine.block_cache.idle)
    monkeypatch.undo()
    assert tiny_llm.generate([PROMPTS[0]], SamplingParams(max_new_tokens=3))[0].finished
