"""Where a decode step's time goes with a shared system prompt: ``torch.profiler`` over a few
steps of the shared-prompt workload (all requests decoding), per attention backend.

    python benchmarks/profile_shared_prompt.py --prompt-tokens 512 --steps 10
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_shared_prompt import chat_prompts, system_prompt

from prefixserve import LLM, SamplingParams


def profile(backend: str, args: argparse.Namespace) -> None:
    llm = LLM(dtype="float32", max_num_seqs=args.requests, attention_backend=backend)
    engine = llm.engine
    system = system_prompt(llm, args.prompt_tokens) if args.prompt_tokens else ""
    adapter = None
    if system:
        adapter = "system"
        llm.load_adapter(adapter, text=system)
    params = SamplingParams(max_new_tokens=args.warm_steps + args.steps + 8, ignore_eos=True)
    for prompt in chat_prompts(llm, args.requests, system)[0]:
        engine.add_request(prompt, params, adapter=adapter)
    for _ in range(args.warm_steps):  # prefix fill and prefill: every request decodes after
        engine.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        elapsed = time.perf_counter() - start
    print(
        f"\n[{backend}] system prompt {args.prompt_tokens} tokens, {args.requests} decodes: "
        f"{elapsed / args.steps * 1e3:.0f} ms/step under the profiler"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warm-steps", type=int, default=12)
    parser.add_argument("--backends", nargs="+", default=["torch", "cpu"])
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    for backend in args.backends:
        profile(backend, args)


if __name__ == "__main__":
    main()
