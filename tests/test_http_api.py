"""The OpenAI-compatible HTTP API over a real loopback server, with the official ``openai``
client: chat and text completions, streamed and not, with adapters of every kind and without,
equal to the gRPC API's and the Python API's answers (greedy); ``n``, logprobs, stop strings,
penalties, exact usage; tenants' adapters as private as over gRPC; errors in OpenAI's shape with
the right statuses; a client that disconnects mid-stream frees its blocks; adapters uploaded,
used and deleted over HTTP."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from transformers import AutoTokenizer

openai = pytest.importorskip("openai", reason="the HTTP API tests use the openai client (dev)")
httpx = pytest.importorskip("httpx2", reason="the openai client's HTTP library")

from prefixserve import LLM, SamplingParams  # noqa: E402
from prefixserve.client import Client  # noqa: E402
from prefixserve.server import BackgroundServer  # noqa: E402

from test_server import KEYS, POLITE, server_config  # noqa: E402

CHATML = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
"""A chat template for the tiny test tokenizer (which has none)."""
MESSAGES = [{"role": "user", "content": "The quick brown fox"}]
PROMPT = "Paged attention stores"


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny llama with a chat template."""
    path = tmp_path_factory.mktemp("tiny-chat")
    shutil.copytree(tiny_model_dir("llama"), path, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapters(model_dir, peft_adapter_dir) -> dict[str, Path]:
    return {
        "pirate": peft_adapter_dir(model_dir, "prompt_tuning", 4),
        "shout": peft_adapter_dir(model_dir, "prefix_tuning", 3),
        "json": peft_adapter_dir(model_dir, "cartridge", 6, seed=1),
    }


@pytest.fixture(scope="module")
def server(model_dir, adapters, tmp_path_factory):
    """acme owns 'pirate', globex owns 'shout'; 'json' (a cartridge) and 'polite' (text) are
    public."""
    config = server_config(
        model_dir, tmp_path_factory.mktemp("registry"), http_port=0, max_request_bytes=2**16
    )
    with BackgroundServer(config) as running:
        with Client(running.address, KEYS["acme"]) as acme:
            acme.load_adapter("pirate", upload=adapters["pirate"])
        with Client(running.address, KEYS["globex"]) as globex:
            globex.load_adapter("shout", upload=adapters["shout"])
        with Client(running.address, KEYS["ops"]) as ops:
            ops.load_adapter("json", path=str(adapters["json"]), public=True)
            ops.load_adapter("polite", text=POLITE, public=True)
        yield running


@pytest.fixture(scope="module")
def offline(model_dir, adapters) -> LLM:
    llm = LLM(str(model_dir), dtype="float32", block_size=4, num_kv_blocks=512)
    for name, path in adapters.items():
        llm.load_adapter(name, path)
    llm.load_adapter("polite", text=POLITE)
    return llm


def _url(server) -> str:
    return f"http://127.0.0.1:{server.server.http_port}"


def _client(server, tenant: str = "acme") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{_url(server)}/v1", api_key=KEYS[tenant], max_retries=0)


def _http(server, method: str, path: str, body=None, tenant: str | None = "acme", **kw):
    """``(status, json or text, headers)`` of a raw request (errors included)."""
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}
    with httpx.Client(base_url=_url(server), headers=headers, timeout=60) as client:
        response = client.request(method, path, json=body, **kw)
    try:
        content = response.json()
    except ValueError:
        content = response.text
    return response.status_code, content, response.headers


def _model(server) -> str:
    return server.server.state.model_info.model


@pytest.mark.parametrize("adapter", [None, "pirate", "json", "polite"])
@pytest.mark.parametrize("stream", [False, True])
def test_chat_equals_grpc_and_python(server, offline, adapter, stream):
    client = _client(server)
    model = adapter or _model(server)
    kwargs = {"model": model, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    if stream:
        chunks = list(
            client.chat.completions.create(
                **kwargs, stream=True, stream_options={"include_usage": True}
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = next(
            c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
        )
        usage = chunks[-1].usage
    else:
        out = client.chat.completions.create(**kwargs)
        text, finish, usage = (
            out.choices[0].message.content,
            out.choices[0].finish_reason,
            out.usage,
        )
    prompt = offline.apply_chat_template(MESSAGES)
    want = offline.generate([prompt], SamplingParams(max_new_tokens=8), adapter=adapter)[0]
    with Client(server.address, KEYS["acme"]) as grpc_client:
        over_grpc = grpc_client.generate(MESSAGES, adapter, max_new_tokens=8)
    assert text == want.text == over_grpc.text
    assert finish == want.finish_reason
    assert usage.prompt_tokens == len(prompt) == over_grpc.usage.prompt_tokens
    assert usage.completion_tokens == len(want.token_ids)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_completions_of_strings_and_token_ids(server, offline, stream):
    client = _client(server, "globex")
    ids = offline.engine.tokenize(PROMPT)
    prompts = [PROMPT, "Numbers like 12"] if stream else [ids, ids[:3]]
    kwargs = {"model": "shout", "prompt": prompts, "max_tokens": 6, "temperature": 0}
    want = offline.generate(prompts, SamplingParams(max_new_tokens=6), adapter="shout")
    if stream:
        texts = ["", ""]
        for chunk in client.completions.create(**kwargs, stream=True):
            for choice in chunk.choices:
                texts[choice.index] += choice.text
    else:
        out = client.completions.create(**kwargs)
        texts = [c.text for c in sorted(out.choices, key=lambda c: c.index)]
        assert out.usage.prompt_tokens == len(ids) + 3
        assert out.usage.completion_tokens == sum(len(w.token_ids) for w in want)
    assert texts == [w.text for w in want]


def test_n_choices_logprobs_and_cached_tokens(server, offline):
    client = _client(server)
    out = client.chat.completions.create(
        model="polite",
        messages=MESSAGES,
        max_tokens=5,
        temperature=0,
        n=3,
        logprobs=True,
        top_logprobs=2,
    )
    assert len(out.choices) == 3 and len({c.message.content for c in out.choices}) == 1
    prompt = offline.apply_chat_template(MESSAGES)
    want = offline.generate(
        [prompt], SamplingParams(max_new_tokens=5, logprobs=2), adapter="polite"
    )[0]
    content = out.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(
        [lp.logprob for lp in want.logprobs], abs=1e-4
    )
    assert all(len(c.top_logprobs) == 2 for c in content)
    assert out.usage.prompt_tokens == len(prompt)  # once for the three choices
    assert out.usage.completion_tokens == 3 * len(want.token_ids)
    again = client.chat.completions.create(
        model="polite", messages=MESSAGES, max_tokens=2, temperature=0
    )
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # the same prompt, cached


def test_stop_strings_and_penalties(server, offline):
    client = _client(server)
    free = client.completions.create(
        model=_model(server), prompt=PROMPT, max_tokens=12, temperature=0
    )
    stop = free.choices[0].text[3:6]
    assert stop.strip(), free.choices[0].text
    cut = client.completions.create(
        model=_model(server), prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == free.choices[0].text.split(stop)[0]
    assert cut.choices[0].finish_reason == "stop"
    ids = offline.engine.tokenize(PROMPT)
    params = SamplingParams(max_new_tokens=12, frequency_penalty=1.5, presence_penalty=0.5)
    want = offline.generate([ids], params)[0]
    penalized = client.completions.create(
        model=_model(server),
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        frequency_penalty=1.5,
        presence_penalty=0.5,
    )
    assert penalized.choices[0].text == want.text
    assert want.token_ids != offline.generate([ids], SamplingParams(max_new_tokens=12))[0].token_ids


def test_models_and_adapters_are_private_to_their_tenant(server):
    acme, globex = _client(server, "acme"), _client(server, "globex")
    names = {m.id for m in acme.models.list()}
    assert names == {_model(server), "pirate", "json", "polite"}
    listed = {m.id: m for m in globex.models.list()}
    assert "pirate" not in listed and listed["shout"].owned_by == "globex"
    assert listed["json"].owned_by == "system" and listed["json"].parent == _model(server)
    with pytest.raises(openai.NotFoundError) as theirs:
        globex.chat.completions.create(model="pirate", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.NotFoundError) as missing:
        globex.chat.completions.create(model="no-such", messages=MESSAGES, max_tokens=2)
    assert theirs.value.message.replace("pirate", "X") == missing.value.message.replace(
        "no-such", "X"
    )


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"temperature": 5}, "temperature", "less than or equal to 2"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "system"),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"n": "many"}, "n", "integer"),
        ({"tools": [{"type": "function"}]}, None, "tools: tool calls are not supported"),
        ({"top_logprobs": 3}, None, "top_logprobs: needs logprobs"),
        ({"max_tokens": 10**6}, None, "exceeds the context"),
    ],
)
def test_bad_fields_are_400_naming_the_field(server, body, param, words):
    request = {"model": _model(server), "messages": MESSAGES, **body}
    status, content, _ = _http(server, "POST", "/v1/chat/completions", request)
    assert status == 400, content
    error = content["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


def test_statuses_of_auth_size_and_json(server):
    status, content, _ = _http(server, "GET", "/v1/models", tenant=None)
    assert status == 401 and "API key" in content["error"]["message"]
    huge = {"model": _model(server), "prompt": "x " * 40000, "max_tokens": 1}
    status, content, _ = _http(server, "POST", "/v1/completions", huge)
    assert status == 413 and "--max-request-kb" in content["error"]["message"]
    status, content, headers = _http(
        server, "POST", "/v1/completions", content=b"{not json", headers={"X-Request-Id": "r-7"}
    )
    assert status == 400 and "not JSON" in content["error"]["message"]
    assert headers["x-request-id"] == "r-7"
    status, content, _ = _http(server, "GET", "/health", tenant=None)
    assert status == 200 and content == {"status": "ok"}


def test_a_disconnect_mid_stream_frees_the_request(server):
    engine = server.engine
    with httpx.Client(base_url=_url(server), timeout=60) as client:
        body = {
            "model": _model(server),
            "prompt": PROMPT,
            "max_tokens": 400,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
        }
        headers = {"Authorization": f"Bearer {KEYS['acme']}"}
        with client.stream("POST", "/v1/completions", json=body, headers=headers) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    break  # the first token came: hang up
    deadline = time.monotonic() + 20
    while engine.requests or engine.allocator.num_used != engine.prefixes.resident_blocks + len(
        engine.block_cache.idle
    ):
        assert time.monotonic() < deadline, f"{len(engine.requests)} requests left running"
        time.sleep(0.02)


def test_adapters_uploaded_used_and_deleted_over_http(server, adapters, offline):
    folder = adapters["pirate"]
    files = {
        "adapter_config": ("adapter_config.json", (folder / "adapter_config.json").read_bytes()),
        "adapter_model": (
            "adapter_model.safetensors",
            (folder / "adapter_model.safetensors").read_bytes(),
        ),
    }
    status, content, _ = _http(
        server, "POST", "/v1/adapters", tenant="globex", data={"name": "mine"}, files=files
    )
    assert status == 201 and content["owned_by"] == "globex" and content["prefix_tokens"] == 4
    out = _client(server, "globex").chat.completions.create(
        model="mine", messages=MESSAGES, max_tokens=6, temperature=0
    )
    prompt = offline.apply_chat_template(MESSAGES)
    want = offline.generate([prompt], SamplingParams(max_new_tokens=6), adapter="pirate")[0]
    assert out.choices[0].message.content == want.text
    status, content, _ = _http(server, "GET", "/v1/adapters/mine", tenant="acme")
    assert status == 404
    status, content, _ = _http(
        server, "POST", "/v1/adapters", {"name": "mine", "text": "x"}, "globex"
    )
    assert status == 409
    status, content, _ = _http(server, "DELETE", "/v1/adapters/mine", tenant="globex")
    assert status == 200 and content["deleted"]
    status, content, _ = _http(server, "GET", "/v1/adapters/mine", tenant="globex")
    assert status == 404


def test_vllm_lora_endpoints_load_a_server_path_for_admins(server, adapters):
    body = {"lora_name": "vllm-style", "lora_path": str(adapters["shout"])}
    status, content, _ = _http(server, "POST", "/v1/load_lora_adapter", body, tenant="acme")
    assert status == 403 and "admin" in content["error"]["message"]
    status, content, _ = _http(server, "POST", "/v1/load_lora_adapter", body, tenant="ops")
    assert status == 200 and "vllm-style" in content
    assert "vllm-style" in {m.id for m in _client(server, "ops").models.list()}
    status, content, _ = _http(
        server, "POST", "/v1/unload_lora_adapter", {"lora_name": "vllm-style"}, tenant="ops"
    )
    assert status == 200
    assert "vllm-style" not in {m.id for m in _client(server, "ops").models.list()}


def test_health_is_503_while_loading(model_dir, tmp_path):
    config = server_config(model_dir, tmp_path / "registry", http_port=0)
    server = BackgroundServer(config).start(wait_ready=False)
    try:
        url = f"http://127.0.0.1:{server.server.http_port}/health"
        try:
            urllib.request.urlopen(url, timeout=10)
            loading_status = 200
        except urllib.error.HTTPError as e:
            loading_status = e.code
            assert json.loads(e.read())["error"]["type"] == "service_unavailable"
        server.loading.result(120)
        assert urllib.request.urlopen(url, timeout=10).status == 200
        assert loading_status in (503, 200)  # 200 only if the tiny model loaded at once
    finally:
        server.stop()


def test_a_full_queue_is_429_with_retry_after(model_dir, tmp_path):
    config = server_config(model_dir, tmp_path / "registry", http_port=0, max_waiting=0)
    with BackgroundServer(config) as running:
        body = {"model": _model(running), "prompt": PROMPT, "max_tokens": 2}
        status, content, headers = _http(running, "POST", "/v1/completions", body)
    assert status == 429 and headers["retry-after"] == "1"
    assert "retry later" in content["error"]["message"]
    assert content["error"]["type"] == "rate_limit_error"


def test_the_readme_curl_examples_work_as_written(server):
    """Every curl line of the README's HTTP section, run against this server (its port, key
    and model): each succeeds and answers JSON, or Server-Sent Events ending in [DONE]."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("## OpenAI-compatible HTTP API", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.startswith("curl")]
    assert len(commands) >= 5, block
    for command in commands:
        command = (
            command.replace("localhost:8000", f"127.0.0.1:{server.server.http_port}")
            .replace("sk-acme-1234", KEYS["acme"])
            .replace("smollm2-135m-instruct-v1", _model(server))
        )
        done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, (command, done.stderr)
        if '"stream": true' in command:
            assert done.stdout.rstrip().endswith("data: [DONE]"), done.stdout
            continue
        answer = json.loads(done.stdout)
        assert "error" not in answer, (command, answer)


def test_chat_without_max_tokens_fills_the_context_left_after_the_adapter(server):
    out = _client(server).chat.completions.create(
        model="polite", messages=MESSAGES, temperature=0, extra_body={"ignore_eos": True}
    )
    limit = server.server.state.model_info.max_model_len
    prefix = server.engine.prefixes.get("polite").num_tokens
    assert out.usage.prompt_tokens + out.usage.completion_tokens + prefix == limit
    assert out.choices[0].finish_reason == "length"


def test_a_refused_stream_is_an_http_error_not_an_event_after_200(server):
    body = {
        "model": _model(server),
        "prompt": PROMPT,
        "max_tokens": 4,
        "stream": True,
        "guided_regex": "([a-z",
    }
    status, content, _ = _http(server, "POST", "/v1/completions", body)
    assert status == 400 and "does not compile" in content["error"]["message"]
    body = {"model": _model(server), "prompt": PROMPT, "max_tokens": 10**6, "stream": True}
    status, content, _ = _http(server, "POST", "/v1/completions", body)
    assert status == 400 and "exceeds the context" in content["error"]["message"]
    assert not server.engine.requests


def test_seeded_choices_differ_and_forbidden_tokens_have_finite_logprobs(server):
    client = _client(server)
    out = client.completions.create(
        model=_model(server), prompt=PROMPT, max_tokens=8, temperature=1.0, seed=5, n=4
    )
    assert len({c.text for c in out.choices}) > 1  # seeds 5, 6, 7, 8: not one answer four times
    out = client.chat.completions.create(
        model=_model(server),
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
        extra_body={"guided_choice": ["ab", "cd"]},
    )
    tops = [t.logprob for c in out.choices[0].logprobs.content for t in c.top_logprobs]
    assert min(tops) == -9999.0  # forbidden tokens: -inf, sent as JSON allows
    assert out.choices[0].message.content in ("ab", "cd")
