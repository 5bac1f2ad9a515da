"""Many tenants: hundreds of soft-prompt adapters and a few long system prompts in one engine.

``--adapters`` PEFT adapters (prompt tuning and prefix tuning alternating, random weights,
``--virtual-tokens`` lengths drawn uniformly) plus ``--text-prompts`` system prompts of
``--text-tokens`` tokens; ``--requests`` chat requests pick one with zipf popularity and
generate ``--new-tokens`` each (greedy, eos ignored). Measured in one run, on the default model
in fp32:

* ``mixed (cold)``: all requests at once, every adapter kind mixed in the same steps, prefixes
  materialized on first use (inside the timing) and evicted least recently used when the pool
  runs short;
* ``mixed (warm)``: the same requests again, their prefixes now resident (unless evicted);
* ``single``: the same requests all on one adapter whose prefix length is the mixed requests'
  mean (resident before timing): what serving many tenants costs.

    python benchmarks/bench_tenants.py                    # 500 adapters, 256 requests
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from bench_adapters import make_adapters, zipf_choice
from bench_common import machine_info, write_report
from bench_offline import make_prompts
from bench_shared_prompt import system_prompt
from safetensors.torch import load_file, save_file

from prefixserve import LLM, SamplingParams


def clone_adapters(templates: list[Path], lengths: list[int], out: Path, seed: int) -> list[Path]:
    """Adapters of the templates' kinds (alternating) with ``lengths`` virtual tokens and random
    ``prompt_embeddings`` of the template's scale (PEFT's file layout, written directly: making
    hundreds through PEFT would take minutes)."""
    gen = torch.Generator().manual_seed(seed)
    paths = []
    for i, n in enumerate(lengths):
        template = templates[i % len(templates)]
        config = json.loads((template / "adapter_config.json").read_text())
        config["num_virtual_tokens"] = n
        emb = load_file(template / "adapter_model.safetensors")["prompt_embeddings"]
        new = torch.randn(n, emb.shape[1], generator=gen) * emb.std()
        path = out / f"tenant{i}"
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps(config))
        save_file({"prompt_embeddings": new.contiguous()}, path / "adapter_model.safetensors")
        paths.append(path)
    return paths


def run(llm: LLM, prompts: list[list[int]], names: list[str | None], new_tokens: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, adapter=names, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == new_tokens for o in outputs)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=500)
    parser.add_argument("--virtual-tokens", type=int, nargs=2, default=[20, 100])
    parser.add_argument("--text-prompts", type=int, default=16)
    parser.add_argument("--text-tokens", type=int, nargs=2, default=[256, 1024])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/tenants.json")
    args = parser.parse_args()
    rng = random.Random(args.seed)

    llm = LLM(dtype="float32", max_num_seqs=64)
    names: list[str] = []
    lengths: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        templates = make_adapters(llm.engine.model_path, 2, [8], Path(tmp))
        virtual = [rng.randint(*args.virtual_tokens) for _ in range(args.adapters)]
        for i, path in enumerate(clone_adapters(templates, virtual, Path(tmp), args.seed)):
            names.append(f"tenant{i}")
            lengths[names[-1]] = llm.load_adapter(names[-1], path).num_tokens
    for i in range(args.text_prompts):
        text = system_prompt(llm, rng.randint(*args.text_tokens))
        names.append(f"system{i}")
        lengths[names[-1]] = llm.load_adapter(names[-1], text=text).num_tokens
    rng.shuffle(names)  # popularity does not follow the kind
    chosen = [names[k] for k in zipf_choice(len(names), args.requests, args.seed)]
    prompts = make_prompts(llm, args.requests, seed=args.seed)

    stats = llm.engine.prefixes.stats
    mixed = run(llm, prompts, list(chosen), args.new_tokens)
    evictions, materialized = stats.evictions, stats.materializations
    warm = run(llm, prompts, list(chosen), args.new_tokens)
    warm_evictions = stats.evictions - evictions
    mean_len = round(sum(lengths[n] for n in chosen) / len(chosen))
    llm.load_adapter("single", text=system_prompt(llm, mean_len))
    run(llm, prompts[:1], ["single"], 2)  # resident before timing
    single = run(llm, prompts, ["single"] * args.requests, args.new_tokens)

    tokens = args.requests * args.new_tokens
    row = {
        "adapters": args.adapters,
        "text_prompts": args.text_prompts,
        "distinct_adapters_used": len(set(chosen)),
        "mean_prefix_tokens": mean_len,
        "mixed_cold_tok_s": tokens / mixed,
        "mixed_warm_tok_s": tokens / warm,
        "single_tok_s": tokens / single,
        "cold_ratio": single / mixed,
        "warm_ratio": single / warm,
        "prefix_materializations": materialized,
        "prefix_evictions": evictions,
        "warm_prefix_evictions": warm_evictions,
    }
    print(
        f"{args.requests} requests over {row['distinct_adapters_used']} of "
        f"{len(names)} adapters (mean prefix {mean_len} tokens), "
        f"backend {llm.engine.runner.backend.name}:\n"
        f"  mixed, cold   {row['mixed_cold_tok_s']:7.1f} tok/s  {row['cold_ratio']:.2f}x single "
        f"({materialized} prefixes materialized, {evictions} evicted)\n"
        f"  mixed, warm   {row['mixed_warm_tok_s']:7.1f} tok/s  {row['warm_ratio']:.2f}x single "
        f"({warm_evictions} evicted)\n"
        f"  one adapter   {row['single_tok_s']:7.1f} tok/s"
    )
    report = {
        "benchmark": "tenants",
        **row,
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "attention_backend": llm.engine.runner.backend.name,
        **machine_info(),
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
