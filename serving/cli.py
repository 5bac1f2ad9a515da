"""The ``prefixserve`` command line."""

from __future__ import annotations

import argparse
import sys
import time

DEMO_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Give me three tips for learning a new language.",
    "Explain in two sentences why the sky is blue.",
    "What is 12 times 12?",
    "Name a famous painting by Leonardo da Vinci and say one thing about it.",
    "Suggest a name for a friendly robot.",
    "How do I boil an egg? Answer briefly.",
]


def _demo(args: argparse.Namespace) -> int:
    from .llm import LLM
    from .sampling_params import SamplingParams

    print("prefixserve demo: loading the embedded default model (SmolLM2-135M-Instruct)...")
    llm = LLM(args.model, dtype=args.dtype)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    conversations = [[{"role": "user", "content": q}] for q in DEMO_QUESTIONS]
    start = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    for question, out in zip(DEMO_QUESTIONS, outputs):
        print(f"\n> {question}\n{out.text.strip()}  [{out.finish_reason}]")
    tokens = sum(len(o.token_ids) for o in outputs)
    print(
        f"\n{len(outputs)} requests in one continuous batch: {tokens} tokens in {elapsed:.1f} s "
        f"= {tokens / elapsed:.1f} output tokens/s ({llm.engine.runner.device}, "
        f"{llm.engine.runner.backend.name} attention)"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefixserve",
        description="Serve one frozen language model with many soft-prompt adapters.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="generate answers to a batch of chat prompts and print them with the throughput",
        description="Answer a batch of varied chat prompts with continuous batching.",
    )
    demo.add_argument(
        "--model", default=None, help="HF model directory (default: the embedded SmolLM2-135M)"
    )
    demo.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    demo.add_argument("--max-new-tokens", type=int, default=64, help="tokens per answer at most")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, FileNotFoundError) as e:
        print(f"prefixserve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
