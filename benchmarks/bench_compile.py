"""Compiled vs eager prefixserve vs transformers' batched ``generate``, in one run.

Workloads (default model, fp32, greedy, eos ignored): 64 chat prompts x 64 new tokens, one
request x 64 new tokens, and the time to first token of one request (median of ``--repeats``).
Contenders: transformers, prefixserve eager, prefixserve compiled, and prefixserve compiled
with ATen's linears instead of the native linear op (``native_cpu_linear=False``: weights frozen
and prepacked by Inductor), which isolates the op's share. Each runs in a subprocess of its own,
so that its start time (model load, and compiled, the warm-up) and its peak RSS are its own.
Inductor's on-disk cache starts empty (a directory of this run), so the compiled start is a
cold one; the compiled engine is then started once more to time a restart from that cache.
Prints a table and writes JSON.

    python benchmarks/bench_compile.py                   # all four
    python benchmarks/bench_compile.py --only compiled   # one contender
    python benchmarks/bench_compile.py --profile         # + torch.profiler tables of a decode step
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_offline import bench_transformers, make_prompts

CONTENDERS = ("transformers", "eager", "compiled", "compiled-aten")


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_prefixserve(mode: str, args: argparse.Namespace) -> dict:
    from prefixserve import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        dtype="float32",
        enforce_eager=mode == "eager",
        native_cpu_linear=mode != "compiled-aten",
        max_num_seqs=args.batch,
    )
    startup = time.perf_counter() - start
    if args.startup_only:
        return {"startup_s": startup}
    runner = llm.engine.runner
    prompts = make_prompts(llm, args.batch, seed=args.batch)
    one = make_prompts(llm, 1, seed=1)
    warm = make_prompts(llm, 3, seed=99)
    llm.generate(warm, SamplingParams(max_new_tokens=4, ignore_eos=True), use_tqdm=False)

    def tok_s(batch: list[list[int]]) -> float:
        params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        elapsed = time.perf_counter() - t
        assert all(len(o.token_ids) == args.new_tokens for o in outs)
        return len(batch) * args.new_tokens / elapsed

    def ttft() -> float:
        engine = llm.engine
        t = time.perf_counter()
        engine.add_request(one[0], SamplingParams(max_new_tokens=1))
        while not engine.step():
            pass
        return time.perf_counter() - t

    result = {
        "startup_s": startup,
        "batch_tok_s": tok_s(prompts),
        "one_tok_s": tok_s(one),
        "ttft_ms": 1e3 * statistics.median(ttft() for _ in range(args.repeats)),
        "graphs": None if runner.compiled is None else runner.compiled.num_graphs,
        "native_linears": runner.native_linears,
    }
    if args.profile:
        result["profile"] = profile_decode(llm, prompts)
    result["peak_rss_gib"] = _rss_gib()
    return result


def profile_decode(llm, prompts: list[list[int]]) -> str:
    """torch.profiler table of batch-wide decode steps (after the prompts are in)."""
    from torch.profiler import ProfilerActivity, profile

    from prefixserve import SamplingParams

    engine = llm.engine
    for p in prompts:
        engine.add_request(p, SamplingParams(max_new_tokens=16, ignore_eos=True))
    for _ in range(8):  # prefill, then a few decode steps
        engine.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):
            engine.step()
    while engine.has_unfinished_requests():
        engine.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)


def run_transformers(args: argparse.Namespace) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefixserve.model_loader import resolve_model_path

    start = time.perf_counter()
    path = resolve_model_path(None)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    startup = time.perf_counter() - start

    class _Chat:  # make_prompts needs only apply_chat_template
        def apply_chat_template(self, messages):
            text = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
            return tokenizer.encode(text, add_special_tokens=False)

    prompts = make_prompts(_Chat(), args.batch, seed=args.batch)  # type: ignore[arg-type]
    one = make_prompts(_Chat(), 1, seed=1)  # type: ignore[arg-type]
    pad = tokenizer.pad_token_id or 0
    bench_transformers(model, pad, make_prompts(_Chat(), 3, seed=99), 4)  # type: ignore[arg-type]
    n = args.new_tokens
    ttft = [bench_transformers(model, pad, one, 1) for _ in range(args.repeats)]
    return {
        "startup_s": startup,
        "batch_tok_s": args.batch * n / bench_transformers(model, pad, prompts, n),
        "one_tok_s": n / bench_transformers(model, pad, one, n),
        "ttft_ms": 1e3 * statistics.median(ttft),
        "peak_rss_gib": _rss_gib(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--only", choices=CONTENDERS, nargs="+", default=list(CONTENDERS))
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--startup-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/compile.json")
    args = parser.parse_args()
    if args.child:
        fn = run_transformers if args.child == "transformers" else run_prefixserve
        result = fn(args) if args.child == "transformers" else fn(args.child, args)
        print("RESULT " + json.dumps(result))
        return

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-compile-inductor-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}

        def child(who: str, *extra: str) -> dict:
            command = [sys.executable, __file__, "--child", who, *extra]
            command += ["--batch", str(args.batch), "--new-tokens", str(args.new_tokens)]
            command += ["--repeats", str(args.repeats)]
            out = subprocess.run(command, capture_output=True, text=True, check=True, env=env)
            return json.loads(out.stdout.rsplit("RESULT ", 1)[1])

        for who in args.only:
            results[who] = child(who, *(["--profile"] if args.profile else []))
            if "profile" in results[who]:
                print(f"--- {who}: decode steps, batch {args.batch}\n{results[who].pop('profile')}")
        if "compiled" in results:
            results["compiled"]["restart_s"] = child("compiled", "--startup-only")["startup_s"]
    base = results.get("transformers")
    threads = torch.get_num_threads()
    print(f"\n{args.batch} prompts x {args.new_tokens} tokens, fp32, {threads} threads")
    head = ["batch tok/s", "one tok/s", "TTFT ms", "start s", "RSS GiB"]
    print(f"{'':>13} {head[0]:>12} {head[1]:>10} {head[2]:>8} {head[3]:>8} {head[4]:>8}")
    for who, r in results.items():
        print(
            f"{who:>13} {r['batch_tok_s']:>12.1f} {r['one_tok_s']:>10.1f} {r['ttft_ms']:>8.1f} "
            f"{r['startup_s']:>8.1f} {r['peak_rss_gib']:>8.2f}"
            + (
                f"  (restart from Inductor's cache: {r['restart_s']:.1f} s)"
                if "restart_s" in r
                else ""
            )
        )
        if base and who != "transformers":
            r["vs_transformers"] = {
                "batch": r["batch_tok_s"] / base["batch_tok_s"],
                "one": r["one_tok_s"] / base["one_tok_s"],
                "ttft": r["ttft_ms"] / base["ttft_ms"],
            }
            v = r["vs_transformers"]
            print(f"{'':>13} x{v['batch']:>11.2f} x{v['one']:>9.2f} x{v['ttft']:>7.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    info |= {"machine": platform.machine(), "batch": args.batch, "new_tokens": args.new_tokens}
    out.write_text(json.dumps({"benchmark": "compile", **info, "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
