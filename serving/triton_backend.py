"""The Triton attention backend: the kernels of ``prefixserve.kernels`` behind the engine's
:class:`~prefixserve.attention.AttentionBackend` interface (the default on CUDA).

``plan()`` decides everything once per step, knowing the model's head counts (kernel, work
lists, KV splits, workspace) and copies the metadata to the device; each layer then launches
kernels without checks or host synchronization."""

from __future__ import annotations

import torch

from .attention import AttentionShape
from .kernels import triton_attention as kernels
from .kernels.metadata import AttentionMetadata


class TritonBackend:
    """Varlen prefill, split-KV decode and grouped shared-prefix decode, chosen per step."""

    name = "triton"

    def __init__(
        self, shape: AttentionShape, device: torch.device, decode_mode: str = "auto"
    ) -> None:
        """``decode_mode``: ``auto`` (the dispatch rule), or ``plain`` / ``grouped`` forced."""
        if decode_mode not in ("auto", "plain", "grouped"):
            raise ValueError(f"decode_mode must be auto, plain or grouped, got {decode_mode!r}")
        self.shape, self.device = shape, device
        self.decode_mode = decode_mode

    def plan(self, meta: AttentionMetadata) -> kernels.StepPlan:
        shape = self.shape
        return kernels.plan_step(
            meta,
            num_q_heads=shape.num_q_heads,
            num_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            dtype=shape.dtype,
            device=self.device,
            decode_mode=self.decode_mode,
        )

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: kernels.StepPlan,
    ) -> None:
        kernels.launch_write_kv(key, value, k_cache, v_cache, plan.meta.slot_mapping)

    def attend(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: kernels.StepPlan,
        scale: float,
    ) -> torch.Tensor:
        return kernels.run_planned(query, k_cache, v_cache, plan, scale)
