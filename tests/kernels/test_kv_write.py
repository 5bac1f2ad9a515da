"""The PyTorch KV write that the CPU backends and prefix fills run."""

import torch

from prefixserve.kernels.kv_write import KVWrite, write_kv


def test_padded_slots_write_nothing():
    """The one contract of every backend's KV write: a slot of -1 is padding."""
    k_cache, v_cache = torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8)
    key, value = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    write_kv(key, value, k_cache, v_cache, torch.tensor([5, -1, 0]))
    torch.testing.assert_close(k_cache.view(-1, 2, 8)[[5, 0]], key[[0, 2]])
    torch.testing.assert_close(v_cache.view(-1, 2, 8)[[5, 0]], value[[0, 2]])
    assert int((k_cache != 0).any(-1).any(-1).sum()) == 2  # nothing else was written
    # The native backend resolves this once per step in its plan (KVWrite), then scatters.
    write = KVWrite.of(torch.tensor([5, -1, 0]))
    assert write.rows is not None and write.rows.tolist() == [0, 2]
    assert write.slots.tolist() == [5, 0]
    assert KVWrite.of(torch.tensor([5, 1, 0])).rows is None
