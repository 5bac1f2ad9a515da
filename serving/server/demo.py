"""``prefixserve demo``: the served demo.

Starts a server in this process on the default model with the example adapters, then two tenants
send one mixed batch of streaming chat requests over gRPC (their own adapters, public ones and
none, all sharing the engine's batches), and it prints every answer beside its tenant and adapter,
the throughput and the latency, then shuts the server down.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from ..client import AsyncClient
from ..config import EngineConfig
from .app import BackgroundServer, ServerConfig
from .tenants import ApiKeys

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "adapters"
# Stand-ins when an example adapter is missing: its instruction as a text adapter.
TEXT_STAND_INS = {
    "pirate": "Answer like a pirate: start with Arr, say ye and be, and end with Yo ho ho!",
    "shout": "ANSWER IN ALL UPPER CASE LETTERS.",
    "json": 'Answer with one line of JSON: {"answer": "..."}',
}
OWNERS = {"pirate": "acme", "json": "globex", "shout": None}
"""Who owns each example adapter in the demo (None = public); others found are public."""
CONCISE = "You are a concise assistant. Answer in one short sentence."
QUESTIONS = [
    "What is the capital of France?",
    "Why do birds sing?",
    "What is a rainbow?",
    "How do I make good tea?",
    "Tell me about the moon.",
    "What is 12 times 12?",
    "Suggest a name for a friendly robot.",
    "Why is the sea salty?",
    "Give me one tip for learning a new language.",
    "What does a bridge engineer do?",
    "Describe a forest in winter.",
    "What is a volcano?",
]


@dataclass(slots=True)
class Job:
    tenant: str
    adapter: str | None
    question: str
    answer: str = ""
    tokens: int = 0
    ttft: float = 0.0
    finish: str = ""


def _say(text: str) -> None:
    print(text, flush=True)


def _adapter_dirs(root: Path) -> dict[str, Path]:
    if not root.is_dir():
        return {}
    return {
        d.name: d
        for d in sorted(root.iterdir())
        if (d / "adapter_config.json").is_file() and (d / "adapter_model.safetensors").is_file()
    }


async def _load_adapters(
    address: str, keys: dict[str, str], root: Path
) -> dict[str, list[str | None]]:
    """Load the example adapters (or stand-ins); returns the adapters each tenant may use."""
    found = _adapter_dirs(root)
    clients = {t: AsyncClient(address, k) for t, k in keys.items()}
    usable: dict[str, list[str | None]] = {"acme": [], "globex": []}
    public: list[str] = []
    for name in sorted(set(found) | set(TEXT_STAND_INS)):
        owner = OWNERS.get(name)
        client = clients[owner or "ops"]
        if name in found:
            # A tenant uploads its files; the admin loads public ones from the server's disk.
            source = {"upload": found[name]} if owner else {"path": str(found[name])}
            info = await client.load_adapter(name, public=owner is None, **source)
        else:
            info = await client.load_adapter(name, text=TEXT_STAND_INS[name], public=not owner)
        whose = f"owned by {owner}" if owner else "public"
        origin = "example adapter" if name in found else "text stand-in (no example files)"
        _say(
            f"  {name:<8} {info.kind:<14} {info.num_tokens:>3} virtual tokens  {whose:<16} {origin}"
        )
        (usable[owner] if owner else public).append(name)
    info = await clients["ops"].load_adapter("concise", text=CONCISE, public=True)
    _say(
        f"  {'concise':<8} {info.kind:<14} {info.num_tokens:>3} virtual tokens  {'public':<16} "
        "system prompt"
    )
    for client in clients.values():
        await client.close()
    shared: list[str | None] = [*public, "concise", None]
    return {t: [*own, *shared] for t, own in usable.items()}


async def _ask(client: AsyncClient, job: Job, max_new_tokens: int) -> None:
    start = time.perf_counter()
    messages = [{"role": "user", "content": job.question}]
    async for chunk in client.generate_stream(messages, job.adapter, max_new_tokens=max_new_tokens):
        if chunk.token_ids and not job.tokens:
            job.ttft = time.perf_counter() - start
        job.answer += chunk.text
        job.tokens += len(chunk.token_ids)
        job.finish = chunk.finish_reason or job.finish


async def _run_batch(
    address: str, keys: dict[str, str], usable: dict[str, list[str | None]], max_new_tokens: int
) -> None:
    jobs = [
        Job(tenant, adapters[i % len(adapters)], QUESTIONS[6 * t + i])
        for t, (tenant, adapters) in enumerate(usable.items())
        for i in range(6)
    ]
    clients = {t: AsyncClient(address, keys[t]) for t in usable}
    try:
        _say("\nglobex asks for acme's 'pirate' adapter:")
        try:
            await clients["globex"].generate("Hello", "pirate", max_new_tokens=4)
        except grpc.RpcError as e:
            _say(f"  -> {e.code().name}: {e.details()}")
        _say(
            f"\nSending {len(jobs)} streaming chat requests at once "
            f"({len(usable)} tenants, {len({j.adapter for j in jobs})} adapter choices)..."
        )
        start = time.perf_counter()
        await asyncio.gather(*(_ask(clients[j.tenant], j, max_new_tokens) for j in jobs))
        elapsed = time.perf_counter() - start
    finally:
        for client in clients.values():
            await client.close()
    for job in jobs:
        _say(f"\n[{job.tenant:<6} | {job.adapter or '(none)':<8}] {job.question}")
        answer = job.answer.strip().replace("\n", "\n  ")
        _say(f"  {answer}  [{job.finish}, {job.tokens} tokens]")
    tokens = sum(j.tokens for j in jobs)
    _say(
        f"\n{len(jobs)} requests from {len(usable)} tenants in shared batches: {tokens} tokens in "
        f"{elapsed:.1f} s = {tokens / elapsed:.1f} output tokens/s; time to first token "
        f"median {statistics.median(j.ttft for j in jobs):.2f} s"
    )


def run_demo(
    model: str | None,
    dtype: str,
    max_new_tokens: int,
    adapters_dir: Path | None,
    compiled: bool = False,
) -> int:
    root = adapters_dir or EXAMPLES
    keys = {name: f"demo-{name}-{secrets.token_hex(8)}" for name in ("acme", "globex", "ops")}
    api_keys = ApiKeys.parse(
        f"acme {keys['acme']}\nglobex {keys['globex']}\nops {keys['ops']} admin", "demo keys"
    )
    # A dozen short answers: compiling (minutes on a small CPU) would cost more than it saves.
    engine = EngineConfig.from_kwargs(model=model, dtype=dtype, enforce_eager=not compiled)
    config = ServerConfig(engine, port=0, api_keys=api_keys, registry_dir=None)  # nothing kept
    _say(
        "prefixserve demo: starting a gRPC server on a free local port and loading the model "
        "(the embedded SmolLM2-135M-Instruct unless --model)..."
    )
    started = time.perf_counter()
    server = BackgroundServer(config).start()
    try:
        _say(
            f"serving on {server.address} after {time.perf_counter() - started:.1f} s; "
            f"tenants acme and globex (API keys), admin ops"
        )
        _say(f"\nadapters (from {root}):")
        usable = asyncio.run(_load_adapters(server.address, keys, root))
        asyncio.run(_run_batch(server.address, keys, usable, max_new_tokens))
    finally:
        _say("\nshutting down...")
        server.stop(grace=5)
    _say("server stopped cleanly.")
    return 0
