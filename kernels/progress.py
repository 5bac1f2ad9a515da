"""Long one-time work (building the native ops here; preparing the default model, compiling the
forward and capturing CUDA graphs in the engine): progress on stderr whether or not logging is
configured, and one process at a time per machine through an exclusive file lock.

It lives in ``kernels/`` so that the native build can use it without importing the engine
package above; the engine imports it from here too.
"""

from __future__ import annotations

import contextlib
import fcntl
import sys
from collections.abc import Iterator
from pathlib import Path


def say(message: str) -> None:
    """``prefixserve: message`` on stderr, flushed."""
    print(f"prefixserve: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def exclusive_lock(path: Path, waiting_for: str) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (released by the kernel if this process dies); if
    another process holds it, says "waiting for another process that is ``waiting_for``"."""
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another process that is {waiting_for} ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
