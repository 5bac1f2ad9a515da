"""Helpers shared by the kernel tests: pairwise case generation, per-dtype tolerances and one
call that checks a kernel step against the oracle (test helpers, not shipped).

No Triton import here: tests import this before deciding whether kernels are interpreted.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import torch

from prefixserve.kernels.reference import naive_prefix_attention

from scenarios import Scenario, adapter_mix, make_scenario

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (2e-5, 2e-5),  # IEEE products, fp32 accumulation
    torch.float16: (5e-3, 5e-3),  # probabilities rounded to fp16 before P @ V, output rounding
    torch.bfloat16: (3e-2, 2e-2),
}
"""(atol, rtol) of a kernel's output against the fp32 oracle, per input dtype."""


def _gain(uncovered: set, case: dict[int, int], k: int, v: int) -> int:
    """How many uncovered pairs choosing value ``v`` for factor ``k`` would cover."""
    return sum(
        (min(k, m), v if k < m else w, max(k, m), w if k < m else v) in uncovered
        for m, w in case.items()
    )


def pairwise(factors: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """A small set of cases in which every pair of values of every two factors appears at least
    once (greedy all-pairs; deterministic). Far fewer cases than the cartesian product."""
    names = list(factors)
    sizes = [len(factors[n]) for n in names]
    uncovered = {
        (i, a, j, b)
        for i, j in itertools.combinations(range(len(names)), 2)
        for a in range(sizes[i])
        for b in range(sizes[j])
    }
    cases: list[dict[int, int]] = []
    while uncovered:
        i, a, j, b = min(uncovered)
        case = {i: a, j: b}
        for k in range(len(names)):
            if k not in case:  # the value that covers the most still-uncovered pairs
                gains = [_gain(uncovered, case, k, v) for v in range(sizes[k])]
                case[k] = gains.index(max(gains))
        uncovered -= {
            (p, case[p], q, case[q]) for p, q in itertools.combinations(range(len(names)), 2)
        }
        cases.append(case)
    return [{names[k]: factors[names[k]][v] for k, v in sorted(c.items())} for c in cases]


def random_step(
    kind: str,
    batch: int,
    prefix_lens: list[int],
    mix: str,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    max_own: int = 48,
    seed: int = 0,
) -> Scenario:
    """A random step of ``batch`` requests. ``kind``: ``decode`` (q_len 1), ``prefill``
    (q_len = own_len), ``chunked`` (q_len < own_len: earlier chunks in the cache) or ``mixed``
    (prefill chunks and decodes in one step)."""
    rng = random.Random(seed)
    own = [rng.randint(1, max_own) for _ in range(batch)]
    if kind == "decode":
        q_lens = [1] * batch
    elif kind == "prefill":
        q_lens = list(own)
    elif kind == "chunked":
        own = [n + 1 for n in own]
        q_lens = [rng.randint(1, n - 1) if n > 1 else 1 for n in own]
    elif kind == "mixed":
        q_lens = [1 if b % 2 else rng.randint(1, n) for b, n in enumerate(own)]
    else:
        raise ValueError(f"unknown step kind {kind!r}")
    ids = adapter_mix(mix, batch, len(prefix_lens), seed=seed)
    return make_scenario(
        q_lens,
        own,
        ids,
        prefix_lens,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        block_size=block_size,
        dtype=dtype,
        device=device,
        seed=seed,
    )


def assert_matches_oracle(got: torch.Tensor, sc: Scenario) -> None:
    """Compare a kernel's ``[T, Hq, D]`` output with ``naive_prefix_attention`` (fp32)."""
    want = naive_prefix_attention(sc.query, sc.k_cache, sc.v_cache, sc.meta, sc.scale)
    assert got.dtype == sc.query.dtype and got.shape == sc.query.shape
    atol, rtol = TOLERANCES[sc.query.dtype]
    torch.testing.assert_close(got.float(), want, atol=atol, rtol=rtol)
