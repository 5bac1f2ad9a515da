"""The scale-out on a local Ray instance: two engine replicas behind the gRPC front end, over
loopback. Outputs equal one engine's, an adapter's requests stay on one replica, a replica killed
mid-load fails its requests with a clear status (or they are sent again) while the rest go on,
and tenants and bad inputs get the single server's statuses (some of its tests run here again,
against the fleet). Ray and every replica are stopped at the end, whatever happens."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import psutil
import pytest

ray = pytest.importorskip(
    "ray", reason="the Ray Serve scale-out needs ray: pip install 'prefixserve[ray]'"
)
serve = pytest.importorskip(
    "ray.serve", reason="the Ray Serve scale-out needs ray[serve]: pip install 'prefixserve[ray]'"
)

from ray.exceptions import ActorDiedError  # noqa: E402

from prefixserve import LLM, SamplingParams  # noqa: E402
from prefixserve.async_engine import EngineDeadError  # noqa: E402
from prefixserve.cli import build_parser, main  # noqa: E402
from prefixserve.client import AsyncClient, Client  # noqa: E402
from prefixserve.engine import EngineStats  # noqa: E402
from prefixserve.request import RequestOutput  # noqa: E402
from prefixserve.sampler import TokenLogprobs  # noqa: E402
from prefixserve.scaleout import BackgroundFleetServer, FleetConfig, ReplicaFleet  # noqa: E402
from prefixserve.scaleout.messages import Accepted, OutputAssembler, step_only  # noqa: E402
from prefixserve.server.registry import AdapterRegistry  # noqa: E402

from test_server import (  # noqa: E402
    KEYS,
    _code,
    acme,  # noqa: F401 (fixture)
    adapters,  # noqa: F401 (fixture)
    bad_input_cases,
    load_adapters,
    offline_llm,
    server_config,
    test_tenants_load_and_unload_their_own_adapters,  # noqa: F401 (runs here on the fleet)
)
from test_server_hostile import (  # noqa: E402
    MAX_REQUEST,
    MAX_UPLOAD,
    test_each_rpc_refuses_requests_beyond_its_limit_before_parsing,  # noqa: F401 (on the fleet)
    test_undecodable_bytes_are_invalid_argument,  # noqa: F401 (on the fleet)
)

ATTENTION = "torch"
"""The attention backend of the replicas and of the reference engine: the same on both sides."""
OWNERS = {"pirate": ["acme"], "shout": ["globex"], "json": ["acme", "globex"], "polite": ["acme"]}
"""Each adapter of the fleet and the tenants that use it here (json and polite are public)."""
PROMPTS = ["The quick brown fox", [5, 9, 33, 7], "Paged attention stores", [40, 41, 42]]
TIMEOUT = 180.0
"""No call of these tests may take longer: a hang fails instead of blocking the suite."""


# -- Ray, the fleet and the reference engine ------------------------------------------------------


def _ray_processes(since: float, ours: set[int]) -> list[str]:
    """Live processes of this Ray instance: those it started from this process, and any
    ``ray::`` worker created since ``since``."""
    alive = []
    for proc in psutil.process_iter(["pid", "cmdline", "create_time"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        late_worker = cmdline.startswith("ray::") and proc.info["create_time"] >= since
        ours_or_late = proc.info["pid"] in ours or late_worker
        if ours_or_late and proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
            alive.append(f"{proc.info['pid']} {cmdline[:80]}")
    return alive


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A small local Ray instance for this module; afterwards no process of it may be left."""
    since = time.time() - 1.0
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=100 * 2**20,
        log_to_driver=False,
    )
    ours = {child.pid for child in psutil.Process().children(recursive=True)}
    try:
        yield
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            deadline = time.monotonic() + 30
            while (left := _ray_processes(since, ours)) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not left, f"Ray processes left after shutdown: {left}"


@pytest.fixture(scope="module")
def server(ray_cluster, tiny_model_dir, adapters, tmp_path_factory):  # noqa: F811
    """Two replicas; acme owns 'pirate', globex owns 'shout'; 'json' and 'polite' are public."""
    config = server_config(
        tiny_model_dir("llama"),
        tmp_path_factory.mktemp("registry"),
        max_upload_bytes=MAX_UPLOAD,
        max_request_bytes=MAX_REQUEST,
        http_port=0,
    )
    config.engine.attention_backend = ATTENTION
    with BackgroundFleetServer(config, FleetConfig(replicas=2, adapter_sync_s=0.5)) as running:
        load_adapters(running.address, adapters)
        yield running


@pytest.fixture(scope="module")
def channel(server) -> Iterator[grpc.Channel]:
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    with grpc.insecure_channel(server.address, options=options) as ch:
        yield ch


@pytest.fixture(scope="module")
def offline(tiny_model_dir, adapters) -> LLM:  # noqa: F811
    """One engine in this process, configured as each replica."""
    return offline_llm(tiny_model_dir("llama"), adapters, attention_backend=ATTENTION)


async def _run(client: AsyncClient, adapter: str | None, prompt, stream: bool, **options):
    """``(token_ids, text, finish_reason, replica)`` of one request, streamed or unary."""
    if not stream:
        out = await client.generate(prompt, adapter, timeout=TIMEOUT, **options)
        return out.token_ids, out.text, out.finish_reason, out.replica
    ids, text, last = [], "", None
    async for chunk in client.generate_stream(prompt, adapter, timeout=TIMEOUT, **options):
        ids, text, last = ids + chunk.token_ids, text + chunk.text, chunk
    assert last is not None
    return ids, text, last.finish_reason, last.replica


def _clients(server) -> dict[str, AsyncClient]:
    return {tenant: AsyncClient(server.address, key) for tenant, key in KEYS.items()}


# -- without Ray processes: the wire form, retries -------------------------------------------------


def _outputs(logprobs: bool) -> list[RequestOutput]:
    """Cumulative engine outputs of one request: three steps, the last cut by a stop string."""
    lp = [TokenLogprobs(t, -0.5 * t, [(t, -0.5 * t)]) for t in (7, 8, 9)]
    return [
        RequestOutput("r", "ab", [7], False, None, "ab", [7], lp[:1] if logprobs else None, 3, 2),
        RequestOutput("r", "abcd", [7, 8], False, None, "cd", [8], lp[:2] if logprobs else None, 3),
        RequestOutput("r", "abc", [7, 8, 9], True, "stop", "", [9], lp if logprobs else None, 3),
    ]


@pytest.mark.parametrize("logprobs", [False, True])
def test_outputs_travel_as_steps_and_come_back_whole(logprobs):
    outputs = _outputs(logprobs)
    steps = [step_only(out) for out in outputs]
    assert [s.token_ids for s in steps] == [[], [], [7, 8, 9]]
    assembler = OutputAssembler("r1")
    rebuilt = [assembler.add(step) for step in steps]
    for got, want in zip(rebuilt, outputs):
        assert RequestOutput(**{f: getattr(got, f) for f in RequestOutput.__slots__}) == want
        assert got.replica == "r1"


class _Stream:
    """A scripted replica stream: its items, and exceptions raised where they stand."""

    def __init__(self, items: list) -> None:
        self._items = iter(items)
        self.cancelled = False

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self):
        item = next(self._items, StopAsyncIteration())
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


class _Handle:
    """A deployment handle whose n-th generate call streams ``scripts[n]``."""

    def __init__(self, scripts: list[list]) -> None:
        self.scripts = scripts
        self.streams: list[_Stream] = []

    def options(self, **_) -> _Handle:
        return self

    @property
    def generate(self) -> _Handle:
        return self

    def remote(self, job) -> _Stream:
        self.streams.append(_Stream(self.scripts[len(self.streams)]))
        return self.streams[-1]


def _accepted(replica: str) -> Accepted:
    return Accepted(replica, EngineStats(0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0))


def _generate(scripts: list[list], tmp_path) -> tuple[list, _Handle]:
    handle = _Handle(scripts)
    fleet = ReplicaFleet(handle, AdapterRegistry(tmp_path), FleetConfig())

    async def run():
        return [out async for out in fleet.generate([5, 9], SamplingParams(max_new_tokens=3))]

    return asyncio.run(run()), handle


def test_a_request_whose_replica_died_before_any_output_is_sent_again(tmp_path):
    steps = [step_only(out) for out in _outputs(logprobs=False)]
    died = ActorDiedError()
    outs, handle = _generate([[died], [_accepted("a"), died], [_accepted("b"), *steps]], tmp_path)
    assert [o.token_ids for o in outs] == [[7], [7, 8], [7, 8, 9]]
    assert {o.replica for o in outs} == {"b"} and len(handle.streams) == 3


def test_a_request_whose_replica_died_after_output_fails_unavailable(tmp_path):
    first = step_only(_outputs(logprobs=False)[0])
    with pytest.raises(EngineDeadError, match=r"replica serving this request \(a\) stopped"):
        _generate([[_accepted("a"), first, ActorDiedError()], []], tmp_path)
    died = ActorDiedError()
    with pytest.raises(EngineDeadError, match="not yet known"):
        _generate([[died], [died], [died]], tmp_path)  # max_attempts


# -- acceptance ---------------------------------------------------------------------------------


def test_each_adapter_stays_on_one_replica_and_outputs_equal_one_engine(server, offline):
    """4 adapters x 8 concurrent requests (streams and unary calls), plus some without an
    adapter: token for token the single engine's answers; every adapter on one replica."""
    jobs = [
        (OWNERS[adapter][i % len(OWNERS[adapter])], adapter, PROMPTS[i % 4], 4 + i % 6, i % 2 == 0)
        for adapter in OWNERS
        for i in range(8)
    ]
    jobs += [("globex", None, prompt, 6, True) for prompt in PROMPTS]
    expected = offline.generate(
        [prompt for _, _, prompt, _, _ in jobs],
        [SamplingParams(max_new_tokens=n) for _, _, _, n, _ in jobs],
        adapter=[adapter for _, adapter, _, _, _ in jobs],
    )

    async def main():
        clients = _clients(server)
        try:
            calls = (
                _run(clients[tenant], adapter, prompt, stream, max_new_tokens=n)
                for tenant, adapter, prompt, n, stream in jobs
            )
            return await asyncio.wait_for(asyncio.gather(*calls), TIMEOUT)
        finally:
            for client in clients.values():
                await client.close()

    results = asyncio.run(main())
    served: dict[str | None, set[str]] = {}
    for (ids, text, reason, replica), want, job in zip(results, expected, jobs):
        assert (ids, text, reason) == (want.token_ids, want.text, want.finish_reason), job
        assert replica, f"no {'prefixserve-replica'} trailing metadata: {job}"
        served.setdefault(job[1], set()).add(replica)
    split = {adapter: replicas for adapter, replicas in served.items() if len(replicas) > 1}
    assert not split.keys() - {None}, f"adapters served by several replicas: {split}"
    assert len(server.fleet.replicas) <= 2
    with Client(server.address, KEYS["acme"]) as client:
        assert client.health() == "SERVING"
        assert client.tokenize("The quick brown fox") == offline.tokenizer.encode(
            "The quick brown fox", add_special_tokens=False
        )
        assert client.model_info().max_model_len == 512


def _loaded_on_each_replica(server, client: Client, replicas: int = 2) -> dict[str, int]:
    """Adapters loaded in each replica's engine now (requests without an adapter go to any
    replica; each reports its engine as it accepts one)."""
    since = time.monotonic()
    seen: dict[str, int] = {}
    while len(seen) < replicas:
        assert time.monotonic() - since < 60, f"only replicas {set(seen)} answered"
        replica = client.generate([5], max_new_tokens=1, timeout=TIMEOUT).replica
        assert replica is not None
        seen[replica] = server.fleet.replicas[replica].stats.adapters_loaded
    return seen


def test_unload_reaches_every_replica_and_a_reloaded_name_serves_its_new_files(server, offline):
    texts = {"first": "The quick brown fox", "second": "Paged attention stores"}
    for name, text in texts.items():
        offline.load_adapter(name, text=text)
    want = {
        name: offline.generate([5, 9], SamplingParams(max_new_tokens=6), adapter=name)[0]
        for name in texts
    }
    assert want["first"].token_ids != want["second"].token_ids
    with Client(server.address, KEYS["acme"]) as client:
        before = sum(_loaded_on_each_replica(server, client).values())
        got = {}
        for version, text in texts.items():
            client.load_adapter("mine", text=text)
            got[version] = client.generate([5, 9], "mine", max_new_tokens=6, timeout=TIMEOUT)
            assert client.unload_adapter("mine") is True
            with pytest.raises(grpc.RpcError) as info:
                client.generate([5, 9], "mine", max_new_tokens=2, timeout=TIMEOUT)
            assert info.value.code() is grpc.StatusCode.NOT_FOUND
        for version in texts:
            assert got[version].token_ids == want[version].token_ids, version
        deadline = time.monotonic() + 10
        while sum(_loaded_on_each_replica(server, client).values()) != before:
            assert time.monotonic() < deadline, "a replica still holds an unloaded adapter"
            time.sleep(0.5)


def test_bad_inputs_get_the_statuses_of_one_server(server, acme, tmp_path):  # noqa: F811
    for call, code, words in bad_input_cases(server.address, acme, tmp_path, MAX_UPLOAD):
        got, details = _code(call)
        assert (got, words in details) == (code, True), (code, words, details)
        assert "/tmp" not in details and "acme/" not in details  # no server paths or names
    assert acme.generate([5, 9], "pirate", max_new_tokens=2).finish_reason == "length"
    assert {a.name for a in acme.list_adapters()} == {"pirate", "json", "polite"}
    with Client(server.address, KEYS["ops"]) as ops:
        listed = {a.name: a for a in ops.list_adapters(all_tenants=True)}
    assert set(listed) == {"pirate", "shout", "json", "polite"}
    assert listed["pirate"].resident and listed["pirate"].kind == "PROMPT_TUNING"


def test_the_command_line_flags():
    args = build_parser().parse_args(["serve", "--ray", "--replicas", "3", "--ray-address", "a"])
    assert (args.ray, args.replicas, args.ray_address, args.replica_gpus) == (True, 3, "a", 0.0)
    assert build_parser().parse_args(["generate", "hi", "--show-replica"]).show_replica
    assert main(["serve", "--replicas", "2", "--registry-dir", "none"]) == 2  # needs --ray


def test_a_replica_killed_mid_load_fails_or_retries_its_requests(server, offline):
    """Runs last: the fleet is down to one replica (Ray Serve starts another meanwhile)."""
    with Client(server.address, KEYS["acme"]) as client:
        victim = client.generate([5, 9], "pirate", max_new_tokens=1, timeout=TIMEOUT).replica
    assert victim is not None
    long = {"max_new_tokens": 160, "ignore_eos": True}
    jobs = [
        (OWNERS[adapter][0], adapter, PROMPTS[i % 4]) for adapter in OWNERS for i in range(3)
    ] + [("globex", None, PROMPTS[i]) for i in range(4)]
    expected = offline.generate(
        [prompt for _, _, prompt in jobs],
        SamplingParams(**long),
        adapter=[adapter for _, adapter, _ in jobs],
    )

    async def one(client: AsyncClient, adapter, prompt, started: asyncio.Event):
        ids, last = [], None
        try:
            async for chunk in client.generate_stream(prompt, adapter, timeout=TIMEOUT, **long):
                started.set()
                ids, last = ids + chunk.token_ids, chunk
        except grpc.aio.AioRpcError as e:
            started.set()
            return e.code(), e.details(), None
        assert last is not None
        return grpc.StatusCode.OK, ids, last.replica

    async def main():
        clients = _clients(server)
        started = [asyncio.Event() for _ in jobs]
        try:
            calls = [
                asyncio.create_task(one(clients[tenant], adapter, prompt, event))
                for (tenant, adapter, prompt), event in zip(jobs, started)
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), TIMEOUT)
            _kill_replica(victim)
            return await asyncio.wait_for(asyncio.gather(*calls), TIMEOUT)
        finally:
            for client in clients.values():
                await client.close()

    results = asyncio.run(main())
    for (code, detail, _), want, job in zip(results, expected, jobs):
        if code is grpc.StatusCode.OK:
            assert detail == want.token_ids, job
        else:
            assert code is grpc.StatusCode.UNAVAILABLE, (job, code, detail)
            assert "stopped before it finished" in detail and "retry" in detail, detail
    for (code, _, replica), (_, adapter, _) in zip(results, jobs):
        if adapter == "pirate":  # on the victim, and under way when it died
            assert code is grpc.StatusCode.UNAVAILABLE
        elif code is grpc.StatusCode.OK:
            assert replica != victim
    with Client(server.address, KEYS["acme"]) as client:
        for adapter in ("pirate", "json", "polite", None):
            out = client.generate([5, 9], adapter, max_new_tokens=4, timeout=TIMEOUT)
            want = offline.generate([5, 9], SamplingParams(max_new_tokens=4), adapter=adapter)
            assert out.token_ids == want[0].token_ids and out.replica != victim


def _kill_replica(replica: str) -> None:
    """Kill the Ray actor of ``replica`` (as a crash would: no graceful shutdown)."""
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith("SERVE_REPLICA::") and actor["name"].endswith(f"#{replica}"):
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            return
    raise AssertionError(f"no Ray actor for replica {replica}")


def test_a_conversation_stays_where_its_blocks_are_cached(server):
    """Turns of one conversation (no adapter: any replica could take them) reach the replica
    that cached the earlier turns, and find them there."""
    with Client(server.address, KEYS["acme"]) as client:
        for c in range(4):
            prompt = [10 + c, 11 + c, 12 + c, *range(50, 70)]  # more than one routing block
            replicas = set()
            for turn in range(3):
                out = client.generate(prompt, max_new_tokens=4, ignore_eos=True, timeout=TIMEOUT)
                replicas.add(out.replica)
                assert (out.usage.cached_tokens > 0) == (turn > 0), (c, turn)
                prompt = [*prompt, *out.token_ids, 7, 8]
            assert len(replicas) == 1, f"conversation {c} went to {replicas}"


def test_the_http_api_serves_through_the_fleet(server, offline):
    """The OpenAI API of the front end reaches the replicas like gRPC: same answers, and a
    tenant's adapter private to it."""
    openai = pytest.importorskip("openai", reason="the HTTP API tests use the openai client")
    base_url = f"http://127.0.0.1:{server.server.http_port}/v1"
    ours = openai.OpenAI(base_url=base_url, api_key=KEYS["acme"], max_retries=0)
    out = ours.completions.create(
        model="pirate", prompt="The quick brown fox", max_tokens=6, temperature=0
    )
    want = offline.generate(
        ["The quick brown fox"], SamplingParams(max_new_tokens=6), adapter="pirate"
    )
    assert out.choices[0].text == want[0].text
    assert "pirate" in {m.id for m in ours.models.list()}
    globex = openai.OpenAI(base_url=base_url, api_key=KEYS["globex"], max_retries=0)
    with pytest.raises(openai.NotFoundError):
        globex.completions.create(model="pirate", prompt="Hi", max_tokens=2)
