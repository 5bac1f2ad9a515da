"""Bounded soak of a real server over loopback: a hostile tenant and careless clients, counted.

Starts a server (the embedded default model unless ``--model``) with API keys for three tenants
(``ops`` is the admin) and a temporary registry. Each tenant uploads the example PEFT adapters
(pirate, shout, json) and loads a few text adapters; ``ops`` also loads a public one. Then
``--concurrency`` client threads run, for ``--duration`` seconds (or until ``--requests`` client
actions are done), a random mix of

* greedy Generate and GenerateStream calls with and without adapters: the outputs of one prompt
  and adapter must agree token for token (cut-short ones on their common prefix);
* streams the client cancels after a few chunks, and calls whose deadline expires mid-answer;
* adapter churn: a tenant loads a text adapter, streams on it and unloads it mid-stream; uploads
  of examples/adapters/shout with deadlines short enough to cut them, each unloaded afterwards;
* bad requests: unknown adapters, another tenant's adapter, invalid sampling values, bad names,
  a bad API key, a public load without admin rights.

Once the clients are done and the engine is idle it checks what a reliable server leaves behind:
KV blocks used == blocks held by adapter prefixes, engine adapters == registry records, nothing in
the registry's ``.staging``, no UNKNOWN or INTERNAL status, no determinism mismatch, every bad
request refused. Prints a table and PASS/FAIL, writes ``benchmarks/results/soak.json``, and exits
with status 1 on FAIL.

    python benchmarks/bench_soak.py                        # about 2-3 minutes on 2 CPU cores
    python benchmarks/bench_soak.py --duration 600 --concurrency 16 --seed 3
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import random
import resource
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from prefixserve._proto import prefixserve_pb2 as pb
from prefixserve.async_engine import AsyncEngine
from prefixserve.client import Client, build_request, load_request
from prefixserve.config import EngineConfig
from prefixserve.engine import LLMEngine
from prefixserve.server import ApiKeys, BackgroundServer, ServerConfig
from prefixserve.server.service import ServingState

RESULTS = Path(__file__).resolve().parent / "results"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "adapters"
KEYS = {"acme": "acme-soak-key-0001", "globex": "globex-soak-key-0002", "ops": "ops-soak-key-0003"}
ADMIN = "ops"
PEFT_ADAPTERS = ("pirate", "shout", "json")
TEXTS = (
    "You are a terse assistant. Answer in one short sentence.",
    "You are a cheerful tour guide who loves old bridges.",
    "Reply like a ship's log: the date, the weather, then the answer.",
)
PROMPTS = (
    "The capital of France is",
    "Write a haiku about rain:",
    "List three prime numbers:",
    "Once upon a time",
    "def fibonacci(n):",
    "The best way to learn a language is",
)
BAD_SAMPLING = (
    {"temperature": -1.0},
    {"temperature": float("nan")},
    {"top_p": 0.0},
    {"top_p": 1.5},
    {"min_p": 2.0},
    {"repetition_penalty": 0.0},
    {"max_new_tokens": 0},
)
EXPECTED = {
    "generate": {"OK"},
    "stream": {"OK"},
    "stream_cancel": {"CANCELLED", "OK"},
    "deadline": {"DEADLINE_EXCEEDED", "OK"},
    "churn_load": {"OK", "ALREADY_EXISTS"},
    "churn_stream": {"OK"},
    "churn_unload": {"OK"},
    "churn_unload_deferred": {"OK"},
    "upload_deadline": {"DEADLINE_EXCEEDED", "OK"},
    "upload_unload": {"OK", "NOT_FOUND"},
    "bad_adapter": {"NOT_FOUND"},
    "bad_foreign": {"NOT_FOUND"},
    "bad_foreign_unload": {"NOT_FOUND"},
    "bad_sampling": {"INVALID_ARGUMENT"},
    "bad_name": {"INVALID_ARGUMENT"},
    "bad_key": {"UNAUTHENTICATED"},
    "bad_public": {"PERMISSION_DENIED"},
}
"""Statuses a correct server may answer, per kind of request (others are listed as unexpected)."""


@dataclass(slots=True)
class Tally:
    """What the clients saw, recorded from many threads under one lock."""

    outcomes: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    outputs: defaultdict[tuple[str, int], list[list[int]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    """Greedy token ids by (adapter content, prompt index); cut-short outputs included."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, code: str) -> None:
        with self.lock:
            self.outcomes[kind][code] += 1

    def observe(self, label: str, prompt: int, tokens: list[int]) -> None:
        if tokens:
            with self.lock:
                self.outputs[(label, prompt)].append(tokens)

    def mismatches(self) -> list[dict[str, Any]]:
        """Outputs that disagree with the longest output of the same prompt and adapter."""
        found = []
        for (label, prompt), outputs in self.outputs.items():
            reference = max(outputs, key=len)
            for tokens in outputs:
                if tokens != reference[: len(tokens)]:
                    example = {"adapter": label, "prompt": PROMPTS[prompt]}
                    found.append(example | {"expected": reference, "got": tokens})
        return found


class ErrorLog(logging.Handler):
    """Keeps the server's ERROR records (INTERNAL statuses, engine step failures)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()}")


def status_of(call: Callable[[], Any]) -> tuple[str, Any]:
    """The call's status code name and its answer (None unless OK)."""
    try:
        return "OK", call()
    except grpc.RpcError as e:
        return e.code().name, None


def generate_call(client: Client, request: pb.GenerateRequest, timeout: float | None = None):
    """A raw Generate call (the client's ``generate`` takes no ready request)."""
    return lambda: client.generation.Generate(request, metadata=client.metadata, timeout=timeout)


class Soak:
    """The client side: per-tenant clients and one action per kind of traffic."""

    def __init__(self, args: argparse.Namespace, address: str, tally: Tally) -> None:
        self.args = args
        self.tally = tally
        self.clients = {tenant: Client(address, key) for tenant, key in KEYS.items()}
        self.stranger = Client(address, "not-a-valid-key-0000")
        self.uploads = itertools.count()
        self.shout = load_request("upload", None, EXAMPLES / "shout", None, False)

    def close(self) -> None:
        for client in (*self.clients.values(), self.stranger):
            client.close()

    def setup(self) -> None:
        """Every tenant's adapters (the example PEFT ones, two personas and its own notes), the
        public one, and a few warm-up requests."""
        for tenant, client in self.clients.items():
            for name in PEFT_ADAPTERS:
                client.load_adapter(name, upload=EXAMPLES / name)
            for i in (0, 1):
                client.load_adapter(f"persona-{i}", text=TEXTS[i])
            client.load_adapter(f"{tenant}-notes", text=TEXTS[2])
        self.clients[ADMIN].load_adapter("house", text=TEXTS[2], public=True)
        for adapter in (None, *PEFT_ADAPTERS):  # page in the weights before RSS is first read
            self.clients[ADMIN].generate(PROMPTS[0], adapter, max_new_tokens=2)

    def pick(self, rng: random.Random) -> tuple[Client, str | None, str, int]:
        """A tenant's client, an adapter it may use (or None), its content label, a prompt."""
        tenant = rng.choice(list(KEYS))
        adapters: list[tuple[str | None, str]] = [(None, "base"), ("house", "text-2")]
        adapters += [
            (f"{tenant}-notes", "text-2"),
            ("persona-0", "text-0"),
            ("persona-1", "text-1"),
        ]
        adapters += [(name, name) for name in PEFT_ADAPTERS]
        adapter, label = rng.choice(adapters)
        return self.clients[tenant], adapter, label, rng.randrange(len(PROMPTS))

    def request(
        self, prompt: int, adapter: str | None, tokens: int, **extra: Any
    ) -> pb.GenerateRequest:
        """A greedy request that ignores eos, so equal inputs give equal tokens of equal length."""
        options = {"max_new_tokens": tokens, "ignore_eos": True} | extra
        return build_request(PROMPTS[prompt], adapter, options)

    def send(
        self, client: Client, request: pb.GenerateRequest, streaming: bool, **kw: Any
    ) -> tuple[str, list[int]]:
        """One Generate or GenerateStream call: its status and the token ids that arrived."""
        if not streaming:
            code, out = status_of(generate_call(client, request, kw.get("timeout")))
            return code, list(out.token_ids) if out is not None else []
        return self.stream(client, request, **kw)

    def stream(
        self,
        client: Client,
        request: pb.GenerateRequest,
        at_chunk: int = 0,
        then: Callable[[], None] | None = None,
        timeout: float | None = None,
    ) -> tuple[str, list[int]]:
        """Read a stream; when chunk ``at_chunk`` arrives run ``then`` (default: cancel)."""
        call = client.generation.GenerateStream(request, metadata=client.metadata, timeout=timeout)
        tokens: list[int] = []
        try:
            for chunks, message in enumerate(call, 1):
                tokens += message.delta_token_ids
                if chunks == at_chunk:
                    (then or call.cancel)()
        except grpc.RpcError as e:
            return e.code().name, tokens
        return "OK", tokens

    # -- one action per kind --------------------------------------------------------------------

    def generate(self, rng: random.Random) -> None:
        client, adapter, label, prompt = self.pick(rng)
        streaming = rng.random() < 0.5
        request = self.request(prompt, adapter, self.args.max_new_tokens)
        code, tokens = self.send(client, request, streaming)
        self.tally.record("stream" if streaming else "generate", code)
        self.tally.observe(label, prompt, tokens)

    def cancel(self, rng: random.Random) -> None:
        client, adapter, label, prompt = self.pick(rng)
        request = self.request(prompt, adapter, 4 * self.args.max_new_tokens)
        code, tokens = self.stream(client, request, at_chunk=rng.randint(1, 3))
        self.tally.record("stream_cancel", code)
        self.tally.observe(label, prompt, tokens)

    def deadline(self, rng: random.Random) -> None:
        client, adapter, label, prompt = self.pick(rng)
        request = self.request(prompt, adapter, 4 * self.args.max_new_tokens)
        timeout = rng.uniform(0.02, 0.5)
        code, tokens = self.send(client, request, rng.random() < 0.5, timeout=timeout)
        self.tally.record("deadline", code)
        self.tally.observe(label, prompt, tokens)

    def churn(self, rng: random.Random) -> None:
        """Load a text adapter, stream on it and unload it when the first chunk arrives."""
        client = self.clients[rng.choice(list(KEYS))]
        which, prompt = rng.randrange(2), rng.randrange(len(PROMPTS))
        name = f"churn-{which}"
        code, _ = status_of(lambda: client.load_adapter(name, text=TEXTS[which]))
        self.tally.record("churn_load", code)
        if code != "OK":  # another thread churns this name now
            return
        unloads: list[str] = []

        def unload() -> None:
            code, now = status_of(lambda: client.unload_adapter(name))
            unloads.append(code)
            # Deferred: a request still used it, so it goes when that request ends.
            kind = "churn_unload_deferred" if code == "OK" and not now else "churn_unload"
            self.tally.record(kind, code)

        request = self.request(prompt, name, self.args.max_new_tokens)
        code, tokens = self.stream(client, request, at_chunk=1, then=unload)
        if not unloads:  # the stream failed before its first chunk
            unload()
        self.tally.record("churn_stream", code)
        self.tally.observe(f"text-{which}", prompt, tokens)

    def upload(self, rng: random.Random) -> None:
        """Upload shout with a deadline that often cuts it, then unload whatever got loaded."""
        client = self.clients[rng.choice(list(KEYS))]
        request = pb.LoadAdapterRequest()
        request.CopyFrom(self.shout)
        request.name = f"upload-{next(self.uploads)}"
        # 1 ms to 3 s, log-uniform: under load a load takes ~0.2-1 s, so every phase gets cut.
        timeout = 10 ** rng.uniform(-3, 0.5)
        load = lambda: client.adapters.LoadAdapter(
            request, metadata=client.metadata, timeout=timeout
        )
        code, _ = status_of(load)
        self.tally.record("upload_deadline", code)
        code, _ = status_of(lambda: client.unload_adapter(request.name))
        self.tally.record("upload_unload", code)

    def bad(self, rng: random.Random) -> None:
        """One bad request of a random kind; each must be refused with its own status."""
        tenant = rng.choice(list(KEYS))
        client, prompt = self.clients[tenant], rng.randrange(len(PROMPTS))
        other = rng.choice([t for t in KEYS if t != tenant])
        rogue = self.clients[rng.choice([t for t in KEYS if t != ADMIN])]
        invalid = self.request(prompt, None, 4, **rng.choice(BAD_SAMPLING))
        cases: dict[str, Callable[[], Any]] = {
            "bad_adapter": generate_call(client, self.request(prompt, "no-such-adapter", 4)),
            "bad_foreign": generate_call(client, self.request(prompt, f"{other}-notes", 4)),
            "bad_foreign_unload": lambda: client.unload_adapter(f"{other}-notes"),
            "bad_sampling": generate_call(client, invalid),
            "bad_name": lambda: client.load_adapter(f"../{tenant}", text=TEXTS[0]),
            "bad_key": generate_call(self.stranger, self.request(prompt, None, 4)),
            "bad_public": lambda: rogue.load_adapter("rogue", text=TEXTS[0], public=True),
        }
        kind = rng.choice(list(cases))
        code, _ = status_of(cases[kind])
        self.tally.record(kind, code)


ACTIONS = {"generate": 6, "cancel": 2, "deadline": 2, "churn": 1, "upload": 1, "bad": 2}
"""Relative frequency of each client action."""


def drive(soak: Soak, args: argparse.Namespace) -> tuple[float, list[int]]:
    """Run the client threads until ``--duration`` passes or ``--requests`` actions are done;
    the seconds it took and the RSS (MiB) sampled every 2 s meanwhile."""
    stop_at = time.monotonic() + args.duration
    actions = itertools.count()
    names, weights = list(ACTIONS), list(ACTIONS.values())

    def worker(index: int) -> None:
        rng = random.Random(args.seed * 1000 + index)
        while time.monotonic() < stop_at and (not args.requests or next(actions) < args.requests):
            action = rng.choices(names, weights)[0]
            try:
                getattr(soak, action)(rng)
            except Exception as e:  # a client-side failure is counted, not fatal
                logging.getLogger("soak").exception("%s failed on the client", action)
                soak.tally.record(action, f"client {type(e).__name__}")

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.concurrency)]
    for thread in threads:
        thread.start()
    rss = []
    while any(thread.is_alive() for thread in threads):
        rss.append(round(rss_mib()[0]))
        next(thread for thread in threads if thread.is_alive()).join(2.0)
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, rss


def settle(server: BackgroundServer, timeout: float) -> float:
    """Seconds until the server is idle for 1 s: no request left, only prefixes hold blocks, no
    adapter call running (so work a cancelled call left behind has finished)."""
    start, idle_since = time.monotonic(), None
    while time.monotonic() - start < timeout:
        state = engine_state(server)
        idle = not state["requests"] and state["kv_used"] == state["kv_prefix"] + state["kv_cached"]
        if not idle or serving_state(server).adapter_lock.locked():
            idle_since = None
        elif idle_since is None:
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since >= 1.0:
            break
        time.sleep(0.1)
    return time.monotonic() - start


def serving_state(server: BackgroundServer) -> ServingState:
    assert server.server is not None, "the server is not started"
    return server.server.state


def engine_state(server: BackgroundServer) -> dict[str, Any]:
    """A snapshot read on the engine's own thread, between steps."""

    def read(e: LLMEngine) -> dict[str, Any]:
        return {
            "requests": len(e.requests),
            "kv_blocks": e.allocator.num_blocks,
            "kv_used": e.allocator.num_used,
            "kv_prefix": e.prefixes.resident_blocks,
            "kv_cached": len(e.block_cache.idle),
            "kv_pool_mib": e.allocator.num_blocks * e.prefixes.bytes_per_block / 2**20,
            "engine_adapters": sorted(e.prefixes.prefixes),
        }

    engine = serving_state(server).engine
    assert isinstance(engine, AsyncEngine), "the server has no engine (yet) in this process"
    return asyncio.run(engine.inspect(read))  # commands may come from any thread and event loop


def snapshot(server: BackgroundServer) -> dict[str, Any]:
    """KV blocks, adapters in the engine and the registry, what is in staging (folders end in
    '/'), and RSS."""
    registry = serving_state(server).registry
    staging = registry.root / ".staging"
    state = engine_state(server)
    state["registry_adapters"] = sorted(registry.records)
    entries = staging.rglob("*") if staging.is_dir() else []
    state["staging"] = sorted(f"{p.relative_to(staging)}{'/' * p.is_dir()}" for p in entries)
    state["rss_mib"], state["peak_rss_mib"] = rss_mib()
    return state


def rss_mib() -> tuple[float, float]:
    """This process's resident set size and its peak in MiB (server and clients share it)."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        fields = dict(line.split(":", 1) for line in status if ":" in line)
        return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return float("nan"), peak


def invariants(tally: Tally, after: dict[str, Any], mismatches: int) -> dict[str, dict]:
    codes: Counter[str] = Counter()
    for counts in tally.outcomes.values():
        codes.update(counts)
    bad_ok = sum(c["OK"] for kind, c in tally.outcomes.items() if kind.startswith("bad_"))
    engine, registry = set(after["engine_adapters"]), set(after["registry_adapters"])
    checks = {
        "no leaked KV blocks": (
            after["kv_used"] == after["kv_prefix"] + after["kv_cached"] and not after["requests"],
            f"{after['kv_used']} used, {after['kv_prefix']} held by prefixes, "
            f"{after['kv_cached']} by the prefix cache (idle), "
            f"{after['requests']} requests left",
        ),
        "engine adapters == registry records": (
            engine == registry,
            f"only in engine: {brief(engine - registry)}; "
            f"only in registry: {brief(registry - engine)}",
        ),
        "no staging files": (not after["staging"], staged(after["staging"])),
        "no UNKNOWN/INTERNAL status": (
            not codes["UNKNOWN"] and not codes["INTERNAL"],
            f"{codes['UNKNOWN']} UNKNOWN, {codes['INTERNAL']} INTERNAL",
        ),
        "greedy outputs deterministic": (not mismatches, f"{mismatches} mismatches"),
        "bad requests refused": (not bad_ok, f"{bad_ok} answered OK"),
    }
    return {name: {"ok": ok, "detail": detail} for name, (ok, detail) in checks.items()}


def staged(entries: list[str]) -> str:
    folders = sum(e.endswith("/") for e in entries)
    return f"{len(entries) - folders} files in {folders} folders"


def brief(names: Iterable[str], shown: int = 4) -> str:
    ordered = sorted(names)
    more = f" (+{len(ordered) - shown} more)" if len(ordered) > shown else ""
    return (", ".join(ordered[:shown]) or "none") + more


def print_report(result: dict[str, Any]) -> None:
    outcomes = result["outcomes"]
    codes = sorted({c for o in outcomes.values() for c in o}, key=lambda c: (c != "OK", c))
    widths = [len(c) + 2 for c in codes]
    first = max(map(len, outcomes), default=4)
    print(f"\n{'kind':<{first}}{'calls':>7}" + "".join(f"{c:>{w}}" for c, w in zip(codes, widths)))
    for kind in sorted(outcomes):
        counts = outcomes[kind]
        cells = "".join(f"{counts.get(c, '') or '':>{w}}" for c, w in zip(codes, widths))
        print(f"{kind:<{first}}{sum(counts.values()):>7}{cells}")
    b, a, d = result["before"], result["after"], result["determinism"]
    print(
        f"\n{result['calls']} calls in {result['duration_s']:.0f} s "
        f"({result['calls'] / result['duration_s']:.1f}/s), settled in {result['settle_s']:.1f} s"
    )
    print(f"unexpected statuses: {', '.join(result['unexpected']) or 'none'}")
    print(
        f"determinism: {d['outputs']} outputs of {d['pairs']} prompt+adapter pairs, "
        f"{d['mismatches']} mismatches"
    )
    print(
        f"KV blocks of {a['kv_blocks']} ({a['kv_pool_mib']:.0f} MiB): before {b['kv_used']} used "
        f"({b['kv_prefix']} prefix, {b['kv_cached']} cached), after {a['kv_used']} used "
        f"({a['kv_prefix']} prefix, {a['kv_cached']} cached)"
    )
    print(
        f"adapters: engine {len(a['engine_adapters'])}, registry {len(a['registry_adapters'])}; "
        f"staging: {staged(a['staging'])}; server errors logged: {result['errors_logged']}"
    )
    rss = result["rss_mib_every_2s"] or [a["rss_mib"]]
    print(
        f"RSS MiB (server and clients): after warm-up {b['rss_mib']:.0f}, mid-run "
        f"{rss[len(rss) // 2]}, after {a['rss_mib']:.0f}, peak {a['peak_rss_mib']:.0f}"
    )
    for name, check in result["invariants"].items():
        print(f"  {'ok  ' if check['ok'] else 'FAIL'} {name}: {check['detail']}")
    print("PASS" if result["pass"] else "FAIL")


def soak(args: argparse.Namespace) -> dict[str, Any]:
    tally, errors = Tally(), ErrorLog()
    logging.getLogger("prefixserve").addHandler(errors)
    engine = EngineConfig.from_kwargs(
        model=args.model, dtype=args.dtype, num_kv_blocks=args.num_kv_blocks
    )
    keys = ";".join(f"{t} {k}" + (" admin" if t == ADMIN else "") for t, k in KEYS.items())
    with tempfile.TemporaryDirectory(prefix="soak-registry-") as registry:
        config = ServerConfig(
            engine, port=0, api_keys=ApiKeys.parse(keys, "soak"), registry_dir=registry
        )
        with BackgroundServer(config) as server:
            clients = Soak(args, server.address, tally)
            try:
                clients.setup()
                before = snapshot(server)
                duration, rss = drive(clients, args)
                settle_s = settle(server, args.settle)
                after = snapshot(server)
            finally:
                clients.close()
            info = serving_state(server).model_info
    mismatches = tally.mismatches()
    checks = invariants(tally, after, len(mismatches))
    outcomes = {kind: dict(counts) for kind, counts in sorted(tally.outcomes.items())}
    return {
        "config": vars(args),
        "server": {"model": info.model, "device": info.device, "dtype": info.dtype},
        "duration_s": duration,
        "settle_s": settle_s,
        "calls": sum(sum(c.values()) for c in outcomes.values()),
        "outcomes": outcomes,
        "unexpected": [
            f"{kind} {code} x{n}"
            for kind, counts in outcomes.items()
            for code, n in counts.items()
            if code not in EXPECTED.get(kind, ())
        ],
        "determinism": {
            "outputs": sum(len(v) for v in tally.outputs.values()),
            "pairs": len(tally.outputs),
            "mismatches": len(mismatches),
            "examples": mismatches[:5],
        },
        "before": before,
        "after": after,
        "rss_mib_every_2s": rss,
        "errors_logged": len(errors.messages),
        "error_messages": errors.messages[:20],
        "invariants": checks,
        "pass": all(c["ok"] for c in checks.values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of traffic")
    parser.add_argument(
        "--requests", type=int, default=0, help="stop after this many client actions (0: none)"
    )
    parser.add_argument("--concurrency", type=int, default=6, help="client threads")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="per normal request")
    parser.add_argument("--seed", type=int, default=0, help="seeds each client thread's choices")
    parser.add_argument("--model", help="model directory (default: the embedded default model)")
    parser.add_argument("--dtype", default="auto", help="auto = fp32 on CPU, bf16 on CUDA")
    parser.add_argument(
        "--num-kv-blocks", type=int, help="KV pool size (small pools add eviction pressure)"
    )
    parser.add_argument(
        "--settle", type=float, default=30.0, help="most seconds to wait for an idle server"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    result = soak(args)
    print_report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")
    return 0 if result["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
