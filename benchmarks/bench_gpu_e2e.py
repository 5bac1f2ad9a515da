"""End to end on a GPU: an 8B-shaped model (Llama-3-8B's config with random bf16 weights, nothing
downloaded), prefixserve eager vs compiled vs compiled + CUDA graphs, 64 requests over 64 zipf
prompt-tuning adapters vs the same requests on one adapter, and transformers' batched
``generate`` on the same token counts (its prompts carry the adapter's length in plain tokens:
the same work as one adapter for everyone; PEFT would need one batch per adapter for the mix).

Each contender runs in a subprocess of its own, so that its start (weights, compile, capture) and
its peak device memory are its own. Prints a table and writes JSON.

    python benchmarks/bench_gpu_e2e.py --out results/e2e.json
    python benchmarks/bench_gpu_e2e.py --layers 8                  # a shorter 8B-wide model
    python benchmarks/bench_gpu_e2e.py --shape tiny --device cpu   # checks the script itself
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_common import write_report

CONTENDERS = ("transformers", "eager", "compiled", "graphs")
SHAPES: dict[str, dict] = {
    "llama3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
    },
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
        "max_position_embeddings": 1024,
    },
}


def build_model_dir(shape: str, layers: int | None, device: str, root: Path) -> Path:
    """A random-weight Llama of ``shape`` in bf16 and a word-level tokenizer of its vocabulary
    (every id decodes), written once under ``root``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    fields = dict(SHAPES[shape])
    if layers:
        fields["num_hidden_layers"] = layers
    path = root / f"{shape}-{fields['num_hidden_layers']}l"
    if (path / "config.json").exists():
        return path
    config = LlamaConfig(**fields, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="t1", eos_token="t2")
    fast.pad_token = "t0"
    fast.save_pretrained(path)
    return path


def write_adapters(hidden: int, count: int, lengths: list[int], root: Path) -> list[Path]:
    """``count`` PEFT prompt-tuning adapters (random embeddings) of the given lengths."""
    from safetensors.torch import save_file

    paths = []
    gen = torch.Generator().manual_seed(1)
    for i in range(count):
        path = root / f"adapter-{i}"
        path.mkdir(parents=True, exist_ok=True)
        n = lengths[i % len(lengths)]
        config = {
            "peft_type": "PROMPT_TUNING",
            "task_type": "CAUSAL_LM",
            "num_virtual_tokens": n,
            "token_dim": hidden,
            "num_transformer_submodules": 1,
        }
        (path / "adapter_config.json").write_text(json.dumps(config))
        weights = 0.02 * torch.randn(n, hidden, generator=gen)
        save_file(
            {"prompt_embeddings": weights.to(torch.bfloat16)}, path / "adapter_model.safetensors"
        )
        paths.append(path)
    return paths


def workload(args: argparse.Namespace, vocab: int) -> dict:
    """Prompts, each request's adapter (zipf over ``--adapters``) and the adapters' lengths."""
    rng = random.Random(0)
    prompts = [
        [rng.randrange(3, vocab) for _ in range(rng.randint(32, 128))] for _ in range(args.batch)
    ]
    weights = [1.0 / (r + 1) for r in range(args.adapters)]
    choice = rng.choices(range(args.adapters), weights=weights, k=args.batch)
    lengths = [rng.choice(args.prefix_lens) for _ in range(args.adapters)]
    return {"prompts": prompts, "choice": choice, "lengths": lengths}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _peak_gib(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_engine(mode: str, model_dir: Path, args: argparse.Namespace, work: dict) -> dict:
    from prefixserve import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        str(model_dir),
        dtype="bfloat16",
        device=args.device,
        enforce_eager=mode == "eager",
        max_cuda_graph_batch=0 if mode != "graphs" else 256,
        max_num_seqs=args.batch,
        max_model_len=args.max_model_len,
    )
    startup = time.perf_counter() - start
    hidden = llm.engine.runner.shape.hidden_size
    paths = write_adapters(hidden, args.adapters, work["lengths"], Path(args.workdir) / "adapters")
    for i, path in enumerate(paths):
        llm.load_adapter(f"a{i}", path)
    mean_len = round(statistics.mean(work["lengths"][c] for c in work["choice"]))
    one = write_adapters(hidden, 1, [mean_len], Path(args.workdir) / "one")[0]
    llm.load_adapter("one", one)
    prompts = work["prompts"]
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    mixed = [f"a{c}" for c in work["choice"]]
    llm.generate(
        prompts[:4],
        SamplingParams(max_new_tokens=4, ignore_eos=True),
        adapter=mixed[:4],
        use_tqdm=False,
    )  # materializes nothing timed below except its own prefixes

    def tok_s(names: list[str]) -> float:
        best = 0.0
        for _ in range(args.repeats):
            _sync(args.device)
            t = time.perf_counter()
            outs = llm.generate(prompts, params, adapter=names, use_tqdm=False)
            _sync(args.device)
            assert all(len(o.token_ids) == args.new_tokens for o in outs)
            best = max(best, len(prompts) * args.new_tokens / (time.perf_counter() - t))
        return best

    result = {
        "mode": mode,
        "startup_s": startup,
        "zipf_tok_s": tok_s(mixed),
        "one_adapter_tok_s": tok_s(["one"] * len(prompts)),
        "mean_prefix_tokens": mean_len,
        "peak_gib": _peak_gib(args.device),
    }
    graphs = llm.engine.runner.graphs
    result["graph_replays"] = graphs.replays if graphs is not None else 0
    result["compiled"] = llm.engine.runner.compiled is not None
    return result


@torch.inference_mode()
def run_transformers(model_dir: Path, args: argparse.Namespace, work: dict) -> dict:
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    model.to(args.device).eval()
    startup = time.perf_counter() - start
    mean_len = round(statistics.mean(work["lengths"][c] for c in work["choice"]))
    rng = random.Random(5)
    prefix = [rng.randrange(3, model.config.vocab_size) for _ in range(mean_len)]
    prompts = [prefix + p for p in work["prompts"]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=args.device)
    mask = torch.tensor(
        [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=args.device
    )
    best = 0.0
    for _ in range(args.repeats):
        _sync(args.device)
        t = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=args.new_tokens,
            min_new_tokens=args.new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        _sync(args.device)
        assert out.shape[1] - width == args.new_tokens
        best = max(best, len(prompts) * args.new_tokens / (time.perf_counter() - t))
    return {
        "mode": "transformers",
        "startup_s": startup,
        "one_adapter_tok_s": best,
        "zipf_tok_s": None,
        "peak_gib": _peak_gib(args.device),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--prefix-lens", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many rounds")
    parser.add_argument("--workdir", default="/tmp/prefixserve-e2e")
    parser.add_argument("--only", choices=CONTENDERS, default=None)
    parser.add_argument("--out", default="benchmarks/results/gpu_e2e.json")
    args = parser.parse_args()

    model_dir = build_model_dir(args.shape, args.layers, args.device, Path(args.workdir))
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    work = workload(args, vocab)
    if args.only:  # one contender, in this process: print its result as JSON
        run = run_transformers if args.only == "transformers" else None
        result = run(model_dir, args, work) if run else run_engine(args.only, model_dir, args, work)
        print("RESULT " + json.dumps(result))
        return

    results = {}
    for name in CONTENDERS:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--only", name]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            print(f"{name} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            results[name] = {"mode": name, "error": proc.stderr[-3000:]}
            continue
        results[name] = json.loads(lines[-1].removeprefix("RESULT "))
        print(f"{name}: {results[name]}", file=sys.stderr)

    hf = results.get("transformers", {}).get("one_adapter_tok_s")
    print(
        f"\n{args.shape} ({args.layers or 'all'} layers), bf16, {args.device}, batch {args.batch}, "
        f"{args.new_tokens} new tokens, {args.adapters} zipf adapters, best of {args.repeats}"
    )
    print(
        "| contender | zipf tok/s | one adapter tok/s | zipf / one | one vs HF | start s "
        "| peak GiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed | | | | | |")
            continue
        zipf, one = r.get("zipf_tok_s"), r["one_adapter_tok_s"]
        ratio = f"{zipf / one:.2f}x" if zipf else "-"
        vs_hf = f"{one / hf:.2f}x" if hf else "-"
        zipf_s = f"{zipf:.1f}" if zipf else "-"
        print(
            f"| {name} | {zipf_s} | {one:.1f} | {ratio} | {vs_hf} | {r['startup_s']:.1f} | "
            f"{r['peak_gib']:.1f} |"
        )
    meta = {
        "shape": args.shape,
        "layers": args.layers,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "args": vars(args),
    }
    write_report(args.out, {"meta": meta, "results": results})


if __name__ == "__main__":
    main()
