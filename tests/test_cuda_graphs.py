"""Decode steps served from CUDA graphs equal transformers and PEFT.

On a CPU the graphs' bodies run without being captured (``capture=False``), under the Triton
interpreter: the static buffers, the padding to graph sizes, the persistent attention plans and
the runner's choice of which steps replay are all exercised; only the capture itself needs a GPU
(the ``gpu``-marked tests, where the engine captures its graphs at start by default)."""

from __future__ import annotations

import pytest
import torch
from mixed_batch import adapters_and_references, assert_mixed_batch_equals

from prefixserve import LLM
from prefixserve.cuda_graphs import capture_sizes
from prefixserve.triton_backend import TritonBackend

pytest.importorskip("triton")

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_capture_sizes_cover_every_batch_with_little_padding():
    assert capture_sizes(1) == [1]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(64) == [1, 2, 4, *range(8, 65, 8)]
    sizes = capture_sizes(100)
    assert sizes[-1] == 100
    for batch in range(1, 101):
        padded = min(s for s in sizes if s >= batch)
        assert padded - batch < 8


@pytest.mark.parametrize("decode_mode", ["plain", "grouped"])
def test_graph_steps_equal_references(decode_mode, tiny_model_dir, peft_adapter_dir):
    model_dir = tiny_model_dir("llama")
    paths, expected = adapters_and_references(model_dir, peft_adapter_dir)
    llm = LLM(
        str(model_dir),
        dtype="float32",
        block_size=4,
        num_kv_blocks=128,
        max_num_batched_tokens=16,
        attention_backend="triton",
    )
    runner = llm.engine.runner
    runner.backend = TritonBackend(runner.backend.shape, runner.device, decode_mode)
    # Sizes 1, 2, 4, 8 for batches of up to 12: 9-12 run without a graph.
    runner.use_decode_graphs([1, 2, 4, 8], llm.engine.max_model_len, capture=False)
    assert runner.graphs is not None
    assert_mixed_batch_equals(llm, paths, expected)
    assert runner.graphs.replays > 0


def test_graphs_need_the_triton_backend(tiny_model_dir, caplog):
    llm = LLM(
        str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=32, attention_backend="torch"
    )
    llm.engine.runner.use_decode_graphs([1, 2], 64, capture=False)
    assert llm.engine.runner.graphs is None
    assert "need the triton attention backend" in caplog.text


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_cuda_engine_captures_graphs_by_default(enforce_eager, tiny_model_dir, peft_adapter_dir):
    model_dir = tiny_model_dir("llama")
    paths, expected = adapters_and_references(model_dir, peft_adapter_dir)
    llm = LLM(
        str(model_dir),
        dtype="float32",
        device="cuda",
        block_size=4,
        num_kv_blocks=256,
        max_num_batched_tokens=16,
        enforce_eager=enforce_eager,
    )
    runner = llm.engine.runner
    assert (runner.graphs is None) == enforce_eager
    assert_mixed_batch_equals(llm, paths, expected)
    if not enforce_eager:
        assert runner.graphs is not None and runner.graphs.replays > 0
        assert all(g.graph is not None for g in runner.graphs._graphs.values())
