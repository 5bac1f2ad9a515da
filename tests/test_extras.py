"""The optional extras are optional: with triton, bitsandbytes, peft, ray and the HTTP API's
fastapi and uvicorn not installed (hidden
from the import system in a subprocess), the engine serves on a CPU, and choosing a feature that
needs a missing extra fails with a message naming the extra to install."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXTRAS = (
    "triton",
    "bitsandbytes",
    "peft",
    "ray",
    "fastapi",
    "uvicorn",
    "multipart",
    "openai",
    "xgrammar",
)
ADAPTERS = Path(__file__).parents[1] / "examples" / "adapters"

HIDE = """
import sys
HIDDEN = set(sys.argv[1].split(","))

class _Hide:
    # A meta path finder wrapper that finds nothing under the hidden names: to the import
    # system and to importlib.util.find_spec (what transformers checks) they are not installed.
    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            return None
        return self.inner.find_spec(name, path, target)

    def __getattr__(self, attr):
        return getattr(self.inner, attr)

sys.meta_path[:] = [_Hide(f) for f in sys.meta_path]
"""


def run_without(hidden: tuple[str, ...], code: str) -> subprocess.CompletedProcess[str]:
    env_code = HIDE + code
    return subprocess.run(
        [sys.executable, "-c", env_code, ",".join(hidden)],
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_engine_serves_on_cpu_without_any_extra(tiny_model_dir):
    model = tiny_model_dir("llama")
    done = run_without(
        EXTRAS,
        f"""
from prefixserve import LLM, SamplingParams
llm = LLM(model={str(model)!r}, dtype="float32", num_kv_blocks=64, enforce_eager=True)
llm.load_adapter("sys", text="You answer briefly.")
out = llm.generate(["hello world"] * 2, SamplingParams(max_new_tokens=4), adapter=["sys", None])
assert all(len(o.token_ids) == 4 for o in out), out
loaded = sorted(m for m in sys.modules if m.split(".")[0] in HIDDEN)
assert not loaded, loaded
print("served")
""",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "served" in done.stdout


def test_peft_adapters_serve_without_peft():
    """The engine reads PEFT's two files itself: peft is needed to train adapters, not to serve."""
    done = run_without(
        ("peft",),
        f"""
from prefixserve import LLM, SamplingParams
llm = LLM(dtype="float32", num_kv_blocks=64, enforce_eager=True)  # the default model
llm.load_adapter("pirate", {str(ADAPTERS / "pirate")!r})
llm.load_adapter("shout", {str(ADAPTERS / "shout")!r})
out = llm.generate(["Hi"] * 2, SamplingParams(max_new_tokens=3), adapter=["pirate", "shout"])
assert all(len(o.token_ids) == 3 for o in out), out
assert "peft" not in sys.modules
print("served")
""",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "served" in done.stdout


@pytest.mark.parametrize(
    "hidden, options, extra",
    [
        ("triton", 'attention_backend="triton"', "triton"),
        ("bitsandbytes", 'quantization="4bit"', "quant"),
    ],
)
def test_a_feature_without_its_extra_names_the_extra(tiny_model_dir, hidden, options, extra):
    model = tiny_model_dir("llama")
    done = run_without(
        (hidden,),
        f"""
import os
os.environ["TRITON_INTERPRET"] = "1"  # a Triton backend on a CPU runs interpreted
from prefixserve import LLM
from prefixserve.extras import MissingExtraError
try:
    LLM(model={str(model)!r}, dtype="float32", num_kv_blocks=64, enforce_eager=True, {options})
except MissingExtraError as exc:
    print("refused:", exc)
""",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"pip install 'prefixserve[{extra}]'" in done.stdout, done.stdout + done.stderr


def test_serve_on_ray_without_ray_names_the_extra():
    done = run_without(
        ("ray",),
        """
from prefixserve.cli import main
sys.exit(main(["serve", "--ray", "--port", "0"]))
""",
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "pip install 'prefixserve[ray]'" in done.stderr


def test_the_http_api_without_its_extra_names_the_extra(tiny_model_dir):
    model = tiny_model_dir("llama")
    done = run_without(
        ("fastapi", "uvicorn"),
        f"""
import asyncio
from prefixserve.extras import MissingExtraError
from prefixserve.server import PrefixServer, ServerConfig
from prefixserve.config import EngineConfig
config = ServerConfig(EngineConfig.from_kwargs(model={str(model)!r}), port=0, http_port=0)
async def start():
    server = PrefixServer(config)
    try:
        await server.start()
    except MissingExtraError as exc:
        print("refused:", exc)
asyncio.run(start())
""",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pip install 'prefixserve[http]'" in done.stdout, done.stdout + done.stderr


def test_a_constraint_without_the_structured_extra_fails_alone(tiny_model_dir):
    model = tiny_model_dir("llama")
    done = run_without(
        ("xgrammar",),
        f"""
from prefixserve import LLM, SamplingParams
llm = LLM(model={str(model)!r}, dtype="float32", num_kv_blocks=64, enforce_eager=True)
try:
    llm.generate(["hi"], SamplingParams(max_new_tokens=2, regex="[ab]"))
except ValueError as exc:
    print("refused:", exc)
assert llm.generate(["hi"], SamplingParams(max_new_tokens=2))[0].token_ids
""",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pip install 'prefixserve[structured]'" in done.stdout, done.stdout + done.stderr
