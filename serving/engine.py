"""The synchronous engine: add requests, call :meth:`LLMEngine.step` until they finish.

One step = schedule -> packed forward -> sample -> append tokens, detokenize, check stops ->
free the blocks of finished requests. Everything here runs on one thread; the async engine
wraps it in a background loop for the server.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .adapters import (
    Adapter,
    AdapterError,
    AdapterOverBudgetError,
    load_peft_adapter,
    text_adapter,
)
from .block_cache import BlockCache, cache_root
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .kv_cache import BlockAllocator, blocks_for
from .model_loader import load_model
from .model_runner import ModelRunner
from .prefix_store import PrefixStore
from .request import FinishReason, ListPrefix, Request, RequestOutput
from .sampler import Sampler, native_argmax, request_generator
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .structured import GrammarCompiler
from .text import fewest_tokens, longest_token_chars, shorten
from .types import AdapterInfo

logger = logging.getLogger(__name__)

Prompt = str | list[int]


class StepError(RuntimeError):
    """A step failed; the requests it carried were finished with reason 'error'."""

    def __init__(self, request_ids: list[str], cause: BaseException) -> None:
        super().__init__(f"step failed for {len(request_ids)} requests: {cause!r}")
        self.request_ids = request_ids
        self.cause = cause


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        ids.update([eos] if isinstance(eos, int) else eos or [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _max_model_len(model: PreTrainedModel, requested: int | None) -> int:
    cfg = model.config.get_text_config()
    limit = getattr(cfg, "max_position_embeddings", None) or 2048
    window = getattr(cfg, "sliding_window", None)
    if window is not None and getattr(cfg, "use_sliding_window", True) and window < limit:
        # Our attention is global: stay inside the window so results equal the model's own.
        limit = window
    if requested is not None:
        if requested > limit:
            raise ValueError(f"max_model_len must be <= the model's limit {limit}, got {requested}")
        return requested
    return limit


@dataclass(frozen=True, slots=True)
class TenantStats:
    tenant: str
    weight: float
    tokens: int
    """Prefill and decode tokens computed for it."""
    service: float
    """Its fair-share counter: weighted tokens served over its weight."""
    waiting: int
    running: int
    preemptions: int


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the engine for monitoring, like vLLM's ``SchedulerStats``."""

    waiting: int
    """Requests waiting to be scheduled."""
    running: int
    """Requests in the running batch."""
    kv_blocks_used: int
    """KV blocks held by requests and adapter prefixes."""
    kv_blocks_total: int
    prefix_blocks: int
    """KV blocks holding adapter prefixes."""
    adapters_loaded: int
    generated_tokens: int
    """Output tokens generated since the engine started."""
    prefix_hits: int
    """Requests that found their adapter prefix resident and filled."""
    prefix_materializations: int
    """Adapter prefixes computed into the pool (first use, or again after an eviction)."""
    prefix_evictions: int
    preemptions: int
    """Requests preempted (recomputed later) for KV blocks."""
    prefix_cache_queries: int = 0
    """Prompt tokens looked up in the prefix cache (each admission)."""
    prefix_cache_hits: int = 0
    """Of those, tokens found cached (not computed)."""
    cached_blocks: int = 0
    """KV blocks of requests' own tokens held in the prefix cache (in use or idle)."""
    cached_blocks_idle: int = 0
    """Of those, blocks no running request reads (evicted first when the pool needs room)."""
    prefix_cache_evictions: int = 0
    tenants: tuple[TenantStats, ...] = ()
    """Per tenant the scheduler has seen: service received, requests, preemptions."""


@dataclass(frozen=True, slots=True)
class EngineDescription:
    """What an engine serves; fixed once it is built."""

    model_path: str
    dtype: str
    device: str
    max_model_len: int
    """Adapter prefix + prompt + output must fit."""
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    block_size: int
    num_kv_blocks: int
    attention_backend: str
    has_chat_template: bool


class LLMEngine:
    """Continuous-batching engine over one transformers model and one paged KV pool."""

    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config or EngineConfig()
        model, self.tokenizer, self.model_path = load_model(self.config.model)
        self.max_model_len = _max_model_len(model, self.config.model.max_model_len)
        self.eos_token_ids = _eos_token_ids(model, self.tokenizer)
        self.longest_token = longest_token_chars(self.tokenizer)
        """Characters one token spans at most (None: no cheap bound for this tokenizer)."""
        self.runner = ModelRunner(model, self.config, self.max_model_len)
        self.vocab_size = self.runner.shape.vocab_size
        self.allocator = BlockAllocator(self.runner.kv_cache.num_blocks)
        self.block_size = self.config.cache.block_size
        self.block_cache = BlockCache(self.allocator, self.block_size)
        self.prefixes = PrefixStore(
            self.allocator,
            self.block_size,
            self.runner.kv_cache.spec.bytes_per_block,
            self.block_cache,
        )
        self.scheduler = Scheduler(
            self.config.scheduler, self.allocator, self.prefixes, self.block_size
        )
        self.sampler = Sampler(argmax=native_argmax(self.runner.device))
        self.grammars = GrammarCompiler(self.tokenizer, self.vocab_size, sorted(self.eos_token_ids))
        """Compiled output constraints (structured output), and each step's token masks."""
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()
        self.num_generated_tokens = 0

    # -- requests -------------------------------------------------------------------------------

    def tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids of ``prompt``: a string is tokenized as given (no special tokens added)."""
        if isinstance(prompt, str):
            fewest = fewest_tokens(prompt, self.longest_token)
            if fewest > self.max_model_len:  # refused before seconds of tokenizing
                raise ValueError(
                    f"the prompt has {len(prompt)} characters, so at least {fewest} tokens (one "
                    f"spans at most {self.longest_token}), beyond the context of "
                    f"{self.max_model_len} tokens"
                )
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        ids = list(prompt)
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(
                f"prompt token ids must be ints in [0, {self.vocab_size}), got {bad[:5]}"
            )
        return ids

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        adapter: str | None = None,
        tenant: str = "",
        cache_salt: str | None = None,
        share_cache: bool = False,
        priority: int = 0,
        tenant_weight: float = 1.0,
    ) -> str:
        """Validate and queue a request, optionally behind a loaded adapter's prefix; returns its
        id. ``tenant``: who sent it (the scheduler shares the engine fairly between tenants, and
        its cached blocks are its own). ``cache_salt``: reuse cached blocks only between requests
        with the same salt (one user of a tenant). ``share_cache``: share cached blocks with
        every tenant (a server allows it for public adapters only). ``priority``: within its
        tenant, lower runs sooner and is preempted later. ``tenant_weight``: the tenant's share
        of the engine relative to other tenants' (fair scheduling).
        Raises ``ValueError`` on bad input (:class:`AdapterError` for adapter problems)."""
        params = params or SamplingParams()
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise ValueError(f"cache_salt must be a string, got {type(cache_salt).__name__}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        if not tenant_weight > 0:
            raise ValueError(f"tenant_weight must be > 0, got {tenant_weight!r}")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        token_ids = self.tokenize(prompt)
        if not token_ids:
            raise ValueError("prompt must not be empty (it has 0 tokens)")
        num_prefix = self.prefixes.get(adapter).num_tokens if adapter is not None else 0
        self._check_fits(num_prefix, len(token_ids), params)
        constraint = params.constraint
        matcher = None
        if constraint is not None:  # compiled by now where a server added it (cached)
            matcher = self.grammars.matcher(self.grammars.compile(constraint))
        request = Request(
            request_id=request_id,
            token_ids=token_ids,
            params=params,
            num_prompt_tokens=len(token_ids),
            detokenizer=IncrementalDetokenizer(self.tokenizer, token_ids, params),
            generator=request_generator(params, self.runner.device),
            eos_token_ids=frozenset() if params.ignore_eos else self.eos_token_ids,
            prefix=self.prefixes.attach(adapter) if adapter is not None else None,
            tenant=tenant,
            tenant_weight=tenant_weight,
            priority=priority,
            arrival_time=time.monotonic(),
            matcher=matcher,
        )
        if self.config.cache.enable_prefix_caching:
            prefix = request.prefix
            request.cache_root = cache_root(
                None if prefix is None else (prefix.name, prefix.serial),
                None if share_cache else tenant,
                cache_salt,
            )
        self.requests[request_id] = request
        self.scheduler.add(request)
        return request_id

    def _check_fits(self, num_prefix: int, num_prompt_tokens: int, params: SamplingParams) -> None:
        own = num_prompt_tokens + params.max_new_tokens
        if num_prefix + own > self.max_model_len:
            adapter = f"adapter prefix ({num_prefix} tokens) + " if num_prefix else ""
            raise ValueError(
                f"{adapter}prompt ({num_prompt_tokens} tokens) + max_new_tokens "
                f"({params.max_new_tokens}) = {num_prefix + own} exceeds the context of "
                f"{self.max_model_len} tokens"
            )
        blocks = blocks_for(own, self.block_size) + blocks_for(num_prefix, self.block_size)
        if blocks > self.allocator.num_blocks:
            raise ValueError(
                f"prefix + prompt + max_new_tokens = {num_prefix + own} tokens need {blocks} KV "
                f"blocks but the pool has {self.allocator.num_blocks}; lower max_new_tokens or "
                "give the pool more memory"
            )

    # -- adapters -------------------------------------------------------------------------------

    def load_adapter(
        self, name: str, path: str | Path | None = None, text: str | None = None
    ) -> AdapterInfo:
        """Register a PEFT adapter directory (``path``) or a system prompt (``text``) as a prefix.
        It is validated now and materialized in the pool on first use."""
        return self.add_adapter(self.read_adapter(name, path, text))

    def read_adapter(
        self, name: str, path: str | Path | None = None, text: str | None = None
    ) -> Adapter:
        """Read, tokenize and validate an adapter without changing the engine: a server does this
        in a worker thread, then :meth:`add_adapter` on the engine's thread, so that reading
        megabytes never holds up a step."""
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"adapter name must be a non-empty string, got {shorten(name)}")
        if (path is None) == (text is None):
            raise ValueError(f"adapter {shorten(name)}: give exactly one of path= or text=")
        self.prefixes.check_name_free(name)  # fail early, before reading any file
        max_tokens = self.max_model_len - 2  # room for one prompt token and one new token
        if path is not None:
            return load_peft_adapter(
                name, path, self.runner.shape, max_tokens, self.runner.kv_cache.spec.dtype
            )
        text = str(text)
        fewest = fewest_tokens(text, self.longest_token)
        if fewest > max_tokens:  # refused before seconds of tokenizing
            raise AdapterError(
                f"adapter {shorten(name)}: the text prefix has {len(text)} characters, so at "
                f"least {fewest} tokens (one spans at most {self.longest_token}); at most "
                f"{max_tokens} fit"
            )
        return text_adapter(name, self.tokenize(text), max_tokens)

    def check_budget(self, adapter: Adapter, max_bytes: int | None) -> None:
        """``AdapterOverBudgetError`` if ``adapter`` would hold more than ``max_bytes`` (its
        host tensors and its prefix KV at the pool's dtype, once materialized)."""
        if max_bytes is None:
            return
        kv = blocks_for(adapter.num_tokens, self.block_size) * self.prefixes.bytes_per_block
        if adapter.host_bytes + kv > max_bytes:
            raise AdapterOverBudgetError(adapter.name, adapter.host_bytes, kv, max_bytes)

    def add_adapter(self, adapter: Adapter) -> AdapterInfo:
        """Register an adapter read by :meth:`read_adapter` (engine thread)."""
        self.prefixes.add(adapter)
        return self.prefixes.info(adapter.name)

    def unload_adapter(self, name: str, missing_ok: bool = False) -> bool:
        """Unload ``name``: now if no request holds it (True), else when the last one ends
        (False); new requests for it are refused from now on. ``missing_ok``: an adapter that
        is not loaded counts as unloaded now (else :class:`AdapterNotFoundError`)."""
        if missing_ok and self.adapter_info(name) is None:
            return True
        return self.prefixes.remove(name)

    def adapter_info(self, name: str) -> AdapterInfo | None:
        """What the engine holds of adapter ``name``, or None if it is not loaded."""
        return self.prefixes.info(name) if name in self.prefixes.prefixes else None

    def list_adapters(self) -> list[AdapterInfo]:
        return [self.prefixes.info(name) for name in self.prefixes.prefixes]

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; ``None`` if it is unknown or already done."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self.scheduler.finish(request, FinishReason.ABORT)
        return self._output(request, "", [])

    def abort_all(self) -> list[RequestOutput]:
        """Abort every unfinished request (shutdown)."""
        outputs = [self.abort(request_id) for request_id in list(self.requests)]
        return [out for out in outputs if out is not None]

    def reset_prefix_cache(self) -> int:
        """Evict every cached block no request reads; returns how many were freed."""
        return self.block_cache.clear_idle()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    def stats(self) -> EngineStats:
        """A snapshot of queues, memory and counters (call on the engine's thread)."""
        prefix_stats = self.prefixes.stats
        cache_stats = self.block_cache.stats
        return EngineStats(
            waiting=len(self.scheduler.waiting),
            running=len(self.scheduler.running),
            kv_blocks_used=self.allocator.num_used,
            kv_blocks_total=self.allocator.num_blocks,
            prefix_blocks=self.prefixes.resident_blocks,
            adapters_loaded=len(self.prefixes.prefixes),
            generated_tokens=self.num_generated_tokens,
            prefix_hits=prefix_stats.hits,
            prefix_materializations=prefix_stats.materializations,
            prefix_evictions=prefix_stats.evictions,
            preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=cache_stats.queries,
            prefix_cache_hits=cache_stats.hits,
            cached_blocks=self.block_cache.num_cached,
            cached_blocks_idle=len(self.block_cache.idle),
            prefix_cache_evictions=cache_stats.evictions,
            tenants=self._tenant_stats(),
        )

    def _tenant_stats(self) -> tuple[TenantStats, ...]:
        scheduler = self.scheduler
        waiting = Counter(r.tenant for r in scheduler.waiting)
        running = Counter(r.tenant for r in scheduler.running)
        return tuple(
            TenantStats(
                tenant=tenant,
                weight=account.weight,
                tokens=account.tokens,
                service=account.served,
                waiting=waiting[tenant],
                running=running[tenant],
                preemptions=account.preemptions,
            )
            for tenant, account in scheduler.fair.accounts.items()
        )

    def describe(self) -> EngineDescription:
        """What the engine serves (fixed once it is built)."""
        return EngineDescription(
            model_path=str(self.model_path),
            dtype=str(self.runner.dtype).removeprefix("torch."),
            device=str(self.runner.device),
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            eos_token_ids=tuple(sorted(self.eos_token_ids)),
            block_size=self.block_size,
            num_kv_blocks=self.allocator.num_blocks,
            attention_backend=self.runner.backend.name,
            has_chat_template=self.tokenizer.chat_template is not None,
        )

    def num_waiting(self, tenant: str | None = None) -> int:
        """Requests waiting to run (of ``tenant`` only, when given)."""
        waiting = self.scheduler.waiting
        if tenant is None:
            return len(waiting)
        return sum(r.tenant == tenant for r in waiting)

    # -- the step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduled forward pass; returns outputs of requests that progressed.

        If the forward pass or sampling raises, the requests of this step are finished with
        reason 'error' (their blocks freed) and :class:`StepError` names them; the engine stays
        consistent and keeps serving the others.
        """
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return []
        try:
            # Constrained rows' token masks are filled on a worker while the model runs.
            masks = self.grammars.start_masks(
                [
                    r
                    for r, n in zip(scheduled.requests, scheduled.num_new_tokens)
                    if r.num_computed_tokens + n == r.num_tokens
                ]
            )
            logits, sampling = self.runner.execute(scheduled)
            if logits is None:  # a step that only filled adapter prefixes
                self.scheduler.update(scheduled)
                return []
            if masks is not None:
                logits = self.grammars.apply(logits, masks)
            sampled = self.sampler(
                logits,
                [r.params for r in sampling],
                [r.generator for r in sampling],
                [r.token_ids for r in sampling],
                [r.num_prompt_tokens for r in sampling],
            )
        except Exception as e:
            # The step's requests fail, and so do those waiting for a prefix it was filling
            # (they would retry the same fill forever).
            filling = {fill.prefix for fill in scheduled.fills}
            waiting = [r for r in self.scheduler.waiting if r.prefix in filling]
            failed = [*scheduled.requests, *waiting]
            for request in failed:
                self.scheduler.finish(request, FinishReason.ERROR)
                del self.requests[request.request_id]
            self.block_cache.forget(scheduled.new_cached_blocks)  # never written in full
            raise StepError([r.request_id for r in failed], e) from e
        updates = self.scheduler.update(scheduled, sampling, sampled.token_ids, sampled.logprobs)
        self.num_generated_tokens += len(updates)
        outputs = []
        for update in updates:
            outputs.append(self._output(update.request, update.delta_text, [update.token]))
            if update.request.is_finished:
                del self.requests[update.request.request_id]
        return outputs

    def _output(self, request: Request, delta: str, delta_ids: list[int]) -> RequestOutput:
        reason = request.finish_reason
        return RequestOutput(
            request_id=request.request_id,
            text=request.detokenizer.text,
            token_ids=ListPrefix(request.token_ids, request.num_prompt_tokens),
            finished=request.is_finished,
            finish_reason=reason.value if reason is not None else None,
            delta_text=delta,
            delta_token_ids=delta_ids,
            logprobs=ListPrefix(request.logprobs) if request.params.logprobs is not None else None,
            num_prompt_tokens=request.num_prompt_tokens,
            num_prefix_tokens=request.num_prefix_tokens,
            num_cached_tokens=request.num_cached_tokens or 0,
            queue_seconds=request.queue_seconds,
        )
