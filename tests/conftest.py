"""Shared fixtures: tiny random-weight models of each tested architecture, and the default model.

Without a GPU the Triton kernels run under the Triton interpreter, which Triton reads when it is
first imported: the suite (not the library) switches it on here, before anything imports Triton.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
# Compiling costs every engine a warm-up of 30 s or more on two cores: the suite's engines run
# eagerly unless a test asks for compiled steps (tests/test_compile.py) or the run does
# (PREFIXSERVE_ENFORCE_EAGER=0 pytest ...: the default, compiled path).
os.environ.setdefault("PREFIXSERVE_ENFORCE_EAGER", "1")

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from tiny_models import CORPUS, tiny_config


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small byte-level BPE tokenizer trained on a few sentences (no network)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="</s>",
    )
    path = tmp_path_factory.mktemp("tiny-tokenizer")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path):
    """Factory: ``tiny_model_dir(arch)`` -> a saved random-weight model with the tiny tokenizer."""
    cache: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch in cache:
            return cache[arch]
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tiny_tokenizer_dir)
        config = tiny_config(arch, tokenizer)
        torch.manual_seed(1234)
        model = AutoModelForCausalLM.from_config(config)
        with torch.no_grad():  # larger weights give peaked, varied next-token distributions
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.08)
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        cache[arch] = path
        return path

    return make


@pytest.fixture(scope="session")
def default_llm():
    """The engine on the embedded default model in fp32 (shared by the tests that need it)."""
    from prefixserve import LLM

    return LLM(dtype="float32")


@pytest.fixture(scope="session")
def peft_adapter_dir(tmp_path_factory: pytest.TempPathFactory):
    """Factory: ``peft_adapter_dir(model_dir, kind, num_virtual_tokens, seed)`` -> a saved PEFT
    adapter with random (non-trivial) weights for the model at ``model_dir``."""
    import peft

    from peft_reference import peft_config

    cache: dict[tuple, Path] = {}

    def make(model_dir: Path, kind: str, num_virtual_tokens: int, seed: int = 0) -> Path:
        key = (str(model_dir), kind, num_virtual_tokens, seed)
        if key in cache:
            return cache[key]
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        torch.manual_seed(seed)
        model = peft.get_peft_model(base, peft_config(kind, num_virtual_tokens))
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:  # only the adapter's own parameters
                    param.normal_(0.0, 0.5 if "prefix" in kind or kind == "cartridge" else 0.1)
        path = tmp_path_factory.mktemp(f"adapter-{kind}-{num_virtual_tokens}")
        model.save_pretrained(path)
        cache[key] = path
        return path

    return make
