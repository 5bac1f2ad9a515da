"""Compiled vs eager prefixserve vs transformers' batched ``generate``, in one run.

Workloads (default model, fp32 or ``--dtype``, greedy, eos ignored): 64 chat prompts x 64 new
tokens, one request x 64 new tokens, and the time to first token of one request. Beside each
tok/s the table prints its fraction of the memory-bound limit: a decode step streams every
weight once, so a batch of ``B`` makes at most ``B x bandwidth / weight bytes`` tokens a second,
with the bandwidth measured in the same run (a large copy). Contenders: transformers,
prefixserve eager, prefixserve compiled, and prefixserve compiled with ATen's linears instead of
the native linear op (``native_cpu_linear=False``: weights frozen and prepacked by Inductor),
which isolates the op's share.

Each contender lives in a subprocess of its own, so that its start time (model load, and
compiled, the warm-up) and its peak RSS are its own. The machines this runs on drift in speed
by up to 2x over minutes, so the contenders are measured *interleaved*: all of them are started
first, then every round runs each workload once per contender, in a rotating order, and the
table reports the median over rounds. Inductor's on-disk cache starts empty (a directory of this
run), so the compiled start is a cold one; the compiled engine is then started once more to time
a restart from that cache. Prints a table and writes JSON.

    python benchmarks/bench_compile.py                   # all four
    python benchmarks/bench_compile.py --only compiled transformers
    python benchmarks/bench_compile.py --workloads ttft_ms one_tok_s
    python benchmarks/bench_compile.py --profile         # + torch.profiler tables of a decode step
    python benchmarks/bench_compile.py --dtype bfloat16  # bf16 weights and KV (both contenders)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import IO

import torch
from bench_common import machine_info, memory_bandwidth_gbs, model_weight_bytes, write_report
from bench_offline import bench_transformers, make_prompts

CONTENDERS = ("transformers", "eager", "compiled", "compiled-aten")
WORKLOADS = ("batch_tok_s", "one_tok_s", "ttft_ms")
RESULT = "RESULT "
"""Prefix of the lines a contender answers with on stdout (anything else there is ignored)."""


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


Workloads = dict[str, Callable[[], float]]


def prefixserve_workloads(mode: str, args: argparse.Namespace) -> tuple[float, Workloads, dict]:
    """(start seconds, workload name -> one measurement, extra facts) of a prefixserve engine."""
    from prefixserve import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        dtype=args.dtype,
        enforce_eager=mode == "eager",
        native_cpu_linear=mode != "compiled-aten",
        max_num_seqs=args.batch,
    )
    startup = time.perf_counter() - start
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

    def ttft_ms() -> float:
        engine = llm.engine
        t = time.perf_counter()
        engine.add_request(one[0], SamplingParams(max_new_tokens=1))
        while not engine.step():
            pass
        return 1e3 * (time.perf_counter() - t)

    facts = {
        "graphs": None if runner.compiled is None else runner.compiled.num_graphs,
        "native_linears": runner.native_linears,
    }
    if args.profile:
        facts["profile"] = profile_decode(llm, prompts)
    workloads = {
        "batch_tok_s": lambda: tok_s(prompts),
        "one_tok_s": lambda: tok_s(one),
        "ttft_ms": ttft_ms,
    }
    return startup, workloads, facts


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


def transformers_workloads(args: argparse.Namespace) -> tuple[float, Workloads, dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prefixserve.model_loader import resolve_model_path

    start = time.perf_counter()
    path = resolve_model_path(None)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
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
    workloads = {
        "batch_tok_s": lambda: args.batch * n / bench_transformers(model, pad, prompts, n),
        "one_tok_s": lambda: n / bench_transformers(model, pad, one, n),
        "ttft_ms": lambda: 1e3 * bench_transformers(model, pad, one, 1),
    }
    return startup, workloads, {}


def serve_child(who: str, args: argparse.Namespace) -> None:
    """A contender's process: start, answer ``READY``, then one measurement per workload name
    read from stdin until ``quit`` (answering with its peak RSS)."""
    if who == "transformers":
        startup, workloads, facts = transformers_workloads(args)
    else:
        startup, workloads, facts = prefixserve_workloads(who, args)
    print(RESULT + json.dumps({"startup_s": startup, **facts}), flush=True)
    if args.startup_only:
        return
    for line in sys.stdin:
        command = line.strip()
        if command == "quit":
            break
        print(RESULT + json.dumps(workloads[command]()), flush=True)
    print(RESULT + json.dumps(_rss_gib()), flush=True)


class Child:
    """The parent's handle on one contender's process."""

    def __init__(self, who: str, args: argparse.Namespace, env: dict, *extra: str) -> None:
        command = [sys.executable, __file__, "--child", who, *extra]
        command += ["--batch", str(args.batch), "--new-tokens", str(args.new_tokens)]
        command += ["--dtype", args.dtype]
        self.who = who
        self.log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (lives as long as the child)
        """The contender's stderr (progress bars, warnings), shown if it fails."""
        self.process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
        )
        self.ready: dict = self._answer()  # type: ignore[assignment]

    def ask(self, command: str) -> object:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> float:
        """Peak RSS in GiB."""
        rss = float(self.ask("quit"))  # type: ignore[arg-type]
        self.process.wait()
        return rss

    def _answer(self) -> object:
        stdout: IO[str] | None = self.process.stdout
        assert stdout is not None
        for line in stdout:
            if line.startswith(RESULT):
                return json.loads(line[len(RESULT) :])
        code = self.process.wait()
        self.log.seek(0)
        tail = "\n".join(self.log.read().strip().splitlines()[-20:])
        raise RuntimeError(f"{self.who} exited with {code} before answering:\n{tail}")


def measure(args: argparse.Namespace) -> dict[str, dict]:
    """Start every contender, then run ``--repeats`` rounds of every workload, interleaved."""
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-compile-inductor-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        children = {}
        for who in args.only:
            print(f"starting {who} ...", flush=True)
            children[who] = Child(who, args, env, *(["--profile"] if args.profile else []))
        samples: dict[str, dict[str, list[float]]] = {
            w: {k: [] for k in args.workloads} for w in args.only
        }
        for round_ in range(args.repeats):
            order = args.only[round_ % len(args.only) :] + args.only[: round_ % len(args.only)]
            for workload in args.workloads:
                if workload == "batch_tok_s" and round_ >= args.batch_repeats:
                    continue
                for who in order:
                    samples[who][workload].append(float(children[who].ask(workload)))  # type: ignore[arg-type]
            print(f"round {round_ + 1}/{args.repeats} done", flush=True)
        for who, child in children.items():
            facts = dict(child.ready)
            profile = facts.pop("profile", None)
            if profile:
                print(f"--- {who}: decode steps, batch {args.batch}\n{profile}")
            results[who] = facts | {k: statistics.median(v) for k, v in samples[who].items()}
            results[who]["samples"] = samples[who]
            results[who]["peak_rss_gib"] = child.close()
        if "compiled" in results:
            restart = Child("compiled", args, env, "--startup-only")
            results["compiled"]["restart_s"] = restart.ready["startup_s"]
            restart.process.wait()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7, help="rounds (one request, TTFT)")
    parser.add_argument(
        "--batch-repeats", type=int, default=2, help="rounds that also run the batch workload"
    )
    parser.add_argument("--only", choices=CONTENDERS, nargs="+", default=list(CONTENDERS))
    parser.add_argument(
        "--workloads",
        choices=WORKLOADS,
        nargs="+",
        default=list(WORKLOADS),
        help="measure only these (default: all)",
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="weights and KV of every contender (default float32)",
    )
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--startup-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/compile.json")
    args = parser.parse_args()
    if args.child:
        serve_child(args.child, args)
        return

    bandwidth = memory_bandwidth_gbs()
    weights = model_weight_bytes(args.dtype)
    results = measure(args)
    bandwidth = max(bandwidth, memory_bandwidth_gbs())  # before and after: the machine drifts
    base = results.get("transformers")
    threads = torch.get_num_threads()
    print(
        f"\n{args.batch} prompts x {args.new_tokens} tokens, {args.dtype}, {threads} threads; "
        f"medians of {args.batch_repeats} (batch) and {args.repeats} (one, TTFT) interleaved "
        f"rounds; memory bandwidth {bandwidth:.1f} GB/s, (%) = share of the memory-bound limit"
    )
    head = ["batch tok/s", "one tok/s", "TTFT ms", "start s", "RSS GiB"]
    print(f"{'':>13} {head[0]:>12} {head[1]:>10} {head[2]:>8} {head[3]:>8} {head[4]:>8}")

    def cell(value: float | None, width: int, digits: int = 1, mark: str = "") -> str:
        return f"{mark}{value:.{digits}f}".rjust(width) if value is not None else "-".rjust(width)

    for who, r in results.items():
        restart = r.get("restart_s")
        steps_per_s = bandwidth * 1e9 / weights  # decode steps that stream every weight once
        r["roofline"] = {
            key: r[key] / (steps_per_s * rows)
            for key, rows in (("batch_tok_s", args.batch), ("one_tok_s", 1))
            if key in r
        }
        print(
            f"{who:>13} {cell(r.get('batch_tok_s'), 12)} {cell(r.get('one_tok_s'), 10)} "
            f"{cell(r.get('ttft_ms'), 8)} {r['startup_s']:>8.1f} {r['peak_rss_gib']:>8.2f}"
            + (f"  (restart from Inductor's cache: {restart:.1f} s)" if restart else "")
        )

        def share(key: str, width: int, r: dict = r) -> str:
            value = r["roofline"].get(key)
            return (f"{100 * value:.1f}%" if value is not None else "-").rjust(width)

        print(
            f"{'':>13} {share('batch_tok_s', 12)} {share('one_tok_s', 10)}   of the memory-bound"
            f" limit: {weights / 2**20:.0f} MiB of weights a step"
        )
        if base and who != "transformers":
            v = {
                name: r[key] / base[key]
                for name, key in (
                    ("batch", "batch_tok_s"),
                    ("one", "one_tok_s"),
                    ("ttft", "ttft_ms"),
                )
                if key in r
            }
            r["vs_transformers"] = v
            print(
                f"{'':>13} {cell(v.get('batch'), 12, 2, 'x')} {cell(v.get('one'), 10, 2, 'x')} "
                f"{cell(v.get('ttft'), 8, 2, 'x')}"
            )
    info = {"batch": args.batch, "new_tokens": args.new_tokens, "rounds": args.repeats}
    info |= {"dtype": args.dtype, "memory_bandwidth_gbs": bandwidth, "weight_bytes": weights}
    info |= {"workloads": args.workloads}
    write_report(args.out, {"benchmark": "compile", **machine_info(), **info, "results": results})


if __name__ == "__main__":
    main()
