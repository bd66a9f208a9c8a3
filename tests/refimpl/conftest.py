"""Fixtures shared by the refimpl tests."""

import pytest


@pytest.fixture(scope="module")
def torch_slow_path():
    """Compare with torch's plain (non-fused) attention path; restore the global switch afterwards."""
    torch = pytest.importorskip("torch")
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(enabled)
