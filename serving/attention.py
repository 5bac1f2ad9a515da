"""Our attention inside transformers' own modeling code.

We register an attention implementation named ``prefixserve`` with transformers'
``AttentionInterface`` and a mask function that builds nothing (the metadata describes the
mask). Each layer's attention call writes the step's K/V into the paged pool at
``module.layer_idx`` and attends over prefix + own KV through an :class:`AttentionBackend`.
The step's state reaches every layer as one keyword argument of the model's forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .compiled import attention_op
from .kernels import kv_write, reference
from .kernels.metadata import AttentionMetadata
from .kv_cache import KVCachePool

ATTN_IMPLEMENTATION = "prefixserve"
STEP_KWARG = "prefixserve_step"


@dataclass(frozen=True, slots=True)
class AttentionShape:
    """The model's attention dimensions; a backend is built knowing them, so that its
    :meth:`~AttentionBackend.plan` returns a finished plan and its layers check nothing."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float32
    """Of the queries and the KV pool (GPU kernels pick their tiles by it)."""

    def __post_init__(self) -> None:
        if self.num_kv_heads < 1 or self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"{self.num_q_heads} query heads are not a multiple of {self.num_kv_heads} kv heads"
            )


PlanT = TypeVar("PlanT")


class AttentionBackend(Protocol[PlanT]):
    """Computes prefix-augmented paged attention for a packed step, in two phases: ``plan``
    once per step on the host (every decision, every device copy), then ``write_kv`` and
    ``attend`` per layer, which only launch work. ``PlanT`` is the backend's plan type."""

    name: str
    shape: AttentionShape
    device: torch.device

    def plan(self, meta: AttentionMetadata) -> PlanT:
        """The step's finished plan from host-side ``meta``: everything the layers need on the
        backend's device (the slot mapping included)."""
        ...

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: PlanT,
    ) -> None:
        """Store this step's ``key, value [T, Hkv, D]`` in the pool."""
        ...

    def attend(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: PlanT,
        scale: float,
    ) -> torch.Tensor:
        """``query [T, Hq, D]`` -> ``[T, Hq, D]``."""
        ...


class TorchBackend:
    """The PyTorch reference (gather + SDPA): the oracle, and the CPU fallback."""

    name = "torch"

    def __init__(self, shape: AttentionShape, device: torch.device) -> None:
        self.shape, self.device = shape, device

    def plan(self, meta: AttentionMetadata) -> reference.GatherPlan:
        device = self.device
        return reference.build_gather_plan(meta.to(device) if device.type != "cpu" else meta)

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: reference.GatherPlan,
    ) -> None:
        kv_write.write_kv(key, value, k_cache, v_cache, plan.slot_mapping)

    def attend(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: reference.GatherPlan,
        scale: float,
    ) -> torch.Tensor:
        return reference.paged_prefix_attention(query, k_cache, v_cache, plan, scale)


@dataclass(slots=True)
class StepContext(Generic[PlanT]):
    """Everything a layer's attention call needs for this step."""

    kv_cache: KVCachePool
    backend: AttentionBackend[PlanT]
    plan: PlanT


def prefixserve_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention hook: ``query [1, Hq, T, D]``, ``key/value [1, Hkv, T, D]``
    (RoPE applied) -> ``([1, T, Hq, D], None)``."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q, k, v = query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1)
    step: StepContext[Any] | None = kwargs.get(STEP_KWARG)
    if step is None:
        # The compiled forward: one opaque op per layer; the step comes from its forward context.
        out = attention_op(q, k, v, module.layer_idx, scale)
        return out.unsqueeze(0), None
    k_cache, v_cache = step.kv_cache.layer(module.layer_idx)  # type: ignore[arg-type]
    step.backend.write_kv(k, v, k_cache, v_cache, step.plan)
    out = step.backend.attend(q, k_cache, v_cache, step.plan, scale)
    return out.unsqueeze(0), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    """Packed steps build no dense mask: the attention metadata says who sees what."""
    return None


def register_attention() -> str:
    """Register our attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, prefixserve_attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _no_mask)
    return ATTN_IMPLEMENTATION
