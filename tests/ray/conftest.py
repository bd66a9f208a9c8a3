"""The Ray tests' one cluster: a local Ray started by the test module (ray.init(num_cpus=3): two one-CPU workers and
one CPU for Ray Data's read and write tasks, as refformer batch asks of a cluster), its session files in a
short folder under the system temp folder (Ray's socket paths must stay under 108 bytes), its processes recorded by
PID and checked to be gone after ray.shutdown (never `ray stop --force`, which would stop other users' clusters)."""

import importlib.util
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pytest

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason='the ray extra is not installed (pip install "refformer[ray]")')


def descendants(pid):
    """The PIDs of pid's children, their children ... read from /proc (no psutil here)."""
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid):
    """True while pid runs (a zombie, exited but not reaped, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def ray_cluster():
    """ray, initialized on a local cluster of 2 CPUs for the module's tests; shut down after them, every process it
    started checked to be gone (any left is killed by its PID, and the test fails)."""
    ray = pytest.importorskip("ray")
    before = descendants(os.getpid())
    temp = tempfile.mkdtemp(prefix="rf-ray-")
    old_auth = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a local cluster: no token warning
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False, _temp_dir=temp)
    try:
        yield ray
    finally:
        started = descendants(os.getpid()) - before
        ray.shutdown()
        if old_auth is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = old_auth
        deadline = time.monotonic() + 15
        while any(alive(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [pid for pid in started if alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"ray.shutdown left processes {left}"
