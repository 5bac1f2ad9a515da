"""The model's forward under ``torch.compile``, with our attention as one opaque op.

Dynamo traces transformers' modeling code around the attention, and Inductor fuses it. On CPU
the linear layers are the native linear op (:mod:`prefixserve.native_linear`), opaque to the
graph too; where they are not (bf16, or a CPU without AVX2), the weights are frozen into the
graph and prepacked for oneDNN (``freezing``). A graph without frozen weights is kept in
Inductor's on-disk cache, so a restart skips most of the warm-up.

The attention, whose plan is built with Python on the host every step, stays out of the graph
as well: each layer calls the custom op ``prefixserve::attention(query, key, value, layer_idx,
scale)``, which writes the step's K/V into the paged pool and attends. Its eager implementation
finds the step's :class:`~prefixserve.attention.StepContext` in the *forward context* that
:meth:`CompiledForward.__call__` sets around the compiled call (as vLLM's ``unified_attention``
does): a graph cannot carry a Python plan as an input, so the context lives only for the length
of one call, in one place, and the op refuses to run outside it.

The token dimension varies every step: it is marked dynamic, so one graph serves every step.
PyTorch specializes sizes 0 and 1, so a step of one token (one request decoding alone) is padded
to two (the attention op leaves the padding token out: it writes no K/V and attends to nothing),
and the logits rows to at least two. One graph instead of two cuts the warm-up by about a third
and costs a lone decode little: at one or two rows a step streams every weight once either way
(the native linear op has tiles for two rows that read each weight once, as for one).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .attention import StepContext


@dataclass(frozen=True, slots=True)
class _ForwardContext:
    step: StepContext[Any]
    num_tokens: int
    """The step's real tokens: the forward's token rows beyond them are padding."""


_context: ContextVar[_ForwardContext | None] = ContextVar("prefixserve_step", default=None)
"""The forward context: the step whose compiled forward runs in this thread, set only around it
(a context variable, so engines stepping in different threads do not see each other's)."""


@contextmanager
def forward_context(step: StepContext[Any], num_tokens: int) -> Iterator[None]:
    """Make ``step`` (of ``num_tokens`` real tokens) the one the attention op reads while the
    compiled forward runs."""
    token = _context.set(_ForwardContext(step, num_tokens))
    try:
        yield
    finally:
        _context.reset(token)


@torch.library.custom_op("prefixserve::attention", mutates_args=())
def attention_op(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_idx: int, scale: float
) -> torch.Tensor:
    """Write ``key, value [T, Hkv, D]`` into layer ``layer_idx`` of the pool, then attend with
    ``query [T, Hq, D]`` -> ``[T, Hq, D]`` contiguous. The pool write is a side effect the graph
    does not see; it cannot be reordered, because each layer's input depends on the previous
    layer's output."""
    context = _context.get()
    if context is None:
        raise RuntimeError(
            "prefixserve::attention runs only inside a compiled prefixserve forward "
            "(no step context is set)"
        )
    step, num = context.step, context.num_tokens
    k_cache, v_cache = step.kv_cache.layer(layer_idx)
    if num == query.shape[0]:
        step.backend.write_kv(key, value, k_cache, v_cache, step.plan)
        return step.backend.attend(query, k_cache, v_cache, step.plan, scale).contiguous()
    # Padding tokens (rows num..): no K/V written, zeros out (no one reads them).
    step.backend.write_kv(key[:num], value[:num], k_cache, v_cache, step.plan)
    out = query.new_zeros(query.shape)
    out[:num] = step.backend.attend(query[:num], k_cache, v_cache, step.plan, scale)
    return out


@attention_op.register_fake
def _attention_fake(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layer_idx: int, scale: float
) -> torch.Tensor:
    return query.new_empty(query.shape)


def cannot_compile(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the model's forward is not compiled here, or None: bitsandbytes layers break the
    graph; on CPU compiled steps are built and measured in fp32 and bf16."""
    if getattr(model, "is_quantized", False) or getattr(model, "hf_quantizer", None) is not None:
        return "bitsandbytes-quantized layers do not compile into one graph"
    if device.type not in ("cpu", "cuda"):
        return f"compiled steps are built for CPU and CUDA devices, not for {device.type}"
    if device.type == "cpu" and dtype not in (torch.float32, torch.bfloat16):
        return f"compiled CPU steps support float32 and bfloat16, not {dtype}"
    return None


class CompiledForward:
    """``(input_ids [T], positions [T], logits_indices [R]) -> logits [R, V]`` through the
    compiled model; ``T`` and ``R`` vary from step to step without recompiling.

    ``T`` and ``R`` are padded to at least 2 (a padding token, and logits rows at index 0, which
    are dropped), so that one graph serves every step. :attr:`num_graphs` counts the graphs
    compiled."""

    def __init__(self, model: torch.nn.Module, freezing: bool) -> None:
        self.model = model
        self.freezing = freezing
        self.num_graphs = 0
        """Graphs Inductor compiled so far (each new shape class or guard failure adds one)."""
        self._compiled = torch.compile(
            _own_code(_model_step), backend=self._inductor, fullgraph=True
        )

    def _inductor(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        from torch._inductor.compile_fx import compile_fx

        self.num_graphs += 1
        return compile_fx(graph, example_inputs)

    def __call__(
        self,
        step: StepContext[Any],
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        logits_indices: torch.Tensor,
    ) -> torch.Tensor:
        num_tokens, num_rows = len(input_ids), len(logits_indices)
        if num_tokens < MIN_ROWS:
            pad = input_ids.new_zeros(MIN_ROWS - num_tokens)
            input_ids, positions = torch.cat([input_ids, pad]), torch.cat([positions, pad])
        if num_rows < MIN_ROWS:
            pad = logits_indices.new_zeros(MIN_ROWS - num_rows)
            logits_indices = torch.cat([logits_indices, pad])
        for tensor in (input_ids, positions, logits_indices):
            torch._dynamo.mark_dynamic(tensor, 0)
        # Dynamo reads ``freezing`` while tracing (parameters become constants) and Inductor
        # while compiling: set for the length of the call, not for the process (~50 us a step).
        with (
            forward_context(step, num_tokens),
            torch._inductor.config.patch(freezing=self.freezing),
        ):
            logits = self._compiled(self.model, input_ids, positions, logits_indices)
        return logits[:num_rows]


def _model_step(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    logits_indices: torch.Tensor,
) -> torch.Tensor:
    """The function compiled: one packed forward, logits at ``logits_indices``."""
    output = model(
        input_ids=input_ids[None],
        position_ids=positions[None],
        logits_to_keep=logits_indices,
        use_cache=False,
    )
    return output.logits[0]


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object of its own. Dynamo keeps its graphs, and counts recompiles
    against its limit, per code object: every engine in a process compiles its own copy, so that
    one engine's graphs are neither tried (guards) nor counted for another's."""
    code = fn.__code__.replace()
    return types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


MIN_ROWS = 2
"""Tokens and logits rows a step computes at least (sizes 0 and 1 would each compile a graph of
their own)."""
