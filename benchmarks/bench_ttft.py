"""Time to first token of one request alone, with a soft-prompt adapter and without.

One chat request at a time on an idle engine (default model, fp32): the time from
``add_request`` to the step that returns its first token, median over ``--repeats``. The adapter
(PEFT prompt tuning, random weights, ``--virtual-tokens`` long) is resident before timing: its
prefix is computed once when it is first used, never per request.

    python benchmarks/bench_ttft.py --virtual-tokens 50 --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench_adapters import make_adapters
from bench_common import machine_info, write_report

from prefixserve import LLM, SamplingParams


def ttft(llm: LLM, prompt: list[int], adapter: str | None) -> float:
    engine = llm.engine
    start = time.perf_counter()
    engine.add_request(prompt, SamplingParams(max_new_tokens=1), adapter=adapter)
    while not engine.step():
        pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--virtual-tokens", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results/ttft.json")
    args = parser.parse_args()

    llm = LLM(dtype="float32")
    prompt = llm.apply_chat_template([{"role": "user", "content": "Tell me about glaciers."}])
    with tempfile.TemporaryDirectory() as tmp:
        [path] = make_adapters(llm.engine.model_path, 1, [args.virtual_tokens], Path(tmp))
        llm.load_adapter("tuned", path)
    ttft(llm, prompt, "tuned")  # materializes the prefix and warms both paths
    ttft(llm, prompt, None)
    times: dict[str, list[float]] = {"none": [], "adapter": []}
    for _ in range(args.repeats):  # interleaved, so drift affects both alike
        times["none"].append(ttft(llm, prompt, None))
        times["adapter"].append(ttft(llm, prompt, "tuned"))
    median = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    ratio = median["adapter"] / median["none"]
    print(
        f"TTFT, prompt {len(prompt)} tokens, backend {llm.engine.runner.backend.name}: "
        f"no adapter {median['none']:.1f} ms, {args.virtual_tokens}-token prompt-tuning adapter "
        f"{median['adapter']:.1f} ms ({ratio:.3f}x)"
    )
    report = {
        "benchmark": "ttft",
        "prompt_tokens": len(prompt),
        "virtual_tokens": args.virtual_tokens,
        "attention_backend": llm.engine.runner.backend.name,
        "median_ms": median,
        "ratio": ratio,
        **machine_info(),
    }
    write_report(args.out, report)


if __name__ == "__main__":
    main()
