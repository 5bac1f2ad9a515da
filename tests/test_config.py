"""One source of configuration: the config dataclasses' fields are LLM's options, the server's
flags (with their docstrings and defaults), and nothing is written twice."""

from __future__ import annotations

import dataclasses

import pytest

from prefixserve.cli import build_parser
from prefixserve.config import SECTIONS, EngineConfig, engine_options


def test_options_route_to_their_sections():
    config = EngineConfig.from_kwargs(
        dtype="float32", block_size=32, max_num_seqs=3, attention_backend="torch"
    )
    assert config.model.dtype == "float32"
    assert config.cache.block_size == 32
    assert config.scheduler.max_num_seqs == 3
    assert config.attention_backend == "torch"
    assert config.scheduler.max_num_batched_tokens == 2048  # untouched defaults stay


def test_unknown_options_are_named():
    with pytest.raises(TypeError, match=r"'blok_size'.*block_size"):
        EngineConfig.from_kwargs(blok_size=32)


def test_every_option_has_a_docstring_and_its_dataclass_default():
    names = [o.name for o in engine_options()]
    fields = [f.name for s in SECTIONS.values() for f in dataclasses.fields(s)]
    assert names == [
        *fields,
        "attention_backend",
        "enforce_eager",
        "native_cpu_linear",
        "max_cuda_graph_batch",
    ]
    for option in engine_options():
        assert option.help, f"{option.name} has no docstring"
    assert {o.name: o.default for o in engine_options()}["long_prefill_token_threshold"] == 128


def test_serve_flags_are_generated_from_the_options():
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    text = serve.format_help()
    for option in engine_options():
        assert "--" + option.name.replace("_", "-") in text
        assert f"(default: {option.default})" in " ".join(text.split())
    args = serve.parse_args(
        ["--block-size", "32", "--long-prefill-token-threshold", "none", "--kv-memory-gib", "2"]
    )
    config = EngineConfig.from_kwargs(**{o.name: getattr(args, o.name) for o in engine_options()})
    assert config.cache.block_size == 32 and config.cache.cpu_kv_memory_gib == 2.0
    assert config.scheduler.long_prefill_token_threshold is None
    assert config == EngineConfig.from_kwargs(
        block_size=32, long_prefill_token_threshold=None, cpu_kv_memory_gib=2.0
    )


def test_enforce_eager_flag_and_environment(monkeypatch):
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    options = {o.name: o for o in engine_options()}
    assert options["enforce_eager"].default is None and options["enforce_eager"].help
    for argv, want in (([], None), (["--enforce-eager"], True), (["--no-enforce-eager"], False)):
        args = serve.parse_args(argv)
        assert args.enforce_eager is want
        config = EngineConfig.from_kwargs(**{o: getattr(args, o) for o in options})
        assert config.enforce_eager is want
    monkeypatch.setenv("PREFIXSERVE_ENFORCE_EAGER", "0")
    assert not EngineConfig().eager and EngineConfig.from_kwargs(enforce_eager=True).eager
    monkeypatch.setenv("PREFIXSERVE_ENFORCE_EAGER", "1")
    assert EngineConfig().eager and not EngineConfig(enforce_eager=False).eager
    monkeypatch.setenv("PREFIXSERVE_ENFORCE_EAGER", "yes")
    with pytest.raises(ValueError, match="PREFIXSERVE_ENFORCE_EAGER must be 0 or 1, got 'yes'"):
        _ = EngineConfig().eager
