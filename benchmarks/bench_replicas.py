"""Replicas on Ray Serve: 1 vs 2 engine replicas, adapter-affine routing vs round robin.

Starts a local Ray instance and, one configuration after another, a gRPC front end over N engine
replicas of the default model with ``--adapters`` text adapters (system prompts of
``--prefix-words`` words, so that a prefix costs a real prefill to materialize). Closed loop:
``--concurrency`` clients send ``--requests`` streaming chat requests, each naming an adapter drawn
with zipf popularity and generating exactly ``--max-new-tokens`` tokens (eos ignored).

Reported per configuration: output tokens per second, time to first token (p50, p90), the share
of requests that found their adapter's prefix resident where they were sent (1 - prefix
materializations / requests, all replicas together), and how many distinct adapters each replica
served.

Configurations: one server without Ray (what the Ray hop costs); 1 replica; 2 replicas with the
adapter as Ray Serve's multiplexed model id (``serve --ray``); 2 replicas behind Ray Serve's
round-robin router (blind to adapters).

    python benchmarks/bench_replicas.py --requests 64 --max-new-tokens 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from prefixserve.client import AsyncClient
from prefixserve.config import EngineConfig
from prefixserve.engine import EngineStats
from prefixserve.scaleout import BackgroundFleetServer, FleetConfig
from prefixserve.server import BackgroundServer, ServerConfig

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = [
    *("support", "agent", "routers", "billing", "refunds", "shipping", "policy", "tone"),
    *("brief", "friendly", "formal", "expert", "customers", "warranty", "firmware"),
    *("network", "modem", "reset", "password", "account", "invoice", "escalate"),
]
QUESTIONS = [
    "How do I reset my router?",
    "Where is my invoice?",
    "Can I return a modem after 30 days?",
    "Why is the network slow at night?",
    "How do I change my password?",
    "Is the firmware update safe?",
]
CONFIGS = [
    ("1 server, no Ray", 0, "adapter"),
    ("1 replica", 1, "adapter"),
    ("2 replicas", 2, "adapter"),
    ("2, round robin", 2, "round_robin"),
]


@dataclass(slots=True)
class Sample:
    adapter: str
    ttft: float | None = None
    tokens: int = 0
    replica: str | None = None


def zipf_choice(count: int, n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return rng.choices(range(count), weights=[1 / (rank + 1) for rank in range(count)], k=n)


def system_prompts(count: int, words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [
        f"You are assistant {i}. " + " ".join(rng.choice(WORDS) for _ in range(words))
        for i in range(count)
    ]


async def one(client: AsyncClient, sample: Sample, question: str, new_tokens: int) -> None:
    start = time.perf_counter()
    messages = [{"role": "user", "content": question}]
    async for chunk in client.generate_stream(
        messages, sample.adapter, max_new_tokens=new_tokens, ignore_eos=True, timeout=600
    ):
        if chunk.token_ids and sample.ttft is None:
            sample.ttft = time.perf_counter() - start
        sample.tokens += len(chunk.token_ids)
        sample.replica = chunk.replica or sample.replica


async def replica_stats(server: BackgroundFleetServer, replicas: int) -> dict[str, EngineStats]:
    """Each replica's engine now: requests without an adapter go to any replica, and each
    reports its engine with the requests it accepts."""
    seen: dict[str, EngineStats] = {}
    async with AsyncClient(server.address) as client:
        for _ in range(100):
            out = await client.generate([1], max_new_tokens=1, timeout=60)
            assert out.replica is not None
            seen[out.replica] = server.fleet.replicas[out.replica].stats
            if len(seen) == replicas:
                return seen
    raise RuntimeError(f"only replicas {sorted(seen)} answered")


async def drive(address: str, samples: list[Sample], args: argparse.Namespace) -> float:
    queue = list(enumerate(samples))
    async with AsyncClient(address) as client:

        async def worker() -> None:
            while queue:
                i, sample = queue.pop(0)
                await one(client, sample, QUESTIONS[i % len(QUESTIONS)], args.max_new_tokens)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        return time.perf_counter() - start


def run_config(
    label: str, replicas: int, routing: str, cores: int, args: argparse.Namespace
) -> dict:
    """One configuration: the machine's cores split evenly between ``replicas`` replicas."""
    engine = EngineConfig.from_kwargs(
        model=args.model, dtype="float32", cpu_kv_memory_gib=args.kv_gib
    )
    config = ServerConfig(engine, port=0, registry_dir=None)
    fleet = FleetConfig(
        replicas=max(replicas, 1),
        routing=routing,
        replica_cpus=cores / max(replicas, 1),  # Ray gives each replica's torch as many threads
        app_name=f"bench-{replicas}-{routing}",
    )
    names = [f"a{i:02d}" for i in range(args.adapters)]
    choice = zipf_choice(args.adapters, args.requests, args.seed)
    samples = [Sample(names[c]) for c in choice]
    started = time.perf_counter()
    running = BackgroundServer(config) if replicas == 0 else BackgroundFleetServer(config, fleet)
    with running as server:
        deployed = time.perf_counter() - started

        async def load_adapters() -> None:
            async with AsyncClient(server.address) as client:
                prompts = system_prompts(args.adapters, args.prefix_words, args.seed)
                for name, text in zip(names, prompts):
                    await client.load_adapter(name, text=text)

        asyncio.run(load_adapters())
        elapsed = asyncio.run(drive(server.address, samples, args))
        if replicas == 0:
            materialized = server.engine.stats().prefix_materializations
        else:
            stats = asyncio.run(replica_stats(server, replicas))
            materialized = sum(s.prefix_materializations for s in stats.values())
    per_replica: dict[str, set[str]] = {}
    for s in samples:
        per_replica.setdefault(s.replica or "?", set()).add(s.adapter)
    ttfts = sorted(s.ttft for s in samples if s.ttft is not None)
    tokens = sum(s.tokens for s in samples)
    return {
        "config": label,
        "replicas": replicas,
        "routing": routing,
        "deploy_s": round(deployed, 1),
        "elapsed_s": round(elapsed, 2),
        "tokens_per_s": round(tokens / elapsed, 1),
        "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
        "ttft_p90_ms": round(1000 * ttfts[int(0.9 * (len(ttfts) - 1))], 1),
        "prefix_materializations": materialized,
        "prefix_resident_share": round(1 - materialized / len(samples), 3),
        "adapters_per_replica": sorted(len(a) for a in per_replica.values()),
        "requests_per_replica": sorted(
            sum((s.replica or "?") == r for s in samples) for r in per_replica
        ),
    }


def table(rows: list[dict], cores: int) -> str:
    head = (
        f"{'config':<16}{'tok/s':>8}{'TTFT p50':>10}{'TTFT p90':>10}{'resident':>10}"
        f"  adapters/replica  requests/replica"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        share = f"{r['prefix_resident_share']:.0%}"
        lines.append(
            f"{r['config']:<16}{r['tokens_per_s']:>8}{r['ttft_p50_ms']:>8}ms{r['ttft_p90_ms']:>8}ms"
            f"{share:>10}  {r['adapters_per_replica']!s:<18}"
            f"{r['requests_per_replica']}"
        )
    lines.append(
        f"\nAll replicas share this machine's {cores} CPU cores (each gets {cores}/N): the "
        "same compute split N ways, so throughput cannot scale with replicas here. What the "
        "routing changes is affinity, which does carry over to a cluster: the share of requests "
        "that found their adapter's prefix resident, and how many adapters each replica had to "
        "materialize. With one device per replica, throughput scales with the replicas."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="HF model directory (default: the embedded SmolLM2-135M)")
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--prefix-words", type=int, default=96, help="words per system prompt")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--kv-gib", type=float, default=0.5, help="KV pool of each replica")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "replicas.json")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for label, replicas, routing in CONFIGS:
            print(f"running {label} ...", file=sys.stderr, flush=True)
            rows.append(run_config(label, replicas, routing, cores, args))
    finally:
        ray.shutdown()
    print(table(rows, cores))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    args.out.write_text(
        json.dumps({"settings": settings, "cpu_cores": cores, "runs": rows}, indent=1)
    )
    print(f"results: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
