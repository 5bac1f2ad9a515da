"""Which attention backend an engine runs: the factory, apart from the interface
(:mod:`.attention`) so that the interface imports none of its implementations, and each
implementation is imported only when chosen (the Triton one needs the ``triton`` extra)."""

from __future__ import annotations

from typing import Any

import torch

from .attention import AttentionBackend, AttentionShape, TorchBackend
from .config import env_attention_backend, triton_interpreted
from .extras import require


def select_backend(
    requested: str | None, device: torch.device, shape: AttentionShape
) -> AttentionBackend[Any]:
    """``requested`` or $PREFIXSERVE_ATTENTION, else Triton on CUDA and on CPU the native op
    (``cpu``; the PyTorch reference, with one warning, where it cannot be built). Triton on CPU
    runs only under the Triton interpreter (slow; for tests), which the user turns on with
    ``TRITON_INTERPRET=1`` before starting."""
    name = requested or env_attention_backend()
    if name is None and device.type == "cuda":
        name = "triton"
    if name is None or name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"the 'cpu' attention backend runs on the CPU, not on {device}")
        from .cpu_backend import NativeCPUBackend, native_or_reference

        return native_or_reference(shape) if name is None else NativeCPUBackend(shape)
    if name == "torch":
        return TorchBackend(shape, device)
    if name == "triton":
        if device.type == "cpu" and not triton_interpreted():
            raise ValueError(
                "the Triton backend runs on CUDA devices; on a CPU it runs only under the Triton "
                "interpreter (slow, for tests): set TRITON_INTERPRET=1 in the environment before "
                "starting, or use the 'torch' backend"
            )
        require("triton", "the triton attention backend")
        from .triton_backend import TritonBackend

        return TritonBackend(shape, device)
    raise ValueError(f"PREFIXSERVE_ATTENTION must be 'cpu', 'torch' or 'triton', got {name!r}")
