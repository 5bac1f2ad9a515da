"""Turns a :class:`SchedulerOutput` into one packed forward pass of the transformers model.

All scheduled tokens are concatenated into a batch of one sequence with explicit position ids;
the attention metadata tells each layer which request every token belongs to and where its K/V
live in the paged pool. Logits are computed only at the last token of requests that sample.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain, pairwise
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import PreTrainedModel

from .adapters import ModelShape
from .attention import STEP_KWARG, AttentionShape, StepContext
from .backends import select_backend
from .compiled import CompiledForward, cannot_compile
from .config import EngineConfig
from .kernels import kv_write
from .kernels.metadata import AttentionMetadata
from .kernels.progress import say
from .kv_cache import KVCachePool, KVCacheSpec, blocks_for, size_pool
from .native_linear import use_native_linears
from .prefix_store import Prefix
from .request import Request
from .scheduler import PrefixFill, SchedulerOutput

if TYPE_CHECKING:  # CUDA graphs need the triton extra: imported where they are chosen
    from .cuda_graphs import DecodeGraphs

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ModelInput:
    """The tensors of one step, on the model's device."""

    input_ids: torch.Tensor
    """(T,) int64: the scheduled tokens of every request, concatenated."""
    positions: torch.Tensor
    """(T,) int64: each token's position (prefix length + own index)."""
    meta: AttentionMetadata
    """Host-side metadata (the backend's plan moves what it needs to the device)."""
    logits_indices: torch.Tensor
    """(R,) int64: packed index of the last token of each request that samples this step."""
    sampling_requests: list[Request]
    """The R requests that sample a token after this step, in logits order."""


class ModelRunner:
    """Owns the model, the KV pool and the attention backend; runs one step at a time."""

    def __init__(
        self, model: PreTrainedModel, config: EngineConfig, max_model_len: int | None = None
    ) -> None:
        """``max_model_len``: the longest sequence the engine admits (sizes CUDA graphs'
        tables; default the model's position limit)."""
        self.model = model
        self.device = config.model.torch_device
        self.shape = ModelShape.of(model)
        self.dtype = config.model.torch_dtype
        self.block_size = config.cache.block_size
        spec = KVCacheSpec(
            self.shape.num_layers,
            self.shape.num_kv_heads,
            self.shape.head_dim,
            self.block_size,
            self.dtype,
        )
        num_blocks = size_pool(
            spec,
            self.device,
            config.cache.num_kv_blocks,
            config.cache.kv_memory_fraction,
            config.cache.cpu_kv_memory_gib,
        )
        self.kv_cache = KVCachePool(spec, num_blocks, self.device)
        attention_shape = AttentionShape(
            self.shape.num_heads, self.shape.num_kv_heads, self.shape.head_dim, self.dtype
        )
        self.backend = select_backend(config.attention_backend, self.device, attention_shape)
        self.native_linears = 0
        """Linear layers running on the native CPU linear op (0 where none do)."""
        if self.device.type == "cpu" and config.native_cpu_linear:
            self.native_linears = use_native_linears(model)
        self.graphs: DecodeGraphs | None = None
        """Decode steps replayed from CUDA graphs; None where there are none."""
        self.compiled: CompiledForward | None = None
        """The compiled forward of token-id steps; None when the model runs eagerly."""
        if not config.eager:
            reason = cannot_compile(model, self.device, self.dtype)
            if reason is None:
                # Freezing prepacks ATen's linear weights: a gain only where the native linear
                # op does not run them, and frozen graphs miss Inductor's on-disk graph cache.
                freezing = self.device.type == "cpu" and self.native_linears == 0
                self.compiled = CompiledForward(model, freezing=freezing)
                self.warm_up()
            else:
                logger.warning("prefixserve: running the model eagerly: %s", reason)
        limit = min(config.max_cuda_graph_batch, config.scheduler.max_num_seqs)
        if (
            self.device.type == "cuda"
            and not config.eager
            and limit > 0
            and self._graphs_possible()
        ):
            from .cuda_graphs import capture_sizes  # imports triton: only with its backend

            longest = max_model_len or model.config.get_text_config().max_position_embeddings
            self.use_decode_graphs(capture_sizes(limit), longest)

    def prepare(self, scheduled: SchedulerOutput) -> ModelInput:
        """Build the packed inputs and attention metadata of one step with array operations
        (one pass over the requests to read their state), then copy them to the device.

        Requests that start with the same cached blocks (:func:`shared_runs`) read them as one
        more shared prefix: the attention backends then read them once per group, as they do
        an adapter's prefix."""
        requests, bs = scheduled.requests, self.block_size
        num = len(requests)
        q_lens = np.asarray(scheduled.num_new_tokens, dtype=np.int64)
        starts = np.fromiter((r.num_computed_tokens for r in requests), np.int64, num)
        ends = starts + q_lens
        cu_q = np.zeros(num + 1, dtype=np.int64)
        np.cumsum(q_lens, out=cu_q[1:])
        # Per token: its request, its own index, its position, the slot its K/V go to.
        token_request = np.repeat(np.arange(num), q_lens)
        own = np.arange(cu_q[-1]) - (cu_q[:-1] - starts)[token_request]
        adapter_lens = np.fromiter((r.num_prefix_tokens for r in requests), np.int64, num)
        positions = own + adapter_lens[token_request]
        block_tables = _pad_tables([r.block_ids for r in requests])
        slots = block_tables[token_request, own // bs].astype(np.int64) * bs + own % bs
        ids = list(chain.from_iterable(r.token_ids[s:e] for r, s, e in zip(requests, starts, ends)))
        samples = np.flatnonzero(ends == np.fromiter((r.num_tokens for r in requests), np.int64))

        # What each request reads as its prefix: its adapter's, plus the cached blocks it
        # shares with others of this step (where the adapter's prefix ends on a block edge).
        runs = shared_runs(requests, bs)
        rows: dict[tuple[Prefix | None, tuple[int, ...]], int] = {}
        row_tables: list[list[int]] = []
        prefix_index = np.full(num, -1, dtype=np.int32)
        skipped = np.zeros(num, dtype=np.int64)
        for i, r in enumerate(requests):
            run = runs[i]
            key = (r.prefix, tuple(r.block_ids[:run]))
            if r.prefix is None and not run:
                continue
            row = rows.get(key)
            if row is None:
                row = rows[key] = len(rows)
                row_tables.append([*(r.prefix.block_ids if r.prefix else ()), *key[1]])
            prefix_index[i] = row
            skipped[i] = run * bs
        prefix_lens = np.fromiter(
            ((p.num_tokens if p else 0) + len(run) * bs for p, run in rows), np.int32, len(rows)
        )
        own_tables = block_tables
        if skipped.any():
            own_tables = _pad_tables([r.block_ids[n // bs :] for r, n in zip(requests, skipped)])
        meta = AttentionMetadata(
            cu_q_lens=torch.from_numpy(cu_q.astype(np.int32)),
            own_lens=torch.from_numpy((ends - skipped).astype(np.int32)),
            block_tables=torch.from_numpy(own_tables),
            slot_mapping=torch.from_numpy(slots),
            prefix_index=torch.from_numpy(prefix_index),
            prefix_lens=torch.from_numpy(prefix_lens),
            prefix_block_tables=torch.from_numpy(_pad_tables(row_tables)),
            block_size=bs,
            max_q_len=int(q_lens.max()),
        )
        return ModelInput(
            input_ids=torch.tensor(ids, dtype=torch.int64).to(self.device),
            positions=torch.from_numpy(positions).to(self.device),
            meta=meta,
            logits_indices=torch.from_numpy(cu_q[1:][samples] - 1).to(self.device),
            sampling_requests=[requests[i] for i in samples],
        )

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> tuple[torch.Tensor | None, list[Request]]:
        """Fill the scheduled prefix chunks, then run one step; returns ``(logits [R, V], the R
        requests that sample)``, logits None when no request ran."""
        for fill in scheduled.fills:
            self.fill_prefix(fill)
        if not scheduled.requests:
            return None, []
        inputs = self.prepare(scheduled)
        logits = self._forward(
            inputs.meta, inputs.positions, inputs.logits_indices, input_ids=inputs.input_ids
        )
        return logits, inputs.sampling_requests

    @torch.inference_mode()
    def fill_prefix(self, fill: PrefixFill) -> None:
        """Write tokens ``[start, start + n)`` of an adapter's prefix K/V into its blocks: stored
        K/V are copied (no RoPE); prompt embeddings and text run through the model at their
        positions, over the prefix's earlier chunks like a chunked prefill."""
        prefix, start, num = fill.prefix, fill.start, fill.num_tokens
        adapter, bs = prefix.adapter, self.block_size
        pos = np.arange(start, start + num)
        slot_mapping = torch.from_numpy(np.asarray(prefix.block_ids)[pos // bs] * bs + pos % bs)
        if adapter.kv is not None:
            kv = adapter.kv[:, :, start : start + num].to(self.device, self.kv_cache.spec.dtype)
            slot_mapping = slot_mapping.to(self.device)
            for layer in range(kv.shape[0]):  # kv: [L, 2, n, Hkv, D]
                k_cache, v_cache = self.kv_cache.layer(layer)
                kv_write.write_kv(kv[layer, 0], kv[layer, 1], k_cache, v_cache, slot_mapping)
            return
        meta = AttentionMetadata(
            cu_q_lens=torch.tensor([0, num], dtype=torch.int32),
            own_lens=torch.tensor([start + num], dtype=torch.int32),
            block_tables=torch.from_numpy(_pad_tables([prefix.block_ids])),
            slot_mapping=slot_mapping,
            prefix_index=torch.tensor([-1], dtype=torch.int32),
            prefix_lens=torch.zeros((0,), dtype=torch.int32),
            prefix_block_tables=torch.from_numpy(_pad_tables([])),
            block_size=bs,
            max_q_len=num,
        )
        positions = torch.arange(start, start + num, device=self.device)
        no_logits = torch.zeros((0,), dtype=torch.int64, device=self.device)
        if adapter.embeddings is not None:
            embeds = adapter.embeddings[start : start + num].to(self.device, self.dtype)
            self._forward(meta, positions, no_logits, inputs_embeds=embeds)
        else:
            assert adapter.token_ids is not None
            ids = adapter.token_ids[start : start + num]
            tokens = torch.tensor(ids, dtype=torch.int64, device=self.device)
            self._forward(meta, positions, no_logits, input_ids=tokens)

    def _forward(
        self,
        meta: AttentionMetadata,
        positions: torch.Tensor,
        logits_indices: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One packed forward pass over host-side ``meta``; returns logits ``[R, V]`` at
        ``logits_indices``. A decode step in which every request samples replays a CUDA graph
        where one fits."""
        if (
            self.graphs is not None
            and input_ids is not None
            and len(logits_indices) == meta.num_tokens == meta.num_requests
        ):
            logits = self.graphs.run(meta, input_ids, positions)
            if logits is not None:
                return logits
        step = StepContext(self.kv_cache, self.backend, self.backend.plan(meta))
        return self._run_model(step, positions, logits_indices, input_ids, inputs_embeds)

    def _run_model(
        self,
        step: StepContext[Any],
        positions: torch.Tensor,
        logits_indices: torch.Tensor,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The model's forward over a planned step: compiled where it is, else eager."""
        if self.compiled is not None and input_ids is not None:
            try:
                return self.compiled(step, input_ids, positions, logits_indices)
            except torch._dynamo.exc.TorchDynamoException as e:
                self._fall_back(e)
        output = self.model(
            input_ids=None if input_ids is None else input_ids[None],
            inputs_embeds=None if inputs_embeds is None else inputs_embeds[None],
            position_ids=positions[None],
            logits_to_keep=logits_indices,
            use_cache=False,
            **{STEP_KWARG: step},
        )
        return output.logits[0]

    def _graphs_possible(self) -> bool:
        """CUDA graphs replay the Triton backend's plans: say so once where it is not chosen."""
        if self.backend.name == "triton":
            return True
        logger.warning(
            "prefixserve: no CUDA graphs: they need the triton attention backend, not %s",
            self.backend.name,
        )
        return False

    @torch.inference_mode()
    def use_decode_graphs(self, sizes: list[int], max_model_len: int, capture: bool = True) -> None:
        """Serve decode steps of up to ``max(sizes)`` requests from graphs captured now, one per
        size and decode kernel (:class:`~prefixserve.cuda_graphs.DecodeGraphs`). They need the
        Triton backend. ``capture=False`` runs the graphs' bodies without capturing them (tests
        of the padding and buffers on a CPU). A capture that fails leaves steps graph-free,
        saying why once."""
        if not self._graphs_possible():
            return
        from .cuda_graphs import DecodeGraphs
        from .triton_backend import TritonBackend

        assert isinstance(self.backend, TritonBackend)

        def forward(
            step: StepContext[Any],
            ids: torch.Tensor,
            positions: torch.Tensor,
            indices: torch.Tensor,
        ) -> torch.Tensor:
            return self._run_model(step, positions, indices, input_ids=ids)

        graphs = DecodeGraphs(
            forward,
            self.kv_cache,
            self.backend,
            sizes=sizes,
            max_model_len=max_model_len,
            capture=capture,
        )
        try:
            graphs.capture_all()
        except Exception as e:
            logger.warning(
                "prefixserve: capturing CUDA graphs failed; decode steps run without them "
                "(correct, but slower). The cause: %s",
                _first_line(e),
            )
            return
        self.graphs = graphs

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile the forward before serving (one graph serves every step). The dummy step
        writes K/V into blocks that no one owns yet (each owner writes its slots before it reads
        them)."""
        if self.compiled is None:
            return
        start = time.perf_counter()
        for i, q_lens in enumerate(WARM_UP_STEPS, 1):
            say(
                f"compiling the model's forward ({i}/{len(WARM_UP_STEPS)}; a minute or more on "
                "a small CPU, seconds from Inductor's cache; enforce_eager=True / "
                "--enforce-eager skips it) ..."
            )
            inputs = self._dummy_step(q_lens)
            self._forward(inputs.meta, inputs.positions, inputs.logits_indices, inputs.input_ids)
            if self.compiled is None:  # it fell back to eager, saying why
                return
        say(
            f"compiled the model's forward: {self.compiled.num_graphs} graphs in "
            f"{time.perf_counter() - start:.1f} s"
        )

    def _dummy_step(self, q_lens: tuple[int, ...]) -> ModelInput:
        """A step of fresh requests with ``q_lens`` tokens each, in the pool's first blocks."""
        bs, first = self.block_size, 0
        tables: list[list[int]] = []
        slots: list[np.ndarray] = []
        positions: list[np.ndarray] = []
        for n in q_lens:
            tables.append(list(range(first, first + blocks_for(n, bs))))
            first += len(tables[-1])
            slots.append(np.asarray(tables[-1])[np.arange(n) // bs] * bs + np.arange(n) % bs)
            positions.append(np.arange(n))
        cu_q = np.cumsum([0, *q_lens])
        meta = AttentionMetadata(
            cu_q_lens=torch.tensor(cu_q, dtype=torch.int32),
            own_lens=torch.tensor(q_lens, dtype=torch.int32),
            block_tables=torch.from_numpy(_pad_tables(tables)),
            slot_mapping=torch.from_numpy(np.concatenate(slots).astype(np.int64)),
            prefix_index=torch.full((len(q_lens),), -1, dtype=torch.int32),
            prefix_lens=torch.zeros((0,), dtype=torch.int32),
            prefix_block_tables=torch.from_numpy(_pad_tables([])),
            block_size=bs,
            max_q_len=max(q_lens),
        )
        return ModelInput(
            input_ids=torch.zeros(int(cu_q[-1]), dtype=torch.int64, device=self.device),
            positions=torch.from_numpy(np.concatenate(positions)).to(self.device),
            meta=meta,
            logits_indices=torch.tensor(cu_q[1:] - 1, dtype=torch.int64, device=self.device),
            sampling_requests=[],
        )

    def _fall_back(self, error: BaseException) -> None:
        """Run eagerly from now on, saying why once."""
        logger.warning(
            "prefixserve: the model's forward failed to compile; running it eagerly from now on "
            "(correct, but slower). The cause: %s",
            _first_line(error),
        )
        self.compiled = None


WARM_UP_STEPS = ((3, 2, 2),)
"""Token counts of the warm-up steps' requests: one step per graph compiled (one: every step
pads to at least two tokens)."""


def _first_line(error: BaseException, limit: int = 400) -> str:
    """``Type: first line of its message`` of the error's root cause (dynamo wraps the errors
    of compilers), cut at ``limit`` characters (compile errors run long)."""
    while (cause := getattr(error, "inner_exception", None) or error.__cause__) is not None:
        error = cause
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[:limit] + " ..."


def shared_runs(requests: Sequence[Request], block_size: int) -> list[int]:
    """Per request, how many of its leading blocks it shares with another request of the step:
    the longest such run, counting only blocks before each one's ``num_computed_tokens`` (cached
    blocks it does not write; a block registered by a request of this same step is written by
    that request, whose own run stops before it, and every backend writes a layer's K/V before
    any request reads them) and only behind a prefix that ends on a block edge (the run then
    continues the prefix's table). Requests that share nothing get 0.

    Candidates are found by first block (O(requests) when nothing is shared); within a group,
    sorting the tables puts each request next to those it shares most with."""
    runs = [0] * len(requests)
    by_first: dict[tuple[Prefix | None, int], list[int]] = {}
    for i, r in enumerate(requests):
        if r.num_computed_tokens >= block_size and r.num_prefix_tokens % block_size == 0:
            by_first.setdefault((r.prefix, r.block_ids[0]), []).append(i)
    for members in by_first.values():
        if len(members) < 2:
            continue
        tables = sorted(
            (requests[i].block_ids[: requests[i].num_computed_tokens // block_size], i)
            for i in members
        )
        for (a, i), (b, j) in pairwise(tables):
            common = _common_length(a, b)
            runs[i] = max(runs[i], common)
            runs[j] = max(runs[j], common)
    return runs


def _common_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _pad_tables(tables: list[list[int]]) -> np.ndarray:
    """Block tables as one int32 array ``[len(tables), max(1, longest)]``, padded with 0."""
    lens = np.fromiter(map(len, tables), np.int64, len(tables))
    out = np.zeros((len(tables), max(1, int(lens.max(initial=0)))), dtype=np.int32)
    out[np.arange(out.shape[1]) < lens[:, None]] = np.fromiter(
        chain.from_iterable(tables), np.int32, int(lens.sum())
    )
    return out
