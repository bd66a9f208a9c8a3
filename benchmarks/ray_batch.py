"""Batch generation in one process (`refformer generate --input`) against Ray Data (`refformer batch`, 2 workers).

Issue 17. The bundled German->English model on the CPU, greedy. Input: the German side of the de-en corpus's test
split, as `refformer data de-en` writes it (refformer.refimpl.training.data.prepare_de_en from Debian's trans-de-en,
scripts/get-data.sh; or --data DIR holding a test.tsv already), its first --sentences lines (topped up from
valid.tsv and train.tsv when the test split is smaller), as JSONL {"text", "id"} in 2 shard files.

Each setting runs the real command in a process of its own, timed from start to exit (process start, model load, a
local Ray cluster's start and stop all included, as a user waits for them):
- `generate --threads 2` and `generate --threads 1` on the two shards joined (one file, the same lines);
- `batch --workers 2 --threads 1` (two actors with one ONNX Runtime thread each, a local cluster of 3 logical
  CPUs) and `batch --workers 1 --threads 2`, on the two shards.
Each also runs on a one-line input: its fixed cost (start-up and model load; for Ray the cluster), reported beside
the full run. The settings alternate, --reps times each; the table gives medians. The records of every Ray run are
compared with generate's (the "file" field dropped): they must be the same.

    flock /tmp/refformer-bench.lock .venv/bin/python benchmarks/ray_batch.py [--sentences 300] [--reps 2] \
        [--json benchmarks/results/ray_batch.json]
    .venv/bin/python benchmarks/ray_batch.py --quick     # 20 sentences, 1 rep: a smoke check

What 2 cores can show: that the Ray path gives generate's records and what its fixed costs are. What they cannot:
a speed-up. One ONNX Runtime session with 2 threads already uses both cores; two 1-thread workers share the same 2
cores (and the Ray processes and the reading and writing tasks share them too), so the best Ray can do here is
match the single process. Scaling needs more cores or machines than this one has.
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

from machine import cpu_model  # benchmarks/machine.py (scripts run from their folder on sys.path)

HERE = Path(__file__).resolve().parent
REFFORMER = [str(Path(sys.executable).parent / "refformer")]  # the installed command, as a user runs it
SETTINGS = {
    "generate --threads 2": ("generate", ["--threads", "2"]),
    "generate --threads 1": ("generate", ["--threads", "1"]),
    "batch --workers 2 --threads 1": ("batch", ["--workers", "2", "--threads", "1"]),
    "batch --workers 1 --threads 2": ("batch", ["--workers", "1", "--threads", "2"]),
}


def load_average():
    return [round(value, 2) for value in os.getloadavg()]


def german_sentences(data_dir, count):
    """The German side of data_dir's test split (then valid, train), count lines. Writes the splits with
    prepare_de_en into data_dir first when it has no test.tsv."""
    from refformer.refimpl.training.data import prepare_de_en

    data_dir = Path(data_dir)
    if not (data_dir / "test.tsv").is_file():
        prepare_de_en(data_dir)
    sentences = []
    for split in ("test", "valid", "train"):
        for line in (data_dir / f"{split}.tsv").read_text(encoding="utf-8").splitlines():
            german = line.split("\t", 1)[0].strip()
            if german:
                sentences.append(german)
        if len(sentences) >= count:
            break
    return sentences[:count]


def command_line(kind, options, shards, joined, out, decoding):
    if kind == "generate":
        return [*REFFORMER, "generate", "--input", str(joined), "--output", str(out), "--overwrite", *options,
                *decoding]
    return [*REFFORMER, "batch", *map(str, shards), "--out", str(out), "--overwrite", *options, *decoding]


def timed(argv):
    """Seconds the command took; raises when it failed."""
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv[1:])} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return seconds


def records(kind, out):
    """The run's records without "file", in input order (shard file, then line)."""
    if kind == "generate":
        lines = Path(out).read_text(encoding="utf-8").splitlines()
        found = [json.loads(line) for line in lines]
        return [(record["id"], record["output"], record["ids"]) for record in found]
    found = [json.loads(line) for shard in sorted(Path(out).iterdir()) for line in shard.open(encoding="utf-8")]
    found.sort(key=lambda record: (record["file"], record["line"]))
    return [(record["id"], record["output"], record["ids"]) for record in found]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=300)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--data", default=None, help="a `refformer data de-en` folder (default: made in a temp "
                                                     "folder from /usr/share/trans/de-en)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the command's own")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.sentences, args.reps = 20, 1
    decoding = [] if args.max_new_tokens is None else ["--max-new-tokens", str(args.max_new_tokens)]

    before = load_average()
    with tempfile.TemporaryDirectory(prefix="ray-bench-") as temp:
        temp = Path(temp)
        sentences = german_sentences(args.data or temp / "de-en", args.sentences)
        half = (len(sentences) + 1) // 2
        shards = [temp / "in-0.jsonl", temp / "in-1.jsonl"]
        for shard, part, start in ((shards[0], sentences[:half], 0), (shards[1], sentences[half:], half)):
            shard.write_text("".join(json.dumps({"text": text, "id": start + n}, ensure_ascii=False) + "\n"
                                     for n, text in enumerate(part)), encoding="utf-8")
        joined = temp / "all.jsonl"
        joined.write_text(shards[0].read_text(encoding="utf-8") + shards[1].read_text(encoding="utf-8"),
                          encoding="utf-8")
        one = temp / "one.jsonl"
        one.write_text(json.dumps({"text": sentences[0], "id": 0}, ensure_ascii=False) + "\n", encoding="utf-8")

        # the export of the bundled model into the per-user cache, once, untimed
        timed(command_line("generate", ["--threads", "2"], [one], one, temp / "warm.jsonl", decoding))
        runs, reference = [], None
        for rep in range(args.reps):
            for name, (kind, options) in SETTINGS.items():
                out = temp / f"out-{kind}"
                fixed = timed(command_line(kind, options, [one], one, out, decoding))
                seconds = timed(command_line(kind, options, shards, joined, out, decoding))
                got = records(kind, out)
                if reference is None:
                    reference = got
                same = got == reference
                runs.append({"setting": name, "rep": rep, "seconds": round(seconds, 3),
                             "one_line_seconds": round(fixed, 3), "sentences_per_s": round(len(sentences) / seconds, 2),
                             "records": len(got), "same_records": same})
                print(f"{name:32s} rep {rep}: {seconds:7.2f} s ({len(sentences) / seconds:6.1f} sentences/s), "
                      f"one line {fixed:5.2f} s, same records: {same}", flush=True)
    after = load_average()

    summary = {}
    for name in SETTINGS:
        mine = [run for run in runs if run["setting"] == name]
        seconds = statistics.median(run["seconds"] for run in mine)
        fixed = statistics.median(run["one_line_seconds"] for run in mine)
        marginal = seconds - fixed  # the time the other sentences added: None when noise hides it
        summary[name] = {"median_s": round(seconds, 3), "median_one_line_s": round(fixed, 3),
                         "sentences_per_s": round(len(sentences) / seconds, 2),
                         "sentences_per_s_after_fixed_cost": round((len(sentences) - 1) / marginal, 2)
                         if marginal > 0 else None}
    print(f"\n{len(sentences)} sentences, {args.reps} reps, load average {before} -> {after}")
    print(f"{'setting':32s} {'median s':>9s} {'one line s':>11s} {'sent/s':>8s} {'sent/s after fixed':>19s}")
    for name, row in summary.items():
        after_fixed = row["sentences_per_s_after_fixed_cost"]
        print(f"{name:32s} {row['median_s']:9.2f} {row['median_one_line_s']:11.2f} {row['sentences_per_s']:8.1f} "
              f"{'-' if after_fixed is None else f'{after_fixed:.1f}':>19s}")
    all_same = all(run["same_records"] for run in runs)
    print(f"every run's records equal generate --threads 2's: {all_same}")
    if args.json:
        result = {"benchmark": "ray_batch", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"),
                  "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
                  "load_average_before": before, "load_average_after": after, "quick": args.quick,
                  "sentences": len(sentences), "reps": args.reps, "decoding": decoding or "generate's defaults",
                  "summary": summary, "runs": runs, "all_records_same": all_same}
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if not all_same:
        raise SystemExit("the records differ between settings")


if __name__ == "__main__":
    main()
