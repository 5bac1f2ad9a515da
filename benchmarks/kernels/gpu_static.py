"""Compile every Triton kernel variant the engine can launch for real GPUs, on a CPU, and report.

The variants come from the engine's own planner and launch wrappers
(:mod:`prefixserve.kernels.triton_launches`) for the default model, Llama-3-8B, Qwen2.5/Qwen3
shapes and head_dim {64, 96, 128, 256} x GQA {1, 4, 8}, in bf16, fp16 and fp32 pools of block
size 16 and 32. Each is compiled for each target with the ptxas the triton wheel ships and
checked (:mod:`prefixserve.kernels.gpu_static`): registers, spills, shared memory against the
target's limit, tensor-core instructions for 16-bit dot products, estimated occupancy.

    python benchmarks/kernels/gpu_static.py                      # sm_80, sm_90, sm_100
    python benchmarks/kernels/gpu_static.py --targets sm_90 --shapes llama-3-8b --json out.json

Prints one line per (kernel, variant, target) and a summary; exits 1 if any variant fails a check.
Results are cached per variant (``--cache-dir``), so a rerun compiles only what changed.
Needs ``TRITON_INTERPRET`` unset: interpreted kernels cannot be compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from prefixserve.config import cache_root

DEFAULT_CACHE = cache_root()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--targets",
        default="sm_80,sm_90,sm_100",
        help="comma-separated compute capabilities (sm_80, sm_90, sm_100); default all three",
    )
    parser.add_argument(
        "--shapes",
        default="all",
        help="comma-separated model shapes (see --list-shapes), or 'all' (default)",
    )
    parser.add_argument(
        "--dtypes", default="bf16,fp16,fp32", help="KV pool dtypes (default bf16,fp16,fp32)"
    )
    parser.add_argument("--block-sizes", default="16,32", help="pool block sizes (default 16,32)")
    parser.add_argument("--json", type=Path, help="write the rows as a JSON list to this path")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes (default: CPUs)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=DEFAULT_CACHE / "gpu_static",
        help=f"per-variant result cache (default {DEFAULT_CACHE / 'gpu_static'}); 'none' for none",
    )
    parser.add_argument("--quiet", action="store_true", help="print failures and the summary only")
    parser.add_argument("--list-shapes", action="store_true", help="list the model shapes and exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("gpu_static: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
        return 2
    # Triton 3.9's default, stated (it warns while the default is implicit); the engine's runtime
    # compiles with the same setting.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import torch

    from prefixserve.kernels import gpu_static, triton_launches

    shapes = {
        s.name: s for s in (*triton_launches.MODEL_SHAPES.values(), *triton_launches.GRID_SHAPES)
    }
    if args.list_shapes:
        for s in shapes.values():
            heads = f"{s.num_q_heads:3} query heads, {s.num_kv_heads} kv"
            print(f"{s.name:14} {heads}, head_dim {s.head_dim}")
        return 0
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    targets = args.targets.split(",")
    chosen = list(shapes.values()) if args.shapes == "all" else None
    try:
        chosen = chosen or [shapes[n] for n in args.shapes.split(",")]
        pools = tuple(dtypes[d] for d in args.dtypes.split(","))
        unknown = [t for t in targets if t not in gpu_static.TARGETS]
        if unknown:
            raise KeyError(unknown[0])
    except KeyError as exc:
        print(f"gpu_static: unknown name {exc}; see --help and --list-shapes")
        return 2
    block_sizes = tuple(int(b) for b in args.block_sizes.split(","))

    start = time.perf_counter()
    launches = triton_launches.enumerate_all(chosen, pools, block_sizes)
    print(
        f"{len(launches)} kernel variants from {len(chosen)} shapes x {len(pools)} dtypes x "
        f"{len(block_sizes)} block sizes ({time.perf_counter() - start:.1f} s); compiling for "
        f"{', '.join(targets)} with {args.jobs} processes",
        flush=True,
    )

    def progress(done: int, total: int) -> None:
        if done == total or done % 100 == 0:
            print(f"  {done}/{total} compiled ({time.perf_counter() - start:.0f} s)", flush=True)

    cache = None if str(args.cache_dir) == "none" else args.cache_dir
    rows = gpu_static.check_all(
        launches, targets, cache_dir=cache, jobs=args.jobs, progress=progress
    )
    failures = print_table(rows, gpu_static.problems, quiet=args.quiet)
    print_summary(rows, targets)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=1))
        print(f"wrote {len(rows)} rows to {args.json}")
    print(f"done in {time.perf_counter() - start:.0f} s: {len(failures)} problems")
    for problem in failures:
        print("  FAIL", problem)
    return 1 if failures else 0


def print_table(rows, problems, quiet: bool) -> list[str]:
    header = f"{'kernel':22} {'target':7} {'regs':>4} {'spill':>5} {'smem':>7} {'occ':>5} {'tc':>3}"
    header += "  config"
    if not quiet:
        print(header)
    failures = []
    for r in rows:
        found = problems(r)
        failures += found
        if quiet and not found:
            continue
        tc = {True: "yes", False: "no", None: "-"}[r.tensor_cores]
        if r.error:
            line = f"{r.kernel:22} {r.target:7} {'compile error':>27}      {r.config}"
        else:
            line = (
                f"{r.kernel:22} {r.target:7} {r.registers:4} {r.spills:5} {r.shared_bytes:7} "
                f"{r.occupancy:5.2f} {tc:>3}  {r.config}"
            )
        print(("FAIL " if found else "") + line)
    return failures


def print_summary(rows, targets: list[str]) -> None:
    print("\nper kernel and target: variants, max registers, spilling variants, max shared KiB,")
    print("min occupancy")
    groups: dict[tuple[str, str], list] = {}
    for r in rows:
        groups.setdefault((r.kernel, r.target), []).append(r)
    for (kernel, target), rs in sorted(groups.items()):
        ok = [r for r in rs if r.error is None]
        errors = len(rs) - len(ok)
        print(
            f"  {kernel:22} {target:7} {len(rs):4} variants"
            f"  regs <= {max((r.registers for r in ok), default=0):3}"
            f"  spilling {sum(1 for r in ok if r.spills):3}"
            f"  smem <= {max((r.shared_bytes for r in ok), default=0) / 1024:6.1f} KiB"
            f"  occupancy >= {min((r.occupancy for r in ok), default=0):.2f}"
            + (f"  {errors} compile errors" if errors else "")
        )
    tc = Counter((r.target, r.tensor_cores) for r in rows if r.io_dtype in ("bf16", "fp16"))
    for target in targets:
        print(
            f"  16-bit dot products on tensor cores, {target}: {tc[target, True]} of "
            f"{tc[target, True] + tc[target, False]}"
        )


if __name__ == "__main__":
    sys.exit(main())
