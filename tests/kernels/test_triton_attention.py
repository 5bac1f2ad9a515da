"""Triton prefill, decode and grouped decode against the fp32 per-request oracle.

Cases are pairwise over dtype, head_dim, GQA ratio, prefix lengths, adapter mix, block size,
batch size and kernel-specific knobs (all pairs of values appear; far fewer than the product).
"""

import pytest
import torch

from prefixserve.kernels.triton_attention import plan_step, prefix_paged_attention

from kernel_cases import assert_matches_oracle, pairwise, random_step
from scenarios import make_scenario, poison_unreadable

PREFIXES = {  # prefix table per case: lengths 0, 1, 17, 100+ and non-multiples of block sizes
    "p0": [0, 0],
    "p1": [1, 3],
    "p17": [17, 5],
    "p130": [130, 41],
    "mixed": [1, 17, 103],
}
HEADS = {1: (2, 2), 3: (6, 2), 4: (8, 2), 8: (8, 1)}  # GQA ratio -> (query heads, kv heads)
COMMON = {
    "dtype": [torch.float32, torch.float16, torch.bfloat16],
    "head_dim": [16, 24, 32, 64, 128],  # 24: not a power of two (tiny qwen3 in the engine tests)
    "gqa": [1, 3, 4, 8],
    "prefix": list(PREFIXES),
    "mix": ["distinct", "zipf", "identical", "half_none"],
    "block_size": [1, 4, 16, 32],
}
DECODE_CASES = pairwise(
    {**COMMON, "batch": [1, 5, 13], "mode": ["plain", "grouped", "auto"], "splits": [1, 3, None]}
)
PREFILL_CASES = pairwise({**COMMON, "batch": [1, 3, 7], "kind": ["prefill", "chunked", "mixed"]})


def _case_id(case: dict) -> str:
    return "-".join(str(v).replace("torch.", "") for v in case.values())


def _run(case: dict, kind: str, device: str, **plan_kwargs):
    hq, hkv = HEADS[case["gqa"]]
    sc = random_step(
        kind,
        case["batch"],
        PREFIXES[case["prefix"]],
        case["mix"],
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=case["head_dim"],
        block_size=case["block_size"],
        dtype=case["dtype"],
        device=device,
        seed=len(_case_id(case)),
    )
    plan = plan_step(
        sc.meta,
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=case["head_dim"],
        dtype=case["dtype"],
        **plan_kwargs,
    )
    out = prefix_paged_attention(sc.query, sc.k_cache, sc.v_cache, plan, sc.scale)
    return out, sc, plan


@pytest.mark.parametrize("case", DECODE_CASES, ids=_case_id)
def test_decode_matches_oracle(case, device):
    out, sc, plan = _run(
        case, "decode", device, decode_mode=case["mode"], num_splits=case["splits"]
    )
    if case["mode"] != "auto":
        assert plan.mode == ("decode" if case["mode"] == "plain" else "grouped")
    assert_matches_oracle(out, sc)


@pytest.mark.parametrize("case", PREFILL_CASES, ids=_case_id)
def test_prefill_matches_oracle(case, device):
    out, sc, plan = _run(case, case["kind"], device)
    assert plan.mode == "prefill" or sc.meta.max_q_len == 1
    assert_matches_oracle(out, sc)


def test_one_step_plan_serves_every_layer(device):
    """One plan, several layers (different caches): the plan holds nothing layer-specific."""
    case = {
        "dtype": torch.float32,
        "head_dim": 32,
        "gqa": 4,
        "prefix": "p130",
        "mix": "identical",
        "block_size": 16,
        "batch": 6,
    }
    out, sc, plan = _run(case, "decode", device, decode_mode="grouped", num_splits=2)
    assert_matches_oracle(out, sc)
    sc.k_cache.normal_()
    sc.v_cache.normal_()
    assert_matches_oracle(
        prefix_paged_attention(sc.query, sc.k_cache, sc.v_cache, plan, sc.scale), sc
    )


def test_metadata_entry_point_and_long_split_decode(device):
    """Unplanned call (metadata in, auto dispatch) on a long context that gets KV splits."""
    sc = random_step(
        "decode",
        1,
        [700],
        "identical",
        num_q_heads=4,
        num_kv_heads=1,
        head_dim=32,
        block_size=16,
        device=device,
        max_own=400,
    )
    plan = plan_step(sc.meta, num_q_heads=4, num_kv_heads=1, head_dim=32, dtype=sc.query.dtype)
    assert plan.decode_splits > 1
    assert_matches_oracle(
        prefix_paged_attention(sc.query, sc.k_cache, sc.v_cache, sc.meta, sc.scale), sc
    )


@pytest.mark.parametrize("poison", [float("nan"), 3e38])
@pytest.mark.parametrize(
    ("kind", "mode"), [("decode", "plain"), ("decode", "grouped"), ("chunked", "auto")]
)
def test_unreadable_slots_never_reach_an_output(kind, mode, poison, device):
    """Tenant isolation: NaN or huge values in every slot no request may read (free blocks,
    other adapters' data, unwritten block tails, block 0 where padding points) change nothing."""
    sc = make_scenario(
        [1, 1, 1, 1] if kind == "decode" else [3, 1, 6, 2],
        [9, 2, 23, 6],
        [0, -1, 1, 0],
        [5, 19],
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=16,
        block_size=4,
        spare_first_block=True,
    )
    poison_unreadable(sc, poison)
    sc = sc.to(device)
    plan = plan_step(
        sc.meta, num_q_heads=4, num_kv_heads=2, head_dim=16, dtype=sc.query.dtype, decode_mode=mode
    )
    assert_matches_oracle(
        prefix_paged_attention(sc.query, sc.k_cache, sc.v_cache, plan, sc.scale), sc
    )


def test_rejects_mismatched_inputs(device):
    sc = random_step(
        "decode",
        3,
        [5],
        "identical",
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=16,
        block_size=4,
        device=device,
    )
    plan = plan_step(sc.meta, num_q_heads=4, num_kv_heads=2, head_dim=16, dtype=sc.query.dtype)
    q, k, v = sc.query, sc.k_cache, sc.v_cache
    with pytest.raises(ValueError, match="dtype"):
        prefix_paged_attention(q.half(), k, v, plan, sc.scale)
    with pytest.raises(ValueError, match="must match"):
        prefix_paged_attention(q, k, v.half(), plan, sc.scale)
    with pytest.raises(ValueError, match="block_size"):
        prefix_paged_attention(q, k.view(-1, 2, 2, 16), v.view(-1, 2, 2, 16), plan, sc.scale)
    with pytest.raises(ValueError, match="multiple"):
        prefix_paged_attention(q[:, :3], k, v, plan, sc.scale)
    with pytest.raises(ValueError, match="tokens"):
        prefix_paged_attention(q[:2], k, v, plan, sc.scale)
    plan.meta.own_lens = plan.meta.own_lens.long()
    with pytest.raises(ValueError, match="own_lens"):
        prefix_paged_attention(q, k, v, plan, sc.scale)


GPU_SHAPES = [  # (kind, batch, prefix lens, mix, dtype, block_size, decode mode)
    ("decode", 133, [1000, 3000, 17, 4096], "zipf", torch.bfloat16, 16, "auto"),
    ("decode", 64, [2048], "identical", torch.float16, 32, "grouped"),
    ("decode", 64, [2048], "identical", torch.float16, 32, "plain"),
    ("decode", 3, [8192, 100], "distinct", torch.bfloat16, 16, "auto"),
    ("decode", 40, [777, 1500], "half_none", torch.float32, 16, "grouped"),
    ("chunked", 9, [1000, 2000, 33], "zipf", torch.bfloat16, 16, "auto"),
    ("mixed", 17, [513], "half_none", torch.float16, 32, "auto"),
    ("prefill", 4, [0], "none", torch.float32, 16, "auto"),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("gqa", "head_dim"), [(4, 128), (8, 64), (1, 128)])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"{s[0]}-{s[1]}-{s[3]}-{s[6]}")
def test_realistic_shapes_on_gpu(shape, gqa, head_dim):
    kind, batch, prefix_lens, mix, dtype, block_size, mode = shape
    hkv = 8 if gqa < 8 else 4
    sc = random_step(
        kind,
        batch,
        prefix_lens,
        mix,
        num_q_heads=hkv * gqa,
        num_kv_heads=hkv,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        device="cuda",
        max_own=600 if kind != "decode" else 1000,
    )
    plan = plan_step(
        sc.meta,
        num_q_heads=hkv * gqa,
        num_kv_heads=hkv,
        head_dim=head_dim,
        dtype=dtype,
        decode_mode=mode,
    )
    assert_matches_oracle(
        prefix_paged_attention(sc.query, sc.k_cache, sc.v_cache, plan, sc.scale), sc
    )
