"""Translation between the protobuf messages and the engine's types, with nothing else in it."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

from .._proto import prefixserve_pb2 as pb
from ..request import RequestOutput
from ..sampler import TokenLogprobs
from ..sampling_params import SamplingParams
from ..text import shorten
from ..types import AdapterInfo
from .registry import AdapterRecord

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
}


def sampling_params(request: pb.GenerateRequest) -> SamplingParams:
    """SamplingParams from a request; unset fields keep SamplingParams' defaults."""
    kwargs: dict[str, object] = {}
    sampling, stopping = request.sampling, request.stopping
    for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed"):
        if sampling.HasField(name):
            kwargs[name] = getattr(sampling, name)
    for name in ("max_new_tokens", "skip_special_tokens"):
        if stopping.HasField(name):
            kwargs[name] = getattr(stopping, name)
    if request.HasField("logprobs"):
        kwargs["logprobs"] = request.logprobs
    which = request.WhichOneof("constraint")
    if which == "choice":
        kwargs["choice"] = list(request.choice.options)
    elif which is not None:
        kwargs[which] = getattr(request, which)
    return SamplingParams(
        stop=list(stopping.stop),
        stop_token_ids=list(stopping.stop_token_ids),
        include_stop_str_in_output=stopping.include_stop_str_in_output,
        ignore_eos=stopping.ignore_eos,
        **kwargs,  # type: ignore[arg-type]
    )


def chat_token_ids(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[pb.ChatMessage]
) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template, ready for the answer (as
    ``LLM.apply_chat_template``)."""
    if not messages:
        raise ValueError("chat must hold at least one message")
    if tokenizer.chat_template is None:
        raise ValueError("the served model has no chat template: send text or token_ids")
    for i, m in enumerate(messages):
        if m.role not in ("system", "user", "assistant"):
            raise ValueError(
                f"chat message {i}: role must be system, user or assistant, got {shorten(m.role)}"
            )
    try:
        text = tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True,
            tokenize=False,
        )
    except Exception as e:  # the template's own refusals (jinja2 errors): the caller's input
        raise ValueError(f"the model's chat template refused the messages: {e}") from None
    return list(tokenizer.encode(str(text), add_special_tokens=False))


def logprobs_message(entries: Sequence[TokenLogprobs]) -> list[pb.TokenLogprobs]:
    return [
        pb.TokenLogprobs(
            token_id=e.token_id,
            logprob=e.logprob,
            top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in e.top],
        )
        for e in entries
    ]


def usage(out: RequestOutput) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=out.num_prompt_tokens,
        completion_tokens=len(out.token_ids),
        adapter_tokens=out.num_prefix_tokens,
        cached_tokens=out.num_cached_tokens,
    )


def stream_chunk(out: RequestOutput, request_id: str) -> pb.GenerateStreamResponse:
    chunk = pb.GenerateStreamResponse(
        request_id=request_id,
        delta_text=out.delta_text,
        delta_token_ids=out.delta_token_ids,
    )
    if out.logprobs is not None and out.delta_token_ids:
        chunk.logprobs.extend(logprobs_message(out.logprobs[-len(out.delta_token_ids) :]))
    if out.finished:
        chunk.finish_reason = FINISH_REASONS.get(out.finish_reason or "", pb.FINISH_REASON_ABORT)
        chunk.usage.CopyFrom(usage(out))
    return chunk


def full_response(out: RequestOutput, request_id: str) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=request_id,
        text=out.text,
        token_ids=out.token_ids,
        finish_reason=FINISH_REASONS.get(out.finish_reason or "", pb.FINISH_REASON_ABORT),
        usage=usage(out),
        logprobs=logprobs_message(out.logprobs or []),
    )


def adapter_message(record: AdapterRecord, info: AdapterInfo, *, admin: bool) -> pb.Adapter:
    """The adapter as the caller sees it; ``admin``: whether the caller may see server paths."""
    return pb.Adapter(
        name=record.name,
        owner=record.owner or "",
        public=record.owner is None,
        kind=info.kind,
        num_tokens=info.num_tokens,
        host_bytes=info.host_bytes,
        kv_bytes=info.kv_bytes,
        resident=info.resident,
        requests=info.requests,
        unloading=info.unloading,
        source=record.source_for(admin),
    )
