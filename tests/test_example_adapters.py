"""The committed example adapters on the embedded default model equal PEFT's own ``generate``,
alone and mixed in one batch with requests that use no adapter."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefixserve import LLM, SamplingParams

from peft_reference import peft_greedy

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "adapters"
NAMES = sorted(p.name for p in EXAMPLES.iterdir() if (p / "adapter_config.json").is_file())
QUESTIONS = [
    "What is the capital of France?",
    "Name a fruit that is yellow.",
    "How many legs does a spider have?",
]
NEW = 24


def test_examples_are_committed():
    assert len(NAMES) >= 3, f"expected the example adapters in {EXAMPLES}, found {NAMES}"


@pytest.fixture(scope="module")
def references(default_llm: LLM) -> tuple[list[list[int]], dict[str, list[list[int]]]]:
    prompts = [default_llm.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    model_dir = default_llm.engine.model_path
    return prompts, {name: peft_greedy(model_dir, EXAMPLES / name, prompts, NEW) for name in NAMES}


def test_example_adapters_mixed_equal_peft(default_llm, references):
    prompts, expected = references
    for name in NAMES:
        if name not in {a.name for a in default_llm.list_adapters()}:
            default_llm.load_adapter(name, EXAMPLES / name)
    batch = [(name, i) for i in range(len(prompts)) for name in NAMES]
    outputs = default_llm.generate(
        [prompts[i] for _, i in batch],
        SamplingParams(max_new_tokens=NEW),
        adapter=[name for name, _ in batch],
    )
    for (name, i), out in zip(batch, outputs):
        assert out.token_ids == expected[name][i], (name, QUESTIONS[i], out.text)
    styled = {name: [o.text for (n, _), o in zip(batch, outputs) if n == name] for name in NAMES}
    plain = default_llm.generate(prompts, SamplingParams(max_new_tokens=NEW))
    for name, texts in styled.items():  # each adapter changes the answers
        assert texts != [o.text for o in plain], name
