"""Every export test has its own per-user cache: nothing is read from or written to ~/.cache/refformer."""

import pytest


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"
