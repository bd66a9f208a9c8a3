"""GPU benchmark of one imported decoder-only model (issue 16): SmolLM-135M's shape, refformer against HF generate.

The model is generate_imported_cpu.FULL["llama"] (hidden 576, 30 layers, 9 query heads / 3 KV heads, head size 64,
rotary, vocab 49,152, tied, 2,048 positions), built by generate_imported_cpu.build_folder (transformers random
weights, seeded, save_pretrained: no hub), then taken by each side:

  refformer  refformer.refimpl.convert.hf_folder.import_hf of the folder, then
             refformer.runtime.generator.Generator(model, provider, dtype, variant="auto"), which exports on first
             use (static length = max_positions, or --static-length); timed through its stepper under refimpl's
             search_iter (the loop Generator runs), the checkpoint's settings applied by Generator.check_options.
             On --device cpu (the smoke test) the variant is the one auto picks on CUDA (cuda_variant), named
             explicitly.
  hf         transformers' LlamaForCausalLM.generate on the same device, model.half() for fp16 (default attention
             implementation), synchronised before the clock stops.

Cells: fp16 greedy at B = 1 and B = 64, a 32-token prompt, 128 new tokens forced (min_new_tokens = max_new_tokens),
median of 3 repetitions after one warm-up call. Per cell, as generate_gpu.py: ms_per_step = the whole call / the new
tokens (the prompt pass included), tok_per_s = B * new tokens / the call, decoder_ms = the median time inside the
static decoder session's run_with_iobinding (refformer; the prompt's decoder.onnx call is not in it), ttft_ms = the
time to the first token of search_iter (refformer: the prompt pass and its cache copy).
Checks, in the same run: refformer's fp16 ids against HF fp16's (the warm-up calls' ids: identical share and the
shortest identical prefix); refformer fp32 at B = 1 (auto variant) against HF fp32 on the device with TF32 off,
HF's logits teacher-forced along refformer's sequence: mismatches where HF's top-2 margin exceeds 1e-3 (eos banned,
as min_new_tokens bans it), the agreement rate and max |logit difference|; the same for refformer fp16 at B = 1
against HF fp32 (fp16's logits error).

    python benchmarks/generate_imported_gpu.py --out "$OUT"             # on the device (benchmarks/device_run.sh)
    python benchmarks/generate_imported_gpu.py --device cpu --quick     # a smoke test on the CPU: tiny shape, 16 tokens

Writes OUT/generate_imported_gpu.json: {"info", "rows", "checks"}, each row with generate_gpu.py's fields (impl,
dtype, batch, strategy, ms_per_step, tok_per_s, decoder_ms, ttft_ms) plus model, variant and checks. A failing cell
or check is printed as "FAILED ..." and the rest still runs.
"""

import argparse
import copy
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from generate_imported_cpu import FULL, QUICK, agreement, build_folder, generation_inputs
from machine import gpu_name, timed_calls, write_report

from refformer.export.contract import (
    CUDA_PROVIDER,
    STATIC,
    STATIC_FUSED,
    STATIC_MHA,
    variant_refusal,
)
from refformer.refimpl.generate import GenerationOptions, search_iter

MODEL = "llama"  # generate_imported_cpu's SmolLM-135M shape
BATCH_SIZES = (1, 64)
MARGIN = 1e-3  # HF's top-2 logit margin above which a token counts as decided


def cuda_variant(cfg, dtype):
    """The decoder variant Generator(variant="auto") ends on under CUDA for cfg in dtype, without a GPU: the first of
    auto_variant(cfg, True, dtype) (only variants that compute cfg with a CUDA kernel in dtype,
    contract.variant_runs); the probe's runtime failures are not foreseen here.
    Returns (variant or None, {each CUDA static variant that cannot run cfg in dtype: contract.variant_refusal})."""
    from refformer.runtime.generator import auto_variant

    why_not = {variant: refusal for variant in (STATIC_FUSED, STATIC_MHA, STATIC)
               if (refusal := variant_refusal(cfg, variant, dtype, CUDA_PROVIDER))}
    return next(iter(auto_variant(cfg, True, dtype)), None), why_not


def make_generator(model_dir, device, dtype, static_length=None):
    """A Generator of model_dir on device in dtype: variant auto on CUDA; on the CPU the variant auto picks on CUDA.
    static_length: the static cache's slots (None: the Generator's default, max_positions).
    Returns (generator, seconds to build it: export on first use + session loading)."""
    from refformer.refimpl.io import load_config
    from refformer.runtime.generator import Generator

    start = time.perf_counter()
    if device == "cuda":
        generator = Generator(model_dir, provider="cuda", dtype=dtype, variant="auto", static_length=static_length)
    else:
        variant, _ = cuda_variant(load_config(model_dir), dtype)
        generator = Generator(model_dir, provider="cpu", dtype=dtype, variant=variant or "auto",
                              static_length=static_length)
    return generator, time.perf_counter() - start


def refformer_call(generator, ids, new_tokens, logits=False):
    """One greedy call of new_tokens forced tokens on the prompt ids [B, P]: (seconds, seconds to the first token,
    ids [B, N], and with logits=True each step's logits [B, N, V] float64 (copied to the host after every step, so
    not for timing))."""
    options = generator.check_options(GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens))
    start = time.perf_counter()
    steps = search_iter(generator.stepper, generator.cfg, options, prompt_ids=ids)
    tokens, step_logits = [next(steps)], []
    ttft = time.perf_counter() - start
    if logits:
        step_logits.append(generator.stepper.last_logits()[:, -1].astype(np.float64))
    for next_ids in steps:
        tokens.append(next_ids)
        if logits:
            step_logits.append(generator.stepper.last_logits()[:, -1].astype(np.float64))
    total = time.perf_counter() - start
    return total, ttft, np.stack(tokens, axis=1), np.stack(step_logits, axis=1) if logits else None


def hf_call(model, ids, new_tokens, device):
    """transformers' generate, greedy, new_tokens forced: (seconds, ids [B, N]), the device synchronised."""
    import torch

    with torch.inference_mode():
        tensor = torch.from_numpy(ids).to(device)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor), do_sample=False, num_beams=1,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        if device == "cuda":
            torch.cuda.synchronize()
        total = time.perf_counter() - start
    return total, out[:, ids.shape[1]:].cpu().numpy()


def timed_cell(call, reps):
    """A warm-up call, then reps calls of call() -> (seconds, ids): (the warm-up's ids, the reps' results)."""
    ids = call()[1]
    runs = [call() for _ in range(reps)]
    return ids, runs


def hf_logits(model, prompt, tokens, device):
    """HF's logits [B, N, V] float64 of each generated position, teacher-forced along prompt [B, P] + tokens [B, N]
    (one forward pass over the prompt and tokens[:, :-1])."""
    import torch

    with torch.inference_mode():
        ids = torch.from_numpy(np.concatenate([prompt, tokens[:, :-1]], axis=1)).to(device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, prompt.shape[1] - 1:]
        return logits.double().cpu().numpy()


def against_hf(generator, hf_fp32, prompt, new_tokens, eos_id, device):
    """Refformer's greedy ids and logits (its own, step by step) against HF fp32 teacher-forced along them:
    mismatches where HF's top-2 margin exceeds MARGIN (eos banned, as min_new_tokens bans it), the agreement rate,
    max |logit difference| (and HF's largest |logit|, its scale)."""
    _, _, tokens, ours = refformer_call(generator, prompt, new_tokens, logits=True)
    theirs = hf_logits(hf_fp32, prompt, tokens, device)
    banned = theirs.copy()
    if eos_id is not None:
        banned[..., eos_id] = -np.inf
    top2 = np.sort(banned, axis=-1)[..., -2:]
    decided = top2[..., 1] - top2[..., 0] > MARGIN
    same = banned.argmax(axis=-1) == tokens
    finite = np.isfinite(ours) & np.isfinite(theirs)
    return {"variant": generator.variant, "dtype": generator.dtype, "batch": int(prompt.shape[0]),
            "positions": int(tokens.size), "decided_positions": int(decided.sum()),
            "mismatches_where_decided": int((~same & decided).sum()), "agreement_rate": float(same.mean()),
            "max_abs_logit_diff": float(np.abs(ours - theirs)[finite].max()),
            "hf_max_abs_logit": float(np.abs(theirs[np.isfinite(theirs)]).max()),
            "nonfinite_logits": int((~finite).sum())}


def print_table(rows):
    print(f"\n{'impl':<10} {'variant':<14} {'dtype':<5} {'B':>3} {'ms/step':>8} {'decoder ms':>10} {'tok/s':>10} "
          f"{'TTFT ms':>8} {'vs hf':>6} {'ids = hf':>9}")
    for row in rows:
        cells = {key: "" if row.get(key) is None else f"{row[key]:.{digits}f}"
                 for key, digits in (("ms_per_step", 3), ("decoder_ms", 3), ("tok_per_s", 0), ("ttft_ms", 2))}
        same = row["checks"].get("ids_vs_hf", {}).get("identical_tokens")
        vs_hf = f"{row['speedup_vs_hf']:.2f}x" if "speedup_vs_hf" in row else ""
        print(f"{row['impl']:<10} {row['variant']:<14} {row['dtype']:<5} {row['batch']:>3} {cells['ms_per_step']:>8} "
              f"{cells['decoder_ms']:>10} {cells['tok_per_s']:>10} {cells['ttft_ms']:>8} "
              f"{vs_hf:>6} "
              f"{'' if same is None else f'{same:.3f}':>9}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny shape, 8-token prompt, 16 new tokens: a smoke test")
    parser.add_argument("--reps", type=int, default=3, help="timed calls per cell after the warm-up (median)")
    parser.add_argument("--new-tokens", type=int, help="forced new tokens (default 128; 16 with --quick)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=list(BATCH_SIZES))
    parser.add_argument("--static-length", type=int,
                        help="refformer's static cache slots (default: max_positions, 2,048 here, as generate uses)")
    parser.add_argument("--out", default=os.environ.get("OUT"),
                        help="folder of generate_imported_gpu.json (default $OUT, else benchmarks/results; with "
                             "--quick nothing is written unless given)")
    args = parser.parse_args(argv)
    if (args.reps < 1 or min(args.batch_sizes) < 1 or (args.new_tokens is not None and args.new_tokens < 1)
            or (args.static_length is not None and args.static_length < 1)):
        parser.error("--reps, --new-tokens, --static-length and every --batch-sizes must be >= 1")
    out = args.out or (None if args.quick else "benchmarks/results")

    import onnxruntime as ort
    import torch
    import transformers

    from refformer.refimpl.convert.hf_folder import import_hf
    from refformer.refimpl.io import load_config
    from refformer.runtime.generator import auto_variant

    if args.device == "cuda":
        ort.preload_dlls()
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 check: HF in true fp32 (ONNX Runtime's is off too)
        torch.backends.cudnn.allow_tf32 = False
    setup = QUICK if args.quick else FULL
    options = setup[MODEL]
    prompt_len = setup["prompt_len"]
    new_tokens = args.new_tokens or setup["new_tokens"]
    rng = np.random.default_rng(0)
    rows, checks, info = [], {}, {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="refformer-imported-gpu-") as folder:
        hf_dir, model_dir = Path(folder) / "hf-llama", Path(folder) / "refformer-llama"
        t = time.perf_counter()
        hf_fp32 = build_folder(MODEL, options, hf_dir)  # fp32, CPU, eval
        if hf_fp32.generation_config.pad_token_id is None:
            hf_fp32.generation_config.pad_token_id = hf_fp32.generation_config.eos_token_id  # generate's own choice
        import_hf(hf_dir, model_dir)
        cfg = load_config(model_dir)
        info["build_and_import_s"] = time.perf_counter() - t
        # what auto tries on CUDA and whether each variant computes this model (the CPU smoke test says it too)
        info["cuda_auto"] = {dtype: dict(zip(("picks", "cannot_run"), cuda_variant(cfg, dtype)),
                                         tries=list(auto_variant(cfg, True, dtype))) for dtype in ("fp16", "fp32")}
        print(f"llama: built and imported in {info['build_and_import_s']:.1f} s; on CUDA auto tries "
              + "; ".join(f"{d} {v['tries']} -> {v['picks']}" for d, v in info["cuda_auto"].items())
              + "; cannot run: " + "; ".join(f"{d} {v['cannot_run']}" for d, v in info["cuda_auto"].items()),
              flush=True)
        inputs = {B: generation_inputs(MODEL, options, B, prompt_len, rng) for B in args.batch_sizes}
        eos_id = options["eos_token_id"]

        generators = {}
        for dtype in ("fp16", "fp32"):
            try:
                generators[dtype], seconds = make_generator(model_dir, args.device, dtype, args.static_length)
                info[f"generator_{dtype}_s"] = seconds
                print(f"refformer {dtype}: Generator (export + load) in {seconds:.1f} s, variant "
                      f"{generators[dtype].variant}", flush=True)
            except Exception as error:  # one failing part must not cost the rest
                print(f"FAILED refformer Generator {dtype}: {str(error)[:500]}", flush=True)

        hf_fp16 = None
        try:
            hf_fp16 = copy.deepcopy(hf_fp32).half().to(args.device)
        except Exception as error:
            print(f"FAILED hf fp16 model on {args.device}: {str(error)[:500]}", flush=True)

        for B in args.batch_sizes:
            ids = inputs[B]
            hf_ids = None
            if hf_fp16 is not None:
                try:
                    warm_ids, runs = timed_cell(lambda: hf_call(hf_fp16, ids, new_tokens, args.device), args.reps)
                    hf_total = statistics.median(r[0] for r in runs)
                    hf_ids = warm_ids
                    rows.append({"impl": "hf", "model": MODEL, "variant": "hf generate", "dtype": "fp16", "batch": B,
                                 "strategy": "greedy", "ms_per_step": 1e3 * hf_total / new_tokens,
                                 "tok_per_s": B * new_tokens / hf_total, "decoder_ms": None, "ttft_ms": None,
                                 "total_s": [r[0] for r in runs], "checks": {}})
                    print(json.dumps(rows[-1]), flush=True)
                except Exception as error:
                    print(f"FAILED hf fp16 B={B}: {str(error)[:500]}", flush=True)
            if "fp16" not in generators:
                continue
            generator = generators["fp16"]
            try:
                ours = refformer_call(generator, ids, new_tokens)[2]  # warm-up (and CUDA-graph capture)
                with timed_calls(generator.stepper.decoder) as inside:  # the prompt's decoder.onnx call is not in it
                    runs = [refformer_call(generator, ids, new_tokens) for _ in range(args.reps)]
                total = statistics.median(r[0] for r in runs)
                row = {"impl": "refformer", "model": MODEL, "variant": generator.variant, "dtype": "fp16",
                       "batch": B, "strategy": "greedy", "ms_per_step": 1e3 * total / new_tokens,
                       "tok_per_s": B * new_tokens / total, "decoder_ms": 1e3 * float(np.median(inside)),
                       "ttft_ms": 1e3 * statistics.median(r[1] for r in runs), "total_s": [r[0] for r in runs],
                       "static_length": generator.stepper.max_length, "checks": {}}
                if hf_ids is not None:
                    row["checks"]["ids_vs_hf"] = agreement(ours, hf_ids)  # both fp16
                    row["speedup_vs_hf"] = hf_total / total
                rows.append(row)
                print(json.dumps(row), flush=True)
            except Exception as error:
                print(f"FAILED refformer fp16 B={B}: {str(error)[:500]}", flush=True)

        hf_device = None
        try:
            hf_fp16 = None  # its memory back before the fp32 model moves to the device
            hf_device = hf_fp32.to(args.device)
        except Exception as error:
            print(f"FAILED hf fp32 model on {args.device}: {str(error)[:500]}", flush=True)
        for dtype in ("fp32", "fp16"):
            name = f"{dtype}_B1_vs_hf_fp32"
            if dtype not in generators or hf_device is None:
                checks[name] = {"failed": "no generator or no HF model (see above)"}
                continue
            try:
                checks[name] = against_hf(generators[dtype], hf_device, inputs[min(args.batch_sizes)][:1], new_tokens,
                                          eos_id, args.device)
            except Exception as error:
                checks[name] = {"failed": str(error)[:500]}
                print(f"FAILED check {name}: {str(error)[:500]}", flush=True)
            print(name, json.dumps(checks[name]), flush=True)

    print_table(rows)
    info.update({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "device": args.device, "quick": args.quick, "model": MODEL, "config": options,
                 "prompt_len": prompt_len, "new_tokens": new_tokens, "reps": args.reps,
                 "onnxruntime": ort.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                 "seconds": time.perf_counter() - started})
    if args.device == "cuda":
        info["gpu"] = gpu_name()
    print(f"whole run {info['seconds']:.1f} s")
    write_report({"info": info, "rows": rows, "checks": checks},
                 out and str(Path(out) / "generate_imported_gpu.json"))


if __name__ == "__main__":
    main()
