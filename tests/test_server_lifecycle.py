"""The server's life: health while loading, reflection, metrics, graceful shutdown, restart with
the registry, TLS and the open (keyless) mode."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import threading

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from prefixserve.client import Client
from prefixserve.engine import LLMEngine
from prefixserve.server import ApiKeys, BackgroundServer

from test_server import KEYS, KEYS_TEXT, scrape, server_config, wait_until_idle

METRICS = [
    "prefixserve_queue_depth",
    "prefixserve_running_requests",
    "prefixserve_kv_blocks_used",
    "prefixserve_kv_blocks_total",
    "prefixserve_prefix_hits_total",
    "prefixserve_prefix_evictions_total",
    "prefixserve_generated_tokens_total",
    "prefixserve_generation_tokens_per_second",
    "prefixserve_time_to_first_token_seconds_bucket",
    "prefixserve_time_per_output_token_seconds_bucket",
    'prefixserve_requests_total{adapter="(private)",outcome="length",tenant="acme"}',
]


def test_health_reflection_and_metrics(tiny_model_dir, peft_adapter_dir):
    """Acceptance 5: NOT_SERVING while the model loads, then SERVING; reflection lists the
    services; /metrics has the named series."""
    model = tiny_model_dir("llama")
    gate = threading.Event()

    def slow_factory(config):
        gate.wait(60)
        return LLMEngine(config)

    config = server_config(model, None, metrics_port=0)
    server = BackgroundServer(config, slow_factory).start(wait_ready=False)
    try:
        acme = Client(server.address, KEYS["acme"])
        assert acme.health() == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as info:
            acme.generate("hi")
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "still loading" in info.value.details()
        gate.set()
        acme.wait_until_serving(timeout=60)
        for service in ("", "prefixserve.v1.GenerationService", "prefixserve.v1.AdapterService"):
            assert acme.health(service) == "SERVING"

        services = ProtoReflectionDescriptorDatabase(acme.channel).get_services()
        assert {
            "prefixserve.v1.GenerationService",
            "prefixserve.v1.AdapterService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= set(services)

        acme.load_adapter("pirate", upload=peft_adapter_dir(model, "prompt_tuning", 4))
        for _ in range(2):
            acme.generate([5, 9, 33], "pirate", max_new_tokens=5)
        assert server.server is not None
        text = scrape(server.server.metrics_port)
        for name in METRICS:
            assert name in text, name
        assert "prefixserve_prefix_hits_total 1.0" in text
    finally:
        gate.set()
        server.stop()


def test_graceful_shutdown_then_restart_restores_the_registry(
    tiny_model_dir, peft_adapter_dir, tmp_path
):
    """Acceptance 4, and shutdown: in-flight streams finish within the grace period, new calls
    are refused, and after a restart the adapters loaded before are listed and usable."""
    model = tiny_model_dir("llama")
    registry = tmp_path / "registry"
    first = BackgroundServer(server_config(model, registry)).start()
    acme = Client(first.address, KEYS["acme"])
    acme.load_adapter("pirate", upload=peft_adapter_dir(model, "prefix_tuning", 3))
    Client(first.address, KEYS["ops"]).load_adapter("polite", text="Paged attention", public=True)
    before = [
        acme.generate([5, 9, 33], a, max_new_tokens=8).token_ids for a in ("pirate", "polite")
    ]

    stream = acme.generate_stream([5, 9], "pirate", max_new_tokens=60, ignore_eos=True)
    chunks = [next(stream)]
    engine = first.engine
    stopping = threading.Thread(target=first.stop, kwargs={"grace": 30})
    stopping.start()
    chunks += list(stream)  # the in-flight stream finishes during the grace period
    stopping.join(60)
    assert chunks[-1].finish_reason == "length" and sum(len(c.token_ids) for c in chunks) == 60
    with pytest.raises(grpc.RpcError) as info:
        acme.generate([5], max_new_tokens=2, timeout=5)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    wait_until_idle(engine)

    second = BackgroundServer(server_config(model, registry)).start()
    try:
        acme = Client(second.address, KEYS["acme"])
        listed = {(a.name, a.owner, a.kind, a.source) for a in acme.list_adapters()}
        assert listed == {
            ("pirate", "acme", "PREFIX_TUNING", "upload"),
            ("polite", "", "TEXT", "text"),
        }
        after = [
            acme.generate([5, 9, 33], a, max_new_tokens=8).token_ids for a in ("pirate", "polite")
        ]
        assert after == before
        with pytest.raises(grpc.RpcError) as info:
            Client(second.address, KEYS["globex"]).generate([5], "pirate")
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        assert acme.unload_adapter("pirate")
        assert not (registry / "tenants" / "acme" / "pirate").exists()
    finally:
        second.stop()


def test_shutdown_aborts_what_outlives_the_grace_period(tiny_model_dir):
    server = BackgroundServer(server_config(tiny_model_dir("llama"), None)).start()
    acme = Client(server.address, KEYS["acme"])
    stream = acme.generate_stream([5, 9], max_new_tokens=450, ignore_eos=True)
    next(stream)
    engine = server.engine
    server.stop(grace=0.2)
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    assert not engine.requests and engine.allocator.num_used == len(engine.block_cache.idle)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tls_and_the_open_mode(tiny_model_dir, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    config = server_config(tiny_model_dir("llama"), None, tls_cert=str(cert), tls_key=str(key))
    config.api_keys = ApiKeys()  # open: no keys, every caller an admin, every adapter public
    with BackgroundServer(config) as server:
        client = Client(server.address, root_certificates=cert)
        loaded = client.load_adapter("polite", text="The quick brown fox")
        assert loaded.public and loaded.owner == ""
        assert client.generate([5, 9], "polite", max_new_tokens=3).finish_reason == "length"
        with pytest.raises(grpc.RpcError) as info:
            Client(server.address, timeout=5).generate([5, 9], max_new_tokens=2)
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port


def test_cli_serve_generate_adapters_and_sigterm(tiny_model_dir, peft_adapter_dir, tmp_path):
    """`prefixserve serve` in a subprocess; the client commands against it; SIGTERM stops it."""
    model = tiny_model_dir("llama")
    keys = tmp_path / "keys.txt"
    keys.write_text(KEYS_TEXT)
    adapter = peft_adapter_dir(model, "prompt_tuning", 4)
    args = (
        f"serve --model {model} --dtype float32 --port 0 --api-keys {keys} --num-kv-blocks 256 "
        f"--registry-dir {tmp_path / 'registry'} --adapter acme/pirate={adapter} --log-level error"
    )
    command = [sys.executable, "-m", "prefixserve.cli", *args.split()]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline() if server.stdout else ""
        assert "serving on" in line, line
        address = line.split("serving on ")[1].split()[0]
        client = ["--server", address, "--api-key", KEYS["acme"]]

        def cli(*argv: str) -> tuple[int, str, str]:
            done = subprocess.run(
                [sys.executable, "-m", "prefixserve.cli", *argv, *client],
                capture_output=True,
                text=True,
                timeout=60,
            )
            return done.returncode, done.stdout, done.stderr

        code, out, err = cli(
            "generate", "The quick", "--adapter", "pirate", "--max-new-tokens", "5"
        )
        want = Client(address, KEYS["acme"]).generate("The quick", "pirate", max_new_tokens=5)
        assert code == 0 and out == want.text + "\n" and "5 generated tokens" in err
        assert cli("adapters", "load", "mine", "--text", "Paged attention")[0] == 0
        code, out, _ = cli("adapters", "list")
        assert code == 0 and "pirate" in out and "mine" in out and "command line" in out
        code, _, err = cli("generate", "hi", "--adapter", "nope")
        assert code == 1 and "NOT_FOUND" in err
        assert cli("adapters", "unload", "mine")[0] == 0
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
    finally:
        if server.poll() is None:
            server.kill()
