"""The metadata that drives one packed attention step, shared by every kernel and backend.

A step packs the query tokens of B requests into one tensor of T tokens. Each request attends to
two KV sources held in the same paged pool:

* its adapter's **prefix** (``prefix_lens[p]`` tokens, every position visible to every query), and
* its **own** tokens (``own_lens[b]`` tokens after this step's write, causal: the query at own
  index ``i`` sees own keys ``0..i``).

The paged pool of one layer is a pair ``k_cache, v_cache`` of shape
``[num_blocks, block_size, num_kv_heads, head_dim]``; a *slot* is ``block * block_size + offset``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    """Layer-independent description of one packed step (built once, used by every layer)."""

    cu_q_lens: torch.Tensor
    """(B + 1,) int32: start of each request's queries in the packed token dimension."""
    own_lens: torch.Tensor
    """(B,) int32: own tokens in the cache after this step's write (earlier chunks + this step)."""
    block_tables: torch.Tensor
    """(B, max_blocks) int32: each request's own blocks, in order; padding is 0 and never read."""
    slot_mapping: torch.Tensor
    """(T,) int64: the slot each new token's K/V is written to; -1 marks a padded token, whose
    K/V every backend's write skips."""
    prefix_index: torch.Tensor
    """(B,) int32: row of the prefix tables each request reads, -1 for no prefix."""
    prefix_lens: torch.Tensor
    """(NP,) int32: length of each prefix in tokens (NP may be 0)."""
    prefix_block_tables: torch.Tensor
    """(NP, max_prefix_blocks) int32: each prefix's shared, read-only blocks."""
    block_size: int
    """Tokens per block of the pool."""
    max_q_len: int
    """Largest number of query tokens of one request in this step (1 for a pure decode step)."""

    @property
    def num_requests(self) -> int:
        return self.own_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.slot_mapping.shape[0]

    @property
    def q_lens(self) -> torch.Tensor:
        """(B,) int32: query tokens of each request in this step."""
        return self.cu_q_lens[1:] - self.cu_q_lens[:-1]

    @property
    def request_prefix_lens(self) -> torch.Tensor:
        """(B,) int32: prefix length seen by each request (0 without a prefix)."""
        if self.prefix_lens.numel() == 0:
            return torch.zeros_like(self.own_lens)
        lens = self.prefix_lens[self.prefix_index.clamp(min=0).long()]
        return torch.where(self.prefix_index >= 0, lens, torch.zeros_like(lens))

    def to(self, device: torch.device | str) -> AttentionMetadata:
        """Copy every tensor to ``device`` (asynchronously only towards a GPU: a non-blocking copy
        to the host could be read before it lands)."""
        nb = torch.device(device).type == "cuda"
        return AttentionMetadata(
            cu_q_lens=self.cu_q_lens.to(device, non_blocking=nb),
            own_lens=self.own_lens.to(device, non_blocking=nb),
            block_tables=self.block_tables.to(device, non_blocking=nb),
            slot_mapping=self.slot_mapping.to(device, non_blocking=nb),
            prefix_index=self.prefix_index.to(device, non_blocking=nb),
            prefix_lens=self.prefix_lens.to(device, non_blocking=nb),
            prefix_block_tables=self.prefix_block_tables.to(device, non_blocking=nb),
            block_size=self.block_size,
            max_q_len=self.max_q_len,
        )
