"""Kernel tests run the real Triton kernels: on a GPU when there is one, else under the Triton
interpreter (switched on by the suite's root conftest before anything imports Triton)."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def device() -> str:
    """Where kernel tests run: the GPU if there is one, else the CPU (interpreted)."""
    return DEVICE
