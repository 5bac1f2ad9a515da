"""The Triton attention backend: the kernels of ``prefixserve.kernels`` behind the engine's
:class:`~prefixserve.attention.AttentionBackend` interface (the default on CUDA)."""

from __future__ import annotations

import torch

from .kernels import triton_attention as kernels
from .kernels.metadata import AttentionMetadata


class TritonBackend:
    """Varlen prefill, split-KV decode and grouped shared-prefix decode, chosen per step."""

    name = "triton"

    def __init__(self, decode_mode: str = "auto") -> None:
        """``decode_mode``: ``auto`` (the dispatch rule), or ``plain`` / ``grouped`` forced."""
        self.decode_mode = decode_mode

    def plan(self, meta: AttentionMetadata, device: torch.device) -> kernels.StepPlan:
        return kernels.plan_step(meta, device=device, decode_mode=self.decode_mode)

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: kernels.StepPlan,
    ) -> None:
        kernels.write_kv(key, value, k_cache, v_cache, plan.meta.slot_mapping)

    def attend(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: kernels.StepPlan,
        scale: float,
    ) -> torch.Tensor:
        return kernels.prefix_paged_attention(query, k_cache, v_cache, plan, scale)
