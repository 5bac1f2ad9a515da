"""``AsyncEngine``: the synchronous engine stepped by a background thread, for asyncio servers.

The engine belongs to one thread. Callers on the event loop send it commands (add, abort)
through a queue and receive each request's outputs on an ``asyncio.Queue``; the event loop never
waits on a forward pass. A consumer that stops iterating (cancelled, deadline, disconnect)
aborts its request, which frees its blocks at the next step boundary.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from .engine import EngineDescription, EngineStats, LLMEngine, Prompt, StepError
from .request import RequestOutput
from .sampling_params import SamplingParams
from .types import LOCAL, AdapterInfo, Origin

logger = logging.getLogger(__name__)
T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shut down or crashed) and takes no more requests."""


class QueueFullError(RuntimeError):
    """Too many requests are waiting; try again later."""


class AsyncEngine:
    """Runs ``engine.step()`` in a background thread and streams outputs to coroutines."""

    def __init__(
        self,
        engine: LLMEngine,
        max_waiting: int | None = None,
        max_waiting_per_tenant: int | None = None,
    ) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self.max_waiting_per_tenant = max_waiting_per_tenant
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self._error: BaseException | None = None
        self._description = engine.describe()
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._loop, name="prefixserve-engine", daemon=True)
        self._thread.start()

    # -- caller side (event loop) ---------------------------------------------------------------

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        adapter: str | None = None,
        origin: Origin = LOCAL,
    ) -> AsyncGenerator[RequestOutput, None]:
        """Queue a request and yield its outputs as tokens arrive (the last has ``finished``).

        ``origin``: who sent it (tenant, weight, priority, cache scope). Raises ``ValueError``
        for invalid input, :class:`QueueFullError` when the queue (or the tenant's share of it)
        is full, and :class:`EngineDeadError` if the engine stopped.
        Leaving the loop early aborts it. A caller that falls behind gets one output for all
        the steps that came meanwhile (their deltas joined), as vLLM's output collector does:
        a slow stream costs fewer messages, not more.
        """
        request_id = request_id or f"async-{next(self._ids)}"
        if params is not None and params.constraint is not None:
            # Compiled here, off the engine's thread (then cached): a schema never holds a step.
            await self.engine.grammars.compile_async(params.constraint)
        loop = asyncio.get_running_loop()
        stream: asyncio.Queue[Any] = asyncio.Queue()

        def add() -> None:
            waiting = self.engine.num_waiting()
            if self.max_waiting is not None and waiting >= self.max_waiting:
                raise QueueFullError(
                    f"{waiting} requests are already waiting (limit {self.max_waiting}); "
                    "retry later"
                )
            limit = self.max_waiting_per_tenant
            if limit is not None and (mine := self.engine.num_waiting(origin.tenant)) >= limit:
                raise QueueFullError(
                    f"{mine} of your requests are already waiting, the most one tenant may "
                    f"queue (limit {limit}, server option --max-waiting-per-tenant); retry later"
                )
            self.engine.add_request(
                prompt,
                params,
                request_id,
                adapter=adapter,
                **origin.engine_kwargs(),  # type: ignore[arg-type]
            )
            self._streams[request_id] = (loop, stream)

        finished = False
        try:
            await self._call(add)
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                item, error = _coalesce(item, stream)
                finished = item.finished
                yield item
                if error is not None:
                    raise error
                if finished:
                    return
        finally:
            if not finished:  # commands run in order: this abort follows the add, if it ran
                self._submit(lambda: self._abort(request_id))

    def stats(self) -> EngineStats:
        """The engine's latest snapshot (published by its thread after every step); safe to
        call from any thread."""
        return self._stats

    async def adapter_info(self, names: list[str]) -> list[AdapterInfo | None]:
        """What the engine holds of each adapter in ``names`` (None if not loaded)."""
        return await self._call(lambda: [self.engine.adapter_info(name) for name in names])

    async def load_adapter(
        self,
        name: str,
        path: str | None = None,
        text: str | None = None,
        max_bytes: int | None = None,
    ) -> AdapterInfo:
        """Read and validate the adapter in a worker thread (reading megabytes never holds up a
        step), then register it on the engine's thread between steps; refused
        (``AdapterOverBudgetError``) before it is registered if it would hold more than
        ``max_bytes``."""
        adapter = await asyncio.to_thread(self.engine.read_adapter, name, path, text)
        self.engine.check_budget(adapter, max_bytes)
        return await self._call(lambda: self.engine.add_adapter(adapter))

    async def check_adapter(
        self, name: str, path: str | None = None, text: str | None = None
    ) -> AdapterInfo:
        """What loading the adapter would hold (its blocks checked against the pool), without
        keeping it. Raises ``AdapterError`` naming the problem."""
        adapter = await asyncio.to_thread(self.engine.read_adapter, name, path, text)

        def trial() -> AdapterInfo:
            info = self.engine.add_adapter(adapter)
            self.engine.unload_adapter(name)
            return info

        return await self._call(trial)

    async def unload_adapter(self, name: str, missing_ok: bool = False) -> bool:
        """Unload ``name``: True if at once, False once its last request ends."""
        return await self._call(lambda: self.engine.unload_adapter(name, missing_ok=missing_ok))

    async def inspect(self, read: Callable[[LLMEngine], T]) -> T:
        """Diagnostics (benchmarks, tests), not part of :class:`EngineClient`: ``read(engine)``
        on the engine's thread between steps. ``read`` must only read."""
        return await self._call(lambda: read(self.engine))

    async def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with an output whose finish reason is 'abort'."""
        await self._call(lambda: self._abort(request_id))

    async def shutdown(self, timeout: float | None = None) -> None:
        """Let running requests finish for up to ``timeout`` seconds, abort the rest, stop."""
        if timeout:
            deadline = asyncio.get_running_loop().time() + timeout
            while self._has_work() and self._thread.is_alive():
                if asyncio.get_running_loop().time() >= deadline:
                    break
                await asyncio.sleep(0.05)
        if self._thread.is_alive():
            await self._call(self._abort_all)
        self._stopping.set()
        self._commands.put((lambda: None, Future()))
        await asyncio.to_thread(self._thread.join)
        self._fail_pending_commands()

    def _has_work(self) -> bool:
        """From the published snapshot: the engine's own state belongs to its thread."""
        snapshot = self._stats
        return snapshot.waiting + snapshot.running > 0

    @property
    def description(self) -> EngineDescription:
        return self._description

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.wrap_future(self._submit(fn))

    def _submit(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        if not self.is_running:
            future.set_exception(EngineDeadError(self._dead_reason()))
            return future
        self._commands.put((fn, future))
        if not self._thread.is_alive():  # the loop ended between the check and the put
            self._fail_pending_commands()
        return future

    def _dead_reason(self) -> str:
        if self._error is not None:
            return f"the engine stopped after an internal error: {self._error!r}"
        return "the engine is shut down"

    # -- engine side (background thread) --------------------------------------------------------

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set():
                idle = not self.engine.has_unfinished_requests()
                self._run_commands(block=idle)
                if self.engine.has_unfinished_requests():
                    self._step()
                self._stats = self.engine.stats()
        except BaseException as e:
            logger.exception("engine loop crashed")
            self._error = e
        finally:
            self._stopping.set()
            self._close()

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except StepError as e:  # those requests are finished; the others go on
            logger.error("%s", e, exc_info=e.cause)
            for request_id in e.request_ids:
                self._push(request_id, e)
            return
        for out in outputs:
            self._push(out.request_id, out)

    def _close(self) -> None:
        """The loop ended: abort what is left, end every open stream, refuse queued commands."""
        try:
            self.engine.abort_all()
        except Exception:
            logger.exception("could not abort the requests left while closing")
        for request_id in list(self._streams):
            self._push(request_id, EngineDeadError(self._dead_reason()))
        self._fail_pending_commands()

    def _run_commands(self, block: bool) -> None:
        try:
            fn, future = self._commands.get(timeout=0.1) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            if self._stopping.is_set():
                if future.set_running_or_notify_cancel():
                    future.set_exception(EngineDeadError(self._dead_reason()))
            elif future.set_running_or_notify_cancel():
                try:
                    result = fn()
                except Exception as e:
                    future.set_exception(e)
                else:
                    # Published before the caller resumes: whoever awaited a command (an add,
                    # say) reads a snapshot that includes it.
                    self._stats = self.engine.stats()
                    future.set_result(result)
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return

    def _fail_pending_commands(self) -> None:
        while True:
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                return
            if future.set_running_or_notify_cancel():
                future.set_exception(EngineDeadError(self._dead_reason()))

    def _push(self, request_id: str, item: Any) -> None:
        entry = self._streams.get(request_id)
        if entry is None:
            return
        if isinstance(item, BaseException) or item.finished:
            del self._streams[request_id]
        loop, stream = entry
        try:
            loop.call_soon_threadsafe(stream.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            self._streams.pop(request_id, None)
            self.engine.abort(request_id)

    def _abort(self, request_id: str) -> None:
        out = self.engine.abort(request_id)
        if out is not None:
            self._push(request_id, out)

    def _abort_all(self) -> None:
        for out in self.engine.abort_all():
            self._push(out.request_id, out)


def _coalesce(
    item: RequestOutput, stream: asyncio.Queue[Any]
) -> tuple[RequestOutput, BaseException | None]:
    """``item`` joined with the outputs already queued behind it (each cumulative, so the
    latest stands for all, with the deltas concatenated); an error queued among them comes
    back second, to raise once the output before it is delivered."""
    while not item.finished and not stream.empty():
        later = stream.get_nowait()
        if isinstance(later, BaseException):
            return item, later
        item = dataclasses.replace(
            later,
            delta_text=item.delta_text + later.delta_text,
            delta_token_ids=[*item.delta_token_ids, *later.delta_token_ids],
        )
    return item, None
