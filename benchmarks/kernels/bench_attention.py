"""Microbenchmarks of the Triton attention kernels (GPU; ``--smoke`` runs tiny shapes on CPU).

    python benchmarks/kernels/bench_attention.py --out results.json [--plot results.png]

(a) decode: achieved bandwidth (KV bytes read / time) against the device's measured copy bandwidth,
    over batch 1-256, own context 512-32k and prefix 0-4k (distinct prefixes: every byte is read);
(b) grouped vs plain decode: speedup against group size (1-256) and prefix length (16-8k) in a
    256-request batch, and whether the dispatch rule picked the faster one;
(c) prefill: throughput against torch SDPA on the same tokens with the prefix concatenated into
    the keys (lower-right causal mask; flash if it takes one, else the next fused backend).
Times are medians of ``triton.testing.do_bench`` (which flushes L2 before every run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

TOKEN_CAP = 1 << 21  # cached tokens per configuration (8 GiB of K+V at 8 kv heads x 128, bf16)


@dataclass(frozen=True)
class Shape:
    num_q_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8


@dataclass(frozen=True)
class Sweep:
    decode_batches: tuple[int, ...] = (1, 4, 16, 64, 256)
    decode_contexts: tuple[int, ...] = (512, 2048, 8192, 32768)
    decode_prefixes: tuple[int, ...] = (0, 1024, 4096)
    group_batch: int = 256
    group_sizes: tuple[int, ...] = (1, 2, 8, 32, 128, 256)
    group_prefixes: tuple[int, ...] = (16, 128, 1024, 8192)
    group_own: int = 256
    prefill_batches: tuple[int, ...] = (1, 8)
    prefill_lens: tuple[int, ...] = (512, 2048)
    prefill_prefixes: tuple[int, ...] = (0, 1024, 4096)


SMOKE = Sweep((1, 3), (40,), (0, 21), 6, (1, 3, 6), (16, 50), 9, (2,), (24,), (0, 17))
SMOKE_SHAPE = Shape(num_q_heads=4, num_kv_heads=2, head_dim=32, block_size=16, dtype=torch.float32)


def build_step(batch, own_len, q_len, prefix_len, group_size, shape: Shape, device, seed=0):
    """A step of ``batch`` requests with ``own_len`` own tokens (the last ``q_len`` are queries);
    requests ``b`` share prefix ``b // group_size`` of ``prefix_len`` tokens (none if 0).
    Returns ``(query, k_cache, v_cache, meta)``; pool blocks are shuffled like a real pool's."""
    from prefixserve.kernels.metadata import AttentionMetadata

    gen = torch.Generator(device=device).manual_seed(seed)
    bs = shape.block_size
    num_prefixes = -(-batch // group_size) if prefix_len else 0
    own_blocks, pre_blocks = -(-own_len // bs), -(-prefix_len // bs)
    total = batch * own_blocks + num_prefixes * pre_blocks
    perm = torch.randperm(total, generator=gen, device=device).int()
    block_tables = perm[: batch * own_blocks].view(batch, own_blocks)
    prefix_tables = perm[batch * own_blocks :].view(num_prefixes, pre_blocks)
    cache_shape = (total, bs, shape.num_kv_heads, shape.head_dim)
    k_cache = torch.randn(cache_shape, generator=gen, device=device).to(shape.dtype)
    v_cache = torch.randn(cache_shape, generator=gen, device=device).to(shape.dtype)
    pos = torch.arange(own_len - q_len, own_len, device=device)
    slots = block_tables[:, pos // bs].long() * bs + pos % bs
    ids = (
        torch.arange(batch, device=device) // group_size
        if num_prefixes
        else torch.full((batch,), -1, device=device)
    )
    meta = AttentionMetadata(
        cu_q_lens=torch.arange(batch + 1, device=device, dtype=torch.int32) * q_len,
        own_lens=torch.full((batch,), own_len, dtype=torch.int32, device=device),
        block_tables=block_tables.contiguous(),
        slot_mapping=slots.flatten(),
        prefix_index=ids.int(),
        prefix_lens=torch.full((num_prefixes,), prefix_len, dtype=torch.int32, device=device),
        prefix_block_tables=prefix_tables.contiguous(),
        block_size=bs,
        max_q_len=q_len,
    )
    query = torch.randn(
        batch * q_len, shape.num_q_heads, shape.head_dim, generator=gen, device=device
    )
    return query.to(shape.dtype), k_cache, v_cache, meta


def timer(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn`` (``do_bench`` on a GPU; one run under the interpreter)."""
    if torch.cuda.is_available():
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read plus bytes written)."""
    n = (1 << 28) if torch.cuda.is_available() else (1 << 20)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6


def _plan(meta, shape: Shape, mode="auto"):
    from prefixserve.kernels.triton_attention import plan_step

    return plan_step(
        meta,
        num_q_heads=shape.num_q_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        dtype=shape.dtype,
        decode_mode=mode,
    )


def _check(out, query, k_cache, v_cache, meta, shape: Shape) -> None:
    """Spot-check small configurations against the oracle (big ones: the GPU tests cover them)."""
    max_kv_len = int((meta.request_prefix_lens + meta.own_lens).max())
    if max_kv_len * meta.num_requests > 1 << 16:
        return
    from prefixserve.kernels.reference import naive_prefix_attention

    want = naive_prefix_attention(query, k_cache, v_cache, meta, shape.head_dim**-0.5)
    err = (out.float() - want).abs().max().item()
    if not err < (1e-3 if shape.dtype == torch.float32 else 6e-2):
        raise AssertionError(f"kernel output off by {err} (batch {meta.num_requests})")


def _time_attention(q, k, v, meta, plan, shape: Shape) -> float:
    """Check once against the oracle (small cases), then time one layer's attention call."""
    from prefixserve.kernels.triton_attention import prefix_paged_attention

    def run():
        return prefix_paged_attention(q, k, v, plan, shape.head_dim**-0.5)

    _check(run(), q, k, v, meta, shape)
    return timer(run)


def bench_decode(sweep: Sweep, shape: Shape, device, peak_gbs: float) -> list[dict]:
    rows = []
    for batch in sweep.decode_batches:
        for ctx in sweep.decode_contexts:
            for prefix in sweep.decode_prefixes:
                if batch * (ctx + prefix) > TOKEN_CAP:
                    continue
                q, k, v, meta = build_step(batch, ctx, 1, prefix, 1, shape, device)
                plan = _plan(meta, shape)
                ms = _time_attention(q, k, v, meta, plan, shape)
                gbs = batch * (ctx + prefix) * shape.kv_bytes_per_token / ms / 1e6
                rows.append(
                    {
                        "batch": batch,
                        "context": ctx,
                        "prefix": prefix,
                        "mode": plan.mode,
                        "splits": plan.decode_splits,
                        "ms": ms,
                        "GB/s": gbs,
                        "of_copy": gbs / peak_gbs,
                    }
                )
                del q, k, v, meta, plan
    return rows


def bench_grouped(sweep: Sweep, shape: Shape, device) -> list[dict]:
    rows = []
    batch = sweep.group_batch
    for group in sweep.group_sizes:
        for prefix in sweep.group_prefixes:
            q, k, v, meta = build_step(batch, sweep.group_own, 1, prefix, group, shape, device)
            times = {}
            for mode in ("plain", "grouped"):
                times[mode] = _time_attention(q, k, v, meta, _plan(meta, shape, mode), shape)
            auto = _plan(meta, shape).mode
            best = "grouped" if times["grouped"] < times["plain"] else "decode"
            rows.append(
                {
                    "group": group,
                    "prefix": prefix,
                    "plain_ms": times["plain"],
                    "grouped_ms": times["grouped"],
                    "speedup": times["plain"] / times["grouped"],
                    "auto": auto,
                    "auto_is_best": auto == best,
                }
            )
            del q, k, v, meta
    return rows


def _sdpa_baseline(q, k, v, meta, shape: Shape, batch: int, q_len: int, prefix: int):
    """SDPA on dense ``[prefix ; own]`` keys with a lower-right causal mask, or None."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.bias import causal_lower_right

    from prefixserve.kernels.reference import build_gather_plan

    (group,) = build_gather_plan(meta).groups  # one group: every request has q_len tokens
    slots = group.kv_slots  # [B, P + N]
    g = shape.num_q_heads // shape.num_kv_heads
    flat = (-1, shape.num_kv_heads, shape.head_dim)
    keys = k.view(flat)[slots].repeat_interleave(g, dim=2).transpose(1, 2).contiguous()
    values = v.view(flat)[slots].repeat_interleave(g, dim=2).transpose(1, 2).contiguous()
    queries = q.view(batch, q_len, shape.num_q_heads, shape.head_dim).transpose(1, 2).contiguous()
    mask = causal_lower_right(q_len, keys.shape[2])
    backends = [
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
    ]
    for backend in backends if torch.cuda.is_available() else [SDPBackend.MATH]:

        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)

        try:
            run()
        except RuntimeError:  # this backend does not take a lower-right causal mask here
            continue
        return run, backend.name
    return None, "unsupported"


def bench_prefill(sweep: Sweep, shape: Shape, device) -> list[dict]:
    rows = []
    for batch in sweep.prefill_batches:
        for q_len in sweep.prefill_lens:
            for prefix in sweep.prefill_prefixes:
                q, k, v, meta = build_step(batch, q_len, q_len, prefix, 1, shape, device)
                plan = _plan(meta, shape)
                ms = _time_attention(q, k, v, meta, plan, shape)
                flops = (
                    4
                    * batch
                    * shape.num_q_heads
                    * shape.head_dim
                    * (q_len * prefix + q_len * (q_len + 1) / 2)
                )
                base, backend = _sdpa_baseline(q, k, v, meta, shape, batch, q_len, prefix)
                base_ms = timer(base) if base else float("nan")
                rows.append(
                    {
                        "batch": batch,
                        "q_len": q_len,
                        "prefix": prefix,
                        "ms": ms,
                        "TFLOP/s": flops / ms / 1e9,
                        "sdpa_ms": base_ms,
                        "sdpa": backend,
                        "vs_sdpa": base_ms / ms,
                    }
                )
                del q, k, v, meta, plan
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    print(f"\n== {title}")
    if not rows:
        return
    cols = list(rows[0])
    cells = [[f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for row in cells:
        print("  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)))


def plot(results: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for batch in sorted({r["batch"] for r in results["decode"]}):
        rows = [r for r in results["decode"] if r["batch"] == batch and r["prefix"] == 0]
        ax1.plot(
            [r["context"] for r in rows],
            [r["of_copy"] for r in rows],
            marker="o",
            label=f"batch {batch}",
        )
    ax1.set(
        xscale="log",
        xlabel="own context (prefix 0)",
        ylabel="fraction of copy bandwidth",
        title="decode",
    )
    ax1.legend()
    for prefix in sorted({r["prefix"] for r in results["grouped"]}):
        rows = [r for r in results["grouped"] if r["prefix"] == prefix]
        ax2.plot(
            [r["group"] for r in rows],
            [r["speedup"] for r in rows],
            marker="o",
            label=f"prefix {prefix}",
        )
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.set(
        xscale="log", xlabel="group size", ylabel="plain / grouped time", title="grouped decode"
    )
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def run_benchmarks(sweep: Sweep, shape: Shape) -> dict:
    """Run (a), (b), (c); returns the JSON-able results (also used by the smoke test)."""
    import triton

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak = copy_bandwidth(device)
    results = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else "cpu (interpreter)",
        "versions": {"torch": torch.__version__, "triton": triton.__version__},
        "shape": {k: str(v) for k, v in asdict(shape).items()},
        "copy_GB/s": peak,
        "decode": bench_decode(sweep, shape, device, peak),
        "grouped": bench_grouped(sweep, shape, device),
        "prefill": bench_prefill(sweep, shape, device),
    }
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results.json", help="JSON file for all numbers")
    parser.add_argument("--plot", default=None, help="PNG path (default: next to --out)")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes; runs on CPU (interpreter)"
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        if not args.smoke:
            print(
                "bench_attention: needs a CUDA GPU (use --smoke for a CPU check of the code paths)"
            )
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported
    sweep, shape = (SMOKE, SMOKE_SHAPE) if args.smoke else (Sweep(), Shape())
    results = run_benchmarks(sweep, shape)
    print(f"device: {results['device']}, copy bandwidth {results['copy_GB/s']:.0f} GB/s")
    print_table("(a) decode bandwidth", results["decode"])
    print_table("(b) grouped vs plain decode", results["grouped"])
    print_table("(c) prefill vs SDPA", results["prefill"])
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\nresults: {args.out}")
    plot(results, args.plot or os.path.splitext(args.out)[0] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
