"""Turns a :class:`SchedulerOutput` into one packed forward pass of the transformers model.

All scheduled tokens are concatenated into a batch of one sequence with explicit position ids;
the attention metadata tells each layer which request every token belongs to and where its K/V
live in the paged pool. Logits are computed only at the last token of requests that sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from .attention import STEP_KWARG, StepContext, select_backend
from .config import EngineConfig
from .kernels.metadata import AttentionMetadata
from .kv_cache import KVCachePool, KVCacheSpec, size_pool
from .request import Request
from .scheduler import SchedulerOutput


@dataclass(slots=True)
class ModelInput:
    """The tensors of one step, on the model's device."""

    input_ids: torch.Tensor
    """(T,) int64: the scheduled tokens of every request, concatenated."""
    positions: torch.Tensor
    """(T,) int64: each token's position (prefix length + own index)."""
    meta: AttentionMetadata
    logits_indices: torch.Tensor
    """(R,) int64: packed index of the last token of each request that samples this step."""
    sampling_requests: list[Request]
    """The R requests that sample a token after this step, in logits order."""


def model_shape(model: PreTrainedModel) -> tuple[int, int, int, int, int]:
    """``(num_layers, num_heads, num_kv_heads, head_dim, vocab_size)`` of a transformers model."""
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, heads, kv_heads, head_dim, cfg.vocab_size


class ModelRunner:
    """Owns the model, the KV pool and the attention backend; runs one step at a time."""

    def __init__(self, model: PreTrainedModel, config: EngineConfig) -> None:
        self.model = model
        self.device = config.model.torch_device
        num_layers, _, kv_heads, head_dim, self.vocab_size = model_shape(model)
        self.block_size = config.cache.block_size
        spec = KVCacheSpec(
            num_layers, kv_heads, head_dim, self.block_size, config.model.torch_dtype
        )
        num_blocks = size_pool(
            spec,
            self.device,
            config.cache.num_kv_blocks,
            config.cache.kv_memory_fraction,
            config.cache.cpu_kv_memory_gib,
        )
        self.kv_cache = KVCachePool(spec, num_blocks, self.device)
        self.backend = select_backend(config.attention_backend, self.device)

    def prepare(self, scheduled: SchedulerOutput) -> ModelInput:
        """Build the packed inputs and attention metadata of one step (host side, then copy)."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        cu_q = [0]
        own_lens: list[int] = []
        logits_indices: list[int] = []
        sampling: list[Request] = []
        for request, n in zip(scheduled.requests, scheduled.num_new_tokens):
            start = request.num_computed_tokens
            own = np.arange(start, start + n)
            ids.extend(request.token_ids[start : start + n])
            positions.append(own)
            slots.append(np.asarray(request.block_ids)[own // bs] * bs + own % bs)
            cu_q.append(cu_q[-1] + n)
            own_lens.append(start + n)
            if start + n == request.num_tokens:
                logits_indices.append(cu_q[-1] - 1)
                sampling.append(request)
        width = max(len(r.block_ids) for r in scheduled.requests)
        tables = np.zeros((len(scheduled.requests), width), dtype=np.int32)
        for row, request in enumerate(scheduled.requests):
            tables[row, : len(request.block_ids)] = request.block_ids
        meta = AttentionMetadata(
            cu_q_lens=torch.tensor(cu_q, dtype=torch.int32),
            own_lens=torch.tensor(own_lens, dtype=torch.int32),
            block_tables=torch.from_numpy(tables),
            slot_mapping=torch.from_numpy(np.concatenate(slots).astype(np.int64)),
            prefix_ids=torch.full((len(own_lens),), -1, dtype=torch.int32),
            prefix_lens=torch.zeros((0,), dtype=torch.int32),
            prefix_block_tables=torch.zeros((0, 1), dtype=torch.int32),
            block_size=bs,
            max_q_len=max(scheduled.num_new_tokens),
            max_kv_len=max(own_lens),
        )
        return ModelInput(
            input_ids=torch.tensor(ids, dtype=torch.int64, device=self.device),
            positions=torch.from_numpy(np.concatenate(positions)).to(self.device),
            meta=meta.to(self.device) if self.device.type != "cpu" else meta,
            logits_indices=torch.tensor(logits_indices, dtype=torch.int64, device=self.device),
            sampling_requests=sampling,
        )

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> tuple[torch.Tensor, list[Request]]:
        """Run one step; returns ``(logits [R, V], the R requests that sample)``."""
        inputs = self.prepare(scheduled)
        step = StepContext(
            meta=inputs.meta,
            kv_cache=self.kv_cache,
            backend=self.backend,
            plan=self.backend.plan(inputs.meta),
        )
        output = self.model(
            input_ids=inputs.input_ids[None],
            position_ids=inputs.positions[None],
            logits_to_keep=inputs.logits_indices,
            use_cache=False,
            **{STEP_KWARG: step},
        )
        return output.logits[0], inputs.sampling_requests
