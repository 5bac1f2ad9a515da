"""Head-of-line blocking between tenants: does one tenant's long prompt hold up another's short
request?

Over a real loopback server on the default model: tenant ``acme`` sends a prompt of
``--long-tokens`` tokens (or, with ``--adapter``, a first request on a fresh text adapter of that
many tokens, which the engine must compute into the pool first); while it prefills, tenant
``globex`` sends ``--probes`` one-token requests, one after the other. Reported beside the
engine's plain decode step time, measured in the same run: the probes' time to answer, and how
many decode steps that is, for each ``--caps`` value of ``long_prefill_token_threshold`` (the
largest prefill chunk per step; ``none`` = one chunk per step as large as the budget). Table on
stdout, JSON in ``benchmarks/results/fairness.json``.

    python benchmarks/bench_fairness.py --long-tokens 7000
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from prefixserve.client import Client
from prefixserve.config import EngineConfig
from prefixserve.server import ApiKeys, BackgroundServer, ServerConfig

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = "acme acme-bench-key-1\nglobex globex-bench-key-2"
FILLER = "the quick brown fox jumps over the lazy dog while the engine serves many tenants"


def long_text(client: Client, tokens: int) -> str:
    """A text of about ``tokens`` tokens for the served tokenizer."""
    filler = FILLER.split()
    words = (filler * (tokens // len(filler) + 2))[: tokens + 8]
    text = " ".join(words)
    while len(client.tokenize(text)) > tokens:
        text = text.rsplit(" ", 8)[0]
    return text


def decode_step_seconds(client: Client) -> float:
    """Seconds per output token of one request alone (a plain decode step)."""
    client.generate([1, 2, 3], max_new_tokens=2, ignore_eos=True)  # warm up
    start = time.perf_counter()
    client.generate([1, 2, 3], max_new_tokens=33, ignore_eos=True)
    return (time.perf_counter() - start) / 33


def run(threshold: int | None, args: argparse.Namespace) -> dict:
    engine = EngineConfig.from_kwargs(dtype="float32", long_prefill_token_threshold=threshold)
    config = ServerConfig(engine, port=0, api_keys=ApiKeys.parse(KEYS, "bench"), registry_dir=None)
    with (
        BackgroundServer(config) as server,
        Client(server.address, "acme-bench-key-1") as acme,
        Client(server.address, "globex-bench-key-2") as globex,
    ):
        step = decode_step_seconds(globex)
        text = long_text(acme, args.long_tokens)
        if args.adapter:
            acme.load_adapter("long", text=text)
            job = lambda: acme.generate("Hi", adapter="long", max_new_tokens=1)
        else:
            job = lambda: acme.generate(text, max_new_tokens=1, ignore_eos=True)
        done = threading.Event()
        long_time: list[float] = []

        def long_call() -> None:
            start = time.perf_counter()
            job()
            long_time.append(time.perf_counter() - start)
            done.set()

        thread = threading.Thread(target=long_call)
        thread.start()
        time.sleep(args.head_start)
        probes = []
        while len(probes) < args.probes and not done.is_set():
            start = time.perf_counter()
            globex.generate([5, 6, 7], max_new_tokens=1, ignore_eos=True)
            probes.append(time.perf_counter() - start)
        thread.join()
    return {
        "long_prefill_token_threshold": threshold,
        "decode_step_s": step,
        "long_request_s": long_time[0],
        "probes": len(probes),
        "probe_median_s": statistics.median(probes) if probes else None,
        "probe_max_s": max(probes) if probes else None,
        "probe_median_steps": statistics.median(probes) / step if probes else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--long-tokens", type=int, default=7000, help="the long prompt's tokens")
    parser.add_argument("--adapter", action="store_true", help="a long text adapter instead")
    parser.add_argument("--probes", type=int, default=8, help="short requests of the other tenant")
    parser.add_argument("--head-start", type=float, default=1.0, help="seconds before probing")
    parser.add_argument(
        "--caps",
        nargs="+",
        default=["128", "512", "none"],
        help="long_prefill_token_threshold values to compare ('none' = uncapped)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "fairness.json")
    args = parser.parse_args()
    rows = [run(None if cap == "none" else int(cap), args) for cap in args.caps]
    what = "adapter prefix" if args.adapter else "prompt"
    print(f"another tenant's 1-token requests while a {args.long_tokens}-token {what} prefills")
    print(
        f"{'chunk cap':>10} {'decode step':>12} {'long req':>9} {'probes':>7} "
        f"{'median':>8} {'max':>8} {'median/step':>12}"
    )
    for r in rows:
        cap = r["long_prefill_token_threshold"] or "none"
        median = r["probe_median_s"]
        print(
            f"{cap!s:>10} {r['decode_step_s'] * 1e3:>10.1f}ms {r['long_request_s']:>8.1f}s "
            f"{r['probes']:>7} "
            + (
                f"{median:>7.2f}s {r['probe_max_s']:>7.2f}s {r['probe_median_steps']:>11.1f}x"
                if median is not None
                else f"{'-':>8} {'-':>8} {'(no probe answered before the long request)':>12}"
            )
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"workload": vars(args) | {"out": str(args.out)}, "runs": rows}, indent=1)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
