"""User text: quoting it in error messages without copying all of it, checking names, and
bounding its tokens without tokenizing it.

Error messages name the value that was wrong, but a request may carry megabytes (a stop list, an
adapter name of 8 KB): quoted in full, the message would outgrow gRPC's limit on a status and
the client would see RESOURCE_EXHAUSTED instead of the real reason.
"""

from __future__ import annotations

import re
from typing import Any

QUOTE_LIMIT = 80
"""Characters of a quoted value kept in a message."""


def shorten(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)``, cut after ``limit`` characters with the full length added when longer.

    ``shorten("x" * 5000)`` -> ``'xxx...x'... (5000 chars)``. A string is cut before quoting,
    so its length costs nothing; other values are quoted whole first, so pass request fields
    (bounded by the request size limits), not unbounded structures.
    """
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} chars)"
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} chars)"


def longest_token_chars(tokenizer: Any) -> int | None:
    """The most characters one token of ``tokenizer`` spans, or None where text is normalized
    before tokenizing (a normalizer may shrink it, so no bound follows from its length).

    A text of ``n`` characters then has at least ``ceil(n / longest)`` tokens: the bound that
    refuses a text too long for the context without tokenizing it (megabytes take seconds).
    Vocabulary entries are counted as stored; a byte-level entry is one character per byte,
    never fewer characters than its text has."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None:
        return None
    return max((len(token) for token in tokenizer.get_vocab()), default=None)


def fewest_tokens(text: str, longest: int | None) -> int:
    """A lower bound on the tokens of ``text`` (0 where there is none: see
    :func:`longest_token_chars`)."""
    return -(-len(text) // longest) if longest else 0


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""Tenant and adapter names: safe as directory names, never containing '/'."""


def check_name(what: str, name: str) -> str:
    """``name`` if it is a valid tenant or adapter name, else ``ValueError`` saying why."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(
            f"{what} {shorten(name)} is not valid: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name
