"""`refformer serve`: the Generator behind HTTP, with dynamic batching across clients and server-sent-event streaming.

Why starlette with uvicorn, not FastAPI: the server has four routes and checks its requests with the project's own
GenerationOptions (whose errors already name the field); FastAPI would add pydantic models that restate those checks
and an OpenAPI layer nobody asked for, over the same starlette underneath. starlette gives routing, request bodies and
StreamingResponse; uvicorn gives the HTTP server, its graceful shutdown on SIGTERM (running requests finish, then the
process ends by the signal) and Ctrl-C (exit 130, 'error: interrupted'). /metrics writes the Prometheus text format
(version 0.0.4) by hand: prometheus_client is not in the serve extra, and three counters, a gauge and three
histograms are a few dozen lines (Metrics below).

Endpoints:
    POST /v1/generate  {"text": str} or {"texts": [str, ...]}, plus decoding options named as the fields of
                       GenerationOptions, which are generate's flags with _ for - (max_new_tokens, num_beams, top_p,
                       do_sample, seed, ...: OPTION_NAMES), and "stream": true|false.
                       -> 200 with the record of generate --json for "text", {"records": [...]} for "texts" (records
                       in the order of the texts, "line" counting them from 1); with "stream": true, server-sent
                       events: `event: piece` {"text": piece} per text piece (Generator.stream), then `event:
                       record` {the record}; `event: error` {"error": ...} if it fails midway.
    GET /health        {"status": "ok", "model": folder, "queue": texts waiting}
    GET /metrics       Prometheus text: requests by endpoint and status, input and generated tokens, queue depth,
                       batch sizes (texts), request latency and batch time histograms (seconds).

Errors are {"error": message} with: 400 body that is not JSON (NaN, 1e999 and 5000-digit integers included, a key
twice in one object), not a JSON object, or with an unknown field, or a stream request for several texts, beams or
sequences; 413 body over --max-body-bytes; 415 a compressed body (Content-Encoding); 422 a field of the wrong type
or value (GenerationOptions' checks), no text, more texts than --max-batch, a text over --max-input-tokens (or the
model's positions), max_new_tokens over --max-new-tokens; 504 a request not answered within --request-timeout (504,
not 408: 408 means the client was slow to send, here the server was slow to answer); 500 a generation that failed.
The Content-Type is not checked (curl -d sends form-urlencoded). A client that goes away leaves the server serving,
and /metrics counts its request as status 499: while it sends its body, nothing runs; while its texts wait, they
leave the queue; while its batch runs, the batch finishes (a batch is not stopped midway) and its answer is dropped;
a stream stops at its next piece. A request that timed out leaves the queue likewise (or its result is dropped if
its batch was running). HTTP that uvicorn cannot parse (a bad Content-Length) gets uvicorn's own plain-text 400.

Dynamic batching: every text of a request is one item with its own options (GenerationOptions: a request's options,
the checkpoint's settings filled in as the Generator does, its budget cut to --max-new-tokens, and seed 0 when it
does not sample). One batcher task takes the oldest waiting item, waits until --batch-window-ms after its arrival or
after the worker finished its last batch, whichever is later (or until --max-batch items with equal options wait),
and runs every waiting item with those options, oldest first, up to --max-batch, as one
Generator.generate_rows_and_ids call in the one worker thread that owns the Generator (ONNX Runtime releases the GIL
while it runs). While a batch runs, new requests queue and form the next batch. A text's result is what it gives
alone (refimpl.generate's batch independence: per-row budgets and per-row random generators; tested against the
Generator). Sampled requests batch only with equal options, seed included: without a seed each request draws its
own (as generate does), and returns it in "seed".
"""

import asyncio
import concurrent.futures
import dataclasses
import json
import math
import threading
import time
import typing
from collections import deque

import numpy as np
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from refformer.refimpl.errors import RefformerError
from refformer.refimpl.generate import GenerationOptions, check_search_fits_memory, step_budget
from refformer.refimpl.model import left_padded_positions
from refformer.runtime.batch import finite_float, generated_record, not_json
from refformer.runtime.errors import InputTooLong
from refformer.runtime.generate_cli import OPTION_NAMES

REQUEST_FIELDS = ("text", "texts", "stream")  # the other fields of a request are OPTION_NAMES
ENDPOINTS = ("/v1/generate", "/health", "/metrics")  # /metrics counts other paths' requests as endpoint="other"
CLIENT_LEFT = 499  # the status /metrics counts for a request whose client left before its answer (nginx's code)


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """The server's limits and batching, as `refformer serve` takes them (the option names in the errors).

    batch_window_ms: how long the oldest waiting text waits for others (ms, >= 0, finite, shorter than
    request_timeout); max_batch: texts per batch and per request (>= 1); max_input_tokens / max_new_tokens: None for
    the model's positions; request_timeout: seconds (> 0, finite); max_body_bytes: request body size (>= 1). Invalid
    values raise RefformerError naming the option.
    """

    batch_window_ms: float = 5.0
    max_batch: int = 16
    max_input_tokens: int | None = None
    max_new_tokens: int | None = None
    request_timeout: float = 60.0
    max_body_bytes: int = 1 << 20

    def __post_init__(self):
        def refuse(option, rule, value):
            raise RefformerError(f"--{option} must be {rule}, got {value!r}")

        if not (isinstance(self.batch_window_ms, (int, float)) and math.isfinite(self.batch_window_ms)
                and 0 <= self.batch_window_ms <= 60_000):
            refuse("batch-window-ms", "a number of milliseconds from 0 to 60000", self.batch_window_ms)
        if not (isinstance(self.request_timeout, (int, float)) and math.isfinite(self.request_timeout)
                and 0 < self.request_timeout <= 86_400):
            refuse("request-timeout", "a number of seconds above 0, at most 86400", self.request_timeout)
        if self.batch_window_ms / 1000 >= self.request_timeout:  # every request of a quiet server would time out
            refuse("batch-window-ms", f"shorter than --request-timeout ({self.request_timeout:g} s)",
                   self.batch_window_ms)
        for option, value, optional in (("max-batch", self.max_batch, False),
                                        ("max-input-tokens", self.max_input_tokens, True),
                                        ("max-new-tokens", self.max_new_tokens, True),
                                        ("max-body-bytes", self.max_body_bytes, False)):
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                refuse(option, "an integer >= 1", value)


class RequestError(Exception):
    """A request the server refuses: an HTTP status (4xx) and a one-line message, sent as {"error": message}."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status, self.message = status, message


# ---------------------------------------------------------------------------- metrics (Prometheus text format)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # texts


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count of the observed values."""

    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.count = tuple(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, value):
        """Count value (a float) in every bucket whose upper bound it does not exceed. Raises nothing."""
        for number, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[number] += 1
        self.sum += value
        self.count += 1

    def lines(self, name):
        """The histogram's sample lines: name_bucket{le=...}, name_sum, name_count. Raises nothing."""
        out = [f'{name}_bucket{{le="{bound:g}"}} {count}' for bound, count in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                      f"{name}_count {self.count}"]


class Metrics:
    """The server's counters, read by GET /metrics. Updated on the event loop's thread only (no locks)."""

    def __init__(self):
        self.requests = {}  # (endpoint, status) -> count
        self.input_tokens = self.generated_tokens = 0
        self.batch_size = Histogram(BATCH_BUCKETS)
        self.request_seconds = Histogram(LATENCY_BUCKETS)
        self.batch_seconds = Histogram(LATENCY_BUCKETS)

    def request_done(self, endpoint, status, seconds):
        """Count one answered request and its latency (seconds, POST /v1/generate only). Raises nothing."""
        self.requests[endpoint, status] = self.requests.get((endpoint, status), 0) + 1
        if endpoint == "/v1/generate":
            self.request_seconds.observe(seconds)

    def render(self, queue_depth):
        """The Prometheus text exposition (format 0.0.4) of every metric, queue_depth the texts waiting now.
        Raises nothing."""
        out = ["# HELP refformer_requests_total HTTP requests answered, by endpoint and status code.",
               "# TYPE refformer_requests_total counter"]
        out += [f'refformer_requests_total{{endpoint="{endpoint}",status="{status}"}} {count}'
                for (endpoint, status), count in sorted(self.requests.items())]
        out += ["# HELP refformer_input_tokens_total Tokens of the texts generated from.",
                "# TYPE refformer_input_tokens_total counter", f"refformer_input_tokens_total {self.input_tokens}",
                "# HELP refformer_generated_tokens_total Tokens generated (eos included), every returned sequence.",
                "# TYPE refformer_generated_tokens_total counter",
                f"refformer_generated_tokens_total {self.generated_tokens}",
                "# HELP refformer_queue_depth Texts waiting for a batch.", "# TYPE refformer_queue_depth gauge",
                f"refformer_queue_depth {queue_depth}",
                "# HELP refformer_batch_size Texts per batch run by the Generator.",
                "# TYPE refformer_batch_size histogram", *self.batch_size.lines("refformer_batch_size"),
                "# HELP refformer_request_seconds Time from a generate request's arrival to its answer.",
                "# TYPE refformer_request_seconds histogram", *self.request_seconds.lines("refformer_request_seconds"),
                "# HELP refformer_batch_seconds Time the Generator took per batch.",
                "# TYPE refformer_batch_seconds histogram", *self.batch_seconds.lines("refformer_batch_seconds")]
        return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------- requests


def option_kinds():
    """{option name: the JSON types it takes}, from GenerationOptions' annotations (int | None: an integer or null).

    Raises nothing.
    """
    fields = {field.name: field.type for field in dataclasses.fields(GenerationOptions)}
    return {name: typing.get_args(fields[name]) or (fields[name],) for name in OPTION_NAMES}


OPTION_KINDS = option_kinds()
KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number", type(None): "null"}


def json_kind(value):
    """The JSON type name of a parsed value, for messages. Raises nothing."""
    for kind, word in ((bool, "a boolean"), (str, "a string"), (int, "an integer"), (float, "a number"),
                       (list, "an array"), (dict, "an object"), (type(None), "null")):
        if isinstance(value, kind):
            return word
    return type(value).__name__


def check_option_type(name, value):
    """RequestError 422 unless value has a JSON type the option takes (a boolean is not an integer; an integer is
    a number)."""
    kinds = OPTION_KINDS[name]
    if isinstance(value, bool):
        fits = bool in kinds
    elif isinstance(value, int):
        fits = int in kinds or float in kinds
    elif isinstance(value, float):
        fits = float in kinds
    else:
        fits = value is None and type(None) in kinds
    if not fits:
        words = " or ".join(KIND_WORDS[kind] for kind in kinds)
        raise RequestError(422, f"{name} must be {words}, got {json_kind(value)}")


def unique_keys(pairs):
    """json.loads's object_pairs_hook: an object whose key appears twice is refused (json.loads would keep the last
    silently: {"text": "a", "text": "b"} asked for one thing and got another). Raises ValueError naming the key."""
    body = {}
    for key, value in pairs:
        if key in body:
            raise ValueError(f"the key {key!r} appears twice in an object")
        body[key] = value
    return body


def parse_body(raw):
    """A request body's bytes -> the JSON object. Raises RequestError 400 for bytes that are not a JSON object
    (not UTF-8, malformed, NaN or Infinity, 1e999, an integer of over 4300 digits, nested too deeply, a key twice in
    one object)."""
    try:
        body = json.loads(raw, parse_constant=not_json, parse_float=finite_float, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as error:
        raise RequestError(400, f"the body is not valid JSON: {error.msg} (line {error.lineno} column "
                                f"{error.colno})") from None
    except UnicodeDecodeError:
        raise RequestError(400, "the body is not valid JSON: it is not UTF-8") from None
    except (ValueError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error).split(";")[0]
        raise RequestError(400, f"the body is not valid JSON: {reason}") from None
    if not isinstance(body, dict):
        raise RequestError(400, f"the body must be a JSON object like {{\"text\": \"...\"}}, got {json_kind(body)}")
    unknown = sorted(set(body) - set(REQUEST_FIELDS) - set(OPTION_NAMES))
    if unknown:
        raise RequestError(400, f"unknown field {unknown[0]!r}; the fields are {', '.join(REQUEST_FIELDS)} and the "
                                f"options {', '.join(OPTION_NAMES)}")
    return body


def request_texts(body, max_batch):
    """The texts of a request body and how messages name them ("text", or "texts[0]", ...). Raises RequestError 422
    for no text, both fields, a text that is not a string, or more texts than max_batch."""
    if ("text" in body) == ("texts" in body):
        raise RequestError(422, 'give "text" (a string) or "texts" (a list of strings), not both' if "text" in body
                           else 'give "text" (a string) or "texts" (a list of strings)')
    if "text" in body:
        if not isinstance(body["text"], str):
            raise RequestError(422, f"text must be a string, got {json_kind(body['text'])}")
        return [body["text"]], ["text"]
    texts = body["texts"]
    if not isinstance(texts, list) or not texts:
        raise RequestError(422, "texts must be a non-empty list of strings" + (
            "" if isinstance(texts, list) else f", got {json_kind(texts)}"))
    if len(texts) > max_batch:
        raise RequestError(422, f"texts has {len(texts)} texts, more than this server's --max-batch {max_batch}: "
                                "send them in several requests")
    for number, text in enumerate(texts):
        if not isinstance(text, str):
            raise RequestError(422, f"texts[{number}] must be a string, got {json_kind(text)}")
    return texts, [f"texts[{number}]" for number in range(len(texts))]


def request_options(body):
    """The request's GenerationOptions: its seed drawn now when it samples without one, 0 when it does not sample
    (so that requests of equal options batch together). Raises RequestError 422 for an option of the wrong type or
    value."""
    options = {name: body[name] for name in OPTION_NAMES if name in body}
    for name, value in options.items():
        check_option_type(name, value)
    try:
        generation = GenerationOptions(**options)
    except RefformerError as error:
        raise RequestError(422, str(error)) from None
    # greedy and beam search draw nothing: the seed GenerationOptions drew must not keep equal requests apart
    return generation if generation.do_sample else dataclasses.replace(generation, seed=0)


def default_budget(generator, row, options):
    """How many tokens the search would generate at most for one token row with options (refimpl.generate's
    step_budget: max_new_tokens, else the checkpoint's max_length, else 2 S + 10 or what fits a prompt). An int.
    Raises RefformerError for a row that is not token ids."""
    inputs = generator.pad_inputs([row])
    if "src_mask" in inputs:
        return int(step_budget(generator.cfg, options, inputs["src_mask"], np.zeros((1, 1), np.int64))[0])
    return int(step_budget(generator.cfg, options, None, left_padded_positions(inputs["prompt_mask"]))[0])


@dataclasses.dataclass(eq=False)
class Item:
    """One text waiting for a batch: its token row, its full options (the batch key) and the future of its
    (output, ids); stream items carry the events of their stream instead."""

    row: list
    options: GenerationOptions
    future: asyncio.Future
    arrival: float
    text: str = ""
    stream: "Stream | None" = None


@dataclasses.dataclass(eq=False)
class Stream:
    """A streaming request's channel from the worker thread: events ("piece", text), ("record", (output, ids)) or
    ("error", message), and the flag that stops the worker at its next piece (the client left or timed out)."""

    events: asyncio.Queue
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)


class Batcher:
    """The queue of waiting texts, the batcher task that forms batches, and the one worker thread that owns the
    Generator (see the module docstring). Its coroutines run on the server's event loop."""

    def __init__(self, generator, settings, metrics):
        self.generator, self.settings, self.metrics = generator, settings, metrics
        self.waiting = deque()
        self.arrived = asyncio.Event()
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="refformer-generate")
        self.task = None
        self.free_since = 0.0  # loop time when the worker finished its last batch

    def start(self):
        """Start the batcher task on the running loop. Raises nothing."""
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self):
        """Cancel the batcher task and shut the worker down (after its batch). Raises nothing."""
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.worker.shutdown(wait=True, cancel_futures=True)

    @property
    def depth(self):
        """Texts waiting for a batch (cancelled ones excluded). Raises nothing."""
        return sum(not item.future.done() for item in self.waiting)

    def submit(self, items):
        """Queue items (from one request) for the batcher. Raises nothing."""
        self.waiting.extend(items)
        self.arrived.set()

    async def next_batch(self):
        """The next batch: the oldest waiting item and the others with its options, up to max_batch, once the
        window after the oldest one's arrival (or after the worker got free, if later) has passed or the batch is
        full (a stream item goes alone at once)."""
        loop = asyncio.get_running_loop()
        window = self.settings.batch_window_ms / 1000
        while True:
            while self.waiting and self.waiting[0].future.done():  # its client timed out or went away
                self.waiting.popleft()
            if not self.waiting:
                self.arrived.clear()
                await self.arrived.wait()
                continue
            oldest = self.waiting[0]
            if oldest.stream is not None:
                return [self.waiting.popleft()]
            same = [item for item in self.waiting
                    if item.stream is None and not item.future.done() and item.options == oldest.options]
            # the window opens at the oldest item's arrival, or when the worker got free if that is later: the
            # clients just answered send their next requests within it, and the batches do not split in two halves
            remaining = max(oldest.arrival, self.free_since) + window - loop.time()
            if len(same) >= self.settings.max_batch or remaining <= 0:
                batch = same[:self.settings.max_batch]
                taken = set(map(id, batch))
                self.waiting = deque(item for item in self.waiting if id(item) not in taken)
                return batch
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), remaining)
            except TimeoutError:
                pass

    async def run(self):
        """Form batches and run them in the worker thread, one at a time, forever (until cancelled)."""
        loop = asyncio.get_running_loop()
        while True:
            batch = await self.next_batch()
            started = time.perf_counter()
            try:
                await self.run_batch(batch, loop, started)
            finally:
                self.free_since = loop.time()

    async def run_batch(self, batch, loop, started):
        """Run one batch (or one stream) in the worker thread and answer its items' futures: their (output, ids), or
        the exception the Generator raised. Raises nothing."""
        if batch[0].stream is not None:
            await loop.run_in_executor(self.worker, self.run_stream, batch[0], loop)
            return
        self.metrics.batch_size.observe(len(batch))
        try:
            results = await loop.run_in_executor(self.worker, self.generator.generate_rows_and_ids,
                                                 [item.row for item in batch], batch[0].options)
        except Exception as error:  # noqa: BLE001  (every request of the batch gets the error; the server stays)
            results = [error] * len(batch)
        finally:
            self.metrics.batch_seconds.observe(time.perf_counter() - started)
        for item, result in zip(batch, results):
            if item.future.done():  # its client timed out or went away
                continue
            if isinstance(result, Exception):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)

    def run_stream(self, item, loop):
        """In the worker thread: Generator.stream's pieces of item's text as ("piece", text) events, then
        ("record", (output, ids)) from Generator.generate_rows_and_ids with the same options (a second search:
        stream yields text, not ids), or ("error", message); stops at the next piece once item.stream.stop is set.
        Raises nothing."""
        stream = item.stream

        def post(kind, value):
            loop.call_soon_threadsafe(stream.events.put_nowait, (kind, value))

        try:
            for piece in self.generator.stream(item.text, **vars(item.options)):
                if stream.stop.is_set():
                    return
                post("piece", piece)
            if not stream.stop.is_set():
                post("record", self.generator.generate_rows_and_ids([item.row], item.options)[0])
        except Exception as error:  # noqa: BLE001  (reported to its client; the server stays)
            post("error", failure_message(error))


def failure_message(error):
    """One line for a generation that failed. Raises nothing."""
    if isinstance(error, RefformerError):
        return str(error)
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"generation failed: {type(error).__name__}{': ' + reason if reason else ''}"


class Server:
    """The Generator, the settings, the metrics and the batcher of one `refformer serve`; app() is its ASGI app."""

    def __init__(self, generator, settings):
        self.generator, self.settings = generator, settings
        self.metrics = Metrics()
        self.batcher = None
        self.input_limit = self.model_input_limit()
        if settings.max_input_tokens is not None:
            self.input_limit = min(self.input_limit, settings.max_input_tokens)

    def model_input_limit(self):
        """The most tokens a text may have for this model (its positions less the specials around it), as
        Generator.encode_rows counts them. Raises nothing."""
        cfg, affixes = self.generator.cfg, self.generator.affixes
        return cfg.max_positions - max(1, sum(map(len, affixes or ())))

    def app(self):
        """The starlette app: the routes, JSON errors for starlette's own 404 and 405, and the batcher started and
        stopped with the app's lifespan. Raises nothing."""
        import contextlib

        @contextlib.asynccontextmanager
        async def lifespan(app):
            self.batcher = Batcher(self.generator, self.settings, self.metrics)
            self.batcher.start()
            try:
                yield
            finally:
                await self.batcher.stop()

        async def http_error(request, error):
            path = request.url.path
            self.metrics.request_done(path if path in ENDPOINTS else "other", error.status_code, 0.0)
            return JSONResponse({"error": error.detail}, status_code=error.status_code, headers=error.headers)

        routes = [Route("/v1/generate", self.generate, methods=["POST"]),
                  Route("/health", self.health, methods=["GET"]),
                  Route("/metrics", self.metrics_text, methods=["GET"])]
        return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})

    async def health(self, request):
        """GET /health: {"status": "ok", "model": folder, "queue": texts waiting}."""
        self.metrics.request_done("/health", 200, 0.0)
        return JSONResponse({"status": "ok", "model": str(self.generator.model_dir), "queue": self.batcher.depth})

    async def metrics_text(self, request):
        """GET /metrics: the Prometheus text exposition."""
        self.metrics.request_done("/metrics", 200, 0.0)
        return PlainTextResponse(self.metrics.render(self.batcher.depth),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def read_body(self, request):
        """The request body, refused (RequestError 413) past max_body_bytes, by its Content-Length or as it
        arrives, and (RequestError 415) when it is compressed (a Content-Encoding other than identity: the server
        reads plain JSON). Raises starlette's ClientDisconnect when the client leaves before the body ends."""
        limit = self.settings.max_body_bytes
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise RequestError(415, f"the body has Content-Encoding {encoding}; this server reads uncompressed JSON "
                                    "only: send it without Content-Encoding")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise RequestError(413, f"the body has {int(declared)} bytes, more than this server's --max-body-bytes "
                                    f"{limit}")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, f"the body has more than this server's --max-body-bytes {limit} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def items(self, body, loop):
        """The request's texts as Items (each checked and tokenized) and whether it streams. Raises RequestError
        for a field or text the server refuses (see the module docstring)."""
        texts, names = request_texts(body, self.settings.max_batch)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(422, f"stream must be true or false, got {json_kind(stream)}")
        options = request_options(body)
        generator, cap = self.generator, self.settings.max_new_tokens
        if options.max_new_tokens is not None and cap is not None and options.max_new_tokens > cap:
            raise RequestError(422, f"max_new_tokens {options.max_new_tokens} is more than this server's "
                                    f"--max-new-tokens {cap}")
        try:
            options = generator.check_options(options)  # the checkpoint's settings, as generate applies them
            check_search_fits_memory(generator.cfg, options, self.settings.max_batch)
        except RefformerError as error:
            raise RequestError(422, str(error).replace("the batch size", "--max-batch")) from None
        if stream and (len(texts) > 1 or "texts" in body or options.num_beams > 1 or options.num_return_sequences > 1):
            raise RequestError(400, "stream is for one \"text\" with num_beams 1 and num_return_sequences 1; send "
                                    "this request without stream")
        try:
            rows = generator.encode_rows(texts, names)
        except InputTooLong as error:  # the server does not cut texts: no truncate to offer
            raise RequestError(422, str(error.with_advice("shorten it"))) from None
        except RefformerError as error:
            raise RequestError(422, str(error)) from None
        items, now = [], loop.time()
        for name, text, row in zip(names, texts, rows):
            if len(row) > self.input_limit:
                raise RequestError(422, f"{name} has {len(row)} tokens, more than this server's --max-input-tokens "
                                        f"{self.input_limit}")
            row_options = options
            if cap is not None:
                try:
                    if default_budget(generator, row, options) > cap:  # the default budget, cut to the cap
                        row_options = dataclasses.replace(options, max_new_tokens=cap)
                except RefformerError as error:  # a checkpoint's max_length with no room after the input
                    raise RequestError(422, str(error)) from None
            stream_channel = Stream(asyncio.Queue()) if stream else None
            items.append(Item(row, row_options, loop.create_future(), now, text, stream_channel))
        return items, stream

    async def generate(self, request):
        """POST /v1/generate (see the module docstring)."""
        started = time.perf_counter()
        response = await self.answer(request, started)
        if not isinstance(response, StreamingResponse):
            self.metrics.request_done("/v1/generate", response.status_code, time.perf_counter() - started)
        return response

    async def answer(self, request, started):
        """The response to one generate request: JSON records, a stream, or {"error": ...}. Raises nothing."""
        loop = asyncio.get_running_loop()
        try:
            body = parse_body(await self.read_body(request))
            items, stream = self.items(body, loop)
        except RequestError as error:
            return JSONResponse({"error": error.message}, status_code=error.status)
        except ClientDisconnect:  # it left while sending its body: nobody to answer
            return JSONResponse({"error": "the client left"}, status_code=CLIENT_LEFT)
        self.metrics.input_tokens += sum(len(item.row) for item in items)
        seconds = self.settings.request_timeout
        if stream:
            return await self.start_stream(request, items[0], started, seconds)
        self.batcher.submit(items)
        results = asyncio.gather(*(item.future for item in items))
        left = loop.create_task(client_left(request))
        try:
            await asyncio.wait((results, left), timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
        if not results.done():  # timed out, or the client left: its texts leave the queue (or their results,
            results.cancel()    # when their batch is running, are dropped); the cancellation is retrieved
            results.add_done_callback(lambda gathered: gathered.cancelled() or gathered.exception())
            if left.done() and not left.cancelled():
                return JSONResponse({"error": "the client left"}, status_code=CLIENT_LEFT)
            return JSONResponse({"error": self.timeout_message()}, status_code=504)
        if results.exception() is not None:  # a failed generation: its message, the server stays
            return JSONResponse({"error": failure_message(results.exception())}, status_code=500)
        results = results.result()
        records = [self.record(number, item, result) for number, (item, result) in enumerate(zip(items, results), 1)]
        return JSONResponse(records[0] if "text" in body else {"records": records})

    def timeout_message(self):
        """The 504 message. Raises nothing."""
        seconds = self.settings.request_timeout
        return (f"the request was not answered within this server's --request-timeout {seconds:g} s; try again, or "
                "with fewer texts or tokens")

    def record(self, number, item, result):
        """The record generate --json writes for one text (runtime/batch.py's generated_record: line, input, output,
        ids, and the seed when it samples); counts its generated tokens. Raises nothing."""
        ids = result[1]
        sequences = ids if item.options.num_return_sequences > 1 else [ids]
        self.metrics.generated_tokens += sum(map(len, sequences))
        return generated_record(number, item.text, result, item.options)

    async def start_stream(self, request, item, started, seconds):
        """The streaming answer: waits (within the timeout, and while its client stays) for the first event, so that
        a queue timeout or a failed start is still a JSON error; then server-sent events until the record. Raises
        nothing."""
        stream = item.stream
        self.batcher.submit([item])
        deadline = started + seconds
        loop = asyncio.get_running_loop()
        first, left = loop.create_task(stream.events.get()), loop.create_task(client_left(request))
        try:
            await asyncio.wait((first, left), timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            left.cancel()
        if not first.done():  # timed out, or the client left: the stream leaves the queue (or stops at its next piece)
            first.cancel()
            stream.stop.set()
            item.future.cancel()
            if left.done() and not left.cancelled():
                return JSONResponse({"error": "the client left"}, status_code=CLIENT_LEFT)
            return JSONResponse({"error": self.timeout_message()}, status_code=504)
        first = first.result()
        if first[0] == "error":
            return JSONResponse({"error": first[1]}, status_code=500)

        async def events():
            event, status = first, 200
            try:
                while True:
                    kind, value = event
                    if kind == "record":
                        yield sse("record", self.record(1, item, value))
                        return
                    yield sse(kind, {"text": value} if kind == "piece" else {"error": value})
                    if kind == "error":
                        status = 500
                        return
                    try:
                        event = await asyncio.wait_for(stream.events.get(), max(0.0, deadline - time.perf_counter()))
                    except TimeoutError:
                        status = 504
                        yield sse("error", {"error": self.timeout_message()})
                        return
            except (asyncio.CancelledError, GeneratorExit):  # the client went away mid-stream
                status = CLIENT_LEFT
                raise
            finally:  # the end, a timeout, or the client went away (the task is cancelled): the worker stops
                stream.stop.set()
                item.future.cancel()
                self.metrics.request_done("/v1/generate", status, time.perf_counter() - started)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def client_left(request):
    """Returns when request's client has disconnected (after its body was read, the ASGI server's next message is
    http.disconnect, sent when the connection closes or once the response is complete). Raises nothing."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse(event, data):
    """One server-sent event: `event: NAME`, `data: JSON` (one line: json.dumps escapes line breaks) and a blank
    line. Raises nothing (data holds JSON values)."""
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def listening_socket(host, port):
    """A socket bound to host:port and listening (port 0: one the system picks). Raises RefformerError when it
    cannot be bound (the port is taken, the host is not this machine's)."""
    import socket

    if not host.strip():
        raise RefformerError("--host is empty; give an address such as 127.0.0.1, or 0.0.0.0 for every one")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise RefformerError(f"--host {host}: {error.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as error:
        sock.close()
        raise RefformerError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    sock.set_inheritable(True)
    return sock


def uvicorn_server(generator, settings):
    """The uvicorn.Server of Server(generator, settings): no access log, lifespan on (the batcher), and uvicorn's
    graceful shutdown with no time limit (running requests finish; each is bounded by --request-timeout).

    Raises nothing.
    """
    config = uvicorn.Config(Server(generator, settings).app(), log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=None)
    return uvicorn.Server(config)


def serve(generator, settings, sock, announce=print):
    """Serve generator with settings on the listening socket sock until SIGTERM or Ctrl-C (uvicorn's graceful
    shutdown: running requests finish first; then uvicorn raises the signal again, so SIGTERM ends the process by
    that signal and Ctrl-C raises KeyboardInterrupt). announce(line) is told the address (the socket listens).

    Returns when the server has stopped. Raises what uvicorn raises.
    """
    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    announce(f"refformer serve: {generator.model_dir} on http://{shown_host}:{port} (POST /v1/generate, GET /health, "
             "GET /metrics)")
    uvicorn_server(generator, settings).run(sockets=[sock])
