"""Over a real loopback server: one tenant's long prompt or burst does not hold up another
tenant's short requests (ordering and statuses, not seconds)."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from prefixserve.client import Client
from prefixserve.config import SchedulerConfig
from prefixserve.quota import TenantQuota
from prefixserve.server import BackgroundServer

from test_server import KEYS, server_config

LONG_PROMPT = [7, 8, 9, 10] * 110  # 440 tokens: ~28 steps at 16 tokens a step


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    config = server_config(
        tiny_model_dir("llama"),
        tmp_path_factory.mktemp("registry"),
        quota=TenantQuota(max_waiting=3),
    )
    config.engine.scheduler = SchedulerConfig(
        max_num_batched_tokens=32, max_num_seqs=2, long_prefill_token_threshold=16
    )
    with BackgroundServer(config) as running:
        yield running


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


def test_short_request_finishes_while_another_tenants_long_prompt_prefills(server):
    engine = server.engine
    done: list[str] = []

    def long_call() -> None:
        with Client(server.address, KEYS["acme"]) as acme:
            acme.generate(LONG_PROMPT, max_new_tokens=1, ignore_eos=True)
        done.append("long")

    thread = threading.Thread(target=long_call)
    thread.start()
    _wait_for(lambda: any(r.num_computed_tokens > 0 for r in engine.scheduler.running))
    with Client(server.address, KEYS["globex"]) as globex:
        out = globex.generate([5, 6, 7], max_new_tokens=1, ignore_eos=True)
    done.append("short")
    assert out.token_ids and done == ["short"], "the short request waited for the long prompt"
    thread.join(60)
    assert done == ["short", "long"]


def test_a_burst_of_one_tenant_gets_its_quota_and_others_still_get_in(server):
    results: dict[str, list[str]] = {"acme": [], "globex": []}

    def call(tenant: str) -> None:
        with Client(server.address, KEYS[tenant]) as client:
            try:
                client.generate([3, 4, 5], max_new_tokens=160, ignore_eos=True)
                results[tenant].append("OK")
            except grpc.RpcError as e:
                assert e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, e.details()
                assert "--max-waiting-per-tenant" in (e.details() or "")
                results[tenant].append("RESOURCE_EXHAUSTED")

    burst = [threading.Thread(target=call, args=("acme",)) for _ in range(12)]
    for thread in burst:
        thread.start()
    assert server.server is not None
    engine = server.server.state.engine
    assert engine is not None

    def all_in_or_refused() -> bool:  # every burst call is queued, running, done or refused
        stats = engine.stats()
        return stats.waiting + stats.running + len(results["acme"]) == len(burst)

    _wait_for(all_in_or_refused)
    call("globex")
    for thread in burst:
        thread.join(120)
    assert results["globex"] == ["OK"]
    assert "RESOURCE_EXHAUSTED" in results["acme"] and "OK" in results["acme"]


@pytest.mark.parametrize(
    "engine", [{"max_num_seqs": 4}, {"num_kv_blocks": 40}], ids=["slots", "kv-blocks"]
)
def test_a_tenant_holding_every_slot_or_block_yields_to_anothers_short_request(
    tiny_model_dir, tmp_path, engine
):
    """acme's long requests hold every running slot (or the whole pool); globex's one-token
    request preempts one of them and is answered while they still run; they all finish."""
    config = server_config(tiny_model_dir("llama"), tmp_path / "registry")
    config.engine.scheduler = SchedulerConfig(
        max_num_seqs=engine.get("max_num_seqs", 64), preemption_min_steps=2
    )
    config.engine.cache.num_kv_blocks = engine.get("num_kv_blocks", 512)
    with BackgroundServer(config) as running:
        done: list[str] = []

        def long_call(i: int) -> None:
            with Client(running.address, KEYS["acme"]) as acme:
                out = acme.generate([3, 4, 5, i] * 8, max_new_tokens=120, ignore_eos=True)
            assert len(out.token_ids) == 120
            done.append(f"long{i}")

        threads = [threading.Thread(target=long_call, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        scheduler = running.engine.scheduler
        _wait_for(lambda: len(scheduler.running) == 4 and running.engine.stats().waiting == 0)
        time.sleep(0.2)  # past the minimum run
        with Client(running.address, KEYS["globex"]) as globex:
            out = globex.generate([5, 6, 7] * 8, max_new_tokens=1, ignore_eos=True)
        done.append("short")
        assert out.token_ids and done == ["short"], "the short request waited for the long ones"
        for thread in threads:
            thread.join(120)
        assert len(done) == 5
        assert scheduler.fair.accounts["acme"].preemptions >= 1
        assert scheduler.fair.accounts["globex"].preemptions == 0
