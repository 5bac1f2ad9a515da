"""Decode plans in persistent buffers (what CUDA graphs replay), under the Triton interpreter on
CPU and for real on a GPU: one plan, filled by step after step of different sizes and mixes,
padded to its graph's size, gives the oracle's outputs, writes K/V only where the step's
requests own slots, and keeps the grid it was built with."""

from __future__ import annotations

import random

import pytest
import torch

from prefixserve.kernels.triton_attention import launch_write_kv, run_planned
from prefixserve.kernels.triton_graph import GRAPH_MODES, GraphPlans

from kernel_cases import assert_matches_oracle
from scenarios import adapter_mix, make_scenario, poison_unreadable

pytest.importorskip("triton")

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]
HQ, HKV, D, BS = 8, 2, 32, 4
MAX_LEN = 160


def _steps(seed: int) -> list[tuple[int, str, list[int]]]:
    """(batch, mix, prefix lens) of steps that one graph of size 8 serves in turn."""
    rng = random.Random(seed)
    return [
        (8, "zipf", [37, 5, 64]),
        (3, "identical", [120]),
        (1, "none", []),
        (6, "half_none", [9, 33]),
        (5, "distinct", [17, 2, 50, 7, 90]),
        (rng.randint(1, 8), "zipf", [rng.randint(1, 100) for _ in range(3)]),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", GRAPH_MODES)
def test_one_plan_serves_steps_of_every_size_and_mix(mode, device):
    plans = GraphPlans(
        HQ,
        HKV,
        D,
        dtype=torch.float32,
        max_batch=8,
        max_model_len=MAX_LEN,
        block_size=BS,
        device=device,
        decode_mode="grouped" if mode == "grouped" else "plain",
    )
    plan = plans.plan(8, mode)
    grid = (plan.meta.own_lens.data_ptr(), plan.decode_splits, plan.workspace is not None)
    for i, (batch, mix, prefix_lens) in enumerate(_steps(seed=3)):
        own = [random.Random(i * 100 + b).randint(1, 40) for b in range(batch)]
        sc = make_scenario(
            [1] * batch,
            own,
            adapter_mix(mix, batch, len(prefix_lens), seed=i),
            prefix_lens,
            num_q_heads=HQ,
            num_kv_heads=HKV,
            head_dim=D,
            block_size=BS,
            seed=i,
            spare_first_block=True,
        )
        poison_unreadable(sc, float("nan"))  # padding rows read block 0: NaN must stay there
        choice = plans.choose(sc.meta)
        assert choice is not None and choice.grouped == (mode == "grouped")
        plans.fill(plan, sc.meta, choice)
        pad = 8 - batch
        query = torch.cat([sc.query, torch.zeros(pad, HQ, D)]).to(device)
        key = torch.cat([sc.key, torch.full((pad, HKV, D), 7.0)]).to(device)
        value = torch.cat([sc.value, torch.full((pad, HKV, D), 7.0)]).to(device)
        k_cache, v_cache = sc.k_cache.to(device), sc.v_cache.to(device)
        before = k_cache.clone()
        launch_write_kv(key, value, k_cache, v_cache, plan.meta.slot_mapping)
        # Padding wrote nothing: the cache is as it was (the step's own K/V were in it already).
        torch.testing.assert_close(k_cache, before, equal_nan=True)
        out = run_planned(query, k_cache, v_cache, plan, sc.scale)
        assert out.shape == (8, HQ, D)
        assert_matches_oracle(out[:batch].cpu(), sc)
    # The buffers the graph was captured with are the ones every step used.
    assert grid == (plan.meta.own_lens.data_ptr(), plan.decode_splits, plan.workspace is not None)


def test_steps_no_graph_can_run_are_refused():
    plans = GraphPlans(
        HQ,
        HKV,
        D,
        dtype=torch.float32,
        max_batch=4,
        max_model_len=MAX_LEN,
        block_size=BS,
        device="cpu",
    )

    def scenario(q_lens, own, prefix_lens=()):
        return make_scenario(
            q_lens,
            own,
            [-1] * len(q_lens),
            list(prefix_lens),
            num_q_heads=HQ,
            num_kv_heads=HKV,
            head_dim=D,
            block_size=BS,
        ).meta

    assert plans.choose(scenario([1, 1], [3, 9])) is not None
    assert plans.choose(scenario([2, 1], [3, 9])) is None  # a prefill chunk
    assert plans.choose(scenario([1] * 5, [3] * 5)) is None  # over the largest graph
    assert plans.choose(scenario([1], [MAX_LEN + BS])) is None  # a table wider than the graph's
    with pytest.raises(ValueError, match="does not fit"):
        plans.fill(
            plans.plan(1, "decode"),
            scenario([1, 1], [3, 9]),
            plans.choose(scenario([1, 1], [3, 9])),
        )
