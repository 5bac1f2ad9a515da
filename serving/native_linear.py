"""The model's linear layers on prefixserve's native CPU linear op.

A decode step of one request, or the prefill of a short prompt, multiplies a few rows by every
weight of the model and is bound by reading them; ATen's GEMM reads them at well under the
memory bandwidth there, the native op (:mod:`prefixserve.kernels.cpu_linear`) at close to it.
:func:`use_native_linears` turns each plain fp32 ``nn.Linear`` of a CPU model into a
:class:`NativeLinear` in place: the same module with the same parameters (tied weights stay
tied, nothing is copied), whose forward calls the op. Eager and compiled forwards both use it;
under ``torch.compile`` the op is opaque, so Inductor fuses around it.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from .kernels import cpu_linear
from .kernels.cpu_build import NativeBuildError

logger = logging.getLogger(__name__)


class NativeLinear(nn.Linear):
    """An ``nn.Linear`` whose forward runs :func:`prefixserve.kernels.cpu_linear.linear`."""

    isa: str
    """The instruction set of the op's kernel."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return cpu_linear.linear(input, self.weight, self.bias, self.isa)


def use_native_linears(model: nn.Module) -> int:
    """Run ``model``'s plain fp32 CPU ``nn.Linear`` layers on the native op; returns how many.

    Nothing changes (0) where the op cannot be built or loaded (logged once per process), or
    where this CPU runs only the baseline instruction set (the op's kernel is vectorized for
    AVX2 and AVX-512; elsewhere ATen's GEMM is the better choice). Subclasses of ``nn.Linear``
    (bitsandbytes' quantized layers, adapters' wrappers) are left alone."""
    try:
        cpu_linear.load()
        isa = cpu_linear.default_isa()
    except NativeBuildError as e:
        _warn_unavailable(str(e))
        return 0
    if isa == "baseline":
        return 0
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (
            type(module) is nn.Linear
            and isinstance(weight, torch.Tensor)
            and weight.device.type == "cpu"
            and weight.dtype == torch.float32
        ):
            module.__class__ = NativeLinear
            module.isa = isa
            count += 1
    return count


@functools.cache
def _warn_unavailable(reason: str) -> None:
    logger.warning(
        "prefixserve: linear layers run on ATen (the native op is unavailable: %s)", reason
    )
