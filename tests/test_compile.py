"""Compiled model steps: exact against transformers and PEFT, few graphs, eager when they cannot.

The compiled forward (``torch.compile`` with our attention as one opaque op) must give the same
greedy tokens as transformers' and PEFT's own ``generate`` in fp32, with adapters of every kind
mixed in a batch, chunked prefill and preemption; a long run of varied batches must not
recompile; and a model that cannot compile must still serve, eagerly, saying why once.
"""

from __future__ import annotations

import logging
import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefixserve import LLM, SamplingParams
from prefixserve.config import env_cpu_isa
from prefixserve.kernels.cpu_isa import default_isa

from hf_reference import hf_greedy
from peft_reference import peft_greedy

NEW = 10
PROMPTS = [[5, 9, 33, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24], [100]]
ADAPTERS = {"prompt_tuning": 5, "prefix_tuning": 7, "p_tuning": 3, "cartridge": 9}
"""Adapter kind -> prefix length (odd, shorter and longer than a block of 4)."""
SYSTEM = "Prefix tuning learns a key and value prefix."


@pytest.fixture(scope="module")
def references(tiny_model_dir, peft_adapter_dir):
    """The tiny llama, one adapter of each kind, and transformers' and PEFT's greedy outputs."""
    model_dir = tiny_model_dir("llama")
    adapters = {kind: peft_adapter_dir(model_dir, kind, n) for kind, n in ADAPTERS.items()}
    expected = {kind: peft_greedy(model_dir, path, PROMPTS, NEW) for kind, path in adapters.items()}
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    expected[None] = hf_greedy(base, PROMPTS, NEW)
    return model_dir, adapters, expected, base


@pytest.fixture(scope="module")
def compiled_llm(references):
    """A compiled engine with a small pool and small prefill chunks (so requests are preempted
    and prompts are chunked), every adapter loaded."""
    model_dir, adapters, _, _ = references
    llm = LLM(
        str(model_dir),
        dtype="float32",
        block_size=4,
        num_kv_blocks=40,
        long_prefill_token_threshold=6,
        enforce_eager=False,
    )
    for kind, path in adapters.items():
        llm.load_adapter(kind, path)
    llm.load_adapter("text", text=SYSTEM)
    runner = llm.engine.runner
    assert runner.compiled is not None
    if default_isa(env_cpu_isa()) != "baseline":  # the native linears run inside the graph
        assert runner.native_linears == runner.model.config.num_hidden_layers * 7 + 1
        assert not runner.compiled.freezing
    return llm


def test_compiled_mixed_adapters_chunked_preempted_equal_peft(compiled_llm, references):
    _, _, expected, base = references
    system_ids = compiled_llm.engine.tokenize(SYSTEM)
    expected = {**expected, "text": hf_greedy(base, [system_ids + p for p in PROMPTS], NEW)}
    names = [*ADAPTERS, "text", None]
    batch = [(name, i) for name in names for i in range(len(PROMPTS))]
    batch = batch[::2] + batch[1::2]  # interleave adapters inside the batch
    engine = compiled_llm.engine
    preempted = engine.scheduler.num_preemptions
    outputs = compiled_llm.generate(
        [PROMPTS[i] for _, i in batch],
        SamplingParams(max_new_tokens=NEW),
        adapter=[name for name, _ in batch],
    )
    for (name, i), out in zip(batch, outputs):
        assert out.token_ids == expected[name][i], name
    assert engine.scheduler.num_preemptions > preempted, "the pool was meant to preempt"
    assert engine.runner.compiled is not None, "the engine fell back to eager"


def test_varied_batches_over_many_steps_do_not_recompile(compiled_llm, monkeypatch):
    engine = compiled_llm.engine
    compiled = engine.runner.compiled
    assert compiled is not None
    graphs = compiled.num_graphs
    assert graphs == 1, f"the warm-up compiled {graphs} graphs (one serves every step)"
    shapes: set[tuple[int, int]] = set()
    prepare = engine.runner.prepare

    def record(scheduled):
        inputs = prepare(scheduled)
        shapes.add((len(inputs.input_ids), len(inputs.logits_indices)))
        return inputs

    monkeypatch.setattr(engine.runner, "prepare", record)
    rng = random.Random(0)
    names = [*ADAPTERS, "text", None]
    steps = 0
    while steps < 60 or engine.has_unfinished_requests():
        if steps < 50 and rng.random() < 0.3:  # requests join while others run
            for _ in range(rng.randint(1, 3)):
                prompt = [rng.randrange(3, 300) for _ in range(rng.randint(1, 30))]
                params = SamplingParams(max_new_tokens=rng.randint(1, 12))
                engine.add_request(prompt, params, adapter=rng.choice(names))
        engine.step()
        steps += 1
    token_counts = {t for t, _ in shapes}
    row_counts = {r for _, r in shapes}
    assert 1 in token_counts and len(token_counts) >= 10, shapes
    assert {0, 1} <= row_counts and len(row_counts) >= 4, shapes
    assert compiled.num_graphs == graphs, f"{compiled.num_graphs - graphs} recompiles"
    assert engine.runner.compiled is compiled


def test_a_model_that_cannot_compile_runs_eagerly_and_says_why(references, monkeypatch, caplog):
    from prefixserve.compiled import CompiledForward

    def broken(self, graph, example_inputs):
        raise NotImplementedError("no kernel for this layer")

    monkeypatch.setattr(CompiledForward, "_inductor", broken)
    model_dir, _, expected, _ = references
    with caplog.at_level(logging.WARNING, logger="prefixserve"):
        llm = LLM(
            str(model_dir), dtype="float32", block_size=4, num_kv_blocks=64, enforce_eager=False
        )
        outputs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=NEW))
    assert llm.engine.runner.compiled is None
    assert [o.token_ids for o in outputs] == expected[None]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "running it eagerly" in warnings[0] and "no kernel for this layer" in warnings[0]


def test_quantized_and_unsupported_models_are_not_compiled():
    from prefixserve.compiled import cannot_compile

    class Quantized(torch.nn.Module):
        is_quantized = True

    cpu = torch.device("cpu")
    assert "bitsandbytes" in (cannot_compile(Quantized(), cpu, torch.float32) or "")
    assert "float16" in (cannot_compile(torch.nn.Linear(2, 2), cpu, torch.float16) or "")
    assert cannot_compile(torch.nn.Linear(2, 2), cpu, torch.bfloat16) is None
    assert cannot_compile(torch.nn.Linear(2, 2), cpu, torch.float32) is None


def test_the_attention_op_refuses_to_run_outside_a_compiled_step():
    from prefixserve.compiled import attention_op

    q = torch.zeros(3, 4, 8)
    with pytest.raises(RuntimeError, match="only inside a compiled prefixserve forward"):
        attention_op(q, q[:, :2], q[:, :2], 0, 1.0)


def test_default_model_compiled_equals_eager_and_transformers(default_llm):
    """The embedded default model: compiled greedy tokens equal the eager engine's and
    transformers' own ``generate``, for a batch of chat prompts of different lengths."""
    from test_engine_exactness import CHAT_QUESTIONS

    prompts = [
        default_llm.apply_chat_template([{"role": "user", "content": q}])
        for q in CHAT_QUESTIONS[:5]
    ]
    model = AutoModelForCausalLM.from_pretrained(default_llm.engine.model_path, dtype=torch.float32)
    expected = hf_greedy(model, prompts, max_new_tokens=24)
    compiled = LLM(dtype="float32", enforce_eager=False)
    assert compiled.engine.runner.compiled is not None
    params = SamplingParams(max_new_tokens=24)
    assert [o.token_ids for o in compiled.generate(prompts, params)] == expected
    assert [o.token_ids for o in default_llm.generate(prompts, params)] == expected
