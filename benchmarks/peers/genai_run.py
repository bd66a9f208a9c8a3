"""Greedy generation with onnxruntime-genai, for benchmarks/generate_imported_cpu.py (issue 14).

Runs INSIDE the venv benchmarks/peers/setup_genai.sh makes (onnxruntime-genai needs the CPU onnxruntime package,
which collides with the project's onnxruntime-gpu), as a subprocess of the benchmark:

    VENV/bin/python benchmarks/peers/genai_run.py MODEL_DIR        # MODEL_DIR: the model builder's output folder

It reads one JSON request per line on stdin and answers each with one JSON line on stdout:

    request  {"ids": [[prompt ids of row 1], ...], "new_tokens": N, "threads": T, "reps": R}   (reps default 1)
    answer   {"total_s": [R seconds], "ids": [[N new ids of row 1], ...], "versions": {...}}
             or {"error": "one line"}

All rows of a request have the same length S (no padding). The length is forced the only way its API offers:
search options min_length = max_length = S + N (both count the prompt), so eos cannot end a row early and every
row gets N new tokens; greedy (do_sample False). One og.Model per thread count, its decoder session pinned to T
intra-op threads through the genai_config overlay {"model": {"decoder": {"session_options":
{"intra_op_num_threads": T}}}}. total_s covers making the generator, the prompt (append_tokens) and the N steps;
the ids are get_sequence(row)[S:] (the prompt cut off; no trailing eos can be among them, see above).
"""

import json
import sys
import time

import numpy as np
import onnxruntime
import onnxruntime_genai as og


def load(model_dir, threads):
    config = og.Config(model_dir)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    return og.Model(config)


def generate(model, ids, new_tokens):
    """(seconds, [B, new_tokens] new ids) of one greedy call."""
    batch, length = ids.shape
    start = time.perf_counter()
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, batch_size=batch, max_length=length + new_tokens,
                              min_length=length + new_tokens)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)
    while not generator.is_done():
        generator.generate_next_token()
    total = time.perf_counter() - start
    return total, [generator.get_sequence(row)[length:].tolist() for row in range(batch)]


def main():
    if len(sys.argv) != 2:
        print("usage: genai_run.py MODEL_DIR  (requests as JSON lines on stdin)", file=sys.stderr)
        return 2
    model_dir, models = sys.argv[1], {}
    versions = {"onnxruntime_genai": og.__version__, "onnxruntime": onnxruntime.__version__}
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            threads = int(request["threads"])
            if threads not in models:
                models[threads] = load(model_dir, threads)
            ids = np.asarray(request["ids"], dtype=np.int32)
            times, out = [], None
            for _ in range(int(request.get("reps", 1))):
                seconds, out = generate(models[threads], ids, int(request["new_tokens"]))
                times.append(seconds)
            answer = {"total_s": times, "ids": out, "versions": versions}
        except Exception as error:  # one line back to the benchmark, which raises it
            answer = {"error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"}
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
