"""Fairness between tenants over a real loopback server on the default model, in two parts.

``prefill`` (head-of-line blocking): tenant ``acme`` sends a prompt of ``--long-tokens`` tokens
(or, with ``--adapter``, a first request on a fresh text adapter of that many tokens, which the
engine must compute into the pool first); while it prefills, tenant ``globex`` sends ``--probes``
one-token requests, one after the other. Reported beside the engine's plain decode step time,
measured in the same run: the probes' time to answer, and how many decode steps that is, for
each ``--caps`` value of ``long_prefill_token_threshold`` (the largest prefill chunk per step;
``none`` = one chunk per step as large as the budget).

``share`` (fair share of slots, blocks and service), each case with ``--scheduling-policy`` fair
and fcfs in the same run:

* (a) flood: ``acme`` sends 64 requests of 200 new tokens at once (every running slot); then
  ``globex`` sends one-token requests one after the other: their latency (p50, p99) against the
  same requests on the idle server;
* (b) KV pressure: two tenants' long requests on a pool of ``--kv-blocks`` blocks, then
  ``globex``'s one-token requests, as in (a); (b') the same with ``globex``'s own long
  requests queued too: arrival order holds within a tenant, so its probes go with
  ``priority=-1`` (its own choice to put them first);
* (c) weights: backlogged tenants of weights 2:1 and 1:1:1 for ``--seconds``: Jain's index of
  the weight-normalized tokens served in every 10 s window (1.0 = exactly fair);
* (d) cost: the same mixed load of three tenants with fair and fcfs: total output tok/s.

Table on stdout, JSON in ``benchmarks/results/fairness.json`` (``fair_share.json``).

    python benchmarks/bench_fairness.py prefill --long-tokens 7000
    python benchmarks/bench_fairness.py share
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading
import time
from pathlib import Path
from typing import Any

from prefixserve.client import AsyncClient, Client
from prefixserve.config import EngineConfig
from prefixserve.quota import TenantQuota
from prefixserve.server import ApiKeys, BackgroundServer, ServerConfig

RESULTS = Path(__file__).resolve().parent / "results"
KEYS = "acme acme-bench-key-1\nglobex globex-bench-key-2\ninitech initech-bench-key-3"
KEY = {"acme": "acme-bench-key-1", "globex": "globex-bench-key-2", "initech": "initech-bench-key-3"}
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
    parts = parser.add_subparsers(dest="part", required=True)
    prefill = parts.add_parser("prefill", help="another tenant's requests beside a long prefill")
    prefill.add_argument("--long-tokens", type=int, default=7000, help="the long prompt's tokens")
    prefill.add_argument("--adapter", action="store_true", help="a long text adapter instead")
    prefill.add_argument("--probes", type=int, default=8, help="short requests of the other tenant")
    prefill.add_argument("--head-start", type=float, default=1.0, help="seconds before probing")
    prefill.add_argument(
        "--caps",
        nargs="+",
        default=["128", "512", "none"],
        help="long_prefill_token_threshold values to compare ('none' = uncapped)",
    )
    prefill.add_argument("--out", type=Path, default=RESULTS / "fairness.json")
    share = parts.add_parser("share", help="shares of slots, blocks and service: fair vs fcfs")
    share.add_argument("--probes", type=int, default=20, help="globex's one-token requests")
    share.add_argument("--kv-blocks", type=int, default=96, help="the pool of case (b)")
    share.add_argument("--seconds", type=float, default=40.0, help="length of case (c)")
    share.add_argument("--cases", nargs="+", default=["a", "b", "b'", "c", "d"])
    share.add_argument("--out", type=Path, default=RESULTS / "fair_share.json")
    args = parser.parse_args()
    if args.part == "share":
        run_share(args)
        return
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


# -- share ----------------------------------------------------------------------------------------


def _server(
    policy: str, weights: dict[str, float] | None = None, **engine: Any
) -> BackgroundServer:
    keys = "\n".join(
        f"{t} {k}" + (f" weight={weights[t]:g}" if weights and t in weights else "")
        for t, k in KEY.items()
    )
    config = ServerConfig(
        EngineConfig.from_kwargs(dtype="float32", scheduling_policy=policy, **engine),
        port=0,
        api_keys=ApiKeys.parse(keys, "bench"),
        registry_dir=None,
        max_waiting=1024,
        quota=TenantQuota(max_waiting=1024),
    )
    return BackgroundServer(config)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _probe(address: str, n: int, priority: int = 0) -> list[float]:
    """Latencies of ``n`` one-token requests of globex, one after the other."""
    async with AsyncClient(address, KEY["globex"]) as client:
        latencies = []
        for i in range(n):
            start = time.perf_counter()
            await client.generate(
                [5, 6, 7 + i % 50], max_new_tokens=1, ignore_eos=True, priority=priority
            )
            latencies.append(time.perf_counter() - start)
        return latencies


async def _load(address: str, tenant: str, n: int, prompt: list[int], new: int) -> None:
    async with AsyncClient(address, KEY[tenant]) as client:
        await asyncio.gather(
            *(
                client.generate([*prompt, i], max_new_tokens=new, ignore_eos=True, timeout=3600)
                for i in range(n)
            )
        )


def _wait_running(server: BackgroundServer, n: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while server.server.state.engine.stats().running < n:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the load never started"
        time.sleep(0.05)


def share_probes(case: str, policy: str, args: argparse.Namespace) -> dict[str, Any]:
    """Cases (a), (b) and (b'): globex's one-token requests, idle and under the load."""
    engine: dict[str, Any] = {} if case == "a" else {"num_kv_blocks": args.kv_blocks}
    priority = -1 if case == "b'" else 0
    with _server(policy, **engine) as server:
        idle = asyncio.run(_probe(server.address, args.probes))

        async def loaded() -> list[float]:
            if case == "a":
                loads = [_load(server.address, "acme", 64, [3, 4, 5], 200)]
            else:  # long requests: 330 tokens each
                tenants = ("acme", "initech", "globex") if case == "b'" else ("acme", "initech")
                loads = [_load(server.address, t, 8, list(range(10, 140)), 200) for t in tenants]
            tasks = [asyncio.create_task(job) for job in loads]
            await asyncio.to_thread(_wait_running, server, 8)
            await asyncio.sleep(2.0)
            latencies = await _probe(server.address, args.probes, priority)
            await asyncio.gather(*tasks)
            return latencies

        busy = asyncio.run(loaded())
        preemptions = server.engine.scheduler.num_preemptions
    return {
        "case": case,
        "policy": policy,
        "idle_p50_s": _percentile(idle, 0.5),
        "idle_p99_s": _percentile(idle, 0.99),
        "p50_s": _percentile(busy, 0.5),
        "p99_s": _percentile(busy, 0.99),
        "preemptions": preemptions,
    }


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1 when all equal, 1/n when one gets everything."""
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if any(values) else 1.0


def share_weights(weights: dict[str, float], policy: str, args: argparse.Namespace) -> dict:
    """Case (c): backlogged tenants; Jain's index of served tokens over weight per window."""
    with _server(policy, weights) as server:
        stop = asyncio.Event()

        async def backlog(tenant: str) -> None:
            async with AsyncClient(server.address, KEY[tenant]) as client:

                async def worker(i: int) -> None:
                    while not stop.is_set():
                        await client.generate(
                            [3, 4, 5, i], max_new_tokens=32, ignore_eos=True, timeout=3600
                        )

                await asyncio.gather(*(worker(i) for i in range(48)))

        async def main() -> list[dict[str, int]]:
            tasks = [asyncio.create_task(backlog(t)) for t in weights]
            samples = []
            start = time.monotonic()
            while time.monotonic() - start < args.seconds:
                await asyncio.sleep(1.0)
                stats = server.server.state.engine.stats()  # type: ignore[union-attr]
                samples.append({t.tenant: t.tokens for t in stats.tenants})
            stop.set()
            await asyncio.gather(*tasks)
            return samples

        samples = asyncio.run(main())
    indexes = []
    for end in range(10, len(samples)):
        begin = samples[end - 10]
        served = [(samples[end].get(t, 0) - begin.get(t, 0)) / w for t, w in weights.items()]
        indexes.append(jain(served))
    last = samples[-1]
    return {
        "case": "c",
        "policy": policy,
        "weights": weights,
        "tokens": {t: last.get(t, 0) for t in weights},
        "jain_min": min(indexes),
        "jain_mean": statistics.mean(indexes),
    }


def share_cost(policy: str) -> dict[str, Any]:
    """Case (d): three tenants' mixed load, total output tok/s."""
    with _server(policy) as server:

        async def main() -> float:
            start = time.perf_counter()
            await asyncio.gather(
                _load(server.address, "acme", 32, list(range(10, 200)), 64),
                _load(server.address, "globex", 32, [3, 4, 5], 64),
                _load(server.address, "initech", 16, list(range(20, 60)), 128),
            )
            return (32 * 64 + 32 * 64 + 16 * 128) / (time.perf_counter() - start)

        return {"case": "d", "policy": policy, "tok_s": asyncio.run(main())}


def run_share(args: argparse.Namespace) -> None:
    rows: list[dict[str, Any]] = []
    for case in args.cases:
        for policy in ("fair", "fcfs"):
            print(f"case ({case}), {policy} ...", flush=True)
            if case in ("a", "b", "b'"):
                rows.append(share_probes(case, policy, args))
            elif case == "c":
                rows.append(share_weights({"acme": 2, "globex": 1}, policy, args))
                rows.append(share_weights({"acme": 1, "globex": 1, "initech": 1}, policy, args))
            else:
                rows.append(share_cost(policy))
            print(f"  {rows[-1]}", flush=True)
    print()
    print(f"{'case':<34} {'policy':<6} {'result':<60}")
    for r in rows:
        if r["case"] in ("a", "b", "b'"):
            what = {
                "a": "flood of 64 x 200 tokens",
                "b": "KV pressure, 2 tenants",
                "b'": "KV pressure, own queue, prio -1",
            }[r["case"]]
            result = (
                f"p50 {r['p50_s']:.2f} s, p99 {r['p99_s']:.2f} s (idle p50 {r['idle_p50_s']:.2f},"
                f" p99 {r['idle_p99_s']:.2f}); {r['preemptions']} preemptions"
            )
            print(f"({r['case']}) {what:<30} {r['policy']:<6} {result}")
        elif r["case"] == "c":
            weights = ":".join(f"{w:g}" for w in r["weights"].values())
            result = (
                f"Jain min {r['jain_min']:.3f}, mean {r['jain_mean']:.3f}; tokens {r['tokens']}"
            )
            print(f"(c) weights {weights:<23} {r['policy']:<6} {result}")
        else:
            print(f"(d) mixed load, total tok/s{'':<7} {r['policy']:<6} {r['tok_s']:.1f}")
    fair = next((r for r in rows if r["case"] == "d" and r["policy"] == "fair"), None)
    fcfs = next((r for r in rows if r["case"] == "d" and r["policy"] == "fcfs"), None)
    if fair and fcfs:
        print(f"(d) fair / fcfs throughput: {fair['tok_s'] / fcfs['tok_s']:.3f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"workload": {**vars(args), "out": str(args.out)}, "rows": rows}, indent=1)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
