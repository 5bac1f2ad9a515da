"""Automatic prefix caching: multi-turn conversations with and without adapters of every kind
equal PEFT and transformers turn by turn (with chunked prefill, preemption and each CPU attention
backend), cached tokens are counted exactly, cached blocks are never written, a reloaded adapter
and another tenant or salt get no old blocks, and requests sharing cached blocks are grouped."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefixserve import LLM, SamplingParams
from prefixserve.model_runner import shared_runs

from hf_reference import hf_greedy
from peft_reference import peft_greedy

BS = 4
NEW = 5
COMMON = [21, 22, 23, 24, 25, 26, 27, 28, 29, 30]
"""A few-shot start every first turn shares (2.5 blocks)."""
TAILS = [[40, 41, 42], [50, 51, 52, 53, 54, 55]]
NEXT_TURNS = [[[60, 61], [62, 63, 64, 65, 66]], [[70, 71, 72, 73], [74]]]
"""Per conversation, the user tokens of turns 2 and 3."""
KINDS = {"prompt_tuning": 5, "prefix_tuning": 8, "cartridge": 17}
"""PEFT adapters (virtual tokens: off and on a block edge), and a text adapter."""
TEXT = "You answer in one short sentence."


@pytest.fixture(scope="module")
def conversations(tiny_model_dir, peft_adapter_dir):
    """Adapter paths, and per adapter (None: none; 'text': the text adapter) the prompts and
    reference outputs of two conversations of three turns, from PEFT and transformers."""
    model_dir = tiny_model_dir("llama")
    paths = {k: peft_adapter_dir(model_dir, k, n) for k, n in KINDS.items()}
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    text = AutoTokenizer.from_pretrained(model_dir).encode(TEXT, add_special_tokens=False)

    def reference(adapter, prompts):
        if adapter is None:
            return hf_greedy(base, prompts, NEW)
        if adapter == "text":
            return hf_greedy(base, [text + p for p in prompts], NEW)
        return peft_greedy(model_dir, paths[adapter], prompts, NEW)

    turns: dict = {}
    for adapter in [*KINDS, "text", None]:
        prompts = [COMMON + tail for tail in TAILS]
        per_turn = []
        for turn in range(3):
            outputs = reference(adapter, prompts)
            per_turn.append((prompts, outputs))
            if turn < 2:
                prompts = [
                    p + o + NEXT_TURNS[c][turn] for c, (p, o) in enumerate(zip(prompts, outputs))
                ]
        turns[adapter] = per_turn
    return str(model_dir), paths, turns


def _engine(path, paths, **options) -> LLM:
    llm = LLM(path, dtype="float32", block_size=BS, **options)
    for name, adapter_path in paths.items():
        llm.load_adapter(name, adapter_path)
    llm.load_adapter("text", text=TEXT)
    return llm


def _record_steps(llm: LLM) -> list:
    """Every step's attention metadata, recorded as the runner prepares it."""
    runner, metas = llm.engine.runner, []
    prepare = runner.prepare

    def recording(scheduled):
        inputs = prepare(scheduled)
        metas.append((inputs.meta, list(scheduled.requests)))
        return inputs

    runner.prepare = recording
    return metas


@pytest.mark.parametrize(
    "options",
    [
        {"num_kv_blocks": 256},
        {"num_kv_blocks": 256, "attention_backend": "torch"},
        {"num_kv_blocks": 256, "attention_backend": "triton"},  # interpreted on a CPU
        {"num_kv_blocks": 256, "grouped": "prefix_mode"},  # every shared prefix read grouped
        {"num_kv_blocks": 256, "attention_backend": "triton", "grouped": "decode_mode"},
        {"num_kv_blocks": 256, "max_num_batched_tokens": 8, "long_prefill_token_threshold": 3},
        {"num_kv_blocks": 40},  # preemption: 10 conversations do not fit at once
    ],
    ids=["cpu", "torch", "triton", "cpu-grouped", "triton-grouped", "chunked", "preempted"],
)
def test_multi_turn_mixed_adapters_equal_peft_and_transformers(conversations, options):
    path, paths, turns = conversations
    options = dict(options)
    grouped = options.pop("grouped", None)
    llm = _engine(path, paths, **options)
    if grouped is not None:
        setattr(llm.engine.runner.backend, grouped, "grouped")
    metas = _record_steps(llm)
    cached = []
    for turn in range(3):
        batch = [(a, c) for a in turns for c in range(2)]
        outputs = llm.generate(
            [turns[a][turn][0][c] for a, c in batch],
            SamplingParams(max_new_tokens=NEW, ignore_eos=True),
            adapter=[a for a, _ in batch],
        )
        for (adapter, c), out in zip(batch, outputs):
            assert out.token_ids == turns[adapter][turn][1][c], (adapter, turn, c)
        cached.append(sum(o.num_cached_tokens for o in outputs))
    engine = llm.engine
    if options["num_kv_blocks"] >= 256:
        # (Chunked, a conversation's first turn may already hit its twin's common start.)
        assert cached[1] > cached[0] and cached[2] > cached[1]
        # Later turns' history was grouped as a shared prefix beyond adapters' own prefixes.
        grouped = [
            (meta, reqs)
            for meta, reqs in metas
            if any(
                meta.prefix_lens[meta.prefix_index[i]] > r.num_prefix_tokens
                for i, r in enumerate(reqs)
                if meta.prefix_index[i] >= 0
            )
        ]
        assert grouped, "no step read shared cached blocks as a prefix"
    else:
        assert engine.scheduler.num_preemptions > 0
    idle = len(engine.block_cache.idle)
    assert engine.allocator.num_used == engine.prefixes.resident_blocks + idle
    assert engine.reset_prefix_cache() == idle
    assert engine.allocator.num_used == engine.prefixes.resident_blocks


def test_cached_tokens_counted_exactly(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=BS, num_kv_blocks=64)
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    for n in (1, 4, 5, 8, 11):  # shorter than, on and off block edges
        prompt = list(range(100 + n, 100 + 2 * n))
        first, second = (llm.generate([prompt], params)[0] for _ in range(2))
        assert first.num_cached_tokens == 0
        # Every full block but the last prompt token's.
        assert second.num_cached_tokens == (n - 1) // BS * BS
        assert second.token_ids == first.token_ids
        # The next turn hits the full blocks of the prompt and the generated tokens (but the
        # last generated one, never fed back through the model).
        turn = [*prompt, *first.token_ids, 7]
        computed = len(prompt) + len(first.token_ids) - 1
        assert llm.generate([turn], params)[0].num_cached_tokens == computed // BS * BS
    stats = llm.engine.stats()
    assert stats.prefix_cache_hits > 0 and stats.prefix_cache_queries > stats.prefix_cache_hits


def test_cached_blocks_are_never_written(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=BS, num_kv_blocks=64)
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    prompt = list(range(30, 46))  # four full blocks
    llm.generate([prompt], params)
    engine = llm.engine
    cached = sorted(engine.block_cache.idle)
    k, v = engine.runner.kv_cache.k[:, cached].clone(), engine.runner.kv_cache.v[:, cached].clone()
    llm.generate([prompt, [*prompt, 5, 6, 7], prompt[:9]], params)
    assert torch.equal(engine.runner.kv_cache.k[:, cached], k)
    assert torch.equal(engine.runner.kv_cache.v[:, cached], v)


def test_reloaded_adapter_gets_no_old_blocks(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=BS, num_kv_blocks=64)
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    prompt = list(range(50, 63))
    llm.load_adapter("a", text="abc def")
    llm.generate([prompt], params, adapter="a")
    assert llm.generate([prompt], params, adapter="a")[0].num_cached_tokens == 12
    assert llm.generate([prompt], params)[0].num_cached_tokens == 0  # not behind the adapter
    llm.unload_adapter("a")
    llm.load_adapter("a", text="abc def")
    assert llm.generate([prompt], params, adapter="a")[0].num_cached_tokens == 0


def test_tenants_and_salts_do_not_share_blocks(tiny_model_dir):
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=BS, num_kv_blocks=64)
    engine = llm.engine
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    prompt = list(range(70, 83))

    def cached(**kwargs) -> int:
        rid = engine.add_request(prompt, params, **kwargs)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished and out.request_id == rid:
                    result = out.num_cached_tokens
        return result

    assert cached(tenant="a") == 0
    assert cached(tenant="a") == 12
    assert cached(tenant="b") == 0  # another tenant's identical prompt is not a hit
    assert cached(tenant="a", cache_salt="user-1") == 0
    assert cached(tenant="a", cache_salt="user-1") == 12
    assert cached(tenant="a", cache_salt="user-2") == 0
    assert cached(tenant="a", share_cache=True) == 0
    assert cached(tenant="b", share_cache=True) == 12  # shared on purpose (public adapters)


def test_caching_off_keeps_nothing(tiny_model_dir):
    llm = LLM(
        str(tiny_model_dir("llama")),
        dtype="float32",
        block_size=BS,
        num_kv_blocks=64,
        enable_prefix_caching=False,
    )
    prompt = list(range(70, 83))
    outs = [llm.generate([prompt], SamplingParams(max_new_tokens=2))[0] for _ in range(2)]
    assert [o.num_cached_tokens for o in outs] == [0, 0]
    assert llm.engine.allocator.num_used == 0


class _Req:
    def __init__(self, blocks, computed, prefix_tokens=0, prefix=None):
        self.block_ids, self.num_computed_tokens = blocks, computed
        self.num_prefix_tokens, self.prefix = prefix_tokens, prefix


@pytest.mark.parametrize(
    "requests, runs",
    [
        # Two share three computed blocks, a third shares one; a fourth shares nothing.
        (
            [_Req([1, 2, 3, 9], 14), _Req([1, 2, 3, 8], 13), _Req([1, 5], 6), _Req([7], 3)],
            [3, 3, 1, 0],
        ),
        # Only blocks computed before the step count.
        ([_Req([1, 2, 3], 8), _Req([1, 2, 4], 5)], [1, 1]),
        # Behind an adapter prefix off a block edge, nothing is shared as a run.
        ([_Req([1, 2], 8, 5, "p"), _Req([1, 2], 8, 5, "p")], [0, 0]),
        # Behind one on a block edge it is; behind different prefixes it is not.
        ([_Req([1, 2], 8, 8, "p"), _Req([1, 2], 8, 8, "p"), _Req([1, 2], 8, 8, "q")], [2, 2, 0]),
    ],
)
def test_shared_runs(requests, runs):
    assert shared_runs(requests, BS) == runs


def test_requests_of_one_step_share_the_blocks_it_writes(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    prompt = list(range(30, 47))  # 17 tokens: four full blocks, then the last token's
    llm = LLM(path, dtype="float32", block_size=BS, num_kv_blocks=64)
    outs = llm.generate([prompt, prompt, [*prompt, 9]], params)  # admitted in one step
    assert [o.num_cached_tokens for o in outs] == [0, 16, 16]
    alone = LLM(path, dtype="float32", block_size=BS, enable_prefix_caching=False)
    expected = alone.generate([prompt, [*prompt, 9]], params)
    assert [o.token_ids for o in outs] == [expected[0].token_ids] * 2 + [expected[1].token_ids]


def test_a_failed_step_leaves_no_cached_block(tiny_model_dir, monkeypatch):
    from prefixserve.engine import StepError

    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", block_size=BS, num_kv_blocks=64)
    engine = llm.engine
    prompt = list(range(30, 47))
    params = SamplingParams(max_new_tokens=2, ignore_eos=True)
    for _ in range(2):
        engine.add_request(prompt, params)

    def broken(scheduled):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine.runner, "execute", broken)
    with pytest.raises(StepError):
        engine.step()
    assert engine.block_cache.num_cached == 0 and engine.allocator.num_used == 0
    monkeypatch.undo()
    assert llm.generate([prompt], params)[0].num_cached_tokens == 0
