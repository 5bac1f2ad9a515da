"""The engine on the native CPU attention backend: it is the default on CPU, it equals
transformers and PEFT with adapters mixed in one batch (also with every prefix grouped), and
where the op cannot be built the engine falls back to the PyTorch reference with one warning."""

from __future__ import annotations

import re
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch
from mixed_batch import adapters_and_references, assert_mixed_batch_equals

from prefixserve import LLM, cpu_backend
from prefixserve.attention import AttentionShape, TorchBackend
from prefixserve.backends import select_backend
from prefixserve.config import EngineConfig, cache_root
from prefixserve.cpu_backend import NativeCPUBackend
from prefixserve.kernels import cpu_build
from prefixserve.kernels.cpu_build import NativeBuildError

SHAPE = AttentionShape(num_q_heads=4, num_kv_heads=2, head_dim=8)


def test_default_cpu_backend_is_the_native_op(monkeypatch):
    monkeypatch.delenv("PREFIXSERVE_ATTENTION", raising=False)
    cpu_build.load_cpu_ops(cache_root())  # this machine builds it: a failure here is a real failure
    backend = select_backend(None, torch.device("cpu"), SHAPE)
    assert isinstance(backend, NativeCPUBackend) and backend.name == "cpu"
    assert select_backend("torch", torch.device("cpu"), SHAPE).name == "torch"
    with pytest.raises(ValueError, match="runs on the CPU"):
        select_backend("cpu", torch.device("cuda"), SHAPE)
    assert EngineConfig(attention_backend="cpu").attention_backend == "cpu"
    with pytest.raises(ValueError, match="'cpu', 'torch', 'triton'"):
        EngineConfig(attention_backend="native")


@pytest.mark.parametrize("prefix_mode", ["auto", "grouped"])
def test_cpu_backend_mixed_adapters_equal_references(prefix_mode, tiny_model_dir, peft_adapter_dir):
    model_dir = tiny_model_dir("llama")
    paths, expected = adapters_and_references(model_dir, peft_adapter_dir)

    llm = LLM(
        str(model_dir), dtype="float32", block_size=4, num_kv_blocks=128, max_num_batched_tokens=16
    )
    assert llm.engine.runner.backend.name == "cpu"
    llm.engine.runner.backend = NativeCPUBackend(llm.engine.runner.backend.shape, prefix_mode)
    assert_mixed_batch_equals(llm, paths, expected)


def test_unbuildable_op_falls_back_with_one_warning(monkeypatch):
    def no_compiler(*args: object, **kwargs: object) -> None:
        raise NativeBuildError("no C++ compiler ('c++' is not on PATH; set $CXX)")

    monkeypatch.delenv("PREFIXSERVE_ATTENTION", raising=False)
    monkeypatch.setattr(cpu_backend.NativeCPUBackend, "__init__", no_compiler)
    cpu_backend._warn_fallback.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        backends = [select_backend(None, torch.device("cpu"), SHAPE) for _ in range(3)]
    assert all(isinstance(b, TorchBackend) for b in backends)
    assert len(caught) == 1
    assert "no C++ compiler" in str(caught[0].message)
    assert "half the throughput with a 512-token system prompt" in str(caught[0].message)
    cpu_backend._warn_fallback.cache_clear()


@pytest.mark.parametrize(
    ("compiler", "message"), [("no-such-c++", "no C++ compiler"), ("false", "failed")]
)
def test_build_failure_says_why(compiler, message, monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", compiler)
    with pytest.raises(NativeBuildError, match=re.escape(message)):
        cpu_build._build_and_load(tmp_path)
    assert not list((tmp_path / "ops").glob("cpu-*/*.so")), "a failed build left a library"


def test_concurrent_builds_build_once(monkeypatch, tmp_path):
    """Two builders at once: one builds under the lock, the other waits and loads its result."""
    builds: list[Path] = []

    def fake_build(isas: tuple[str, ...], target: Path) -> None:
        builds.append(target)
        time.sleep(0.3)
        target.mkdir()
        (target / cpu_build.LIBRARY_NAME).write_bytes(b"")

    monkeypatch.setattr(cpu_build, "_build", fake_build)
    monkeypatch.setattr(torch.ops, "load_library", lambda path: None)
    loaded: list[Path] = []
    threads = [
        threading.Thread(target=lambda: loaded.append(cpu_build._build_and_load(tmp_path)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and len(loaded) == 2 and loaded[0] == loaded[1]
