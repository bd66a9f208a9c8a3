"""Greedy generation of imported Hugging Face models on the CPU: refformer against transformers and onnxruntime-genai.

Issue 14. Two models are built locally with transformers (random weights, no hub) and written with
save_pretrained (config.json + model.safetensors), then taken by each contender from that folder:

  llama  the small-LLM shape of SmolLM-135M: LlamaConfig hidden 576, 30 layers, 9 query heads, 3 KV heads,
         intermediate 1536, vocab 49,152, tied embeddings, rope_theta 10,000, rms_norm_eps 1e-5, 2,048 positions,
         bos = eos = 0 (SmolLM-135M's config); weights drawn with initializer_range 0.05 (transformers' 0.02
         gives greedy runs that repeat one id for dozens of steps);
  t5     T5-small's shape: T5Config d_model 512, d_ff 2048, 6 + 6 layers, 8 heads, d_kv 64, vocab 32,128,
         32 buckets (max distance 128), relu, tied head with the d_model**-0.5 rescale, pad 0, eos 1, decoder
         start 0; every matrix redrawn from N(0, 1 / its input width) and the relative bias tables at 3x that
         (as tests/hf_models.py draws them): with transformers' own init every greedy token is id 0, and its
         initializer_factor 5 (varied ids) grows the activations past export's fp32 check (8.9e-3 > 1e-5).

Contenders, each on the CPU with the same thread count pinned:

  refformer  `refformer import-hf` of the folder (refformer.refimpl.convert.hf_folder.import_hf), export fp32,
             refformer.runtime.generator.Generator(provider cpu, threads N, the variant named) and its stepper under
             refimpl's search_iter (the loop Generator runs), the checkpoint's settings applied by
             Generator.check_options;
  hf         transformers' model.generate on the same in-memory model (torch CPU, torch.set_num_threads(N),
             inference_mode, default attention implementation);
  genai      onnxruntime-genai 0.18.0 (llama only: the builder has no T5): its model builder converts the same
             folder at fp32 for the CPU; runs in its own venv (benchmarks/peers/setup_genai.sh) as a subprocess
             (benchmarks/peers/genai_run.py), intra_op_num_threads N through its genai_config.

Workload: a 32-token prompt (T5: 32 source tokens, the last eos), 128 new tokens forced (HF and refformer:
min_new_tokens = max_new_tokens = 128; genai: min_length = max_length = 32 + 128), greedy, B = 1 and B = 8, one
and two threads. The greedy ids of every contender are compared with HF's before timing (on the first thread
count). Then after one warm-up call per cell, 3 repetitions interleaved (every rep runs every cell on every side,
the sides' order rotating), median reported: ms per step = total / 128 (the prompt included), tokens/s =
B * 128 / total.

    .venv/bin/python benchmarks/generate_imported_cpu.py --threads 2 1 [--genai-venv /work/genai-venv]
    .venv/bin/python benchmarks/generate_imported_cpu.py --quick    # tiny shapes, 16 tokens: a smoke run in seconds

Without --genai-venv (or with a venv lacking onnxruntime_genai) the genai rows are skipped with a notice.
refformer's entries also give host_ms_per_step: the median time per step outside ONNX Runtime's session runs
(the Python search loop, input binding, the logits copy), measured around each run_with_iobinding.
Writes benchmarks/results/generate_imported_cpu.json (not with --quick unless --json is given).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from generate_cpu import cpu_flags, load_average  # benchmarks/ (scripts run from their folder on sys.path)
from machine import cpu_model, timed_calls, write_report

from refformer.refimpl.generate import GenerationOptions, search_iter

HERE = Path(__file__).resolve().parent
GENAI_RUN = HERE / "peers" / "genai_run.py"

FULL = dict(
    llama=dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
               tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, initializer_range=0.05),
    t5=dict(vocab_size=32128, d_model=512, d_ff=2048, d_kv=64, num_layers=6, num_heads=8,
            relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="relu",
            tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
    prompt_len=32, new_tokens=128, batch_sizes=(1, 8))
QUICK = dict(
    llama=dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
               tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, initializer_range=0.1),
    t5=dict(vocab_size=1000, d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4,
            relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="relu",
            tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
    prompt_len=8, new_tokens=16, batch_sizes=(1, 4))


# ---------------------------------------------------------------------------- the Hugging Face folders


def word_tokenizer(vocab_size, specials):
    """A transformers fast tokenizer of vocab_size word tokens (specials: id -> token, the rest "w<id>"), for the
    folder's tokenizer.json / tokenizer_config.json, which import-hf and onnxruntime-genai's builder read. The
    benchmark feeds ids, never text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {specials.get(i, f"w{i}"): i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=specials.get(2, "w2")))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer, PreTrainedTokenizerFast


def build_folder(family, options, folder):
    """Build the family's transformers model from options (seeded), save_pretrained it (and a tokenizer) to
    folder; returns the fp32 model in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**options))
        specials = {0: "<|endoftext|>"}
        names = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    else:
        model = T5ForConditionalGeneration(T5Config(**options))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, tensor in model.named_parameters():
                if tensor.ndim == 2:
                    scale = 3.0 if "relative_attention_bias" in name else 1.0
                    tensor.copy_(torch.randn(tensor.shape, generator=generator) * scale / tensor.shape[-1] ** 0.5)
        specials = {0: "<pad>", 1: "</s>", 2: "<unk>"}
        names = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    model = model.eval()
    model.save_pretrained(folder)
    tokenizer, fast = word_tokenizer(options["vocab_size"], specials)
    fast(tokenizer_object=tokenizer, **names).save_pretrained(folder)
    return model


def generation_inputs(family, options, batch_size, prompt_len, rng):
    """[B, S] int64 prompt (llama) or source (t5, ending with eos) ids, none of them special."""
    ids = rng.integers(3, options["vocab_size"], size=(batch_size, prompt_len)).astype(np.int64)
    if family == "t5":
        ids[:, -1] = options["eos_token_id"]
    return ids


# ---------------------------------------------------------------------------- the contenders


class Refformer:
    """import-hf of the folder, export fp32, Generator (CPU, threads, variant) per thread count."""

    def __init__(self, hf_dir, folder, thread_counts, variant, new_tokens):
        from refformer.refimpl.convert.hf_folder import import_hf
        from refformer.runtime.generator import Generator

        self.model_dir = Path(folder) / f"refformer-{Path(hf_dir).name}"
        import_hf(hf_dir, self.model_dir)
        self.generators = {n: Generator(self.model_dir, provider="cpu", dtype="fp32", threads=n, variant=variant)
                           for n in thread_counts}
        first = self.generators[thread_counts[0]]
        self.variant = first.variant
        self.options = first.check_options(GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens))

    def __call__(self, ids, threads):
        """(seconds, [B, N] ids) of one greedy call; self.host_s: its seconds outside ONNX Runtime's runs (the
        search loop, binding, copies)."""
        generator = self.generators[threads]
        key = "src_ids" if generator.cfg.is_encoder_decoder else "prompt_ids"
        sessions = [s for s in (generator.stepper.decoder, generator.stepper.encoder) if s is not None]
        with timed_calls(sessions[0]) as decoder_runs:
            with timed_calls(sessions[-1]) as encoder_runs:
                start = time.perf_counter()
                steps = list(search_iter(generator.stepper, generator.cfg, self.options, **{key: ids}))
                total = time.perf_counter() - start
        ort_s = sum(decoder_runs) + (sum(encoder_runs) if len(sessions) == 2 else 0.0)
        self.host_s = total - ort_s
        return total, np.stack(steps, axis=1)


class HuggingFace:
    def __init__(self, model, new_tokens):
        self.model, self.new_tokens = model, new_tokens
        config = model.generation_config
        if config.pad_token_id is None:
            config.pad_token_id = config.eos_token_id  # what generate does anyway, without its warning

    def __call__(self, ids, threads):
        import torch

        torch.set_num_threads(threads)
        with torch.inference_mode():
            tensor = torch.from_numpy(ids)
            start = time.perf_counter()
            out = self.model.generate(input_ids=tensor, attention_mask=torch.ones_like(tensor), do_sample=False,
                                      num_beams=1, max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens)
            total = time.perf_counter() - start
        out = out.numpy()
        new = out[:, 1:] if self.model.config.is_encoder_decoder else out[:, ids.shape[1]:]
        return total, new


class GenAI:
    """onnxruntime-genai in its own venv: the builder converts the folder, genai_run.py answers requests."""

    def __init__(self, venv, hf_dir, folder, new_tokens):
        python = str(Path(venv) / "bin" / "python")
        out, cache = Path(folder) / "genai-model", Path(folder) / "genai-cache"
        start = time.perf_counter()
        subprocess.run([python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
                        "-p", "fp32", "-e", "cpu", "-c", str(cache)], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        self.build_s = time.perf_counter() - start
        self.process = subprocess.Popen([python, str(GENAI_RUN), str(out)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        self.new_tokens, self.versions = new_tokens, {}

    def __call__(self, ids, threads):
        request = {"ids": ids.tolist(), "new_tokens": self.new_tokens, "threads": threads}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = json.loads(self.process.stdout.readline())
        if "error" in answer:
            raise RuntimeError(f"genai_run.py: {answer['error']}")
        self.versions = answer["versions"]
        return answer["total_s"][0], np.asarray(answer["ids"], dtype=np.int64)

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=60)


def genai_available(venv):
    if not venv:
        return "no --genai-venv given"
    python = Path(venv) / "bin" / "python"
    if not python.is_file():
        return f"{python} not found (make it with benchmarks/peers/setup_genai.sh {venv})"
    if subprocess.run([str(python), "-c", "import onnxruntime_genai"], capture_output=True).returncode != 0:
        return f"{venv} lacks onnxruntime_genai (make it with benchmarks/peers/setup_genai.sh {venv})"
    return None


# ---------------------------------------------------------------------------- main


def agreement(ours, theirs):
    """Share of identical ids and the shortest identical prefix over the rows (ours vs theirs, [B, N])."""
    if ours.shape != theirs.shape:
        return {"identical_tokens": 0.0, "identical_prefix_min": 0, "shapes": [list(ours.shape), list(theirs.shape)]}
    prefix = [int(np.argmax(np.append(a != b, True))) for a, b in zip(ours, theirs)]
    return {"identical_tokens": float((ours == theirs).mean()), "identical_prefix_min": min(prefix)}


def print_table(entries):
    header = (f"{'model':<6} {'thr':>3} {'B':>2} {'impl':<10} {'ms/step':>8} {'(min..max)':>15} {'tok/s':>7} "
              f"{'vs hf':>6} {'vs genai':>8} {'ids = hf':>9} {'host ms':>8}")
    print(header)
    print("-" * len(header))
    for e in entries:
        lo, hi = e["ms_per_step_min"], e["ms_per_step_max"]
        vs_hf = f"{e['speedup_vs_hf']:.2f}x" if "speedup_vs_hf" in e else ""
        vs_genai = f"{e['speedup_vs_genai']:.2f}x" if "speedup_vs_genai" in e else ""
        same = "" if e["impl"] == "hf" else f"{e['agreement_with_hf']['identical_tokens']:.3f}"
        print(f"{e['model']:<6} {e['threads']:>3} {e['batch']:>2} {e['impl']:<10} {e['ms_per_step']:>8.2f} "
              f"{f'({lo:.1f}..{hi:.1f})':>15} {e['tok_per_s']:>7.1f} {vs_hf:>6} {vs_genai:>8} {same:>9} "
              f"{e['host_ms_per_step'] if 'host_ms_per_step' in e else '':>8.3}")


def markdown_table(entries):
    """The RESULTS.md table of the entries: one row per model, threads, batch and implementation."""
    lines = ["| model | threads | B | impl | ms/step (min..max) | tokens/s | vs HF | vs ort-genai | ids = HF's |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        vs_hf = f"{e['speedup_vs_hf']:.2f}x" if "speedup_vs_hf" in e else ""
        vs_genai = f"{e['speedup_vs_genai']:.2f}x" if "speedup_vs_genai" in e else ""
        same = "" if e["impl"] == "hf" else f"{e['agreement_with_hf']['identical_tokens']:.3f}"
        impl = f"refformer ({e['variant']})" if e["impl"] == "refformer" else e["impl"]
        lines.append(f"| {e['model']} | {e['threads']} | {e['batch']} | {impl} | {e['ms_per_step']:.2f} "
                     f"({e['ms_per_step_min']:.2f}..{e['ms_per_step_max']:.2f}) | {e['tok_per_s']:.1f} | {vs_hf} | "
                     f"{vs_genai} | {same} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 16 new tokens (seconds)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--models", nargs="+", default=["llama", "t5"], choices=["llama", "t5"])
    parser.add_argument("--variant", default="auto",
                        help="refformer's decoder variant (Generator's variant=; default auto: what generate uses)")
    parser.add_argument("--genai-venv", default=os.environ.get("GENAI_VENV"),
                        help="the venv of benchmarks/peers/setup_genai.sh (default: $GENAI_VENV)")
    parser.add_argument("--json", help="write results here (default benchmarks/results/generate_imported_cpu.json; "
                                       "not written with --quick unless given)")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.warmup < 0 or min(args.threads) < 1:
        parser.error("--reps must be >= 1, --warmup >= 0 and every --threads >= 1")

    import onnxruntime
    import torch
    import transformers

    setup = QUICK if args.quick else FULL
    prompt_len, new_tokens = setup["prompt_len"], setup["new_tokens"]
    batch_sizes = tuple(args.batch_sizes or setup["batch_sizes"])
    thread_counts = tuple(dict.fromkeys(args.threads))
    genai_missing = genai_available(args.genai_venv)
    if genai_missing:
        print(f"notice: onnxruntime-genai rows skipped: {genai_missing}", flush=True)
    load_before = load_average()
    print(f"threads {thread_counts} (cores {os.cpu_count()}), load average {load_before}, {cpu_model()}", flush=True)

    entries, details, versions = [], {}, {}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="refformer-bench-") as folder:
        for family in args.models:
            options = setup[family]
            hf_dir = Path(folder) / f"hf-{family}"
            t = time.perf_counter()
            sides = {"hf": HuggingFace(build_folder(family, options, hf_dir), new_tokens)}
            sides["refformer"] = Refformer(hf_dir, folder, thread_counts, args.variant, new_tokens)
            built = {"hf_and_refformer_s": time.perf_counter() - t}
            if family == "llama" and not genai_missing:
                sides["genai"] = GenAI(args.genai_venv, hf_dir, folder, new_tokens)
                built["genai_builder_s"] = sides["genai"].build_s
            print(f"{family}: built, imported and exported in {built['hf_and_refformer_s']:.1f} s; refformer variant "
                  f"{sides['refformer'].variant}" + (f"; genai builder {built['genai_builder_s']:.1f} s"
                                                     if "genai_builder_s" in built else ""), flush=True)
            inputs = {B: generation_inputs(family, options, B, prompt_len, rng) for B in batch_sizes}
            timings = {(n, B, side): [] for n in thread_counts for B in batch_sizes for side in sides}
            host = {(n, B): [] for n in thread_counts for B in batch_sizes}
            agree = {}
            names = list(sides)
            t0 = time.perf_counter()
            for rep in range(-args.warmup, args.reps):
                order = names[rep % len(names):] + names[:rep % len(names)]
                for n in thread_counts:
                    for B in batch_sizes:
                        outputs = {}
                        for side in order:
                            seconds, ids = sides[side](inputs[B], n)
                            outputs[side] = ids
                            if rep >= 0:
                                timings[n, B, side].append(seconds)
                                if side == "refformer":
                                    host[n, B].append(sides[side].host_s)
                        if rep == -args.warmup:  # the tokens, checked before any timed run
                            for side in names:
                                if side != "hf":
                                    agree[n, B, side] = agreement(outputs[side], outputs["hf"])
                            if "genai" in outputs:
                                agree[n, B, "genai_vs_refformer"] = agreement(outputs["genai"],
                                                                              outputs["refformer"])
                            distinct = len(np.unique(outputs["hf"]))
                            print(f"  threads {n} B={B}: ids equal to hf's: " + ", ".join(
                                f"{side} {agree[n, B, side]['identical_tokens']:.3f}" for side in names
                                if side != "hf") + f"; hf's {outputs['hf'].size} ids hold {distinct} distinct",
                                flush=True)
                label = "warm-up" if rep < 0 else f"rep {rep + 1}/{args.reps}"
                print(f"{family}: {label} done ({time.perf_counter() - t0:.0f} s)", flush=True)
            if "genai" in sides:
                sides["genai"].close()
                versions["onnxruntime_genai"] = sides["genai"].versions
            for n in thread_counts:
                for B in batch_sizes:
                    medians = {side: statistics.median(timings[n, B, side]) for side in names}
                    for side in names:
                        times = timings[n, B, side]
                        entry = {"model": family, "impl": side, "threads": n, "batch": B,
                                 "ms_per_step": 1e3 * medians[side] / new_tokens,
                                 "ms_per_step_min": 1e3 * min(times) / new_tokens,
                                 "ms_per_step_max": 1e3 * max(times) / new_tokens,
                                 "tok_per_s": B * new_tokens / medians[side], "total_s": times}
                        if side == "refformer":
                            entry["variant"] = sides["refformer"].variant
                            entry["host_ms_per_step"] = 1e3 * statistics.median(host[n, B]) / new_tokens
                        if side != "hf":
                            entry["speedup_vs_hf"] = medians["hf"] / medians[side]
                            entry["agreement_with_hf"] = agree[n, B, side]
                        if side == "refformer" and "genai" in medians:
                            entry["speedup_vs_genai"] = medians["genai"] / medians[side]
                            entry["agreement_with_genai"] = agree[n, B, "genai_vs_refformer"]
                        entries.append(entry)
            details[family] = {"config": options, "built_s": built}
            del sides

    print()
    print_table(entries)
    goals = []
    for e in entries:
        if e["impl"] != "refformer":
            continue
        goals.append({"goal": ">= 2x hf", "model": e["model"], "threads": e["threads"], "batch": e["batch"],
                      "ratio": e["speedup_vs_hf"], "met": e["speedup_vs_hf"] >= 2.0})
        if e["model"] == "llama" and e["batch"] == 1 and "speedup_vs_genai" in e:
            goals.append({"goal": ">= 1x genai", "model": e["model"], "threads": e["threads"], "batch": 1,
                          "ratio": e["speedup_vs_genai"], "met": e["speedup_vs_genai"] >= 1.0})
    print("\ngoals: " + "; ".join(f"{g['model']} thr {g['threads']} B={g['batch']} {g['goal']}: {g['ratio']:.2f}x "
                                  f"{'met' if g['met'] else 'MISSED'}" for g in goals))
    print("\n" + markdown_table(entries) + "\n")
    load_after = load_average()
    print(f"load average before {load_before}, after {load_after}")

    report = {
        "benchmark": "generate_imported_cpu",
        "issue": 14,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "prompt_len": prompt_len, "new_tokens": new_tokens, "reps": args.reps, "warmup": args.warmup,
        "models": details,
        "context": {
            "cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
            "load_average_before": load_before, "load_average_after": load_after,
            "platform": platform.platform(), "python": platform.python_version(),
            "versions": {"numpy": np.__version__, "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, **versions},
            "genai_skipped": genai_missing,
        },
        "entries": entries,
        "goals": goals,
    }
    write_report(report, args.json or (None if args.quick else "benchmarks/results/generate_imported_cpu.json"))
    return report


if __name__ == "__main__":
    main()
