"""bitsandbytes 8-bit and 4-bit models (CPU): the engine's greedy outputs equal transformers'
``generate`` on the same quantized model.

The tiny model is ``llama-quantizable``: on CPUs with AVX512-BF16, bitsandbytes' 4-bit kernel
repacks weights in blocks of 32 output rows x 64 input columns and fails on other shapes, so a
model that passes on one CPU can fail on another; its shapes are checked without a model below.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedTokenizerFast

from prefixserve import LLM, SamplingParams

from hf_reference import hf_greedy
from tiny_models import tiny_config

pytest.importorskip("bitsandbytes")

ARCH = "llama-quantizable"
PROMPTS = [[5, 9, 33, 7, 81], [11, 12], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]
CONFIGS = {
    "8bit": BitsAndBytesConfig(load_in_8bit=True),
    "nf4": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    ),
    "fp4": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32
    ),
}


def test_quantized_test_model_fits_every_cpu_kernel(tiny_tokenizer_dir):
    """Every linear weight [out, in] has both sides multiples of 64 (the 4-bit CPU kernel needs
    out % 32 and in % 64), whichever CPU runs this test."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config(ARCH, tokenizer))
    shapes = {
        name: tuple(module.weight.shape)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    assert "lm_head" in shapes and "model.layers.0.self_attn.k_proj" in shapes
    assert {n: s for n, s in shapes.items() if s[0] % 64 or s[1] % 64} == {}


@pytest.mark.parametrize("quantization", list(CONFIGS))
def test_quantized_greedy_equals_transformers(quantization, tiny_model_dir, caplog):
    path = str(tiny_model_dir(ARCH))
    reference = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=CONFIGS[quantization], device_map="cpu"
    )
    expected = hf_greedy(reference, PROMPTS, max_new_tokens=16)
    llm = LLM(
        path,
        dtype="float32",
        quantization=quantization,
        device="cpu",
        block_size=4,
        num_kv_blocks=64,
        enforce_eager=False,  # asked for, but bitsandbytes layers run eagerly, saying why
    )
    assert llm.engine.runner.compiled is None
    assert "bitsandbytes-quantized layers" in caplog.text
    linear = type(llm.engine.runner.model.model.layers[0].mlp.up_proj).__name__
    assert linear == ("Linear8bitLt" if quantization == "8bit" else "Linear4bit")
    outputs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=16))
    assert [o.token_ids for o in outputs] == expected
