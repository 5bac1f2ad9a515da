"""Builds the native CPU ops (``csrc/``) once per source version and torch version, and loads them.

The kernel file is compiled once per instruction set, each object with its own flags, and the
op picks the best one this CPU runs at call time: nothing is tuned to the build machine
(no ``-march=native``), so a library built on an AVX-512 machine runs on an AVX2-only or a plain
x86-64 one and vice versa.

The library lands in ``<cache_dir>/ops/<key>/``, ``cache_dir`` given by the caller (the engine
passes :func:`prefixserve.config.cache_root`), the key hashing the sources, flags and torch
version. One process builds under an exclusive file lock while the others wait; the build
happens in a scratch directory renamed into place, so nobody loads a half-written library. A
cached library is loaded without a compiler. The compiler is ``$CXX`` or ``c++`` (g++ or
clang).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from .progress import exclusive_lock, say

SOURCE_DIR = Path(__file__).resolve().parents[1] / "csrc"
"""``csrc/`` of the source tree, or ``prefixserve/csrc`` of an installed package."""
LIBRARY_NAME = "libprefixserve_cpu.so"
REGISTRATIONS = ("cpu_attention.cpp", "cpu_linear.cpp", "cpu_sampling.cpp")
KERNELS = ("cpu_attention_kernel.cpp", "cpu_linear_kernel.cpp", "cpu_sampling_kernel.cpp")
"""Kernel files, each built once per instruction set."""
HEADERS = ("cpu_attention.h", "cpu_isa.h", "cpu_linear.h", "cpu_sampling.h")
COMMON_FLAGS = ("-O3", "-DNDEBUG", "-std=c++20", "-fPIC", "-fopenmp", "-fvisibility=hidden")
_AVX2: tuple[str, ...] = ("-mavx2", "-mfma", "-mf16c")
_AVX512: tuple[str, ...] = ("-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", *_AVX2)
_AVX512 += ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "baseline": ("-DCPU_CAPABILITY=DEFAULT",),
    "avx2": ("-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", *_AVX2),
    "avx512": _AVX512,
    "avx512_bf16": (*_AVX512, "-mavx512bf16"),
    "amx": (*_AVX512, "-mavx512bf16", "-mamx-tile", "-mamx-bf16"),
}
"""Builds of the kernel file per instruction set (x86-64 only; elsewhere the baseline alone)."""
EXPECTED_BUILD_SECONDS = 45


class NativeBuildError(RuntimeError):
    """The native CPU ops could not be built or loaded (the message says why)."""


def load_cpu_ops(cache_dir: Path) -> Path:
    """Load ``torch.ops.prefixserve`` (building it first into ``cache_dir`` if it lacks it);
    returns the library's path or raises :class:`NativeBuildError`. A process loads one library:
    the first call's outcome, success or failure, is every later call's, whatever its
    ``cache_dir`` (a second library would register the same ops again)."""
    global _outcome
    with _outcome_lock:
        if _outcome is None:
            try:
                _outcome = _build_and_load(cache_dir)
            except NativeBuildError as e:
                _outcome = e
    if isinstance(_outcome, NativeBuildError):
        raise _outcome
    return _outcome


_outcome: Path | NativeBuildError | None = None
_outcome_lock = threading.Lock()


def _build_and_load(cache_dir: Path) -> Path:
    if not SOURCE_DIR.is_dir():
        raise NativeBuildError(f"the native sources are missing ({SOURCE_DIR} not found)")
    isas = _isas()
    target = cache_dir / "ops" / _cache_key(isas)
    library = target / LIBRARY_NAME
    if not library.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(target.parent / f".{target.name}.lock", "building the native CPU ops"):
            if not library.is_file():
                _build(isas, target)
    try:
        torch.ops.load_library(str(library))
    except OSError as e:
        raise NativeBuildError(f"{library} does not load: {e}") from e
    return library


def _isas() -> tuple[str, ...]:
    if platform.machine().lower() in ("x86_64", "amd64"):
        return tuple(ISA_FLAGS)
    return ("baseline",)


def _sources() -> list[Path]:
    return [SOURCE_DIR / name for name in (*REGISTRATIONS, *KERNELS, *HEADERS)]


def _cache_key(isas: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for path in _sources():
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    for part in (*COMMON_FLAGS, *(f for isa in isas for f in ISA_FLAGS[isa])):
        digest.update(part.encode() + b"\0")
    digest.update(f"{torch.__version__} {platform.machine()}".encode())
    return f"cpu-{digest.hexdigest()[:16]}"


def _build(isas: tuple[str, ...], target: Path) -> None:
    """Compile, link, and move the library into ``target`` in one rename."""
    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise NativeBuildError(f"no C++ compiler ({compiler!r} is not on PATH; set $CXX)")
    say(f"building the native CPU ops (once, ~{EXPECTED_BUILD_SECONDS} s) ...")
    start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        objects = _compile(compiler, isas, scratch)
        _link(compiler, objects, scratch / LIBRARY_NAME)
        os.rename(scratch, target)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    say(f"native CPU ops ready in {target} ({time.perf_counter() - start:.0f} s)")


def _compile(compiler: str, isas: tuple[str, ...], out_dir: Path) -> list[Path]:
    """Compile the registrations, and each kernel file once per ISA, in parallel. Returns the
    objects baseline first: where objects share an inline function the linker keeps the first
    copy, so code common to every ISA is never taken from the AVX2 or AVX-512 build."""
    from torch.utils import cpp_extension  # imports setuptools: only when building

    includes = [f"-I{d}" for d in (SOURCE_DIR, *cpp_extension.include_paths())]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    base = [compiler, *COMMON_FLAGS, abi, *includes]
    jobs = {
        out_dir / f"{Path(name).stem}.o": [*base, "-c", str(SOURCE_DIR / name)]
        for name in REGISTRATIONS
    }
    for isa in isas:
        for name in KERNELS:
            kernel = [*ISA_FLAGS[isa], f"-DPREFIXSERVE_ISA={isa}", "-c", str(SOURCE_DIR / name)]
            jobs[out_dir / f"{Path(name).stem}_{isa}.o"] = [*base, *kernel]
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(pool.map(lambda job: _run([*job[1], "-o", str(job[0])]), jobs.items()))
    return list(jobs)


def _link(compiler: str, objects: list[Path], library: Path) -> None:
    """A shared library against torch's own libraries (and, through them, torch's OpenMP)."""
    from torch.utils import cpp_extension

    lib_dirs = [f"-L{d}" for d in cpp_extension.library_paths()]
    _run(
        [
            compiler,
            "-shared",
            *map(str, objects),
            *lib_dirs,
            "-lc10",
            "-ltorch_cpu",
            "-o",
            str(library),
        ]
    )


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-20:])
        raise NativeBuildError(f"`{' '.join(command[:2])} ...` failed:\n{tail}")
