"""The same load over gRPC and over the OpenAI HTTP API, in one run against one server.

Workload: ``--requests`` chat requests at once ("Tell me about <topic>."), ``--new-tokens``
greedy tokens each (eos ignored), streamed: with prefixserve's gRPC client (GenerateStream) and
with the official ``openai`` client (``/v1/chat/completions``, ``stream=True``; ``--client light``:
a bare SSE reader, to tell the server's cost from the client's), on the default
model in fp32, alternating ``--rounds`` times so that a busy moment cannot favour one side.
The clients run in a process of their own (as real clients would): their parsing must not take
the server's interpreter lock.
Reported: output tok/s of each (the best round), HTTP / gRPC, and the mean time to first token
of each (HTTP's added TTFT). Table on stdout, JSON in ``benchmarks/results/http.json``.

    python benchmarks/bench_http.py
    python benchmarks/bench_http.py --requests 8 --new-tokens 8 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from bench_common import machine_info, write_report
from bench_offline import TOPICS

from prefixserve.client import AsyncClient
from prefixserve.config import EngineConfig
from prefixserve.server import ApiKeys, BackgroundServer, ServerConfig

KEY = "bench-key-0001"


def questions(n: int) -> list[list[dict[str, str]]]:
    return [
        [{"role": "user", "content": f"Tell me about {TOPICS[i % len(TOPICS)]}."}] for i in range(n)
    ]


async def over_grpc(address: str, args: argparse.Namespace) -> tuple[float, float]:
    """(seconds for the whole load, mean time to first token)."""
    async with AsyncClient(address, KEY) as client:

        async def one(messages: list[dict[str, str]]) -> float:
            start = time.perf_counter()
            first = None
            async for _ in client.generate_stream(
                messages, max_new_tokens=args.new_tokens, ignore_eos=True, timeout=3600
            ):
                first = first or time.perf_counter() - start
            assert first is not None
            return first

        start = time.perf_counter()
        firsts = await asyncio.gather(*(one(m) for m in questions(args.requests)))
        return time.perf_counter() - start, sum(firsts) / len(firsts)


async def over_http_light(port: int, model: str, args: argparse.Namespace) -> tuple[float, float]:
    """The HTTP load with a bare SSE reader (httpx2, one ``json.loads`` a chunk): what the
    server costs, with less of the client's own parsing on the shared CPU."""
    import json

    import httpx2

    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx2.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=3600) as client:

        async def one(messages: list[dict[str, str]]) -> float:
            start = time.perf_counter()
            first = None
            body = {
                "model": model,
                "messages": messages,
                "max_tokens": args.new_tokens,
                "temperature": 0,
                "stream": True,
                "ignore_eos": True,
            }
            async with client.stream(
                "POST", "/v1/chat/completions", json=body, headers=headers
            ) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: {") and first is None:
                        chunk = json.loads(line[6:])
                        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                            first = time.perf_counter() - start
            assert first is not None
            return first

        start = time.perf_counter()
        firsts = await asyncio.gather(*(one(m) for m in questions(args.requests)))
        return time.perf_counter() - start, sum(firsts) / len(firsts)


async def over_http(port: int, model: str, args: argparse.Namespace) -> tuple[float, float]:
    import openai

    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=3600
    )

    async def one(messages: list[dict[str, str]]) -> float:
        start = time.perf_counter()
        first = None
        stream = await client.chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=args.new_tokens,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter() - start
        assert first is not None
        return first

    start = time.perf_counter()
    firsts = await asyncio.gather(*(one(m) for m in questions(args.requests)))
    elapsed = time.perf_counter() - start
    await client.close()
    return elapsed, sum(firsts) / len(firsts)


def run_side(side: str, target: str, model: str, args: argparse.Namespace) -> tuple[float, float]:
    """One load of ``side`` (in the client process)."""
    if side == "grpc":
        return asyncio.run(over_grpc(target, args))
    if args.client == "light":
        return asyncio.run(over_http_light(int(target), model, args))
    return asyncio.run(over_http(int(target), model, args))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--client",
        choices=["openai", "light"],
        default="openai",
        help="HTTP client: the official openai one, or a bare SSE reader (server cost alone)",
    )
    parser.add_argument("--json", default="benchmarks/results/http.json")
    args = parser.parse_args()
    config = ServerConfig(
        EngineConfig.from_kwargs(dtype="float32", max_num_seqs=args.requests),
        port=0,
        http_port=0,
        api_keys=ApiKeys.parse(f"bench {KEY}", "bench"),
        registry_dir=None,
        max_waiting=4 * args.requests,
    )
    results: dict[str, list[tuple[float, float]]] = {"grpc": [], "http": []}
    clients = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    with BackgroundServer(config) as server, clients:
        assert server.server is not None and server.server.http_port is not None
        model = server.server.state.model_info.model
        targets = {"grpc": server.address, "http": str(server.server.http_port)}
        small = argparse.Namespace(requests=2, new_tokens=2, client=args.client)
        for side in ("grpc", "http"):  # warm both paths
            clients.submit(run_side, side, targets[side], model, small).result()
        for r in range(args.rounds):
            for side in ("grpc", "http") if r % 2 == 0 else ("http", "grpc"):
                job = clients.submit(run_side, side, targets[side], model, args)
                elapsed, ttft = job.result()
                results[side].append((elapsed, ttft))
                rate = args.requests * args.new_tokens / elapsed
                print(
                    f"  round {r + 1} {side}: {rate:7.1f} tok/s, TTFT {ttft * 1e3:6.0f} ms",
                    flush=True,
                )
    tokens = args.requests * args.new_tokens
    summary: dict[str, Any] = {}
    for side, runs in results.items():
        best = min(e for e, _ in runs)
        summary[side] = {
            "tok_s": tokens / best,
            "ttft_ms": 1e3 * sum(t for _, t in runs) / len(runs),
            "rounds": [{"seconds": e, "ttft_s": t} for e, t in runs],
        }
    ratio = summary["http"]["tok_s"] / summary["grpc"]["tok_s"]
    added = summary["http"]["ttft_ms"] - summary["grpc"]["ttft_ms"]
    print()
    print(f"{'API':<6} {'tok/s':>8} {'mean TTFT':>10}")
    for side in ("grpc", "http"):
        print(f"{side:<6} {summary[side]['tok_s']:8.1f} {summary[side]['ttft_ms']:8.0f} ms")
    print(f"HTTP / gRPC throughput: {ratio:.3f}x; HTTP adds {added:.0f} ms to the first token")
    write_report(
        args.json,
        {
            "benchmark": "http",
            "machine": machine_info(processor=True),
            "config": vars(args),
            "apis": summary,
            "http_over_grpc": ratio,
            "added_ttft_ms": added,
        },
    )


if __name__ == "__main__":
    main()
