"""Incremental detokenization for streaming, with stop strings.

Semantics, exactly:

* **Text.** The output text is what the output tokens add to the prompt's text: each step decodes
  a short window (a few prompt tokens for context, then the output tokens not yet settled) and
  takes what the new tokens add to it. For byte-level BPE tokenizers this equals
  ``tokenizer.decode(output_ids, skip_special_tokens=...)``; for SentencePiece-style tokenizers it
  keeps the leading space of the first output token, which decoding the output alone would drop.
  ``clean_up_tokenization_spaces`` is never applied (it is not stable under appending).
* **No half characters.** A window that decodes to text ending in ``"\\ufffd"`` (an incomplete
  UTF-8 sequence split over tokens) is held back until a later token completes it. The window
  restarts after every emitted piece, so the cost of a step does not grow with the output length.
* **Stop strings.** After each token, the text is searched for the stop strings. The match that
  ends first wins (the earliest-starting one among those ending at the same place), so the result
  does not depend on how the text was split into tokens or on the order of ``params.stop``. The
  output is cut at the start of that match, or at its end with ``include_stop_str_in_output``, and
  ``stopped`` becomes True at the token that completes the match (even when that token also
  starts an unfinished character).
* **Streaming never runs ahead of the cut.** Each ``append`` returns only text known to stay: the
  longest tail of the text that is the beginning of some stop string (at most
  ``max(len(stop)) - 1`` characters) is held back until later text rules it out, and ``flush()``
  releases it when generation ends for another reason (eos, stop token id, length, abort).

``text`` is always the concatenation of the deltas returned so far; after a stop or ``flush()``
it is the whole output text.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from .sampling_params import SamplingParams

PROMPT_CONTEXT_TOKENS = 5
"""Prompt tokens decoded before the output so its first token's leading space is kept."""


class IncrementalDetokenizer:
    """Turns one request's output tokens into streamed text deltas and detects stop strings.

    Engine use: ``delta = detok.append(token)``; if ``detok.stopped``, finish with reason "stop";
    on any other finish, ``delta += detok.flush()``. ``flush`` after a stop returns "".
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[int],
        params: SamplingParams,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = params.skip_special_tokens
        self._stops = [params.stop] if isinstance(params.stop, str) else list(params.stop or ())
        self._include_stop = params.include_stop_str_in_output
        self._max_stop = max((len(s) for s in self._stops), default=0)
        self._window = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self._read = len(self._window)
        """Window tokens before ``_read`` are decoded into ``_text``; the rest are pending."""
        self._text = ""
        self._emitted = 0
        """Characters of ``_text`` already returned to the caller."""
        self._stopped = False
        self._finished = False

    @property
    def text(self) -> str:
        """The output text streamed so far: always the concatenation of the returned deltas,
        so it never shows held-back text that a stop string could still cut."""
        return self._text[: self._emitted]

    @property
    def stopped(self) -> bool:
        """True once a stop string was found; no more tokens may be appended."""
        return self._stopped

    def append(self, token_id: int) -> str:
        """Add one generated token; returns the new text that is safe to stream (maybe "")."""
        if self._finished:
            raise RuntimeError("append() after the detokenizer stopped or was flushed")
        self._window.append(token_id)
        prefix_text = self._decode(self._window[: self._read])
        new_text = self._decode(self._window)
        if len(new_text) <= len(prefix_text):
            return ""
        if new_text.endswith("\ufffd"):
            return self._extend(new_text[len(prefix_text) :].rstrip("\ufffd"), partial=True)
        self._window = self._window[self._read :]
        self._read = len(self._window)
        return self._extend(new_text[len(prefix_text) :])

    def flush(self) -> str:
        """End of generation: decode what is pending and release held-back text (stop check
        included). Idempotent; returns "" after a stop."""
        if self._finished:
            return ""
        prefix_text = self._decode(self._window[: self._read])
        new_text = self._decode(self._window)
        return self._extend(new_text[len(prefix_text) :], final=True)

    def _decode(self, ids: list[int]) -> str:
        text = self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False
        )
        assert isinstance(text, str)
        return text

    def _extend(self, piece: str, final: bool = False, partial: bool = False) -> str:
        """Add decoded text, look for a stop string, return the newly safe part.

        ``partial``: ``piece`` is the complete characters before an unfinished one; it is kept
        only if it completes a stop string (so a stop is seen at the token that completes it).
        """
        start = max(0, len(self._text) - self._max_stop + 1)
        cut = self._find_stop(self._text + piece, start)
        if cut is None and partial:
            return ""
        self._text += piece
        if cut is not None:
            self._text = self._text[:cut]
            self._stopped = self._finished = True
            safe_end = cut
        elif final:
            self._finished = True
            safe_end = len(self._text)
        else:
            safe_end = len(self._text) - self._held_back()
        delta = self._text[self._emitted : safe_end]
        self._emitted = max(self._emitted, safe_end)
        return delta

    def _find_stop(self, text: str, start: int) -> int | None:
        """Where to cut ``text`` for the first stop string found from ``start`` on, if any."""
        best: tuple[int, int] | None = None
        for stop in self._stops:
            pos = text.find(stop, start)
            if pos >= 0:
                key = (pos + len(stop), pos)
                best = key if best is None else min(best, key)
        if best is None:
            return None
        end, pos = best
        return end if self._include_stop else pos

    def _held_back(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        tail = self._text[-(self._max_stop - 1) :] if self._max_stop > 1 else ""
        for n in range(len(tail), 0, -1):
            if any(stop.startswith(tail[-n:]) for stop in self._stops):
                return n
        return 0
