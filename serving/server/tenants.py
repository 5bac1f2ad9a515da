"""API keys and the tenants they name.

A keys file (``--api-keys FILE``) or ``$PREFIXSERVE_API_KEYS`` holds one entry per line (or per
``;`` in the variable): ``TENANT KEY [admin] [weight=W]``; ``#`` starts a comment. ``weight``
(default 1) is the tenant's share of the engine relative to other tenants' when they compete
(fair scheduling; a tenant of weight 2 gets twice the service of one of weight 1). Clients send
the key as
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
    weight: float = 1.0
    """Its share of the engine relative to other tenants' (fair scheduling)."""


ANONYMOUS = Tenant("anonymous", admin=True)


def _digest(key: str) -> bytes:
    # Keys are looked up by hash so the table never holds them and lookups do not compare them.
    return hashlib.sha256(key.encode()).digest()


def _weight(text: str, where: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        weight = float("nan")
    if not 0 < weight < float("inf"):
        raise ValueError(f"{where}: weight must be a number > 0, got {text!r}")
    return weight


class ApiKeys:
    """Maps API keys to tenants; empty means the server is open (no authentication)."""

    def __init__(self, entries: Iterable[tuple[str, Tenant]] = ()) -> None:
        self._tenants: dict[bytes, Tenant] = {}
        weights: dict[str, float] = {}
        for key, tenant in entries:
            check_name("tenant", tenant.name)
            if weights.setdefault(tenant.name, tenant.weight) != tenant.weight:
                raise ValueError(
                    f"tenant {tenant.name!r} has keys of different weights "
                    f"({weights[tenant.name]:g} and {tenant.weight:g}); give every key one weight"
                )
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
        """Entries ``TENANT KEY [admin] [weight=W]``, one per line or separated by ';'."""
        entries = []
        for number, raw in enumerate(re.split(r"[;\n]", text), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            fields = line.split()
            where = f"{source}, entry {number}"
            if len(fields) < 2:
                raise ValueError(f"{where}: expected 'TENANT KEY [admin] [weight=W]', got 1 field")
            admin, weight = False, 1.0
            for option in fields[2:]:
                if option == "admin" and not admin:
                    admin = True
                elif option.startswith("weight=") and weight == 1.0:
                    weight = _weight(option.removeprefix("weight="), where)
                else:
                    raise ValueError(
                        f"{where}: expected 'TENANT KEY [admin] [weight=W]', got {option!r} "
                        "after the key"
                    )
            entries.append((fields[1], Tenant(fields[0], admin=admin, weight=weight)))
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
