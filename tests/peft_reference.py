"""Reference outputs from PEFT itself: one adapter at a time, one prompt at a time."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


@torch.inference_mode()
def peft_greedy(
    model_dir: str | Path, adapter_dir: str | Path, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """New token ids of PEFT's ``generate`` (greedy) with the adapter at ``adapter_dir``."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    results = []
    for ids in prompts:
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            top_p=None,
            top_k=None,
            temperature=None,
        )
        results.append(out[0, len(ids) :].tolist())  # PEFT returns the prompt ids first
    return results


PEFT_KINDS = ("prompt_tuning", "p_tuning", "prefix_tuning", "prefix_projection", "cartridge")


def peft_config(kind: str, num_virtual_tokens: int):
    """A PEFT prompt-learning config of ``kind`` for a causal LM."""
    import peft

    common = {"task_type": "CAUSAL_LM", "num_virtual_tokens": num_virtual_tokens}
    if kind == "prompt_tuning":
        return peft.PromptTuningConfig(**common)
    if kind == "p_tuning":
        return peft.PromptEncoderConfig(encoder_hidden_size=32, **common)
    if kind == "prefix_tuning":
        return peft.PrefixTuningConfig(**common)
    if kind == "prefix_projection":
        return peft.PrefixTuningConfig(prefix_projection=True, encoder_hidden_size=32, **common)
    if kind == "cartridge":
        return peft.CartridgeConfig(**common)
    raise ValueError(kind)
