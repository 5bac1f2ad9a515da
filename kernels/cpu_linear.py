"""The native CPU linear ops (``csrc/cpu_linear*.cpp``): ``F.linear`` with kernels of our own.

    y = linear(x, weight, bias, default_isa())      # x [..., K], weight [N, K] -> y [..., N]
    panels = pack_weight(weight)                    # once, at load
    y = linear_packed(x, panels, bias, N, default_isa())

A step that decodes one request, or prefills a short prompt, multiplies a handful of rows by
every weight matrix of the model: it is bound by reading the weights from memory once, and
ATen's GEMM reads them at well under the memory bandwidth there.

``linear`` streams nn.Linear's own weight ([N, K], nothing repacked or copied) once per call,
split over torch's intra-op threads by output feature (``csrc/cpu_linear_kernel.cpp``):
register tiles of dot products along K, and on AVX-512 from 12 rows tiles of outer products
with the rows packed transposed. fp32 inputs of up to :data:`MAX_SKINNY_ROWS` rows (leading
dimensions flattened) run that kernel; more rows or other dtypes run ``at::linear``, so the op
is a drop-in for ``F.linear``.

``linear_packed`` runs on the weight packed once as panels of :data:`PANEL` output features
(``csrc/cpu_linear_panels.cpp``): register tiles of rows times panels accumulate outputs in
place, with no lane reductions and no padded rows, for any number of rows (fp32 only). Both ops
are opaque to ``torch.compile`` (fake implementations give their outputs' shapes).

Reference: :func:`torch.nn.functional.linear`.
"""

from __future__ import annotations

import functools

import torch

from .cpu_attention import cpu_isas, default_isa
from .cpu_build import load_cpu_ops

__all__ = [
    "MAX_SKINNY_ROWS",
    "PANEL",
    "cpu_isas",
    "default_isa",
    "linear",
    "linear_packed",
    "load",
    "pack_weight",
]

MAX_SKINNY_ROWS = 64
"""Rows up to which the op runs its own kernel (``kMaxSkinnyRows`` in ``csrc/cpu_linear.h``).
On the default model's 30 layers of linear shapes (``benchmarks/kernels/bench_cpu_linear.py``)
it takes 0.37-0.5x ATen's time from 1 to 38 rows and 0.75-0.85x at 64 on an AVX2 EPYC, where
by 128 rows ATen's GEMM is as fast or faster; on an AVX-512 Zen 5, 0.3-0.6x up to 64 rows."""


@functools.cache
def load() -> None:
    """Build (once per machine and source version) and load the op; raises
    :class:`~prefixserve.kernels.cpu_build.NativeBuildError` where it cannot."""
    load_cpu_ops()
    torch.library.register_fake("prefixserve::linear")(_fake_linear)
    torch.library.register_fake("prefixserve::linear_packed")(_fake_linear_packed)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, isa: str
) -> torch.Tensor:
    """``x [..., K] @ weight[N, K]^T (+ bias [N]) -> [..., N]`` on the CPU in ``x``'s dtype, the
    op loaded (:func:`load`)."""
    return torch.ops.prefixserve.linear(x, weight, bias, isa)


PANEL = 16
"""Output features per panel of a packed weight (``kPanel`` in ``csrc/cpu_linear.h``)."""


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """nn.Linear's ``weight [N, K]`` -> ``panels [ceil(N / PANEL), K, PANEL]`` for
    :func:`linear_packed`: panel ``p`` holds ``weight[PANEL p : PANEL (p + 1)]`` transposed, each
    input's PANEL weights contiguous, zeros past N. A new fp32 tensor (the weight is not kept)."""
    if weight.dim() != 2:
        raise ValueError(f"pack_weight: expected a [N, K] weight, got {tuple(weight.shape)}")
    n, k = weight.shape
    padded = weight.new_zeros(-(-n // PANEL) * PANEL, k, dtype=torch.float32)
    padded[:n] = weight
    return padded.view(len(padded) // PANEL, PANEL, k).transpose(1, 2).contiguous()


def linear_packed(
    x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, out_features: int, isa: str
) -> torch.Tensor:
    """``x [..., K] @ W^T (+ bias [N]) -> [..., N]`` in fp32 on the CPU, ``W [N, K]`` given as
    ``panels = pack_weight(W)`` and ``N = out_features``; the op loaded (:func:`load`)."""
    return torch.ops.prefixserve.linear_packed(x, panels, bias, out_features, isa)


def _fake_linear_packed(
    x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, out_features: int, isa: str
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def _fake_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, isa: str
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
