"""One mixed-adapter batch shared by the backend tests: three PEFT kinds and no adapter over the
same prompts, the references from PEFT and transformers themselves, and the check that an
engine's greedy outputs equal them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from prefixserve import SamplingParams

from hf_reference import hf_greedy
from peft_reference import peft_greedy

PROMPTS = [[5, 9, 33, 7, 81], [11, 12], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
LENGTHS = {"prompt_tuning": 5, "prefix_tuning": 7, "cartridge": 17}
"""Adapter kind -> virtual tokens (shorter and longer than a block of 4, odd)."""
NEW = 6

Expected = dict[str | None, list[list[int]]]


def adapters_and_references(
    model_dir: Path, peft_adapter_dir: Any
) -> tuple[dict[str, Path], Expected]:
    """A PEFT adapter of each kind in :data:`LENGTHS` for the model at ``model_dir`` (made by the
    ``peft_adapter_dir`` fixture), and the greedy outputs of PEFT with each one and of
    transformers without any (key None)."""
    paths = {kind: peft_adapter_dir(model_dir, kind, n) for kind, n in LENGTHS.items()}
    expected: Expected = {k: peft_greedy(model_dir, p, PROMPTS, NEW) for k, p in paths.items()}
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    expected[None] = hf_greedy(base, PROMPTS, NEW)
    return paths, expected


def assert_mixed_batch_equals(llm: Any, paths: dict[str, Path], expected: Expected) -> None:
    """Load ``paths`` into ``llm``, generate every prompt with every adapter and with none in
    one batch, and compare each output with its reference; no request's block may be left."""
    for name, path in paths.items():
        llm.load_adapter(name, path)
    batch = [(name, i) for name in [*paths, None] for i in range(len(PROMPTS))]
    outputs = llm.generate(
        [PROMPTS[i] for _, i in batch],
        SamplingParams(max_new_tokens=NEW),
        adapter=[name for name, _ in batch],
    )
    for (name, i), out in zip(batch, outputs):
        assert out.token_ids == expected[name][i], (name, i)
    engine = llm.engine
    assert engine.allocator.num_used == engine.prefixes.resident_blocks + len(
        engine.block_cache.idle
    )
