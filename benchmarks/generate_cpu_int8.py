"""Greedy decoding on the CPU, int8 side by side (issue 15): refformer fp32 and int8 on ONNX Runtime, CTranslate2 fp32
and int8, Hugging Face transformers' MarianMTModel.generate, in one process, interleaved.

A script of its own rather than an extension of generate_cpu.py (issue 5's two-sided table and JSON, which other
reports cite, stay as they are); it reuses that script's model, HF twin and timed calls.

    .venv/bin/python benchmarks/generate_cpu_int8.py [--threads 2 1] [--reps 3] [--alternatives [NAME ...]]
                                                     [--int8-encoder] [--only IMPL ...]
    .venv/bin/python benchmarks/generate_cpu_int8.py --quick          # tiny smoke configuration

Model: the Marian-base shape of generate_cpu.py (D 512, H 8, 6 + 6 post-LN layers, F 2048, V 32000, tied head),
random weights, exported once with --fused-attention and a static cache of new_tokens + 1 slots; the decoder graphs
are quantized (the encoder kept in fp32, as in `refformer export`'s int8 set; --int8-encoder adds a set with the
encoder quantized too) with refformer.export.quantize.quantize_graph (method "int8"; --alternatives adds
ALTERNATIVES, named or all, as refformer-NAME and refformer-NAME-static_fused); --only restricts the timed impls.
Contenders (impl in the JSON):
  refformer-fp32                 decoder.onnx, OrtStepper (the default path, exact against HF);
  refformer-fp32-static_fused    decoder_static_fused.onnx (GroupQueryAttention over a static cache written in
                                 place, MultiHeadAttention cross-attention), StaticOrtStepper;
  refformer-int8                 decoder.onnx quantized, OrtStepper (`generate --dtype int8`);
  refformer-int8-static_fused    decoder_static_fused.onnx quantized, StaticOrtStepper (`generate --dtype int8
                                 --variant static_fused`, from `export --dtype int8 --static-length N
                                 --fused-attention`);
  ct2-fp32, ct2-int8             CTranslate2 converted in memory from the same HF twin with its Transformers
                                 converter (a Marian loader that keeps all V rows and starts the decoder from bos,
                                 as refformer and HF do); int8 resolves to int8_float32 on this CPU; beam_size=1,
                                 min = max decoding length = new_tokens (the start token not counted);
  hf                             MarianMTModel.generate (generate_cpu.make_marian).
Input: 32 random source tokens (31 + eos) per row, B = 1 and 16; new_tokens = 128 forced (min = max), greedy.
Threads pinned on every side: ORT intra_op threads, CTranslate2 intra_threads (inter_threads 1),
torch.set_num_threads. Reps interleaved (every rep runs every contender, the order rotating); medians of --reps.

Checks before timing: CTranslate2 fp32's greedy tokens against refformer fp32's (and HF's) on every row.
Quality: max |delta log p| of the forced tokens, teacher-forced one step at a time over all B = 16 rows and the
new_tokens steps (forced tokens: refformer fp32's greedy output): refformer int8 variants against refformer fp32,
CTranslate2 int8 (and fp32) against HF (CTranslate2's score_batch, HF's forward with decoder_input_ids).
"""

import argparse
import copy
import datetime
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from generate_cpu import FULL, QUICK, cpu_flags, load_average, make_marian, memory_bandwidth, run_marian, run_refformer
from machine import cpu_model, write_report

from refformer.export.export import export_model
from refformer.export.folder import default_export_dir
from refformer.export.quantize import ALTERNATIVES, quantize_graph
from refformer.refimpl import init_params, save
from refformer.refimpl.generate import GenerationOptions

STATIC_FUSED = "decoder_static_fused.onnx"


# ---------------------------------------------------------------------------- refformer variants


def export_variants(cfg, params, folder, new_tokens, alternatives, int8_encoder):
    """params exported (fp32, fused attention, a static cache of new_tokens + 1 slots) and its decoder graphs
    quantized, the encoder kept in fp32 as in `refformer export`'s int8 set: {name: onnx folder} for "fp32", "int8",
    each method in alternatives (quantize.ALTERNATIVES) and, with int8_encoder, "int8-encoder_int8" (the encoder
    quantized too)."""
    model_dir = Path(folder) / "model"
    save(model_dir, cfg, params)
    length = min(new_tokens + 1, cfg.max_positions)
    export_model(model_dir, dtype="fp32", measure=False, fused_attention=True, static_length=length)
    fp32 = Path(default_export_dir(model_dir, "fp32", length, True))
    folders = {"fp32": fp32}
    sets = [(method, method, False) for method in ["int8", *alternatives]]
    if int8_encoder:
        sets.append(("int8-encoder_int8", "int8", True))
    for name, method, encoder in sets:
        out = Path(folder) / name
        out.mkdir()
        for graph in ("encoder.onnx", "decoder.onnx", STATIC_FUSED):
            t = time.perf_counter()
            if graph == "encoder.onnx" and not encoder:  # as export's int8 set (export.quantized_graph)
                shutil.copy(fp32 / graph, out / graph)
                continue
            quantize_graph(fp32 / graph, out / graph, method=method)
            print(f"  quantized {graph} ({method}) in {time.perf_counter() - t:.1f} s", flush=True)
        folders[name] = out
    return folders


def refformer_steppers(cfg, folders, threads):
    """{impl: stepper} at threads intra-op threads: every method on decoder.onnx and on decoder_static_fused.onnx."""
    from refformer.runtime.stepper import OrtStepper, StaticOrtStepper

    steppers = {}
    for method, folder in folders.items():
        steppers[f"refformer-{method}"] = OrtStepper(cfg, str(folder), "fp32", "CPUExecutionProvider", threads)
        steppers[f"refformer-{method}-static_fused"] = StaticOrtStepper(
            cfg, str(folder), "fp32", "CPUExecutionProvider", threads, decoder_file=STATIC_FUSED)
    return steppers


def forced_log_probs(stepper, cfg, src_ids, forced):
    """log p of forced [B, N] (teacher-forced, one token per step, as decoding feeds them) -> float64 [B, N]."""
    B, N = forced.shape
    ids = np.concatenate([np.full((B, 1), cfg.bos_id), forced[:, :-1]], axis=1)
    stepper.start(src_ids, np.ones_like(src_ids), B)
    out = np.empty((B, N))
    for t in range(N):
        logits = stepper.step(ids[:, t:t + 1], np.full((B, 1), t, np.int64), np.ones((B, t + 1), np.int64))
        logits = logits[:, -1].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(logits - top).sum(-1))
        out[:, t] = logits[np.arange(B), forced[:, t]] - log_z
    return out


# ---------------------------------------------------------------------------- CTranslate2


def token_names(cfg):
    return [f"t{i}" for i in range(cfg.vocab_size)]


def convert_ct2(cfg, model, out_dir, quantization):
    """The HF twin converted to a CTranslate2 model at out_dir: all V rows kept, the decoder started from bos (the
    stock MarianMTLoader drops the last row and starts from a zero embedding, for real opus-mt checkpoints)."""
    from ctranslate2.converters.converter import Converter
    from ctranslate2.converters.transformers import BartLoader, MarianMTLoader

    names = token_names(cfg)

    class TwinLoader(MarianMTLoader):
        def get_model_spec(self, model):
            model.config.normalize_before = False
            model.config.normalize_embedding = False
            return BartLoader.get_model_spec(self, model)  # no _remove_pad_weights

        def set_decoder(self, spec, decoder):
            BartLoader.set_decoder(self, spec, decoder)  # no start_from_zero_embedding

        def get_vocabulary(self, model, tokenizer):
            return names

        def set_config(self, config, model, tokenizer):
            config.bos_token, config.eos_token = names[cfg.bos_id], names[cfg.eos_id]
            config.unk_token = names[cfg.unk_id]
            config.decoder_start_token = names[cfg.bos_id]

    class TwinConverter(Converter):
        def _load(self):
            return TwinLoader()(copy.deepcopy(model), None)  # int8 quantization rescales weights in place

    TwinConverter().convert(str(out_dir), quantization=quantization, force=True)
    return out_dir


def run_ct2(translator, cfg, new_tokens, src_ids):
    """(tokens [B, N], total seconds, None): one greedy translate_batch."""
    names = token_names(cfg)
    index = {name: i for i, name in enumerate(names)}
    source = [[names[i] for i in row] for row in src_ids]
    start = time.perf_counter()
    results = translator.translate_batch(source, beam_size=1, min_decoding_length=new_tokens,
                                         max_decoding_length=new_tokens)
    total = time.perf_counter() - start
    return np.array([[index[t] for t in r.hypotheses[0]] for r in results]), total, None


def ct2_log_probs(translator, cfg, src_ids, forced):
    names = token_names(cfg)
    results = translator.score_batch([[names[i] for i in row] for row in src_ids],
                                     [[names[i] for i in row] for row in forced])
    return np.array([r.log_probs[:forced.shape[1]] for r in results], dtype=np.float64)


def hf_log_probs(model, cfg, src_ids, forced):
    import torch

    ids = np.concatenate([np.full((len(forced), 1), cfg.bos_id), forced[:, :-1]], axis=1)
    with torch.inference_mode():
        logits = model(input_ids=torch.from_numpy(src_ids), attention_mask=torch.ones_like(torch.from_numpy(src_ids)),
                       decoder_input_ids=torch.from_numpy(ids)).logits.double()
        log_p = torch.log_softmax(logits, -1)
    return torch.gather(log_p, 2, torch.from_numpy(forced)[..., None])[..., 0].numpy()


# ---------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration (seconds)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--alternatives", nargs="*", choices=list(ALTERNATIVES), default=[],
                        help="also export and time these quantize.ALTERNATIVES (all of them with no name)")
    parser.add_argument("--int8-encoder", action="store_true",
                        help="also refformer-int8-encoder_int8[-static_fused]: the encoder quantized too")
    parser.add_argument("--only", nargs="+", help="time only these impls (the checks and quality still run)")
    parser.add_argument("--json", help="default: benchmarks/results/generate_cpu_int8.json (not with --quick)")
    args = parser.parse_args(argv)
    if args.alternatives == [] and "--alternatives" in (argv if argv is not None else sys.argv):
        args.alternatives = list(ALTERNATIVES)

    import ctranslate2
    import onnxruntime
    import torch
    import transformers

    setup = QUICK if args.quick else FULL
    cfg, src_len, new_tokens = setup["cfg"], setup["src_len"], setup["new_tokens"]
    batch_sizes = tuple(args.batch_sizes or setup["batch_sizes"])
    thread_counts = tuple(dict.fromkeys(args.threads))
    rng = np.random.default_rng(0)
    params = init_params(cfg, rng)
    options = GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    load_before = load_average()
    bandwidth = memory_bandwidth(16 if args.quick else 256)
    print(f"threads {thread_counts} (cores {os.cpu_count()}), load average {load_before}, {cpu_model()}", flush=True)

    folder = tempfile.mkdtemp(prefix="refformer-bench-int8-")
    try:
        t = time.perf_counter()
        folders = export_variants(cfg, params, folder, new_tokens, args.alternatives, args.int8_encoder)
        model = make_marian(cfg, params)
        ct2_dirs = {q: convert_ct2(cfg, model, Path(folder) / f"ct2-{q}", q) for q in ("float32", "int8")}
        steppers = {n: refformer_steppers(cfg, folders, n) for n in thread_counts}
        translators = {n: {f"ct2-{'fp32' if q == 'float32' else 'int8'}": ctranslate2.Translator(
            str(d), device="cpu", compute_type=q, inter_threads=1, intra_threads=n) for q, d in ct2_dirs.items()}
            for n in thread_counts}
        compute_types = {impl: tr.compute_type for impl, tr in translators[thread_counts[0]].items()}
        print(f"built, exported, quantized and converted in {time.perf_counter() - t:.1f} s; CTranslate2 compute "
              f"types {compute_types}", flush=True)

        inputs = {}
        for B in batch_sizes:
            src = rng.integers(4, cfg.vocab_size, size=(B, src_len)).astype(np.int64)
            src[:, -1] = cfg.eos_id
            inputs[B] = src

        impls = [*steppers[thread_counts[0]], *translators[thread_counts[0]], "hf"]

        def call(impl, n, B):
            if impl == "hf":
                torch.set_num_threads(n)
                return run_marian(model, new_tokens, inputs[B], np.ones_like(inputs[B]))
            if impl.startswith("ct2"):
                return run_ct2(translators[n][impl], cfg, new_tokens, inputs[B])
            return run_refformer(steppers[n][impl], cfg, options, inputs[B], np.ones_like(inputs[B]))

        # ---- checks: same greedy tokens (fp32 sides), and the quality figure
        checks = {}
        n0, B_big = thread_counts[0], max(batch_sizes)
        for B in batch_sizes:
            ours = call("refformer-fp32", n0, B)[0]
            for impl in ("ct2-fp32", "hf", "refformer-fp32-static_fused"):
                theirs = call(impl, n0, B)[0]
                checks[f"{impl} tokens == refformer-fp32, B={B}"] = float((theirs == ours).mean())
        for key, value in checks.items():
            print(f"  {key}: {value:.3f} of tokens equal", flush=True)
        assert checks[f"ct2-fp32 tokens == refformer-fp32, B={B_big}"] == 1.0, "ct2 fp32 computes another function"
        forced = call("refformer-fp32", n0, B_big)[0]
        src = inputs[B_big]
        reference = forced_log_probs(steppers[n0]["refformer-fp32"], cfg, src, forced)
        quality = {}
        for impl, stepper in steppers[n0].items():
            if impl != "refformer-fp32":
                quality[f"{impl} vs refformer-fp32"] = float(np.abs(forced_log_probs(stepper, cfg, src, forced)
                                                                    - reference).max())
        torch.set_num_threads(n0)
        hf = hf_log_probs(model, cfg, src, forced)
        quality["hf vs refformer-fp32"] = float(np.abs(hf - reference).max())
        for impl, translator in translators[n0].items():
            quality[f"{impl} vs hf"] = float(np.abs(ct2_log_probs(translator, cfg, src, forced) - hf).max())
        for key, value in quality.items():
            print(f"  max |delta log p| {key}: {value:.2e}", flush=True)

        # ---- timing, interleaved
        timed = [impl for impl in impls if not args.only or impl in args.only]
        totals = {(impl, n, B): [] for impl in timed for n in thread_counts for B in batch_sizes}
        t0 = time.perf_counter()
        for rep in range(-args.warmup, args.reps):
            shift = rep % len(timed)
            order = timed[shift:] + timed[:shift]
            for n in thread_counts:
                for B in batch_sizes:
                    for impl in order:
                        tokens, total, _ = call(impl, n, B)
                        assert tokens.shape == (B, new_tokens), (impl, tokens.shape)
                        if rep >= 0:
                            totals[impl, n, B].append(total)
            print(f"{'warm-up' if rep < 0 else f'rep {rep + 1}/{args.reps}'} done "
                  f"({time.perf_counter() - t0:.0f} s, load {load_average()})", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    load_after = load_average()

    entries = []
    for (impl, n, B), values in totals.items():
        if not values:  # --reps 0: checks and quality only
            continue
        median = statistics.median(values)
        entries.append({"impl": impl, "threads": n, "batch": B, "ms_per_step": 1e3 * median / new_tokens,
                        "tok_per_s": B * new_tokens / median,
                        "ms_per_step_min": 1e3 * min(values) / new_tokens,
                        "ms_per_step_max": 1e3 * max(values) / new_tokens})
    by = {(e["impl"], e["threads"], e["batch"]): e for e in entries}
    print(f"\nms per step (median of {args.reps}; min..max), load average {load_before} -> {load_after}")
    cells = [(n, B) for n in thread_counts for B in batch_sizes]
    print(f"{'impl':<34}" + "".join(f"{f't{n} B{B}':>22}" for n, B in cells))
    def cell(e):
        return f"{e['ms_per_step']:.2f} ({e['ms_per_step_min']:.2f}..{e['ms_per_step_max']:.2f})"

    for impl in timed if entries else []:
        print(f"{impl:<34}" + "".join(f"{cell(by[impl, n, B]):>22}" for n, B in cells))
    ratios = {}
    if "ct2-int8" in timed and entries:
        refformer = [impl for impl in timed if impl.startswith("refformer")]
        for n, B in cells:
            best = min(refformer, key=lambda impl: by[impl, n, B]["ms_per_step"])
            ratios[f"threads={n} batch={B}"] = {
                "fastest_refformer": best,
                "ratio": by["ct2-int8", n, B]["ms_per_step"] / by[best, n, B]["ms_per_step"]}
        print("speed ratio, CTranslate2 int8 ms/step over refformer's fastest (>= 1.0: refformer at or ahead):")
        for cell, r in ratios.items():
            print(f"  {cell}: {r['ratio']:.2f} ({r['fastest_refformer']})")

    report = {
        "benchmark": "generate_cpu_int8", "issue": 15,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick, "config": cfg.to_dict(), "src_len": src_len, "new_tokens": new_tokens,
        "reps": args.reps, "warmup": args.warmup,
        "machine": {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
                    "load_average_before": load_before, "load_average_after": load_after,
                    "memory_bandwidth": bandwidth, "platform": platform.platform(),
                    "python": platform.python_version()},
        "versions": {"numpy": np.__version__, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "ctranslate2": ctranslate2.__version__},
        "ct2_compute_types": compute_types,
        "checks_equal_tokens": checks,
        "quality_max_abs_delta_log_p": quality,
        "ratio_ct2_int8_over_fastest_refformer": ratios,
        "entries": entries,
    }
    write_report(report, args.json or (None if args.quick else "benchmarks/results/generate_cpu_int8.json"))
    return report


if __name__ == "__main__":
    main()
