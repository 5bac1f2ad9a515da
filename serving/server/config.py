"""Server configuration: the one source of every server option and of ``prefixserve serve``'s
flags for them.

:func:`server_options` lists :class:`ServerConfig`'s fields (and :class:`TenantQuota`'s, as
``--*-per-tenant`` flags) with their defaults and docstrings; the command line generates one
flag per option from it, as it does for the engine's options (``prefixserve.config``), and
:func:`server_config` turns the parsed flags back into a :class:`ServerConfig`. Light to import:
building the flags loads neither grpc nor torch.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import EngineConfig, Flag, cache_root, field_docstrings, flag
from ..quota import TenantQuota
from ..text import check_name

if TYPE_CHECKING:
    from .tenants import ApiKeys


@dataclass(frozen=True, slots=True)
class AdapterSpec:
    """An adapter to load at startup: ``[TENANT/]NAME=PATH`` on the command line."""

    name: str
    path: str
    owner: str | None = None

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        key, sep, path = text.partition("=")
        if not sep or not key or not path:
            raise ValueError(f"--adapter expects [TENANT/]NAME=PATH, got {text!r}")
        owner, _, name = key.rpartition("/")
        check_name("adapter name", name)
        if owner:
            check_name("tenant", owner)
        return cls(name, path, owner or None)


def _open_keys() -> ApiKeys:
    from .tenants import ApiKeys

    return ApiKeys()


def default_registry_dir() -> Path:
    return cache_root() / "registry"


@dataclass(slots=True)
class ServerConfig:
    engine: EngineConfig = field(default_factory=EngineConfig)
    host: str = "127.0.0.1"
    """Address to listen on; '0.0.0.0' or '[::]' to accept other machines."""
    port: int = 50051
    """gRPC port; 0 picks a free one."""
    api_keys: ApiKeys = field(default_factory=_open_keys, metadata=flag(metavar="FILE", text=True))
    """API keys: on the command line a file of 'TENANT KEY [admin]' lines, also read from
    $PREFIXSERVE_API_KEYS; none of either (or 'none') = an open server (no authentication,
    every adapter public)."""
    registry_dir: str | Path | None = field(
        default_factory=default_registry_dir, metadata=flag(metavar="DIR", text=True)
    )
    """Where loaded adapters are kept across restarts (default ~/.cache/prefixserve/registry,
    or under $PREFIXSERVE_CACHE); None ('none') = a temporary directory, forgotten on exit."""
    adapters: list[AdapterSpec] = field(
        default_factory=list,
        metadata=flag(name="adapter", metavar="[TENANT/]NAME=PATH", repeat=True),
    )
    """A PEFT adapter directory to load at startup, public unless TENANT/ is given (repeatable;
    not recorded in the registry)."""
    tls_cert: str | None = field(default=None, metadata=flag(metavar="PEM"))
    """PEM certificate chain; with tls_key the server speaks TLS only."""
    tls_key: str | None = field(default=None, metadata=flag(metavar="PEM"))
    """PEM private key (with tls_cert)."""
    http_port: int | None = None
    """Port of the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions,
    /v1/models, /v1/adapters) beside gRPC, on the same engine and tenants; None = none,
    0 = a free port."""
    metrics_port: int | None = None
    """Prometheus /metrics HTTP port; None = off, 0 = a free port."""
    metrics_host: str | None = None
    """Address of /metrics; None = the same as host."""
    public_metrics: bool = False
    """Serve /metrics to anyone, with the tenant labels summed away. Off: where the server has
    API keys, /metrics asks for an admin's key as a bearer token (Prometheus' authorization
    scrape setting)."""
    max_waiting: int | None = 256
    """Requests that may wait for the engine; more answer RESOURCE_EXHAUSTED."""
    max_upload_bytes: int = field(
        default=64 * 2**20, metadata=flag(name="max_upload_mb", unit=2**20)
    )
    """Largest adapter upload (LoadAdapter files or text)."""
    max_request_bytes: int = field(default=2**20, metadata=flag(name="max_request_kb", unit=2**10))
    """Largest Generate, GenerateStream or Tokenize request (prompt, stop strings...); larger
    ones answer RESOURCE_EXHAUSTED before they are parsed."""
    quota: TenantQuota = field(default_factory=TenantQuota)
    """What one tenant may hold: adapters, adapter bytes, waiting requests."""
    shutdown_grace: float = 10.0
    """Seconds in-flight requests get to finish on shutdown before they are aborted."""
    share_public_prefix_cache: bool = False
    """Let requests of public adapters (loaded by an admin for everyone) share cached KV blocks
    across tenants. Off: each tenant's cached blocks are its own, so that the time to a first
    token reveals nothing about other tenants' prompts."""

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert and --tls-key)")
        if self.max_waiting is not None and self.max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {self.max_waiting}")
        if self.max_upload_bytes < 1:
            raise ValueError(f"max_upload_bytes must be >= 1, got {self.max_upload_bytes}")
        if self.max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {self.max_request_bytes}")

    @property
    def metrics_bind_host(self) -> str:
        """Where ``/metrics`` listens: ``metrics_host``, else the gRPC server's own host."""
        host = self.host if self.metrics_host is None else self.metrics_host
        return host.strip("[]")  # '[::]' is gRPC's spelling; HTTP servers take '::'


@dataclass(frozen=True, slots=True)
class ServerOption:
    """One server option: a field of :class:`ServerConfig` or of its :class:`TenantQuota`."""

    dest: str
    """The flag's name with underscores (``max_upload_mb``): the parsed value's attribute."""
    field: str
    section: str | None
    """``"quota"`` for a field of the tenant quota, else None."""
    annotation: str
    default: Any
    """In the flag's unit (MiB for ``--max-upload-mb``); None where the field's default is
    computed (``--registry-dir``) or a list."""
    help: str
    flag: Flag


@cache
def server_options() -> tuple[ServerOption, ...]:
    """Every server option (the engine's are :func:`prefixserve.config.engine_options`)."""
    options = []
    for cls, section, suffix in ((ServerConfig, None, ""), (TenantQuota, "quota", "_per_tenant")):
        docs = field_docstrings(cls)
        for f in fields(cls):
            if f.name in ("engine", "quota"):
                continue
            spec: Flag = f.metadata.get("flag", Flag())
            dest = (spec.name or f.name) + suffix
            default = None if f.default is MISSING else f.default
            if isinstance(default, int | float) and spec.unit != 1:
                default = default / spec.unit
            help_text = docs.get(f.name, "")
            options.append(
                ServerOption(dest, f.name, section, str(f.type), default, help_text, spec)
            )
    return tuple(options)


def server_config(values: dict[str, Any], engine: EngineConfig) -> ServerConfig:
    """A :class:`ServerConfig` from parsed flag values (``{dest: value}``; a missing dest keeps
    the default). String forms: ``none`` for None, an API keys file path, ``NAME=PATH`` specs."""
    from .tenants import ApiKeys

    top: dict[str, Any] = {}
    quota: dict[str, Any] = {}
    for option in server_options():
        if option.dest not in values:
            continue
        value = values[option.dest]
        if option.field == "api_keys":
            value = ApiKeys() if value == "none" else ApiKeys.load(value)
        elif option.field == "adapters":
            value = [AdapterSpec.parse(a) for a in value or []]
        elif option.field == "registry_dir":
            value = None if value == "none" else value or default_registry_dir()
        elif option.flag.unit != 1 and value is not None:
            value = int(value * option.flag.unit)
        (quota if option.section == "quota" else top)[option.field] = value
    return ServerConfig(engine=engine, quota=TenantQuota(**quota), **top)
