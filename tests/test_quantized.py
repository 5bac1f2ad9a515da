"""bitsandbytes 8-bit and 4-bit models (CPU): the engine's greedy outputs equal transformers'
``generate`` on the same quantized model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from prefixserve import LLM, SamplingParams

from hf_reference import hf_greedy

pytest.importorskip("bitsandbytes")

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


@pytest.mark.parametrize("quantization", list(CONFIGS))
def test_quantized_greedy_equals_transformers(quantization, tiny_model_dir):
    path = str(tiny_model_dir("llama"))
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
    )
    linear = type(llm.engine.runner.model.model.layers[0].mlp.up_proj).__name__
    assert linear == ("Linear8bitLt" if quantization == "8bit" else "Linear4bit")
    outputs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=16))
    assert [o.token_ids for o in outputs] == expected
