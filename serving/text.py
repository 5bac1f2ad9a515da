"""Quoting user input in error messages without copying all of it.

Error messages name the value that was wrong, but a request may carry megabytes (a stop list, an
adapter name of 8 KB): quoted in full, the message would outgrow gRPC's limit on a status and
the client would see RESOURCE_EXHAUSTED instead of the real reason.
"""

from __future__ import annotations

import re

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
