"""The native CPU linear op (``csrc/cpu_linear*.cpp``): ``F.linear`` with a kernel of our own for
few rows.

    y = linear(x, weight, bias, default_isa())      # x [..., K], weight [N, K] -> y [..., N]

A step that decodes one request, or prefills a short prompt, multiplies a handful of rows by
every weight matrix of the model: it is bound by reading the weights from memory once, and
ATen's GEMM reads them at well under the memory bandwidth there. The op streams nn.Linear's own
weight ([N, K], nothing repacked or copied) once per call, split over torch's intra-op threads
by output feature: register tiles of dot products along K for few rows, and on AVX-512 from 12
rows tiles of outer products with the rows packed transposed (``csrc/cpu_linear_kernel.cpp``). fp32 inputs of up to
:data:`MAX_SKINNY_ROWS` rows (leading dimensions flattened) run that kernel; more rows or other
dtypes run ``at::linear``, so the op is a drop-in for ``F.linear``. It is opaque to
``torch.compile`` (a fake implementation gives its output's shape).

Reference: :func:`torch.nn.functional.linear`.
"""

from __future__ import annotations

import functools

import torch

from .cpu_attention import cpu_isas, default_isa
from .cpu_build import load_cpu_ops

__all__ = ["MAX_SKINNY_ROWS", "cpu_isas", "default_isa", "linear", "load"]

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


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, isa: str
) -> torch.Tensor:
    """``x [..., K] @ weight[N, K]^T (+ bias [N]) -> [..., N]`` on the CPU in ``x``'s dtype, the
    op loaded (:func:`load`)."""
    return torch.ops.prefixserve.linear(x, weight, bias, isa)


def _fake_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, isa: str
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))
