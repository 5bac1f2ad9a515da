"""gRPC load generator: throughput, time to first token and per-token latency of a server.

Starts ``prefixserve serve`` in a subprocess (or uses ``--target``), loads ``--adapters`` text
adapters, then sends ``--requests`` streaming requests, either

* closed loop: ``--concurrency C`` clients, each sending its next request when the last ends, or
* open loop: ``--rate R`` requests per second with Poisson arrivals, whatever the answers do.

Each request picks an adapter with zipf popularity (``--zipf`` exponent; ``--no-adapter`` share
go without), a prompt of random token ids with a length uniform in ``--prompt-len MIN:MAX``, and
generates exactly ``--output-len MIN:MAX`` tokens (eos ignored). Reports JSON (stdout and
``benchmarks/results/``) and, with matplotlib installed, a plot.

    python benchmarks/bench_grpc.py --concurrency 8 --requests 32
    python benchmarks/bench_grpc.py --rate 1.5 --requests 40 --target 127.0.0.1:50051
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from prefixserve.client import AsyncClient, Client

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = "the of and to in is was for on are with as by at from this that be it or an have"


@dataclass(slots=True)
class Sample:
    adapter: str | None
    prompt_len: int
    output_len: int
    start: float = 0.0
    ttft: float | None = None
    token_gaps: list[float] = field(default_factory=list)
    """Seconds between consecutive output tokens (a chunk of n tokens counts n gaps of dt/n)."""
    latency: float = 0.0
    tokens: int = 0
    error: str | None = None


def span(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]
    return {
        "mean": statistics.fmean(ordered),
        "p50": pick(0.5),
        "p90": pick(0.9),
        "p99": pick(0.99),
        "max": ordered[-1],
    }


def plan(args: argparse.Namespace, adapters: list[str]) -> list[Sample]:
    rng = random.Random(args.seed)
    weights = [1.0 / (k + 1) ** args.zipf for k in range(len(adapters))]
    samples = []
    for _ in range(args.requests):
        adapter = None
        if adapters and rng.random() >= args.no_adapter:
            adapter = rng.choices(adapters, weights)[0]
        samples.append(
            Sample(
                adapter, rng.randint(*span(args.prompt_len)), rng.randint(*span(args.output_len))
            )
        )
    return samples


async def run_one(client: AsyncClient, sample: Sample, vocab: int, rng: random.Random) -> None:
    prompt = [rng.randrange(10, vocab - 10) for _ in range(sample.prompt_len)]
    sample.start = last = time.perf_counter()
    try:
        async for chunk in client.generate_stream(
            prompt, sample.adapter, max_new_tokens=sample.output_len, ignore_eos=True
        ):
            now = time.perf_counter()
            if chunk.token_ids:
                if sample.ttft is None:
                    sample.ttft = now - sample.start
                else:
                    n = len(chunk.token_ids)
                    sample.token_gaps.extend([(now - last) / n] * n)
                sample.tokens += len(chunk.token_ids)
                last = now
    except grpc.RpcError as e:
        sample.error = e.code().name
    sample.latency = time.perf_counter() - sample.start


async def drive(args: argparse.Namespace, target: str, samples: list[Sample], vocab: int) -> float:
    client = AsyncClient(target, args.api_key)
    rng = random.Random(args.seed + 1)
    start = time.perf_counter()
    if args.rate:
        arrivals = random.Random(args.seed + 2)
        tasks = []
        for sample in samples:
            tasks.append(asyncio.create_task(run_one(client, sample, vocab, rng)))
            await asyncio.sleep(arrivals.expovariate(args.rate))
        await asyncio.gather(*tasks)
    else:
        queue = list(reversed(samples))

        async def worker() -> None:
            while queue:
                await run_one(client, queue.pop(), vocab, rng)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.perf_counter() - start
    await client.close()
    return elapsed


def report(args: argparse.Namespace, samples: list[Sample], elapsed: float, info: dict) -> dict:
    ok = [s for s in samples if s.error is None]
    tokens = sum(s.tokens for s in ok)
    errors: dict[str, int] = {}
    for s in samples:
        if s.error:
            errors[s.error] = errors.get(s.error, 0) + 1
    per_request_tpot = [
        (s.latency - s.ttft) / (s.tokens - 1) for s in ok if s.ttft is not None and s.tokens > 1
    ]
    return {
        "config": {k: v for k, v in vars(args).items() if k != "api_key"},
        "server": info,
        "requests": len(samples),
        "errors": errors,
        "duration_s": elapsed,
        "throughput": {
            "requests_per_s": len(ok) / elapsed,
            "output_tokens_per_s": tokens / elapsed,
        },
        "ttft_s": percentiles([s.ttft for s in ok if s.ttft is not None]),
        "per_token_latency_s": percentiles([g for s in ok for g in s.token_gaps]),
        "time_per_output_token_s": percentiles(per_request_tpot),
        "request_latency_s": percentiles([s.latency for s in ok]),
        "adapter_mix": {
            str(a): sum(s.adapter == a for s in samples) for a in {s.adapter for s in samples}
        },
    }


def plot(samples: list[Sample], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return
    ok = [s for s in samples if s.error is None and s.ttft is not None]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, values, title in (
        (axes[0], [s.ttft for s in ok], "time to first token (s)"),
        (axes[1], [g * 1000 for s in ok for g in s.token_gaps], "per-token latency (ms)"),
    ):
        ordered = sorted(values)
        ax.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))])
        ax.set(xlabel=title, ylabel="fraction of requests/tokens", title=f"CDF: {title}")
    t0 = min(s.start for s in ok)
    axes[2].scatter([s.start - t0 for s in ok], [s.latency for s in ok], s=10)
    axes[2].set(xlabel="sent at (s)", ylabel="request latency (s)", title="latency over the run")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}", file=sys.stderr)


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "prefixserve.cli",
        "serve",
        "--port",
        str(port),
        "--registry-dir",
        "none",
        "--dtype",
        args.dtype,
        "--log-level",
        "warning",
    ]
    if args.model:
        command += ["--model", args.model]
    env = {**os.environ, "PREFIXSERVE_API_KEYS": ""}
    process = subprocess.Popen(command, env=env, stdout=sys.stderr)
    target = f"127.0.0.1:{port}"
    with Client(target) as client:
        client.wait_until_serving(timeout=600)
    return process, target


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", help="host:port of a running server (default: start one)")
    parser.add_argument(
        "--api-key",
        help="for --target servers with keys (needs an admin key to load the adapters as public)",
    )
    parser.add_argument("--model", help="model directory for the started server (default model)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--concurrency", type=int, default=8, help="closed loop: clients")
    parser.add_argument("--rate", type=float, help="open loop: requests per second (Poisson)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--adapters", type=int, default=4, help="text adapters to load")
    parser.add_argument("--adapter-len", type=int, default=24, help="words per adapter prefix")
    parser.add_argument("--zipf", type=float, default=1.1, help="adapter popularity exponent")
    parser.add_argument("--no-adapter", type=float, default=0.2, help="share without adapter")
    parser.add_argument("--prompt-len", default="32:128", help="MIN:MAX prompt tokens")
    parser.add_argument("--output-len", default="16:64", help="MIN:MAX output tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    process, target = (None, args.target) if args.target else start_server(args)
    try:
        with Client(target, args.api_key) as client:
            info = client.model_info()
            rng = random.Random(args.seed)
            names = [f"bench-{i}" for i in range(args.adapters)]
            for name in names:
                text = " ".join(rng.choice(WORDS.split()) for _ in range(args.adapter_len))
                client.load_adapter(name, text=text, public=True)
        samples = plan(args, names)
        elapsed = asyncio.run(drive(args, target, samples, info.vocab_size))
        server = {
            "model": info.model,
            "device": info.device,
            "dtype": info.dtype,
            "attention": info.attention_backend,
        }
        result = report(args, samples, elapsed, server)
        with Client(target, args.api_key) as client:
            for name in names:
                client.unload_adapter(name)
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench_grpc-{time.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, indent=2, default=str))
    print(f"results: {stem.with_suffix('.json')}", file=sys.stderr)
    plot(samples, stem.with_suffix(".png"))


if __name__ == "__main__":
    main()
