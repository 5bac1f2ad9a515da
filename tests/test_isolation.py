"""Tenant isolation in the engine: nothing one adapter or request leaves in the KV pool reaches
another request's output, and adapters whose values would overflow attention are refused."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from prefixserve import LLM, SamplingParams
from prefixserve.adapters import AdapterError
from prefixserve.client import Client
from prefixserve.server import BackgroundServer

from hf_reference import hf_greedy
from peft_reference import peft_greedy
from test_server import KEYS, server_config

PROMPTS = [[5, 9, 33, 7], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [100, 101], [40] * 23]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir("llama")


@pytest.mark.parametrize("poison", [float("nan"), 3e38])
def test_stale_pool_contents_never_reach_a_request(model_dir, peft_adapter_dir, poison):
    """Freed blocks keep whatever their last owner wrote. Fill the whole pool with NaN (or huge
    keys, as a hostile prefix-tuning adapter would leave) before a mixed batch of requests of
    different lengths, with and without an adapter: outputs still equal transformers' and
    PEFT's, request by request."""
    adapter_dir = peft_adapter_dir(model_dir, "prefix_tuning", 9)
    llm = LLM(str(model_dir), dtype="float32", block_size=4, num_kv_blocks=64)
    llm.load_adapter("tenant-a", adapter_dir)
    llm.engine.runner.kv_cache.k.fill_(poison)
    llm.engine.runner.kv_cache.v.fill_(poison)
    # Another owner holds the first blocks (block 0 included, where padding of a careless
    # kernel points) with that content, as a hostile adapter's prefix would.
    foreign = llm.engine.allocator.allocate(3)
    assert foreign is not None and 0 in foreign
    params = SamplingParams(max_new_tokens=6)
    adapters = [None, "tenant-a"] * len(PROMPTS)
    outs = llm.generate(PROMPTS * 2, params, adapter=adapters, use_tqdm=False)
    plain = hf_greedy(AutoModelForCausalLM.from_pretrained(model_dir), PROMPTS, 6)
    tuned = peft_greedy(model_dir, adapter_dir, PROMPTS, 6)
    for i, out in enumerate(outs):
        want = (plain if adapters[i] is None else tuned)[i % len(PROMPTS)]
        assert out.token_ids == want[: len(out.token_ids)] and out.token_ids, (i, adapters[i])


def _scaled_copy(src: Path, dst: Path, factor: float) -> Path:
    dst.mkdir()
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    weights = load_file(src / "adapter_model.safetensors")
    weights["prompt_embeddings"] = (weights["prompt_embeddings"].double() * factor).float()
    save_file(weights, dst / "adapter_model.safetensors")
    return dst


@pytest.mark.parametrize("kind", ["prefix_tuning", "prompt_tuning"])
def test_adapters_beyond_what_attention_can_hold_are_refused(
    model_dir, peft_adapter_dir, tmp_path, kind
):
    """Finite but huge values (3e38 passes a NaN/inf check) are refused at load, naming the
    limit; values just under the limit load."""
    llm = LLM(str(model_dir), dtype="float32", block_size=4, num_kv_blocks=64)
    src = peft_adapter_dir(model_dir, kind, 5)
    peak = float(load_file(src / "adapter_model.safetensors")["prompt_embeddings"].abs().max())
    shape = llm.engine.runner.shape
    width = shape.head_dim if kind == "prefix_tuning" else shape.hidden_size
    limit = (torch.finfo(torch.float32).max / width) ** 0.5
    with pytest.raises(AdapterError, match="without overflow"):
        llm.load_adapter("huge", _scaled_copy(src, tmp_path / "huge", 3e38 / peak))
    with pytest.raises(AdapterError, match="without overflow"):
        llm.load_adapter("over", _scaled_copy(src, tmp_path / "over", 1.01 * limit / peak))
    assert "huge" not in {a.name for a in llm.list_adapters()}
    llm.load_adapter("under", _scaled_copy(src, tmp_path / "under", 0.5 * limit / peak))
    config = json.loads((src / "adapter_config.json").read_text())
    assert config["peft_type"] == kind.upper()


def test_the_crafted_adapter_is_refused_over_the_server(
    model_dir, peft_adapter_dir, tmp_path, tiny_model_dir
):
    """The hostile tenant's upload (prefix-tuning keys of 3e38: finite, so a NaN/inf check lets
    them through) answers INVALID_ARGUMENT naming the limit, and leaves nothing behind."""
    src = peft_adapter_dir(model_dir, "prefix_tuning", 5)
    peak = float(load_file(src / "adapter_model.safetensors")["prompt_embeddings"].abs().max())
    crafted = _scaled_copy(src, tmp_path / "crafted", 3e38 / peak)
    config = server_config(model_dir, tmp_path / "registry")
    with BackgroundServer(config) as running, Client(running.address, KEYS["acme"]) as acme:
        with pytest.raises(grpc.RpcError) as refused:
            acme.load_adapter("evil", upload=crafted)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "without overflow" in (refused.value.details() or "")
        assert acme.list_adapters() == []
        assert acme.generate([5, 6], max_new_tokens=2).token_ids  # and it keeps serving
