"""Every export test has its own per-user cache: nothing is read from or written to ~/.cache/refformer."""

import pytest


@pytest.fixture(autouse=True)
def own_user_cache(user_cache):
    """tests/conftest.py's user_cache for every test here."""
    return user_cache
