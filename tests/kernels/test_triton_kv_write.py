"""Triton KV write against the PyTorch reference scatter."""

import pytest
import torch

from prefixserve.kernels import kv_write
from prefixserve.kernels.triton_kv_write import write_kv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _pool(num_blocks, block_size, hkv, d, dtype, device):
    shape = (num_blocks, block_size, hkv, d)
    return torch.randn(shape).to(dtype).to(device), torch.randn(shape).to(dtype).to(device)


@pytest.mark.parametrize(
    ("dtype", "hkv", "d", "block_size", "tokens"),
    [
        (torch.float32, 2, 64, 16, 37),
        (torch.float16, 3, 128, 32, 5),
        (torch.bfloat16, 1, 16, 4, 11),
        (torch.float32, 8, 32, 1, 9),
    ],
)
def test_write_kv_matches_reference(device, dtype, hkv, d, block_size, tokens):
    num_blocks = 2 * tokens // block_size + 3
    k_cache, v_cache = _pool(num_blocks, block_size, hkv, d, dtype, device)
    slots = torch.randperm(num_blocks * block_size)[:tokens].to(device)
    key = torch.randn(tokens, hkv, d).to(dtype).to(device)
    value = torch.randn(tokens, hkv, d).to(dtype).to(device)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    kv_write.write_kv(key, value, want_k, want_v, slots)
    write_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_write_kv_skips_negative_slots_and_strided_input(device):
    k_cache, v_cache = _pool(4, 16, 2, 32, torch.float32, device)
    packed = torch.randn(6, 2 * 2, 32, device=device)  # e.g. a fused kv projection, viewed
    key, value = packed[:, :2], packed[:, 2:]
    slots = torch.tensor([3, -1, 17, 40, -1, 63], device=device)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    kv_write.write_kv(key[keep], value[keep], want_k, want_v, slots[keep])
    write_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_write_kv_rejects_bad_inputs(device):
    k_cache, v_cache = _pool(4, 16, 2, 32, torch.float32, device)
    key = torch.randn(3, 2, 32, device=device)
    slots = torch.tensor([0, 1, 2], device=device)
    with pytest.raises(ValueError, match="dtype"):
        write_kv(key.half(), key.half(), k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="int64"):
        write_kv(key, key, k_cache, v_cache, slots.int())
    with pytest.raises(ValueError, match="heads"):
        write_kv(key[:, :1], key[:, :1], k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="same number of tokens"):
        write_kv(key, key, k_cache, v_cache, slots[:2])
    with pytest.raises(ValueError, match="must match"):
        write_kv(key, key, k_cache, v_cache[:, :8], slots)
