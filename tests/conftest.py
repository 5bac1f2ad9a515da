"""Shared fixtures: tiny random-weight models of each tested architecture, and the default model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paged attention stores keys and values in fixed-size blocks.",
    "Prefix tuning learns a key and value prefix for every layer.",
    "Continuous batching lets new requests join between decode steps.",
    "Numbers like 12, 144 and 3.14 appear in text too.",
]

ARCHITECTURES = {
    # name: (config class, extra kwargs); GQA in llama, qwen2 and qwen3, none in mistral.
    "llama": (LlamaConfig, {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "mistral": (
        MistralConfig,
        {"num_attention_heads": 4, "num_key_value_heads": 4, "sliding_window": None},
    ),
    "qwen2": (Qwen2Config, {"num_attention_heads": 6, "num_key_value_heads": 2}),
    "qwen3": (Qwen3Config, {"num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 24}),
    # For bitsandbytes: on CPUs with AVX512-BF16 its 4-bit kernel repacks every linear weight in
    # blocks of 32 output rows x 64 input columns, so all sides here are multiples of 64.
    "llama-quantizable": (
        LlamaConfig,
        {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_multiple": 64,
        },
    ),
}
SIZES = {"hidden_size": 96, "intermediate_size": 192}
"""Sizes of the tiny models unless their architecture entry says otherwise."""


def tiny_config(arch: str, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """The config of the tiny ``arch`` model for ``tokenizer`` (vocabulary rounded up to the
    entry's ``vocab_multiple`` when it has one)."""
    config_cls, extra = ARCHITECTURES[arch]
    kwargs = {**SIZES, **extra}
    multiple = kwargs.pop("vocab_multiple", 1)
    return config_cls(
        vocab_size=-(-len(tokenizer) // multiple) * multiple,
        num_hidden_layers=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=not arch.startswith("llama"),
        **kwargs,
    )


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level BPE tokenizer trained on a few sentences (no network)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
    )
    path = tmp_path_factory.mktemp("tiny-tokenizer")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path):
    """Factory: ``tiny_model_dir(arch)`` -> a saved random-weight model with the tiny tokenizer."""
    cache: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch in cache:
            return cache[arch]
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer_dir)
        config = tiny_config(arch, tokenizer)
        torch.manual_seed(1234)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # larger weights give peaked, varied next-token distributions
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.08)
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        cache[arch] = path
        return path

    return make


@pytest.fixture(scope="session")
def default_llm():
    """The engine on the embedded default model in fp32 (shared by the tests that need it)."""
    from prefixserve import LLM

    return LLM(dtype="float32")


@pytest.fixture(scope="session")
def peft_adapter_dir(tmp_path_factory: pytest.TempPathFactory):
    """Factory: ``peft_adapter_dir(model_dir, kind, num_virtual_tokens, seed)`` -> a saved PEFT
    adapter with random (non-trivial) weights for the model at ``model_dir``."""
    import peft

    from peft_reference import peft_config

    cache: dict[tuple, Path] = {}

    def make(model_dir: Path, kind: str, num_virtual_tokens: int, seed: int = 0) -> Path:
        key = (str(model_dir), kind, num_virtual_tokens, seed)
        if key in cache:
            return cache[key]
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        torch.manual_seed(seed)
        model = peft.get_peft_model(base, peft_config(kind, num_virtual_tokens))
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:  # only the adapter's own parameters
                    param.normal_(0.0, 0.5 if "prefix" in kind or kind == "cartridge" else 0.1)
        path = tmp_path_factory.mktemp(f"adapter-{kind}-{num_virtual_tokens}")
        model.save_pretrained(path)
        cache[key] = path
        return path

    return make
