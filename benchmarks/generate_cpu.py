"""Greedy decoding on the CPU: refformer on ONNX Runtime against Hugging Face transformers' MarianMTModel.generate.

Issue 5. One encoder-decoder configuration, built twice from the same weights: refformer's random
parameters are saved to a temporary model directory and exported to ONNX (fp32), and the same arrays
are copied into a randomly constructed MarianMTModel (no hub download; Marian's sinusoidal table,
whose cos half is not interleaved, is replaced by refformer's so both compute the same function).
A check before timing compares the greedy tokens of both.

    .venv/bin/python benchmarks/generate_cpu.py [--threads 2 1] [--reps 3] [--warmup 1] [--profile]
    .venv/bin/python benchmarks/generate_cpu.py --quick          # tiny smoke configuration, seconds

--threads takes one or more counts, each used by both sides alike; the first (default: all cores) is
the headline ("results" in the JSON), the others go to "other_threads". On a machine where other
work occupies a core, one thread each is the like-for-like comparison: with more threads than free
cores, torch's OpenMP (spin-waiting, statically split loops) loses far more than ONNX Runtime's pool.
--profile splits refformer's step time (ORT run, input binding + logits copy, the Python search loop).
The full run (--threads 2 1 --profile, 3 reps) takes about 8 minutes on 2 busy cores.

Model: D = 512, H = 8, 6 + 6 post-LN layers (no final norm: Marian has none), F = 2048, ReLU,
V = 32000, sinusoidal positions, scaled embeddings, shared and tied embeddings, 512 positions.
Input: 32 random source tokens (31 + eos) per row; B = 1 and B = 16; 128 new tokens forced
(min_new_tokens = max_new_tokens = 128 on both sides, so eos never ends a row early).

refformer runs refformer.runtime.stepper.OrtStepper (CPUExecutionProvider, intra_op threads = N)
under refformer.refimpl.generate.search_iter, the loop Generator uses; Hugging Face runs
model.generate (torch CPU, torch.set_num_threads(N), inference_mode, default attention
implementation). Repetitions are interleaved (every rep runs every batch size on both sides, the
order of the two sides alternating) so machine noise falls on both alike; the table reports medians
and the spread (min..max).

Per call: total wall time; ms_per_step = total / 128; first = time to the first new token (encoder
+ first decoder step); ms_per_step_after_first = (total - first) / 127; tokens/s = B * 128 / total.
Also measured: the memory bandwidth (large NumPy reads and copies) and the bytes a step must read
(weights and KV cache), which bound the B = 1 step time from below for both implementations alike.
"""

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import (  # benchmarks/machine.py (scripts run from their folder on sys.path)
    cpu_model,
    timed_calls,
    write_report,
)

from refformer.refimpl import Config, init_params, save, sinusoidal_table
from refformer.refimpl.generate import GenerationOptions, Stepper, search_iter

FULL = dict(cfg=Config(vocab_size=32000, d_model=512, n_heads=8, d_ff=2048, n_encoder_layers=6, n_decoder_layers=6,
                       norm_first=False, final_norm=False, activation="relu", positional="sinusoidal",
                       max_positions=512, embed_scale=True, share_embeddings=True, tie_embeddings=True, dropout=0.0),
            src_len=32, new_tokens=128, batch_sizes=(1, 16))
QUICK = dict(cfg=Config(vocab_size=1000, d_model=64, n_heads=4, d_ff=128, n_encoder_layers=2, n_decoder_layers=2,
                        norm_first=False, final_norm=False, activation="relu", positional="sinusoidal",
                        max_positions=64, embed_scale=True, share_embeddings=True, tie_embeddings=True, dropout=0.0),
             src_len=8, new_tokens=16, batch_sizes=(1, 4))


# ---------------------------------------------------------------------------- context


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [flag for flag in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
                            if flag in flags]
    except OSError:
        pass
    return []


def load_average():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def memory_bandwidth(megabytes=256, reps=7):
    """Best-of-reps GB/s of NumPy passes over a large float32 array: read, single-threaded (a.max()) and through
    BLAS (np.dot(a, a), which reads a once, with BLAS's threads), and copy (np.copyto, read + write bytes counted).
    read_gbs, the higher of the two reads, turns bytes per step into a lower bound on the step time."""
    a = np.ones(megabytes * (1 << 20) // 4, np.float32)
    b = np.empty_like(a)

    def best(function):
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return min(times)

    result = {"read_1thread_gbs": a.nbytes / best(a.max) / 1e9,
              "read_blas_gbs": a.nbytes / best(lambda: np.dot(a, a)) / 1e9,
              "copy_gbs": 2 * a.nbytes / best(lambda: np.copyto(b, a)) / 1e9}
    result["read_gbs"] = max(result["read_1thread_gbs"], result["read_blas_gbs"])
    return result


def step_bytes(cfg, batch_size, src_len, new_tokens):
    """Bytes one decoder step reads on average over the new_tokens steps (fp32): the decoder's weights
    (self-attention q, k, v, out; cross-attention q, out — its keys and values come from the encoder once;
    FFN; norms), the tied [V, D] head, the self-attention cache (mean past length) and the cross cache."""
    D, F, V, L, Dh, H = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.n_decoder_layers, cfg.head_dim, cfg.n_heads
    per_layer = 6 * (D * D + D) + (D * F + F) + (F * D + D) + 3 * 2 * D
    weights = 4 * (L * per_layer + V * D)
    mean_past = (new_tokens + 1) / 2
    self_cache = 4 * L * 2 * batch_size * H * mean_past * Dh
    cross_cache = 4 * L * 2 * batch_size * H * src_len * Dh
    return {"weights": weights, "self_cache_mean": int(self_cache), "cross_cache": cross_cache,
            "total": int(weights + self_cache + cross_cache)}


# ---------------------------------------------------------------------------- the two models


def export_refformer(cfg, params, folder):
    """params saved as a model directory under folder and exported to ONNX (fp32); returns the ONNX folder."""
    from refformer.export.export import export_model
    from refformer.export.folder import default_export_dir

    model_dir = Path(folder) / "model"
    save(model_dir, cfg, params)
    export_model(model_dir, dtype="fp32", measure=False)
    return default_export_dir(model_dir, dtype="fp32")


def make_marian(cfg, params):
    """A MarianMTModel with cfg's architecture holding params (Linear weights transposed: torch stores [out, in])."""
    import torch
    from transformers import GenerationConfig, MarianConfig, MarianMTModel

    config = MarianConfig(vocab_size=cfg.vocab_size, decoder_vocab_size=cfg.vocab_size, d_model=cfg.d_model,
                          encoder_layers=cfg.n_encoder_layers, decoder_layers=cfg.n_decoder_layers,
                          encoder_attention_heads=cfg.n_heads, decoder_attention_heads=cfg.n_heads,
                          encoder_ffn_dim=cfg.d_ff, decoder_ffn_dim=cfg.d_ff, activation_function=cfg.activation,
                          max_position_embeddings=cfg.max_positions, scale_embedding=cfg.embed_scale,
                          dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                          pad_token_id=cfg.pad_id, eos_token_id=cfg.eos_id, bos_token_id=cfg.bos_id,
                          decoder_start_token_id=cfg.bos_id, forced_eos_token_id=None,
                          share_encoder_decoder_embeddings=True, tie_word_embeddings=True)
    model = MarianMTModel(config).eval()

    def tensor(array):
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    def linear(module, p):
        module.weight.copy_(tensor(p["weight"].T))
        module.bias.copy_(tensor(p["bias"]))

    def norm(module, p):
        module.weight.copy_(tensor(p["weight"]))
        module.bias.copy_(tensor(p["bias"]))

    def attention(module, p):
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            linear(getattr(module, name), p[name])

    with torch.no_grad():
        model.model.shared.weight.copy_(tensor(params["decoder"]["embed_tokens"]["weight"]))
        table = tensor(sinusoidal_table(cfg.max_positions, cfg.d_model))
        for stack in (model.model.encoder, model.model.decoder):
            stack.embed_positions.weight.copy_(table)
        for layer, p in zip(model.model.encoder.layers, params["encoder"]["layers"]):
            attention(layer.self_attn, p["self_attn"])
            norm(layer.self_attn_layer_norm, p["self_attn_norm"])
        for layer, p in zip(model.model.decoder.layers, params["decoder"]["layers"]):
            attention(layer.self_attn, p["self_attn"])
            norm(layer.self_attn_layer_norm, p["self_attn_norm"])
            attention(layer.encoder_attn, p["cross_attn"])
            norm(layer.encoder_attn_layer_norm, p["cross_attn_norm"])
        for layer, p in [*zip(model.model.encoder.layers, params["encoder"]["layers"]),
                         *zip(model.model.decoder.layers, params["decoder"]["layers"])]:
            linear(layer.fc1, p["ffn"]["fc1"])
            linear(layer.fc2, p["ffn"]["fc2"])
            norm(layer.final_layer_norm, p["ffn_norm"])
        model.final_logits_bias.zero_()
    assert model.lm_head.weight.data_ptr() == model.model.shared.weight.data_ptr(), "lm_head is not tied"
    model.generation_config = GenerationConfig(
        do_sample=False, num_beams=1, use_cache=True, decoder_start_token_id=cfg.bos_id, bos_token_id=cfg.bos_id,
        eos_token_id=cfg.eos_id, pad_token_id=cfg.pad_id)
    return model


# ---------------------------------------------------------------------------- one timed generate call


class StepClock:
    """A transformers streamer that only notes the time of each put (the first put is the decoder start ids)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def run_refformer(stepper, cfg, options, src_ids, src_mask):
    """(tokens [B, N], total seconds, seconds to the first new token)."""
    start = time.perf_counter()
    first = None
    steps = []
    for next_ids in search_iter(stepper, cfg, options, src_ids=src_ids, src_mask=src_mask):
        if first is None:
            first = time.perf_counter() - start
        steps.append(next_ids)
    total = time.perf_counter() - start
    return np.stack(steps, axis=1), total, first


def run_marian(model, new_tokens, src_ids, src_mask):
    import torch

    clock = StepClock()
    with torch.inference_mode():
        ids, mask = torch.from_numpy(src_ids), torch.from_numpy(src_mask)
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             streamer=clock)
        total = time.perf_counter() - start
    first = clock.times[1] - start  # times[0]: the decoder start ids, put before the first step
    return out[:, 1:].numpy(), total, first


# ---------------------------------------------------------------------------- profile of the refformer loop


class TimedStepper(Stepper):
    """Wraps an OrtStepper: time in start() (the encoder) and in step() (binding + ORT run + logits copy)."""

    def __init__(self, inner):
        self.inner = inner
        self.step_s = self.start_s = 0.0
        self.steps = 0

    def start(self, *args):
        t = time.perf_counter()
        self.inner.start(*args)
        self.start_s += time.perf_counter() - t

    def step(self, *args):
        t = time.perf_counter()
        logits = self.inner.step(*args)
        self.step_s += time.perf_counter() - t
        self.steps += 1
        return logits

    def reorder(self, rows):
        self.inner.reorder(rows)


def profile_refformer(stepper, cfg, options, inputs, reps):
    """Median per-step split of refformer's greedy loop: ORT run, binding + logits copy, search-loop Python."""
    rows = []
    for _ in range(reps):
        timed = TimedStepper(stepper)
        with timed_calls(stepper.decoder) as runs:  # the ORT run alone
            _, total, _ = run_refformer(timed, cfg, options, *inputs)
        run_s, n = sum(runs), timed.steps
        rows.append({"total_ms_per_step": 1e3 * total / n,
                     "encoder_ms": 1e3 * timed.start_s,
                     "ort_run_ms_per_step": 1e3 * run_s / n,
                     "binding_and_logits_ms_per_step": 1e3 * (timed.step_s - run_s) / n,
                     "search_loop_ms_per_step": 1e3 * (total - timed.step_s - timed.start_s) / n})
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


# ---------------------------------------------------------------------------- main


def summary(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def entry_of(B, timings, new_tokens, agreement, need, bandwidth, profile):
    """The JSON entry of one (threads, batch size): medians, spread, speedup, the bandwidth bound."""
    entry = {"batch_size": B}
    for side in ("refformer", "hf"):
        total, first = timings[side]["total"], timings[side]["first"]
        entry[f"{side}_ms_per_step"] = 1e3 * statistics.median(total) / new_tokens
        entry[f"{side}_total_s"] = summary(total)
        entry[f"{side}_first_token_ms"] = summary([1e3 * x for x in first])
        entry[f"{side}_ms_per_step_after_first"] = 1e3 * statistics.median(
            [(a - b) / (new_tokens - 1) for a, b in zip(total, first)])
        entry[f"{side}_tokens_per_s"] = B * new_tokens / statistics.median(total)
        entry[f"{side}_spread_pct"] = 100 * (max(total) - min(total)) / statistics.median(total)
    entry["speedup"] = entry["hf_ms_per_step"] / entry["refformer_ms_per_step"]
    entry["speedup_per_rep"] = summary([h / r for h, r in zip(timings["hf"]["total"], timings["refformer"]["total"])])
    entry["speedup_after_first"] = entry["hf_ms_per_step_after_first"] / entry["refformer_ms_per_step_after_first"]
    entry["bytes_per_step"] = need
    entry["read_bound_ms_per_step"] = 1e3 * need["total"] / (bandwidth * 1e9)
    entry["token_agreement"] = agreement
    if profile:
        entry["refformer_profile_ms"] = profile
    return entry


def print_table(results, thread_counts, batch_sizes, new_tokens):
    header = (f"{'thr':>3} {'B':>3} {'side':<10} {'ms/step':>8} {'(min..max)':>17} {'first ms':>9} {'ms/step>1':>10} "
              f"{'tokens/s':>9} {'speedup':>8}")
    print(header)
    print("-" * len(header))
    for n in thread_counts:
        for B in batch_sizes:
            e = results[n][B]
            for side in ("refformer", "hf"):
                lo, hi = (1e3 * e[f"{side}_total_s"][k] / new_tokens for k in ("min", "max"))
                speedup = f"{e['speedup']:.2f}x" if side == "refformer" else ""
                print(f"{n:>3} {B:>3} {side:<10} {e[f'{side}_ms_per_step']:>8.2f} {f'({lo:.2f}..{hi:.2f})':>17} "
                      f"{e[f'{side}_first_token_ms']['median']:>9.1f} {e[f'{side}_ms_per_step_after_first']:>10.2f} "
                      f"{e[f'{side}_tokens_per_s']:>9.1f} {speedup:>8}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration (seconds)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per side, batch size and thread count")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, nargs="+", default=[os.cpu_count()],
                        help="thread counts, each used by both sides alike (default: all cores); the first is the "
                             "headline ('results' in the JSON), the others go to 'other_threads'")
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--profile", action="store_true", help="also split refformer's step time (ORT run vs Python)")
    parser.add_argument("--json", help="write results here (default: benchmarks/results/generate_cpu.json; "
                                       "not written with --quick unless given)")
    args = parser.parse_args(argv)

    import onnxruntime
    import torch
    import transformers

    from refformer.runtime.stepper import OrtStepper

    setup = QUICK if args.quick else FULL
    cfg, src_len, new_tokens = setup["cfg"], setup["src_len"], setup["new_tokens"]
    batch_sizes = tuple(args.batch_sizes or setup["batch_sizes"])
    thread_counts = tuple(dict.fromkeys(args.threads))
    rng = np.random.default_rng(0)
    params = init_params(cfg, rng)
    options = GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    load_before = load_average()
    bandwidth_before = memory_bandwidth(16 if args.quick else 256)

    print(f"threads {thread_counts} (cores {os.cpu_count()}), load average {load_before}, {cpu_model()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="refformer-bench-") as folder:
        t = time.perf_counter()
        onnx_dir = export_refformer(cfg, params, folder)
        steppers = {n: OrtStepper(cfg, onnx_dir, "fp32", "CPUExecutionProvider", n) for n in thread_counts}
        model = make_marian(cfg, params)
        print(f"built and exported in {time.perf_counter() - t:.1f} s", flush=True)

        inputs = {}
        for B in batch_sizes:
            src = rng.integers(4, cfg.vocab_size, size=(B, src_len)).astype(np.int64)
            src[:, -1] = cfg.eos_id
            inputs[B] = (src, np.ones_like(src))

        def call(side, n, B):
            if side == "refformer":
                return run_refformer(steppers[n], cfg, options, *inputs[B])
            torch.set_num_threads(n)
            return run_marian(model, new_tokens, *inputs[B])

        timings = {n: {B: {side: {"total": [], "first": []} for side in ("refformer", "hf")} for B in batch_sizes}
                   for n in thread_counts}
        outputs = {B: {} for B in batch_sizes}
        agreement = {}
        t0 = time.perf_counter()
        for rep in range(-args.warmup, args.reps):
            order = ["refformer", "hf"] if rep % 2 == 0 else ["hf", "refformer"]
            for n in thread_counts:
                for B in batch_sizes:
                    for side in order:
                        tokens, total, first = call(side, n, B)
                        if rep == -args.warmup and n == thread_counts[0]:
                            outputs[B][side] = tokens
                        if rep >= 0:
                            timings[n][B][side]["total"].append(total)
                            timings[n][B][side]["first"].append(first)
            label = "warm-up" if rep < 0 else f"rep {rep + 1}/{args.reps}"
            print(f"{label} done ({time.perf_counter() - t0:.0f} s)", flush=True)
            if rep == -args.warmup:
                # same model, same tokens? (random weights: a near-tie can flip one argmax between the two
                # kernels, after which a row legitimately differs; the report gives the share of identical tokens)
                for B in batch_sizes:
                    ours, theirs = outputs[B]["refformer"], outputs[B]["hf"]
                    assert ours.shape == theirs.shape == (B, new_tokens), (ours.shape, theirs.shape)
                    prefix = [int(np.argmax(np.append(a != b, True))) for a, b in zip(ours, theirs)]
                    agreement[B] = {"identical_tokens": float((ours == theirs).mean()),
                                    "identical_prefix_min": min(prefix)}
                    print(f"  B={B}: identical tokens {agreement[B]['identical_tokens']:.3f}, "
                          f"shortest identical prefix {min(prefix)} of {new_tokens}", flush=True)

        profile = {n: {} for n in thread_counts}
        if args.profile:
            for n in thread_counts:
                for B in batch_sizes:
                    profile[n][B] = profile_refformer(steppers[n], cfg, options, inputs[B], 2)
    bandwidth_after = memory_bandwidth(16 if args.quick else 256)
    read_gbs = max(bandwidth_before["read_gbs"], bandwidth_after["read_gbs"])

    results = {n: {B: entry_of(B, timings[n][B], new_tokens, agreement[B], step_bytes(cfg, B, src_len, new_tokens),
                                read_gbs, profile[n].get(B))
                   for B in batch_sizes} for n in thread_counts}

    print()
    print_table(results, thread_counts, batch_sizes, new_tokens)
    print("\nmemory bandwidth, NumPy, GB/s before / after: " + ", ".join(
        f"{key.removesuffix('_gbs')} {bandwidth_before[key]:.1f} / {bandwidth_after[key]:.1f}"
        for key in ("read_1thread_gbs", "read_blas_gbs", "copy_gbs")))
    for B in batch_sizes:
        e = results[thread_counts[0]][B]
        need = e["bytes_per_step"]
        print(f"B={B}: a step reads {need['total'] / 1e6:.1f} MB (weights {need['weights'] / 1e6:.1f} MB) "
              f"-> >= {e['read_bound_ms_per_step']:.2f} ms/step at {read_gbs:.1f} GB/s")
    for n in thread_counts:
        for B in batch_sizes:
            e = results[n][B]
            print(f"threads {n} B={B}: speedup per rep "
                  f"{e['speedup_per_rep']['min']:.2f}..{e['speedup_per_rep']['max']:.2f}")
            if "refformer_profile_ms" in e:
                profile = e["refformer_profile_ms"]
                print("  refformer profile (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in profile.items()))

    def keyed(by_batch):
        return {str(B): entry for B, entry in by_batch.items()}

    report = {
        "benchmark": "generate_cpu",
        "issue": 5,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "config": cfg.to_dict(),
        "src_len": src_len,
        "new_tokens": new_tokens,
        "reps": args.reps,
        "warmup": args.warmup,
        "threads": thread_counts[0],
        "context": {
            "cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
            "load_average_before": load_before, "load_average_after": load_average(),
            "memory_bandwidth_before": bandwidth_before, "memory_bandwidth_after": bandwidth_after,
            "platform": platform.platform(), "python": platform.python_version(),
            "versions": {"numpy": np.__version__, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "hf_attn_implementation": model.config._attn_implementation,
            "ort_provider": "CPUExecutionProvider",
        },
        "results": keyed(results[thread_counts[0]]),
        "other_threads": {str(n): keyed(results[n]) for n in thread_counts[1:]},
    }
    write_report(report, args.json or (None if args.quick else "benchmarks/results/generate_cpu.json"))
    return report


if __name__ == "__main__":
    main()
