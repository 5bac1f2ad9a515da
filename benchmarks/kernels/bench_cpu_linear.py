"""Microbenchmark of the native CPU linear op against ``F.linear`` (ATen's GEMM), fp32.

    python benchmarks/kernels/bench_cpu_linear.py [--rows 1 2 38 64] [--rounds 7] [--smoke]

The work is what one step of the default model (SmolLM2-135M) does in its linear layers: 30
layers of q, k, v, o (576 -> 576, 192, 192, 576) and gate, up, down (576 -> 1536, 1536 -> 576),
each with its own weight (106M parameters, 424 MB, more than any cache), for ``rows`` tokens.
Contenders: ATen, and ``linear_packed`` (the weights packed as panels, as the engine runs
them) on every vectorized instruction set this CPU runs. The machines this runs on drift in
speed over minutes, so each round times every contender once, in rotating order, and the table
reports medians over rounds, with each time as a fraction of ATen's and the GFLOP/s (2 x rows x
parameters per pass); rows beyond 256 get at most 3 rounds. Prints a table and writes JSON.
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


Contender = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(x, weight, panels) -> y."""


def contenders() -> dict[str, Contender]:
    out: dict[str, Contender] = {"aten": lambda x, w, p: F.linear(x, w)}
    for isa in cpu_isas():
        if isa != "baseline":
            out[f"packed {isa}"] = lambda x, w, p, isa=isa: cpu_linear.linear_packed(
                x, p, None, w.shape[0], isa
            )
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 38, 64, 256, 2432])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--smoke", action="store_true", help="2 layers, 2 rounds (a test runs this)"
    )
    parser.add_argument("--out", default="benchmarks/results/cpu_linear.json")
    args = parser.parse_args(argv)
    layers, rounds = (2, 2) if args.smoke else (LAYERS, args.rounds)
    rows_list = [1, 2, 38] if args.smoke else args.rows

    cpu_linear.load(cache_root())
    torch.manual_seed(0)
    weights = [torch.randn(n, k) * 0.02 for _ in range(layers) for n, k in LAYER_SHAPES]
    panels = [cpu_linear.pack_weight(w) for w in weights]
    params = sum(w.numel() for w in weights)
    funcs = contenders()
    names = list(funcs)
    print(f"{layers} layers, {params / 1e6:.0f}M parameters, {torch.get_num_threads()} threads")
    print(f"{'rows':>5} " + " ".join(f"{name:>24}" for name in names))
    results = []
    for rows in rows_list:
        inputs = {k: torch.randn(rows, k) for k in {k for _, k in LAYER_SHAPES}}
        for f in funcs.values():  # correct before timed
            x, w, p = inputs[weights[-1].shape[1]], weights[-1], panels[-1]
            want = F.linear(x.double(), w.double())
            torch.testing.assert_close(f(x, w, p).double(), want, rtol=0, atol=1e-3)

        def one_pass(f: Contender, inputs: dict = inputs) -> None:
            for w, p in zip(weights, panels, strict=True):
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

    info = {"isas": cpu_isas(), "layers": layers, "parameters": params}
    report = {"benchmark": "cpu_linear", **machine_info(processor=True), **info, "results": results}
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
