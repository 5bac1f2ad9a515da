"""Engine configuration: one dataclass per concern, validated with errors that name the value.

These dataclasses are the one source of every engine option: ``LLM(**options)`` and
``EngineConfig.from_kwargs(**options)`` accept their fields by name, and ``prefixserve serve``
generates one flag per field, its help text from the field's docstring (:func:`engine_options`).
The module imports nothing heavy, so the command line builds its flags without loading torch.
"""

from __future__ import annotations

import ast
import inspect
import os
from dataclasses import MISSING, dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# -- the environment: every variable prefixserve reads is read here ----------------------------

ENVIRONMENT: dict[str, str] = {
    "PREFIXSERVE_ATTENTION": "attention backend when none is given: cpu, torch or triton",
    "PREFIXSERVE_CPU_ISA": "force a lower instruction set for the native CPU ops: avx512, avx2 "
    "or baseline (default: the best this CPU runs)",
    "PREFIXSERVE_ENFORCE_EAGER": "1 runs the model eagerly when enforce_eager is not given",
    "PREFIXSERVE_CACHE": "cache directory (default $XDG_CACHE_HOME/prefixserve or "
    "~/.cache/prefixserve): the converted default model, native op builds, the adapter registry",
    "PREFIXSERVE_API_KEYS": "the server's API keys (TENANT KEY [admin] entries) when no "
    "--api-keys file is given",
    "PREFIXSERVE_API_KEY": "the key the client and the prefixserve CLI send",
    "PREFIXSERVE_SERVER": "the server address the prefixserve CLI talks to",
    "TRITON_INTERPRET": "1 runs the Triton kernels under Triton's CPU interpreter (tests only)",
    "CXX": "the C++ compiler that builds the native CPU ops (default c++)",
}
"""Every environment variable prefixserve reads, and what it does (listed in the README)."""


def env_cpu_isa() -> str | None:
    """``$PREFIXSERVE_CPU_ISA``, or None to let the native ops pick the best ISA."""
    return os.environ.get("PREFIXSERVE_CPU_ISA") or None


def env_attention_backend() -> str | None:
    """``$PREFIXSERVE_ATTENTION``, or None."""
    return os.environ.get("PREFIXSERVE_ATTENTION") or None


def triton_interpreted() -> bool:
    """Whether ``TRITON_INTERPRET=1`` (the Triton kernels run on the CPU, for tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def env_api_keys(environ: dict[str, str] | None = None) -> str:
    """``$PREFIXSERVE_API_KEYS``: key entries separated by ';' (empty if unset)."""
    return (os.environ if environ is None else environ).get("PREFIXSERVE_API_KEYS", "")


def env_api_key() -> str | None:
    """``$PREFIXSERVE_API_KEY``, the key a client sends, or None."""
    return os.environ.get("PREFIXSERVE_API_KEY") or None


def env_server(default: str) -> str:
    """``$PREFIXSERVE_SERVER``, the address the command line's client commands use."""
    return os.environ.get("PREFIXSERVE_SERVER") or default


def cache_root() -> Path:
    """``$PREFIXSERVE_CACHE``, else ``$XDG_CACHE_HOME/prefixserve``, else
    ``~/.cache/prefixserve``."""
    if override := os.environ.get("PREFIXSERVE_CACHE"):
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "prefixserve"


DTYPES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
"""User-facing dtype names and the torch dtype each one means."""
QUANTIZATIONS = ("none", "8bit", "4bit", "nf4", "fp4")
ATTENTION_BACKENDS = ("cpu", "torch", "triton")


def parse_dtype(
    dtype: str | torch.dtype, device: str | None = None, quantization: str = "none"
) -> torch.dtype:
    """Map a user-facing dtype name (or a torch dtype) to a torch dtype; ``auto`` is
    :func:`auto_dtype` for ``device`` (None: CUDA when available)."""
    import torch

    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be one of float32, float16, bfloat16, got {dtype}")
        return dtype
    if dtype == "auto":
        return auto_dtype(device, quantization)[0]
    try:
        return getattr(torch, DTYPES[dtype])
    except KeyError:
        raise ValueError(
            f"dtype must be one of 'auto', {', '.join(repr(k) for k in DTYPES)}, got {dtype!r}"
        ) from None


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU flags (``/proc/cpuinfo``) of a native bf16 dot product: AVX512-BF16's ``vdpbf16ps``
(Intel Cooper Lake and Sapphire Rapids on, AMD Zen 4 on) and AMX (Sapphire Rapids on)."""


def auto_dtype(device: str | None = None, quantization: str = "none") -> tuple[torch.dtype, str]:
    """What ``dtype="auto"`` means on ``device``, and why: bf16 on CUDA; on a CPU, bf16 where
    it has a native bf16 dot product (twice the fp32 FLOPs per instruction, half the bytes a
    step streams), fp32 elsewhere (bf16 would be converted to fp32 for every product), for
    bitsandbytes-quantized models (their CPU kernels compute in fp32) and where
    ``$PREFIXSERVE_CPU_ISA`` names a build without one."""
    import torch

    from .kernels.cpu_isa import BF16_ISAS

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda"):
        return torch.bfloat16, "CUDA"
    if quantization != "none":
        return torch.float32, f"quantization={quantization} on a CPU"
    flags = [f for f in BF16_CPU_FLAGS if f in cpu_flags()]
    forced = env_cpu_isa()
    if flags and forced is not None and forced not in BF16_ISAS:
        return torch.float32, f"PREFIXSERVE_CPU_ISA={forced} has no bf16 dot product"
    if flags:
        return torch.bfloat16, f"this CPU has {' and '.join(flags)}"
    return torch.float32, "this CPU has no bf16 dot product (avx512_bf16 or amx_bf16)"


@cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags from ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


@dataclass(frozen=True, slots=True)
class Flag:
    """How a config field appears on the command line where not as ``--field-name VALUE``
    (``field(metadata=flag(...))``)."""

    name: str | None = None
    """The flag's name (``api_keys`` -> ``--api-keys``); None = the field's."""
    unit: int = 1
    """The field holds the flag's value times this (bytes for a MiB flag)."""
    metavar: str | None = None
    repeat: bool = False
    """The flag may be given many times; the field is the list of their values."""
    text: bool = False
    """The flag's text reaches the config as given ('none' too): a path the config reads."""


def flag(**kwargs: Any) -> dict[str, Flag]:
    return {"flag": Flag(**kwargs)}


@dataclass(slots=True)
class ModelConfig:
    model: str | None = None
    """A local HF model directory or a name transformers can load; None = the embedded default."""
    dtype: str | torch.dtype = "auto"
    """Weights and KV dtype: 'auto' (bf16 on CUDA and on CPUs with a bf16 dot product,
    AVX512-BF16 or AMX; fp32 on other CPUs), float32, float16, bfloat16."""
    quantization: str = "none"
    """bitsandbytes weight quantization: none, 8bit, 4bit (= nf4), nf4 or fp4."""
    device: str | None = None
    """'cuda', 'cpu' or None (CUDA when available)."""
    max_model_len: int | None = None
    """Longest sequence (prefix + prompt + output); None = the model's own limit."""

    def __post_init__(self) -> None:
        parse_dtype(self.dtype, "cpu")  # validates the name; auto is resolved per device
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}"
            )
        if self.device not in (None, "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype, str(self.torch_device), self.quantization)

    @property
    def torch_device(self) -> torch.device:
        import torch

        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


@dataclass(slots=True)
class CacheConfig:
    block_size: int = 16
    """Tokens per KV block."""
    num_kv_blocks: int | None = None
    """Blocks in the pool; None = sized from memory with ``kv_memory_fraction``."""
    kv_memory_fraction: float = 0.9
    """CUDA: share of free device memory after loading weights given to the KV pool."""
    cpu_kv_memory_gib: float = 1.0
    """CPU: memory given to the KV pool when ``num_kv_blocks`` is not set."""
    enable_prefix_caching: bool = True
    """Keep the full KV blocks of finished requests cached, so that a request repeating
    their leading tokens (a conversation's history, a shared few-shot prompt) computes only
    the rest; cached blocks are shared only within a tenant, the same adapter load and the same
    cache_salt, and evicted least recently used when the pool needs room."""

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")
        if self.cpu_kv_memory_gib <= 0:
            raise ValueError(f"cpu_kv_memory_gib must be > 0, got {self.cpu_kv_memory_gib}")


@dataclass(slots=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    """Token budget of one step (decode tokens + prefill chunks)."""
    max_num_seqs: int = 64
    """Most requests running at once."""
    long_prefill_token_threshold: int | None = 128
    """Largest prefill chunk of one request (or adapter prefix) per step, so that a long prompt
    does not hold up the requests around it: smaller answers other tenants sooner, larger
    prefills long prompts faster (benchmarks/bench_fairness.py); None = as much as the budget
    allows."""

    scheduling_policy: str = "fair"
    """'fair': waiting requests are admitted from the tenant that has received the least
    service (weighted), and a tenant under its share of running slots or KV blocks preempts the
    tenant furthest over its share; 'fcfs': one queue in arrival order, preempting the most
    recently admitted request when blocks run out. With one tenant both schedule alike."""
    preemption_min_steps: int = 8
    """Steps a request runs after it is admitted before another tenant's share may preempt it
    (keeps the pool from thrashing)."""

    def __post_init__(self) -> None:
        if self.scheduling_policy not in ("fair", "fcfs"):
            raise ValueError(
                f"scheduling_policy must be 'fair' or 'fcfs', got {self.scheduling_policy!r}"
            )
        if self.preemption_min_steps < 0:
            raise ValueError(f"preemption_min_steps must be >= 0, got {self.preemption_min_steps}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.long_prefill_token_threshold is not None and self.long_prefill_token_threshold < 1:
            raise ValueError(
                "long_prefill_token_threshold must be >= 1, "
                f"got {self.long_prefill_token_threshold}"
            )


@dataclass(slots=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    attention_backend: str | None = None
    """'cpu' (the native op), 'torch' (the PyTorch reference) or 'triton'; None =
    $PREFIXSERVE_ATTENTION, else triton on CUDA and cpu on CPU (torch where it cannot build)."""
    enforce_eager: bool | None = None
    """Run the model eagerly instead of under torch.compile, and on CUDA without CUDA graphs
    (compiled: a warm-up of minutes at start on a small CPU, then faster steps; models that
    cannot compile, e.g. bitsandbytes-quantized, run eagerly anyway);
    None = $PREFIXSERVE_ENFORCE_EAGER (1 or 0), else compiled."""

    @property
    def eager(self) -> bool:
        """Whether the model runs eagerly (``enforce_eager``, else the environment's choice)."""
        if self.enforce_eager is not None:
            return self.enforce_eager
        env = os.environ.get("PREFIXSERVE_ENFORCE_EAGER", "0")
        if env not in ("0", "1"):
            raise ValueError(f"PREFIXSERVE_ENFORCE_EAGER must be 0 or 1, got {env!r}")
        return env == "1"

    native_cpu_linear: bool = True
    """On CPU, run the model's fp32 linear layers on prefixserve's native op, on weights packed
    at load (0.3-0.6x PyTorch's time for decode steps and short prompts, 0.4-0.85x for long
    prefills, measured on AMD EPYC); False keeps PyTorch's. Needs AVX2 (elsewhere PyTorch's
    runs anyway)."""

    max_cuda_graph_batch: int = 256
    """CUDA: decode steps of up to this many requests (and max_num_seqs) replay CUDA graphs
    captured at start for batch sizes 1, 2, 4 and every multiple of 8 (a few seconds, and some
    device memory); 0 = no graphs. enforce_eager turns graphs off too. Needs the triton
    attention backend."""

    def __post_init__(self) -> None:
        if self.max_cuda_graph_batch < 0:
            raise ValueError(f"max_cuda_graph_batch must be >= 0, got {self.max_cuda_graph_batch}")
        if self.attention_backend not in (None, *ATTENTION_BACKENDS):
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, "
                f"got {self.attention_backend!r}"
            )

    @classmethod
    def from_kwargs(cls, **options: Any) -> EngineConfig:
        """An engine config from options named as the fields of the section dataclasses
        (``block_size=32, max_num_seqs=8, ...``); unknown names raise ``TypeError``."""
        unknown = sorted(set(options) - {o.name for o in engine_options()})
        if unknown:
            valid = ", ".join(o.name for o in engine_options())
            raise TypeError(f"unknown engine options {unknown}; the options are: {valid}")
        sections = {
            name: section(**{f.name: options[f.name] for f in fields(section) if f.name in options})
            for name, section in SECTIONS.items()
        }
        own = {k: v for k, v in options.items() if k in _own_fields()}
        return cls(**sections, **own)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
}
"""The fields of :class:`EngineConfig` that are sections (the rest are options themselves)."""


@dataclass(frozen=True, slots=True)
class EngineOption:
    """One engine option: a field of a config dataclass, with its docstring as help."""

    name: str
    annotation: str
    """The field's type as written (``int | None``, ``float``, ...)."""
    default: Any
    help: str


def _own_fields() -> set[str]:
    return {f.name for f in fields(EngineConfig)} - SECTIONS.keys()


@cache
def engine_options() -> tuple[EngineOption, ...]:
    """Every engine option, in declaration order, with its default and docstring."""
    options = []
    for cls in (*SECTIONS.values(), EngineConfig):
        docs = field_docstrings(cls)
        for f in fields(cls):
            if cls is EngineConfig and f.name in SECTIONS:
                continue
            default = f.default if f.default is not MISSING else None
            options.append(EngineOption(f.name, str(f.type), default, docs.get(f.name, "")))
    return tuple(options)


def field_docstrings(cls: type) -> dict[str, str]:
    """``{field: docstring}`` from the string literal under each field in ``cls``'s source."""
    body = ast.parse(inspect.getsource(cls)).body[0]
    assert isinstance(body, ast.ClassDef)
    docs: dict[str, str] = {}
    for node, after in zip(body.body, body.body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs
