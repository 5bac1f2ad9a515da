"""Every Triton kernel configuration the engine can launch, enumerated by the code that launches.

There is no list of configurations here to drift from the kernels: :func:`record_launches` drives
the real planner (:func:`~.triton_plan.plan_step`, :class:`~.triton_graph.GraphPlans`) and the
real launch wrappers (:func:`~.triton_attention.run_planned`, :func:`~.triton_kv_write.write_kv`)
over a set of steps that reaches every branch of the dispatch (prefill / chunked extend,
plain decode with and without KV splits, grouped shared-prefix decode, CUDA-graph decode plans),
with each ``kernel[grid](...)`` call recorded instead of run. Triton's own argument binder then
says which compiled variant each call selects (its constexprs, and the alignment and value
specialization of every other argument), so two calls that would share a binary count once.

    launches = enumerate_launches(MODEL_SHAPES["llama-3-8b"], torch.bfloat16, block_size=16)
    for launch in launches: launch.kernel_name, launch.config, launch.signature ...

Runs on a CPU with ``TRITON_INTERPRET`` unset (the tile sizes planned for a GPU are the ones to
check); no kernel runs and no GPU is needed. :mod:`.gpu_static` compiles what this returns.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from triton.runtime.jit import JITFunction

from .metadata import AttentionMetadata
from .triton_attention import run_planned
from .triton_common import INTERPRET
from .triton_graph import GraphPlans
from .triton_kv_write import launch_write_kv
from .triton_plan import DispatchRule, StepPlan, plan_step


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The attention shape of a model: all the kernels' configurations depend on."""

    name: str
    num_q_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def gqa(self) -> int:
        return self.num_q_heads // self.num_kv_heads


MODEL_SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape("smollm2-135m", 9, 3, 64),  # the embedded default model
        ModelShape("llama-3-8b", 32, 8, 128),
        ModelShape("qwen2.5-7b", 28, 4, 128),
        ModelShape("qwen3-0.6b", 16, 8, 128),
    )
}
"""Real models' shapes (GQA 3 and 7 are not powers of two: their query tiles are padded)."""

GRID_SHAPES: tuple[ModelShape, ...] = tuple(
    ModelShape(f"d{d}-g{g}", 8 * g, 8, d) for d in (64, 96, 128, 256) for g in (1, 4, 8)
)
"""head_dim 64, 96, 128, 256 times GQA 1, 4, 8 (8 kv heads)."""

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BLOCK_SIZES = (16, 32)


@dataclass(slots=True)
class Launch:
    """One compiled variant of one kernel, as Triton's runtime would select it."""

    kernel: JITFunction
    signature: dict[str, str]
    """Argument name -> Triton type (``*bf16``, ``i32``, ``constexpr``...)."""
    constexprs: dict[tuple[int, ...], Any]
    """Argument path -> value, for declared constexprs and value-specialized scalars."""
    attrs: dict[tuple[int, ...], Any]
    """Argument path -> attributes (``tt.divisibility``) from the arguments' alignment."""
    num_warps: int
    num_stages: int
    shapes: list[str] = field(default_factory=list)
    """The model shapes (and dtype, block size) whose steps launch it."""

    @property
    def kernel_name(self) -> str:
        return self.kernel.__name__

    @property
    def config(self) -> str:
        """The variant in words: declared constexprs, value-specialized scalars, warps, stages."""
        declared = [name for name, kind in self.signature.items() if kind == "constexpr"]
        names = list(self.signature)
        values = {names[path[0]]: v for path, v in self.constexprs.items()}
        parts = [self.io_dtype]
        parts += [f"{k}={_short(values[k])}" for k in declared if k in values]
        parts += [f"num_warps={self.num_warps}", f"num_stages={self.num_stages}"]
        return " ".join(parts)

    @property
    def io_dtype(self) -> str:
        """The dtype of the tensors the variant reads and writes (its workspace is fp32)."""
        for name, kind in self.signature.items():
            if kind in _POINTER_DTYPES and not name.startswith("part_"):
                return _POINTER_DTYPES[kind]
        return "fp32"

    def __reduce__(self) -> tuple:
        # Pickled by name (for worker processes): a JITFunction itself does not pickle.
        fields = (self.signature, self.constexprs, self.attrs, self.num_warps, self.num_stages)
        return (_rebuild, (self.kernel.__module__, self.kernel.__name__, *fields, self.shapes))

    @property
    def key(self) -> tuple:
        return (
            self.kernel.__module__,
            self.kernel.__name__,
            tuple(sorted(self.signature.items())),
            tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
            tuple(sorted((k, repr(v)) for k, v in self.attrs.items())),
            self.num_warps,
            self.num_stages,
        )


def _rebuild(module: str, name: str, *fields: Any) -> Launch:
    import importlib

    return Launch(getattr(importlib.import_module(module), name), *fields)


_POINTER_DTYPES = {"*bf16": "bf16", "*fp16": "fp16", "*fp32": "fp32"}


def _short(value: Any) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value)


@dataclass(slots=True)
class _Call:
    kernel: JITFunction
    args: tuple
    kwargs: dict[str, Any]


@contextlib.contextmanager
def record_launches() -> Iterator[list[_Call]]:
    """Within the block, ``kernel[grid](*args, **kwargs)`` of any Triton kernel records the call
    in the yielded list instead of compiling or running it. Process-wide (it patches
    ``JITFunction.run``): for tools, never in a process that serves."""
    calls: list[_Call] = []
    original = JITFunction.run

    def record(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        calls.append(_Call(self, args, kwargs))

    JITFunction.run = record
    try:
        yield calls
    finally:
        JITFunction.run = original


def bind(call: _Call, backend: Any) -> Launch:
    """What Triton's runtime does with a call before compiling it, for ``backend`` (a CUDA
    backend from ``triton.compiler.make_backend``): specialize every argument, then split the
    result into signature, constexprs and attributes."""
    from triton.runtime.jit import create_function_from_signature

    fn = call.kernel
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*call.args, **call.kwargs)
    _, signature, constexprs, attrs = fn._pack_args(
        backend, call.kwargs, bound, specialization, options
    )
    return Launch(
        kernel=fn,
        signature=signature,
        constexprs=constexprs,
        attrs=attrs,
        num_warps=call.kwargs.get("num_warps", 4),
        num_stages=call.kwargs.get("num_stages", 3),
    )


# -- the steps that reach every launch -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Req:
    q_len: int
    own_len: int
    prefix: int  # index into the step's prefixes, -1 for none


def _step(reqs: list[_Req], prefix_lens: list[int], block_size: int) -> AttentionMetadata:
    """Metadata of a step (host tensors): blocks handed out in order, prefixes first."""
    next_block = 0

    def blocks(n_tokens: int) -> list[int]:
        nonlocal next_block
        n = -(-n_tokens // block_size)
        next_block += n
        return list(range(next_block - n, next_block))

    prefix_tables = [blocks(n) for n in prefix_lens]
    own_tables = [blocks(r.own_len) for r in reqs]
    slots = [
        table[i // block_size] * block_size + i % block_size
        for r, table in zip(reqs, own_tables, strict=True)
        for i in range(r.own_len - r.q_len, r.own_len)
    ]

    def padded(tables: list[list[int]]) -> torch.Tensor:
        width = max([len(t) for t in tables] + [1])
        return torch.tensor(
            [t + [0] * (width - len(t)) for t in tables] or [[0]], dtype=torch.int32
        )

    i32 = torch.int32
    return AttentionMetadata(
        cu_q_lens=torch.tensor([0, *itertools.accumulate(r.q_len for r in reqs)], dtype=i32),
        own_lens=torch.tensor([r.own_len for r in reqs], dtype=i32),
        block_tables=padded(own_tables),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        prefix_index=torch.tensor([r.prefix for r in reqs], dtype=i32),
        prefix_lens=torch.tensor(prefix_lens, dtype=i32),
        prefix_block_tables=padded(prefix_tables)[: len(prefix_lens)],
        block_size=block_size,
        max_q_len=max(r.q_len for r in reqs),
    )


_PREFIXES = [37, 300]
_PREFILL = [_Req(5, 5, 0), _Req(3, 41, -1), _Req(1, 9, 1), _Req(70, 70, 1)]
"""A mixed step: a new prompt behind a prefix, a chunk of a longer prompt, a decode, a long one."""
_DECODE = [_Req(1, 12, 0), _Req(1, 600, -1), _Req(1, 3, 1), _Req(1, 40, 1), _Req(1, 17, 0)]
"""A decode step with two prefix groups and a request without a prefix."""
_SHORT_DECODE = [_Req(1, 2, -1), _Req(1, 3, -1)]
"""Block tables one block wide, no prefix."""


def _tokens(num_tokens: int, heads: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``[T, H, D]`` laid out as transformers hands attention its inputs: ``[1, H, T, D]``
    contiguous, transposed."""
    return torch.empty(1, heads, num_tokens, head_dim, dtype=dtype)[0].transpose(0, 1)


def _run_step(plan: StepPlan, shape: ModelShape, dtype: torch.dtype) -> None:
    """The launches of one layer of a step: the KV write, then attention (over a pool just
    large enough for the step's block tables)."""
    meta = plan.meta
    d, hkv = shape.head_dim, shape.num_kv_heads
    num_blocks = 1 + max(int(meta.block_tables.max()), int(meta.prefix_block_tables.max()))
    pool = torch.empty(2, num_blocks, meta.block_size, hkv, d, dtype=dtype)
    k_cache, v_cache = pool[0], pool[1]
    tokens = meta.num_tokens
    launch_write_kv(
        _tokens(tokens, hkv, d, dtype),
        _tokens(tokens, hkv, d, dtype),
        k_cache,
        v_cache,
        meta.slot_mapping,
    )
    run_planned(_tokens(tokens, shape.num_q_heads, d, dtype), k_cache, v_cache, plan, d**-0.5)


def _steps(
    shape: ModelShape, dtype: torch.dtype, block_size: int, rule: DispatchRule
) -> Iterator[StepPlan]:
    """Plans that between them take every branch of the planner."""
    heads: dict[str, Any] = dict(
        num_q_heads=shape.num_q_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        dtype=dtype,
    )
    yield plan_step(_step(_PREFILL, _PREFIXES, block_size), **heads)
    yield plan_step(_step(_SHORT_DECODE, [], block_size), **heads)
    decode = _step(_DECODE, _PREFIXES, block_size)
    for mode in ("auto", "plain", "grouped"):
        yield plan_step(decode, decode_mode=mode, **heads)
    for mode, splits in itertools.product(("plain", "grouped"), range(1, rule.max_splits + 1)):
        yield plan_step(decode, decode_mode=mode, num_splits=splits, **heads)
    graphs = GraphPlans(
        shape.num_q_heads,
        shape.num_kv_heads,
        shape.head_dim,
        dtype=dtype,
        max_batch=8,
        max_model_len=4096,
        block_size=block_size,
        device="cpu",
        rule=rule,
    )
    for size, mode in itertools.product((8, 1), ("decode", "grouped")):
        plan = graphs.plan(size, mode)
        graphs.pad(plan)
        yield plan


def enumerate_launches(
    shape: ModelShape, dtype: torch.dtype, block_size: int, backend: Any | None = None
) -> list[Launch]:
    """The distinct compiled variants of every kernel launched by steps of ``shape`` in a pool
    of ``dtype`` and ``block_size``, bound for ``backend`` (default: a CUDA sm_90 backend; the
    binding is the same for every CUDA target)."""
    if INTERPRET:
        raise RuntimeError(
            "enumerate the launches with TRITON_INTERPRET unset: the interpreter plans other tiles"
        )
    if backend is None:
        backend = cuda_backend(90)
    rule = DispatchRule()
    with record_launches() as calls:
        for plan in _steps(shape, dtype, block_size, rule):
            _run_step(plan, shape, dtype)
    tag = f"{shape.name} {_triton_dtype(dtype)} page{block_size}"
    launches: dict[tuple, Launch] = {}
    for call in calls:
        launch = bind(call, backend)
        launch = launches.setdefault(launch.key, launch)
        if tag not in launch.shapes:
            launch.shapes.append(tag)
    return list(launches.values())


def enumerate_all(
    shapes: list[ModelShape] | None = None,
    dtypes: tuple[torch.dtype, ...] = DTYPES,
    block_sizes: tuple[int, ...] = BLOCK_SIZES,
) -> list[Launch]:
    """:func:`enumerate_launches` over shapes x dtypes x block sizes, merged: a variant launched
    by several shapes is listed once with all of them in ``shapes``."""
    backend = cuda_backend(90)
    merged: dict[tuple, Launch] = {}
    for shape, dtype, page in itertools.product(
        shapes or [*MODEL_SHAPES.values(), *GRID_SHAPES], dtypes, block_sizes
    ):
        for launch in enumerate_launches(shape, dtype, page, backend):
            kept = merged.setdefault(launch.key, launch)
            if kept is not launch:
                kept.shapes += [s for s in launch.shapes if s not in kept.shapes]
    return list(merged.values())


def cuda_backend(capability: int) -> Any:
    """Triton's CUDA backend for compute capability ``capability`` (no GPU needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return make_backend(GPUTarget("cuda", capability, 32))


def _triton_dtype(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


__all__ = [
    "BLOCK_SIZES",
    "DTYPES",
    "GRID_SHAPES",
    "MODEL_SHAPES",
    "Launch",
    "ModelShape",
    "bind",
    "cuda_backend",
    "enumerate_all",
    "enumerate_launches",
    "record_launches",
]
