"""Which decoder variant is fastest on the CPU, per dtype, measured through the product path (Generator): the figures
behind runtime/generator.py auto_variant's CPU choice.

    .venv/bin/python benchmarks/generate_cpu_variants.py [--threads 2 1] [--reps 3] [--only bundled|marian]
    .venv/bin/python benchmarks/generate_cpu_variants.py --quick        # tiny smoke configuration

Every contender is Generator(model, provider="cpu", dtype=D, threads=N, variant=V) (static_length: its default,
max_positions), for (D, V) in VARIANTS: int8 reference / static_fused / static, fp32 reference / static_fused.
  bundled  the bundled model (runtime/models/de-en) on real sentences: the first --sentences (16) German sources of
           --data's test split (default /tmp/ncw/data/de-en; from `refformer data de-en --out DIR`), greedy with
           the default options (each row stops at eos), as Generator.generate_ids runs them: B 1 (one call per
           sentence) and B 16 (calls of 16). ms per step = the calls' time / their decoding steps (a call's steps:
           its longest output, eos included; int8 outputs differ a little from fp32's, so the step counts do too).
  marian   the Marian-base shape of generate_cpu.py (D 512, H 8, 6 + 6 post-LN layers, F 2048, V 32000, tied head,
           max_positions 512), random weights (init_params, seed 0) saved with a tokenizer of the four special
           tokens (the search runs on ids); 31 random source ids + eos per row, B 1 and 16, 128 forced new tokens
           (min = max), greedy through Generator.search_rows. ms per step = the call / 128 (encoder included).
Reps interleaved (every rep runs every contender, the order rotating), one warm-up rep; medians of --reps.
First-call cost: each (dtype, variant)'s first Generator is created against an empty export cache (bundled: a fresh
XDG_CACHE_HOME; marian: a fresh model folder per variant, exports land in MODEL/onnx), timed once: the export (and
quantization) it runs plus the session loads. The second thread count's Generator reuses that export.
split (--only split): the whole bundled test split through Generator.generate in chunks of 16 and 64 (--batch-sizes),
           seconds per pass: rows that finish early leave the reference stepper's batch, and (since keep_rows)
           static_fused's on the CPU; static keeps them (its buffer sets are per batch size).
Agreement: the bundled test split's 493 sentences, int8 static_fused and static against int8 reference, and
every variant against fp32 reference (greedy ids, B 16 through generate_ids: int8 rows depend on their batch).
"""

import argparse
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
from generate_cpu import FULL, QUICK, cpu_flags, load_average
from machine import cpu_model, write_report

VARIANTS = [("int8", "reference"), ("int8", "static_fused"), ("int8", "static"),
            ("fp32", "reference"), ("fp32", "static_fused")]


def read_sources(data_dir, count=None):
    """The German sources of data_dir/test.tsv (tab-separated source, target), the first count (all with None)."""
    with open(Path(data_dir) / "test.tsv", encoding="utf-8") as f:
        sources = [line.split("\t", 1)[0] for line in f if line.strip()]
    return sources if count is None else sources[:count]


def make_generators(model_for, thread_counts, cache_for, only_variants):
    """{(dtype, variant, threads): Generator}, and {(dtype, variant): seconds of the first Generator's creation
    against an empty export cache}. model_for(dtype, variant) -> model folder; cache_for(dtype, variant) -> the
    XDG_CACHE_HOME to use (a fresh folder)."""
    from refformer.runtime.generator import Generator

    generators, first_call = {}, {}
    for dtype, variant in only_variants:
        os.environ["XDG_CACHE_HOME"] = cache_for(dtype, variant)
        for number, n in enumerate(thread_counts):
            t = time.perf_counter()
            generators[dtype, variant, n] = Generator(model_for(dtype, variant), provider="cpu", dtype=dtype,
                                                      threads=n, variant=variant)
            seconds = time.perf_counter() - t
            if number == 0:
                first_call[dtype, variant] = seconds
            print(f"  Generator({dtype}, {variant}, threads {n}): {seconds:.1f} s"
                  f"{' (empty cache: exports)' if number == 0 else ''}", flush=True)
    return generators, first_call


def time_cells(generators, call, contenders, thread_counts, batch_sizes, reps, warmup):
    """{(dtype, variant, threads, B): [(seconds, steps), ...]} over reps interleaved reps (after warmup ones)."""
    totals = {(*c, n, B): [] for c in contenders for n in thread_counts for B in batch_sizes}
    t0 = time.perf_counter()
    for rep in range(-warmup, reps):
        shift = rep % len(contenders)
        order = contenders[shift:] + contenders[:shift]
        for n in thread_counts:
            for B in batch_sizes:
                for dtype, variant in order:
                    seconds, steps = call(generators[dtype, variant, n], B)
                    if rep >= 0:
                        totals[dtype, variant, n, B].append((seconds, steps))
        print(f"{'warm-up' if rep < 0 else f'rep {rep + 1}/{reps}'} done ({time.perf_counter() - t0:.0f} s, "
              f"load {load_average()})", flush=True)
    return totals


def entries_of(part, totals, first_call):
    entries = []
    for (dtype, variant, n, B), values in totals.items():
        per_step = [seconds / steps for seconds, steps in values]
        entries.append({"part": part, "dtype": dtype, "variant": variant, "threads": n, "batch": B,
                        "ms_per_step": 1e3 * statistics.median(per_step),
                        "ms_per_step_min": 1e3 * min(per_step), "ms_per_step_max": 1e3 * max(per_step),
                        "ms_per_call": 1e3 * statistics.median(s for s, _ in values),
                        "steps": values[0][1], "first_generator_s": first_call[dtype, variant]})
    return entries


def print_table(title, entries, thread_counts, batch_sizes):
    by = {(e["dtype"], e["variant"], e["threads"], e["batch"]): e for e in entries}
    cells = [(n, B) for n in thread_counts for B in batch_sizes]
    print(f"\n{title}: ms per step, median (min..max); first Generator (empty cache)")
    print(f"{'dtype variant':<22}" + "".join(f"{f't{n} B{B}':>20}" for n, B in cells) + f"{'first':>9}")
    def cell(e):
        return f"{e['ms_per_step']:.2f} ({e['ms_per_step_min']:.2f}..{e['ms_per_step_max']:.2f})"

    for dtype, variant in dict.fromkeys((e["dtype"], e["variant"]) for e in entries):
        row = [by[dtype, variant, n, B] for n, B in cells]
        print(f"{dtype + ' ' + variant:<22}" + "".join(f"{cell(e):>20}" for e in row)
              + f"{row[0]['first_generator_s']:>8.1f}s")


def bundled_part(args, contenders, root):
    """Timings on the bundled model with real sentences, and the test split's agreement between variants."""
    from refformer.runtime.generator import default_model_dir

    model = default_model_dir()
    sources = read_sources(args.data)
    timed_sources = sources[:4 if args.quick else args.sentences]
    batch_sizes = tuple(args.batch_sizes or (1, min(16, len(timed_sources))))

    def cache_for(dtype, variant):
        return tempfile.mkdtemp(prefix=f"cache-{dtype}-{variant}-", dir=root)

    generators, first_call = make_generators(lambda d, v: model, args.threads, cache_for, contenders)

    def call(generator, B):
        seconds = steps = 0
        for start in range(0, len(timed_sources), B):
            t = time.perf_counter()
            ids = generator.generate_ids(timed_sources[start:start + B])
            seconds += time.perf_counter() - t
            steps += max(len(row[0]) for row in ids)
        return seconds, steps

    totals = time_cells(generators, call, contenders, args.threads, batch_sizes, args.reps, args.warmup)
    entries = entries_of("bundled", totals, first_call)
    print_table(f"bundled model, {len(timed_sources)} test sentences", entries, args.threads, batch_sizes)

    # agreement on the whole test split (B 16 through generate_ids, threads of the first count)
    n0 = args.threads[0]
    split = sources[:32] if args.quick else sources
    ids = {}
    for dtype, variant in contenders:
        generator = generators[dtype, variant, n0]
        ids[dtype, variant] = [row[0] for start in range(0, len(split), 16)
                               for row in generator.generate_ids(split[start:start + 16])]
    agreement = {}
    for dtype, variant in contenders:
        for base in (("int8", "reference"), ("fp32", "reference")):
            if (dtype, variant) != base and base in ids:
                same = sum(a == b for a, b in zip(ids[dtype, variant], ids[base]))
                agreement[f"{dtype}-{variant} == {base[0]}-{base[1]}"] = [same, len(split)]
    for key, (same, total) in agreement.items():
        print(f"  {key}: {same} of {total} outputs equal", flush=True)
    return entries, agreement, len(timed_sources)


def split_part(args, contenders, root):
    """The bundled model's whole test split through Generator.generate in chunks of each batch size (default 16,
    generate --input's --batch-size, and 64, Generator.generate's LIBRARY_BATCH): seconds per pass, where rows that
    finish early leave the reference stepper's batch and static_fused's (StaticOrtStepper.keep_rows)."""
    from refformer.runtime.generator import default_model_dir

    sources = read_sources(args.data, 64 if args.quick else None)
    batch_sizes = tuple(args.batch_sizes or (16, 64))

    def cache_for(dtype, variant):
        return tempfile.mkdtemp(prefix=f"cache-{dtype}-{variant}-", dir=root)

    generators, first_call = make_generators(lambda d, v: default_model_dir(), args.threads, cache_for, contenders)

    def call(generator, B):
        t = time.perf_counter()
        for start in range(0, len(sources), B):
            generator.generate(sources[start:start + B])
        return time.perf_counter() - t, 1

    totals = time_cells(generators, call, contenders, args.threads, batch_sizes, args.reps, args.warmup)
    entries = []
    for (dtype, variant, n, B), values in totals.items():
        seconds = [s for s, _ in values]
        entries.append({"part": "split", "dtype": dtype, "variant": variant, "threads": n, "batch": B,
                        "seconds": statistics.median(seconds), "seconds_min": min(seconds),
                        "seconds_max": max(seconds), "sentences": len(sources),
                        "first_generator_s": first_call[dtype, variant]})
    print(f"\nbundled model, whole test split ({len(sources)} sentences): seconds per pass, median (min..max)")
    for e in entries:
        print(f"  {e['dtype']} {e['variant']:<13} t{e['threads']} chunks of {e['batch']:<3} {e['seconds']:.2f} "
              f"({e['seconds_min']:.2f}..{e['seconds_max']:.2f})")
    return entries


def marian_part(args, contenders, root):
    """Timings on the Marian-base shape, 128 forced tokens (the quick shape with --quick)."""
    from refformer.refimpl import init_params, save
    from refformer.refimpl.generate import GenerationOptions

    setup = QUICK if args.quick else FULL
    cfg, src_len, new_tokens = setup["cfg"], setup["src_len"], setup["new_tokens"]
    params = init_params(cfg, np.random.default_rng(0))
    from tokenizers import Tokenizer, models  # the search runs on ids: a tokenizer of the four special tokens
    tokenizer = Tokenizer(models.WordLevel({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}, unk_token="<unk>"))

    def model_for(dtype, variant):
        folder = Path(root) / f"marian-{dtype}-{variant}"
        if not folder.exists():
            save(folder, cfg, params, tokenizer=tokenizer)
        return folder

    generators, first_call = make_generators(model_for, args.threads, lambda d, v: str(Path(root) / "unused-cache"),
                                             contenders)
    rng = np.random.default_rng(1)
    batch_sizes = tuple(args.batch_sizes or setup["batch_sizes"])
    rows = {B: [[int(t) for t in rng.integers(4, cfg.vocab_size, size=src_len - 1)] for _ in range(B)]
            for B in batch_sizes}  # pad_inputs appends eos
    options = GenerationOptions(max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    def call(generator, B):
        t = time.perf_counter()
        out = generator.search_rows(rows[B], options)
        seconds = time.perf_counter() - t
        assert all(len(row[0]) == new_tokens for row in out)
        return seconds, new_tokens

    totals = time_cells(generators, call, contenders, args.threads, batch_sizes, args.reps, args.warmup)
    entries = entries_of("marian", totals, first_call)
    print_table(f"Marian-base shape, {new_tokens} forced tokens", entries, args.threads, batch_sizes)
    return entries, cfg.to_dict(), new_tokens


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--only", nargs="+", choices=["bundled", "marian", "split"], default=["bundled", "marian"],
                        help="split: the bundled test split's seconds per pass (not in the default)")
    parser.add_argument("--variants", nargs="+", help="dtype-variant pairs, e.g. int8-static_fused (default: all)")
    parser.add_argument("--data", default="/tmp/ncw/data/de-en", help="a folder with test.tsv")
    parser.add_argument("--sentences", type=int, default=16, help="bundled: test sentences timed (B 16: in 16s)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", help="batch sizes (default 1 16)")
    parser.add_argument("--json", help="default: benchmarks/results/generate_cpu_variants.json (not with --quick)")
    args = parser.parse_args(argv)
    args.threads = list(dict.fromkeys(args.threads))
    contenders = [c for c in VARIANTS if not args.variants or f"{c[0]}-{c[1]}" in args.variants]

    import onnxruntime

    load_before = load_average()
    print(f"threads {args.threads} (cores {os.cpu_count()}), load average {load_before}, {cpu_model()}", flush=True)
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    root = tempfile.mkdtemp(prefix="refformer-bench-variants-")
    saved_cache = os.environ.get("XDG_CACHE_HOME")
    report = {"benchmark": "generate_cpu_variants", "command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date": started, "quick": args.quick, "reps": args.reps, "warmup": args.warmup,
              "threads": args.threads, "contenders": [f"{d}-{v}" for d, v in contenders]}
    try:
        entries = []
        if "bundled" in args.only:
            bundled, agreement, count = bundled_part(args, contenders, root)
            entries += bundled
            report["bundled"] = {"sentences_timed": count, "data": args.data,
                                 "agreement_test_split_batch16": agreement}
        if "split" in args.only:
            entries += split_part(args, contenders, root)
        if "marian" in args.only:
            marian, config, new_tokens = marian_part(args, contenders, root)
            entries += marian
            report["marian"] = {"config": config, "new_tokens": new_tokens}
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if saved_cache is None:
            os.environ.pop("XDG_CACHE_HOME", None)
        else:
            os.environ["XDG_CACHE_HOME"] = saved_cache
    load_after = load_average()
    print(f"load average {load_before} -> {load_after}")
    report["machine"] = {"cpu": cpu_model(), "cpu_flags": cpu_flags(), "cores": os.cpu_count(),
                         "load_average_before": load_before, "load_average_after": load_after,
                         "platform": platform.platform(), "python": platform.python_version()}
    report["versions"] = {"numpy": np.__version__, "onnxruntime": onnxruntime.__version__}
    report["entries"] = entries
    write_report(report, args.json or (None if args.quick else "benchmarks/results/generate_cpu_variants.json"))
    return report


if __name__ == "__main__":
    main()
