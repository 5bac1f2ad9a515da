"""Text that cannot fit the context is refused before it is tokenized (megabytes of text take
seconds to tokenize): the bound is exact, never refusing text that would fit."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from prefixserve import LLM
from prefixserve.adapters import AdapterError
from prefixserve.model_loader import resolve_model_path
from prefixserve.text import fewest_tokens, longest_token_chars


@pytest.fixture(scope="module")
def llm(tiny_model_dir) -> LLM:
    return LLM(model=str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=64)


def _no_tokenizing(*args, **kwargs):
    raise AssertionError("the text was tokenized")


def test_huge_text_adapter_and_prompt_are_refused_untokenized(llm, monkeypatch):
    engine = llm.engine
    assert engine.longest_token is not None
    huge = "tenant text " * 500_000  # 6 MB
    monkeypatch.setattr(engine.tokenizer, "encode", _no_tokenizing)
    with pytest.raises(AdapterError, match=r"characters, so at least \d+ tokens"):
        llm.load_adapter("big", text=huge)
    with pytest.raises(ValueError, match=r"beyond the context"):
        engine.add_request(huge)
    assert llm.list_adapters() == [] and not engine.requests


def test_text_within_the_bound_is_tokenized_and_judged_by_its_tokens(llm):
    engine = llm.engine
    max_tokens = engine.max_model_len - 2
    # Short enough for the bound, too many tokens for the context (each emoji is 4 bytes, at
    # least one token): the usual refusal, after tokenizing.
    text = "🙂" * (max_tokens + 1)
    assert fewest_tokens(text, engine.longest_token) <= max_tokens
    with pytest.raises(AdapterError, match="tokens; at most"):
        llm.load_adapter("long", text=text)
    info = llm.load_adapter("fine", text="You answer briefly.")
    assert info.num_tokens > 0
    llm.unload_adapter("fine")


@pytest.mark.parametrize("which", ["tiny", "default"])
def test_the_bound_never_exceeds_the_token_count(which, tiny_model_dir):
    path = tiny_model_dir("llama") if which == "tiny" else resolve_model_path(None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    longest = longest_token_chars(tokenizer)
    assert longest is not None
    rng = random.Random(0)
    alphabet = ["a", "b", " ", "\n", "  ", "é", "中", "🙂", "<|im_end|>", "\t", "1234", "\u0301"]
    texts = [" " * 500, "\n" * 300, "x" * 1000] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 400))) for _ in range(200)
    ]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert fewest_tokens(text, longest) <= len(ids), repr(text[:40])
