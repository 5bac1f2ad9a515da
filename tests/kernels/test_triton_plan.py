"""Per-step planning: the decode dispatch rule, KV splits and work lists (no kernel launches)."""

import pytest
import torch

from prefixserve.kernels.triton_plan import DispatchRule, num_splits_for, plan_step

from scenarios import make_scenario


def _decode_meta(batch, own, prefix_index, prefix_lens, block_size=16):
    sc = make_scenario(
        [1] * batch,
        own,
        prefix_index,
        prefix_lens,
        num_q_heads=8,
        num_kv_heads=2,
        head_dim=16,
        block_size=block_size,
    )
    return sc.meta


def _plan(meta, **kw):
    return plan_step(meta, num_q_heads=8, num_kv_heads=2, head_dim=16, dtype=torch.float32, **kw)


def test_shared_long_prefix_is_grouped_and_distinct_is_plain():
    shared = _plan(_decode_meta(16, [8] * 16, [0] * 16, [2000]))
    assert shared.mode == "grouped"
    assert shared.stats["grouped_tokens"] < shared.stats["plain_tokens"] / 4
    distinct = _plan(_decode_meta(4, [8] * 4, [0, 1, 2, 3], [2000] * 4))
    assert distinct.mode == "decode"
    assert distinct.stats["grouped_tokens"] == distinct.stats["plain_tokens"]


def test_small_savings_stay_plain():
    tiny = _plan(_decode_meta(4, [8] * 4, [0] * 4, [40]))  # saves 120 tokens: not worth a launch
    assert tiny.mode == "decode"
    assert (
        _plan(_decode_meta(4, [8] * 4, [0] * 4, [40]), rule=DispatchRule(min_saved_tokens=0)).mode
        == "grouped"
    )


def test_grouped_work_list_sorts_requests_by_prefix_and_tiles_rows():
    meta = _decode_meta(7, [3] * 7, [1, -1, 0, 1, 1, 0, -1], [5, 9])
    plan = _plan(meta, decode_mode="grouped")
    work = plan.grouped
    ids = meta.prefix_index[work.sorted_reqs.long()]
    assert ids.tolist() == sorted(ids.tolist()) and -1 not in ids.tolist()
    for begin, end, prefix in zip(
        work.tile_begin.tolist(), work.tile_end.tolist(), work.tile_prefix.tolist(), strict=True
    ):
        assert 0 < end - begin <= work.tiles.block_m // 4
        assert set(meta.prefix_index[work.sorted_reqs[begin:end].long()].tolist()) == {prefix}
    assert (
        sum(e - b for b, e in zip(work.tile_begin.tolist(), work.tile_end.tolist(), strict=True))
        == 5
    )
    assert plan.workspace[0].shape == (7, 8, work.prefix_splits + work.own_splits, 16)


def test_prefill_tiles_cover_every_query_once_longest_first():
    sc = make_scenario(
        [5, 1, 40],
        [9, 30, 40],
        [0, -1, 0],
        [70],
        num_q_heads=8,
        num_kv_heads=2,
        head_dim=16,
        block_size=4,
    )
    plan = _plan(sc.meta)
    work = plan.prefill
    block_q = work.tiles.block_m // 4
    covered = sorted(
        (r, q)
        for r, q0 in zip(work.tile_req.tolist(), work.tile_q0.tolist(), strict=True)
        for q in range(q0, min(q0 + block_q, [5, 1, 40][r]))
    )
    assert covered == sorted((r, q) for r, n in enumerate([5, 1, 40]) for q in range(n))
    assert work.tile_req[0].item() == 2  # request 2 sees the most keys


def test_split_rule():
    rule = DispatchRule()
    assert num_splits_for(programs=1024, max_len=32768, sms=132, rule=rule) == 1  # fills the GPU
    assert num_splits_for(programs=8, max_len=200, sms=132, rule=rule) == 1  # too short
    assert num_splits_for(programs=8, max_len=32768, sms=132, rule=rule) == 32
    assert num_splits_for(programs=8, max_len=1024, sms=132, rule=rule) == 4


def test_plan_rejects_bad_arguments():
    meta = _decode_meta(2, [3, 3], [0, 0], [5])
    with pytest.raises(ValueError, match="multiple"):
        plan_step(meta, num_q_heads=6, num_kv_heads=4, head_dim=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="decode_mode"):
        _plan(meta, decode_mode="cascade")
    meta.own_lens = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="q_len"):
        _plan(meta)


def test_plan_without_shapes_completes_at_the_first_layer(device):
    from prefixserve.kernels.triton_attention import prefix_paged_attention

    from kernel_cases import assert_matches_oracle, random_step

    sc = random_step(
        "chunked",
        3,
        [19],
        "identical",
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=16,
        block_size=4,
        device=device,
    )
    plan = plan_step(sc.meta)  # what the engine's backend does: no model shapes yet
    assert not plan.specialized
    out = prefix_paged_attention(sc.query, sc.k_cache, sc.v_cache, plan, sc.scale)
    assert plan.specialized and plan.mode == "prefill"
    assert_matches_oracle(out, sc)
    with pytest.raises(ValueError, match="plan is for"):
        prefix_paged_attention(sc.query, sc.k_cache[:, :, :1], sc.v_cache[:, :, :1], plan, sc.scale)
