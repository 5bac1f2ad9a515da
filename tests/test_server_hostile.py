"""The gRPC server against hostile input: undecodable bytes and extreme values on every RPC get a
status that names the problem (never UNKNOWN or INTERNAL, never a huge message), oversized
requests are refused before parsing, bad adapter files are INVALID_ARGUMENT, private names and
server paths do not leak, and cancelled streams are counted as cancelled."""

from __future__ import annotations

import asyncio
import json
import math
import random
import shutil
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from transformers import PreTrainedTokenizerFast

from prefixserve._proto import prefixserve_pb2 as pb
from prefixserve.cli import build_parser
from prefixserve.client import Client
from prefixserve.server import BackgroundServer, PrefixServer
from prefixserve.server.errors import request_limits

from test_server import KEYS, scrape, server_config, wait_until_idle

GEN, ADA = "/prefixserve.v1.GenerationService/", "/prefixserve.v1.AdapterService/"
RPCS = {  # method -> (request type, streams its answer)
    GEN + "Generate": (pb.GenerateRequest, False),
    GEN + "GenerateStream": (pb.GenerateRequest, True),
    GEN + "Tokenize": (pb.TokenizeRequest, False),
    GEN + "GetModelInfo": (pb.GetModelInfoRequest, False),
    ADA + "LoadAdapter": (pb.LoadAdapterRequest, False),
    ADA + "UnloadAdapter": (pb.UnloadAdapterRequest, False),
    ADA + "ListAdapters": (pb.ListAdaptersRequest, False),
    ADA + "GetAdapter": (pb.GetAdapterRequest, False),
}
MAX_UPLOAD, MAX_REQUEST = 2 * 2**20, 2 * 2**20
MESSAGE_LIMIT = 3000
"""Longest status message accepted (the server cuts its messages at 2,000 characters)."""
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
S = grpc.StatusCode


@dataclass(slots=True)
class Case:
    """One raw request: what it is, the method, its bytes and the tenant sending it."""

    what: str
    method: str
    raw: bytes
    tenant: str = "acme"


# -- a server with a chat template, a private and a public path-loaded adapter ------------------


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny llama with a chat template (so that chat roles reach their validation)."""
    path = tmp_path_factory.mktemp("chat-model") / "tiny-chat-llama"
    shutil.copytree(tiny_model_dir("llama"), path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def json_adapter(model_dir, peft_adapter_dir) -> Path:
    return peft_adapter_dir(model_dir, "prompt_tuning", 3, seed=2)


@pytest.fixture(scope="module")
def server(model_dir, peft_adapter_dir, json_adapter, tmp_path_factory):
    """acme owns 'pirate'; 'json' is public, loaded by the admin ops from a server path."""
    config = server_config(
        model_dir,
        tmp_path_factory.mktemp("registry"),
        max_upload_bytes=MAX_UPLOAD,
        max_request_bytes=MAX_REQUEST,
        metrics_port=0,
    )
    with BackgroundServer(config) as running:
        with Client(running.address, KEYS["acme"]) as acme:
            acme.load_adapter("pirate", upload=peft_adapter_dir(model_dir, "prompt_tuning", 4))
        with Client(running.address, KEYS["ops"]) as ops:
            ops.load_adapter("json", path=str(json_adapter), public=True)
        yield running


@pytest.fixture(scope="module")
def channel(server) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(server.address, options=options) as ch:
        yield ch


def send(channel: grpc.Channel, case: Case, timeout: float = 60) -> tuple[grpc.StatusCode, str]:
    """Send ``case`` as raw bytes (no client-side serialization); its status and message."""
    metadata = (("authorization", f"Bearer {KEYS[case.tenant]}"),)
    try:
        if RPCS[case.method][1]:
            call = channel.unary_stream(case.method)  # no serializers: bytes in, bytes out
            for _ in call(case.raw, metadata=metadata, timeout=timeout):
                pass
        else:
            response = channel.unary_unary(case.method)(
                case.raw, metadata=metadata, timeout=timeout
            )
            if case.method.endswith("LoadAdapter"):  # keep the server's adapters as they were
                name = pb.Adapter.FromString(response).name
                request = pb.UnloadAdapterRequest(name=name).SerializeToString()
                channel.unary_unary(ADA + "UnloadAdapter")(request, metadata=metadata)
        return S.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""


def status_of(channel: grpc.Channel, method: str, message, tenant: str = "acme"):
    return send(channel, Case("", method, message.SerializeToString(), tenant))


# -- the corpus ----------------------------------------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def key(field: int, wire: int) -> bytes:
    return varint(field << 3 | wire)


WIRE_PAYLOADS = {0: varint(2**64 - 1), 1: b"\xff" * 8, 2: varint(3) + b"abc", 5: b"\x00" * 4}


def malformed(rng: random.Random, valid: list[bytes]) -> Iterator[tuple[str, bytes]]:
    """Bytes that are not a valid message of any request type, or barely are."""
    for i in range(30):
        yield f"random bytes {i}", rng.randbytes(rng.randint(1, 300))
    yield "overlong varint", key(1, 0) + b"\xff" * 10 + b"\x01"
    yield "unterminated varint", key(1, 0) + b"\xff" * 9
    yield "bare continuation bytes", b"\xff" * 11
    yield "length of 2**62", key(1, 2) + varint(2**62) + b"abc"
    yield "length beyond the end", key(1, 2) + varint(100) + b"x"
    yield "field number 0", key(0, 0) + b"\x01"
    yield "field number 2**29", varint((2**29) << 3) + b"\x01"
    for field in range(1, 9):
        for wire, payload in WIRE_PAYLOADS.items():
            yield f"field {field} as wire type {wire}", key(field, wire) + payload
        yield f"field {field} group never ended", key(field, 3) + key(7, 0) + b"\x01"
        yield f"field {field} group end alone", key(field, 4)
        yield f"field {field} wire type 6", key(field, 6) + b"\x01"
        yield f"field {field} wire type 7", key(field, 7) + b"\x01"
    for depth in (50, 200, 100_000):
        yield f"groups nested {depth} deep", key(99, 3) * depth + key(99, 4) * depth
    yield "100000 empty fields", (key(3, 2) + b"\x00") * 100_000
    yield "invalid UTF-8 in field 1", key(1, 2) + varint(2) + b"\xff\xfe"
    yield "surrogate in field 1", key(1, 2) + varint(3) + b"\xed\xa0\x80"
    for message in valid:
        for cut in sorted(rng.sample(range(1, len(message)), min(8, len(message) - 1))):
            yield f"valid message cut at {cut} of {len(message)}", message[:cut]


EXTREME_FLOATS = [math.nan, math.inf, -math.inf, -1.0, 0.0, 5e-324, 1e-300, 1e300, 0.5, 1.0, 2.0]
NAMES = ["", "x" * 8192, "nope", "shout", "globex/shout", "../../etc", "a/b", "ü", "\x00", "json"]


def extreme_generate(rng: random.Random) -> pb.GenerateRequest:
    """A GenerateRequest with a random mix of extreme and ordinary values."""
    r = pb.GenerateRequest()
    prompt = rng.randrange(4)
    if prompt == 0:
        r.text = rng.choice(["", "hi", "The quick brown fox", "x" * 8192, "\x00\u202e😀"])
    elif prompt == 1:
        ids = rng.choice([[], [0], [5, 9], [319], [320], [2**32 - 1], [5] * 600])
        r.token_ids.ids.extend(ids)
    elif prompt == 2:
        for _ in range(rng.choice([0, 1, 3])):
            role = rng.choice(["user", "system", "assistant", "tool", "", "r" * 8192])
            r.chat.messages.add(role=role, content=rng.choice(["hi", "", "y" * 4096]))
    r.adapter = rng.choice(["", "", "pirate", *NAMES])
    sampling, stopping = r.sampling, r.stopping
    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        if rng.random() < 0.4:
            setattr(sampling, name, rng.choice(EXTREME_FLOATS))
    if rng.random() < 0.3:
        sampling.top_k = rng.choice([0, 1, 2, 2**32 - 1])
    if rng.random() < 0.3:
        sampling.seed = rng.choice([0, 7, 2**63, 2**64 - 1])
    if rng.random() < 0.95:
        stopping.max_new_tokens = rng.choice([0, 1, 2, 3, 2**31, 2**32 - 1])
    if rng.random() < 0.3:
        stopping.stop.extend(rng.choice([[""], ["x" * 8192], ["a"] * 1000, ["."], ["", "b"]]))
    if rng.random() < 0.2:
        stopping.stop_token_ids.extend(rng.choice([[2**32 - 1], list(range(1000)), [0]]))
    stopping.ignore_eos = rng.random() < 0.3
    stopping.include_stop_str_in_output = rng.random() < 0.3
    if rng.random() < 0.2:
        stopping.skip_special_tokens = rng.random() < 0.5
    if rng.random() < 0.3:
        r.logprobs = rng.choice([0, 1, 20, 21, 2**32 - 1])
    r.request_id = rng.choice(["", "r-1", "z" * 8192])
    return r


def extreme_tokenize(rng: random.Random) -> pb.TokenizeRequest:
    r = pb.TokenizeRequest()
    if rng.random() < 0.5:
        r.text = rng.choice(["", "hi", "x" * 8192, "\x00\u202e😀", "The quick brown fox" * 100])
    elif rng.random() < 0.8:
        for _ in range(rng.choice([0, 1, 2])):
            role = rng.choice(["user", "bot", "", "r" * 8192])
            r.chat.messages.add(role=role, content=rng.choice(["hi", ""]))
    return r


def extreme_load(rng: random.Random, adapter_dir: Path) -> tuple[pb.LoadAdapterRequest, str]:
    """A LoadAdapterRequest and who sends it (the admin for most server paths)."""
    r = pb.LoadAdapterRequest(name=rng.choice(["t1", "t2", *NAMES]))
    r.public = rng.random() < 0.2
    source = rng.randrange(4)
    if source == 0:
        r.text = rng.choice(["", "hi", "\x00", "x" * (MAX_UPLOAD + 1)])
    elif source == 1:
        r.files.adapter_config_json = rng.choice([b"", b"{", b"[]", b'{"peft_type": 5}'])
        r.files.adapter_model_safetensors = rng.choice([b"", rng.randbytes(64), b"\xff" * 8])
    elif source == 2:
        r.path = rng.choice(["", "/", "/nonexistent", "p" * 5000, "/etc", str(adapter_dir)])
    return r, "ops" if source == 2 and rng.random() < 0.8 else "acme"


def corpus(adapter_dir: Path) -> list[Case]:
    rng = random.Random(20240607)
    valid = {
        GEN + "Generate": [extreme_generate(rng) for _ in range(3)],
        GEN + "Tokenize": [pb.TokenizeRequest(text="The quick brown fox")],
        ADA + "LoadAdapter": [pb.LoadAdapterRequest(name="t1", text="hi")],
        ADA + "UnloadAdapter": [pb.UnloadAdapterRequest(name="nope")],
        ADA + "GetAdapter": [pb.GetAdapterRequest(name="nope")],
    }
    valid[GEN + "GenerateStream"] = valid[GEN + "Generate"]
    cases = []
    for method in RPCS:
        messages = [m.SerializeToString() for m in valid.get(method, [])]
        for what, raw in malformed(rng, [m for m in messages if len(m) > 1]):
            cases.append(Case(what, method, raw, rng.choice(["acme", "ops"])))
    for i in range(300):
        method = GEN + ("GenerateStream" if i % 3 == 0 else "Generate")
        cases.append(
            Case(f"extreme generate {i}", method, extreme_generate(rng).SerializeToString())
        )
    for i in range(60):
        raw = extreme_tokenize(rng).SerializeToString()
        cases.append(Case(f"extreme tokenize {i}", GEN + "Tokenize", raw))
    for i in range(80):
        request, tenant = extreme_load(rng, adapter_dir)
        cases.append(
            Case(f"extreme load {i}", ADA + "LoadAdapter", request.SerializeToString(), tenant)
        )
    for name in NAMES:
        for tenant in ("acme", "globex"):
            for method, message in (
                ("UnloadAdapter", pb.UnloadAdapterRequest(name=name)),
                ("GetAdapter", pb.GetAdapterRequest(name=name)),
            ):
                raw = message.SerializeToString()
                cases.append(Case(f"{method} {name[:10]!r}", ADA + method, raw, tenant))
    for all_tenants in (False, True):
        raw = pb.ListAdaptersRequest(all_tenants=all_tenants).SerializeToString()
        cases += [Case("list", ADA + "ListAdapters", raw, t) for t in ("acme", "ops")]
    stops = [f"stop{i}" for i in range(150_000)]  # ~1.5 MB, within the 2 MiB limit
    for last in ("", "valid"):
        request = pb.GenerateRequest(text="hi", stopping=pb.StoppingOptions(max_new_tokens=2))
        request.stopping.stop.extend([*stops, last] if last == "" else stops)
        cases.append(
            Case(f"1.5 MB stop list ending {last!r}", GEN + "Generate", request.SerializeToString())
        )
    return cases


def test_a_thousand_hostile_messages_get_proper_statuses(server, channel, json_adapter):
    cases = corpus(json_adapter)
    assert len(cases) >= 1000 and {c.method for c in cases} == set(RPCS)
    seen: dict[grpc.StatusCode, int] = {}
    bad = []
    for case in cases:
        code, details = send(channel, case)
        seen[code] = seen.get(code, 0) + 1
        if code in (S.UNKNOWN, S.INTERNAL) or len(details) > MESSAGE_LIMIT:
            bad.append((case.what, case.method, code.name, len(details), details[:200]))
    assert not bad, f"{len(bad)} of {len(cases)} failed, first ones: {bad[:5]}"
    assert {S.INVALID_ARGUMENT, S.NOT_FOUND, S.OK, S.PERMISSION_DENIED} <= set(seen), seen
    with Client(server.address, KEYS["acme"]) as acme:
        assert acme.generate([5, 9], "pirate", max_new_tokens=2).finish_reason == "length"
        assert {a.name for a in acme.list_adapters()} == {"pirate", "json"}
    wait_until_idle(server.engine)


def test_undecodable_bytes_are_invalid_argument(channel):
    for method, (request_type, _) in RPCS.items():
        code, details = send(channel, Case("", method, b"\xff" * 11))  # a tag that never ends
        assert code is S.INVALID_ARGUMENT, (method, code, details)
        assert f"not a valid {request_type.DESCRIPTOR.full_name} message" in details
    code, details = send(channel, Case("", GEN + "Generate", key(1, 2) + varint(2) + b"\xff\xfe"))
    assert code is S.INVALID_ARGUMENT and "UTF-8" in details


def test_user_input_is_quoted_short(server, channel):
    with Client(server.address, KEYS["acme"]) as acme:
        for call, words in [
            (lambda: acme.generate("hi", "n" * 8192), "(8192 chars)"),
            (lambda: acme.load_adapter("n" * 8192, text="hi"), "(8192 chars)"),
            (lambda: acme.generate([{"role": "r" * 8192, "content": "hi"}]), "(8192 chars)"),
            (lambda: acme.generate("hi", stop=["a"] * 60 + [""]), "stop[60] = ''"),
            (lambda: acme.generate("hi", stop=["a"] * 200_000), "at most 64 stop strings"),
        ]:
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() in (S.NOT_FOUND, S.INVALID_ARGUMENT)
            assert words in info.value.details() and len(info.value.details()) < 400


# -- oversized requests ----------------------------------------------------------------------


def test_each_rpc_refuses_requests_beyond_its_limit_before_parsing(channel):
    limits = request_limits(MAX_UPLOAD, MAX_REQUEST)
    assert set(limits) == set(RPCS)
    for method, limit in limits.items():
        raw = key(1, 2) + varint(limit) + b"x" * limit  # one field just over the limit
        code, details = send(channel, Case("", method, raw))
        assert code is S.RESOURCE_EXHAUSTED, (method, code, details)
        assert str(limit) in details, (method, details)
        if not method.endswith("LoadAdapter"):  # that one is gRPC's own limit (same size)
            assert method.rpartition("/")[2] in details
    at_limit = pb.GetAdapterRequest(name="x" * (64 * 2**10 - 4)).SerializeToString()
    assert len(at_limit) == 64 * 2**10
    code, details = send(channel, Case("", ADA + "GetAdapter", at_limit))
    assert code is S.NOT_FOUND and len(details) < 400


# -- adapter files that used to be INTERNAL --------------------------------------------------------


def f4_weights(rows: int, width: int) -> bytes:
    """A safetensors file by hand: ``prompt_embeddings`` in F4 (4-bit floats torch cannot use)."""
    size = rows * width // 2
    header = {
        "prompt_embeddings": {"dtype": "F4", "shape": [rows, width], "data_offsets": [0, size]}
    }
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"\x00" * size


def test_bad_adapter_files_are_invalid_argument(server, tmp_path):
    config = json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4}).encode()
    cases = {
        "f4": (config, f4_weights(4, 96), "prompt_embeddings"),
        "deep": (b"[" * 100_000, f4_weights(4, 96), "nests too deeply"),
    }
    with Client(server.address, KEYS["ops"]) as ops:
        for name, (config_json, weights, words) in cases.items():
            folder = tmp_path / name
            folder.mkdir()
            (folder / "adapter_config.json").write_bytes(config_json)
            (folder / "adapter_model.safetensors").write_bytes(weights)
            for source in ({"path": str(folder)}, {"upload": folder}):
                with pytest.raises(grpc.RpcError) as info:
                    ops.load_adapter(name, **source)
                assert info.value.code() is S.INVALID_ARGUMENT, info.value.details()
                assert words in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            ops.load_adapter("long", path="/" + "p" * 4999)
        assert info.value.code() is S.INVALID_ARGUMENT
        assert "(5000 chars)" in info.value.details() and len(info.value.details()) < 400


# -- leaks ---------------------------------------------------------------------------------------


def test_metrics_name_only_public_adapters(server):
    with Client(server.address, KEYS["acme"]) as acme:
        acme.generate([5, 9], "pirate", max_new_tokens=2)
        acme.generate([5, 9], "json", max_new_tokens=2)
    text = scrape(server.server.metrics_port)
    assert "pirate" not in text
    assert 'prefixserve_requests_total{adapter="(private)",outcome="length",tenant="acme"}' in text
    assert 'prefixserve_requests_total{adapter="json",outcome="length",tenant="acme"}' in text


def test_metrics_ask_for_an_admin_key(server):
    port = server.server.metrics_port
    for key, status in ((None, 401), ("not-a-key-0000", 401), (KEYS["acme"], 403)):
        with pytest.raises(urllib.error.HTTPError) as info:
            scrape(port, key)
        assert info.value.code == status, key
        assert "API key" in info.value.read().decode()
    assert "prefixserve_queue_depth" in scrape(port)  # the admin's


def test_public_metrics_name_no_tenant(tiny_model_dir):
    config = server_config(tiny_model_dir("llama"), None, metrics_port=0, public_metrics=True)
    with BackgroundServer(config) as running:
        for tenant in ("acme", "globex"):
            with Client(running.address, KEYS[tenant]) as client:
                client.generate([5, 9], max_new_tokens=2, ignore_eos=True)
        text = scrape(running.server.metrics_port, key=None)
    assert "tenant=" not in text and "acme" not in text
    assert 'prefixserve_requests_total{adapter="",outcome="length"} 2.0' in text
    assert "prefixserve_tenant_served_tokens_total 6.0" in text  # 2 x (2 prompt + 1 decode)


def test_model_info_and_adapters_show_no_server_paths(server, model_dir, json_adapter):
    with (
        Client(server.address, KEYS["globex"]) as globex,
        Client(server.address, KEYS["ops"]) as ops,
    ):
        model = globex.model_info().model
        assert model == model_dir.name and "/" not in model
        assert globex.get_adapter("json").source == "server path"
        assert {a.source for a in globex.list_adapters()} == {"server path"}
        assert ops.get_adapter("json").source == str(json_adapter)


def test_metrics_listen_on_the_server_host(tiny_model_dir):
    """Without --metrics-host, /metrics binds where gRPC does (127.0.0.2: a loopback address
    that is not the old fixed default)."""
    assert build_parser().parse_args(["serve"]).metrics_host is None

    async def bound() -> tuple[str, int] | None:
        config = server_config(tiny_model_dir("llama"), None, host="127.0.0.2", metrics_port=0)
        server = PrefixServer(config)
        await server.start()
        try:
            return server.state.metrics.address
        finally:
            await server.stop(grace=0)

    address = asyncio.run(bound())
    assert address is not None and address[0] == "127.0.0.2"


# -- cancelled streams in the metrics ------------------------------------------------------------


def _outcomes(server, tenant: str) -> dict[str, float]:
    registry = server.server.state.metrics.registry
    labels = {"adapter": "", "tenant": tenant}
    found = {}
    for outcome in ("cancelled", "deadline", "invalid", "not_found", "error", "length", "stop"):
        value = registry.get_sample_value(
            "prefixserve_requests_total", {**labels, "outcome": outcome}
        )
        if value:
            found[outcome] = value
    return found


def _wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_cancelled_and_expired_streams_count_as_cancelled_and_deadline(server):
    """A client that stops reading (a small receive window fills) then cancels, or whose
    deadline passes: the server is blocked sending, so its stream is closed rather than
    cancelled; they count as 'cancelled' and 'deadline', never 'error'."""
    options = [("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)]
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[5, 9, 33]),
        stopping=pb.StoppingOptions(max_new_tokens=450, ignore_eos=True),
        logprobs=20,  # big chunks: the window fills after a few tokens
    ).SerializeToString()
    metadata = (("authorization", f"Bearer {KEYS['globex']}"),)
    with grpc.insecure_channel(server.address, options=options) as slow:
        stream = slow.unary_stream(GEN + "GenerateStream")
        for deadline in (None, 1.0, None, 1.0):
            call = stream(request, metadata=metadata, timeout=deadline)
            next(call)
            time.sleep(0.6)
            if deadline is None:
                call.cancel()
            else:
                with pytest.raises(grpc.RpcError) as info:
                    time.sleep(0.6)
                    list(call)
                assert info.value.code() is S.DEADLINE_EXCEEDED
    _wait_for(lambda: sum(_outcomes(server, "globex").values()) >= 4)
    assert _outcomes(server, "globex") == {"cancelled": 2.0, "deadline": 2.0}
    wait_until_idle(server.engine)


def test_requests_the_engine_refuses_count_as_invalid_not_error(server, channel):
    """A prompt beyond the context passes the message checks and is refused by the engine:
    INVALID_ARGUMENT to the client, 'invalid' in the metrics (the client's doing, not the
    server's)."""
    request = pb.GenerateRequest(
        token_ids=pb.TokenIds(ids=[5] * 600),
        stopping=pb.StoppingOptions(max_new_tokens=8),
    )
    before = _outcomes(server, "ops")
    code, details = status_of(channel, GEN + "Generate", request, tenant="ops")
    assert code is S.INVALID_ARGUMENT and "exceeds the context" in details
    _wait_for(lambda: _outcomes(server, "ops").get("invalid", 0) > before.get("invalid", 0))
    after = _outcomes(server, "ops")
    assert after.get("invalid", 0) == before.get("invalid", 0) + 1
    assert after.get("error", 0) == before.get("error", 0)
