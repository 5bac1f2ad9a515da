"""The native CPU linear op (``csrc/cpu_linear*.cpp``): ``F.linear`` with a kernel of our own for
few rows.

    y = linear(x, weight, bias, default_isa())      # x [..., K], weight [N, K] -> y [..., N]

A step that decodes one request, or prefills a short prompt, multiplies a handful of rows by
every weight matrix of the model: it is bound by reading the weights from memory once, and
ATen's GEMM reads them at well under the memory bandwidth there. The op streams nn.Linear's own
weight ([N, K], nothing repacked or copied) once per call with MR x NR register tiles along K,
split over torch's intra-op threads by output feature. fp32 inputs of up to
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
"""Rows up to which the op runs its own kernel (``kMaxSkinnyRows`` in ``csrc/cpu_linear.h``):
on the default model's 30 layers of linear shapes it takes 0.37-0.5x ATen's time from 1 to 38
rows and 0.75-0.85x at 64; by 128 rows ATen's GEMM is as fast or faster."""


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
