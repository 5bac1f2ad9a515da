"""API keys and the tenants they name.

A keys file (``--api-keys FILE``) or ``$PREFIXSERVE_API_KEYS`` holds one entry per line (or per
``;`` in the variable): ``TENANT KEY [admin]``; ``#`` starts a comment. Clients send the key as
call metadata ``authorization: Bearer KEY`` (or ``x-api-key: KEY``). Admins may load adapters
from server-side paths and make them public. Without any key the server is open: every caller is
the admin tenant ``anonymous`` and what it loads is public.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..config import env_api_keys
from ..text import check_name
from .errors import UnauthenticatedError

ENV_VAR = "PREFIXSERVE_API_KEYS"


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    admin: bool = False


ANONYMOUS = Tenant("anonymous", admin=True)


def _digest(key: str) -> bytes:
    # Keys are looked up by hash so the table never holds them and lookups do not compare them.
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    """Maps API keys to tenants; empty means the server is open (no authentication)."""

    def __init__(self, entries: Iterable[tuple[str, Tenant]] = ()) -> None:
        self._tenants: dict[bytes, Tenant] = {}
        for key, tenant in entries:
            check_name("tenant", tenant.name)
            if len(key) < 8:
                raise ValueError(f"the API key of tenant {tenant.name!r} is shorter than 8 chars")
            digest = _digest(key)
            if digest in self._tenants:
                raise ValueError(
                    f"an API key is listed twice (tenants {tenant.name!r} and "
                    f"{self._tenants[digest].name!r})"
                )
            self._tenants[digest] = tenant

    @property
    def open(self) -> bool:
        return not self._tenants

    @property
    def tenants(self) -> set[str]:
        return {t.name for t in self._tenants.values()}

    @classmethod
    def parse(cls, text: str, source: str) -> ApiKeys:
        """Entries ``TENANT KEY [admin]``, one per line or separated by ';'."""
        entries = []
        for number, raw in enumerate(re.split(r"[;\n]", text), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.split()
            if len(fields) not in (2, 3) or (len(fields) == 3 and fields[2] != "admin"):
                raise ValueError(
                    f"{source}, entry {number}: expected 'TENANT KEY' or 'TENANT KEY admin', "
                    f"got {len(fields)} fields"
                )
            entries.append((fields[1], Tenant(fields[0], admin=len(fields) == 3)))
        return cls(entries)

    @classmethod
    def load(cls, path: str | Path | None = None, environ: dict[str, str] | None = None) -> ApiKeys:
        """Keys from ``path`` and from ``$PREFIXSERVE_API_KEYS`` (both may be given)."""
        text, sources = "", []
        if path is not None:
            text += Path(path).read_text() + "\n"
            sources.append(str(path))
        env = env_api_keys(environ)
        if env.strip():
            text += env
            sources.append(f"${ENV_VAR}")
        return cls.parse(text, " + ".join(sources) or "api keys")

    def authenticate(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Tenant:
        """The tenant whose key the call's metadata carries; ``UnauthenticatedError`` if none."""
        if self.open:
            return ANONYMOUS
        key = None
        for name, value in metadata or ():
            text = value.decode() if isinstance(value, bytes) else value
            if name == "authorization":
                scheme, _, token = text.partition(" ")
                key = token.strip() if scheme.lower() == "bearer" else None
            elif name == "x-api-key":
                key = text.strip()
            if key:
                break
        if not key:
            raise UnauthenticatedError(
                "this server needs an API key: send the metadata 'authorization: Bearer <key>' "
                "(Client(api_key=...), --api-key or $PREFIXSERVE_API_KEY)"
            )
        tenant = self._tenants.get(_digest(key))
        if tenant is None:
            raise UnauthenticatedError("the API key is not valid")
        return tenant
