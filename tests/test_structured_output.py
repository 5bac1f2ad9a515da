"""Structured output: JSON schemas, any JSON object, regexes and choices, mixed with free
requests and the example adapters in one batch on the default model; every constrained output
parses and validates (jsonschema) or matches, every free one equals its output alone; bad or
slow constraints fail alone with a message; the gRPC and HTTP APIs carry constraints."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import grpc
import pytest

from prefixserve import LLM, SamplingParams
from prefixserve.client import Client
from prefixserve.server import BackgroundServer

from test_server import KEYS, server_config

jsonschema = pytest.importorskip("jsonschema", reason="validates the outputs (dev dependency)")

ADAPTERS = Path(__file__).parents[1] / "examples" / "adapters"
NAME = {"type": "string", "maxLength": 16}
ITEM = {
    "type": "object",
    "properties": {"id": {"type": "integer"}},
    "required": ["id"],
    "additionalProperties": False,
}
COLOR = {"enum": ["red", "green", "blue"]}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer"}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"city": NAME, "sunny": {"type": "boolean"}},
     "required": ["city", "sunny"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"]},
    {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"tags": {"type": "array", "items": NAME, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"score": {"type": "number"}, "label": NAME},
     "required": ["score", "label"], "additionalProperties": False},
    {"type": "object", "properties": {"item": ITEM}, "required": ["item"],
     "additionalProperties": False},
    {"type": "object", "properties": {"color": COLOR, "count": {"type": "integer"}},
     "required": ["color", "count"], "additionalProperties": False},
]  # fmt: skip
"""Eight schemas of a few fields (strings bounded, so that 64 tokens finish them)."""
TOPICS = ["a cat", "the weather", "a city", "numbers", "colors", "a friend", "a robot", "tea"]
NEW = 64


@pytest.fixture(scope="module")
def llm(default_llm: LLM) -> LLM:
    for name in ("pirate", "shout", "json"):
        default_llm.load_adapter(f"st-{name}", ADAPTERS / name)
    yield default_llm
    for name in ("pirate", "shout", "json"):
        default_llm.unload_adapter(f"st-{name}")


def _prompt(llm: LLM, i: int) -> list[int]:
    question = f"Answer in JSON about {TOPICS[i % len(TOPICS)]}, number {i}."
    return llm.apply_chat_template([{"role": "user", "content": question}])


def test_constrained_and_free_requests_of_every_adapter_in_one_batch(llm):
    adapters = [None, "st-pirate", "st-shout", "st-json"]
    prompts = [_prompt(llm, i) for i in range(64)]
    params = [
        SamplingParams(max_new_tokens=NEW, json_schema=SCHEMAS[i // 2 % 8])
        if i % 2 == 0
        else SamplingParams(max_new_tokens=24)
        for i in range(64)
    ]
    names = [adapters[i % 4] for i in range(64)]
    outputs = llm.generate(prompts, params, adapter=names)
    finished = 0
    for i, out in enumerate(outputs):
        if i % 2:
            continue
        if out.finish_reason == "length":  # a truncated output says so
            continue
        finished += 1
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), SCHEMAS[i // 2 % 8])
    assert finished >= 28, f"only {finished} of 32 constrained outputs finished"
    free = [i for i in range(64) if i % 2]
    alone = llm.generate(
        [prompts[i] for i in free], [params[i] for i in free], adapter=[names[i] for i in free]
    )
    assert [outputs[i].token_ids for i in free] == [o.token_ids for o in alone]


def test_json_object_regex_choice_and_grammar(llm):
    prompt = _prompt(llm, 3)
    cases = [
        (SamplingParams(max_new_tokens=NEW, json_object=True), json.loads),
        (
            SamplingParams(max_new_tokens=16, regex=r"[0-9]{3}-[a-z]{2}"),
            lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t) or pytest.fail(t),
        ),
        (
            SamplingParams(max_new_tokens=8, choice=["yes", "no", "maybe"]),
            lambda t: t in ("yes", "no", "maybe") or pytest.fail(t),
        ),
        (
            SamplingParams(max_new_tokens=8, grammar='root ::= "A" | "B" "C"'),
            lambda t: t in ("A", "BC") or pytest.fail(t),
        ),
        (
            SamplingParams(
                max_new_tokens=8, temperature=1.0, seed=3, choice=["red", "green", "blue"]
            ),
            lambda t: t in ("red", "green", "blue") or pytest.fail(t),
        ),
    ]
    outputs = llm.generate([prompt] * len(cases), [p for p, _ in cases])
    for (params, check), out in zip(cases, outputs):
        if params.json_object and out.finish_reason == "length":
            continue  # any JSON may nest past the limit: the truncation says so
        assert out.finish_reason == "stop", out.text
        check(out.text)


def test_logprobs_are_of_the_masked_distribution(llm):
    """With one allowed answer, the few tokens that can start it hold all the probability: the
    top 5 logprobs sum to 1 over them, and the rest of the top is -inf (the unmasked
    distribution would spread its mass over the whole vocabulary)."""
    out = llm.generate(
        [_prompt(llm, 1)], SamplingParams(max_new_tokens=4, choice=["yes"], logprobs=5)
    )[0]
    assert out.text == "yes"
    top = [lp for _, lp in out.logprobs[0].top]
    finite = [lp for lp in top if lp > float("-inf")]
    assert 1 <= len(finite) < len(top)
    assert math.fsum(math.exp(lp) for lp in finite) == pytest.approx(1.0, abs=1e-4)
    assert out.logprobs[0].logprob == max(finite)


def test_a_truncated_constrained_output_says_length(llm):
    out = llm.generate([_prompt(llm, 2)], SamplingParams(max_new_tokens=3, json_schema=SCHEMAS[0]))[
        0
    ]
    assert out.finish_reason == "length" and len(out.token_ids) == 3


@pytest.mark.parametrize(
    ("params", "words"),
    [
        (
            {"json_schema": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}},
            "json_schema",
        ),
        ({"json_schema": "{not json"}, "json_schema"),
        ({"regex": "([a-z"}, "regex"),
        ({"grammar": "root ::= undefined_rule"}, "grammar"),
        ({"regex": "a", "choice": ["b"]}, "at most one output constraint"),
        ({"choice": []}, "choice must be a non-empty list"),
        ({"json_schema": {"x": "y" * 70000}}, "at most 65536 are accepted"),
    ],
)
def test_bad_constraints_fail_alone(llm, params, words):
    with pytest.raises(ValueError, match=words):
        llm.generate(["Hi"], SamplingParams(max_new_tokens=4, **params))
    assert not llm.engine.requests  # nothing left behind
    assert llm.generate(["Hi"], SamplingParams(max_new_tokens=2))[0].token_ids


def test_a_slow_compile_is_refused_at_its_time_limit(llm):
    grammars = llm.engine.grammars
    limit = grammars.timeout
    grammars.timeout = 1e-4  # no schema compiles this fast
    try:
        schema = {"type": "object", "properties": {f"f{i}": {"type": "integer"} for i in range(40)}}
        with pytest.raises(ValueError, match="did not compile within"):
            llm.generate(["Hi"], SamplingParams(max_new_tokens=4, json_schema=schema))
    finally:
        grammars.timeout = limit


def test_the_grpc_and_http_apis_carry_constraints(tiny_model_dir, tmp_path):
    openai = pytest.importorskip("openai", reason="the HTTP API tests use the openai client")
    config = server_config(tiny_model_dir("llama"), tmp_path / "registry", http_port=0)
    with BackgroundServer(config) as running, Client(running.address, KEYS["acme"]) as client:
        out = client.generate([5, 9, 33], max_new_tokens=48, json_schema=SCHEMAS[2])
        if out.finish_reason == "stop":
            jsonschema.validate(json.loads(out.text), SCHEMAS[2])
        assert client.generate([5, 9], max_new_tokens=8, choice=["ab", "cd"]).text in ("ab", "cd")
        with pytest.raises(grpc.RpcError) as bad:
            client.generate([5, 9], max_new_tokens=8, regex="([a-z")
        assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "regex constraint does not compile" in (bad.value.details() or "")
        http = openai.OpenAI(
            base_url=f"http://127.0.0.1:{running.server.http_port}/v1",
            api_key=KEYS["acme"],
            max_retries=0,
        )
        model = running.server.state.model_info.model
        text = (
            http.completions.create(
                model=model,
                prompt="Numbers",
                max_tokens=8,
                temperature=0,
                extra_body={"guided_choice": ["left", "right"]},
            )
            .choices[0]
            .text
        )
        assert text in ("left", "right")
        with pytest.raises(openai.BadRequestError) as bad_http:
            http.completions.create(
                model=model, prompt="x", max_tokens=4, extra_body={"guided_regex": "([a-z"}
            )
        assert "does not compile" in bad_http.value.message


def test_a_pathological_regex_fails_or_compiles_within_its_limit(llm):
    """Nested counted repetitions: their automaton grows fast. Whatever the grammar engine makes
    of it, the request is answered (or refused) within the compile limit, and others go on."""
    grammars = llm.engine.grammars
    limit = grammars.timeout
    grammars.timeout = 2.0
    start = time.monotonic()
    try:
        out = llm.generate(
            ["Hi"], SamplingParams(max_new_tokens=4, regex="((a{1,50}){1,50}){1,50}b")
        )
        assert set(out[0].text) <= {"a", "b"}
    except ValueError as e:
        assert "regex constraint" in str(e)
    finally:
        grammars.timeout = limit
    assert time.monotonic() - start < 2.0 + 30  # the limit, plus a few steps of a small model
    assert llm.generate(["Hi"], SamplingParams(max_new_tokens=2))[0].token_ids
