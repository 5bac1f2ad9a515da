"""Sampler and SamplingParams: greedy, seeds, distributions, filters, penalty, logprobs."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from prefixserve.sampler import (
    Sampler,
    apply_repetition_penalty,
    apply_top_k_top_p_min_p,
    request_generator,
)
from prefixserve.sampling_params import SamplingParams

SP = SamplingParams


def _sample(sampler: Sampler, logits, params, generators=None, history=None):
    batch = logits.shape[0]
    generators = generators if generators is not None else [None] * batch
    return sampler(logits, params, generators, history or [[] for _ in range(batch)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", [1, 7, 33])
def test_greedy_is_argmax(dtype: torch.dtype, batch: int) -> None:
    logits = (torch.randn(batch, 97) * 3).to(dtype)
    original = logits.clone()
    out = _sample(Sampler(seed=0), logits, [SP()] * batch)
    assert out.token_ids == logits.float().argmax(dim=1).tolist()
    assert out.logprobs == [None] * batch
    assert torch.equal(logits, original)


@pytest.mark.parametrize("seed", [None, 5])
def test_top_k_1_equals_greedy(seed: int | None) -> None:
    logits = torch.randn(9, 300) * 2
    params = [SP(temperature=1.0, top_k=1, top_p=0.5, seed=seed)] * 9
    gens = [request_generator(p, "cpu") for p in params]
    assert _sample(Sampler(), logits, params, gens).token_ids == logits.argmax(dim=1).tolist()


OTHER_ROWS = [
    SP(temperature=1.0),
    SP(temperature=0.5, seed=7),
    SP(),
    SP(temperature=1.3, top_k=5, seed=99),
    SP(temperature=0.8, min_p=0.1, repetition_penalty=1.2),
    SP(temperature=0.9, top_p=0.95, seed=1234),  # same seed as the target, own generator
]


@pytest.mark.parametrize("position", [0, 3, 6])
def test_seed_independent_of_batch(position: int) -> None:
    target = SP(temperature=0.9, top_p=0.95, seed=1234)
    steps, vocab = 60, 64
    logits = torch.randn(steps, len(OTHER_ROWS) + 1, vocab) * 2
    alone_gen, mixed_gen = request_generator(target, "cpu"), request_generator(target, "cpu")
    other_gens = [request_generator(p, "cpu") for p in OTHER_ROWS]
    params = [*OTHER_ROWS[:position], target, *OTHER_ROWS[position:]]
    gens = [*other_gens[:position], mixed_gen, *other_gens[position:]]
    alone_sampler, mixed_sampler = Sampler(seed=1), Sampler(seed=2)
    alone, mixed = [], []
    for step in range(steps):
        row = logits[step, position : position + 1]
        alone += _sample(alone_sampler, row, [target], [alone_gen]).token_ids
        history = [list(range(step % 9)) for _ in params]
        mixed.append(
            _sample(mixed_sampler, logits[step], params, gens, history).token_ids[position]
        )
    assert alone == mixed
    assert len(set(alone)) > 10


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("seeded", [False, True])
def test_temperature_sampling_matches_softmax(temperature: float, seeded: bool) -> None:
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    rows, reps = 2000, 10
    params = [SP(temperature=temperature, seed=i if seeded else None) for i in range(rows)]
    gens = [request_generator(p, "cpu") for p in params]
    sampler = Sampler(seed=0)
    drawn = [_sample(sampler, logits.expand(rows, -1), params, gens).token_ids for _ in range(reps)]
    counts = torch.bincount(torch.tensor(drawn).flatten(), minlength=6).double()
    expected = torch.softmax(logits[0].double() / temperature, dim=0) * rows * reps
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 30.0  # 5 degrees of freedom: P(chi2 > 30) < 2e-5


def _reference_allowed(row: list[float], top_k: int, top_p: float, min_p: float) -> set[int]:
    """The HF definitions, one row at a time, in float64."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    allowed = set(order)
    if top_k > 0:
        kth = row[order[min(top_k, len(row)) - 1]]
        allowed = {i for i in allowed if row[i] >= kth}
    if top_p < 1.0:
        z = sum(math.exp(row[i]) for i in allowed)
        cum, kept = 0.0, set()
        for i in (i for i in order if i in allowed):
            if cum < top_p:
                kept.add(i)
            cum += math.exp(row[i]) / z
        allowed = kept
    top = max(row[i] for i in allowed)
    return {i for i in allowed if math.exp(row[i] - top) >= min_p}


FILTERS = [  # (top_k, top_p, min_p)
    (0, 1.0, 0.0),
    (1, 1.0, 0.0),
    (5, 1.0, 0.0),
    (0, 0.5, 0.0),
    (0, 0.9, 0.0),
    (0, 1.0, 0.2),
    (10, 0.8, 0.0),
    (10, 0.95, 0.05),
    (0, 0.3, 0.5),
    (200, 0.99, 0.01),
    (3, 0.01, 0.0),
]


def _hf_allowed(row: torch.Tensor, top_k: int, top_p: float, min_p: float) -> set[int]:
    scores = row.unsqueeze(0).clone()
    ids = torch.LongTensor(1, 0)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(ids, scores)
    if min_p > 0.0:
        scores = MinPLogitsWarper(min_p)(ids, scores)
    return set(torch.isfinite(scores[0]).nonzero().flatten().tolist())


@pytest.mark.parametrize("vocab", [7, 50, 1000])
def test_filters_match_definitions(vocab: int) -> None:
    logits = torch.randn(len(FILTERS), vocab) * 2.5
    top_k, top_p, min_p = (torch.tensor(col) for col in zip(*FILTERS, strict=True))
    masked = apply_top_k_top_p_min_p(logits, top_k, top_p, min_p)
    for r, (k, p, m) in enumerate(FILTERS):
        got = set(torch.isfinite(masked[r]).nonzero().flatten().tolist())
        assert got == _reference_allowed(logits[r].double().tolist(), k, p, m), (k, p, m)
        assert got == _hf_allowed(logits[r], k, p, m), (k, p, m)
        assert torch.equal(masked[r, list(got)], logits[r, list(got)])


def test_top_k_keeps_ties() -> None:
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.0]])
    masked = apply_top_k_top_p_min_p(logits, torch.tensor([2]), torch.tensor([1.0]), torch.zeros(1))
    assert torch.isfinite(masked[0]).tolist() == [True, False, True, True, True, False]


def test_sampling_stays_in_allowed_set() -> None:
    vocab, reps = 40, 300
    logits = torch.randn(len(FILTERS), vocab) * 2
    temps = [0.7 + 0.1 * i for i in range(len(FILTERS))]
    params = [
        SP(temperature=t, top_k=k, top_p=p, min_p=m)
        for t, (k, p, m) in zip(temps, FILTERS, strict=True)
    ]
    allowed = [
        _reference_allowed((logits[r].double() / temps[r]).tolist(), k, p, m)
        for r, (k, p, m) in enumerate(FILTERS)
    ]
    seen: list[set[int]] = [set() for _ in FILTERS]
    sampler = Sampler(seed=3)
    for _ in range(reps // 30):
        tokens = _sample(sampler, logits.repeat(30, 1), params * 30).token_ids
        for i, tok in enumerate(tokens):
            seen[i % len(FILTERS)].add(tok)
    for r in range(len(FILTERS)):
        assert seen[r] <= allowed[r]
        if len(allowed[r]) <= 8:
            assert seen[r] == allowed[r]


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_hf(penalty: float) -> None:
    vocab = 40
    logits = torch.randn(4, vocab) * 3
    history = [[1, 1, 5, 39, 7, 5], [0], [2, 3, 4, 2, 3, 4, 2, 30, 31, 32], [10, 11]]
    ours = apply_repetition_penalty(logits, torch.full((4,), penalty), history)
    for b, ids in enumerate(history):
        hf = RepetitionPenaltyLogitsProcessor(penalty)(
            torch.tensor([ids]), logits[b : b + 1].clone()
        )
        assert torch.equal(ours[b], hf[0])


def test_repetition_penalty_in_sampler() -> None:
    logits = torch.randn(5, 30) * 3
    history = [[int(logits[b].argmax()), 3, 3, 4] for b in range(5)]
    penalties = [1.0, 1.5, 3.0, 10.0, 0.8]
    params = [SP(repetition_penalty=p) for p in penalties]
    out = _sample(Sampler(), logits, params, history=history)
    for b, p in enumerate(penalties):
        ids = torch.tensor([history[b]])
        expected = RepetitionPenaltyLogitsProcessor(p)(ids, logits[b : b + 1].clone()).argmax()
        assert out.token_ids[b] == expected.item()


@pytest.mark.parametrize("n", [0, 1, 5, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_from_raw_logits(n: int, dtype: torch.dtype) -> None:
    logits = (torch.randn(4, 64) * 2).to(dtype)
    params = [
        SP(logprobs=n),
        SP(temperature=0.7, top_k=3, repetition_penalty=1.8, logprobs=n, seed=1),
        SP(temperature=1.0),
        SP(temperature=1.2, min_p=0.1, logprobs=20, seed=2),
    ]
    gens = [request_generator(p, "cpu") for p in params]
    out = _sample(Sampler(), logits, params, gens, history=[[1, 2, 3]] * 4)
    expected = logits.float().log_softmax(dim=1)
    assert out.logprobs[2] is None
    for b in (0, 1, 3):
        lp = out.logprobs[b]
        assert lp is not None and lp.token_id == out.token_ids[b]
        assert lp.logprob == pytest.approx(expected[b, lp.token_id].item(), abs=1e-6)
        k = params[b].logprobs
        vals, ids = expected[b].topk(k) if k else (torch.empty(0), torch.empty(0))
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(vals.tolist(), abs=1e-6)
        assert all(x[1] >= y[1] for x, y in pairwise(lp.top))


def test_batch_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="batch mismatch"):
        Sampler()(torch.randn(2, 5), [SP()], [None, None], [[], []])


INVALID = [
    ("max_new_tokens", 0),
    ("max_new_tokens", -3),
    ("max_new_tokens", 2.5),
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("top_k", -1),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", math.nan),
    ("min_p", -0.1),
    ("min_p", 1.1),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("logprobs", -1),
    ("logprobs", 21),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("stop_token_ids", [3, -1]),
    ("seed", 1.5),
    ("seed", "42"),
    ("seed", 2**64),
]


@pytest.mark.parametrize(("field", "value"), INVALID)
def test_invalid_params_name_field_and_value(field: str, value: object) -> None:
    with pytest.raises(ValueError) as info:
        SamplingParams(**{field: value})
    assert field in str(info.value) and repr(value) in str(info.value)


def test_params_normalized() -> None:
    params = SamplingParams(stop="###", stop_token_ids=[4, 5])
    assert params.stop == ["###"] and params.stop_token_ids == [4, 5]
    assert SamplingParams().stop == [] and SamplingParams().stop_token_ids == []
    assert SamplingParams().greedy and SamplingParams(temperature=0.5, top_k=1).greedy
    assert not SamplingParams(temperature=0.5).greedy


def test_stop_lists_are_bounded():
    """Stop strings are searched after every token on the engine's thread: one request may not
    bring thousands of them (or megabyte-long ones) into every step."""
    with pytest.raises(ValueError, match="at most 64 stop strings, got 65"):
        SamplingParams(stop=[f"s{i}" for i in range(65)])
    with pytest.raises(ValueError, match="at most 512 characters, stop\\[1\\] has 513"):
        SamplingParams(stop=["ok", "x" * 513])
    with pytest.raises(ValueError, match="at most 256 stop_token_ids"):
        SamplingParams(stop_token_ids=list(range(257)))
    assert len(SamplingParams(stop=[f"s{i}" for i in range(64)]).stop) == 64
