"""A request's state as it moves through the engine, and the outputs handed back to callers."""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any, TypeVar, overload

if TYPE_CHECKING:
    import torch

    from .detokenizer import IncrementalDetokenizer
    from .prefix_store import Prefix
    from .sampler import TokenLogprobs
    from .sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"
    """An end-of-sequence token, a stop token id or a stop string."""
    LENGTH = "length"
    """max_new_tokens reached."""
    ABORT = "abort"
    """Aborted by the caller (or its connection went away)."""
    ERROR = "error"
    """The engine failed while running the request's step."""


@dataclass(slots=True, eq=False)
class Request:
    """One generation request. ``token_ids`` holds the prompt followed by the generated tokens;
    ``num_computed_tokens`` of them have their K/V in the request's own blocks."""

    request_id: str
    token_ids: list[int]
    params: SamplingParams
    num_prompt_tokens: int
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None = None
    prefix: Prefix | None = None
    """The adapter's prefix this request reads (its tokens start at position P), or None."""
    prefix_pinned: bool = False
    """Whether this request currently pins its prefix in the pool (while running, or while
    waiting for its prefix to be filled)."""
    tenant: str = ""
    """Who sent it: the scheduler admits requests of different tenants fairly."""
    tenant_weight: float = 1.0
    """The tenant's share relative to other tenants' (the scheduler's fair share)."""
    priority: int = 0
    """Within its tenant, lower runs sooner and is preempted later (vLLM's convention)."""
    admitted_step: int = 0
    """The scheduler step that last admitted it (a preemption for share waits a few steps)."""
    eos_token_ids: frozenset[int] = frozenset()
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    cache_root: bytes | None = None
    """Root of its blocks' hashes (:func:`~prefixserve.block_cache.cache_root`): who may share
    its cached blocks; None = it neither reads nor leaves cached blocks."""
    block_hashes: list[bytes] = field(default_factory=list)
    """Hashes of its first full blocks of tokens (extended as needed, never recomputed)."""
    num_offered_blocks: int = 0
    """Leading blocks of ``block_ids`` taken from the cache or offered to it once computed."""
    num_cached_tokens: int | None = None
    """Tokens its first admission found cached (not computed); None before it."""
    arrival_time: float = 0.0
    """``time.monotonic()`` when the engine took it."""
    queue_seconds: float | None = None
    """From ``arrival_time`` to its first admission; None before it."""
    matcher: Any = None
    """Its position in its output constraint's grammar (an xgrammar matcher), or None."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_prefix_tokens(self) -> int:
        return self.prefix.num_tokens if self.prefix is not None else 0

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


T = TypeVar("T")


class ListPrefix(Sequence[T]):
    """The first ``stop`` items of a list that only grows, as a read-only sequence: what a
    step's output holds of a request's tokens, taken in O(1) instead of copying them every step
    (the list's later appends stay out of it). Equal to any sequence of the same items; pickles
    as a plain list."""

    __slots__ = ("_items", "_start", "_stop")

    def __init__(self, items: list[T], start: int = 0, stop: int | None = None) -> None:
        self._items = items
        self._start = start
        self._stop = len(items) if stop is None else stop

    def __len__(self) -> int:
        return self._stop - self._start

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> list[T]: ...
    def __getitem__(self, index: int | slice) -> T | list[T]:
        if isinstance(index, slice):
            return self._items[self._start : self._stop][index]
        if not -len(self) <= index < len(self):
            raise IndexError("index out of range")
        return self._items[self._start + index % len(self)]

    def __iter__(self) -> Iterator[T]:
        return islice(self._items, self._start, self._stop)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (str, bytes)) or not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(list(self))

    def __reduce__(self) -> tuple[Any, ...]:
        return list, (list(self),)


@dataclass(slots=True)
class RequestOutput:
    """What the engine reports for a request after a step (cumulative, plus this step's delta)."""

    request_id: str
    text: str
    """The whole generated text so far (stop string cut as configured)."""
    token_ids: Sequence[int]
    """Every generated token id so far (new tokens only, not the prompt); from the engine a
    :class:`ListPrefix` view, not a copy."""
    finished: bool
    finish_reason: str | None
    """'stop', 'length', 'abort' or 'error' once finished, else None."""
    delta_text: str = ""
    """Text added by this step."""
    delta_token_ids: list[int] = field(default_factory=list)
    """Token ids added by this step."""
    logprobs: Sequence[TokenLogprobs] | None = None
    """Per generated token, when requested (from the engine a :class:`ListPrefix` view)."""
    num_prompt_tokens: int = 0
    num_prefix_tokens: int = 0
    """Tokens of the adapter's prefix in front of the prompt (0 without an adapter)."""
    num_cached_tokens: int = 0
    """Prompt tokens whose K/V were found in the prefix cache, not computed (vLLM's field)."""
    queue_seconds: float | None = None
    """Seconds from its arrival in the engine to its first scheduled step (None before)."""
