"""Reference outputs from transformers itself, one prompt at a time (no batching, no padding)."""

from __future__ import annotations

import torch


@torch.inference_mode()
def hf_greedy(
    model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """New token ids of ``model.generate`` (greedy) for each prompt, ending at eos if produced."""
    results = []
    for ids in prompts:
        out = model.generate(
            torch.tensor([ids], device=model.device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            top_p=None,
            top_k=None,
            temperature=None,
        )
        results.append(out[0, len(ids) :].tolist())
    return results
