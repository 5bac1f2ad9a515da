"""Soft-prompt adapters, read and validated on the host before anything touches the KV pool.

Every supported adapter reduces to a prefix of P tokens in front of each request:

* PROMPT_TUNING, P_TUNING: ``prompt_embeddings [P, hidden]`` run once through the model at
  positions 0..P-1 (PEFT saves the final embeddings, after any prompt encoder).
* PREFIX_TUNING, CARTRIDGE: ``prompt_embeddings [P, L * 2 * Hkv * D]`` are the K/V themselves,
  laid out ``[P, L, 2 (key, value), Hkv, D]``; keys are used as stored (no RoPE).
* TEXT: a system prompt's token ids, run once like prompt tuning.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import PreTrainedModel

from .text import shorten

WEIGHT_KEY = "prompt_embeddings"


class AdapterError(ValueError):
    """An adapter cannot be loaded or used; the message names the adapter and the problem."""


class AdapterNotFoundError(AdapterError):
    """A request names an adapter that is not loaded, or is being unloaded."""


class AdapterNameTakenError(AdapterError):
    """An adapter of that name is loaded (or still being unloaded)."""


class AdapterOverBudgetError(AdapterError):
    """An adapter would hold more bytes (host tensors and prefix KV) than its loader may add."""

    def __init__(self, name: str, host_bytes: int, kv_bytes: int, budget: int) -> None:
        super().__init__(
            f"adapter {name!r} would hold {host_bytes + kv_bytes} bytes ({host_bytes} of host "
            f"tensors, {kv_bytes} of prefix KV), more than the {budget} bytes allowed"
        )
        self.host_bytes, self.kv_bytes, self.budget = host_bytes, kv_bytes, budget

    @property
    def resident_bytes(self) -> int:
        return self.host_bytes + self.kv_bytes


class AdapterKind(str, enum.Enum):
    PROMPT_TUNING = "PROMPT_TUNING"
    P_TUNING = "P_TUNING"
    PREFIX_TUNING = "PREFIX_TUNING"
    CARTRIDGE = "CARTRIDGE"
    TEXT = "TEXT"

    @property
    def is_kv(self) -> bool:
        """Whether the adapter stores K/V directly (else it is run through the model)."""
        return self in (AdapterKind.PREFIX_TUNING, AdapterKind.CARTRIDGE)


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The dimensions an adapter must match."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int

    @classmethod
    def of(cls, model: PreTrainedModel) -> ModelShape:
        cfg = model.config.get_text_config()
        heads = cfg.num_attention_heads
        return cls(
            num_layers=cfg.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
            hidden_size=cfg.hidden_size,
            vocab_size=cfg.vocab_size,
        )


@dataclass(slots=True)
class Adapter:
    """An adapter's host copy: exactly one of ``embeddings``, ``kv``, ``token_ids`` is set."""

    name: str
    kind: AdapterKind
    num_tokens: int
    """P: the prefix length; request tokens start at position P."""
    embeddings: torch.Tensor | None = None
    """(P, hidden) for prompt tuning and P-tuning."""
    kv: torch.Tensor | None = None
    """(L, 2, P, Hkv, D) for prefix tuning and cartridges."""
    token_ids: list[int] | None = None
    """The text prefix's token ids."""
    source: str = ""

    @property
    def host_bytes(self) -> int:
        tensor = self.embeddings if self.embeddings is not None else self.kv
        return tensor.numel() * tensor.element_size() if tensor is not None else 0


def _fail(name: str, message: str) -> AdapterError:
    return AdapterError(f"adapter {shorten(name)}: {message}")


WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
"""dtypes ``prompt_embeddings`` may be stored in (PEFT saves the model's float dtype)."""


def _read_config(name: str, directory: Path) -> dict:
    """``adapter_config.json`` of ``directory`` as a dict; any file that is not a readable JSON
    object raises :class:`AdapterError` saying so."""
    path = directory / "adapter_config.json"
    try:
        if not directory.is_dir():
            raise _fail(name, f"{shorten(str(directory))} is not a directory")
        if not path.is_file():
            raise _fail(name, f"{path} is missing (expected a PEFT adapter directory)")
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise _fail(name, f"{path} is not valid JSON: {e}") from e
    except RecursionError:  # json gives up on arrays or objects nested ~1,000 deep
        raise _fail(name, f"{path} nests too deeply to be an adapter config") from None
    except OSError as e:
        raise _fail(name, f"cannot read {shorten(str(path))}: {e.strerror or e}") from None
    if not isinstance(config, dict):
        raise _fail(name, f"{path} must hold a JSON object")
    return config


def _read_weights(name: str, directory: Path) -> torch.Tensor:
    """The ``prompt_embeddings`` tensor of ``directory`` in float32; a file that cannot be read,
    lacks it, or stores it in a non-float dtype raises :class:`AdapterError`."""
    st, legacy = directory / "adapter_model.safetensors", directory / "adapter_model.bin"
    try:
        if st.is_file():
            tensors = load_file(st)
        elif legacy.is_file():
            tensors = torch.load(legacy, map_location="cpu", weights_only=True)
        else:
            raise _fail(name, f"no adapter_model.safetensors (or adapter_model.bin) in {directory}")
    except AdapterError:
        raise
    except Exception as e:  # any failure to parse untrusted bytes is the file's fault
        raise _fail(name, f"cannot read the weights in {directory}: {str(e)[:300]}") from e
    if not isinstance(tensors, dict) or not isinstance(tensors.get(WEIGHT_KEY), torch.Tensor):
        keys = sorted(map(str, tensors)) if isinstance(tensors, dict) else type(tensors).__name__
        raise _fail(name, f"the weights hold no {WEIGHT_KEY!r} tensor (found {shorten(keys)})")
    weights = tensors[WEIGHT_KEY]
    if weights.dtype not in WEIGHT_DTYPES:
        allowed = ", ".join(str(d).removeprefix("torch.") for d in WEIGHT_DTYPES)
        raise _fail(
            name,
            f"{WEIGHT_KEY} is stored as {str(weights.dtype).removeprefix('torch.')}; "
            f"adapters must store it as {allowed}",
        )
    return weights.float()


def _check_config(name: str, config: dict, kind: AdapterKind, shape: ModelShape) -> None:
    if config.get("num_transformer_submodules", 1) != 1:
        raise _fail(name, "num_transformer_submodules must be 1 (decoder-only models)")
    if kind.is_kv:
        expected = {
            "num_layers": shape.num_layers,
            "num_attention_heads": shape.num_kv_heads,
            "token_dim": shape.num_kv_heads * shape.head_dim,
        }
    else:
        expected = {"token_dim": shape.hidden_size}
    for key, want in expected.items():
        got = config.get(key)
        if got is not None and got != want:
            raise _fail(name, f"{key} is {shorten(got)} but the base model needs {want}")


def max_abs_value(kind: AdapterKind, shape: ModelShape, dtype: torch.dtype) -> float:
    """The largest magnitude an adapter's values may have on a model of ``shape`` in ``dtype``.

    Attention and normalization sum squares or products over a row: ``q . k`` over ``head_dim``
    for stored keys (prefix tuning, cartridges), ``sum(x^2)`` over ``hidden_size`` in the first
    norm for embeddings (prompt tuning). Both accumulate in fp32, so a row of values up to
    ``sqrt(fp32 max / width)`` cannot overflow; stored values must also fit ``dtype`` itself.
    Beyond it, an adapter's scores become infinite, and an infinite score turns into NaN."""
    width = shape.head_dim if kind.is_kv else shape.hidden_size
    accumulate = math.sqrt(torch.finfo(torch.float32).max / width)
    return min(accumulate, torch.finfo(dtype).max)


def _check_values(name: str, tensor: torch.Tensor, max_tokens: int, limit: float) -> None:
    if tensor.dim() != 2:
        raise _fail(
            name, f"prompt_embeddings must be 2-D [P, width], got shape {tuple(tensor.shape)}"
        )
    if not torch.isfinite(tensor).all():
        raise _fail(name, "the prompt embeddings contain NaN or infinite values")
    peak = float(tensor.abs().max()) if tensor.numel() else 0.0
    if peak > limit:
        raise _fail(
            name,
            f"its values reach {peak:.3g} in magnitude, beyond {limit:.3g}, the most this model "
            "can attend over without overflow (trained adapters stay far below; check the file)",
        )
    if tensor.shape[0] < 1:
        raise _fail(name, "the adapter has 0 virtual tokens")
    if tensor.shape[0] > max_tokens:
        raise _fail(
            name,
            f"its {tensor.shape[0]} virtual tokens leave no room in the context "
            f"(at most {max_tokens} fit)",
        )


def load_peft_adapter(
    name: str,
    path: str | Path,
    shape: ModelShape,
    max_tokens: int,
    dtype: torch.dtype = torch.float32,
) -> Adapter:
    """Read and validate a PEFT prompt-learning adapter directory for a model of ``shape`` whose
    activations and KV cache are ``dtype``.

    ``max_tokens``: the longest prefix allowed (context length minus room for a request).
    Raises :class:`AdapterError` naming the adapter and the mismatch.
    """
    directory = Path(path)
    config = _read_config(name, directory)
    peft_type = str(config.get("peft_type", "")).upper()
    supported = {k.value: k for k in AdapterKind if k is not AdapterKind.TEXT}
    kind = supported.get(peft_type)
    if kind is None:
        raise _fail(
            name,
            f"peft_type {shorten(peft_type or None)} is not supported (use {', '.join(supported)})",
        )
    _check_config(name, config, kind, shape)
    weights = _read_weights(name, directory)
    _check_values(name, weights, max_tokens, max_abs_value(kind, shape, dtype))
    num_tokens = weights.shape[0]
    if kind.is_kv:
        width = shape.num_layers * 2 * shape.num_kv_heads * shape.head_dim
        if weights.dim() != 2 or weights.shape[1] != width:
            raise _fail(
                name,
                f"prompt_embeddings has shape {tuple(weights.shape)}; the base model needs "
                f"[P, {width}] = [P, layers {shape.num_layers} x 2 x kv heads "
                f"{shape.num_kv_heads} x head dim {shape.head_dim}]",
            )
        view = weights.view(num_tokens, shape.num_layers, 2, shape.num_kv_heads, shape.head_dim)
        kv = view.permute(1, 2, 0, 3, 4).contiguous()
        return Adapter(name, kind, num_tokens, kv=kv, source=str(directory))
    if weights.dim() != 2 or weights.shape[1] != shape.hidden_size:
        raise _fail(
            name,
            f"prompt_embeddings has shape {tuple(weights.shape)}; the base model needs "
            f"[P, hidden size {shape.hidden_size}]",
        )
    return Adapter(name, kind, num_tokens, embeddings=weights.contiguous(), source=str(directory))


def text_adapter(name: str, token_ids: list[int], max_tokens: int) -> Adapter:
    """A system prompt as a prefix (its tokens are run once through the model)."""
    if not token_ids:
        raise _fail(name, "the text prefix is empty")
    if len(token_ids) > max_tokens:
        raise _fail(name, f"the text prefix has {len(token_ids)} tokens; at most {max_tokens} fit")
    return Adapter(name, AdapterKind.TEXT, len(token_ids), token_ids=list(token_ids), source="text")
