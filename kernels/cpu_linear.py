"""The native CPU linear op (``csrc/cpu_linear*.cpp``): ``F.linear`` in fp32 or bf16 on a weight
packed once as panels.

    load(cache_dir)                                         # once per process
    panels = pack_weight(weight)                            # once, at load: weight [N, K]
    y = linear_packed(x, panels, bias, N, default_isa())    # x [..., K] -> y [..., N]

A step that decodes a few requests, or prefills a short prompt, multiplies a handful of rows by
every weight matrix of the model and is bound by reading the weights from memory once; a step
of many rows is bound by the FMA units. ATen's GEMM (MKL) reads the weights at well under the
memory bandwidth in the first case and keeps the FMA units about half busy in the second on the
AMD EPYCs measured here. The op runs on the weight packed once as panels of :data:`PANEL` output
features, each input's weights contiguous: register tiles of rows times two panels accumulate
outer products along K with the outputs in place, so nothing is reduced across lanes and no lane
is a padded row, for any number of rows; threads split the panels (``csrc/cpu_linear_kernel.cpp``,
built per ISA). It is opaque to ``torch.compile`` (a fake implementation gives its output's
shape). ``default_isa`` (:mod:`prefixserve.kernels.cpu_isa`) picks the instruction set;
``benchmarks/kernels/bench_cpu_linear.py`` measures the op against ``F.linear``.

Reference: :func:`torch.nn.functional.linear`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .cpu_build import load_cpu_ops

__all__ = ["PANEL", "linear_packed", "load", "pack_weight"]


def load(cache_dir: Path) -> None:
    """Build (once per machine and source version, into ``cache_dir``) and load the op; raises
    :class:`~prefixserve.kernels.cpu_build.NativeBuildError` where it cannot."""
    load_cpu_ops(cache_dir)
    _register_fake()


@functools.cache
def _register_fake() -> None:
    torch.library.register_fake("prefixserve::linear_packed")(_fake_linear_packed)
    torch.library.register_autograd("prefixserve::linear_packed", _no_backward)


PANEL = 16
"""Output features per panel of a packed weight (``kPanel`` in ``csrc/cpu_linear.h``)."""


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """nn.Linear's ``weight [N, K]`` -> its panels for :func:`linear_packed`, a new tensor (the
    weight is not kept), in the weight's dtype: float32 (anything else but bfloat16 becomes
    float32) or bfloat16.

    fp32: ``[ceil(N / PANEL), K, PANEL]``; panel ``p`` holds ``weight[PANEL p : PANEL (p + 1)]``
    transposed, each input's PANEL weights contiguous, zeros past N.

    bf16: ``[ceil(N / PANEL), ceil(K / 2), PANEL, 2]``; the same panels with the weights of
    inputs ``2i`` and ``2i + 1`` interleaved per feature (zeros past N and K): the pair layout
    of ``vdpbf16ps`` and of AMX's B tiles."""
    if weight.dim() != 2:
        raise ValueError(f"pack_weight: expected a [N, K] weight, got {tuple(weight.shape)}")
    n, k = weight.shape
    dtype = torch.bfloat16 if weight.dtype == torch.bfloat16 else torch.float32
    even_k = k + k % 2 if dtype == torch.bfloat16 else k
    padded = weight.new_zeros(-(-n // PANEL) * PANEL, even_k, dtype=dtype)
    padded[:n, :k] = weight.detach()
    panels = padded.view(len(padded) // PANEL, PANEL, even_k).transpose(1, 2)
    if dtype == torch.float32:
        return panels.contiguous()
    # [P, K, 16] -> [P, K / 2, 2, 16] -> [P, K / 2, 16, 2]
    return panels.reshape(len(panels), even_k // 2, 2, PANEL).transpose(2, 3).contiguous()


def linear_packed(
    x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, out_features: int, isa: str
) -> torch.Tensor:
    """``x [..., K] @ W^T (+ bias [N]) -> [..., N]`` on the CPU, ``W [N, K]`` given as
    ``panels = pack_weight(W)`` and ``N = out_features``; ``x``, the panels and the bias all
    float32 or all bfloat16 (fp32 accumulation, rounded to bf16 once); the op loaded
    (:func:`load`)."""
    return torch.ops.prefixserve.linear_packed(x, panels, bias, out_features, isa)


def _fake_linear_packed(
    x: torch.Tensor, panels: torch.Tensor, bias: torch.Tensor | None, out_features: int, isa: str
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], out_features))


def _no_backward(ctx: object, grad: torch.Tensor) -> None:
    raise RuntimeError("prefixserve::linear_packed is for inference: it has no backward")
