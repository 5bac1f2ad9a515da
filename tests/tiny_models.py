"""Configs of the tiny random-weight test models (a module of its own: test modules import it
directly, which they cannot do with a conftest that another conftest shadows)."""

from __future__ import annotations

from transformers import (
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
