"""The `refformer serve` command: one line without the serve extra, bad options refused in one line before the model
loads, a taken port, and SIGTERM's graceful shutdown of a real server process (the running request finishes)."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from click.testing import CliRunner

from refformer.runtime.cli import main


@pytest.mark.parametrize("missing", ["starlette", "uvicorn"])
def test_without_the_serve_extra_one_line_says_how_to_install_it(monkeypatch, missing):
    import refformer.runtime
    import refformer.runtime.generator as generator_module

    for name in [name for name in sys.modules if name == missing or name.startswith(missing + ".")] + [missing]:
        monkeypatch.setitem(sys.modules, name, None)  # `import starlette(.x)` raises ImportError
    monkeypatch.delitem(sys.modules, "refformer.runtime.serve", raising=False)  # imported again, without it
    monkeypatch.delattr(refformer.runtime, "serve", raising=False)
    monkeypatch.setattr(generator_module, "Generator", lambda *a, **k: pytest.fail("the server went on to start"))
    result = CliRunner().invoke(main, ["serve", "--port", "0"])
    assert result.exit_code == 1
    assert result.output == 'error: refformer serve needs the serve extra (starlette, uvicorn): pip install ' \
                            '"refformer[serve]"\n'


@pytest.mark.parametrize("flags, message", [
    (["--max-batch", "0"], "--max-batch must be an integer >= 1, got 0"),
    (["--batch-window-ms", "nan"], "--batch-window-ms must be a number of milliseconds"),
    (["--batch-window-ms", "-1"], "--batch-window-ms must be"),
    (["--request-timeout", "0"], "--request-timeout must be a number of seconds above 0"),
    (["--request-timeout", "inf"], "--request-timeout must be"),
    (["--max-input-tokens", "0"], "--max-input-tokens must be an integer >= 1"),
    (["--max-new-tokens", "-5"], "--max-new-tokens must be an integer >= 1"),
    (["--max-body-bytes", "0"], "--max-body-bytes must be an integer >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--host", "no.such.host.invalid"], "--host no.such.host.invalid"),
    (["--host", ""], "--host is empty; give an address such as 127.0.0.1"),
    (["--max-batch", "100000"], "--max-batch 100000 is too large: 100000 inputs x 1 sequences"),
    (["--batch-window-ms", "2000", "--request-timeout", "2"], "--batch-window-ms must be shorter than "
                                                              "--request-timeout (2 s), got 2000"),
    (["--dtype", "int8"], "--dtype int8 needs --max-batch 1"),
    (["--dtype", "int8", "--max-batch", "2"], "--dtype int8 needs --max-batch 1"),
])
def test_bad_options_are_one_line_before_the_model_loads(monkeypatch, flags, message):
    import refformer.runtime.generator as generator_module

    monkeypatch.setattr(generator_module, "Generator", lambda *a, **k: pytest.fail("the model was loaded"))
    result = CliRunner().invoke(main, ["serve", "--port", "0", *flags])
    assert result.exit_code == 1 and message in result.output and len(result.output.splitlines()) == 1, result.output


def test_a_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--port", str(port)])
    assert result.exit_code == 1 and re.fullmatch(f"error: cannot listen on 127.0.0.1:{port}: .+\n", result.output)


def test_sigterm_lets_the_running_request_finish_then_the_server_stops():
    process = subprocess.Popen([sys.executable, "-c", "from refformer.runtime.cli import main; main()", "serve",
                                "--port", "0", "--threads", "1"], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = process.stderr.readline()
        url = re.search(r"on (http://127\.0\.0\.1:\d+) ", line)[1]
        answer = {}

        def ask():  # a second or two of beams on one thread
            answer["response"] = httpx.post(url + "/v1/generate", timeout=60, json={
                "texts": ["Das Wetter ist heute schön."] * 8, "num_beams": 4, "min_new_tokens": 80,
                "max_new_tokens": 80})
            answer["at"] = time.monotonic()

        asking = threading.Thread(target=ask)
        asking.start()
        deadline = time.monotonic() + 30
        while "refformer_input_tokens_total 0\n" in httpx.get(url + "/metrics").text:  # not yet arrived
            assert time.monotonic() < deadline
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        asking.join(60)
        assert process.wait(60) == -signal.SIGTERM  # uvicorn ends the process by the signal, after the request
        response = answer["response"]
        assert response.status_code == 200 and len(response.json()["records"]) == 8
        assert all(len(record["ids"]) == 80 for record in response.json()["records"])
        assert answer["at"] > signalled  # it was running when the signal came
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health")
        assert process.stderr.read() == ""  # no traceback, no log line
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()


def test_ctrl_c_stops_the_server_with_exit_130_and_one_line():
    process = subprocess.Popen([sys.executable, "-c", "from refformer.runtime.cli import main; main()", "serve",
                                "--port", "0", "--threads", "1"], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url = re.search(r"on (http://127\.0\.0\.1:\d+) ", process.stderr.readline())[1]
        assert httpx.get(url + "/health").status_code == 200  # serving: uvicorn's signal handlers are in place
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 130
        assert process.stderr.read() == "error: interrupted\n"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
