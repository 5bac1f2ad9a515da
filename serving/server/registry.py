"""Which adapters exist, who owns them, and their files on disk so they survive a restart.

Layout of the registry directory (each adapter in its own folder, written atomically)::

    public/NAME/                       adapters every tenant may use
    tenants/TENANT/NAME/               adapters of one tenant
        registry.json                  {"name", "owner", "source", "kind", "created"}
        adapter_config.json            PEFT adapters: the two files, copied or uploaded
        adapter_model.safetensors
        prefix.txt                     text adapters: the system prompt
    .staging/                          uploads being validated

Only JSON, safetensors and text are written or read; pickled weights are refused. In the engine,
a public adapter is named ``NAME`` and a tenant's ``TENANT/NAME``, so tenants never collide.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from ..text import check_name, shorten
from .errors import AlreadyExistsError, NotFoundError
from .tenants import Tenant

logger = logging.getLogger(__name__)

RECORD_FILE = "registry.json"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TEXT_FILE = "prefix.txt"
PLAIN_SOURCES = ("upload", "text", "command line")
"""Sources that are not a server path (shown to every tenant as they are)."""


@dataclass(slots=True)
class AdapterRecord:
    name: str
    owner: str | None
    """The owning tenant; None for a public adapter."""
    source: str
    """'upload', 'text', the server path it was copied from, or 'command line'."""
    kind: str = ""
    created: float = 0.0
    size_bytes: int = 0
    """Bytes of its files."""
    resident_bytes: int = 0
    """Bytes it holds in the engine: host tensors, and its prefix KV when materialized
    (counted against the owner's quota)."""
    persistent: bool = True
    """False for adapters given on the command line: they are not written to the registry."""

    @property
    def engine_name(self) -> str:
        return self.name if self.owner is None else f"{self.owner}/{self.name}"

    def visible_to(self, tenant: Tenant) -> bool:
        return self.owner is None or self.owner == tenant.name

    def source_for(self, admin: bool) -> str:
        """The source as a caller sees it: server paths are shown to admins only (they tell
        the server's layout), others read 'server path'."""
        if admin or self.source in PLAIN_SOURCES:
            return self.source
        return "server path"


def not_found(name: str) -> NotFoundError:
    # The same words whether the adapter is missing or another tenant's: existence never leaks.
    return NotFoundError(
        f"adapter {shorten(name)} is not loaded for you; "
        "ListAdapters shows the adapters you can use"
    )


class AdapterRegistry:
    """The index of loaded adapters and their persistent copies under ``root``.

    ``root=None`` keeps the copies in a temporary directory removed by :meth:`close`.
    """

    def __init__(self, root: str | Path | None) -> None:
        self.temporary = root is None
        self.root = Path(tempfile.mkdtemp(prefix="prefixserve-registry-") if root is None else root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, AdapterRecord] = {}
        """By engine name."""

    # -- lookup ---------------------------------------------------------------------------------

    def resolve(self, tenant: Tenant, name: str) -> AdapterRecord:
        """The adapter ``name`` as ``tenant`` sees it: its own first, then a public one."""
        own = self.records.get(f"{tenant.name}/{name}")
        if own is not None:
            return own
        public = self.records.get(name)
        if public is not None and "/" not in name:
            return public
        raise not_found(name)

    def owned(self, owner: str, name: str) -> AdapterRecord:
        """Tenant ``owner``'s private adapter ``name`` (for admins acting on any tenant's)."""
        record = self.records.get(f"{owner}/{name}")
        if record is None:
            raise not_found(f"{owner}/{name}")
        return record

    def usage(self, owner: str) -> tuple[int, int]:
        """``(adapters, resident bytes)`` that tenant ``owner`` holds privately."""
        mine = [r for r in list(self.records.values()) if r.owner == owner]
        return len(mine), sum(r.resident_bytes for r in mine)

    def usage_by_tenant(self) -> dict[str, tuple[int, int]]:
        """:meth:`usage` of every tenant that holds private adapters."""
        owners = {r.owner for r in list(self.records.values()) if r.owner is not None}
        return {owner: self.usage(owner) for owner in sorted(owners)}

    def visible(self, tenant: Tenant, all_tenants: bool = False) -> list[AdapterRecord]:
        records = self.records.values()
        return sorted(
            (r for r in records if all_tenants or r.visible_to(tenant)),
            key=lambda r: (r.owner or "", r.name),
        )

    def check_free(self, owner: str | None, name: str) -> None:
        check_name("adapter name", name)
        if owner is not None:
            check_name("tenant", owner)
        taken = self.records.get(name if owner is None else f"{owner}/{name}")
        if taken is None and owner is not None:
            taken = self.records.get(name)  # a tenant's name would shadow a public one
        if taken is not None:
            whose = "a public adapter" if taken.owner is None else "an adapter of yours"
            raise AlreadyExistsError(
                f"{whose} is already named {name!r}; unload it first or pick another name"
            )

    # -- files ----------------------------------------------------------------------------------

    def folder(self, record: AdapterRecord) -> Path:
        """Where a persistent adapter's files are (whether or not they exist yet)."""
        if record.owner is None:
            return self.root / "public" / record.name
        return self.root / "tenants" / record.owner / record.name

    def _new_staging(self) -> Path:
        path = self.root / ".staging" / uuid.uuid4().hex
        path.mkdir(parents=True)
        return path

    def stage_files(self, config_json: bytes, weights: bytes) -> Path:
        """Write an uploaded adapter into a staging folder (validated by the engine next)."""
        staged = self._new_staging()
        try:
            (staged / CONFIG_FILE).write_bytes(config_json)
            (staged / WEIGHTS_FILE).write_bytes(weights)
        except BaseException:
            self.discard(staged)
            raise
        return staged

    @staticmethod
    def staged_bytes(staged: Path) -> int:
        return sum(f.stat().st_size for f in staged.iterdir() if f.is_file())

    def stage_directory(self, source: str | Path) -> Path:
        """Copy a PEFT adapter directory's JSON config and safetensors weights into staging.

        Raises ``ValueError`` (the path shortened) for a path the server cannot use: missing,
        not a directory, too long, unreadable.
        """
        path, where = Path(source), shorten(str(source))
        try:
            self._check_adapter_directory(path, where)
        except OSError as e:
            raise ValueError(f"cannot read the server path {where}: {e.strerror or e}") from None
        staged = self._new_staging()
        try:
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copyfile(path / name, staged / name)
        except OSError as e:
            self.discard(staged)
            raise ValueError(f"cannot copy the adapter at {where}: {e.strerror or e}") from None
        return staged

    @staticmethod
    def _check_adapter_directory(path: Path, where: str) -> None:
        if not path.is_dir():
            raise ValueError(f"{where} is not a directory on the server")
        missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (path / f).is_file()]
        if missing:
            raise ValueError(
                f"{where} lacks {' and '.join(missing)}: adapters are read only as "
                "adapter_config.json + adapter_model.safetensors (re-save pickled weights with "
                "save_pretrained(..., safe_serialization=True))"
            )

    def stage_text(self, text: str) -> Path:
        staged = self._new_staging()
        try:
            (staged / TEXT_FILE).write_text(text, encoding="utf-8")
        except BaseException:
            self.discard(staged)
            raise
        return staged

    def discard(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)

    def add(self, record: AdapterRecord, staged: Path | None) -> None:
        """Index ``record``; a persistent one's staged folder becomes its registry folder."""
        if record.persistent and staged is not None:
            record.created = record.created or time.time()
            (staged / RECORD_FILE).write_text(json.dumps(asdict(record), indent=1))
            folder = self.folder(record)
            folder.parent.mkdir(parents=True, exist_ok=True)
            if folder.exists():  # a leftover that failed to load at startup
                shutil.rmtree(folder)
            staged.rename(folder)
        self.records[record.engine_name] = record

    def remove(self, record: AdapterRecord) -> None:
        self.records.pop(record.engine_name, None)
        if record.persistent:
            shutil.rmtree(self.folder(record), ignore_errors=True)

    def saved(self) -> list[tuple[AdapterRecord, Path]]:
        """Every adapter recorded on disk, with its folder (for reloading after a restart)."""
        shutil.rmtree(self.root / ".staging", ignore_errors=True)
        found = []
        for path in sorted(self.root.glob(f"*/**/{RECORD_FILE}")):
            try:
                data = json.loads(path.read_text())
                record = AdapterRecord(**data)
            except (OSError, ValueError, TypeError) as e:
                logger.warning("skipping %s: not a valid registry record (%s)", path, e)
                continue
            if path.parent != self.folder(record):
                logger.warning("skipping %s: it does not match its folder", path)
                continue
            found.append((record, path.parent))
        return found

    @staticmethod
    def adapter_source(folder: Path) -> dict[str, str]:
        """Keyword arguments for ``LLMEngine.load_adapter`` to load a registry folder."""
        text = folder / TEXT_FILE
        if text.is_file():
            return {"text": text.read_text(encoding="utf-8")}
        return {"path": str(folder)}

    def close(self) -> None:
        if self.temporary:
            shutil.rmtree(self.root, ignore_errors=True)
