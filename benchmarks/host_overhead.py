"""Host-side cost of a generation step (issue 6): what the GPU cannot hide, measured on the CPU.

A decode step's wall time is the decoder call (on CUDA, a CUDA-graph replay) plus the host's own work: the
search loop in Python, copying the new token ids in, binding, reading the ids or logits back. The GPU targets
(<= 0.40 ms per fp16 step at B = 1) leave little room for it, so it is measured here, on the CPU, with a model
so small that the decoder call is short:

  greedy   per static variant: whole generate call over the new tokens, the time inside the decoder's
           run_with_iobinding per step, the encoder's (once per call), and the rest per step: the host overhead;
  beam     ranking the K V candidates of one input for beam search: a full stable argsort against
           runtime.stepper.top_candidates (the same result), at K = 4 and V = 32,000;
  prompt   a decoder-only model's 96-token prompt on the static steppers: one decoder.onnx call whose cache is
           moved into the static slots (what the stepper does) against 96 one-token calls (what it did before).

    .venv/bin/python benchmarks/host_overhead.py [--tokens 128] [--batch 1 64]
"""

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_model, timed_calls

from refformer.export.contract import STATIC_VARIANTS, decoder_graph, graph_file
from refformer.export.export import export_model
from refformer.refimpl import Config, init_params, save
from refformer.refimpl.generate import GenerationOptions, search_iter
from refformer.runtime.stepper import StaticOrtStepper, top_candidates


def greedy_overhead(onnx_dir, cfg, variant, batch, tokens, repeats=5):
    stepper = StaticOrtStepper(cfg, onnx_dir, "fp16", decoder_file=graph_file(decoder_graph(variant)),
                               threads=1)
    src = np.random.default_rng(0).integers(4, cfg.vocab_size, (batch, 32))
    options = GenerationOptions(max_new_tokens=tokens, min_new_tokens=tokens)
    list(search_iter(stepper, cfg, options, src_ids=src))  # warm-up: buffers, bindings
    totals = []
    with timed_calls(stepper.decoder) as decoder_times, timed_calls(stepper.encoder) as encoder_times:
        for _ in range(repeats):
            decoder_times.clear()
            encoder_times.clear()
            start = time.perf_counter()
            list(search_iter(stepper, cfg, options, src_ids=src))
            totals.append((time.perf_counter() - start, sum(decoder_times), sum(encoder_times)))
    total, decoder, encoder = min(totals)  # the least disturbed run
    return {"variant": variant, "batch": batch, "ms_per_step": 1e3 * total / tokens,
            "decoder_ms": 1e3 * decoder / tokens,
            "encoder_ms": 1e3 * encoder, "host_ms": 1e3 * (total - decoder - encoder) / tokens}


def ranking(K=4, V=32000, repeats=20):
    rows = []
    rng = np.random.default_rng(0)
    for live in (1, K):  # the first step has one live beam (the others are -inf), later ones K
        scores = rng.standard_normal(K * V)
        scores[live * V:] = -np.inf
        assert np.array_equal(top_candidates(scores, 2 * K), np.argsort(-scores, kind="stable")[: 2 * K])
        timings = {}
        for name, rank in (("argsort", lambda: np.argsort(-scores, kind="stable")[: 2 * K]),
                           ("top_candidates", lambda: top_candidates(scores, 2 * K))):
            rank()
            start = time.perf_counter()
            for _ in range(repeats):
                rank()
            timings[name] = 1e3 * (time.perf_counter() - start) / repeats
        rows.append({"live_beams": live, "candidates": K * V, "argsort_ms": timings["argsort"],
                     "top_candidates_ms": timings["top_candidates"]})
    return rows


def prompt_pass(work, T=96, repeats=5):
    cfg = Config(vocab_size=1000, d_model=64, n_heads=8, d_ff=128, n_decoder_layers=6, max_positions=256, dropout=0.0,
                 family="decoder-only")
    save(work / "lm", cfg, init_params(cfg, np.random.default_rng(0)))
    export_model(work / "lm", work / "lm-onnx", dtype="fp16", static_length=160, fused_attention=True, measure=False)
    ids = np.random.default_rng(1).integers(4, cfg.vocab_size, (1, T))
    keep, positions = np.ones((1, T), np.int64), np.arange(T)[None, :]
    rows = []
    for variant in STATIC_VARIANTS:
        stepper = StaticOrtStepper(cfg, work / "lm-onnx", "fp16", decoder_file=graph_file(decoder_graph(variant)),
                                   threads=1)
        timings = {}
        for name in ("one call", "token by token"):
            best = float("inf")
            for _ in range(repeats + 1):  # the first run loads and warms up
                stepper.start(None, None, 1)
                start = time.perf_counter()
                if name == "one call":
                    stepper.step(ids, positions, keep)
                else:
                    for j in range(T):
                        stepper.mask[:, : j + 1] = 1
                        stepper.run_one(ids[:, j:j + 1], positions[:, j:j + 1])
                best = min(best, time.perf_counter() - start)
            timings[name] = 1e3 * best
        rows.append({"variant": variant, "prompt_tokens": T, "one_call_ms": timings["one call"],
                     "token_by_token_ms": timings["token by token"]})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args()
    cfg = Config(vocab_size=1000, d_model=64, n_heads=8, d_ff=128, n_encoder_layers=1, n_decoder_layers=6,
                 max_positions=256, dropout=0.0)
    work = Path(tempfile.mkdtemp(prefix="refformer-host-"))
    save(work / "model", cfg, init_params(cfg, np.random.default_rng(0)))
    export_model(work / "model", work / "onnx", dtype="fp16", static_length=160, fused_attention=True, measure=False)
    greedy = [greedy_overhead(work / "onnx", cfg, variant, batch, args.tokens)
              for batch in args.batch for variant in STATIC_VARIANTS]
    print(f"greedy, {args.tokens} new tokens, D 64, 6 decoder layers, fp16 graphs on ONNX Runtime CPU (1 thread)")
    print(f"{'variant':<14} {'B':>3} {'ms/step':>8} {'decoder ms':>10} {'host ms':>8} {'encoder ms/call':>15}")
    for row in greedy:
        print(f"{row['variant']:<14} {row['batch']:>3} {row['ms_per_step']:>8.3f} {row['decoder_ms']:>10.3f} "
              f"{row['host_ms']:>8.3f} {row['encoder_ms']:>15.2f}")
    beam = ranking()
    print("\nbeam-search ranking of K V candidates (K = 4, V = 32,000), 2 K best")
    print(f"{'live beams':>10} {'argsort ms':>11} {'top_candidates ms':>18}")
    for row in beam:
        print(f"{row['live_beams']:>10} {row['argsort_ms']:>11.3f} {row['top_candidates_ms']:>18.3f}")
    prompt = prompt_pass(work)
    print("\nprompt pass, decoder-only, 96 tokens, B = 1 (ms)")
    print(f"{'variant':<14} {'one call':>9} {'token by token':>15}")
    for row in prompt:
        print(f"{row['variant']:<14} {row['one_call_ms']:>9.2f} {row['token_by_token_ms']:>15.2f}")
    info = {"date": datetime.date.today().isoformat(), "cpu": cpu_model()}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "host_overhead.json").write_text(json.dumps({"info": info, "greedy": greedy, "beam": beam,
                                                                   "prompt": prompt}, indent=1))


if __name__ == "__main__":
    main()
