"""The package's optional extras, and the error that names the one a chosen feature needs.

Nothing imports an extra at module level: each is imported where its feature is chosen, after
:func:`require` has checked it, so ``pip install prefixserve`` alone serves on a CPU.
"""

from __future__ import annotations

import importlib

EXTRAS: dict[str, str] = {
    "triton": "triton",
    "quant": "bitsandbytes",
    "peft": "peft",
    "ray": "ray.serve",
    "http": "fastapi",
    "structured": "xgrammar",
}
"""Extra name -> the module it installs."""


class MissingExtraError(ImportError):
    """A feature was chosen whose optional dependency is not installed."""


def require(extra: str, feature: str) -> None:
    """Import the module of ``extra``, or raise :class:`MissingExtraError` saying that
    ``feature`` needs it and how to install it."""
    module = EXTRAS[extra]
    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(
            f"{feature} needs the optional dependency {module!r}, which is not installed "
            f"({exc}); install it with: pip install 'prefixserve[{extra}]'"
        ) from exc
