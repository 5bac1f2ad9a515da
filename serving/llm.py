"""The offline API: ``LLM(...).generate(prompts, params)`` for scripts, notebooks and tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .config import EngineConfig
from .engine import LLMEngine, Prompt
from .request import RequestOutput
from .sampling_params import SamplingParams
from .types import AdapterInfo

Message = dict[str, str]


class LLM:
    """A model served by the prefixserve engine, driven synchronously.

    ``LLM()`` loads the embedded default model (SmolLM2-135M-Instruct); ``model`` may be a local
    Hugging Face directory or a name transformers can load from its cache.
    """

    def __init__(self, model: str | None = None, **options: Any) -> None:
        """``options``: any field of the engine's config dataclasses by name (see
        ``prefixserve.config`` or ``prefixserve serve --help``): ``dtype``, ``quantization``,
        ``device``, ``max_model_len``, ``block_size``, ``num_kv_blocks``, ``cpu_kv_memory_gib``,
        ``kv_memory_fraction``, ``max_num_batched_tokens``, ``max_num_seqs``,
        ``long_prefill_token_threshold``, ``attention_backend``, ``enforce_eager``,
        ``native_cpu_linear``, ``max_cuda_graph_batch``."""
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, **options))

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        adapter: str | Sequence[str | None] | None = None,
        use_tqdm: bool = True,
        cache_salt: str | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt, batched by the engine; one output per prompt, in order.

        ``prompts``: a string (tokenized as given, no special tokens added), a list of token ids,
        or a list of either. ``params``: one ``SamplingParams`` for all or one per prompt.
        ``adapter``: a loaded adapter's name for all prompts, or one name (or None) per prompt;
        requests of different adapters share every step. ``cache_salt``: these requests reuse
        only cached KV blocks of requests with the same salt (and leave theirs to those).
        """
        batch = self._as_batch(prompts)
        per_prompt = self._per_prompt(params, len(batch))
        adapters = self._per_prompt_adapter(adapter, len(batch))
        ids: list[str] = []
        try:
            for prompt, p, name in zip(batch, per_prompt, adapters):
                ids.append(self.engine.add_request(prompt, p, adapter=name, cache_salt=cache_salt))
            return self._run(ids, use_tqdm)
        except BaseException:
            for request_id in ids:
                self.engine.abort(request_id)
            raise

    def chat(
        self,
        conversations: Sequence[Message] | Sequence[Sequence[Message]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        adapter: str | Sequence[str | None] | None = None,
        use_tqdm: bool = True,
        cache_salt: str | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        batch = (
            [conversations]
            if conversations and isinstance(conversations[0], dict)
            else conversations
        )
        prompts = [self.apply_chat_template(c) for c in batch]  # type: ignore[arg-type]
        return self.generate(prompts, params, adapter=adapter, use_tqdm=use_tqdm)

    def apply_chat_template(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of ``messages`` rendered with the model's chat template, ready to answer."""
        if self.tokenizer.chat_template is None:
            raise ValueError(f"the model at {self.engine.model_path} has no chat template")
        text = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=False
        )
        return self.engine.tokenize(str(text))

    def load_adapter(
        self, name: str, path: str | Path | None = None, *, text: str | None = None
    ) -> AdapterInfo:
        """Load a PEFT prompt-learning adapter directory (prompt tuning, P-tuning, prefix tuning,
        cartridge) or a text system prompt under ``name``; raises ``AdapterError`` if invalid."""
        return self.engine.load_adapter(name, path, text)

    def unload_adapter(self, name: str) -> bool:
        """Unload now (True) or once its running requests end (False)."""
        return self.engine.unload_adapter(name)

    def list_adapters(self) -> list[AdapterInfo]:
        """Kind, prefix length, sizes, residency and users of every loaded adapter."""
        return self.engine.list_adapters()

    @staticmethod
    def _per_prompt_adapter(adapter: str | Sequence[str | None] | None, n: int) -> list[str | None]:
        if adapter is None or isinstance(adapter, str):
            return [adapter] * n
        if len(adapter) != n:
            raise ValueError(f"got {len(adapter)} adapters for {n} prompts")
        return list(adapter)

    @staticmethod
    def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
        if isinstance(prompts, str):
            return [prompts]
        if prompts and all(isinstance(t, int) for t in prompts):
            return [list(prompts)]  # type: ignore[arg-type]
        return list(prompts)  # type: ignore[arg-type]

    @staticmethod
    def _per_prompt(
        params: SamplingParams | Sequence[SamplingParams] | None, n: int
    ) -> list[SamplingParams]:
        if params is None or isinstance(params, SamplingParams):
            return [params or SamplingParams()] * n
        if len(params) != n:
            raise ValueError(f"got {len(params)} SamplingParams for {n} prompts")
        return list(params)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", disable=not use_tqdm) as bar:
            while len(done) < len(ids):
                if not self.engine.has_unfinished_requests():
                    raise RuntimeError("the engine went idle with requests unanswered")
                for out in self.engine.step():
                    if out.finished:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[i] for i in ids]
