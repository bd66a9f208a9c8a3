"""Load on `refformer serve`: dynamic batching (a 5 ms window) against one text per batch (--max-batch 1).

Issue 17. The bundled German->English model on the CPU, 2 ONNX Runtime threads, served by the real command
(`refformer serve --port 0 --threads 2 ...` in a process of its own) on 127.0.0.1 only. 16 concurrent clients
(threads of this process, one kept-alive http.client connection each) each send 8 one-sentence greedy requests, one
after the other: 128 requests per run. The clients use the standard library's http.client, not httpx: on this 2-core
machine httpx's AsyncClient took 0.51 s of CPU for 128 requests (4 ms each, taken from the server's cores), the
threads with http.client 0.02 s. Before the timed requests, 16 untimed ones warm the server. Every request has a 60 s
timeout and the whole script a deadline (--deadline, 600 s); each server is stopped with SIGTERM (killed if it
does not stop within 30 s), so the script always ends by itself.

    .venv/bin/python benchmarks/serve_load.py [--reps 3] [--json benchmarks/results/serve_load.json]
    .venv/bin/python benchmarks/serve_load.py --quick        # 4 clients x 2 requests, 1 rep: a smoke check

Per run: wall time from the first request sent to the last answer; latency of each request (sent -> answered) as
p50 and p99 (nearest rank); tokens/s = generated ids (eos included) / wall; requests/s; the server's batch sizes
(from its /metrics). The two settings run alternately, --reps times each, on a fresh server per run; the table gives
the median run of each (by tokens/s) and the speed-up of their medians. The generated ids of both settings are
compared: batching must not change any answer. Clients and server share the machine's cores: on 2 cores the
clients' own CPU time (HTTP, JSON) is part of what is measured, as it would be for a load generator on the host.
"""

import argparse
import datetime
import http.client
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from machine import cpu_model  # benchmarks/machine.py (scripts run from their folder on sys.path)

SENTENCES = ["Das Wetter ist heute schön.", "Ich habe Hunger.", "Wir gehen morgen ins Kino.", "Guten Morgen!",
             "Der Zug kommt um acht Uhr an.", "Kannst du mir bitte helfen?", "Das Buch liegt auf dem Tisch.",
             "Sie hat lange in Berlin gewohnt.", "Mein Bruder spielt gern Fußball.", "Wo ist der Bahnhof?",
             "Das Essen war sehr gut.", "Ich verstehe das nicht.", "Er arbeitet in einem großen Krankenhaus.",
             "Heute Abend regnet es.", "Wir haben keine Zeit mehr.", "Die Kinder spielen im Garten."]
SETTINGS = {"window 5 ms": ["--batch-window-ms", "5", "--max-batch", "16"],
            "max batch 1": ["--batch-window-ms", "0", "--max-batch", "1"]}
FULL = dict(clients=16, requests=8)
QUICK = dict(clients=4, requests=2)


def start_server(flags, threads):
    """A `refformer serve` process on a free loopback port; its url once it listens."""
    command = [sys.executable, "-c", "from refformer.runtime.cli import main; main()", "serve", "--port", "0",
               "--threads", str(threads), "--provider", "cpu", *flags]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = process.stderr.readline()
    match = re.search(r"on (http://127\.0\.0\.1:\d+) ", line)
    if match is None:
        process.kill()
        raise SystemExit(f"the server did not start: {line.strip()} {process.stderr.read().strip()}")
    return process, match[1]


def stop_server(process):
    """SIGTERM (uvicorn's graceful shutdown), then a kill after 30 s."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    process.stderr.close()


def client_run(address, number, requests, latencies, answers):
    """One client: requests greedy requests of its sentences, one after the other, on one kept-alive connection."""
    connection = http.client.HTTPConnection(*address, timeout=60)
    try:
        for k in range(requests):
            body = json.dumps({"text": SENTENCES[(number + k) % len(SENTENCES)]})
            sent = time.perf_counter()
            connection.request("POST", "/v1/generate", body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            data = response.read()
            latencies.append(time.perf_counter() - sent)
            if response.status != 200:
                raise SystemExit(f"error: a request got {response.status}: {data[:200]!r}")
            answers[(number, k)] = json.loads(data)["ids"]
    finally:
        connection.close()


def load(url, clients, requests):
    """Every client at once, each in a thread; (wall seconds, latencies, {(client, k): ids})."""
    address = re.match(r"http://([\d.]+):(\d+)", url).groups()
    latencies, answers, failures = [], {}, []

    def client(number):
        try:
            client_run(address, number, requests, latencies, answers)
        except BaseException as error:  # noqa: BLE001  (reported after the others finish)
            failures.append(error)

    threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if failures:
        raise SystemExit(f"error: a client failed: {failures[0]}")
    return wall, latencies, answers


def percentile(values, fraction):
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, int(-(-fraction * len(ordered) // 1)) - 1))]


def batch_sizes(url):
    """(batches, mean texts per batch) from the server's /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=60) as response:
        text = response.read().decode()
    count = int(re.search(r"^refformer_batch_size_count (\d+)$", text, re.M)[1])
    total = float(re.search(r"^refformer_batch_size_sum ([\d.]+)$", text, re.M)[1])
    return count, total / count if count else 0.0


def one_run(name, threads, shape):
    process, url = start_server(SETTINGS[name], threads)
    try:
        load(url, shape["clients"], 1)  # warm-up: one request per client, not timed
        warm_batches, warm_mean = batch_sizes(url)
        wall, latencies, answers = load(url, shape["clients"], shape["requests"])
        batches, mean = batch_sizes(url)
    finally:
        stop_server(process)
    tokens = sum(map(len, answers.values()))
    timed_batches = batches - warm_batches
    return dict(setting=name, requests=len(latencies), wall_s=round(wall, 4), tokens=tokens,
                tokens_per_s=round(tokens / wall, 1), requests_per_s=round(len(latencies) / wall, 1),
                p50_ms=round(1000 * percentile(latencies, 0.50), 2),
                p99_ms=round(1000 * percentile(latencies, 0.99), 2),
                batches=timed_batches,
                mean_batch=round((mean * batches - warm_mean * warm_batches) / timed_batches, 2)), answers


def load_average():
    return [round(x, 2) for x in os.getloadavg()]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--deadline", type=float, default=600.0, help="seconds; the script stops past it")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    shape = QUICK if args.quick else FULL
    reps = 1 if args.quick else args.reps
    signal.signal(signal.SIGALRM, lambda *_: sys.exit(f"stopped: past the --deadline of {args.deadline:g} s"))
    signal.alarm(int(args.deadline))
    before = load_average()
    runs, answers = [], {}
    for rep in range(reps):
        order = list(SETTINGS) if rep % 2 == 0 else list(reversed(SETTINGS))
        for name in order:
            run, answers[name, rep] = one_run(name, args.threads, shape)
            runs.append(run)
            print(f"rep {rep + 1} {name:12s} {run['tokens_per_s']:8.1f} tokens/s  p50 {run['p50_ms']:7.1f} ms  "
                  f"p99 {run['p99_ms']:7.1f} ms  mean batch {run['mean_batch']:.2f}", flush=True)
    signal.alarm(0)
    after = load_average()
    same = all(ids == answers["max batch 1", 0] for ids in answers.values())
    medians = {}
    for name in SETTINGS:
        mine = sorted((run for run in runs if run["setting"] == name), key=lambda run: run["tokens_per_s"])
        medians[name] = mine[len(mine) // 2]
    speedup = medians["window 5 ms"]["tokens_per_s"] / medians["max batch 1"]["tokens_per_s"]
    print(f"\n{'setting':12s} {'tokens/s':>9s} {'req/s':>7s} {'p50 ms':>8s} {'p99 ms':>8s} {'mean batch':>10s}")
    for name, run in medians.items():
        print(f"{name:12s} {run['tokens_per_s']:9.1f} {run['requests_per_s']:7.1f} {run['p50_ms']:8.1f} "
              f"{run['p99_ms']:8.1f} {run['mean_batch']:10.2f}")
    print(f"speed-up (tokens/s, medians): {speedup:.2f}x; answers identical across settings and runs: {same}")
    print(f"load average before {before}, after {after}")
    if args.json:
        result = dict(benchmark="serve_load", date=datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), machine=dict(cpu=cpu_model(), cores=os.cpu_count(), python=platform.python_version()),
            load_average_before=before, load_average_after=after, threads=args.threads, quick=args.quick, reps=reps,
            clients=shape["clients"], requests_per_client=shape["requests"], settings=SETTINGS, runs=runs,
            medians=medians, speedup_tokens_per_s=round(speedup, 2), answers_identical=same)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    if not same:
        sys.exit("error: the answers differ between settings")


if __name__ == "__main__":
    main()
