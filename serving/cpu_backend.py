"""The native CPU attention backend (the default on CPU): ``torch.ops.prefixserve`` behind the
engine's :class:`~prefixserve.attention.AttentionBackend` interface.

``plan()`` turns the step's host metadata into the op's tiles once (which prefixes are read
once per group of requests, how work is split across threads); each layer's ``attend`` is then
one op call that reads K/V in place from the paged pool. Where the op cannot be built or loaded,
:func:`native_or_reference` falls back to the PyTorch reference with one warning.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

from .attention import AttentionBackend, AttentionShape, TorchBackend
from .config import cache_root, env_cpu_isa
from .kernels import cpu_attention
from .kernels.cpu_build import NativeBuildError
from .kernels.cpu_isa import default_isa
from .kernels.cpu_plan import CPUStepPlan, DispatchRule, plan_cpu_step
from .kernels.kv_write import scatter_kv
from .kernels.metadata import AttentionMetadata

FALLBACK_COST = (
    "the PyTorch reference copies every shared prefix per request per layer: expect about half "
    "the throughput with a 512-token system prompt, and less with longer ones"
)


class NativeCPUBackend:
    """Prefill, decode and grouped shared-prefix decode in one native op per layer."""

    name = "cpu"
    device = torch.device("cpu")

    def __init__(self, shape: AttentionShape, prefix_mode: str = "auto") -> None:
        """``prefix_mode``: ``auto`` (the dispatch rule of
        :func:`~prefixserve.kernels.cpu_plan.prefer_grouped`), or ``plain`` / ``grouped``
        forced. Raises :class:`NativeBuildError` where the op cannot be built or loaded."""
        if prefix_mode not in ("auto", "plain", "grouped"):
            raise ValueError(f"prefix_mode must be auto, plain or grouped, got {prefix_mode!r}")
        self.shape = shape
        self.prefix_mode = prefix_mode
        cpu_attention.load(cache_root())
        self.isa = default_isa(env_cpu_isa())
        self.rule = DispatchRule.for_step(self.isa, shape.dtype, shape.head_dim)

    def plan(self, meta: AttentionMetadata) -> CPUStepPlan:
        return plan_cpu_step(meta, self.isa, prefix_mode=self.prefix_mode, rule=self.rule)

    def write_kv(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: CPUStepPlan,
    ) -> None:
        scatter_kv(key, value, k_cache, v_cache, plan.kv_write)

    def attend(
        self,
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: CPUStepPlan,
        scale: float,
    ) -> torch.Tensor:
        return cpu_attention.paged_prefix_attention(query, k_cache, v_cache, plan, scale)


def native_or_reference(shape: AttentionShape) -> AttentionBackend[Any]:
    """The native backend, or the PyTorch reference (with one warning per process) where the op
    cannot be built or loaded."""
    try:
        return NativeCPUBackend(shape)
    except NativeBuildError as e:
        _warn_fallback(str(e))
        return TorchBackend(shape, torch.device("cpu"))


@functools.cache
def _warn_fallback(reason: str) -> None:
    warnings.warn(
        f"prefixserve: the native CPU attention op is unavailable ({reason}); {FALLBACK_COST}",
        RuntimeWarning,
        stacklevel=4,
    )
