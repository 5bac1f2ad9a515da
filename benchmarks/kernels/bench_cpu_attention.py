"""Microbenchmarks of the native CPU attention op (one layer of the default model's shapes).

    python benchmarks/kernels/bench_cpu_attention.py [--dtype bfloat16] [--smoke]

(a) decode, every request its own context (no prefix): the op, the PyTorch reference (gather +
    SDPA) and SDPA on K/V that are already contiguous (the floor a gather-free layout allows),
    over batch 1-64 and context 512-8k, in queries/s and GB/s of K/V read;
(b) grouped vs plain: a batch of decodes in groups sharing prefixes of 16-8k tokens (64 own
    tokens each): the op with every prefix grouped, with none, what the dispatch rule picks,
    and the reference.
Times are medians of wall-clock runs on torch's intra-op threads; K/V bytes count what must be
read (a shared prefix once).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_attention import Shape, build_step

from prefixserve.config import cache_root, env_cpu_isa
from prefixserve.kernels import cpu_attention
from prefixserve.kernels.cpu_isa import default_isa
from prefixserve.kernels.cpu_plan import DispatchRule, plan_cpu_step
from prefixserve.kernels.reference import build_gather_plan, paged_prefix_attention

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: bench_common
from bench_common import machine_info, write_report

DEFAULT_SHAPE = Shape(num_q_heads=9, num_kv_heads=3, head_dim=64, block_size=16)
"""SmolLM2-135M: 9 query heads, 3 kv heads, head_dim 64 (dtype set from --dtype)."""
TOKEN_CAP = 1 << 19
"""Most cached tokens in one configuration (batch x context)."""


def timer(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _op(query, k_cache, v_cache, meta, mode: str):
    isa = default_isa(env_cpu_isa())
    rule = DispatchRule.for_step(isa, query.dtype, query.shape[-1])  # the engine's rule
    plan = plan_cpu_step(meta, isa, prefix_mode=mode, rule=rule)
    scale = query.shape[-1] ** -0.5
    return plan, lambda: cpu_attention.paged_prefix_attention(query, k_cache, v_cache, plan, scale)


def _reference(query, k_cache, v_cache, meta):
    gather = build_gather_plan(meta)
    scale = query.shape[-1] ** -0.5
    return lambda: paged_prefix_attention(query, k_cache, v_cache, gather, scale)


def _contiguous_sdpa(query, k_cache, v_cache, meta, shape: Shape):
    """SDPA over each request's K/V copied (before timing) into ``[B, Hkv, L, D]``."""
    gather = build_gather_plan(meta).groups[0]  # one group: equal lengths
    keys = k_cache.view(-1, shape.num_kv_heads, shape.head_dim)[gather.kv_slots].transpose(1, 2)
    values = v_cache.view(-1, shape.num_kv_heads, shape.head_dim)[gather.kv_slots].transpose(1, 2)
    keys, values = keys.contiguous(), values.contiguous()
    q = query.view(meta.num_requests, 1, shape.num_q_heads, shape.head_dim).transpose(1, 2)
    return lambda: F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)


def bench_decode(batches, contexts, shape: Shape, repeats: int) -> list[dict]:
    rows = []
    for batch in batches:
        for context in contexts:
            if batch * context > TOKEN_CAP:
                continue
            query, k_cache, v_cache, meta = build_step(batch, context, 1, 0, 1, shape, "cpu")
            kv_bytes = batch * context * shape.kv_bytes_per_token
            times = {
                "op": timer(_op(query, k_cache, v_cache, meta, "auto")[1], repeats),
                "reference": timer(_reference(query, k_cache, v_cache, meta), repeats),
                "sdpa_contiguous": timer(
                    _contiguous_sdpa(query, k_cache, v_cache, meta, shape), repeats
                ),
            }
            row = {"batch": batch, "context": context}
            for name, ms in times.items():
                row[f"{name}_ms"] = ms
                row[f"{name}_gb_s"] = kv_bytes / ms / 1e6
            row["op_queries_s"] = batch / times["op"] * 1e3
            rows.append(row)
            print(_format_decode(row), flush=True)
    return rows


def bench_grouped(batch, group_sizes, prefixes, own, shape: Shape, repeats: int) -> list[dict]:
    rows = []
    for prefix in prefixes:
        for group in group_sizes:
            if batch * (own + prefix // group) > TOKEN_CAP:
                continue
            query, k_cache, v_cache, meta = build_step(batch, own, 1, prefix, group, shape, "cpu")
            plain_ms = timer(_op(query, k_cache, v_cache, meta, "plain")[1], repeats)
            grouped_ms = timer(_op(query, k_cache, v_cache, meta, "grouped")[1], repeats)
            auto_plan, _ = _op(query, k_cache, v_cache, meta, "auto")
            picked = "grouped" if auto_plan.stats["grouped_prefixes"] else "plain"
            row = {
                "batch": batch,
                "group_size": group,
                "prefix": prefix,
                "own": own,
                "plain_ms": plain_ms,
                "grouped_ms": grouped_ms,
                "speedup": plain_ms / grouped_ms,
                "rule_picks": picked,
                "rule_right": (picked == "grouped") == (grouped_ms < plain_ms),
                "reference_ms": timer(_reference(query, k_cache, v_cache, meta), repeats),
            }
            groups = -(-batch // group)
            kv_bytes = (groups * prefix + batch * own) * shape.kv_bytes_per_token
            row["grouped_gb_s"] = kv_bytes / grouped_ms / 1e6
            rows.append(row)
            print(_format_grouped(row), flush=True)
    return rows


def _format_decode(r: dict) -> str:
    return (
        f"batch {r['batch']:>3} context {r['context']:>5}: op {r['op_ms']:8.3f} ms "
        f"({r['op_queries_s']:>9.0f} q/s, {r['op_gb_s']:5.1f} GB/s)  reference "
        f"{r['reference_ms']:8.3f} ms ({r['reference_gb_s']:5.1f} GB/s)  SDPA contiguous "
        f"{r['sdpa_contiguous_ms']:8.3f} ms ({r['sdpa_contiguous_gb_s']:5.1f} GB/s)"
    )


def _format_grouped(r: dict) -> str:
    return (
        f"prefix {r['prefix']:>5} groups of {r['group_size']:>3}: plain {r['plain_ms']:8.3f} ms "
        f"grouped {r['grouped_ms']:8.3f} ms speedup {r['speedup']:5.2f}x rule: "
        f"{r['rule_picks']:<7} {'ok' if r['rule_right'] else 'WRONG'}  reference "
        f"{r['reference_ms']:8.3f} ms"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (a test runs this)")
    parser.add_argument("--out", default="benchmarks/results/cpu_attention.json")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    shape = dataclasses.replace(DEFAULT_SHAPE, dtype=dtype)
    cpu_attention.load(cache_root())
    isa = default_isa(env_cpu_isa())
    if args.smoke:
        decode = bench_decode((1, 3), (40,), shape, 1)
        grouped = bench_grouped(6, (1, 3), (16, 50), 9, shape, 1)
    else:
        print(f"(a) decode, {shape}, ISA {isa}")
        decode = bench_decode((1, 4, 16, 64), (512, 2048, 8192), shape, args.repeats)
        print("(b) grouped vs plain, 64 decodes of 64 own tokens")
        groups, prefixes = (1, 2, 4, 16, 64), (16, 128, 512, 2048, 8192)
        grouped = bench_grouped(64, groups, prefixes, 64, shape, args.repeats)
    results = {
        "benchmark": "cpu_attention",
        "dtype": args.dtype,
        "isa": isa,
        **machine_info(),
        "decode": decode,
        "grouped": grouped,
    }
    write_report(args.out, results)
    return results


if __name__ == "__main__":
    main()
