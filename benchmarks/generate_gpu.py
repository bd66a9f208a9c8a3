"""GPU generation benchmark and CUDA checks (issues 5 and 6), one script for the lent H200.

Marian-base shape with random weights (D 512, H 8, 6 + 6 layers, F 2048, V 32000), 32 source tokens,
128 forced new tokens (min = max = 128), per decode step, for:
  refformer static_fused  decoder_static_fused.onnx: GroupQueryAttention over a cache updated in place, fused
                          norms, in-graph argmax, CUDA-graph replay (the runtime's CUDA path in fp16; no fp32
                          GroupQueryAttention kernel on CUDA, so not run in fp32)
  refformer static_mha  decoder_static_mha.onnx: the same contrib ops and fusions, MultiHeadAttention over the
                        static cache (the runtime's CUDA path in fp32)
  refformer static    decoder_static.onnx: standard ops only, fixed buffers, in-graph argmax, CUDA-graph replay
  refformer reference decoder.onnx (growing cache) with IOBinding (the cache stays on the GPU)
  refformer fused     decoder_fused.onnx: the same with com.microsoft MultiHeadAttention nodes
at fp32 B=1, fp16 B=1, fp16 B=64 greedy and fp16 B=1 beam 4; time to first token (encoder + first step).
ms_per_step is the whole generate call (encoder, search loop in Python, every decoder call) over the new
tokens, as the Hugging Face baseline measures it; decoder_ms is the time inside the decoder's
run_with_iobinding per call (ONNX Runtime synchronises at the end of a run), comparable to the torch
CUDA-graph step.
Checks: CUDA (fp32, TF32 off) against CPU greedy tokens wherever the CPU's top-2 margin exceeds 1e-3, and the
fp16 agreement rate and logits error, for the Marian-shaped model and the bundled model.
Baselines (--baselines DIR with hf_generate.py and torch_graph_step.py): run after, in the same process tree.

    python benchmarks/generate_gpu.py                     # on the device; writes $OUT/generate_gpu.json
    python benchmarks/generate_gpu.py --device cpu --quick  # a smoke test of the script on the CPU
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import gpu_name, timed_calls

from refformer.export.contract import FUSED, STATIC_FUSED, STATIC_MHA, decoder_graph, gqa_supported, graph_file, runs_on
from refformer.export.export import export_model
from refformer.export.session import PROVIDER_CHOICES as PROVIDER
from refformer.refimpl import Config, init_params, save
from refformer.refimpl.generate import GenerationOptions, beam_search, search_iter
from refformer.refimpl.gradcheck import rel_error
from refformer.runtime.generator import auto_variant, default_model_dir
from refformer.runtime.stepper import OrtStepper, StaticOrtStepper


def marian_config(quick):
    if quick:
        return Config(vocab_size=512, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=2, n_decoder_layers=2,
                      max_positions=512, activation="gelu", final_norm=False, dropout=0.0)
    return Config(vocab_size=32000, d_model=512, n_heads=8, d_ff=2048, n_encoder_layers=6, n_decoder_layers=6,
                  max_positions=512, activation="gelu", final_norm=False, dropout=0.0)


def timed_generate(stepper, cfg, src, options):
    """(seconds for the whole generate call, seconds to the first token, tokens [B, L] or beams)."""
    start = time.perf_counter()
    if options.num_beams > 1:
        out, _ = beam_search(stepper, cfg, options, src_ids=src)
        return time.perf_counter() - start, None, out
    steps = search_iter(stepper, cfg, options, src_ids=src)
    first = next(steps)
    ttft = time.perf_counter() - start
    tokens = [first] + list(steps)
    return time.perf_counter() - start, ttft, np.stack(tokens, axis=1)


def bench(stepper, cfg, B, beams, new_tokens, repeats, rng):
    src = rng.integers(4, cfg.vocab_size, (B, 32))
    options = GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=beams)
    timed_generate(stepper, cfg, src, options)  # warm-up (and CUDA-graph capture)
    with timed_calls(stepper.decoder) as inside:
        runs = [timed_generate(stepper, cfg, src, options) for _ in range(repeats)]
    total = float(np.median([r[0] for r in runs]))
    ttfts = [r[1] for r in runs if r[1] is not None]
    return {"ms_per_step": 1e3 * total / new_tokens, "tok_per_s": B * new_tokens / total,
            "decoder_ms": 1e3 * float(np.median(inside)), "ttft_ms": 1e3 * float(np.median(ttfts)) if ttfts else None}


def teacher_forced_logits(cfg, onnx_dir, dtype, src, tokens, provider="CPUExecutionProvider"):
    """Logits [B, L, V] of decoder.onnx over [bos] + tokens[:-1] (one prompt pass), for margin checks."""
    stepper = OrtStepper(cfg, onnx_dir, dtype, provider)
    B, L = tokens.shape
    stepper.start(src, np.ones_like(src), B)
    ids = np.concatenate([np.full((B, 1), cfg.bos_id), tokens[:, :-1]], axis=1)
    positions = np.broadcast_to(np.arange(L), (B, L)).copy()
    return stepper.step(ids, positions, np.ones((B, L), np.int64)).astype(np.float64)


def agreement(cfg, onnx_dir_fp32, onnx_dir, dtype, device, rng, B=4, new_tokens=64):
    """Greedy on `device` through the variant the runtime picks on CUDA, against the CPU's fp32 reference graph
    teacher-forced along the same sequence: token mismatches where the CPU's top-2 margin exceeds 1e-3, the
    agreement rate, and the relative error of the variant's own logits."""
    src = rng.integers(4, cfg.vocab_size, (B, 32))
    options = GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    variant = auto_variant(cfg, True, dtype)[0]  # CUDA's first choice, also in the CPU smoke test
    stepper = StaticOrtStepper(cfg, onnx_dir, dtype, PROVIDER[device], cuda_graph=(device == "cuda"),
                               decoder_file=graph_file(decoder_graph(variant)))
    tokens, device_logits = [], []
    for next_ids in search_iter(stepper, cfg, options, src_ids=src):  # the variant's own logits of every step
        tokens.append(next_ids)
        device_logits.append(stepper.last_logits()[:, -1].astype(np.float64))
    tokens, device_logits = np.stack(tokens, axis=1), np.stack(device_logits, axis=1)
    cpu = teacher_forced_logits(cfg, onnx_dir_fp32, "fp32", src, tokens)
    cpu[..., cfg.eos_id] = -np.inf  # min_new_tokens banned eos on the device
    top2 = np.sort(cpu, axis=-1)[..., -2:]
    margin = top2[..., 1] - top2[..., 0]
    same = cpu.argmax(axis=-1) == tokens
    decided = margin > 1e-3
    finite = np.isfinite(device_logits) & np.isfinite(cpu)
    return {"variant": variant, "positions": int(tokens.size), "decided_positions": int(decided.sum()),
            "mismatches_where_decided": int((~same & decided).sum()), "agreement_rate": float(same.mean()),
            "logits_rel_error": rel_error(np.where(finite, device_logits, 0), np.where(finite, cpu, 0))}


def baselines(folder, work):
    """Run ../shared/gpu/baselines' scripts (each writes JSON under $OUT) and read their figures as rows.

    hf_generate.py -> hf_generate.json {"float16_B64_beams1": {"ms_per_step", "tok_per_s"}} (whole generate
    calls); torch_graph_step.py -> floor.json {"float16_B64": {"graph_ms", "graph_tok_per_s", "eager_ms"}}
    (one CUDA-graph step replayed).
    """
    rows = []
    for script, result_name in (("hf_generate.py", "hf_generate.json"), ("torch_graph_step.py", "floor.json")):
        path = folder / script
        if not path.is_file():
            print(f"baseline {path} is missing", flush=True)
            continue
        try:
            subprocess.run([sys.executable, str(path)], env={**os.environ, "OUT": str(work)}, check=True, timeout=240)
            results = json.loads((work / result_name).read_text())
        except (subprocess.SubprocessError, OSError, ValueError) as error:
            print(f"baseline {script} failed: {error}", flush=True)
            continue
        for key, value in results.items():
            parts = key.split("_")  # float16_B64_beams1 or float16_B64
            dtype, batch = ("fp16" if parts[0] == "float16" else "fp32"), int(parts[1][1:])
            strategy = "greedy" if len(parts) < 3 or parts[2] == "beams1" else f"beam{parts[2][5:]}"
            if script == "hf_generate.py":
                rows.append({"impl": "hf", "variant": "hf generate", "dtype": dtype, "batch": batch,
                             "strategy": strategy,
                             "ms_per_step": value["ms_per_step"], "tok_per_s": value["tok_per_s"], "decoder_ms": None,
                             "ttft_ms": None, "raw_key": key})
            else:
                rows.append({"impl": "torch-graph", "variant": "torch step, CUDA graph", "dtype": dtype, "batch": batch,
                             "strategy": strategy, "ms_per_step": value["graph_ms"],
                             "tok_per_s": value["graph_tok_per_s"],
                             "decoder_ms": value["graph_ms"], "eager_ms": value.get("eager_ms"), "ttft_ms": None,
                             "raw_key": key})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=list(PROVIDER), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny model, few tokens: a smoke test")
    parser.add_argument("--baselines", default=None, help="folder with hf_generate.py and torch_graph_step.py")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--bundled-onnx", metavar="PREFIX", default=None,
                        help="the bundled model already exported (static length max_positions, fused attention) to "
                             "PREFIXfp32 and PREFIXfp16 (device_run.sh's exports); without it, exported here")
    args = parser.parse_args()
    import onnxruntime as ort

    if args.device == "cuda":
        ort.preload_dlls()
    new_tokens, repeats = (8, 2) if args.quick else (128, 3)
    cfg = marian_config(args.quick)
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="refformer-gpu-"))
    save(work / "model", cfg, init_params(cfg, rng))
    dirs = {}
    for dtype in ("fp32", "fp16"):
        start = time.perf_counter()
        export_model(work / "model", work / f"onnx-{dtype}", dtype=dtype, measure=False, static_length=160,
                     fused_attention=True)
        dirs[dtype] = work / f"onnx-{dtype}"
        print(f"exported {dtype} in {time.perf_counter() - start:.1f} s", flush=True)

    provider, graph = PROVIDER[args.device], args.device == "cuda"
    static_fused, static_mha, fused = (graph_file(decoder_graph(v)) for v in (STATIC_FUSED, STATIC_MHA, FUSED))
    variants = {
        "refformer static_fused+graph": lambda d: StaticOrtStepper(cfg, dirs[d], d, provider, cuda_graph=graph,
                                                                   decoder_file=static_fused),
        "refformer static_mha+graph": lambda d: StaticOrtStepper(cfg, dirs[d], d, provider, cuda_graph=graph,
                                                                 decoder_file=static_mha),
        "refformer static+graph": lambda d: StaticOrtStepper(cfg, dirs[d], d, provider, cuda_graph=graph),
        "refformer reference+iobinding": lambda d: OrtStepper(cfg, dirs[d], d, provider),
        "refformer fused+iobinding": lambda d: OrtStepper(cfg, dirs[d], d, provider, decoder_file=fused),
    }
    rows = []
    cases = [("fp32", 1, 1), ("fp16", 1, 1), ("fp16", 64, 1), ("fp16", 1, 4)]
    for dtype, B, beams in cases:
        for impl, make in variants.items():
            if "static_fused" in impl and not runs_on(decoder_graph(STATIC_FUSED), dtype, provider):
                continue
            try:
                result = bench(make(dtype), cfg, B, beams, new_tokens, repeats, rng)
            except Exception as error:  # one failing variant must not cost the rest of the device run
                print(f"FAILED {impl} {dtype} B={B} beams={beams}: {str(error)[:500]}", flush=True)
                continue
            row = {"impl": "refformer", "variant": impl, "dtype": dtype, "batch": B,
                   "strategy": "greedy" if beams == 1 else f"beam{beams}", **result}
            rows.append(row)
            print(json.dumps(row), flush=True)

    checks = {}

    def check(name, *args):
        try:
            checks[name] = agreement(*args)
        except Exception as error:  # report and go on: the rest of the run still counts
            checks[name] = {"failed": str(error)[:500]}
        print(name, json.dumps(checks[name]), flush=True)

    check("marian_fp32", cfg, dirs["fp32"], dirs["fp32"], "fp32", args.device, rng)
    check("marian_fp16", cfg, dirs["fp32"], dirs["fp16"], "fp16", args.device, rng)
    try:
        bundled = default_model_dir()
    except Exception:  # not in the installed package: the source tree's copy
        bundled = Path(__file__).resolve().parent.parent / "runtime" / "models" / "de-en"
    if (bundled / "config.json").is_file():
        from refformer.refimpl.io import load_config

        bcfg = load_config(bundled)
        prefix = args.bundled_onnx or str(work / "bundled-")
        bdirs = {dtype: Path(f"{prefix}{dtype}") for dtype in ("fp32", "fp16")}
        if not args.bundled_onnx:
            for dtype, onnx_dir in bdirs.items():
                export_model(bundled, onnx_dir, dtype=dtype, measure=False, static_length=bcfg.max_positions,
                             fused_attention=gqa_supported(bcfg.head_dim))
        check("bundled_fp32", bcfg, bdirs["fp32"], bdirs["fp32"], "fp32", args.device, rng)
        check("bundled_fp16", bcfg, bdirs["fp32"], bdirs["fp16"], "fp16", args.device, rng)

    if args.baselines:
        rows += baselines(Path(args.baselines), work)

    print()
    print(f"{'impl':<30} {'dtype':<5} {'B':>3} {'strategy':<8} {'ms/step':>8} {'decoder ms':>10} {'tok/s':>10} "
          f"{'TTFT ms':>8}")
    for row in rows:
        cells = {key: "" if row.get(key) is None else f"{row[key]:.{digits}f}"
                 for key, digits in (("ms_per_step", 3), ("decoder_ms", 3), ("tok_per_s", 0), ("ttft_ms", 2))}
        print(f"{row['variant']:<30} {row['dtype']:<5} {row['batch']:>3} {row['strategy']:<8} "
              f"{cells['ms_per_step']:>8} "
              f"{cells['decoder_ms']:>10} {cells['tok_per_s']:>10} {cells['ttft_ms']:>8}")
    info = {"date": datetime.date.today().isoformat(), "device": args.device, "onnxruntime": ort.__version__,
            "quick": args.quick, "new_tokens": new_tokens, "source_tokens": 32}
    if args.device == "cuda":
        info["gpu"] = gpu_name()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "generate_gpu.json").write_text(json.dumps({"info": info, "rows": rows, "checks": checks},
                                                                 indent=1))


if __name__ == "__main__":
    main()
