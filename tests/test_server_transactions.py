"""Adapter loads and unloads over a real loopback server are all or nothing, whatever the client
does mid-call; admins can unload any tenant's adapter; tenants' adapter quotas hold."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from prefixserve import LLM
from prefixserve.adapters import AdapterNotFoundError
from prefixserve.client import Client
from prefixserve.quota import TenantQuota
from prefixserve.server import BackgroundServer
from prefixserve.server.errors import status_of

from test_server import KEYS, server_config

DEADLINES = [0.0005 * 1.35**i for i in range(24)]  # 0.5 ms .. 500 ms


def _drain(running: BackgroundServer, timeout: float = 30.0) -> None:
    """Until no adapter transaction is running on the server."""
    assert running.server is not None
    adapters = running.server.adapters
    deadline = time.monotonic() + timeout
    while adapters._transactions and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not adapters._transactions, "adapter transactions still running"


def _state(running: BackgroundServer) -> tuple[set[str], set[str], list[Path]]:
    """(engine adapter names, registry record names, staged folders)."""
    assert running.server is not None
    registry = running.server.state.registry
    staging = registry.root / ".staging"
    staged = list(staging.iterdir()) if staging.exists() else []
    return set(running.engine.prefixes.prefixes), set(registry.records), staged


@pytest.fixture(scope="module")
def upload(peft_adapter_dir, tiny_model_dir) -> Path:
    return peft_adapter_dir(tiny_model_dir("llama"), "prompt_tuning", 200)


@pytest.fixture
def server(tiny_model_dir, tmp_path):
    config = server_config(tiny_model_dir("llama"), tmp_path / "registry")
    with BackgroundServer(config) as running:
        yield running


def _load_with_deadline(client: Client, name: str, upload: Path, timeout: float) -> bool:
    """True if the load answered OK; False if the deadline cut it."""
    try:
        client.timeout = timeout
        client.load_adapter(name, upload=upload)
        return True
    except grpc.RpcError as e:
        assert e.code() is grpc.StatusCode.DEADLINE_EXCEEDED, e.details()
        return False
    finally:
        client.timeout = None


def test_cut_loads_leave_nothing_behind(server, upload):
    """Uploads cut by deadlines from 0.5 ms to 0.5 s: every answered load is there, every cut one
    the server had not finished left no engine adapter, no registry record and no staged file,
    and its name loads again.

    A load the server finished just as the deadline passed (its answer was on the wire) is kept,
    as with any RPC; it is then whole: in the engine and the registry both."""
    with Client(server.address, KEYS["acme"]) as acme:
        # On a busy machine the server may finish every load before it sees a deadline pass:
        # then unload them and sweep again, a few times at most (three sweeps were not enough
        # once, in a full run on a 2-core machine).
        for sweep in range(6):
            names = [f"cut-{sweep}-{i}" for i in range(len(DEADLINES))]
            answered = {
                name
                for name, t in zip(names, DEADLINES)
                if _load_with_deadline(acme, name, upload, t)
            }
            _drain(server)
            engine, records, staged = _state(server)
            assert engine == records
            assert staged == []
            assert {f"acme/{n}" for n in answered} <= records
            undone = [n for n in names if f"acme/{n}" not in records]
            if undone:
                break
            for name in names:
                acme.unload_adapter(name)
        assert undone, "no deadline cut a load in six sweeps: the test proves nothing"
        for name in undone:
            acme.load_adapter(name, upload=upload)  # no name got stuck
        assert {a.name for a in acme.list_adapters()} >= set(names)
    engine, records, staged = _state(server)
    assert engine == records and len(records) == len(names) and staged == []


def test_cut_unloads_are_done_whole_and_survive_a_restart(tiny_model_dir, tmp_path, upload):
    registry = tmp_path / "registry"
    config = server_config(tiny_model_dir("llama"), registry)
    names = [f"u-{i}" for i in range(12)]
    with BackgroundServer(config) as running, Client(running.address, KEYS["acme"]) as acme:
        for name in names:
            acme.load_adapter(name, text=f"You are assistant number {name}.")
        for name, timeout in zip(names, DEADLINES[::2]):
            acme.timeout = timeout
            try:
                acme.unload_adapter(name)
            except grpc.RpcError as e:
                assert e.code() is grpc.StatusCode.DEADLINE_EXCEEDED, e.details()
        acme.timeout = None
        _drain(running)
        engine, records, staged = _state(running)
        assert engine == records and staged == []
        left = records
    with BackgroundServer(config) as again:
        engine, records, _ = _state(again)
        assert engine == records == left


def test_admin_unloads_any_tenants_adapter(server):
    with (
        Client(server.address, KEYS["acme"]) as acme,
        Client(server.address, KEYS["globex"]) as globex,
        Client(server.address, KEYS["ops"]) as ops,
    ):
        acme.load_adapter("mine", text="A private system prompt.")
        with pytest.raises(grpc.RpcError) as denied:
            globex.unload_adapter("mine", owner="acme")
        assert denied.value.code() is grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as missing:
            ops.unload_adapter("mine")  # the admin's own namespace has no 'mine'
        assert missing.value.code() is grpc.StatusCode.NOT_FOUND
        assert ops.get_adapter("mine", owner="acme").owner == "acme"
        assert ops.unload_adapter("mine", owner="acme")
        assert "acme/mine" not in server.engine.prefixes.prefixes
        with pytest.raises(grpc.RpcError) as gone:
            acme.get_adapter("mine")
        assert gone.value.code() is grpc.StatusCode.NOT_FOUND


def test_tenant_adapter_quotas(tiny_model_dir, tmp_path, upload):
    """The byte quota counts what an adapter holds (host tensors and prefix KV), not its
    files, and refuses before the engine registers it."""
    offline = LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=4, num_kv_blocks=64)
    info = offline.load_adapter("probe", upload)
    size = info.host_bytes + info.kv_bytes
    quota = TenantQuota(max_adapters=2, max_adapter_bytes=int(size * 1.5))
    config = server_config(tiny_model_dir("llama"), tmp_path / "registry", quota=quota)
    with (
        BackgroundServer(config) as running,
        Client(running.address, KEYS["acme"]) as acme,
        Client(running.address, KEYS["globex"]) as globex,
    ):
        acme.load_adapter("big", upload=upload)
        with pytest.raises(grpc.RpcError) as too_big:
            acme.load_adapter("big2", upload=upload)
        assert too_big.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        details = too_big.value.details() or ""
        assert "--max-adapter-mb-per-tenant" in details
        assert f"would hold {size} bytes ({info.host_bytes} of host tensors" in details
        assert f"others hold {size} bytes" in details
        acme.load_adapter("small", text="Be brief.")
        with pytest.raises(grpc.RpcError) as too_many:
            acme.load_adapter("third", text="Be kind.")
        assert too_many.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-adapters-per-tenant 2" in (too_many.value.details() or "")
        globex.load_adapter("big", upload=upload)  # quotas are per tenant
        engine, records, staged = _state(running)
        assert engine == records == {"acme/big", "acme/small", "globex/big"} and staged == []


def test_requests_racing_an_unload_answer_not_found(server):
    """A request resolved just before its adapter's unload reaches the engine after it: the
    engine refuses it as not found, and the client reads NOT_FOUND, not INVALID_ARGUMENT."""
    engine = server.engine
    engine.load_adapter("racing", text="Be brief.")
    engine.prefixes.attach("racing")  # a request still holds it: the unload waits for it
    assert not engine.unload_adapter("racing")
    with pytest.raises(AdapterNotFoundError) as refused:
        engine.add_request([5, 6], adapter="racing")
    code, message = status_of(refused.value)
    assert code is grpc.StatusCode.NOT_FOUND and "being unloaded" in message
    engine.prefixes.detach(engine.prefixes.prefixes["racing"])
    assert "racing" not in engine.prefixes.prefixes
