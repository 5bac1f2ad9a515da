"""Loading the base model and tokenizer with transformers (optionally bitsandbytes-quantized)."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .attention import register_attention
from .config import ModelConfig, auto_dtype
from .extras import require
from .kernels.progress import say

logger = logging.getLogger(__name__)


def resolve_model_path(model: str | None) -> str:
    """The embedded default model's directory for ``None``, else ``model`` unchanged."""
    if model is None:
        from .default_model import default_model_dir

        return str(default_model_dir())
    return model


def _quantization_config(config: ModelConfig) -> object | None:
    if config.quantization == "none":
        return None
    require("quant", f"quantization={config.quantization!r}")
    from transformers import BitsAndBytesConfig

    if config.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    quant_type = "fp4" if config.quantization == "fp4" else "nf4"
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_compute_dtype=config.torch_dtype,
    )


def load_model(config: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Load ``(model, tokenizer, path)`` with our attention implementation installed."""
    path = resolve_model_path(config.model)
    if config.model is not None and not Path(path).exists():
        logger.info("model %r is not a local directory; asking transformers to resolve it", path)
    device = config.torch_device
    hf_config = AutoConfig.from_pretrained(path)
    if getattr(hf_config, "model_type", None) is None or not hf_config.architectures:
        raise ValueError(f"{path!r} is not a causal language model transformers can load")
    quantization = _quantization_config(config)
    if config.dtype == "auto":
        dtype, why = auto_dtype(str(device), config.quantization)
        say(f"dtype auto: {str(dtype).removeprefix('torch.')} ({why})")
    kwargs: dict[str, object] = {
        "dtype": config.torch_dtype,
        "attn_implementation": register_attention(),
    }
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = str(device)
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantization is None:
        model.to(device)  # type: ignore[arg-type]
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer, path
