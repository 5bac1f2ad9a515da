"""Fair share between tenants in the scheduler alone (no model): weighted service of backlogged
tenants, a late tenant served at once without a burst, one tenant scheduled exactly as with one
FIFO queue, preemption for a tenant under its share of slots or blocks (and never within the
minimum run), priorities within a tenant. The engine-level checks (outputs of preempted requests,
a real server) are in test_fairness and test_server_fairness."""

from __future__ import annotations

import random

import pytest
from test_scheduler_unit import make, request

from prefixserve.request import FinishReason
from prefixserve.sampling_params import SamplingParams


def _request(rid: str, tenant: str, prompt: int, new: int, weight: float = 1.0, priority: int = 0):
    r = request(rid, prompt, tenant)
    r.params = SamplingParams(max_new_tokens=new)
    r.tenant_weight, r.priority = weight, priority
    return r


def _step(scheduler):
    """One step as the engine runs it: schedule, apply, append a token to every request that
    computed all its tokens, finish those at their length. Returns (output, finished)."""
    out = scheduler.schedule()
    scheduler.update(out)
    finished = []
    for r in out.requests:
        if r.num_computed_tokens == r.num_tokens:
            r.token_ids.append(0)
            if r.num_output_tokens >= r.params.max_new_tokens:
                scheduler.finish(r, FinishReason.LENGTH)
                finished.append(r)
    return out, finished


@pytest.mark.parametrize(
    "weights",
    [{"a": 1, "b": 1}, {"a": 2, "b": 1}, {"a": 1, "b": 1, "c": 1}, {"a": 2, "b": 1, "c": 1}],
)
def test_backlogged_tenants_are_served_in_proportion_to_their_weights(weights):
    scheduler, _, _ = make(blocks=4096, max_num_seqs=8, max_num_batched_tokens=64)
    ids = iter(range(10**6))

    def submit(tenant: str) -> None:
        scheduler.add(_request(f"{tenant}{next(ids)}", tenant, 12, 20, weights[tenant]))

    for tenant in weights:
        for _ in range(16):
            submit(tenant)
    start = {t: 0 for t in weights}
    for step in range(1000):
        if step == 100:  # past the first admissions
            start = {t: scheduler.fair.accounts[t].tokens for t in weights}
        _, finished = _step(scheduler)
        for r in finished:  # always backlogged
            submit(r.tenant)
    served = {t: scheduler.fair.accounts[t].tokens - start[t] for t in weights}
    total, weight = sum(served.values()), sum(weights.values())
    for tenant, w in weights.items():
        assert served[tenant] / total == pytest.approx(w / weight, rel=0.10), served


def test_a_late_tenant_is_served_at_once_without_a_burst():
    scheduler, _, _ = make(blocks=4096, max_num_seqs=8, max_num_batched_tokens=64)
    ids = iter(range(10**6))

    def step() -> None:
        for r in _step(scheduler)[1]:  # both stay backlogged
            scheduler.add(_request(f"{r.tenant}{next(ids)}", r.tenant, 12, 20))

    for _ in range(16):
        scheduler.add(_request(f"a{next(ids)}", "a", 12, 20))
    for _ in range(300):  # 'a' alone runs up a large counter
        step()
    for _ in range(16):
        scheduler.add(_request(f"b{next(ids)}", "b", 12, 20))
    steps = 0
    while not any(r.tenant == "b" for r in scheduler.running):
        step()
        steps += 1
    assert steps <= 5  # slots free as 'a''s requests end: the newcomer gets them first...
    running_b = []
    for _ in range(300):
        step()
        running_b.append(sum(r.tenant == "b" for r in scheduler.running))
    # ...but not more than its share: lifted to 'a''s counter, it banked nothing while away.
    assert max(running_b) <= 6
    assert sum(running_b[50:]) / len(running_b[50:]) == pytest.approx(4, abs=0.5)


@pytest.mark.parametrize("seed", range(3))
def test_one_tenant_is_scheduled_exactly_as_with_one_fifo_queue(seed):
    traces = []
    for policy in ("fair", "fcfs"):
        rng = random.Random(seed)
        scheduler, _, _ = make(
            blocks=16, max_num_seqs=4, max_num_batched_tokens=16, scheduling_policy=policy
        )
        trace = []
        for step in range(400):
            if rng.random() < 0.5:
                scheduler.add(_request(f"r{step}", "only", rng.randint(8, 40), rng.randint(1, 8)))
            out, _ = _step(scheduler)
            trace.append(
                (
                    [r.request_id for r in out.requests],
                    out.num_new_tokens,
                    [r.request_id for r in out.preempted],
                )
            )
        traces.append(trace)
        assert scheduler.num_preemptions > 0
    assert traces[0] == traces[1]


def _steps_until_finished(scheduler, rid: str, limit: int = 20) -> int:
    for step in range(1, limit + 1):
        _, finished = _step(scheduler)
        if any(r.request_id == rid for r in finished):
            return step
    raise AssertionError(f"{rid} did not finish in {limit} steps")


def test_a_tenant_without_a_slot_preempts_the_tenant_over_its_share():
    scheduler, _, _ = make(blocks=4096, max_num_seqs=8, preemption_min_steps=4)
    for i in range(8):
        scheduler.add(_request(f"a{i}", "a", 40, 200))
    _step(scheduler)
    assert len(scheduler.running) == 8  # 'a' holds every slot
    scheduler.add(_request("b0", "b", 3, 1))
    # 'a''s requests ran one step: b0 waits out their minimum run of 4, then takes a slot.
    assert _steps_until_finished(scheduler, "b0") == 4
    assert [r.request_id for r in scheduler.waiting] == ["a7"]  # the latest of 'a'
    assert scheduler.fair.accounts["a"].preemptions == 1
    assert _steps_until_finished(scheduler, "a7", limit=400) > 1  # resumed, and done


def test_a_tenant_without_blocks_preempts_the_tenant_over_its_share():
    scheduler, store, allocator = make(blocks=26, max_num_seqs=16, preemption_min_steps=0)
    for i in range(8):
        scheduler.add(_request(f"a{i}", "a", 12, 100))  # 3 blocks each: 24 of 26
    _step(scheduler)
    assert allocator.num_free + store.evictable_blocks() == 2
    scheduler.add(_request("b0", "b", 9, 1))  # needs 3
    assert _steps_until_finished(scheduler, "b0") <= 2
    assert scheduler.fair.accounts["a"].preemptions >= 1
    assert scheduler.fair.accounts["b"].preemptions == 0


def test_a_tenant_at_its_share_waits_its_turn():
    scheduler, _, _ = make(blocks=4096, max_num_seqs=4, preemption_min_steps=0)
    for i in range(2):
        scheduler.add(_request(f"a{i}", "a", 10, 100))
        scheduler.add(_request(f"b{i}", "b", 10, 100))
    _step(scheduler)
    scheduler.add(_request("b9", "b", 3, 1))  # 'b' holds 2 of 4 slots: its share
    for _ in range(5):
        out, _ = _step(scheduler)
        assert not out.preempted
    assert scheduler.waiting[0].request_id == "b9"


def test_priorities_order_a_tenants_requests_and_its_victims():
    scheduler, _, _ = make(blocks=4096, max_num_seqs=2, preemption_min_steps=0)
    scheduler.add(_request("low", "a", 4, 50, priority=5))
    scheduler.add(_request("high", "a", 4, 50, priority=-1))
    scheduler.add(_request("mid", "a", 4, 50, priority=0))
    _step(scheduler)
    assert [r.request_id for r in scheduler.running] == ["high", "mid"]
    scheduler.add(_request("b0", "b", 2, 1))
    scheduler.add(_request("b1", "b", 2, 1))
    out, finished = _step(scheduler)
    assert [r.request_id for r in out.preempted] == ["mid"]  # 'a' over its share of 1 slot
    assert [r.request_id for r in finished] == ["b0"]


def test_weights_must_be_positive():
    scheduler, _, _ = make()
    with pytest.raises(ValueError, match="weight must be > 0"):
        scheduler.add(_request("r", "a", 3, 1, weight=0))


def test_a_tenant_at_its_share_preempts_its_own_lower_priority_requests():
    scheduler, _, _ = make(blocks=4096, max_num_seqs=2, preemption_min_steps=1)
    scheduler.add(_request("batch0", "a", 4, 50, priority=1))
    scheduler.add(_request("batch1", "a", 4, 50, priority=1))
    _step(scheduler)
    _step(scheduler)
    scheduler.add(_request("chat", "a", 3, 1, priority=-1))  # 'a' alone: at its share
    out, finished = _step(scheduler)
    assert [r.request_id for r in out.preempted] == ["batch1"]
    assert [r.request_id for r in finished] == ["chat"]
    scheduler.add(_request("same", "a", 3, 1, priority=1))  # no better than those running
    out, _ = _step(scheduler)
    assert not out.preempted


def test_preemption_for_blocks_stops_at_the_victims_share():
    """A slot freed by the first victim turns the question into one of blocks: the tenant is
    then measured against its share of blocks, not of slots (it keeps its other request)."""
    scheduler, _, _ = make(
        blocks=24, max_num_seqs=2, preemption_min_steps=0, max_num_batched_tokens=256
    )
    for rid in ("b1", "b2"):
        scheduler.add(_request(rid, "b", 39, 50))  # 10 blocks each
    _step(scheduler)
    _step(scheduler)
    scheduler.add(_request("a", "a", 64, 1))
    out, _ = _step(scheduler)
    assert [r.request_id for r in out.preempted] == ["b2"]
    assert [r.request_id for r in scheduler.running] == ["b1"]


def test_requests_sharing_cached_blocks_count_them_once():
    """Four requests of one tenant hold the same 8 cached blocks: counted as what preempting
    them would free, the tenant is not over its share, and nobody is preempted for nothing."""
    scheduler, _, _ = make(blocks=40, max_num_seqs=8, preemption_min_steps=0)
    requests = [_request(f"b{i}", "b", 33, 50) for i in range(4)]
    for r in requests:
        r.cache_root = b"root-of-b"
    scheduler.add(requests[0])
    _step(scheduler)
    for r in requests[1:]:
        scheduler.add(r)
    _step(scheduler)
    assert scheduler.cache.num_cached >= 8
    scheduler.add(_request("a", "a", 120, 1))
    out, _ = _step(scheduler)
    assert not out.preempted
