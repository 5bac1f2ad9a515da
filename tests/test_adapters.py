"""Adapters as shared prefix KVs: exact against PEFT, mixed in one batch, shared once."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefixserve import LLM, SamplingParams

from hf_reference import hf_greedy
from peft_reference import PEFT_KINDS, peft_greedy

PROMPTS = [[5, 9, 33, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19], [100]]
NEW = 12
# kind -> prefix length: odd lengths, shorter and longer than a block of 4
LENGTHS = {
    "prompt_tuning": 5,
    "p_tuning": 3,
    "prefix_tuning": 7,
    "prefix_projection": 4,
    "cartridge": 9,
}
SYSTEM = "Prefix tuning learns a key and value prefix."


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def setup(request, tiny_model_dir, peft_adapter_dir):
    """A tiny model, one adapter of every kind, and PEFT's own outputs for each."""
    model_dir = tiny_model_dir(request.param)
    adapters = {kind: peft_adapter_dir(model_dir, kind, n) for kind, n in LENGTHS.items()}
    expected = {kind: peft_greedy(model_dir, path, PROMPTS, NEW) for kind, path in adapters.items()}
    llm = LLM(str(model_dir), dtype="float32", block_size=4, num_kv_blocks=256)
    for kind, path in adapters.items():
        llm.load_adapter(kind, path)
    system_ids = llm.engine.tokenize(SYSTEM)
    llm.load_adapter("text", text=SYSTEM)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with_text = hf_greedy(base, [system_ids + p for p in PROMPTS], NEW)
    expected["text"] = with_text
    expected[None] = hf_greedy(base, PROMPTS, NEW)
    return llm, adapters, expected


@pytest.mark.parametrize("kind", [*PEFT_KINDS, "text"])
def test_each_kind_equals_peft(setup, kind):
    llm, _, expected = setup
    outputs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=NEW), adapter=kind)
    assert [o.token_ids for o in outputs] == expected[kind]
    info = {a.name: a for a in llm.list_adapters()}[kind]
    assert info.resident and info.requests == 0
    assert info.num_tokens == (LENGTHS.get(kind) or len(llm.engine.tokenize(SYSTEM)))


def test_mixed_batch_equals_each_alone(setup):
    llm, _, expected = setup
    names = [*PEFT_KINDS, "text", None]
    batch = [(name, i) for name in names for i in range(len(PROMPTS))]
    batch = batch[::2] + batch[1::2]  # interleave adapters inside the batch
    outputs = llm.generate(
        [PROMPTS[i] for _, i in batch],
        SamplingParams(max_new_tokens=NEW),
        adapter=[name for name, _ in batch],
    )
    for (name, i), out in zip(batch, outputs):
        assert out.token_ids == expected[name][i], name
    assert llm.engine.allocator.num_used == llm.engine.prefixes.resident_blocks + len(
        llm.engine.block_cache.idle
    )


@pytest.mark.parametrize("n", [1, 6, 13])
def test_concurrent_requests_share_one_prefix(setup, n):
    llm, _, _ = setup
    engine = llm.engine
    prefix = engine.prefixes.prefixes["cartridge"]
    ids = [
        engine.add_request([7] * 6, SamplingParams(max_new_tokens=3), adapter="cartridge")
        for _ in range(n)
    ]
    engine.step()
    own = {b for i in ids for b in engine.requests[i].block_ids}  # cached ones are shared
    others = engine.prefixes.resident_blocks - len(prefix.block_ids)
    assert len(prefix.block_ids) == 3  # 9 tokens in blocks of 4, once
    cached = len(engine.block_cache.idle)
    assert engine.allocator.num_used == len(own) + len(prefix.block_ids) + others + cached
    assert prefix.users == n and all(engine.allocator.in_use(b) for b in prefix.block_ids)
    while engine.has_unfinished_requests():
        engine.step()
    assert prefix.users == 0 and prefix.requests == 0
