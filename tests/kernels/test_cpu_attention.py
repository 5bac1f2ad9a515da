"""The native CPU attention op against the fp32 per-request oracle.

Cases are pairwise over dtype, head_dim, GQA ratio, prefix lengths, adapter mix, block size,
batch size, step kind and prefix mode (all pairs of values appear). Also: isolation from
poisoned slots, every instruction set this CPU runs, no copy of a shared prefix, the plan's
dispatch rule, input validation and ``torch.compile``.
"""

from pathlib import Path

import pytest
import torch

from prefixserve.config import cache_root, env_cpu_isa
from prefixserve.kernels import cpu_attention
from prefixserve.kernels.cpu_isa import cpu_isas, default_isa
from prefixserve.kernels.cpu_plan import GROUPED_PREFIX, READ_PREFIX, plan_cpu_step
from prefixserve.kernels.reference import (
    naive_prefix_attention,
    paged_prefix_attention_from_metadata,
)

from kernel_cases import assert_matches_oracle, pairwise, random_step
from scenarios import adapter_mix, make_scenario, poison_unreadable

PREFIXES = {  # prefix table per case: lengths 0, 1, odd, non-multiples of the block, > 1k
    "p0": [0, 0],
    "p1": [1, 3],
    "p17": [17, 5],
    "p37": [37, 100],
    "p1100": [1100, 41],
}
HEADS = {1: (2, 2), 3: (6, 2), 4: (8, 2), 8: (8, 1)}  # GQA ratio -> (query heads, kv heads)
CASES = pairwise(
    {
        "dtype": [torch.float32, torch.bfloat16, torch.float16],
        "head_dim": [24, 40, 64, 128],
        "gqa": [1, 3, 4, 8],
        "prefix": list(PREFIXES),
        "mix": ["distinct", "zipf", "identical", "none", "half_none"],
        "block_size": [1, 16, 32],
        "batch": [1, 5, 13],
        "kind": ["decode", "chunked", "mixed"],
        "mode": ["plain", "grouped", "auto"],
    }
)


cpu_attention.load(cache_root())  # builds once per machine (cached); cpu_isas() below needs it


def _case_id(case: dict) -> str:
    return "-".join(str(v).replace("torch.", "") for v in case.values())


def _attend(sc, isa: str | None = None, mode: str = "auto") -> torch.Tensor:
    plan = plan_cpu_step(sc.meta, isa or default_isa(), prefix_mode=mode)
    return cpu_attention.paged_prefix_attention(sc.query, sc.k_cache, sc.v_cache, plan, sc.scale)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_op_matches_oracle(case):
    hq, hkv = HEADS[case["gqa"]]
    sc = random_step(
        case["kind"],
        case["batch"],
        PREFIXES[case["prefix"]],
        case["mix"],
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=case["head_dim"],
        block_size=case["block_size"],
        dtype=case["dtype"],
        seed=len(_case_id(case)),
    )
    assert_matches_oracle(_attend(sc, mode=case["mode"]), sc)


def test_long_prefill_chunk_over_prefix_and_earlier_chunks():
    """Several query tiles per request, causal across tile edges, after earlier chunks."""
    sc = make_scenario(
        [70, 1, 33],
        [150, 40, 33],
        [0, 0, -1],
        [45],
        num_q_heads=6,
        num_kv_heads=2,
        head_dim=32,
        block_size=16,
    )
    for mode in ("plain", "grouped"):
        assert_matches_oracle(_attend(sc, mode=mode), sc)


@pytest.mark.parametrize("mode", ["plain", "grouped"])
@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 3e38])
@pytest.mark.parametrize(
    ("q_lens", "own_lens"),
    [([1] * 5, [5, 17, 1, 33, 16]), ([7, 1, 20], [7, 1, 20]), ([4, 9, 1], [20, 9, 40])],
    ids=["decode", "prefill", "chunked"],
)
def test_unreadable_slots_never_reach_an_output(q_lens, own_lens, poison, mode):
    """Tenant isolation: whatever sits in slots a request may not read (free blocks, other
    requests' and adapters' blocks, the unwritten tails of partly filled blocks, block 0 where
    padded table entries point) leaves its output unchanged."""
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
    torch.testing.assert_close(_attend(sc, mode=mode), want, atol=2e-5, rtol=2e-5)


def test_every_instruction_set_of_this_cpu(monkeypatch):
    """Each ISA build (at least the baseline, and AVX2 / AVX-512 where the CPU has them) equals
    the oracle; $PREFIXSERVE_CPU_ISA forces a lower one and rejects what the CPU lacks."""
    isas = cpu_isas()
    assert isas[-1] == "baseline"
    for kind, mode in [("decode", "grouped"), ("mixed", "plain")]:
        for dtype in (torch.float32, torch.bfloat16):
            sc = random_step(
                kind,
                7,
                [19, 40],
                "zipf",
                num_q_heads=8,
                num_kv_heads=2,
                head_dim=40,
                block_size=16,
                dtype=dtype,
            )
            for isa in isas:
                assert_matches_oracle(_attend(sc, isa, mode), sc)
    assert default_isa("baseline") == "baseline"
    with pytest.raises(ValueError, match="PREFIXSERVE_CPU_ISA='avx1024'"):
        default_isa("avx1024")
    monkeypatch.setenv("PREFIXSERVE_CPU_ISA", "baseline")
    assert default_isa(env_cpu_isa()) == "baseline"


def _peak_rss_growth(fn) -> int:
    """Bytes by which this process's peak resident set grows while ``fn`` runs (Linux)."""

    def high_water() -> int:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) * 1024

    Path("/proc/self/clear_refs").write_text("5")  # peak := current
    before = high_water()
    fn()
    return high_water() - before


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_shared_prefix_is_read_in_place():
    """64 decodes on one 4k-token prefix: the op's peak memory stays within its output and
    partial state (< 4 MiB here), while the reference's gather copies the prefix per request
    (> 100 MiB)."""
    sc = make_scenario(
        [1] * 64,
        [64] * 64,
        [0] * 64,
        [4096],
        num_q_heads=9,
        num_kv_heads=3,
        head_dim=64,
        block_size=16,
    )
    prefix_bytes = 2 * 4096 * 3 * 64 * 4  # K and V of the prefix, one layer
    op = _peak_rss_growth(lambda: _attend(sc))
    ref = _peak_rss_growth(
        lambda: paged_prefix_attention_from_metadata(
            sc.query, sc.k_cache, sc.v_cache, sc.meta, sc.scale
        )
    )
    assert op < 4 << 20, f"the op grew the peak RSS by {op / 2**20:.1f} MiB"
    assert ref > 32 * prefix_bytes, "the measurement no longer sees the reference's gather"


def test_dispatch_rule_groups_shared_prefixes():
    """64 decodes on one prefix read it once per prefix tile; a prefix used by one decode is
    read by that request's own tile."""
    sc = make_scenario(
        [1] * 65,
        [30] * 65,
        [0] * 64 + [1],
        [512, 512],
        num_q_heads=9,
        num_kv_heads=3,
        head_dim=64,
        block_size=16,
    )
    plan = plan_cpu_step(sc.meta, "baseline", num_threads=2)
    modes = plan.query_tiles[:, 3][plan.query_tiles[:, 0].argsort()]
    assert modes[:64].eq(GROUPED_PREFIX).all() and modes[64] == READ_PREFIX
    assert plan.stats["grouped_prefixes"] == 1 and plan.stats["prefix_tiles"] == 2
    assert plan.stats["prefix_keys"] == 3 * 512 < plan.stats["plain_prefix_keys"] == 65 * 512


def test_one_plan_serves_every_layer():
    sc = random_step(
        "decode", 6, [130], "identical", num_q_heads=8, num_kv_heads=2, head_dim=32, block_size=16
    )
    plan = plan_cpu_step(sc.meta, default_isa(), prefix_mode="grouped")
    for _ in range(2):
        out = cpu_attention.paged_prefix_attention(sc.query, sc.k_cache, sc.v_cache, plan, sc.scale)
        assert_matches_oracle(out, sc)
        sc.k_cache.normal_()
        sc.v_cache.normal_()


@pytest.mark.parametrize(
    ("field", "row", "value", "message"),
    [
        ("block_tables", 0, 10_000, "lists block"),
        ("own_lens", 1, 10_000, "block table holds"),
        ("prefix_lens", 0, 10_000, "block table holds"),
        ("prefix_index", 2, 7, "prefix_index"),
    ],
)
def test_bad_metadata_is_refused(field, row, value, message):
    """Indices the kernel would follow are checked first: no input reads outside the pool."""
    sc = make_scenario(
        [1, 1, 1],
        [5, 9, 3],
        [0, -1, 0],
        [17],
        num_q_heads=4,
        num_kv_heads=2,
        head_dim=16,
        block_size=4,
    )
    plan = plan_cpu_step(sc.meta, "baseline")
    getattr(sc.meta, field).view(-1)[row] = value
    with pytest.raises(RuntimeError, match=message):
        cpu_attention.paged_prefix_attention(sc.query, sc.k_cache, sc.v_cache, plan, sc.scale)


def test_plan_that_skips_a_token_is_refused():
    sc = make_scenario(
        [2, 1], [5, 9], [-1, -1], [], num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=4
    )
    plan = plan_cpu_step(sc.meta, "baseline")
    plan.query_tiles = plan.query_tiles[plan.query_tiles[:, 0] == 1]
    with pytest.raises(RuntimeError, match="exactly one"):
        cpu_attention.paged_prefix_attention(sc.query, sc.k_cache, sc.v_cache, plan, sc.scale)


def test_op_is_opaque_to_torch_compile():
    """A fake implementation gives the op's output shape: a compiled graph can contain it."""
    sc = random_step(
        "mixed", 3, [9], "identical", num_q_heads=4, num_kv_heads=2, head_dim=16, block_size=4
    )
    plan = plan_cpu_step(sc.meta, default_isa(), prefix_mode="grouped")
    meta = plan.meta
    args = (
        sc.query,
        sc.k_cache,
        sc.v_cache,
        meta.cu_q_lens,
        meta.own_lens,
        meta.block_tables,
        meta.prefix_index,
        meta.prefix_lens,
        meta.prefix_block_tables,
        plan.query_tiles,
        plan.prefix_tiles,
        plan.prefix_tokens,
        sc.scale,
        plan.isa,
    )
    op = torch.ops.prefixserve.paged_prefix_attention.default
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))

    @torch.compile(backend="aot_eager", fullgraph=True)
    def layer(query: torch.Tensor) -> torch.Tensor:
        return cpu_attention.paged_prefix_attention(
            query * 2, sc.k_cache, sc.v_cache, plan, sc.scale
        ).relu()

    want = cpu_attention.paged_prefix_attention(
        sc.query * 2, sc.k_cache, sc.v_cache, plan, sc.scale
    ).relu()
    torch.testing.assert_close(layer(sc.query), want)


def test_one_native_library_per_process(tmp_path):
    """A later load from another cache directory returns the loaded library instead of
    building and registering the same ops a second time."""
    from prefixserve.kernels.cpu_build import load_cpu_ops

    first = load_cpu_ops(cache_root())
    assert load_cpu_ops(tmp_path / "elsewhere") == first
    assert not (tmp_path / "elsewhere").exists()


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("kind", ["decode", "chunked", "mixed"])
@pytest.mark.parametrize("gqa", [1, 3, 8])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bf16_within_one_rounding_of_float64(isa, kind, gqa, head_dim):
    """bf16 queries and caches against the same attention in float64 of the same bf16 values:
    fp32 accumulation leaves the output within one bf16 ulp (2^-8 of its magnitude, plus 1e-3
    near 0). On avx512_bf16, tiles of up to 8 rows (decodes: GQA 1 to 8) run row by row
    (vdpbf16ps on the bf16 K rows); larger tiles and other ISAs widen K/V to fp32."""
    hq, hkv = HEADS[gqa]
    sc = random_step(
        kind,
        6,
        [37, 100],
        "zipf",
        num_q_heads=hq,
        num_kv_heads=hkv,
        head_dim=head_dim,
        block_size=16,
        dtype=torch.bfloat16,
        seed=head_dim + gqa,
    )
    want = naive_prefix_attention(
        sc.query, sc.k_cache, sc.v_cache, sc.meta, sc.scale, compute_dtype=torch.float64
    )
    for mode in ("plain", "grouped"):
        got = _attend(sc, isa, mode).double()
        excess = (got - want).abs() - (want.abs() * 2**-8 + 1e-3)
        assert excess.max().item() <= 0, f"{mode}: {excess.max().item():.3g} over the bound"


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 3e38])
@pytest.mark.parametrize("mode", ["plain", "grouped"])
def test_bf16_row_by_row_tiles_read_only_their_slots(poison, mode):
    """The row-by-row bf16 decode tiles (head_dim 64, GQA 3) against poisoned unreadable slots:
    partial chunks of 16 keys, partly filled blocks and padded table entries included."""
    sc = make_scenario(
        [1] * 5,
        [5, 17, 1, 33, 16],
        adapter_mix("half_none", 5, 3, seed=1),
        [1, 17, 5],
        num_q_heads=6,
        num_kv_heads=2,
        head_dim=64,
        block_size=4,
        dtype=torch.bfloat16,
        spare_first_block=True,
    )
    want = _attend(sc, mode=mode)
    poison_unreadable(sc, poison)
    assert torch.equal(_attend(sc, mode=mode), want)
    assert_matches_oracle(want, sc)
