"""What the front end and the engine replicas send each other through Ray.

A request goes to a replica as a :class:`ReplicaJob`; the replica answers with one
:class:`Accepted` and then the engine's outputs. Outputs before the last carry only their own
step (:func:`step_only`), so a long answer costs O(tokens) on the wire, not O(tokens^2); the front
end rebuilds the cumulative fields (:class:`OutputAssembler`).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..engine import EngineStats, Prompt
from ..request import ListPrefix, RequestOutput
from ..sampler import TokenLogprobs
from ..sampling_params import SamplingParams
from ..server.registry import RECORD_FILE, AdapterRecord
from ..types import Origin

NOT_IN_REGISTRY = "cmdline"
"""Version of an adapter that has no registry folder (given on the server's command line)."""
FLEET_MARKER = ".prefixserve-fleet"
"""A file the front end writes into the registry, which each replica must read back."""


def adapter_version(created: float) -> str:
    """A registry adapter's version: its load time in microseconds, in hex. A name that is
    unloaded and loaded again gets a new version, so replicas never serve the old files."""
    return format(round(created * 1e6), "x")


def registered_version(folder: Path) -> str | None:
    """The version the registry records in ``folder``; None if it holds no adapter any more.
    Raises ``OSError`` or ``ValueError`` if the record cannot be read (proof of nothing)."""
    try:
        record = json.loads((folder / RECORD_FILE).read_text())
    except FileNotFoundError:
        return None
    return adapter_version(float(record["created"]))


def mark_registry(root: Path) -> str:
    """Write a fresh token into the registry ``root`` (see :func:`check_registry`)."""
    token = uuid.uuid4().hex
    (root / FLEET_MARKER).write_text(token)
    return token


def check_registry(root: str, token: str) -> None:
    """Fail unless this node sees the front end's registry: replicas load adapters from it."""
    try:
        seen = (Path(root) / FLEET_MARKER).read_text()
    except OSError:
        seen = None
    if seen != token:
        raise RuntimeError(
            f"the adapter registry {root} is not the front end's on this node: give "
            "--registry-dir a directory on storage that every node of the Ray cluster mounts "
            "at the same path"
        )


@dataclass(frozen=True, slots=True)
class AdapterRef:
    """Where replicas find one version of an adapter."""

    model_id: str
    """``ENGINE_NAME@VERSION``: Ray Serve's multiplexed model id, and the key replicas keep it
    under."""
    path: str
    """Its registry folder (shared storage), or the directory it was given as on the command
    line."""
    display: str
    """Its name as its tenant knows it (for messages)."""
    in_registry: bool
    """Whether ``path`` is a registry folder (which disappears when it is unloaded)."""

    @classmethod
    def of(cls, record: AdapterRecord, folder: Path | str) -> AdapterRef:
        version = adapter_version(record.created) if record.persistent else NOT_IN_REGISTRY
        return cls(f"{record.engine_name}@{version}", str(folder), record.name, record.persistent)

    @property
    def version(self) -> str:
        return self.model_id.rpartition("@")[2]


@dataclass(frozen=True, slots=True)
class ReplicaJob:
    """One generation request for a replica; the front end has authenticated, tokenized and
    resolved it."""

    prompt: Prompt
    params: SamplingParams
    request_id: str
    origin: Origin
    adapter: AdapterRef | None
    affinity: tuple[str, ...] = ()
    """Hashes of its leading tokens in its cache scope (``router.affinity_keys``): the router
    sends it where requests with the same keys went, to find their cached blocks."""


@dataclass(frozen=True, slots=True)
class Accepted:
    """A replica took a request: its adapter is loaded there and the engine gets it next."""

    replica: str
    stats: EngineStats
    """The replica's engine as the request arrived."""


@dataclass(slots=True)
class ServedOutput(RequestOutput):
    """An engine output on the front end, with the replica that produced it."""

    replica: str = ""


def step_only(out: RequestOutput) -> RequestOutput:
    """``out`` without the cumulative text, token ids and logprobs of earlier steps, unless it
    is the last output, which goes whole (stop strings may have cut its text)."""
    if out.finished:
        return out
    step = len(out.delta_token_ids)
    logprobs = out.logprobs[len(out.logprobs) - step :] if out.logprobs is not None else None
    return dataclasses.replace(out, text="", token_ids=[], logprobs=logprobs)


class OutputAssembler:
    """Turns one request's :func:`step_only` outputs back into cumulative ones."""

    def __init__(self, replica: str) -> None:
        self.replica = replica
        self._text = ""
        self._token_ids: list[int] = []
        self._logprobs: list[TokenLogprobs] = []

    def add(self, step: RequestOutput) -> ServedOutput:
        fields = {f.name: getattr(step, f.name) for f in dataclasses.fields(RequestOutput)}
        if not step.finished:
            self._text += step.delta_text
            self._token_ids += step.delta_token_ids
            self._logprobs += step.logprobs or []
            fields["text"], fields["token_ids"] = self._text, ListPrefix(self._token_ids)
            if step.logprobs is not None:
                fields["logprobs"] = ListPrefix(self._logprobs)
        return ServedOutput(**fields, replica=self.replica)
