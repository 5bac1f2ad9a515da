"""Engine configuration: one dataclass per concern, validated with errors that name the value."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
QUANTIZATIONS = ("none", "8bit", "4bit", "nf4", "fp4")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a user-facing dtype name (or a torch dtype) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(
            f"dtype must be one of 'auto', {', '.join(repr(k) for k in DTYPES)}, got {dtype!r}"
        ) from None


@dataclass(slots=True)
class ModelConfig:
    model: str | None = None
    """A local HF model directory or a name transformers can load; None = the embedded default."""
    dtype: str | torch.dtype = "auto"
    """Weights and KV dtype: 'auto' (bf16 on CUDA, fp32 on CPU), float32, float16, bfloat16."""
    quantization: str = "none"
    """bitsandbytes weight quantization: none, 8bit, 4bit (= nf4), nf4 or fp4."""
    device: str | None = None
    """'cuda', 'cpu' or None (CUDA when available)."""
    max_model_len: int | None = None
    """Longest sequence (prefix + prompt + output); None = the model's own limit."""

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}"
            )
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

    @property
    def torch_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass(slots=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV block."""
    num_kv_blocks: int | None = None
    """Blocks in the pool; None = sized from memory with ``kv_memory_fraction``."""
    kv_memory_fraction: float = 0.9
    """CUDA: share of free device memory after loading weights given to the KV pool."""
    cpu_kv_memory_gib: float = 1.0
    """CPU: memory given to the KV pool when ``num_kv_blocks`` is not set."""

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")
        if self.cpu_kv_memory_gib <= 0:
            raise ValueError(f"cpu_kv_memory_gib must be > 0, got {self.cpu_kv_memory_gib}")


@dataclass(slots=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    """Token budget of one step (decode tokens + prefill chunks)."""
    max_num_seqs: int = 64
    """Most requests running at once."""
    long_prefill_token_threshold: int | None = 512
    """Largest prefill chunk of one request (or adapter prefix) per step, so that a long prompt
    does not hold up the requests around it; None = as much as the budget allows."""

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold < 1:
            raise ValueError(
                "long_prefill_token_threshold must be >= 1, "
                f"got {self.long_prefill_token_threshold}"
            )


@dataclass(slots=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    attention_backend: str | None = None
    """'torch' or 'triton'; None = $PREFIXSERVE_ATTENTION, else triton on CUDA, torch on CPU."""

    def __post_init__(self) -> None:
        if self.attention_backend not in (None, "torch", "triton"):
            raise ValueError(
                f"attention_backend must be 'torch' or 'triton', got {self.attention_backend!r}"
            )
