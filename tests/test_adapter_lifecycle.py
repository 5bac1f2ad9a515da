"""Adapter lifecycle: eviction and re-materialization, unloading while in use, invalid adapters."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from prefixserve import LLM, SamplingParams
from prefixserve.adapters import AdapterError

PROMPTS = [[5, 9, 33, 7], [11, 12, 13, 14, 15], [100, 101]]
KINDS = {"prompt_tuning": 6, "prefix_tuning": 9, "cartridge": 5, "p_tuning": 7}


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, peft_adapter_dir) -> tuple[Path, dict[str, Path]]:
    model_dir = tiny_model_dir("llama")
    return model_dir, {k: peft_adapter_dir(model_dir, k, n) for k, n in KINDS.items()}


def _llm(model_dir: Path, adapters: dict[str, Path], blocks: int) -> LLM:
    llm = LLM(str(model_dir), dtype="float32", block_size=4, num_kv_blocks=blocks)
    for name, path in adapters.items():
        llm.load_adapter(name, path)
    return llm


def _run_all(llm: LLM) -> list[list[int]]:
    params = SamplingParams(max_new_tokens=10)
    names = [n for n in KINDS for _ in PROMPTS]
    outputs = []
    for name in names:  # one adapter at a time, so a small pool must evict between them
        prompt = PROMPTS[len(outputs) % len(PROMPTS)]
        outputs.append(llm.generate([prompt], params, adapter=name)[0].token_ids)
    outputs += [o.token_ids for o in llm.generate(PROMPTS * 4, params, adapter=names)]
    return outputs


def test_eviction_and_rematerialization_keep_outputs(adapters):
    model_dir, paths = adapters
    roomy = _llm(model_dir, paths, blocks=256)
    expected = _run_all(roomy)
    assert roomy.engine.prefixes.stats.evictions == 0
    # 12 blocks: room for one prefix (at most 3 blocks) and a few requests, never all prefixes.
    tight = _llm(model_dir, paths, blocks=12)
    assert _run_all(tight) == expected
    stats = tight.engine.prefixes.stats
    assert stats.evictions > 0 and stats.materializations > len(KINDS)
    engine = tight.engine
    assert engine.allocator.num_used == engine.prefixes.resident_blocks + len(
        engine.block_cache.idle
    )
    for name in KINDS:
        assert tight.unload_adapter(name)
    assert engine.allocator.num_used == len(engine.block_cache.idle)


def test_unloading_in_use_waits_for_last_request(adapters):
    model_dir, paths = adapters
    llm = _llm(model_dir, {"prefix_tuning": paths["prefix_tuning"]}, blocks=64)
    engine = llm.engine
    rid = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=6), adapter="prefix_tuning")
    engine.step()
    assert engine.unload_adapter("prefix_tuning") is False
    assert llm.list_adapters()[0].unloading
    with pytest.raises(AdapterError, match="being unloaded"):
        engine.add_request(PROMPTS[1], SamplingParams(), adapter="prefix_tuning")
    while engine.has_unfinished_requests():
        engine.step()
    assert rid not in engine.requests and llm.list_adapters() == []
    assert engine.allocator.num_used == len(engine.block_cache.idle)
    with pytest.raises(AdapterError, match="not loaded"):
        engine.add_request(PROMPTS[1], SamplingParams(), adapter="prefix_tuning")


def _broken(tmp_path: Path, source: Path, edit) -> Path:
    target = tmp_path / "broken"
    shutil.copytree(source, target)
    edit(target)
    return target


def _edit_config(**changes):
    def edit(path: Path) -> None:
        config = json.loads((path / "adapter_config.json").read_text())
        config.update(changes)
        (path / "adapter_config.json").write_text(json.dumps(config))

    return edit


def _edit_tensor(fn):
    def edit(path: Path) -> None:
        tensors = load_file(path / "adapter_model.safetensors")
        save_file(
            {k: fn(v).contiguous() for k, v in tensors.items()}, path / "adapter_model.safetensors"
        )

    return edit


def _with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t[0, 0] = float("nan")
    return t


INVALID = {
    "lora": ("prompt_tuning", _edit_config(peft_type="LORA"), "peft_type 'LORA' is not supported"),
    "hidden": ("prompt_tuning", _edit_config(token_dim=128), "token_dim is 128 but the base model"),
    "layers": ("prefix_tuning", _edit_config(num_layers=5), "num_layers is 5 but the base model"),
    "kv_heads": (
        "prefix_tuning",
        _edit_config(num_attention_heads=4),
        "num_attention_heads is 4 but the base model needs 2",
    ),
    "shape": (
        "prefix_tuning",
        _edit_tensor(lambda t: t[:, :-8]),
        r"has shape \(9, 184\); the base model needs \[P, 192\]",
    ),
    "wide": (
        "prompt_tuning",
        _edit_tensor(lambda t: torch.cat([t, t], 1)),
        r"\[P, hidden size 96\]",
    ),
    "nan": ("cartridge", _edit_tensor(_with_nan), "NaN or infinite"),
    "too_long": (
        "prompt_tuning",
        _edit_tensor(lambda t: t.repeat(100, 1)),
        "600 virtual tokens leave no room",
    ),
    "no_config": (
        "prompt_tuning",
        lambda p: (p / "adapter_config.json").unlink(),
        "adapter_config.json is missing",
    ),
    "bad_json": (
        "prompt_tuning",
        lambda p: (p / "adapter_config.json").write_text("{oops"),
        "is not valid JSON",
    ),
    "no_weights": (
        "prompt_tuning",
        lambda p: (p / "adapter_model.safetensors").unlink(),
        "no adapter_model.safetensors",
    ),
    "corrupt": (
        "prompt_tuning",
        lambda p: (p / "adapter_model.safetensors").write_bytes(b"\x10garbage" * 5),
        "cannot read the weights",
    ),
    "wrong_key": (
        "prompt_tuning",
        lambda p: save_file({"w": torch.ones(2, 96)}, p / "adapter_model.safetensors"),
        "no 'prompt_embeddings' tensor",
    ),
}


@pytest.fixture(scope="module")
def serving_llm(adapters) -> LLM:
    model_dir, paths = adapters
    return _llm(model_dir, {"good": paths["prompt_tuning"]}, blocks=64)


@pytest.mark.parametrize("case", list(INVALID))
def test_invalid_adapter_fails_alone(case, adapters, serving_llm, tmp_path):
    _, paths = adapters
    kind, edit, message = INVALID[case]
    path = _broken(tmp_path, paths[kind], edit)
    before = serving_llm.generate([PROMPTS[0]], SamplingParams(max_new_tokens=4), adapter="good")
    with pytest.raises(AdapterError, match=message) as info:
        serving_llm.load_adapter("bad", path)
    assert "'bad'" in str(info.value)
    assert [a.name for a in serving_llm.list_adapters()] == ["good"]
    after = serving_llm.generate([PROMPTS[0]], SamplingParams(max_new_tokens=4), adapter="good")
    assert after[0].token_ids == before[0].token_ids
    engine = serving_llm.engine
    assert engine.allocator.num_used == engine.prefixes.resident_blocks + len(
        engine.block_cache.idle
    )


def test_other_adapter_errors(serving_llm, adapters, tmp_path):
    _, paths = adapters
    with pytest.raises(AdapterError, match="already loaded"):
        serving_llm.load_adapter("good", paths["cartridge"])
    with pytest.raises(AdapterError, match="is not a directory"):
        serving_llm.load_adapter("missing", tmp_path / "nope")
    with pytest.raises(AdapterError, match="text prefix is empty"):
        serving_llm.load_adapter("empty", text="")
    with pytest.raises(ValueError, match="exactly one of path= or text="):
        serving_llm.load_adapter("both", paths["cartridge"], text="hi")
    with pytest.raises(AdapterError, match="'ghost' is not loaded"):
        serving_llm.generate([PROMPTS[0]], SamplingParams(), adapter="ghost")
    with pytest.raises(ValueError, match=r"adapter prefix \(6 tokens\) \+ prompt"):
        serving_llm.generate([[5] * 500], SamplingParams(max_new_tokens=8), adapter="good")
    assert not serving_llm.engine.requests
