"""Microbenchmark of the native CPU linear op against ``F.linear`` (ATen's GEMM), fp32 or bf16.

    python benchmarks/kernels/bench_cpu_linear.py [--rows 1 2 38 64] [--rounds 7] [--smoke]
    python benchmarks/kernels/bench_cpu_linear.py --dtype bfloat16

The work is what one step of the default model (SmolLM2-135M) does in its linear layers: 30
layers of q, k, v, o (576 -> 576, 192, 192, 576) and gate, up, down (576 -> 1536, 1536 -> 576),
each with its own weight (106M parameters, 424 MB, more than any cache), for ``rows`` tokens.
Contenders: ATen, and ``linear_packed`` (the weights packed as panels, as the engine runs
them) on every vectorized instruction set this CPU runs; in bf16 also oneDNN's prepacked GEMM
(``mkldnn._linear_pointwise`` on ``mkldnn._reorder_linear_weight``, packed for the row count:
what Inductor's weight freezing compiles a bf16 linear into, AMX where the CPU has it). The
machines this runs on drift in speed over minutes, so each round times every contender once,
in rotating order, and the table reports medians over rounds, with each time as a fraction of
ATen's and the GFLOP/s (2 x rows x parameters per pass); rows beyond 256 get at most 3 rounds.
Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from prefixserve.config import cache_root
from prefixserve.kernels import cpu_linear
from prefixserve.kernels.cpu_isa import cpu_isas

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: bench_common
from bench_common import machine_info, write_report

LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576)]
LAYER_SHAPES += [(576, 1536)]
"""(N, K) of one decoder layer's linears, in call order."""
LAYERS = 30


Contender = Callable[[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]], torch.Tensor]
"""(x, weight, (panels, onednn packed weight)) -> y."""


def contenders(dtype: torch.dtype) -> dict[str, Contender]:
    out: dict[str, Contender] = {"aten": lambda x, w, p: F.linear(x, w)}
    if dtype == torch.bfloat16:
        out["onednn packed"] = lambda x, w, p: torch.ops.mkldnn._linear_pointwise(
            x, p[1], None, "none", [], ""
        )
    for isa in cpu_isas():
        if isa != "baseline":
            out[f"packed {isa}"] = lambda x, w, p, isa=isa: cpu_linear.linear_packed(
                x, p[0], None, w.shape[0], isa
            )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 38, 64, 256, 2432])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--smoke", action="store_true", help="2 layers, 2 rounds (a test runs this)"
    )
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--out", default=None, help="default benchmarks/results/cpu_linear[_bf16].json"
    )
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    out_path = args.out or (
        "benchmarks/results/cpu_linear.json"
        if dtype == torch.float32
        else "benchmarks/results/cpu_linear_bf16.json"
    )
    layers, rounds = (2, 2) if args.smoke else (LAYERS, args.rounds)
    rows_list = [1, 2, 38] if args.smoke else args.rows

    cpu_linear.load(cache_root())
    torch.manual_seed(0)
    weights = [(torch.randn(n, k) * 0.02).to(dtype) for _ in range(layers) for n, k in LAYER_SHAPES]
    panels = [cpu_linear.pack_weight(w) for w in weights]
    params = sum(w.numel() for w in weights)
    funcs = contenders(dtype)
    names = list(funcs)
    print(
        f"{layers} layers, {params / 1e6:.0f}M parameters, {args.dtype}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"{'rows':>5} " + " ".join(f"{name:>24}" for name in names))
    results = []
    for rows in rows_list:
        inputs = {k: torch.randn(rows, k).to(dtype) for k in {k for _, k in LAYER_SHAPES}}
        packed = [
            (p, torch.ops.mkldnn._reorder_linear_weight(w, rows) if "onednn packed" in funcs else p)
            for w, p in zip(weights, panels, strict=True)
        ]
        for f in funcs.values():  # correct before timed
            x, w, p = inputs[weights[-1].shape[1]], weights[-1], packed[-1]
            want = F.linear(x.double(), w.double())
            tol = 1e-3 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(f(x, w, p).double(), want, rtol=0, atol=tol)

        def one_pass(f: Contender, inputs: dict = inputs, packed: list = packed) -> None:
            for w, p in zip(weights, packed, strict=True):
                f(inputs[w.shape[1]], w, p)

        samples: dict[str, list[float]] = {name: [] for name in funcs}
        for r in range(rounds if rows <= 256 else min(rounds, 3)):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                one_pass(funcs[name])  # warm: the weights leave the caches again meanwhile
                start = time.perf_counter()
                one_pass(funcs[name])
                samples[name].append((time.perf_counter() - start) * 1e3)
        ms = {name: statistics.median(s) for name, s in samples.items()}
        cells = []
        for name in names:
            gflops = 2 * rows * params / ms[name] / 1e6
            ratio = "" if name == "aten" else f" {ms[name] / ms['aten']:.2f}x"
            cells.append(f"{ms[name]:7.1f} ms {gflops:4.0f} GF{ratio}".rjust(24))
        print(f"{rows:>5} " + " ".join(cells), flush=True)
        results.append({"rows": rows, "ms": ms, "samples_ms": samples})

    info = {"isas": cpu_isas(), "layers": layers, "parameters": params, "dtype": args.dtype}
    report = {"benchmark": "cpu_linear", **machine_info(processor=True), **info, "results": results}
    write_report(out_path, report)
    return report


if __name__ == "__main__":
    main()
