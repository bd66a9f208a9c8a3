"""Shared test setup: hypothesis profiles (a small `ci` one when CI=true, a deeper `dev` one otherwise), and Ctrl-C
handled as Python's default even when the suite was started with SIGINT ignored (`cmd &` in a script, nohup): the
tests of interruptions send real SIGINTs, to this process and to the commands it starts, which inherit an ignored
SIGINT but not a handler."""

import os
import signal

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", max_examples=30, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") == "true" else "dev"))

if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    """A per-user cache of the test's own (XDG_CACHE_HOME under tmp_path): nothing is read from or written to
    ~/.cache/refformer. Modules take it for every test with pytestmark = pytest.mark.usefixtures("user_cache")."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"
