"""Greedy outputs of the engine equal transformers' own ``generate``, one prompt at a time.

The engine batches all prompts together (packed varlen steps over the paged pool, chunked
prefill, preemption); transformers runs each prompt alone with its own dynamic cache.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefixserve import LLM, SamplingParams

from hf_reference import hf_greedy

CHAT_QUESTIONS = [
    "What is the capital of France?",
    "Hi",
    "Write a haiku about the sea.",
    "Give me three tips for learning a new language, with one example each.",
    "What is 12 times 12?",
    "Explain in two sentences why the sky is blue and what Rayleigh scattering has to do with it.",
    "Name a famous painting.",
    "Suggest a name for a friendly robot that helps in the kitchen and explain the choice.",
    "Translate 'good morning' into Spanish.",
]


def _tiny_prompts(n: int = 7, vocab: int = 300) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    lengths = [1, 3, 8, 13, 21, 34, 5, 55, 2][:n]
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for length in lengths]


@pytest.fixture(scope="module")
def default_reference(default_llm: LLM) -> tuple[list[list[int]], list[list[int]]]:
    prompts = [
        default_llm.apply_chat_template([{"role": "user", "content": q}]) for q in CHAT_QUESTIONS
    ]
    model = AutoModelForCausalLM.from_pretrained(default_llm.engine.model_path, dtype=torch.float32)
    return prompts, hf_greedy(model, prompts, max_new_tokens=32)


def test_default_model_batched_equals_transformers(default_llm, default_reference):
    prompts, expected = default_reference
    assert len({len(p) for p in prompts}) == len(prompts), "prompts must differ in length"
    outputs = default_llm.generate(prompts, SamplingParams(max_new_tokens=32))
    assert [o.token_ids for o in outputs] == expected
    for out, want in zip(outputs, expected):
        assert out.finish_reason == ("stop" if len(want) < 32 else "length")
        assert out.text == default_llm.tokenizer.decode(want, skip_special_tokens=True)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_tiny_architectures_equal_transformers(arch, tiny_model_dir):
    path = tiny_model_dir(arch)
    prompts = _tiny_prompts()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    expected = hf_greedy(model, prompts, max_new_tokens=24)
    llm = LLM(str(path), dtype="float32", block_size=4, num_kv_blocks=256)
    outputs = llm.generate(prompts, SamplingParams(max_new_tokens=24))
    assert [o.token_ids for o in outputs] == expected
    assert llm.engine.allocator.num_used == len(llm.engine.block_cache.idle)


@pytest.fixture(scope="module")
def llama_reference(tiny_model_dir) -> tuple[str, list[list[int]], list[list[int]]]:
    path = tiny_model_dir("llama")
    prompts = _tiny_prompts()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return str(path), prompts, hf_greedy(model, prompts, max_new_tokens=24)


def test_preemption_keeps_outputs(llama_reference):
    path, prompts, expected = llama_reference
    # 24 blocks of 4 tokens cannot hold the 7 requests (up to 79 tokens each) at once.
    llm = LLM(path, dtype="float32", block_size=4, num_kv_blocks=24)
    outputs = llm.generate(prompts, SamplingParams(max_new_tokens=24))
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outputs] == expected
    assert llm.engine.allocator.num_used == len(llm.engine.block_cache.idle)


@pytest.mark.parametrize(("budget", "chunk"), [(6, None), (64, 5)])
def test_chunked_prefill_keeps_outputs(llama_reference, budget, chunk):
    path, prompts, expected = llama_reference
    llm = LLM(
        path,
        dtype="float32",
        block_size=4,
        num_kv_blocks=256,
        max_num_batched_tokens=budget,
        long_prefill_token_threshold=chunk,
    )
    schedule = llm.engine.scheduler.schedule
    chunks: list[int] = []

    def spy():
        scheduled = schedule()
        chunks.extend(scheduled.num_new_tokens)
        assert sum(scheduled.num_new_tokens) <= budget
        return scheduled

    llm.engine.scheduler.schedule = spy
    outputs = llm.generate(prompts, SamplingParams(max_new_tokens=24))
    assert [o.token_ids for o in outputs] == expected
    limit = min(budget, chunk or budget)
    assert max(chunks) <= limit < max(len(p) for p in prompts)  # long prompts were chunked
    assert llm.engine.allocator.num_used == len(llm.engine.block_cache.idle)
