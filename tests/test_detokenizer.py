"""IncrementalDetokenizer on a real byte-level BPE tokenizer: streaming, unicode, stop strings."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from prefixserve.detokenizer import PROMPT_CONTEXT_TOKENS, IncrementalDetokenizer
from prefixserve.sampling_params import SamplingParams

CORPUS = [
    "Hello world, this is a test of streaming text.",
    "Café crème brûlée à la française, naïve façade.",
    "日本語のテキストです。中文也可以。",
    "Emoji 🙂 and 🚀 go 🎉! Spaces   and\ttabs\nnew lines.",
]
TEXTS = [
    *CORPUS,
    "Hi 🙂 café 日本 ok",
    "  leading and trailing spaces  ",
    "🎉🎉🚀 naïve 中文🙂",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Small vocabulary on purpose: emoji and CJK characters split over several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", clean_up_tokenization_spaces=False
    )


def _encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _stream(tokenizer, prompt: list[int], output: list[int], params: SamplingParams):
    """Feed ``output`` until a stop; returns (deltas incl. the final flush, detok, tokens used)."""
    detok = IncrementalDetokenizer(tokenizer, prompt, params)
    deltas, used = [], 0
    for token in output:
        deltas.append(detok.append(token))
        used += 1
        assert detok.text == "".join(deltas)
        if detok.stopped:
            break
    deltas.append(detok.flush())
    return deltas, detok, used


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip_special", [True, False])
@pytest.mark.parametrize("prompt", ["", "A prompt: "])
def test_deltas_concatenate_to_decode(tokenizer, text: str, skip_special: bool, prompt: str):
    output = _encode(tokenizer, text)
    for i in range(len(output) - 1, 0, -5):
        output.insert(i, tokenizer.eos_token_id)
    params = SamplingParams(skip_special_tokens=skip_special)
    deltas, detok, _ = _stream(tokenizer, _encode(tokenizer, prompt), output, params)
    expected = tokenizer.decode(output, skip_special_tokens=skip_special)
    assert "".join(deltas) == detok.text == expected
    assert not detok.stopped
    if skip_special:
        assert all("\ufffd" not in d for d in deltas)
        assert "".join(deltas) == text


def test_multibyte_characters_split_over_tokens(tokenizer) -> None:
    ids = _encode(tokenizer, "🙂")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams())
    assert [detok.append(t) for t in ids] == [""] * (len(ids) - 1) + ["🙂"]


def test_decode_window_is_bounded(tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    output = _encode(tokenizer, " ".join(TEXTS * 6))
    sizes: list[int] = []
    decode = tokenizer.decode

    def spy(ids: list[int], **kwargs: object) -> str:
        sizes.append(len(ids))
        return decode(ids, **kwargs)

    monkeypatch.setattr(tokenizer, "decode", spy)
    deltas, _, _ = _stream(tokenizer, output[:40], output, SamplingParams())
    assert "".join(deltas) == decode(output)
    assert len(output) > 400 and max(sizes) <= PROMPT_CONTEXT_TOKENS + 8


STOP_CASES = [  # (text, stop, include_stop_str_in_output, expected output text)
    ("Hello world, this is a test of streaming text.", ["world"], False, "Hello "),
    ("Hello world, this is a test of streaming text.", ["world"], True, "Hello world"),
    ("Hello world, this is a test of streaming text.", "is a t", False, "Hello world, this "),
    ("Hello world, this is a test of streaming text.", ["test", "this"], False, "Hello world, "),
    ("Hello world, this is a test of streaming text.", ["He"], False, ""),
    (
        "Hello world, this is a test of streaming text.",
        ["."],
        True,
        "Hello world, this is a test of streaming text.",
    ),
    ("Café crème brûlée à la française, naïve façade.", ["crème brûlée", "è"], False, "Café cr"),
    ("Café crème brûlée à la française, naïve façade.", ["crème brûlée", "è"], True, "Café crè"),
    (
        "Café crème brûlée à la française, naïve façade.",
        ["ve fa"],
        True,
        "Café crème brûlée à la française, naïve fa",
    ),
    ("Emoji 🙂 and 🚀 go 🎉! Spaces", ["🙂 and 🚀"], False, "Emoji "),
    ("Emoji 🙂 and 🚀 go 🎉! Spaces", ["🎉"], True, "Emoji 🙂 and 🚀 go 🎉"),
    ("日本語のテキストです。中文也可以。", ["テキスト"], False, "日本語の"),
    ("日本語のテキストです。中文也可以。", ["。中"], True, "日本語のテキストです。中"),
    ("Spaces   and\ttabs\nnew lines.", ["\n"], False, "Spaces   and\ttabs"),
]


@pytest.mark.parametrize(("text", "stop", "include", "expected"), STOP_CASES)
def test_stop_strings_cut_and_never_leak(tokenizer, text, stop, include, expected) -> None:
    output = _encode(tokenizer, text)
    params = SamplingParams(stop=stop, include_stop_str_in_output=include)
    stops = params.stop
    assert isinstance(stops, list)
    detok = IncrementalDetokenizer(tokenizer, _encode(tokenizer, "Prompt "), params)
    streamed = ""
    for n, token in enumerate(output, start=1):
        streamed += detok.append(token)
        assert expected.startswith(streamed)
        decoded = tokenizer.decode(output[:n])
        if not decoded.endswith("\ufffd") and not detok.stopped:
            assert len(decoded) - len(streamed) <= max(map(len, stops)) - 1
        if detok.stopped:
            assert any(s in decoded for s in stops)
            assert not any(s in tokenizer.decode(output[: n - 1]) for s in stops)
            break
    assert detok.stopped
    assert detok.flush() == ""
    assert streamed == detok.text == expected
    with pytest.raises(RuntimeError):
        detok.append(output[0])


def test_stop_string_spanning_token_boundaries(tokenizer) -> None:
    output = _encode(tokenizer, "Hello world, this is a test of streaming text.")
    stop = "is a t"
    pieces = [tokenizer.decode([t]) for t in output]
    assert not any(stop in p for p in pieces)
    deltas, detok, used = _stream(tokenizer, [], output, SamplingParams(stop=[stop]))
    assert detok.stopped and "".join(deltas) == "Hello world, this "
    assert stop in "".join(pieces[:used]) and stop not in "".join(pieces[: used - 1])


@pytest.mark.parametrize(
    ("text", "stop", "held"),
    [
        ("Hello world, this is a tes", ["test!"], "tes"),
        ("Hello world", ["d?", "ld!"], "ld"),
        ("Spaces and\n", ["\n\n"], "\n"),
        ("Emoji 🙂 and 🚀", ["🚀🚀"], "🚀"),
    ],
)
def test_held_back_prefix_released_by_flush(tokenizer, text, stop, held) -> None:
    detok = IncrementalDetokenizer(tokenizer, [], SamplingParams(stop=stop))
    streamed = "".join(detok.append(t) for t in _encode(tokenizer, text))
    assert not detok.stopped and streamed == text[: len(text) - len(held)]
    assert detok.flush() == held and detok.text == text
    assert detok.flush() == ""


def test_stop_on_special_token_text(tokenizer) -> None:
    output = [*_encode(tokenizer, "Hello"), tokenizer.eos_token_id, *_encode(tokenizer, " world")]
    params = SamplingParams(stop=["<|endoftext|>"], skip_special_tokens=False)
    deltas, detok, used = _stream(tokenizer, [], output, params)
    assert (
        detok.stopped
        and "".join(deltas) == "Hello"
        and used == output.index(tokenizer.eos_token_id) + 1
    )
