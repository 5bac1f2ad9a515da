"""The engine on the Triton backend (under the Triton interpreter on CPU) equals transformers and
PEFT, with adapters of several kinds mixed in one batch, chunked prefill and decode steps."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from prefixserve import LLM, SamplingParams
from prefixserve.attention import AttentionShape, select_backend
from prefixserve.triton_backend import TritonBackend

from hf_reference import hf_greedy
from peft_reference import peft_greedy

pytest.importorskip("triton")

PROMPTS = [[5, 9, 33, 7, 81], [11, 12], [40, 41, 42, 43, 44, 45, 46, 47, 48]]
LENGTHS = {"prompt_tuning": 5, "prefix_tuning": 7, "cartridge": 17}
NEW = 6


@pytest.mark.parametrize(
    ("arch", "decode_mode"), [("llama", "auto"), ("llama", "grouped"), ("qwen3", "auto")]
)
def test_triton_backend_mixed_adapters_equal_references(
    arch, decode_mode, tiny_model_dir, peft_adapter_dir
):
    model_dir = tiny_model_dir(arch)
    paths = {k: peft_adapter_dir(model_dir, k, n) for k, n in LENGTHS.items()}
    expected = {k: peft_greedy(model_dir, p, PROMPTS, NEW) for k, p in paths.items()}
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    expected[None] = hf_greedy(base, PROMPTS, NEW)

    llm = LLM(
        str(model_dir),
        dtype="float32",
        block_size=4,
        num_kv_blocks=128,
        max_num_batched_tokens=16,
        attention_backend="triton",
    )
    assert llm.engine.runner.backend.name == "triton"
    runner = llm.engine.runner
    runner.backend = TritonBackend(runner.backend.shape, runner.device, decode_mode)
    for name, path in paths.items():
        llm.load_adapter(name, path)
    batch = [(name, i) for name in [*LENGTHS, None] for i in range(len(PROMPTS))]
    outputs = llm.generate(
        [PROMPTS[i] for _, i in batch],
        SamplingParams(max_new_tokens=NEW),
        adapter=[name for name, _ in batch],
    )
    for (name, i), out in zip(batch, outputs):
        assert out.token_ids == expected[name][i], (name, i)
    assert llm.engine.allocator.num_used == llm.engine.prefixes.resident_blocks


def test_library_never_switches_the_interpreter_on(monkeypatch):
    """Only the user (or this suite's conftest) turns the Triton interpreter on: importing the
    backend leaves the environment alone, and asking for Triton on a CPU without it says how."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import os, prefixserve.triton_backend, prefixserve.kernels.triton_attention; "
        "print(os.environ.get('TRITON_INTERPRET'))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        select_backend("triton", torch.device("cpu"), AttentionShape(4, 2, 8))
