"""Offline end-to-end throughput: prefixserve vs transformers' batched ``generate``.

Same model, dtype, chat prompts of varied length and a fixed output length (eos ignored) for
both; transformers gets the whole batch at once with left padding. Prints a table and writes
JSON with output tokens/s of each and their ratio.

    python benchmarks/bench_offline.py --batch-sizes 8 32 --max-new-tokens 64
"""

from __future__ import annotations

import argparse
import random
import time

import torch
from bench_common import machine_info, write_report
from transformers import AutoModelForCausalLM

from prefixserve import LLM, SamplingParams

TOPICS = [
    "the moon",
    "bread",
    "volcanoes",
    "chess",
    "the printing press",
    "honey bees",
    "jazz",
    "glaciers",
    "the Roman empire",
    "solar panels",
    "octopuses",
    "coffee",
]
ASKS = [
    "Tell me one fact about {t}.",
    "Write a short poem about {t}.",
    "Explain {t} to a ten-year-old in a few sentences.",
    "I am preparing a class on {t}. List the key ideas a beginner should learn first, say "
    "why each matters, and suggest one simple activity that makes the topic memorable.",
    "Here are my notes: {t} has a long history, many people study it, and there are several "
    "common misconceptions about it. Rewrite the notes as a clear paragraph, then add three "
    "questions a curious reader might ask next, and answer the first one briefly. Keep the "
    "tone friendly and avoid jargon. Mention one surprising detail if you know one.",
]


def make_prompts(llm: LLM, n: int, seed: int = 0, long_share: float = 0.0) -> list[list[int]]:
    """``n`` chat prompts of 20-110 tokens; with ``long_share``, that fraction of them instead
    asks about a pasted document of ~600 tokens (a long-tail length mix)."""
    rng = random.Random(seed)
    if long_share > 0:
        document = " ".join(
            f"Section {i}: notes on {rng.choice(TOPICS)} and {rng.choice(TOPICS)}, with dates, "
            "names and a few open questions for the reader."
            for i in range(30)
        )
        n_long = max(1, round(n * long_share))
        long = [[{"role": "user", "content": f"Summarize this document:\n{document}"}]] * n_long
        return [llm.apply_chat_template(m) for m in long] + make_prompts(llm, n - n_long, seed)
    messages = [
        [{"role": "user", "content": rng.choice(ASKS).format(t=rng.choice(TOPICS))}]
        for _ in range(n)
    ]
    return [llm.apply_chat_template(m) for m in messages]


def bench_prefixserve(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == new_tokens for o in outputs)
    return elapsed


@torch.inference_mode()
def bench_transformers(model, pad_id: int, prompts: list[list[int]], new_tokens: int) -> float:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        top_p=None,
        top_k=None,
        temperature=None,
        pad_token_id=pad_id,
    )
    elapsed = time.perf_counter() - start
    assert out.shape[1] - width == new_tokens
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="HF model directory (default: embedded)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument(
        "--long-share",
        type=float,
        default=0.0,
        help="fraction of prompts that paste a ~600-token document (long-tail lengths)",
    )
    parser.add_argument("--out", default="benchmarks/results/offline.json")
    args = parser.parse_args()

    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=max(args.batch_sizes))
    dtype = llm.engine.config.model.torch_dtype
    model = AutoModelForCausalLM.from_pretrained(llm.engine.model_path, dtype=dtype)
    model.to(llm.engine.runner.device).eval()
    pad_id = llm.tokenizer.pad_token_id or 0
    warm = make_prompts(llm, 2, seed=99)
    bench_prefixserve(llm, warm, 4)
    bench_transformers(model, pad_id, warm, 4)

    rows = []
    for batch in args.batch_sizes:
        prompts = make_prompts(llm, batch, seed=batch, long_share=args.long_share)
        tokens = batch * args.max_new_tokens
        ours = bench_prefixserve(llm, prompts, args.max_new_tokens)
        theirs = bench_transformers(
            model.to(llm.engine.runner.device), pad_id, prompts, args.max_new_tokens
        )
        rows.append(
            {
                "batch": batch,
                "prompt_tokens_mean": sum(map(len, prompts)) / batch,
                "prompt_tokens_max": max(map(len, prompts)),
                "new_tokens": args.max_new_tokens,
                "prefixserve_tok_s": tokens / ours,
                "transformers_tok_s": tokens / theirs,
                "ratio": theirs / ours,
            }
        )

    print(f"\nmodel {llm.engine.model_path}  dtype {args.dtype}  device {llm.engine.runner.device}")
    print(
        f"{'batch':>5} {'prompt mean/max':>16} {'prefixserve tok/s':>18} "
        f"{'transformers tok/s':>19} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['batch']:>5} {r['prompt_tokens_mean']:>10.0f}/{r['prompt_tokens_max']:<5} "
            f"{r['prefixserve_tok_s']:>18.1f} {r['transformers_tok_s']:>19.1f} "
            f"{r['ratio']:>6.2f}"
        )
    report = {
        "benchmark": "offline_throughput",
        "model": llm.engine.model_path,
        "dtype": args.dtype,
        "long_share": args.long_share,
        "device": str(llm.engine.runner.device),
        "attention_backend": llm.engine.runner.backend.name,
        **machine_info(),
        "rows": rows,
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
