"""The engine as the front end sees it: one interface for one process's engine and for a fleet.

The gRPC services, the metrics and the adapter transactions talk to an :class:`EngineClient`:
:class:`~prefixserve.async_engine.AsyncEngine` (an engine stepped by a thread of this process) or
:class:`~prefixserve.scaleout.fleet.ReplicaFleet` (engine replicas on Ray Serve). mypy checks
that both implement it. Nothing here hands a caller the engine itself: adapter changes are
coroutines that run where the engine's state lives.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Protocol

from .types import LOCAL, Origin

if TYPE_CHECKING:
    from .engine import EngineDescription, EngineStats, Prompt
    from .request import RequestOutput
    from .sampling_params import SamplingParams
    from .types import AdapterInfo


class EngineClient(Protocol):
    """What the front end may ask of an engine. A request is aborted by closing (or leaving)
    its ``generate`` stream; its blocks are freed at the engine's next step boundary."""

    @property
    def description(self) -> EngineDescription:
        """What the engine serves (fixed once it runs)."""
        ...

    @property
    def is_running(self) -> bool:
        """Whether it takes requests (False once it shuts down or its loop died)."""
        ...

    def stats(self) -> EngineStats | None:
        """The latest published snapshot of queues, memory and counters (any thread), or None
        where there is no single engine (a fleet reports per replica)."""
        ...

    def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        adapter: str | None = None,
        origin: Origin = LOCAL,
    ) -> AsyncGenerator[RequestOutput, None]:
        """The request's outputs as tokens arrive; the last one has ``finished``. ``origin``:
        who sent it (tenant, weight, priority, cache scope). Raises ``ValueError`` for invalid
        input, ``QueueFullError``, ``EngineDeadError``."""
        ...

    async def load_adapter(
        self,
        name: str,
        path: str | None = None,
        text: str | None = None,
        max_bytes: int | None = None,
    ) -> AdapterInfo:
        """Read, validate and register an adapter from a server-side ``path`` or ``text``
        (raises ``AdapterError`` naming what is wrong, and then changes nothing;
        ``AdapterOverBudgetError`` if it would hold more than ``max_bytes`` of host tensors and
        prefix KV)."""
        ...

    async def unload_adapter(self, name: str, missing_ok: bool = False) -> bool:
        """Unload ``name``: True if at once, False once its last request ends."""
        ...

    async def adapter_info(self, names: list[str]) -> list[AdapterInfo | None]:
        """What the engine holds of each adapter (None where it is not loaded)."""
        ...

    async def shutdown(self, timeout: float | None = None) -> None:
        """Take no more requests; let running ones finish for up to ``timeout`` seconds."""
        ...
