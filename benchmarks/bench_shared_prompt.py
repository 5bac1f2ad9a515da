"""Shared system prompt: 64 chat requests under one long system prompt, served as a text adapter.

Workload: ``--requests`` chats "Tell me about <topic>." (chat template), ``--new-tokens`` each,
greedy, eos ignored, on the default model in fp32 (or ``--dtype``). For each system prompt
length (``0`` = none, the template's default system line) it measures, in one process:

* prefixserve with the system prompt as a text adapter (its prefix computed once, warm before
  the clock starts), once per attention backend (``cpu``: the native op; ``torch``: the
  PyTorch reference);
* transformers' batched ``generate`` (whole batch at once, left padding) with the system prompt
  in every prompt: the same tokens, recomputed per request.

Each engine rate also comes as its share of the memory-bound limit (``mem``): a decode step
streams every weight once, so ``requests x bandwidth / weight bytes`` tokens a second at most,
with the bandwidth measured in the same run. Beside each ratio it prints a FLOP bound: what the
ratio would be if attention over the prefix cost no more per FLOP than the model's matmuls
(every request's queries must still meet every prefix key: ``4 * P * Hq * D`` FLOPs per token
and layer, against ``2 * params`` for the model).

The engine's figure is the best of ``--repeats`` rounds (each round runs every length, so a busy
moment on a shared machine cannot favour one length); the peer runs once (it takes minutes).
Prints a table, writes JSON and (with matplotlib) a PNG next to it.

    python benchmarks/bench_shared_prompt.py                       # 64 x 64, prompts 0/512/2048
    python benchmarks/bench_shared_prompt.py --requests 8 --new-tokens 8 --prompt-tokens 0 128
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch
from bench_common import machine_info, memory_bandwidth_gbs, model_weight_bytes, write_report
from bench_offline import TOPICS, bench_transformers
from transformers import AutoModelForCausalLM

from prefixserve import LLM, SamplingParams

POLICY = [
    "You are Ada, the support assistant of Northwind Home Networks.",
    "Answer in plain language, in at most five sentences, unless the customer asks for detail.",
    "Section {i}: customers on the {plan} plan may ask about {topic}; explain the relevant "
    "setting, where it lives in the {device} app, and what changes once it is switched on.",
    "Never ask for a full password; the last four characters of the account number suffice.",
    "If a {device} shows a {color} light for more than ten minutes, suggest a restart, then "
    "a factory reset only after the customer has saved their {topic} settings.",
    "Escalate to a human agent when the customer mentions a refund above {amount} dollars, a "
    "safety concern, or a third failed attempt at {topic}.",
    "Refer to the {plan} plan's limits by name, and never promise delivery dates.",
]
PLANS = ["Basic", "Family", "Studio", "Business", "Campus"]
DEVICES = ["Beacon router", "Relay mesh point", "Harbor gateway", "Lumen extender"]
COLORS = ["amber", "red", "blinking blue", "white"]
FEATURES = ["parental controls", "guest networks", "port forwarding", "firmware updates", "VPN"]


def system_prompt(llm: LLM, tokens: int) -> str:
    """A plausible support-agent system turn (chat-template text) of about ``tokens`` tokens."""
    head, tail = "<|im_start|>system\n", "<|im_end|>\n"
    lines: list[str] = []
    i = 0
    while len(llm.engine.tokenize(head + " ".join(lines) + tail)) < tokens:
        template = POLICY[i % len(POLICY)]
        lines.append(
            template.format(
                i=i // len(POLICY) + 1,
                plan=PLANS[i % len(PLANS)],
                topic=FEATURES[i % len(FEATURES)],
                device=DEVICES[i % len(DEVICES)],
                color=COLORS[i % len(COLORS)],
                amount=50 * (i % 7 + 1),
            )
        )
        i += 1
    return head + " ".join(lines) + tail


def chat_prompts(llm: LLM, n: int, system: str) -> tuple[list[list[int]], list[list[int]]]:
    """``(request ids, full ids)``: each user turn alone (after the adapter's system turn) and
    with the system turn in front (what transformers gets). Without a system prompt both are
    the template's own rendering (with its default system line)."""
    requests, full = [], []
    for k in range(n):
        user = {"role": "user", "content": f"Tell me about {TOPICS[k % len(TOPICS)]}."}
        if not system:
            ids = llm.apply_chat_template([user])
            requests.append(ids)
            full.append(ids)
            continue
        text = str(
            llm.tokenizer.apply_chat_template(
                [{"role": "system", "content": _content(system)}, user],
                add_generation_prompt=True,
                tokenize=False,
            )
        )
        if not text.startswith(system):
            raise RuntimeError("the chat template renders the system turn differently")
        request = llm.engine.tokenize(text[len(system) :])
        prefix = llm.engine.tokenize(system)
        if prefix + request != llm.engine.tokenize(text):
            raise RuntimeError("the system turn and the user turn do not tokenize apart")
        requests.append(request)
        full.append(prefix + request)
    return requests, full


def _content(system_turn: str) -> str:
    return system_turn.removeprefix("<|im_start|>system\n").removesuffix("<|im_end|>\n")


def bench_engine(llm: LLM, prompts: list[list[int]], new_tokens: int, adapter: str | None) -> float:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_new_tokens=2), adapter=adapter, use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, adapter=adapter, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == new_tokens for o in outputs)
    return elapsed


def flop_bound(llm: LLM, n: int) -> float:
    """The throughput ratio (with an ``n``-token prefix / without) if attention over the prefix
    ran at the model's own matmul rate: the model's matmul FLOPs per decode token over those
    plus the prefix attention's (``4 * n * Hq * D`` per layer: scores and values)."""
    model = llm.engine.runner.model
    config = model.config
    matmul = 2 * sum(p.numel() for p in model.parameters() if p.dim() == 2)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 4 * n * config.num_attention_heads * head_dim * config.num_hidden_layers
    return matmul / (matmul + attention)


def run_engine(
    backend: str, lengths: list[int], args: argparse.Namespace
) -> tuple[dict[int, float], dict[int, float]]:
    """Output tokens/s of the engine on ``backend`` per system prompt length (the best of
    ``--repeats`` rounds, each over every length: a shared machine slows some rounds), and
    :func:`flop_bound` per length."""
    llm = LLM(dtype=args.dtype, max_num_seqs=args.requests, attention_backend=backend)
    bench_engine(llm, chat_prompts(llm, 2, "")[0], 4, None)
    workloads = {}
    for n in lengths:
        system = system_prompt(llm, n) if n else ""
        adapter = None
        if system:
            adapter = f"system-{n}"
            llm.load_adapter(adapter, text=system)
        workloads[n] = (chat_prompts(llm, args.requests, system)[0], adapter)
    rates = dict.fromkeys(lengths, 0.0)
    for _ in range(args.repeats):
        for n, (requests, adapter) in workloads.items():
            elapsed = bench_engine(llm, requests, args.new_tokens, adapter)
            rate = args.requests * args.new_tokens / elapsed
            rates[n] = max(rates[n], rate)
            print(f"  prefixserve [{backend}] system prompt {n:>5}: {rate:7.1f} tok/s", flush=True)
    rates_bound = {n: flop_bound(llm, n) for n in lengths}
    del llm
    gc.collect()
    return rates, rates_bound


def run_transformers(lengths: list[int], args: argparse.Namespace) -> dict[int, float]:
    llm = LLM(dtype=args.dtype, max_num_seqs=1, num_kv_blocks=16)  # tokenizer and model path
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(llm.engine.model_path, dtype=dtype)
    model.eval()
    pad_id = llm.tokenizer.pad_token_id or 0
    bench_transformers(model, pad_id, chat_prompts(llm, 2, "")[1], 4)
    rates = {}
    for n in lengths:
        system = system_prompt(llm, n) if n else ""
        _, full = chat_prompts(llm, args.requests, system)
        elapsed = bench_transformers(model, pad_id, full, args.new_tokens)
        rates[n] = args.requests * args.new_tokens / elapsed
        print(f"  transformers generate system prompt {n:>5}: {rates[n]:7.1f} tok/s", flush=True)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[0, 512, 2048])
    parser.add_argument("--backends", nargs="*", default=["cpu", "torch"], help="none: peer only")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="engine rounds; the best counts")
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="weights and KV of the engine and the peer (default float32)",
    )
    parser.add_argument("--out", default="benchmarks/results/shared_prompt.json")
    args = parser.parse_args()
    lengths = sorted(set(args.prompt_tokens) | {0})

    print(f"{args.requests} requests x {args.new_tokens} new tokens, {args.dtype}, default model")
    bandwidth = memory_bandwidth_gbs()
    engine, bound = {}, {}
    for backend in args.backends:
        engine[backend], bound = run_engine(backend, lengths, args)
    peer = {} if args.no_transformers else run_transformers(lengths, args)
    bandwidth = max(bandwidth, memory_bandwidth_gbs())  # before and after: the machine drifts
    weights = model_weight_bytes(args.dtype)
    limit = args.requests * bandwidth * 1e9 / weights  # tok/s if every step streams the weights
    rows = [_row(n, engine, peer, bound, limit) for n in lengths]
    print(f"memory bandwidth {bandwidth:.1f} GB/s, {weights / 2**20:.0f} MiB of weights a step")
    _print_table(rows, args.backends, bool(peer))
    report = {
        "benchmark": "shared_prompt",
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "dtype": args.dtype,
        "memory_bandwidth_gbs": bandwidth,
        "weight_bytes": weights,
        **machine_info(processor=True),
        "rows": rows,
    }
    out = write_report(args.out, report)
    _plot(rows, args.backends, bool(peer), out.with_suffix(".png"))


def _row(
    n: int,
    engine: dict[str, dict[int, float]],
    peer: dict[int, float],
    bound: dict[int, float],
    limit: float,
) -> dict:
    row: dict = {"system_prompt_tokens": n}
    if bound:
        row["flop_bound_vs_no_prompt"] = bound[n]
    for backend, rates in engine.items():
        row[f"{backend}_tok_s"] = rates[n]
        row[f"{backend}_memory_bound_share"] = rates[n] / limit
        row[f"{backend}_vs_no_prompt"] = rates[n] / rates[0]
        if peer:
            row[f"{backend}_vs_transformers"] = rates[n] / peer[n]
    if peer:
        row["transformers_tok_s"] = peer[n]
    return row


def _print_table(rows: list[dict], backends: list[str], with_peer: bool) -> None:
    header = f"{'system prompt':>13}"
    for b in backends:
        header += f" {b + ' tok/s':>11} {'mem':>5} {'vs none':>7}"
        header += f" {'vs HF':>6}" if with_peer else ""
    header += f" {'HF generate tok/s':>18}" if with_peer else ""
    with_bound = "flop_bound_vs_no_prompt" in rows[0]
    header += f" {'FLOP bound':>10}" if with_bound else ""
    print("\n" + header)
    for r in rows:
        line = f"{r['system_prompt_tokens']:>13}"
        for b in backends:
            line += f" {r[f'{b}_tok_s']:>11.1f} {100 * r[f'{b}_memory_bound_share']:>4.0f}%"
            line += f" {r[f'{b}_vs_no_prompt']:>6.2f}x"
            line += f" {r[f'{b}_vs_transformers']:>5.2f}x" if with_peer else ""
        line += f" {r['transformers_tok_s']:>18.1f}" if with_peer else ""
        line += f" {r['flop_bound_vs_no_prompt']:>9.2f}x" if with_bound else ""
        print(line)
    if with_bound:
        print(
            "FLOP bound: the 'vs none' ratio if attention over the prefix ran at the model's own "
            "matmul rate (FLOPs per decode token: model matmuls / (those + prefix attention))"
        )


def _plot(rows: list[dict], backends: list[str], with_peer: bool, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    lengths = [r["system_prompt_tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    series = [(f"prefixserve [{b}]", f"{b}_tok_s") for b in backends]
    if with_peer:
        series.append(("transformers generate", "transformers_tok_s"))
    for label, key in series:
        ax.plot(lengths, [r[key] for r in rows], marker="o", label=label)
    ax.set_xlabel("shared system prompt (tokens)")
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
