"""prefixserve: a serving engine for soft-prompt adapters on one frozen language model.

Names are imported lazily so that ``prefixserve.kernels`` and the client load without
transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .async_engine import AsyncEngine
    from .engine import LLMEngine
    from .llm import LLM
    from .request import RequestOutput
    from .sampling_params import SamplingParams

__all__ = ["LLM", "AsyncEngine", "LLMEngine", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"

_HOMES = {
    "LLM": ".llm",
    "AsyncEngine": ".async_engine",
    "LLMEngine": ".engine",
    "RequestOutput": ".request",
    "SamplingParams": ".sampling_params",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module 'prefixserve' has no attribute {name!r}")
