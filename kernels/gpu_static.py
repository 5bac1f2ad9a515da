"""Compile the engine's Triton kernels for real GPUs on a machine without one, and check them.

For every variant :mod:`.triton_launches` enumerates and every target (``sm_80``: A100,
``sm_90``: H100/H200, ``sm_100``: B200), Triton compiles the kernel to a cubin with the ``ptxas``
its wheel ships, and :func:`check_launch` reads off:

* ``registers``, ``stack_bytes``, ``spills`` (bytes of spill stores + loads) from ``ptxas -v``;
* ``shared_bytes`` (Triton's metadata) against the target's per-block limit;
* ``tensor_cores``: whether a kernel with ``tl.dot`` on 16-bit inputs got ``mma`` / ``wgmma``
  instructions in its PTX (``None`` for kernels without a dot product);
* ``occupancy``: resident warps per SM over the SM's maximum, from registers, warps and shared
  memory (the CUDA occupancy calculator's rules, without the driver).

:func:`problems` says what is wrong with a row: a compile error, shared memory over the limit, a
spill not explained in :data:`KNOWN_SPILLS`, or a 16-bit dot product off the tensor cores.
Results are cached by Triton's own compilation key (source, options, compiler version), so a
second run compiles only what changed. What only a GPU can show (speed, bank conflicts, the
driver's final register allocation at load) is out of reach here.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from .triton_launches import Launch


@dataclass(frozen=True, slots=True)
class GpuLimits:
    """Per-SM resources of a compute capability (CUDA C Programming Guide, table of technical
    specifications per compute capability)."""

    capability: int
    max_shared_per_block: int
    """Bytes of shared memory one block may use (with the opt-in carve-out)."""
    shared_per_sm: int
    reserved_shared_per_block: int = 1024
    registers_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    register_granularity: int = 256
    """Registers are allocated to a warp in units of this many."""

    @property
    def name(self) -> str:
        return f"sm_{self.capability}"


TARGETS: dict[str, GpuLimits] = {
    "sm_80": GpuLimits(80, max_shared_per_block=163 * 1024, shared_per_sm=164 * 1024),
    "sm_90": GpuLimits(90, max_shared_per_block=227 * 1024, shared_per_sm=228 * 1024),
    "sm_100": GpuLimits(100, max_shared_per_block=227 * 1024, shared_per_sm=228 * 1024),
}

KNOWN_SPILLS: dict[tuple[str, str], str] = {}
"""``(kernel name, target) -> reason`` for spills accepted on purpose; every other spill fails
the check. Empty: no variant spills."""


@dataclass(slots=True)
class StaticRow:
    """One kernel variant compiled for one target (the JSON report's row)."""

    kernel: str
    config: str
    target: str
    registers: int | None
    spills: int | None
    """Bytes of spill stores plus spill loads (``ptxas -v``)."""
    stack_bytes: int | None
    shared_bytes: int | None
    occupancy: float | None
    """Resident warps per SM / maximum warps per SM (0..1)."""
    tensor_cores: bool | None
    """``mma``/``wgmma`` in the PTX; ``None`` for a kernel without ``tl.dot``."""
    num_warps: int
    io_dtype: str
    shapes: list[str]
    compile_seconds: float
    error: str | None = None


def occupancy(limits: GpuLimits, registers: int, num_warps: int, shared_bytes: int) -> float:
    """Fraction of the SM's warp slots filled by resident blocks of this kernel."""
    per_warp = -(-registers * 32 // limits.register_granularity) * limits.register_granularity
    by_regs = limits.registers_per_sm // max(per_warp, 1) // num_warps
    by_warps = limits.max_warps_per_sm // num_warps
    shared = shared_bytes + limits.reserved_shared_per_block
    by_shared = limits.shared_per_sm // shared
    blocks = min(by_regs, by_warps, by_shared, limits.max_blocks_per_sm)
    return blocks * num_warps / limits.max_warps_per_sm


_PTXAS_USED = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)


def parse_ptxas(log: str) -> tuple[int, int, int]:
    """``(registers, stack frame bytes, spill store + load bytes)`` from ``ptxas -v`` output."""
    used, frame = _PTXAS_USED.search(log), _PTXAS_FRAME.search(log)
    if used is None or frame is None:
        raise ValueError(f"no resource usage in the ptxas log:\n{log}")
    stack, stores, loads = (int(x) for x in frame.groups())
    return int(used.group(1)), stack, stores + loads


def uses_tensor_cores(ptx: str) -> bool:
    return "mma.sync" in ptx or "wgmma.mma_async" in ptx or "tcgen05.mma" in ptx


def _compile(launch: Launch, limits: GpuLimits) -> tuple[Any, str]:
    """Compile ``launch`` for ``limits``' target; returns ``(compiled kernel, ptxas -v log)``."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs)
    target = GPUTarget("cuda", limits.capability, 32)
    options = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    log = io.StringIO()
    with (
        knobs.compilation.scope(),
        knobs.nvidia.scope(),
        knobs.cache.scope(),
        tempfile.TemporaryDirectory(prefix="prefixserve-gpu-static-") as scratch,
        contextlib.redirect_stdout(log),
    ):
        knobs.compilation.always_compile = True  # ptxas must run to print its resource usage
        knobs.nvidia.dump_ptxas_log = True
        knobs.cache.dir = scratch  # nothing here is ever loaded: keep Triton's cache clean
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Triton 3.9's notice on the fp-fusion default
            compiled = triton.compile(source, target=target, options=options)
    return compiled, log.getvalue()


def _ptxas_log(ptx: str, capability: int, fp_fusion: bool) -> str:
    """``ptxas -v`` of ``ptx`` for ``capability``, with the ptxas (and the fused multiply-add
    setting) Triton compiles with; Triton's own register-allocation flags may differ by
    release."""
    import subprocess

    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    try:
        ptxas = get_ptxas(capability).path
    except TypeError:  # Triton 3.4 has one ptxas for every target
        ptxas = get_ptxas().path
    with tempfile.TemporaryDirectory(prefix="prefixserve-ptxas-") as scratch:
        source = Path(scratch) / "kernel.ptx"
        source.write_text(ptx)
        command = [ptxas, "-v", f"--gpu-name={sm_arch_from_capability(capability)}"]
        if not fp_fusion:
            command.append("--fmad=false")
        command += [str(source), "-o", str(Path(scratch) / "kernel.cubin")]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    return done.stdout + done.stderr


def check_launch(launch: Launch, target: str) -> StaticRow:
    """Compile one variant for ``target`` (a key of :data:`TARGETS`) and measure it."""
    limits = TARGETS[target]
    row = StaticRow(
        kernel=launch.kernel_name,
        config=launch.config,
        target=target,
        registers=None,
        spills=None,
        stack_bytes=None,
        shared_bytes=None,
        occupancy=None,
        tensor_cores=None,
        num_warps=launch.num_warps,
        io_dtype=launch.io_dtype,
        shapes=list(launch.shapes),
        compile_seconds=0.0,
    )
    start = time.perf_counter()
    try:
        compiled, log = _compile(launch, limits)
        if not _PTXAS_USED.search(log):  # a Triton that does not print ptxas' log: run it
            fusion = getattr(compiled.metadata, "enable_fp_fusion", True)
            log = _ptxas_log(compiled.asm["ptx"], limits.capability, fusion)
        row.registers, row.stack_bytes, row.spills = parse_ptxas(log)
    except Exception as exc:  # a compile error is a finding, reported in the row
        row.error = f"{type(exc).__name__}: {exc}".strip()[:2000]
        row.compile_seconds = round(time.perf_counter() - start, 3)
        return row
    row.compile_seconds = round(time.perf_counter() - start, 3)
    row.shared_bytes = int(compiled.metadata.shared)
    row.occupancy = round(occupancy(limits, row.registers, launch.num_warps, row.shared_bytes), 3)
    if "tt.dot" in compiled.asm["ttir"]:
        row.tensor_cores = uses_tensor_cores(compiled.asm["ptx"])
    return row


def problems(row: StaticRow) -> list[str]:
    """What makes ``row`` fail the static check (empty when it passes)."""
    where = f"{row.kernel} [{row.config}] on {row.target}"
    if row.error is not None:
        return [f"{where}: does not compile: {row.error}"]
    found = []
    limit = TARGETS[row.target].max_shared_per_block
    if row.shared_bytes is not None and row.shared_bytes > limit:
        found.append(f"{where}: {row.shared_bytes} B of shared memory, over the {limit} B limit")
    if row.spills and (row.kernel, row.target) not in KNOWN_SPILLS:
        found.append(f"{where}: spills {row.spills} B ({row.registers} registers)")
    if row.tensor_cores is False and row.io_dtype in ("bf16", "fp16"):
        found.append(f"{where}: a {row.io_dtype} dot product without tensor-core instructions")
    if row.occupancy == 0:
        found.append(f"{where}: no block fits on an SM")
    return found


# -- many variants, many targets, cached, in parallel ------------------------------------------


def cache_key(launch: Launch, target: str) -> str:
    """Triton's own compilation key for ``launch`` on ``target`` (source and its dependencies,
    specialization, options, compiler version, cache-invalidating environment)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler.compiler import get_cache_invalidating_env_vars, get_cache_key

    backend = make_backend(GPUTarget("cuda", TARGETS[target].capability, 32))
    source = ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs)
    options = backend.parse_options(
        {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
    )
    key = get_cache_key(source, backend, options, env_vars=get_cache_invalidating_env_vars())
    return hashlib.sha256(f"gpu_static-v1-{key}".encode()).hexdigest()


def _worker(job: tuple[Launch, str]) -> StaticRow:
    return check_launch(*job)


def check_all(
    launches: Iterable[Launch],
    targets: Iterable[str],
    *,
    cache_dir: Path | None = None,
    jobs: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> list[StaticRow]:
    """:func:`check_launch` for every launch x target: cached rows from ``cache_dir``, the rest
    compiled in ``jobs`` worker processes. ``progress(done, total)`` is called as rows arrive."""
    todo: list[tuple[Launch, str, str]] = []
    rows: dict[int, StaticRow] = {}
    pairs = [(launch, target) for launch in launches for target in targets]
    for i, (launch, target) in enumerate(pairs):
        key = cache_key(launch, target)
        cached = _read_cached(cache_dir, key)
        if cached is not None:
            cached.config, cached.shapes = launch.config, list(launch.shapes)
            rows[i] = cached
        else:
            todo.append((launch, target, key))
    index = [i for i in range(len(pairs)) if i not in rows]
    done = len(rows)
    if progress:
        progress(done, len(pairs))
    for i, row, key in zip(index, _run(todo, jobs), (k for _, _, k in todo), strict=True):
        rows[i] = row
        if row.error is None:
            _write_cached(cache_dir, key, row)
        done += 1
        if progress:
            progress(done, len(pairs))
    return [rows[i] for i in range(len(pairs))]


def _run(todo: list[tuple[Launch, str, str]], jobs: int) -> Iterator[StaticRow]:
    work = [(launch, target) for launch, target, _ in todo]
    if jobs <= 1 or len(work) <= 1:
        yield from map(_worker, work)
        return
    # Spawned workers import the kernels afresh (forking a process that holds torch's thread
    # pools is unsafe); each gets a slice of the work in order.
    with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
        yield from pool.map(_worker, work, chunksize=max(1, min(16, len(work) // (4 * jobs))))


def _read_cached(cache_dir: Path | None, key: str) -> StaticRow | None:
    if cache_dir is None:
        return None
    path = cache_dir / f"{key}.json"
    try:
        return StaticRow(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_cached(cache_dir: Path | None, key: str, row: StaticRow) -> None:
    if cache_dir is None:
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(asdict(row)))
    tmp.replace(cache_dir / f"{key}.json")  # atomic: a concurrent reader sees all or nothing
