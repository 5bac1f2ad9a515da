"""The gRPC server over a real loopback port: streams equal the offline engine, cancellations and
deadlines free their blocks, every bad input gets its status and the server keeps serving."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from prefixserve import LLM, SamplingParams
from prefixserve.client import AsyncClient, Client
from prefixserve.config import CacheConfig, EngineConfig, ModelConfig
from prefixserve.server import ApiKeys, BackgroundServer, ServerConfig

KEYS = {"acme": "acme-key-0001", "globex": "globex-key-0002", "ops": "ops-key-0003"}
KEYS_TEXT = "acme acme-key-0001\nglobex globex-key-0002\nops ops-key-0003 admin\n"
POLITE = "Numbers like 12 appear in text too."


def server_config(model_dir: Path, registry: Path | None, **kwargs) -> ServerConfig:
    engine = EngineConfig(
        model=ModelConfig(str(model_dir), "float32"),
        cache=CacheConfig(block_size=4, num_kv_blocks=512),
    )
    return ServerConfig(
        engine, port=0, api_keys=ApiKeys.parse(KEYS_TEXT, "test"), registry_dir=registry, **kwargs
    )


def load_adapters(address: str, adapters: dict[str, Path]) -> None:
    """The server tests' four adapters, loaded over the wire: acme owns 'pirate', globex owns
    'shout', 'json' and 'polite' (text) are public."""
    with Client(address, KEYS["acme"]) as acme:
        acme.load_adapter("pirate", upload=adapters["pirate"])
    with Client(address, KEYS["globex"]) as globex:
        globex.load_adapter("shout", upload=adapters["shout"])
    with Client(address, KEYS["ops"]) as ops:
        ops.load_adapter("json", path=str(adapters["json"]), public=True)
        ops.load_adapter("polite", text=POLITE, public=True)


def scrape(port: int, key: str | None = KEYS["ops"]) -> str:
    """The server's ``/metrics`` text, read with ``key`` (default: the admin's)."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    return urllib.request.urlopen(request, timeout=10).read().decode()


def offline_llm(model_dir: Path, adapters: dict[str, Path], **options: Any) -> LLM:
    """An engine in this process configured as the server's (plus ``options``), with the same
    four adapters: what the server's streams must equal."""
    llm = LLM(str(model_dir), dtype="float32", block_size=4, num_kv_blocks=512, **options)
    for name, path in adapters.items():
        llm.load_adapter(name, path)
    llm.load_adapter("polite", text=POLITE)
    return llm


def wait_until_idle(engine, timeout: float = 10.0) -> None:
    """Until no request is left and only adapter prefixes hold blocks."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kept = engine.prefixes.resident_blocks + len(engine.block_cache.idle)
        if not engine.requests and engine.allocator.num_used == kept:
            return
        time.sleep(0.02)
    raise AssertionError(
        f"{len(engine.requests)} requests and {engine.allocator.num_used} used blocks left "
        f"({engine.prefixes.resident_blocks} held by prefixes)"
    )


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, peft_adapter_dir) -> dict[str, Path]:
    model = tiny_model_dir("llama")
    return {
        "pirate": peft_adapter_dir(model, "prompt_tuning", 4),
        "shout": peft_adapter_dir(model, "prefix_tuning", 3),
        "json": peft_adapter_dir(model, "prompt_tuning", 6, seed=1),
    }


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapters, tmp_path_factory):
    """acme owns 'pirate', globex owns 'shout', 'json' and 'polite' (text) are public."""
    config = server_config(
        tiny_model_dir("llama"), tmp_path_factory.mktemp("registry"), max_upload_bytes=2**20
    )
    with BackgroundServer(config) as running:
        load_adapters(running.address, adapters)
        yield running


@pytest.fixture(scope="module")
def offline(tiny_model_dir, adapters) -> LLM:
    return offline_llm(tiny_model_dir("llama"), adapters)


@pytest.fixture
def acme(server):
    with Client(server.address, KEYS["acme"]) as client:
        yield client


def test_concurrent_streams_across_tenants_and_adapters_equal_offline(server, offline):
    """Acceptance 1: 32 streams, 2 tenants, 4 adapters + none, all in shared batches."""
    prompts = ["The quick brown fox", [5, 9, 33, 7], "Paged attention stores", [40, 41, 42]]
    tenants = {"acme": ["pirate", "json", "polite", None], "globex": ["shout", "json", None]}
    jobs = []
    for i in range(32):
        tenant = "acme" if i % 2 == 0 else "globex"
        adapter = tenants[tenant][(i // 2) % len(tenants[tenant])]
        jobs.append((tenant, adapter, prompts[i % len(prompts)], 6 + i % 7))
    expected = offline.generate(
        [p for _, _, p, _ in jobs],
        [SamplingParams(max_new_tokens=n) for *_, n in jobs],
        adapter=[a for _, a, _, _ in jobs],
    )

    async def stream(client: AsyncClient, adapter, prompt, n):
        text, ids, last = "", [], None
        async for chunk in client.generate_stream(prompt, adapter, max_new_tokens=n):
            text, ids, last = text + chunk.text, ids + chunk.token_ids, chunk
        return text, ids, last

    async def main():
        clients = {t: AsyncClient(server.address, KEYS[t]) for t in tenants}
        try:
            return await asyncio.gather(*(stream(clients[t], a, p, n) for t, a, p, n in jobs))
        finally:
            for c in clients.values():
                await c.close()

    results = asyncio.run(main())
    assert len({a for _, a, _, _ in jobs}) >= 5
    for (text, ids, last), want, (_, adapter, _, _) in zip(results, expected, jobs):
        assert ids == want.token_ids, adapter
        assert text == want.text
        assert last.finish_reason == want.finish_reason
        assert last.usage.completion_tokens == len(want.token_ids)
    wait_until_idle(server.engine)


def test_unary_generate_equals_offline_and_echoes_the_request_id(server, offline, acme):
    want = offline.generate(
        "The quick brown fox", SamplingParams(max_new_tokens=8), adapter="pirate"
    )
    out = acme.generate("The quick brown fox", "pirate", max_new_tokens=8, request_id="r-1")
    assert (out.text, out.token_ids, out.finish_reason) == (
        want[0].text,
        want[0].token_ids,
        want[0].finish_reason,
    )
    assert out.request_id == "r-1" and out.usage.adapter_tokens == 4
    seeded = [acme.generate([5, 9], max_new_tokens=6, temperature=1.0, seed=7) for _ in range(2)]
    assert seeded[0].token_ids == seeded[1].token_ids
    top = acme.generate([5, 9], max_new_tokens=3, logprobs=2)
    assert top.logprobs is not None and len(top.logprobs) == 3
    assert all(len(t.top) == 2 for t in top.logprobs)


def test_cancelled_streams_and_expired_deadlines_free_their_blocks(server, acme):
    """Acceptance 2."""
    long = {"max_new_tokens": 450, "ignore_eos": True}
    for adapter in ("pirate", None):
        stream = acme.generate_stream([5, 9, 33], adapter, **long)
        next(stream), next(stream)
        stream.close()  # the client goes away mid-stream
    with pytest.raises(grpc.RpcError) as info:
        acme.generate([7, 7, 8], "json", timeout=0.3, **long)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.RpcError) as info:
        for _ in acme.generate_stream([7, 8], "polite", timeout=0.3, **long):
            pass
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until_idle(server.engine)
    assert acme.generate([5, 9], max_new_tokens=3).finish_reason == "length"


def _code(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def bad_input_cases(
    address: str, acme: Client, tmp_path: Path, max_upload: int = 2**20
) -> list[tuple[Callable[[], object], grpc.StatusCode, str]]:
    """Calls to the server at ``address`` that must fail: each with its status and words its
    message must hold (acme owns 'pirate', globex 'shout'; 'json' is public; uploads are
    limited to ``max_upload`` bytes)."""
    S = grpc.StatusCode
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "adapter_config.json").write_text('{"peft_type": "PROMPT_TUNING"}')
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    bad_json = tmp_path / "bad_json"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_text("{not json")
    (bad_json / "adapter_model.safetensors").write_bytes(b"")
    stranger = Client(address, "not-a-key-at-all")
    anonymous = Client(address)
    cases = [
        (lambda: acme.generate("hi", "nope"), S.NOT_FOUND, "'nope' is not loaded for you"),
        (lambda: acme.generate("hi", "shout"), S.NOT_FOUND, "'shout' is not loaded for you"),
        (lambda: acme.generate("hi", "globex/shout"), S.NOT_FOUND, "not loaded for you"),
        (lambda: acme.get_adapter("shout"), S.NOT_FOUND, "not loaded for you"),
        (lambda: acme.unload_adapter("shout"), S.NOT_FOUND, "not loaded for you"),
        (lambda: anonymous.generate("hi"), S.UNAUTHENTICATED, "needs an API key"),
        (lambda: stranger.generate("hi"), S.UNAUTHENTICATED, "API key is not valid"),
        (lambda: acme.generate("hi", temperature=-1.0), S.INVALID_ARGUMENT, "temperature"),
        (lambda: acme.generate("hi", top_p=0.0), S.INVALID_ARGUMENT, "top_p must be in (0, 1]"),
        (lambda: acme.generate("hi", logprobs=99), S.INVALID_ARGUMENT, "logprobs must be"),
        (
            lambda: acme.generate([5] * 500, max_new_tokens=20),
            S.INVALID_ARGUMENT,
            "exceeds the context",
        ),
        (lambda: acme.generate([10**6]), S.INVALID_ARGUMENT, "token ids must be ints"),
        (lambda: acme.generate(""), S.INVALID_ARGUMENT, "must not be empty"),
        (
            lambda: acme.generate([{"role": "user", "content": "hi"}]),
            S.INVALID_ARGUMENT,
            "no chat template",
        ),
        (
            lambda: acme.load_adapter("big", text="x" * (max_upload + 1)),
            S.RESOURCE_EXHAUSTED,
            f"at most {max_upload} bytes",
        ),
        (
            lambda: acme.load_adapter("c", upload=corrupt),
            S.INVALID_ARGUMENT,
            "'c': cannot read the weights in the upload",
        ),
        (
            lambda: acme.load_adapter("c", upload=bad_json),
            S.INVALID_ARGUMENT,
            "uploaded adapter_config.json is not valid JSON",
        ),
        (lambda: acme.load_adapter("c", path=str(corrupt)), S.PERMISSION_DENIED, "admin key"),
        (lambda: acme.load_adapter("c", text="hi", public=True), S.PERMISSION_DENIED, "admin"),
        (lambda: acme.load_adapter("bad/name", text="hi"), S.INVALID_ARGUMENT, "is not valid"),
        (lambda: acme.load_adapter("pirate", text="hi"), S.ALREADY_EXISTS, "already named"),
        (lambda: acme.load_adapter("json", text="hi"), S.ALREADY_EXISTS, "public adapter"),
        (lambda: acme.unload_adapter("json"), S.PERMISSION_DENIED, "public"),
        (lambda: acme.list_adapters(all_tenants=True), S.PERMISSION_DENIED, "admin"),
    ]
    return cases


def test_each_bad_input_gets_its_status_and_the_server_keeps_serving(server, acme, tmp_path):
    """Acceptance 3."""
    cases = bad_input_cases(server.address, acme, tmp_path)
    for call, code, words in cases:
        got, details = _code(call)
        assert (got, words in details) == (code, True), (code, words, details)
        assert "/tmp" not in details and "acme/" not in details  # no server paths or names
    engine = server.server.state.engine
    engine.max_waiting = 0  # a full queue
    try:
        got, details = _code(lambda: acme.generate("hi"))
    finally:
        engine.max_waiting = 256
    assert got is grpc.StatusCode.RESOURCE_EXHAUSTED and "retry later" in details
    assert acme.generate([5, 9], "pirate", max_new_tokens=2).finish_reason == "length"
    assert {a.name for a in acme.list_adapters()} == {"pirate", "json", "polite"}
    assert {a.name for a in Client(server.address, KEYS["ops"]).list_adapters(True)} == {
        "pirate",
        "shout",
        "json",
        "polite",
    }
    wait_until_idle(server.engine)


def test_tenants_load_and_unload_their_own_adapters(server, acme):
    globex = Client(server.address, KEYS["globex"])
    mine = acme.load_adapter("mine", text="The quick brown fox")
    assert (mine.owner, mine.public, mine.kind, mine.source) == ("acme", False, "TEXT", "text")
    same_name = globex.load_adapter("mine", text="Paged attention stores")  # no collision
    assert same_name.owner == "globex"
    assert (
        acme.generate([5], "mine", max_new_tokens=4).token_ids
        != globex.generate([5], "mine", max_new_tokens=4).token_ids
    )
    assert acme.unload_adapter("mine") is True
    assert _code(lambda: acme.get_adapter("mine"))[0] is grpc.StatusCode.NOT_FOUND
    assert globex.get_adapter("mine").owner == "globex"
    assert globex.unload_adapter("mine") is True


def test_tokenize_and_model_info(server, acme):
    info = acme.model_info()
    assert (info.max_model_len, info.block_size, info.dtype) == (512, 4, "float32")
    assert acme.tokenize("The quick brown fox") == server.engine.tokenize("The quick brown fox")
