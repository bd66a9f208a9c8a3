"""`refformer batch` on Ray Data against the single-process `generate --json`: the same records (bad lines
included), every line once when a worker dies mid-run, OUT_DIR's rules, and the one-line message without Ray.

The cluster is the module's ray_cluster (conftest.py): the command finds Ray initialized and runs on it."""

import json
import os
import sys

import pytest
from click.testing import CliRunner

from refformer.runtime.cli import main

from .conftest import needs_ray

INPUT_A = (b'{"text": "Guten Morgen.", "id": "a1"}\n'
           b'{"text": "Das Haus ist rot.", "id": 7}\n'
           b"ich bin hier\n"
           b"\n"
           b'{"bad json\n'
           b'{"id": "no-text"}\n'
           b"Wo ist der Bahnhof?\n"
           b"caf\xe9 au lait\n"  # not UTF-8: reported for this line only
           b"Der Hund schl\xc3\xa4ft.\n")
INPUT_B = "".join(f"Das ist Satz Nummer {n}.\n" for n in range(1, 8)).encode()
DECODING = ["--max-new-tokens", "12"]


def invoke(*args):
    return CliRunner().invoke(main, list(args))


def generate_json(path):
    """The records of the single-process `generate --input path --json`."""
    result = invoke("generate", "--input", str(path), "--json", "--threads", "1", *DECODING)
    assert result.exit_code in (0, 1), result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def read_out(out):
    """Every record of OUT_DIR's shards, sorted by file and line."""
    records = [json.loads(line) for shard in sorted(os.listdir(out)) for line in open(out / shard, encoding="utf-8")]
    return sorted(records, key=lambda record: (record["file"], record["line"]))


@needs_ray
def test_records_equal_generate_json_and_overwrite_replaces_at_the_end(ray_cluster, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_bytes(INPUT_A)
    (tmp_path / "data" / "b.jsonl").write_bytes(INPUT_B)
    expected = {name: generate_json(tmp_path / "data" / name) for name in ("a.jsonl", "b.jsonl")}  # exports first
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.jsonl").write_text("an earlier run\n")
    pattern = str(tmp_path / "data" / "*.jsonl")

    refused = invoke("batch", pattern, "--out", str(out), *DECODING)
    assert refused.exit_code == 1 and refused.stderr.count("\n") == 1, refused.output
    assert "exists and is not empty; pass --overwrite" in refused.stderr
    assert os.listdir(out) == ["old.jsonl"]

    result = invoke("batch", pattern, "--out", str(out), "--overwrite", "--workers", "2", "--batch-size", "3",
                    *DECODING)
    assert result.exit_code == 1, result.output  # bad lines: exit 1, as generate
    assert "wrote 16 records from 2 files" in result.stderr
    assert "error: 4 of 16 inputs failed" in result.stderr
    assert "Traceback" not in result.output
    assert "old.jsonl" not in os.listdir(out)
    assert all(name.startswith("part-") and name.endswith(".jsonl") for name in os.listdir(out))
    records = read_out(out)
    for name, records_of_generate in expected.items():
        mine = [{key: value for key, value in record.items() if key != "file"} for record in records
                if record["file"] == str(tmp_path / "data" / name)]
        assert mine == records_of_generate
    assert sorted(record["line"] for record in records if "error" in record) == [4, 5, 6, 8]  # all in a.jsonl
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".out.")]  # no staging folder left


def dying_once(marker):
    """A BatchWorker whose actor exits (os._exit, as a killed process) at its second batch, once in the whole run
    (the first actor to create marker)."""
    from refformer.runtime.ray_batch import BatchWorker

    class DyingOnce(BatchWorker):
        calls = 0

        def __call__(self, batch):
            self.calls += 1
            if self.calls == 2:
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                    os._exit(1)
                except FileExistsError:
                    pass
            return super().__call__(batch)

    return DyingOnce


@needs_ray
def test_a_worker_killed_mid_run_is_retried_without_losing_or_duplicating_records(ray_cluster, tmp_path):
    from refformer.runtime.batch import generate_records
    from refformer.runtime.generate_cli import generation_options
    from refformer.runtime.generator import Generator
    from refformer.runtime.ray_batch import Cluster, RecordList, expand_inputs, run_batch

    lines = [f"Satz {n}: das Wetter ist heute schön." for n in range(1, 25)]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"text": line, "id": n}) + "\n" for n, line in enumerate(lines, 1)))
    generation = generation_options({"max_new_tokens": 6})
    marker = tmp_path / "died"
    summary = run_batch(expand_inputs([str(source)]), tmp_path / "out", generation=generation, workers=2, threads=1,
                        batch_size=2, cluster=Cluster(None, 2), worker_class=dying_once(str(marker)))
    assert marker.exists(), "no worker died: the test did not test the retry"
    assert summary["records"] == 24 and summary["failures"] == 0
    records = read_out(tmp_path / "out")
    assert [record["line"] for record in records] == list(range(1, 25))  # each line once
    expected = RecordList()
    generate_records(Generator(threads=1), generation, [(n, line, None, {"id": n}) for n, line in
                                                        enumerate(lines, 1)], expected, str(source), 24)
    assert [{key: value for key, value in record.items() if key != "file"} for record in records] == expected.records


@needs_ray
@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers must be >= 1, got 0"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--gpus-per-worker", "nan"], "--gpus-per-worker must be a number >= 0, got nan"),
    (["--gpus-per-worker", "-1"], "--gpus-per-worker must be a number >= 0, got -1.0"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--top-p", "nan"], "--top-p"),
    (["--workers", "1000"], "--workers 1000 x --threads 1 needs 1000 CPUs; this machine has"),
    (["--ray-address", "127.0.0.1:1"], "cannot connect to the Ray cluster at --ray-address 127.0.0.1:1"),
])
def test_bad_options_are_one_line_before_ray_starts(tmp_path, args, message):
    (tmp_path / "a.jsonl").write_text("Hallo\n")
    result = invoke("batch", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "out"), *args)
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


@needs_ray
def test_inputs_and_out_dir_are_checked_before_ray_starts(tmp_path):
    (tmp_path / "a.jsonl").write_text("Hallo\n")
    (tmp_path / "file").write_text("x")
    (tmp_path / "utf16.jsonl").write_bytes(b"\xff\xfeH\x00\xd8")  # a UTF-16 mark, then half a character

    def error(*args, exit_code=1):
        result = invoke("batch", *args)
        assert result.exit_code == exit_code and result.stderr.count("\n") == 1, result.output
        return result.stderr

    assert "no file matches" in error(str(tmp_path / "*.tsv"), "--out", str(tmp_path / "o"))
    assert "does not exist" in error(str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"))
    assert "is a folder" in error(str(tmp_path), "--out", str(tmp_path / "o"))
    assert "not valid UTF-16" in error(str(tmp_path / "utf16.jsonl"), "--out", str(tmp_path / "o"))
    assert "is a file" in error(str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "file"), exit_code=2)  # click's
    assert "holds the input file" in error(str(tmp_path / "a.jsonl"), "--out", str(tmp_path), "--overwrite")
    assert "does not exist; create it first" in error(str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "x" / "y"))
    assert (tmp_path / "a.jsonl").read_text() == "Hallo\n" and not (tmp_path / "o").exists()


def test_without_ray_one_line_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    monkeypatch.setitem(sys.modules, "ray.data", None)
    (tmp_path / "a.jsonl").write_text("Hallo\n")
    result = invoke("batch", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    assert result.stderr == 'error: refformer batch needs Ray Data: pip install "refformer[ray]"\n'


@needs_ray
def test_the_command_starts_and_cleans_up_its_own_local_cluster(tmp_path):
    """`refformer batch` without --ray-address, in a process of its own: a local cluster whose session folder lies
    under the system temp folder (TMPDIR here: a short one, as Ray's socket paths need) and is removed at the end,
    with no Ray process left behind."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    (tmp_path / "in.jsonl").write_text('{"text": "Guten Morgen.", "id": 1}\n')
    temp = tempfile.mkdtemp(prefix="rf-t-")
    try:
        command = Path(sys.executable).parent / "refformer"
        done = subprocess.run([str(command), "batch", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out"),
                               *DECODING], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "TMPDIR": temp, "RAY_AUTH_MODE": "disabled"})
        assert done.returncode == 0, done.stderr
        # one line: one worker, not the cluster's two (each would load a Generator); Ray Data's warning that the
        # pool has more actors than blocks is not shown either
        assert "wrote 1 record from 1 file to" in done.stderr and "(1 shard, 1 worker)" in done.stderr
        assert "Traceback" not in done.stderr and "Warning" not in done.stderr
        [record] = read_out(tmp_path / "out")
        assert record["id"] == 1 and record["input"] == "Guten Morgen." and record["output"]
        # the cluster's session folder is gone (ONNX Runtime 1.31 leaves its own `.ses` id file in TMPDIR)
        assert [name for name in os.listdir(temp) if name != ".ses"] == []
        left = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and temp.encode() in (entry / "cmdline").read_bytes():
                    left.append(int(entry.name))
            except OSError:
                pass
        assert not left, f"Ray processes left: {left}"
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_input_blocks_counts_blocks_of_lines_per_file_up_to_enough(tmp_path):
    from refformer.runtime.ray_batch import input_blocks

    files = {"empty": b"", "one": b"no line break", "crlf": b"a\r\nb\r\nc\r\n", "cr": b"a\rb\rc",
             "five": b"1\n2\n\n4\n5\n"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    pairs = [(name, str(tmp_path / name)) for name in files]
    assert [input_blocks([pair], 1, 100) for pair in pairs] == [0, 1, 3, 3, 5]
    assert [input_blocks([pair], 2, 100) for pair in pairs] == [0, 1, 2, 2, 3]
    assert input_blocks(pairs, 2, 100) == 8 and input_blocks(pairs, 2, 3) == 3  # each file blocked on its own


@needs_ray
def test_a_model_that_cannot_load_is_one_line_before_ray_starts(tmp_path, monkeypatch):
    import shutil

    from refformer.runtime import ray_batch
    from refformer.runtime.options import resolve_model

    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(resolve_model(None) / name, model / name)
    (model / "model.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "in.jsonl").write_text("Hallo\n")
    monkeypatch.setattr(ray_batch, "Cluster", lambda *a, **k: pytest.fail("Ray started"))
    result = invoke("batch", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out"), "--model", str(model))
    assert result.exit_code == 1 and "Traceback" not in result.stderr, result.output
    *notices, last = result.stderr.splitlines()  # "notice: exporting ...", then the one error line
    assert all(line.startswith("notice: exporting") for line in notices)
    assert last.startswith("error: ") and "model.safetensors is not a readable safetensors file" in last


def test_ray_failure_finds_the_refformer_error_of_an_actor_that_died_in_init():
    from refformer.runtime.ray_batch import ray_failure

    died = RuntimeError("The actor died because of an error raised in its creation task, ray::MapWorker.__init__()\n"
                        "Traceback (most recent call last):\n  File x\n"
                        "refformer.refimpl.errors.RefformerError: model.safetensors is not readable")
    assert str(ray_failure(died)) == "model.safetensors is not readable"
