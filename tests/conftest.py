"""Fixtures shared by every test folder (helpers live in ``tests/helpers/``)."""

from __future__ import annotations

import pytest

# The CPU backends, by the optimizer arguments that select them. The CUDA backend
# (fused_triton) has its own tests: tests/core/test_cuda_triton.py.
BACKENDS = {
    "single_tensor": {"foreach": False},
    "multi_tensor": {"foreach": True},
    "fused_c": {"fused": True},  # the C kernel is built once per machine
}


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> dict[str, bool]:
    """The ``AdamSPD``/``AdamL2SP`` keyword arguments of one backend: a test taking this
    fixture runs once per backend (ids: the backend names)."""
    return dict(BACKENDS[request.param])
