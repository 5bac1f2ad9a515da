"""Compile every Triton attention kernel for an H100 (sm_90) on a machine without a GPU.

The interpreter does not enforce GPU rules (``tl.dot`` shapes, types, shared memory), so a kernel
that passes the CPU tests can still fail to compile on a GPU. This builds each kernel's cubin with
the ptxas shipped in the triton wheel and prints registers, spill stack and shared memory.

    python benchmarks/kernels/compile_sm90.py [--quick]

Needs ``TRITON_INTERPRET`` unset (interpreted kernels cannot be compiled).
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
POINTER = {"f16": "*fp16", "bf16": "*bf16", "f32": "*fp32"}


def compile_kernel(kernel, pointers: dict[str, str], constexprs: dict, tiles) -> str:
    """Compile ``kernel`` (pointer args typed by ``pointers``, other ``*_ptr`` int32, scalars
    int32 except ``qk_scale``); returns cuobjdump's resource line."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = (
                "*i32" if name.endswith("_ptr") else "fp32" if name == "qk_scale" else "i32"
            )
    options = {"num_warps": tiles.num_warps, "num_stages": tiles.num_stages}
    compiled = triton.compile(
        ASTSource(kernel, signature, constexprs), target=TARGET, options=options
    )
    cubin = f"/tmp/prefixserve_{kernel.__name__}.cubin"
    with open(cubin, "wb") as f:
        f.write(compiled.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return f"shared {compiled.metadata.shared}"
    out = subprocess.run([tool, "--dump-resource-usage", cubin], capture_output=True, text=True)
    usage = [line.split(" LOCAL")[0].strip() for line in out.stdout.splitlines() if "REG:" in line]
    return f"{usage[0] if usage else '?'} smem {compiled.metadata.shared}"


def variants(quick: bool):
    if quick:
        return [("bf16", 128, 4, 16)]
    return itertools.product(["f16", "bf16", "f32"], [64, 128, 24], [1, 4, 8], [16, 1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="bf16, head_dim 128, GQA 4 only")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_sm90: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)")
        return 2
    from prefixserve.kernels import triton_cascade, triton_decode, triton_kv_write, triton_prefill
    from prefixserve.kernels.triton_common import block_d
    from prefixserve.kernels.triton_plan import TileConfig, decode_tiles, group_tiles, prefill_tiles

    start = time.perf_counter()
    for dtype, head_dim, gqa, page in variants(args.quick):
        prec = "ieee" if dtype == "f32" else "tf32"
        common = dict(
            HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), PAGE=page, UPCAST=False, PREC=prec
        )
        io = {n: POINTER[dtype] for n in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")}
        parts = {**io, "part_o_ptr": "*fp32", "part_lse_ptr": "*fp32"}
        dec, grp, pre = (
            decode_tiles(gqa, head_dim),
            group_tiles(gqa, head_dim),
            prefill_tiles(gqa, head_dim),
        )
        tag = f"{dtype} D{head_dim} G{gqa} page{page}"
        for with_prefix, partial in ((True, False), (True, True), (False, True)):
            consts = dict(
                common,
                GQA=gqa,
                BLOCK_H=dec.block_m,
                BLOCK_N=dec.block_n,
                WITH_PREFIX=with_prefix,
                WRITE_PARTIAL=partial,
            )
            usage = compile_kernel(triton_decode._decode_kernel, parts, consts, dec)
            print(f"{tag} decode prefix={with_prefix} partial={partial}: {usage}", flush=True)
        consts = dict(common, GQA=gqa, BLOCK_M=grp.block_m, BLOCK_N=grp.block_n)
        usage = compile_kernel(triton_cascade._group_prefix_kernel, parts, consts, grp)
        print(f"{tag} group prefix: {usage}")
        consts = dict(
            common, GQA=gqa, BLOCK_M=pre.block_m, BLOCK_Q=pre.block_m // gqa, BLOCK_N=pre.block_n
        )
        print(
            f"{tag} prefill: {compile_kernel(triton_prefill._prefill_kernel, io, consts, pre)}",
            flush=True,
        )
        if gqa == 1 or args.quick:
            merge = {"part_o_ptr": "*fp32", "part_lse_ptr": "*fp32", "out_ptr": POINTER[dtype]}
            consts = dict(
                HEAD_DIM=head_dim, BLOCK_D=block_d(head_dim), BLOCK_S=8, SKIP_ABSENT_PREFIX=True
            )
            usage = compile_kernel(triton_decode._merge_kernel, merge, consts, TileConfig(0, 0))
            print(f"{tag} merge: {usage}")
            write = {
                n: POINTER[dtype] for n in ("key_ptr", "value_ptr", "k_cache_ptr", "v_cache_ptr")
            }
            consts = dict(
                NUM_KV_HEADS=8, HEAD_DIM=head_dim, BLOCK_H=8, BLOCK_D=block_d(head_dim), PAGE=page
            )
            usage = compile_kernel(
                triton_kv_write._write_kv_kernel,
                {**write, "slot_mapping_ptr": "*i64"},
                consts,
                TileConfig(0, 0),
            )
            print(f"{tag} write_kv: {usage}", flush=True)
    print(f"all kernels compiled for sm_90 in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
