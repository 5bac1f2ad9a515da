"""The OpenAI HTTP API's request bodies as pydantic models: every field validated, each error
naming its field. Only the translation to the engine's :class:`SamplingParams` lives here
(:func:`sampling_params`); the rules of the values themselves are ``SamplingParams``' own, shared
with the gRPC API.

Output constraints come as OpenAI's ``response_format`` (``json_schema``, ``json_object``) or
vLLM's ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar`` (at most one).
Fields of OpenAI's API that would change the answer and that the engine does not do (tools,
``logit_bias``, ``echo``, ``suffix``, ``best_of``) are refused with a 400 that names them, never
ignored; fields that do not change it (``user``, ``store``, ``metadata``, ``service_tier``) are
accepted and ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..sampling_params import MAX_LOGPROBS, SamplingParams

DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for completions; chat completions default to the context left."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


UNSUPPORTED = {
    "tools": "tool calls",
    "tool_choice": "tool calls",
    "functions": "function calls",
    "function_call": "function calls",
    "logit_bias": "logit_bias",
    "echo": "echo",
    "suffix": "suffix",
    "best_of": "best_of",
    "audio": "audio output",
    "prediction": "predicted outputs",
}
"""Fields that would change the answer, which the engine does not do: refused, never ignored."""


class _Sampling(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="allow")  # unknown fields: checked in _refuse_unsupported

    model: str = Field(min_length=1)
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    cache_salt: str | None = None
    priority: int = 0
    user: str | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, what in UNSUPPORTED.items():
                value = data.get(name)
                if value not in (None, False, [], {}, ""):
                    raise ValueError(f"{name}: {what} are not supported by this server")
        return data

    def _constraint(self) -> dict[str, Any]:
        """The request's output constraint as ``SamplingParams`` keywords."""
        given: dict[str, Any] = {}
        response_format = getattr(self, "response_format", None)
        if response_format is not None and response_format.type == "json_object":
            given["json_object"] = True
        elif response_format is not None and response_format.type == "json_schema":
            if response_format.json_schema is None or response_format.json_schema.schema_ is None:
                raise ValueError("response_format.json_schema.schema: a JSON schema is required")
            given["json_schema"] = response_format.json_schema.schema_
        for field, name in (
            ("guided_json", "json_schema"),
            ("guided_regex", "regex"),
            ("guided_choice", "choice"),
            ("guided_grammar", "grammar"),
        ):
            value = getattr(self, field)
            if value is not None:
                given[name] = value
        if len(given) > 1:
            raise ValueError(f"give at most one output constraint, got {', '.join(given)}")
        return given

    def _sampling(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The engine's parameters; OpenAI's defaults where a field is unset (temperature 1)."""
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None or self.top_k < 0 else self.top_k,
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            include_stop_str_in_output=self.include_stop_str_in_output,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            **self._constraint(),
        )


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs set to true")
        return self

    def sampling_params(self, context_left: int) -> SamplingParams:
        """``context_left``: tokens the context has after the prompt (the default length)."""
        limit = self.max_completion_tokens or self.max_tokens or context_left
        return self._sampling(limit, (self.top_logprobs or 0) if self.logprobs else None)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @model_validator(mode="after")
    def _check_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt: must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: a string, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    def sampling_params(self) -> SamplingParams:
        return self._sampling(self.max_tokens or DEFAULT_MAX_TOKENS, self.logprobs)


class LoadLoraAdapterRequest(BaseModel):
    """vLLM's ``/v1/load_lora_adapter`` body: a server-side directory (admins)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: str = Field(min_length=1)
