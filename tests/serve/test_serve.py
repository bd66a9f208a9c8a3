"""refformer serve against a real uvicorn server on 127.0.0.1 (a free port, in a thread of this process), queried
with httpx: records equal to the Generator's alone, batching across concurrent clients, streaming, every limit as a
4xx JSON error, a client leaving mid-stream, /health and /metrics. The bundled model on the CPU, 1 thread."""

import concurrent.futures
import gzip
import json
import re
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from refformer.refimpl.generate import GenerationOptions
from refformer.runtime.generator import Generator
from refformer.runtime.serve import ServeSettings, listening_socket, uvicorn_server

TEXTS = ["Das Wetter ist heute schön.", "Ich habe Hunger.", "Wir gehen morgen ins Kino, wenn es nicht regnet.",
         "Guten Morgen!", "Der Zug kommt um acht Uhr an.", "Kannst du mir bitte helfen?",
         "Das Buch liegt auf dem Tisch.", "Sie hat lange in Berlin gewohnt, bevor sie nach Hamburg zog."]
LIMITS = dict(max_batch=8, max_input_tokens=30, max_new_tokens=40, max_body_bytes=4096)


def start_server(settings):
    """A uvicorn server of the bundled model (CPU, 1 thread) in a daemon thread, started; its url and a stop()."""
    generator = Generator(provider="cpu", threads=1)
    sock = listening_socket("127.0.0.1", 0)
    server = uvicorn_server(generator, settings)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)

    def stop():
        server.should_exit = True
        thread.join(30)
        sock.close()

    return SimpleNamespace(url=f"http://127.0.0.1:{sock.getsockname()[1]}", stop=stop, generator=generator)


@pytest.fixture(scope="module")
def server():
    running = start_server(ServeSettings(batch_window_ms=20, request_timeout=60, **LIMITS))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def reference():
    """A Generator of its own, to run each text alone (the server's belongs to its worker thread)."""
    return Generator(provider="cpu", threads=1)


def alone(reference, text, **options):
    """What one text gives alone, as a record's (output, ids)."""
    generation = GenerationOptions(**options)
    return reference.generate_rows_and_ids(reference.encode_rows([text]), generation)[0]


def events(body):
    """Server-sent events of a stream body -> [(event, data)]."""
    found = []
    for block in body.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        found.append((fields["event"], json.loads(fields["data"])))
    return found


@pytest.mark.parametrize("options", [{}, {"num_beams": 3, "num_return_sequences": 2, "length_penalty": 0.8},
                                     {"do_sample": True, "seed": 7, "top_k": 20, "temperature": 0.9},
                                     {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "max_new_tokens": 12}])
def test_records_are_generate_json_records_equal_to_each_text_alone(client, reference, options):
    response = client.post("/v1/generate", json={"texts": TEXTS, **options})
    assert response.status_code == 200, response.text
    records = response.json()["records"]
    assert [record["line"] for record in records] == list(range(1, len(TEXTS) + 1))
    for text, record in zip(TEXTS, records):
        output, ids = alone(reference, text, **options)
        expected = {"line": record["line"], "input": text, "output": output, "ids": ids}
        assert record == ({**expected, "seed": 7} if options.get("do_sample") else expected)
    single = client.post("/v1/generate", json={"text": TEXTS[2], **options})
    assert single.status_code == 200 and single.json() == {**records[2], "line": 1}


def test_a_request_that_samples_without_a_seed_returns_the_one_it_drew(client, reference):
    record = client.post("/v1/generate", json={"text": TEXTS[0], "do_sample": True}).json()
    assert isinstance(record["seed"], int)
    assert (record["output"], record["ids"]) == alone(reference, TEXTS[0], do_sample=True, seed=record["seed"])


def test_concurrent_clients_are_batched_and_each_gets_what_its_text_gives_alone(server, reference):
    """16 clients at once, greedy and beam requests mixed: every answer within 60 s and equal to its text alone;
    /metrics shows batches of more than one text (requests of equal options ran together)."""
    jobs = [(TEXTS[n % len(TEXTS)], {} if n % 4 else {"num_beams": 2}) for n in range(32)]
    expected = [alone(reference, text, **options) for text, options in jobs]

    def ask(job):
        text, options = job
        with httpx.Client(base_url=server.url, timeout=60) as one_client:
            return one_client.post("/v1/generate", json={"text": text, **options})

    def batches():
        return int(re.search(r"^refformer_batch_size_count (\d+)$", httpx.get(server.url + "/metrics").text, re.M)[1])

    before, started = batches(), time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    assert time.monotonic() - started < 60
    assert [answer.status_code for answer in answers] == [200] * len(jobs)
    assert [(answer.json()["output"], answer.json()["ids"]) for answer in answers] == expected
    assert batches() - before < len(jobs), "every request ran in a batch of its own"


@pytest.mark.parametrize("options", [{}, {"do_sample": True, "seed": 3, "repetition_penalty": 1.2}])
def test_stream_sends_each_piece_then_the_record(client, reference, options):
    with client.stream("POST", "/v1/generate", json={"text": TEXTS[2], "stream": True, **options}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        found = events(response.read().decode())
    kinds = [kind for kind, _ in found]
    assert kinds[-1] == "record" and set(kinds[:-1]) == {"piece"} and len(kinds) > 2
    output, ids = alone(reference, TEXTS[2], **options)
    assert "".join(data["text"] for _, data in found[:-1]) == output
    seed = {"seed": 3} if options else {}
    assert found[-1][1] == {"line": 1, "input": TEXTS[2], "output": output, "ids": ids, **seed}


@pytest.mark.parametrize("body", [{"texts": TEXTS[:2], "stream": True},
                                  {"text": "Hallo", "stream": True, "num_beams": 2},
                                  {"text": "Hallo", "stream": True, "do_sample": True, "num_return_sequences": 2}])
def test_stream_of_several_texts_beams_or_sequences_is_400(client, body):
    response = client.post("/v1/generate", json=body)
    assert response.status_code == 400 and "stream is for one" in response.json()["error"]


def test_a_client_leaving_mid_stream_stops_its_stream_and_leaves_the_server_serving(server, client, reference,
                                                                                    monkeypatch):
    pieces, stream = [], server.generator.stream

    def slow_stream(*args, **options):  # 20 ms a piece: the client is gone long before 40 pieces
        for piece in stream(*args, **options):
            pieces.append(piece)
            time.sleep(0.02)
            yield piece

    monkeypatch.setattr(server.generator, "stream", slow_stream)
    for _ in range(3):
        with httpx.Client(base_url=server.url, timeout=60) as leaving:
            with leaving.stream("POST", "/v1/generate", json={"text": TEXTS[7], "stream": True, "min_new_tokens": 40,
                                                              "max_new_tokens": 40}) as response:
                assert response.status_code == 200
                next(response.iter_lines())  # the first event line, then the connection is closed
    assert client.get("/health").json()["status"] == "ok"
    record = client.post("/v1/generate", json={"text": TEXTS[1]}).json()
    assert (record["output"], record["ids"]) == alone(reference, TEXTS[1])
    assert len(pieces) < 60, "the worker went on streaming to clients that had left"  # 3 x 40 if it had


LONG = " ".join(["Das Wetter ist heute schön."] * 8)  # > 30 tokens, within the model's 127


@pytest.mark.parametrize("raw, status, message", [
    (b'{"text": "Hallo"', 400, "not valid JSON"),
    (b'{"text": NaN}', 400, "NaN is not a JSON value"),
    (b'{"text": "x", "top_p": 1e999}', 400, "too large a number"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b'["Hallo"]', 400, "must be a JSON object"),
    (b'{"text": "Hallo", "beams": 2}', 400, "unknown field 'beams'"),
    (b'{"text": "Hallo", "text": "Welt"}', 400, "the key 'text' appears twice"),
    (b'{"text": "Hallo", "num_beams": 2, "num_beams": 1}', 400, "the key 'num_beams' appears twice"),
    (b'{"text": "Hallo", "num_beams": "2"}', 422, "num_beams must be an integer, got a string"),
    (b'{"text": "Hallo", "num_beams": true}', 422, "num_beams must be an integer, got a boolean"),
    (b'{"text": "Hallo", "do_sample": 1}', 422, "do_sample must be true or false, got an integer"),
    (b'{"text": "Hallo", "top_p": 1.5}', 422, "top_p must be in (0, 1]"),
    (b'{"text": "Hallo", "num_beams": 0}', 422, "num_beams"),
    (b'{"text": "Hallo", "seed": -1}', 422, "seed"),
    (b'{"text": "Hallo", "stream": "yes"}', 422, "stream must be true or false"),
    (b'{"text": 5}', 422, "text must be a string, got an integer"),
    (b'{"texts": "Hallo"}', 422, "texts must be a non-empty list of strings, got a string"),
    (b'{"texts": []}', 422, "texts must be a non-empty list"),
    (b'{"texts": ["a", 2]}', 422, "texts[1] must be a string"),
    (b'{"text": "a", "texts": ["b"]}', 422, "not both"),
    (b'{}', 422, 'give "text"'),
    (b'{"text": "   "}', 422, "text is empty"),
    (json.dumps({"texts": ["Hallo"] * 9}).encode(), 422, "more than this server's --max-batch 8"),
    (json.dumps({"texts": ["Hallo", LONG]}).encode(), 422, "texts[1] has 48 tokens, more than this server's "
                                                           "--max-input-tokens 30"),
    (b'{"text": "Hallo", "max_new_tokens": 41}', 422, "max_new_tokens 41 is more than this server's "
                                                      "--max-new-tokens 40"),
    (json.dumps({"text": " ".join([LONG] * 3)}).encode(), 422, "text has 144 tokens, more than the model's 127; "
                                                              "shorten it"),
    (json.dumps({"text": "x" * 5000}).encode(), 413, "more than this server's --max-body-bytes 4096"),
])
def test_each_limit_and_bad_request_is_one_json_error(client, raw, status, message):
    response = client.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    assert list(response.json()) == ["error"] and message in response.json()["error"]
    assert "truncate" not in response.json()["error"]  # generate's flag, not the server's


def test_a_body_over_the_limit_without_a_length_is_413(client):
    chunks = (b'{"text": "' + b"x" * 1000 + b'"}' if n == 0 else b" " * 1000 for n in range(6))
    response = client.post("/v1/generate", content=chunks)  # a generator: sent chunked, no Content-Length
    assert response.status_code == 413 and "--max-body-bytes 4096" in response.json()["error"]


def test_a_compressed_body_is_415(client):
    response = client.post("/v1/generate", content=gzip.compress(b'{"text": "Hallo"}'),
                           headers={"content-type": "application/json", "content-encoding": "gzip"})
    assert response.status_code == 415 and "Content-Encoding gzip" in response.json()["error"]


def metric(client, name):
    """One sample of GET /metrics (0 when absent)."""
    samples = dict(line.rsplit(" ", 1) for line in client.get("/metrics").text.splitlines() if line[:1] != "#")
    return float(samples.get(name, 0))


def raw_request(url, data):
    """Send raw HTTP bytes to the server at url and close the connection at once (a client that leaves)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(data)


LEFT = 'refformer_requests_total{endpoint="/v1/generate",status="499"}'


def test_a_client_leaving_while_sending_its_body_is_counted_and_the_server_goes_on(server, client):
    before = metric(client, LEFT)
    raw_request(server.url, b'POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"text": ')
    deadline = time.monotonic() + 10
    while metric(client, LEFT) == before:  # starlette's ClientDisconnect was a traceback and no answer
        assert time.monotonic() < deadline, "the request of the client that left was not counted as 499"
        time.sleep(0.05)
    assert client.post("/v1/generate", json={"text": "Hallo", "max_new_tokens": 3}).status_code == 200


def test_a_client_leaving_before_its_answer_takes_its_texts_out_of_the_queue(server, client, monkeypatch):
    batches, generate = [], server.generator.generate_rows_and_ids

    def slow(rows, options):  # the first request holds the worker for 0.5 s
        batches.append([list(row) for row in rows])
        time.sleep(0.5)
        return generate(rows, options)

    monkeypatch.setattr(server.generator, "generate_rows_and_ids", slow)
    before = metric(client, LEFT)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/v1/generate", json={"text": TEXTS[0]})
        time.sleep(0.2)
        body = json.dumps({"text": TEXTS[1], "max_new_tokens": 7}).encode()
        raw_request(server.url, b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(body), body))
        assert first.result().status_code == 200
    time.sleep(0.3)
    assert len(batches) == 1, "the text of the client that left was generated for nobody"
    assert metric(client, LEFT) == before + 1


def test_a_stream_whose_client_left_while_it_waited_never_runs(server, client, monkeypatch):
    streamed, generate = [], server.generator.generate_rows_and_ids

    def slow(rows, options):  # the first request holds the worker for 0.5 s
        time.sleep(0.5)
        return generate(rows, options)

    monkeypatch.setattr(server.generator, "generate_rows_and_ids", slow)
    monkeypatch.setattr(server.generator, "stream", lambda *args, **options: streamed.append(args) or iter(()))
    before = metric(client, LEFT)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.post, "/v1/generate", json={"text": TEXTS[0]})
        time.sleep(0.2)
        body = json.dumps({"text": TEXTS[1], "stream": True}).encode()
        raw_request(server.url, b"POST /v1/generate HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(body), body))
        assert first.result().status_code == 200
    time.sleep(0.3)
    assert streamed == [], "the stream of the client that left was generated for nobody"
    assert metric(client, LEFT) == before + 1


def test_a_request_without_max_new_tokens_gets_the_default_budget_cut_to_the_limit(client, reference):
    text = TEXTS[7]  # 2 S + 10 new tokens by default (S counting eos), over the server's 40
    record = client.post("/v1/generate", json={"text": text, "min_new_tokens": 40}).json()
    assert len(record["ids"]) == 40 and record["ids"] == alone(reference, text, min_new_tokens=40,
                                                               max_new_tokens=40)[1]


def test_unknown_paths_and_methods_are_json_errors(client):
    assert client.get("/nowhere").status_code == 404 and client.get("/nowhere").json() == {"error": "Not Found"}
    assert client.get("/v1/generate").status_code == 405 and "error" in client.get("/v1/generate").json()
    assert metric(client, 'refformer_requests_total{endpoint="other",status="404"}') >= 2
    assert metric(client, 'refformer_requests_total{endpoint="/v1/generate",status="405"}') >= 2


def test_health_and_metrics(client):
    assert client.get("/health").json()["status"] == "ok"
    client.post("/v1/generate", json={"text": "Hallo"})
    text = client.get("/metrics").text
    assert client.get("/metrics").headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert int(samples['refformer_requests_total{endpoint="/v1/generate",status="200"}']) >= 1
    assert int(samples["refformer_generated_tokens_total"]) > 0 and int(samples["refformer_input_tokens_total"]) > 0
    assert samples["refformer_queue_depth"] == "0"
    for histogram in ("refformer_batch_size", "refformer_request_seconds", "refformer_batch_seconds"):
        counts = [int(value) for key, value in samples.items() if key.startswith(histogram + "_bucket")]
        assert counts == sorted(counts) and counts[-1] == int(samples[histogram + "_count"]) > 0
    for name in ("refformer_requests_total", "refformer_queue_depth", "refformer_batch_size"):
        assert f"# TYPE {name} " in text
    answered = sum(int(value) for key, value in samples.items()
                   if key.startswith('refformer_requests_total{endpoint="/v1/generate"'))
    assert answered == int(samples["refformer_request_seconds_count"])  # every answer counted once, timed once


def test_a_request_over_the_timeout_is_504_and_the_server_goes_on():
    running = start_server(ServeSettings(request_timeout=0.05, **LIMITS))
    try:
        with httpx.Client(base_url=running.url, timeout=60) as slow_client:
            slow = slow_client.post("/v1/generate", json={"texts": TEXTS, "num_beams": 8, "min_new_tokens": 40})
            assert slow.status_code == 504 and "--request-timeout 0.05 s" in slow.json()["error"]
            streamed = slow_client.post("/v1/generate", json={"text": TEXTS[7], "stream": True,
                                                              "min_new_tokens": 40})
            assert streamed.status_code in (200, 504)  # 504 before it starts; else an error event at the limit
            if streamed.status_code == 200:
                assert events(streamed.text)[-1][0] in ("error", "record")
            assert slow_client.get("/health").status_code == 200
    finally:
        running.stop()
