"""Per-request decoding options, validated once when a request enters the engine."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .text import shorten

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 64
"""Stop strings are searched after every token on the engine's thread: a bounded list keeps one
request from slowing every step."""
MAX_STOP_LENGTH = 512
MAX_STOP_TOKEN_IDS = 256
"""Largest number of top alternatives a request may ask for per generated token."""

_SEED_RANGE = (-(2**63), 2**64 - 1)
MAX_CONSTRAINT_CHARS = 64 * 2**10
"""Largest JSON schema, regex or grammar a request may carry (compiled per request)."""
MAX_CHOICES = 256
CONSTRAINTS = ("json_schema", "json_object", "regex", "choice", "grammar")
"""The structured-output fields of :class:`SamplingParams` (at most one per request)."""


@dataclass(slots=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    Construction validates every field and raises ``ValueError`` naming the field and the value.
    After construction ``stop`` is always a ``list[str]`` and ``stop_token_ids`` a ``list[int]``
    (both possibly empty), whatever form they were given in.
    """

    max_new_tokens: int = 64
    """Most tokens to generate; generation may stop earlier (eos, stop ids, stop strings)."""
    temperature: float = 0.0
    """Divides the logits before sampling; 0 means greedy (argmax)."""
    top_k: int = 0
    """Sample only among the k most likely tokens (ties at the k-th logit are kept); 0 = off."""
    top_p: float = 1.0
    """Sample only from the smallest set of most likely tokens whose probability reaches top_p."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times that of the most likely token."""
    repetition_penalty: float = 1.0
    """HF semantics: a token already in prompt or output has its logit divided by the penalty
    if positive, multiplied if negative; 1 = off."""
    frequency_penalty: float = 0.0
    """OpenAI semantics: subtracted from a token's logit once per time it occurs in the output
    so far (not the prompt); in [-2, 2], 0 = off."""
    presence_penalty: float = 0.0
    """OpenAI semantics: subtracted from the logit of every token that occurs in the output so
    far; in [-2, 2], 0 = off."""
    seed: int | None = None
    """Seeds this request's own generator: same seed, same prompt, same tokens, whatever else is
    in the batch. None draws from the engine's shared generator."""
    stop: list[str] | str | None = None
    """Strings that end generation; the output is cut at the first one (see ``detokenizer``)."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation, besides eos."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the output text."""
    ignore_eos: bool = False
    """Keep generating past eos (until max_new_tokens or another stop condition)."""
    logprobs: int | None = None
    """None = off; 0 = the chosen token's logprob; n = also the n most likely alternatives."""
    skip_special_tokens: bool = True
    """Leave special tokens (eos, pad, ...) out of the output text."""
    json_schema: dict[str, Any] | str | None = None
    """Constrain the output to JSON valid against this JSON schema (a dict or its text)."""
    json_object: bool = False
    """Constrain the output to any valid JSON object."""
    regex: str | None = None
    """Constrain the output to a match of this regular expression."""
    choice: list[str] | None = None
    """Constrain the output to exactly one of these strings."""
    grammar: str | None = None
    """Constrain the output to this EBNF grammar (GBNF-style, ``root ::= ...``)."""

    def __post_init__(self) -> None:
        self._check_ints()
        self._check_floats()
        self.stop = _normalize_stop(self.stop)
        self.stop_token_ids = _normalize_stop_token_ids(self.stop_token_ids)
        self._check_constraint()

    @property
    def constraint(self) -> tuple[str, str] | None:
        """``(kind, text)`` of the output constraint (``json_schema`` as JSON text, ``choice``
        as a JSON list), or None: the key under which its compiled grammar is cached."""
        if self.json_schema is not None:
            schema = self.json_schema
            return "json_schema", schema if isinstance(schema, str) else json.dumps(schema)
        if self.json_object:
            return "json_object", ""
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(self.choice)
        if self.grammar is not None:
            return "grammar", self.grammar
        return None

    def _check_constraint(self) -> None:
        given = [name for name in CONSTRAINTS if getattr(self, name) not in (None, False)]
        if len(given) > 1:
            raise ValueError(f"give at most one output constraint, got {', '.join(given)}")
        if self.json_schema is not None and not isinstance(self.json_schema, dict | str):
            raise ValueError(
                f"json_schema must be a dict or a JSON string, got {shorten(self.json_schema)}"
            )
        if not isinstance(self.json_object, bool):
            raise ValueError(f"json_object must be a bool, got {shorten(self.json_object)}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name} must be a non-empty string, got {shorten(value)}")
        if self.choice is not None:
            choice = self.choice
            if (
                not isinstance(choice, list | tuple)
                or not choice
                or not all(isinstance(c, str) and c for c in choice)
            ):
                raise ValueError(
                    f"choice must be a non-empty list of non-empty strings, got {shorten(choice)}"
                )
            if len(choice) > MAX_CHOICES:
                raise ValueError(f"at most {MAX_CHOICES} choices, got {len(choice)}")
            self.choice = list(choice)
        constraint = self.constraint
        if constraint is not None and len(constraint[1]) > MAX_CONSTRAINT_CHARS:
            raise ValueError(
                f"the {constraint[0]} constraint has {len(constraint[1])} characters; at most "
                f"{MAX_CONSTRAINT_CHARS} are accepted"
            )

    @property
    def greedy(self) -> bool:
        """True when the next token is always the argmax (temperature 0 or top_k 1)."""
        return self.temperature == 0.0 or self.top_k == 1

    def _check_ints(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(
                f"max_new_tokens must be an int >= 1, got {shorten(self.max_new_tokens)}"
            )
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {shorten(self.top_k)}")
        if self.seed is not None and not (
            _is_int(self.seed) and _SEED_RANGE[0] <= self.seed <= _SEED_RANGE[1]
        ):
            raise ValueError(
                f"seed must be None or an int in [{_SEED_RANGE[0]}, {_SEED_RANGE[1]}], "
                f"got {shorten(self.seed)}"
            )
        if self.logprobs is not None and not (
            _is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS
        ):
            raise ValueError(
                f"logprobs must be None or an int in [0, {MAX_LOGPROBS}], "
                f"got {shorten(self.logprobs)}"
            )

    def _check_floats(self) -> None:
        t = self.temperature
        if not _is_real(t) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {shorten(t)}")
        if not _is_real(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {shorten(self.top_p)}")
        if not _is_real(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {shorten(self.min_p)}")
        r = self.repetition_penalty
        if not _is_real(r) or not math.isfinite(r) or r <= 0:
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {shorten(r)}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not _is_real(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {shorten(value)}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _normalize_stop(stop: object) -> list[str]:
    if stop is None:
        return []
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list | tuple):
        raise ValueError(f"stop must be a string or a list of strings, got {shorten(stop)}")
    if len(items) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(items)}")
    for i, s in enumerate(items):
        if isinstance(s, str) and len(s) > MAX_STOP_LENGTH:
            raise ValueError(
                f"stop strings must be at most {MAX_STOP_LENGTH} characters, stop[{i}] has {len(s)}"
            )
        if not isinstance(s, str) or not s:
            raise ValueError(
                f"stop strings must be non-empty strings, got stop[{i}] = {shorten(s)} in "
                f"stop={shorten(stop)}"
            )
    return list(items)


def _normalize_stop_token_ids(ids: object) -> list[int]:
    if ids is None:
        return []
    if not isinstance(ids, list | tuple):
        raise ValueError(f"stop_token_ids must be a list of ints, got {shorten(ids)}")
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise ValueError(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(ids)}")
    for i, token in enumerate(ids):
        if not _is_int(token) or token < 0:
            raise ValueError(
                f"stop_token_ids must be ints >= 0, got stop_token_ids[{i}] = {shorten(token)} "
                f"in stop_token_ids={shorten(ids)}"
            )
    return list(ids)
