"""Mixed-adapter throughput: prefixserve mixing K adapters vs PEFT serving one adapter per batch.

K PEFT adapters (prompt tuning and prefix tuning alternating, random weights, prefix lengths
spread over ``--prefix-lens``) are made for the model; M chat requests pick an adapter with zipf
popularity; every request generates exactly ``--max-new-tokens`` tokens (eos ignored). In one run:

* ``prefixserve_mixed``: all M requests at once, adapters mixed in every step;
* ``peft_grouped``: PEFT ``generate`` on each adapter's requests as one left-padded batch
  (PEFT cannot mix prompt-learning adapters in a batch), adapters one after another, time to
  switch adapters excluded;
* ``prefixserve_single``: the same M requests all on one adapter whose prefix length is the
  mixed requests' mean (what mixing itself costs).

Prefixes are made resident before timing (steady-state serving); materializing them is a
one-time cost per adapter.

    python benchmarks/bench_adapters.py --adapters 16 --requests 64 --max-new-tokens 32
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import peft
import torch
from bench_common import write_report
from bench_offline import make_prompts
from transformers import AutoModelForCausalLM

from prefixserve import LLM, SamplingParams


def make_adapters(model_dir: str, count: int, lengths: list[int], out: Path) -> list[Path]:
    paths = []
    for i in range(count):
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        n = lengths[i % len(lengths)]
        if i % 2 == 0:
            config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)
        else:
            config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)
        model = peft.get_peft_model(base, config)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.normal_(0.0, 0.02)
        paths.append(out / f"adapter{i}")
        model.save_pretrained(paths[-1])
    return paths


def zipf_choice(count: int, m: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) for rank in range(count)]
    return rng.choices(range(count), weights=weights, k=m)


def time_prefixserve(llm: LLM, prompts, names, new_tokens: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, adapter=names)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return elapsed


@torch.inference_mode()
def time_peft(model_dir, paths, prompts, choice, new_tokens: int, pad_id: int, dtype) -> float:
    groups: dict[int, list[list[int]]] = defaultdict(list)
    for prompt, a in zip(prompts, choice):
        groups[a].append(prompt)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    elapsed = 0.0
    for a, group in groups.items():
        # PEFT holds one prompt-learning type at a time: wrap the (unchanged) base per adapter.
        # Adapter switching is not timed, which favours PEFT.
        model = peft.PeftModel.from_pretrained(base, paths[a]).eval()
        width = max(map(len, group))
        ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in group])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in group])
        start = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            top_p=None,
            top_k=None,
            temperature=None,
            pad_token_id=pad_id,
        )
        elapsed += time.perf_counter() - start
        assert out.shape[1] - width == new_tokens
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prefix-lens", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/adapters.json")
    args = parser.parse_args()

    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.requests)
    model_dir = llm.engine.model_path
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(model_dir, args.adapters, args.prefix_lens, Path(tmp))
        for i, path in enumerate(paths):
            llm.load_adapter(f"a{i}", path)
        prompts = make_prompts(llm, args.requests, seed=1)
        choice = zipf_choice(args.adapters, args.requests, seed=2)
        names = [f"a{i}" for i in range(args.adapters)]
        time_prefixserve(llm, prompts[: args.adapters], names, 2)  # warm up, prefixes resident
        lens = [args.prefix_lens[i % len(args.prefix_lens)] for i in range(args.adapters)]
        mean_len = sum(lens[a] for a in choice) / len(choice)
        single_name = names[min(range(args.adapters), key=lambda i: abs(lens[i] - mean_len))]
        mixed = time_prefixserve(llm, prompts, [names[a] for a in choice], args.max_new_tokens)
        single = time_prefixserve(llm, prompts, [single_name] * args.requests, args.max_new_tokens)
        pad = llm.tokenizer.pad_token_id or 0
        grouped = time_peft(
            model_dir,
            paths,
            prompts,
            choice,
            args.max_new_tokens,
            pad,
            llm.engine.config.model.torch_dtype,
        )
    tokens = args.requests * args.max_new_tokens
    result = {
        "benchmark": "mixed_adapter_throughput",
        "model": model_dir,
        "dtype": args.dtype,
        "device": str(llm.engine.runner.device),
        "adapters": args.adapters,
        "requests": args.requests,
        "distinct_adapters_used": len(set(choice)),
        "mean_prefix_len_mixed": mean_len,
        "prefix_len_single": lens[names.index(single_name)],
        "new_tokens": args.max_new_tokens,
        "tok_s": {
            "prefixserve_mixed": tokens / mixed,
            "peft_grouped": tokens / grouped,
            "prefixserve_single": tokens / single,
        },
        "mixed_over_peft": grouped / mixed,
        "mixing_cost": mixed / single - 1.0,
    }
    print(
        f"\n{args.requests} requests over {len(set(choice))} of {args.adapters} adapters (zipf), "
        f"{args.max_new_tokens} new tokens each, {result['device']}, {args.dtype}"
    )
    for name, value in result["tok_s"].items():
        print(f"  {name:<20} {value:8.1f} tok/s")
    print(
        f"  mixed / PEFT grouped: {result['mixed_over_peft']:.2f}x   "
        f"mixing cost vs single adapter: {100 * result['mixing_cost']:+.1f}%"
    )
    write_report(args.out, result)


if __name__ == "__main__":
    main()
