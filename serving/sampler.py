"""Turn the last-position logits of a batch into one next token per request.

Processing follows HF transformers' ``generate``: repetition penalty (and OpenAI's frequency and
presence penalties over the output) -> greedy rows take the argmax
-> temperature -> top-k -> top-p -> min-p -> sample. Sampling draws ``Exp(1)`` noise ``E`` over the
vocabulary and picks ``argmax(probs / E)``, which selects token ``j`` with probability ``probs[j]``.
A row with its own generator draws its noise from that generator alone, so a seeded request gets
the same tokens whatever else shares its batch and wherever it sits in it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .sampling_params import SamplingParams


@dataclass(slots=True)
class TokenLogprobs:
    """Log-probabilities of one generated token, from ``log_softmax`` of the *raw* logits.

    Raw means before repetition penalty, temperature and top-k/top-p/min-p (vLLM's default): the
    model's own distribution, not the one that was sampled from.
    """

    token_id: int
    """The chosen token."""
    logprob: float
    """Its raw log-probability."""
    top: list[tuple[int, float]] = field(default_factory=list)
    """The ``params.logprobs`` most likely (token id, logprob) pairs, most likely first."""


@dataclass(slots=True)
class SamplerOutput:
    """One sampled token per batch row."""

    token_ids: list[int]
    """(B,) the next token of each row."""
    logprobs: list[TokenLogprobs | None]
    """(B,) per row, None where ``params.logprobs`` is None."""


def request_generator(params: SamplingParams, device: torch.device | str) -> torch.Generator | None:
    """The generator a seeded request keeps for its whole life (None when it has no seed).

    Create it once per request on the logits' device and pass the same object every step.
    """
    if params.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(params.seed)


def apply_repetition_penalty(
    logits: torch.Tensor, penalties: torch.Tensor, history: Sequence[Sequence[int]]
) -> torch.Tensor:
    """HF ``RepetitionPenaltyLogitsProcessor`` with a per-row penalty; returns a new tensor.

    logits: (R, V) fp32; penalties: (R,); history: R lists of token ids (prompt + output).
    Every token present in a row's history (counted once) has its logit divided by the penalty
    when positive and multiplied when negative. Ids >= V (embedding rows the head lacks) are
    ignored, as in HF.
    """
    vocab = logits.shape[1]
    rows = torch.cat([torch.full((len(h),), r, dtype=torch.long) for r, h in enumerate(history)])
    cols = torch.cat([torch.as_tensor(h, dtype=torch.long).reshape(-1) for h in history])
    in_vocab = cols < vocab
    rows, cols = rows[in_vocab].to(logits.device), cols[in_vocab].to(logits.device)
    seen = torch.zeros(logits.shape, dtype=torch.bool, device=logits.device)
    seen[rows, cols] = True
    p = penalties.to(logits.device, torch.float32).unsqueeze(1)
    return torch.where(seen, torch.where(logits < 0, logits * p, logits / p), logits)


def apply_frequency_presence_penalties(
    logits: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
    outputs: Sequence[Sequence[int]],
) -> torch.Tensor:
    """OpenAI's penalties; returns a new tensor.

    logits: (R, V) fp32; frequency, presence: (R,); outputs: R lists of the tokens generated so
    far (not the prompt). ``logit[t] -= frequency * count(t) + presence * (count(t) > 0)``.
    """
    vocab = logits.shape[1]
    counts = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    for r, tokens in enumerate(outputs):
        ids = torch.as_tensor(list(tokens), dtype=torch.long)
        ids = ids[ids < vocab]
        if len(ids):
            counts[r].index_add_(
                0, ids.to(logits.device), torch.ones(len(ids), device=logits.device)
            )
    f = frequency.to(logits.device, torch.float32).unsqueeze(1)
    p = presence.to(logits.device, torch.float32).unsqueeze(1)
    return logits - f * counts - p * (counts > 0).float()


def apply_top_k_top_p_min_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Mask (to -inf) the tokens each row may not sample, with one sort for all three filters.

    logits: (S, V) fp32 after temperature; top_k: (S,) int, 0 = off; top_p, min_p: (S,) float,
    1 and 0 = off. Same sets as HF's warpers chained top-k -> top-p -> min-p:
    top-k keeps logits >= the k-th largest (ties kept); top-p keeps, in descending order, each token
    whose exclusive cumulative probability (over the top-k survivors) is below top_p; min-p keeps
    tokens with probability >= min_p * the largest. The most likely token always survives.
    Returns a new (S, V) tensor.
    """
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=1, descending=True, stable=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab).long().to(logits.device)
    kth = sorted_logits.gather(1, (k - 1).unsqueeze(1))
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))

    probs = sorted_logits.softmax(dim=1)
    exclusive_cum = probs.cumsum(dim=1) - probs
    p = top_p.to(logits.device, torch.float32).unsqueeze(1)
    drop = (exclusive_cum >= p) & (p < 1.0)
    m = min_p.to(logits.device, torch.float32).unsqueeze(1)
    drop |= probs < m * probs[:, :1]
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


class Sampler:
    """Samples one token per row; owns the generator used by requests without a seed."""

    def __init__(
        self, seed: int | None = None, argmax: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> None:
        """seed: for the shared generator (None: nondeterministic). argmax: ``(R, V) -> (R,)``
        int64, how greedy rows take their token (None: ``torch.argmax``; the engine passes
        :func:`native_argmax` on CPU)."""
        self._seed = seed
        self._default: dict[torch.device, torch.Generator] = {}
        self._argmax = argmax or (lambda scores: scores.argmax(dim=1))

    def default_generator(self, device: torch.device) -> torch.Generator:
        """The shared generator of ``device``, created on first use."""
        gen = self._default.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            if self._seed is None:
                gen.seed()
            else:
                gen.manual_seed(self._seed)
            self._default[device] = gen
        return gen

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        history: Sequence[Sequence[int]],
        prompt_lens: Sequence[int] | None = None,
    ) -> SamplerOutput:
        """logits: (B, V) any float dtype (computed in fp32); params, generators, history: (B,).

        ``history[b]`` is row b's prompt + generated ids so far (used for the repetition
        penalty), ``prompt_lens[b]`` how many of them are the prompt (the frequency and presence
        penalties count the rest; default: all are output).
        ``generators[b]`` is the request's own generator (see ``request_generator``) or None.
        """
        batch = logits.shape[0]
        if not len(params) == len(generators) == len(history) == batch:
            raise ValueError(
                f"batch mismatch: logits {batch} rows, params {len(params)}, "
                f"generators {len(generators)}, history {len(history)}"
            )
        penalized = [b for b, p in enumerate(params) if p.repetition_penalty != 1.0]
        openai = [b for b, p in enumerate(params) if p.frequency_penalty or p.presence_penalty]
        # Greedy rows without penalties take the argmax of the logits as they come (bf16 ones
        # too: widening to fp32 is exact and keeps the order), so a greedy batch converts and
        # copies nothing; penalties work on an fp32 copy, never on the model's output.
        scores = logits
        if penalized or openai:
            scores = logits.float()
            scores = scores.clone() if scores is logits else scores
        if penalized:
            penalties = torch.tensor([params[b].repetition_penalty for b in penalized])
            idx = torch.tensor(penalized, device=scores.device)
            rows_history = [history[b] for b in penalized]
            scores[idx] = apply_repetition_penalty(scores[idx], penalties, rows_history)
        if openai:
            idx = torch.tensor(openai, device=scores.device)
            starts = prompt_lens or [0] * batch
            scores[idx] = apply_frequency_presence_penalties(
                scores[idx],
                torch.tensor([params[b].frequency_penalty for b in openai]),
                torch.tensor([params[b].presence_penalty for b in openai]),
                [history[b][starts[b] :] for b in openai],
            )

        greedy = [b for b, p in enumerate(params) if p.greedy]
        if len(greedy) == batch:
            tokens = self._argmax(scores)
        else:
            tokens = torch.empty(batch, dtype=torch.long, device=scores.device)
            if greedy:
                idx = torch.tensor(greedy, device=scores.device)
                tokens[idx] = self._argmax(scores[idx])
            sampled = [b for b, p in enumerate(params) if not p.greedy]
            idx = torch.tensor(sampled, device=scores.device)
            rows_params = [params[b] for b in sampled]
            rows_gens = [generators[b] for b in sampled]
            tokens[idx] = self._sample(scores[idx].float(), rows_params, rows_gens)

        token_ids = tokens.tolist()
        return SamplerOutput(token_ids, _logprobs(logits, params, token_ids))

    def _sample(
        self,
        scores: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        """scores: (S, V) fp32 penalized logits of the non-greedy rows -> (S,) sampled ids."""
        temperature = torch.tensor([p.temperature for p in params], device=scores.device)
        scores = scores / temperature.unsqueeze(1)
        if any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
            top_k = torch.tensor([p.top_k for p in params])
            top_p = torch.tensor([p.top_p for p in params])
            min_p = torch.tensor([p.min_p for p in params])
            scores = apply_top_k_top_p_min_p(scores, top_k, top_p, min_p)
        probs = scores.softmax(dim=1)
        return probs.div_(self._noise(probs, generators)).argmax(dim=1)

    def _noise(
        self, probs: torch.Tensor, generators: Sequence[torch.Generator | None]
    ) -> torch.Tensor:
        """(S, V) Exp(1) noise: each seeded row from its own generator, the rest in one draw."""
        noise = torch.empty_like(probs)
        shared = [s for s, g in enumerate(generators) if g is None]
        if shared:
            gen = self.default_generator(probs.device)
            draw = torch.empty(len(shared), probs.shape[1], device=probs.device)
            noise[torch.tensor(shared, device=probs.device)] = draw.exponential_(generator=gen)
        for s, g in enumerate(generators):
            if g is not None:
                noise[s].exponential_(generator=g)
        return noise.clamp_(min=torch.finfo(noise.dtype).tiny)


def native_argmax(device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The native CPU argmax (:mod:`prefixserve.kernels.cpu_sampling`: ~0.5 ms for 64 rows of
    a 49k vocabulary in bf16, where ATen takes ~6) on a CPU with AVX2 where the native ops
    load; None elsewhere (``torch.argmax``)."""
    if device.type != "cpu":
        return None
    from .config import cache_root, env_cpu_isa
    from .kernels import cpu_sampling
    from .kernels.cpu_build import NativeBuildError
    from .kernels.cpu_isa import default_isa

    try:
        cpu_sampling.load(cache_root())
        isa = default_isa(env_cpu_isa())
    except NativeBuildError:
        return None  # the attention backend has said why, once
    if isa == "baseline":
        return None
    return functools.partial(cpu_sampling.argmax_rows, isa=isa)


def _logprobs(
    raw: torch.Tensor, params: Sequence[SamplingParams], token_ids: list[int]
) -> list[TokenLogprobs | None]:
    """raw: (B, V) unprocessed logits (any float dtype; fp32 from here); one entry per row, None
    where logprobs are off."""
    out: list[TokenLogprobs | None] = [None] * len(params)
    wanted = [b for b, p in enumerate(params) if p.logprobs is not None]
    if not wanted:
        return out
    idx = torch.tensor(wanted, device=raw.device)
    logp = raw[idx].float().log_softmax(dim=1)
    chosen = logp.gather(1, torch.tensor([[token_ids[b]] for b in wanted], device=raw.device))
    n = min(max(params[b].logprobs or 0 for b in wanted), raw.shape[1])
    top_vals, top_ids = logp.topk(n, dim=1)
    chosen_l, vals_l, ids_l = chosen.squeeze(1).tolist(), top_vals.tolist(), top_ids.tolist()
    for i, b in enumerate(wanted):
        k = params[b].logprobs or 0
        top = list(zip(ids_l[i][:k], vals_l[i][:k], strict=True))
        out[b] = TokenLogprobs(token_ids[b], chosen_l[i], top)
    return out
