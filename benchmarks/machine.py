"""What the benchmarks record about the machine they ran on, and how they time a session's calls."""

import contextlib
import json
import platform
import subprocess
import time
from pathlib import Path


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def gpu_name():
    """nvidia-smi's "name, driver_version" of the GPUs, or None where nvidia-smi is missing."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        return None


@contextlib.contextmanager
def timed_calls(session):
    """Record the seconds of each session.run_with_iobinding call made inside the block into the list it yields."""
    run, times = session.run_with_iobinding, []

    def timed_run(*args, **kwargs):
        start = time.perf_counter()
        run(*args, **kwargs)
        times.append(time.perf_counter() - start)

    session.run_with_iobinding = timed_run
    try:
        yield times
    finally:
        session.run_with_iobinding = run


def write_report(report, path):
    """Write a benchmark's report (a JSON-able dict) at path, creating its folder; prints where. Nothing with None."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
