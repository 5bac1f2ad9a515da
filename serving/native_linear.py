"""The model's linear layers on prefixserve's native CPU linear op.

A decode step of one request, or the prefill of a short prompt, multiplies a few rows by every
weight of the model and is bound by reading them; ATen's GEMM reads them at well under the
memory bandwidth there, and with many rows keeps the FMA units about half busy (on the AMD
EPYCs measured here). The native op (:mod:`prefixserve.kernels.cpu_linear`) runs on weights
packed once as panels, faster than ATen's GEMM at any number of rows (on the default model's
layers at 2 threads, Zen 5: 0.29-0.44x ATen's time from 1 to 2,432 rows with AVX-512, 0.31-0.84x
with AVX2; ``benchmarks/kernels/bench_cpu_linear.py``).

:func:`use_native_linears` turns each plain fp32 ``nn.Linear`` of a CPU model (and each bf16
one, where the CPU has a bf16 dot product) into a
:class:`PackedLinear` in place. Its ``weight`` parameter is replaced by the ``panels`` buffer
(the same size, N rounded up to 16), and the weight's pages, where they map the checkpoint's
file, are given back at once; a weight tied to another module's (the default model's LM head
is its embedding) stays that module's and the panels are a copy. Eager and compiled forwards
both use it; under ``torch.compile`` the op is opaque, so Inductor fuses around it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .config import cache_root, env_cpu_isa
from .kernels import cpu_linear
from .kernels.cpu_build import NativeBuildError
from .kernels.cpu_isa import BF16_ISAS, default_isa

logger = logging.getLogger(__name__)


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is packed as the buffer ``panels``
    (:func:`~prefixserve.kernels.cpu_linear.pack_weight`: fp32 or bf16), and whose forward runs
    :func:`~prefixserve.kernels.cpu_linear.linear_packed`.

    ``weight`` is the parameter where it is tied to another module and so kept; elsewhere a
    ``[N, K]`` tensor of the weight's dtype on the meta device, so that modeling code reading
    its shape or dtype keeps working and anything reading its values fails loudly."""

    isa: str
    """The instruction set of the op's kernel."""
    panels: torch.Tensor

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        kept = self._parameters.get("weight")
        return kept if kept is not None else self.__dict__["_weight_meta"]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return cpu_linear.linear_packed(input, self.panels, self.bias, self.out_features, self.isa)


def native_dtypes(isa: str) -> tuple[torch.dtype, ...]:
    """The weight dtypes whose linears run on the native op with the build for ``isa``: bf16
    only with a bf16 dot product (:data:`~prefixserve.kernels.cpu_isa.BF16_ISAS`), where the
    op beats oneDNN's bf16 GEMM up to 64 rows (decode steps) and is 7-15% slower than its
    prepacked GEMM from 256 rows on, which would need a second copy of every weight
    (``benchmarks/kernels/bench_cpu_linear.py --dtype bfloat16``). Without one, the op widens
    bf16 to fp32 and loses to oneDNN from a few rows on, so bf16 linears stay ATen's there."""
    if isa == "baseline":  # the kernel is vectorized for AVX2 and AVX-512
        return ()
    return (torch.float32, torch.bfloat16) if isa in BF16_ISAS else (torch.float32,)


def use_native_linears(model: nn.Module) -> int:
    """Run ``model``'s plain CPU ``nn.Linear`` layers on the native op; returns how many.

    fp32 layers run on it wherever the CPU has AVX2, bf16 ones where it has a bf16 dot product
    (:func:`native_dtypes`). Nothing changes (0) where the op cannot be built or loaded (logged
    once per process), or where this CPU runs only the baseline instruction set (ATen's GEMM is
    the better choice there). Subclasses of ``nn.Linear`` (bitsandbytes' quantized layers,
    adapters' wrappers) are left alone."""
    try:
        cpu_linear.load(cache_root())
        isa = default_isa(env_cpu_isa())
    except NativeBuildError as e:
        _warn_unavailable(str(e))
        return 0
    dtypes = native_dtypes(isa)
    if not dtypes:
        return 0
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    mappings = _file_mappings() if hasattr(mmap, "MADV_DONTNEED") else []
    spans = [(id(t), _span(t)) for t in (*model.parameters(), *model.buffers())]
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (
            type(module) is nn.Linear
            and "forward" not in module.__dict__  # hooks of accelerate & co. call nn.Linear's
            and isinstance(weight, torch.Tensor)
            and weight.device.type == "cpu"
            and weight.dtype in dtypes
        ):
            panels = cpu_linear.pack_weight(weight)
            if owners[id(weight)] == 1:  # not tied: the panels replace it
                others = [span for owner, span in spans if owner != id(weight)]
                _drop_file_pages(weight, mappings, others)
                del module.weight
                module.__dict__["_weight_meta"] = torch.empty(
                    weight.shape, device="meta", dtype=weight.dtype
                )
            module.register_buffer("panels", panels, persistent=False)
            module.__class__ = PackedLinear
            module.isa = isa
            count += 1
    return count


def _file_mappings() -> list[tuple[int, int]]:
    """Address ranges of this process mapped from files (``/proc/self/maps``; none elsewhere)."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            lo, hi = fields[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """The bytes ``[start, end)`` a tensor's storage covers."""
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.data_ptr() + storage.nbytes()


def _drop_file_pages(
    weight: torch.Tensor, mappings: list[tuple[int, int]], others: list[tuple[int, int]]
) -> None:
    """Give back the pages of a weight just packed, where they map the checkpoint's file.

    transformers maps a safetensors checkpoint into memory and the weights view that mapping,
    which stays as long as any tensor views it. Packing reads a weight, so its pages become
    resident, and they would stay beside the panels: the process would hold the model twice
    until the last weight is packed, and its untied weights twice after. Here only pages wholly
    inside this contiguous weight's bytes are dropped, only in a file mapping (memory of the
    allocator is never touched), and only where none of ``others`` (the byte spans of the
    model's other parameters and buffers) shares them: whatever reads them again (nothing
    should) reads the file."""
    if not weight.is_contiguous():  # its bytes would not be one range of its own
        return
    start = weight.data_ptr()
    end = start + weight.numel() * weight.element_size()
    if not any(lo <= start and end <= hi for lo, hi in mappings):
        return
    lo, hi = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if hi <= lo or any(s < hi and lo < e for s, e in others):
        return
    _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), mmap.MADV_DONTNEED)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


@functools.cache
def _warn_unavailable(reason: str) -> None:
    logger.warning(
        "prefixserve: linear layers run on ATen (the native op is unavailable: %s)", reason
    )
