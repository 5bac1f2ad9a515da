"""The vectorized PyTorch reference (the torch backend) against the plain per-request loop."""

import pytest
import torch

from prefixserve.kernels.reference import (
    naive_prefix_attention,
    paged_prefix_attention_from_metadata,
)

from scenarios import adapter_mix, make_scenario, poison_unreadable

CASES = {
    "decode": ([1, 1, 1, 1, 1], [5, 17, 1, 33, 16]),
    "prefill": ([7, 1, 20], [7, 1, 20]),
    "chunked": ([4, 9, 1], [20, 9, 40]),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mix", ["none", "distinct", "zipf", "identical", "half_none"])
@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_reference_matches_loop(case, mix, hq, hkv, block_size):
    q_lens, own_lens = CASES[case]
    prefix_lens = [1, 17, 5]
    ids = adapter_mix(mix, len(q_lens), len(prefix_lens), seed=3)
    sc = make_scenario(
        q_lens,
        own_lens,
        ids,
        prefix_lens,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=16,
        block_size=block_size,
    )
    got = paged_prefix_attention_from_metadata(sc.query, sc.k_cache, sc.v_cache, sc.meta, sc.scale)
    want = naive_prefix_attention(sc.query, sc.k_cache, sc.v_cache, sc.meta, sc.scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 3e38])
@pytest.mark.parametrize("case", list(CASES))
def test_unreadable_slots_never_reach_an_output(case, poison):
    """Tenant isolation: whatever sits in blocks a request may not read (another adapter's huge
    keys, a freed block's stale data, NaN) leaves its output unchanged. Requests of different
    KV lengths share a padded group here, so padding is exercised."""
    q_lens, own_lens = CASES[case]
    sc = make_scenario(
        q_lens,
        own_lens,
        adapter_mix("half_none", len(q_lens), 3, seed=1),
        [1, 17, 5],
        num_q_heads=6,
        num_kv_heads=2,
        head_dim=16,
        block_size=4,
        spare_first_block=True,
    )
    want = naive_prefix_attention(sc.query, sc.k_cache, sc.v_cache, sc.meta, sc.scale)
    poison_unreadable(sc, poison)
    got = paged_prefix_attention_from_metadata(sc.query, sc.k_cache, sc.v_cache, sc.meta, sc.scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
