"""The native greedy argmax against ``torch.argmax``: every ISA this CPU runs, fp32 and bf16,
vocabularies around the vector widths, ties (the first index wins), NaN (the first NaN wins),
rows of -inf, strided rows, no rows, and bad inputs; and the engine's sampler on it."""

import pytest
import torch

from prefixserve.config import cache_root
from prefixserve.kernels import cpu_sampling
from prefixserve.kernels.cpu_isa import cpu_isas, default_isa
from prefixserve.sampler import Sampler, native_argmax
from prefixserve.sampling_params import SamplingParams

cpu_sampling.load(cache_root())  # builds once per machine (cached); cpu_isas() below needs it


def _hard_rows(vocab: int, dtype: torch.dtype) -> torch.Tensor:
    x = torch.randn(6, vocab).to(dtype)
    x[1] = 0  # all tied: index 0
    x[2, vocab // 2 :] = x[2].max()  # ties from the middle on
    x[3] = -float("inf")
    if vocab > 3:
        x[4, vocab - 1] = float("nan")
        x[4, 2] = float("nan")  # the first NaN wins
    x[5, vocab - 1] = 1e4  # the maximum in the tail past whole vectors
    return x


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [1, 7, 8, 16, 17, 33, 1000, 49152])
def test_equals_torch_argmax(isa: str, dtype: torch.dtype, vocab: int) -> None:
    x = _hard_rows(vocab, dtype)
    assert torch.equal(cpu_sampling.argmax_rows(x, isa), x.argmax(dim=1))
    wide = torch.randn(6, vocab + 5).to(dtype)
    wide[:, :vocab] = x
    assert torch.equal(cpu_sampling.argmax_rows(wide[:, :vocab], isa), x.argmax(dim=1))


def test_no_rows_and_bad_inputs() -> None:
    isa = default_isa()
    assert cpu_sampling.argmax_rows(torch.randn(0, 9), isa).shape == (0,)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        cpu_sampling.argmax_rows(torch.randn(2, 9).half(), isa)
    with pytest.raises(RuntimeError, match=r"expected \[rows, vocab\]"):
        cpu_sampling.argmax_rows(torch.randn(9), isa)
    with pytest.raises(RuntimeError, match="not one of this CPU's"):
        cpu_sampling.argmax_rows(torch.randn(2, 9), "sse9")


def test_sampler_takes_greedy_tokens_with_it() -> None:
    argmax = native_argmax(torch.device("cpu"))
    if default_isa() == "baseline":
        assert argmax is None
        return
    assert argmax is not None
    calls = []
    sampler = Sampler(argmax=lambda s: calls.append(s.shape) or argmax(s))
    logits = torch.randn(4, 300).bfloat16()
    params = [SamplingParams(), SamplingParams(), SamplingParams(temperature=1.0), SamplingParams()]
    out = sampler(logits, params, [None] * 4, [[]] * 4)
    greedy = [0, 1, 3]
    assert [out.token_ids[b] for b in greedy] == logits[greedy].argmax(dim=1).tolist()
    assert calls == [(3, 300)]
    out = sampler(logits, [SamplingParams()] * 4, [None] * 4, [[]] * 4)
    assert out.token_ids == logits.argmax(dim=1).tolist() and calls[-1] == (4, 300)
