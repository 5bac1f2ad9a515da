"""The engine on the Triton backend (under the Triton interpreter on CPU) equals transformers and
PEFT, with adapters of several kinds mixed in one batch, chunked prefill and decode steps."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from mixed_batch import adapters_and_references, assert_mixed_batch_equals

from prefixserve import LLM
from prefixserve.attention import AttentionShape
from prefixserve.backends import select_backend
from prefixserve.triton_backend import TritonBackend

pytest.importorskip("triton")


@pytest.mark.parametrize(
    ("arch", "decode_mode"), [("llama", "auto"), ("llama", "grouped"), ("qwen3", "auto")]
)
def test_triton_backend_mixed_adapters_equal_references(
    arch, decode_mode, tiny_model_dir, peft_adapter_dir
):
    model_dir = tiny_model_dir(arch)
    paths, expected = adapters_and_references(model_dir, peft_adapter_dir)

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
    assert_mixed_batch_equals(llm, paths, expected)


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
