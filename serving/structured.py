"""Structured output: a request's JSON schema, ``json_object``, regex, choice or EBNF grammar as a
token mask on every step's logits, built on xgrammar.

Why xgrammar (``benchmarks/bench_structured.py`` measures both on the default model's tokenizer):
per generated token it fills a row of the vocabulary bitmask and advances its matcher in about
10 us, where llguidance took about 100 us; both compile a small schema in milliseconds. The
bitmask of a step is filled on a worker thread while the model runs, then unpacked with a
lookup table and applied to the constrained rows of the logits with one masked fill before
sampling, on torch's threads (xgrammar's own CPU kernel is single-threaded: 6.2 ms for 32 rows of
a 49k vocabulary), so greedy picks, sampling and logprobs all see the masked distribution.

One owner per piece of state: :class:`GrammarCompiler` owns compiled grammars (cached by
constraint, compiled in a worker with a time limit); each request owns its matcher, which the
scheduler advances as tokens are appended.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .extras import MissingExtraError, require

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from .request import Request

COMPILE_TIMEOUT_S = 10.0
"""Longest a constraint may take to compile; a hostile schema or regex fails instead."""
CACHE_SIZE = 256
"""Compiled grammars kept (least recently used dropped)."""


class GrammarCompiler:
    """Compiles constraints into xgrammar grammars for one tokenizer, caching them by
    constraint; compiles run on a worker thread with a time limit."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        stop_token_ids: Sequence[int],
        timeout: float = COMPILE_TIMEOUT_S,
    ) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self.timeout = timeout
        self._compiler: Any = None
        self._cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._pending: dict[tuple[str, str], Future[Any]] = {}
        """Compiles under way: a constraint sent again waits for the same one."""
        self._lock = threading.Lock()
        self._compiling = ThreadPoolExecutor(2, thread_name_prefix="grammar-compile")
        """Compiles (a compile past its time limit runs on here, and its thread with it)."""
        self._masking = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")
        """Each step's bitmask, while the model runs."""

    def _xgr_compiler(self) -> Any:
        """xgrammar's compiler, built on first use (the tokenizer's vocabulary scan); a
        ValueError naming the extra to install where xgrammar is missing."""
        try:
            require("structured", "structured output (json_schema, json_object, regex, ...)")
        except MissingExtraError as e:
            raise ValueError(f"this server cannot constrain outputs: {e}") from None
        import xgrammar as xgr

        with self._lock:
            if self._compiler is None:
                info = xgr.TokenizerInfo.from_huggingface(
                    self._tokenizer,
                    vocab_size=self.vocab_size,
                    stop_token_ids=self._stop_token_ids or None,
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            return self._compiler

    def submit(self, constraint: tuple[str, str]) -> Future[Any]:
        """The compile of ``constraint``: done if cached, the one under way if any (one
        compile per constraint, whoever asks), else a new one on the worker pool."""
        with self._lock:
            cached = self._cache.get(constraint)
            if cached is not None:
                self._cache.move_to_end(constraint)
                done: Future[Any] = Future()
                done.set_result(cached)
                return done
            pending = self._pending.get(constraint)
            if pending is None:
                pending = self._pending[constraint] = self._compiling.submit(
                    self._compile_and_keep, constraint
                )
            return pending

    def compile(self, constraint: tuple[str, str]) -> Any:
        """The compiled grammar of ``constraint`` (``SamplingParams.constraint``); ValueError
        naming what is wrong if it does not compile, or takes longer than the time limit."""
        try:
            return self.submit(constraint).result(timeout=self.timeout)
        except FutureTimeout:
            raise self._too_slow(constraint) from None

    async def compile_async(self, constraint: tuple[str, str]) -> Any:
        """:meth:`compile` for an event loop: waits without holding a thread."""
        future = asyncio.wrap_future(self.submit(constraint))
        try:  # shielded: a timeout here must not cancel the compile others may wait for
            return await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except (TimeoutError, asyncio.TimeoutError):  # one and the same from Python 3.11
            raise self._too_slow(constraint) from None

    def _too_slow(self, constraint: tuple[str, str]) -> ValueError:
        return ValueError(
            f"the {constraint[0]} constraint did not compile within {self.timeout:g} s; simplify it"
        )

    def _compile_and_keep(self, constraint: tuple[str, str]) -> Any:
        """Compile (on the pool) and cache the result, late or not."""
        try:
            compiled = self._compile(constraint)
            with self._lock:
                self._cache[constraint] = compiled
                while len(self._cache) > CACHE_SIZE:
                    self._cache.popitem(last=False)
            return compiled
        finally:
            with self._lock:
                self._pending.pop(constraint, None)

    def _compile(self, constraint: tuple[str, str]) -> Any:
        kind, text = constraint
        compiler = self._xgr_compiler()
        try:
            if kind == "json_schema":
                json.loads(text)  # a clear message for text that is not JSON at all
                return compiler.compile_json_schema(text, strict_mode=True)
            if kind == "json_object":
                return compiler.compile_builtin_json_grammar()
            if kind == "regex":
                return compiler.compile_regex(text)
            if kind == "choice":
                options = json.loads(text)
                ebnf = "root ::= " + " | ".join(json.dumps(o) for o in options)
                return compiler.compile_grammar(ebnf)
            if kind == "grammar":
                return compiler.compile_grammar(text)
        except (RuntimeError, ValueError, TypeError) as e:
            reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ValueError(f"the {kind} constraint does not compile: {reason[:500]}") from None
        raise ValueError(f"unknown constraint kind {kind!r}")

    def matcher(self, compiled: Any) -> Any:
        """A fresh matcher (one request's position in the grammar)."""
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled)

    def start_masks(self, requests: Sequence[Request]) -> Future[StepMasks] | None:
        """Fill the bitmask rows of the constrained ``requests`` (those that sample this step,
        in logits order) on a worker thread; None if none is constrained."""
        rows = [i for i, r in enumerate(requests) if r.matcher is not None]
        if not rows:
            return None
        return self._masking.submit(
            self._fill, len(requests), rows, [requests[i].matcher for i in rows]
        )

    def _fill(self, num_rows: int, rows: list[int], matchers: list[Any]) -> StepMasks:
        """The worker's part: each constrained row's bitmask from its matcher (xgrammar's C++;
        no torch op here, whose threads the model's step uses)."""
        import xgrammar as xgr

        bitmask = xgr.allocate_token_bitmask(len(rows), self.vocab_size)
        for row, matcher in enumerate(matchers):
            matcher.fill_next_token_bitmask(bitmask, row)
        return StepMasks(bitmask, torch.tensor(rows, dtype=torch.long))

    @staticmethod
    @torch.inference_mode()
    def apply(logits: torch.Tensor, masks: Future[StepMasks]) -> torch.Tensor:
        """``logits`` (R, V) with the tokens its constrained rows may not take at -inf (fp32;
        one masked fill over those rows)."""
        step = masks.result()
        logits = logits.float()
        rows = step.rows.to(logits.device)
        bitmask = step.bitmask.to(logits.device)
        bits = _BITS.to(logits.device)[bitmask.view(torch.uint8).int()]  # (Rc, 4W, 8)
        blocked = ~bits.view(len(rows), -1)[:, : logits.shape[1]]
        logits[rows] = logits[rows].masked_fill_(blocked, float("-inf"))
        return logits

    def close(self) -> None:
        self._compiling.shutdown(wait=False, cancel_futures=True)
        self._masking.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True, slots=True)
class StepMasks:
    """One step's token masks: ``bitmask`` (Rc, ceil(V / 32)) int32, xgrammar's (bit ``t % 32``
    of word ``t // 32`` set where token ``t`` is allowed); ``rows`` (Rc,) int64, the rows of the
    logits they belong to."""

    bitmask: torch.Tensor
    rows: torch.Tensor


_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()
"""(256, 8): the bits of each byte value, lowest first (xgrammar's bitmask order: token ``t`` is
bit ``t % 32`` of word ``t // 32``, little-endian)."""
