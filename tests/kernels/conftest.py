"""Kernel tests run the real Triton kernels: on a GPU when there is one, else under the Triton
interpreter. ``TRITON_INTERPRET`` is read when a kernel is defined, so it is set here, before
pytest imports any test module of this directory (and with it the kernel modules)."""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    _common = sys.modules.get("prefixserve.kernels.triton_common")
    if _common is not None and not _common.INTERPRET:
        raise pytest.UsageError(
            "prefixserve.kernels.triton_* was imported before tests/kernels/conftest.py set "
            "TRITON_INTERPRET=1; run the kernel tests on their own or set it in the environment"
        )

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def device() -> str:
    """Where kernel tests run: the GPU if there is one, else the CPU (interpreted)."""
    return DEVICE
