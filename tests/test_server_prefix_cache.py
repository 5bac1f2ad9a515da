"""The prefix cache behind a real gRPC server over loopback: a tenant's repeated prompt is a hit
(counted in its usage and in /metrics), another tenant's identical prompt is not, a cache_salt
narrows reuse to one user, and public adapters share their cached blocks across tenants only where
the server allows it."""

from __future__ import annotations

import pytest

from prefixserve.client import Client
from prefixserve.server import BackgroundServer

from test_server import KEYS, POLITE, scrape, server_config

PROMPT = list(range(40, 61))
"""21 tokens: five full blocks of 4 reusable (the last prompt token is always computed)."""
HIT = 20


def _cached(address: str, tenant: str, adapter: str | None = None, **options) -> int:
    with Client(address, KEYS[tenant]) as client:
        out = client.generate(PROMPT, adapter, max_new_tokens=2, ignore_eos=True, **options)
        assert out.usage.prompt_tokens == len(PROMPT)
        return out.usage.cached_tokens


@pytest.fixture(scope="module", params=[False, True], ids=["isolated", "shared-public"])
def server(request, tiny_model_dir, tmp_path_factory):
    config = server_config(
        tiny_model_dir("llama"),
        tmp_path_factory.mktemp("registry"),
        metrics_port=0,
        share_public_prefix_cache=request.param,
    )
    with BackgroundServer(config) as running:
        with Client(running.address, KEYS["ops"]) as ops:
            ops.load_adapter("polite", text=POLITE, public=True)
        with Client(running.address, KEYS["acme"]) as acme:
            acme.load_adapter("mine", text="Only for acme.")
        yield running, request.param


def test_a_tenant_hits_its_own_blocks_and_no_one_else_does(server):
    running, _ = server
    address = running.address
    assert _cached(address, "acme") == 0
    assert _cached(address, "acme") == HIT
    assert _cached(address, "globex") == 0  # the same prompt, another tenant: computed
    assert _cached(address, "globex") == HIT
    assert _cached(address, "acme", cache_salt="alice") == 0
    assert _cached(address, "acme", cache_salt="alice") == HIT
    assert _cached(address, "acme", cache_salt="bob") == 0
    # A private adapter's blocks are its owner's whatever the server shares.
    assert _cached(address, "acme", "mine") == 0
    assert _cached(address, "acme", "mine") == HIT
    text = scrape(running.server.metrics_port)
    hits = next(
        line for line in text.splitlines() if line.startswith("prefixserve_prefix_cache_hits")
    )
    assert float(hits.split()[-1]) >= 4 * HIT
    assert "prefixserve_prefix_cache_hit_rate" in text
    assert "prefixserve_prefix_cache_blocks " in text


def test_public_adapters_share_only_where_the_server_allows(server):
    running, shared = server
    address = running.address
    assert _cached(address, "acme", "polite") == 0
    assert _cached(address, "globex", "polite") == (HIT if shared else 0)
    assert _cached(address, "globex", "polite") == HIT
