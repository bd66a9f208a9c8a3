"""`refformer generate` used carelessly or with hostile input: signals, closed and broken pipes, symbolic links,
outputs inside the model folder, leftovers of killed runs, UTF-16 files. Real subprocesses where a signal or a
pipe is the point."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from refformer.runtime.cli import main

from .test_generator import make_model, tokenizer_file  # noqa: F401  (fixture)

REFFORMER = [sys.executable, "-c", "from refformer.runtime.cli import main; main()"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_file):  # noqa: F811
    path = tmp_path_factory.mktemp("hostile") / "m"
    make_model(path, tokenizer_file, "encoder-decoder")
    result = CliRunner().invoke(main, ["export", "--model", str(path)])  # the subprocesses then start quickly
    assert result.exit_code == 0, result.output
    return str(path)


def invoke(*args, input=None):
    return CliRunner().invoke(main, ["generate", *args], input=input)


def run(args, tmp_path, **kwargs):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    return subprocess.run(REFFORMER + ["generate", *args], capture_output=True, env=env, timeout=120, **kwargs)


def dead_pid():
    """The id of a process that has ended."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------- output files


def test_a_killed_runs_temporary_is_removed_by_the_next_run(model_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    stale = tmp_path / f"out.jsonl.tmp-{dead_pid()}"
    stale.write_text('{"line": 1}\n')  # what kill -9 during an --overwrite run leaves
    other = tmp_path / "other.jsonl.tmp-1"  # another output's: not ours to remove
    other.write_text("x\n")
    result = invoke("--model", model_dir, "--provider", "cpu", "Hallo.", "--max-new-tokens", "2", "--output", str(out),
                    "--overwrite")
    assert result.exit_code == 0, result.output
    assert not stale.exists() and other.exists()
    assert [r["input"] for r in jsonl(out)] == ["Hallo."]


def test_a_symbolic_link_as_output_is_written_through(model_dir, tmp_path):
    target = tmp_path / "target.jsonl"
    target.write_text("old\n")
    target.chmod(0o600)
    link = tmp_path / "link.jsonl"
    link.symlink_to(target.name)
    result = invoke("--model", model_dir, "--provider", "cpu", "Hallo.", "--max-new-tokens", "2", "--output", str(link),
                    "--overwrite")
    assert result.exit_code == 0, result.output
    assert link.is_symlink() and os.readlink(link) == target.name  # the link stays a link
    assert [r["input"] for r in jsonl(target)] == ["Hallo."]
    assert target.stat().st_mode & 0o777 == 0o600  # and the file keeps its permissions


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json", "onnx/fp32/manifest.json",
                                  "onnx/fp32/decoder.onnx", "../m/./config.json"])
def test_an_output_in_the_model_folder_is_refused_even_with_overwrite(model_dir, name):
    path = os.path.join(model_dir, name)
    before = open(path, "rb").read()
    result = invoke("--model", model_dir, "--provider", "cpu", "Hallo.", "--output", path, "--overwrite")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [f"error: --output {path} is a file of the model folder {model_dir}; "
                                                  "write the results to another file"]
    assert open(path, "rb").read() == before


def test_an_output_under_a_file_is_named_as_such(tmp_path):
    (tmp_path / "f.txt").write_text("mine\n")
    result = invoke("--model", str(tmp_path / "none"), "x", "--output", str(tmp_path / "f.txt" / "out.jsonl"))
    assert result.exit_code == 1
    assert f"{tmp_path / 'f.txt'} is a file, not a folder" in result.stderr


# ---------------------------------------------------------------------------- encodings


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_a_file_with_a_utf16_or_utf32_byte_order_mark_is_decoded(model_dir, tmp_path, encoding):
    path = tmp_path / "in.txt"
    text = "Guten Morgen.\r\nWo ist der Bahnhof?\r\n"
    path.write_bytes(("\ufeff" + text).encode(encoding) if encoding.endswith("be") else text.encode(encoding))
    result = invoke("--model", model_dir, "--provider", "cpu", "--input", str(path), "--json", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["input"] for line in result.stdout.splitlines()] == ["Guten Morgen.",
                                                                                  "Wo ist der Bahnhof?"]


def test_utf16_without_a_mark_and_nul_bytes_are_bad_lines(model_dir, tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes("Hallo.\n".encode("utf-16-le") + b"\nein\x00Wort\n" + b'{"text": "a\\u0000b"}\n')
    result = invoke("--model", model_dir, "--provider", "cpu", "--input", str(path), "--json", "--max-new-tokens", "2")
    assert result.exit_code == 1
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r.get("error", "").split(" (")[0] for r in records] == ["line 1 has a NUL byte", "line 2 has a NUL byte",
                                                                     "line 3 has a NUL byte", ""]
    assert records[3]["input"] == "a\x00b"  # an escaped NUL in JSON is the user's choice


def test_a_mark_that_lies_is_refused_in_one_line(tmp_path):
    path = tmp_path / "in.txt"
    path.write_bytes(b"\xff\xfeH\x00\x00\xd8")  # UTF-16 LE mark, then a lone surrogate
    result = invoke("--model", str(tmp_path / "none"), "--input", str(path))
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == ["error: --input starts with a UTF-16 byte-order mark but is not "
                                                  "valid UTF-16 (byte 5); save it as UTF-8"]


# ---------------------------------------------------------------------------- pipes and signals


def test_a_closed_pipe_on_stdout_ends_quietly(model_dir, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("Hallo Welt.\n" * 400)
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    command = " ".join(REFFORMER[:2]) + f" '{REFFORMER[2]}' generate --model {model_dir} --provider cpu " \
              f"--input {source} --max-new-tokens 2 --batch-size 4 | head -1"
    result = subprocess.run(["bash", "-c", "set -o pipefail; " + command], capture_output=True, env=env, timeout=120)
    assert result.stdout.count(b"\n") == 1
    assert result.stderr == b"" and result.returncode == 1


@pytest.mark.parametrize("closed", ["stdin", "stdout", "stderr"])
def test_a_closed_standard_stream_is_one_line_or_harmless(model_dir, tmp_path, closed):
    fd = {"stdin": 0, "stdout": 1, "stderr": 2}[closed]
    args = ["--model", model_dir, "--provider", "cpu", "--max-new-tokens", "2"]
    out = tmp_path / "out.jsonl"
    args += {"stdin": ["--input", "-"], "stdout": ["Hallo."], "stderr": ["Hallo.", "--output", str(out)]}[closed]
    result = run(args, tmp_path, preexec_fn=lambda: os.close(fd))
    if closed == "stderr":
        assert result.returncode == 0 and len(jsonl(out)) == 1 and result.stdout == b""
    else:
        message = {"stdin": "--input -: stdin is closed", "stdout": "stdout is closed; pass --output FILE"}[closed]
        assert result.returncode == 1
        assert result.stderr.decode().splitlines() == [f"error: {message}" + (
            "; give the texts on stdin or as --input FILE" if closed == "stdin" else "")]


def test_ctrl_c_mid_run_keeps_the_finished_records_and_the_next_run_works(model_dir, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("".join(f"Satz Nummer {k}.\n" for k in range(3000)))
    out = tmp_path / "out.jsonl"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    child = subprocess.Popen(REFFORMER + ["generate", "--model", model_dir, "--provider", "cpu", "--input", str(source),
                                          "--output", str(out), "--batch-size", "2", "--max-new-tokens", "8"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 60
    while (not out.exists() or out.stat().st_size == 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=60)
    assert child.returncode == 130, stderr
    [line] = stderr.decode().splitlines()
    records = jsonl(out)
    assert line == f"error: interrupted: {len(records)} of 3000 inputs written to {out}"
    assert 0 < len(records) < 3000 and [r["line"] for r in records] == list(range(1, len(records) + 1))
    again = invoke("--model", model_dir, "--provider", "cpu", "--input", str(source), "--output", str(out),
                   "--batch-size", "500", "--max-new-tokens", "1", "--overwrite")
    assert again.exit_code == 0, again.output
    assert len(jsonl(out)) == 3000 and {p.name for p in tmp_path.iterdir()} - {"cache"} == {"in.txt", "out.jsonl"}


def test_kill_9_keeps_the_old_output_and_the_next_run_cleans_up(model_dir, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("".join(f"Satz Nummer {k}.\n" for k in range(3000)))
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    child = subprocess.Popen(REFFORMER + ["generate", "--model", model_dir, "--provider", "cpu", "--input", str(source),
                                          "--output", str(out), "--batch-size", "2", "--max-new-tokens", "8",
                                          "--overwrite"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    temp = tmp_path / f"out.jsonl.tmp-{child.pid}"
    deadline = time.monotonic() + 60
    while (not temp.exists() or temp.stat().st_size == 0) and time.monotonic() < deadline:
        time.sleep(0.02)
    child.kill()
    child.wait()
    assert out.read_text() == "precious\n" and temp.exists()
    again = invoke("--model", model_dir, "--provider", "cpu", "Hallo.", "--output", str(out), "--max-new-tokens", "1",
                   "--overwrite")
    assert again.exit_code == 0, again.output
    assert not temp.exists() and len(jsonl(out)) == 1


# ---------------------------------------------------------------------------- numeric extremes


def test_extreme_repetition_penalties_keep_scores_finite_without_warnings():
    import warnings

    import numpy as np

    from refformer.refimpl.generate import apply_repetition_penalty

    scores = np.array([[3.0, -2.0, -np.inf, 0.5], [1e38, -1e38, 0.0, 1.0]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for penalty in (1e-320, 5e-324, 1e-30, 1e308, 1.7e308):
            got = apply_repetition_penalty(scores, [[0, 1, 2], [0, 1, 2, 3]], penalty)
            assert np.isneginf(got[0, 2]) and np.isfinite(np.delete(got, [2])).all(), (penalty, got)
            assert got[0, 3] == scores[0, 3]  # not in the sequence: untouched


@pytest.mark.parametrize("penalty", ["1e-320", "1e308"])
@pytest.mark.parametrize("strategy", [[], ["--do-sample", "--seed", "1"], ["--num-beams", "3"]])
def test_extreme_repetition_penalties_run_quietly(model_dir, penalty, strategy):
    result = invoke("--model", model_dir, "--provider", "cpu", "Hallo Welt.", "Wo ist der Bahnhof?", "--json",
                    "--max-new-tokens", "6", "--repetition-penalty", penalty, *strategy)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert len(result.stdout.splitlines()) == 2


# ---------------------------------------------------------------------------- records


def test_plain_lines_stay_one_per_input_when_an_output_has_line_breaks(model_dir, tmp_path, monkeypatch):
    from refformer.runtime.generator import Generator

    outputs = iter(["a\nb", "c\u2028d\r\ne"])
    monkeypatch.setattr(Generator, "generate_rows_and_ids", lambda self, rows, options: [(next(outputs), [])
                                                                                           for _ in rows])
    result = invoke("--model", model_dir, "--provider", "cpu", "Hallo.", "Welt.", "--batch-size", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == ["a b", "c d e"]
    outputs = iter(["a\nb", "c"])
    result = invoke("--model", model_dir, "--provider", "cpu", "Hallo.", "Welt.", "--json", "--batch-size", "2")
    assert [json.loads(line)["output"] for line in result.stdout.splitlines()] == ["a\nb", "c"]  # JSON keeps them


def test_a_json_id_with_a_lone_surrogate_is_kept_as_its_escape(model_dir, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "Hallo", "id": "\\ud800"}\n{"text": "Welt", "id": 2}\n')
    out = tmp_path / "out.jsonl"
    result = invoke("--model", model_dir, "--provider", "cpu", "--input", str(path), "--output", str(out),
                    "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    assert [r["id"] for r in jsonl(out)] == ["\ud800", 2]


def test_nan_infinity_and_overflowing_numbers_are_not_json(model_dir, tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"text": "a", "id": NaN}\n{"text": "b", "id": 1e999}\n{"text": "c", "id": -Infinity}\n'
                    '{"text": "d", "id": 1.5e300}\n')
    result = invoke("--model", model_dir, "--provider", "cpu", "--input", str(path), "--json", "--max-new-tokens", "2")
    assert result.exit_code == 1
    records = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in the output")) for line in
               result.stdout.splitlines()]
    assert [r.get("error") for r in records] == ["line 1 is not valid JSON: NaN is not a JSON value",
                                                 "line 2 is not valid JSON: 1e999 is too large a number",
                                                 "line 3 is not valid JSON: -Infinity is not a JSON value", None]
    assert records[3]["id"] == 1.5e300


def test_many_truncated_inputs_make_one_warning_line(model_dir, tmp_path):
    path = tmp_path / "in.txt"
    path.write_text(("lang " * 100 + "\n") * 14 + "kurz\n")
    result = invoke("--model", model_dir, "--provider", "cpu", "--input", str(path), "--truncate",
                    "--max-new-tokens", "1")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == ["warning: 14 inputs truncated to 47 tokens: line 1, line 2, line 3, line 4, "
                                          "line 5, line 6, line 7, line 8, line 9, line 10 and 4 more"]


def test_a_file_of_bad_lines_loads_no_model(tmp_path, tokenizer_file):  # noqa: F811
    make_model(tmp_path / "m", tokenizer_file, "encoder-decoder")
    path = tmp_path / "in.txt"
    path.write_bytes(b"\n  \n\xff\n")
    result = invoke("--model", str(tmp_path / "m"), "--provider", "cpu", "--input", str(path), "--threads", "100000")
    assert result.exit_code == 1
    assert len(result.stderr.splitlines()) == 2 and "exporting" not in result.stderr  # the threads notice, the error
    assert not (tmp_path / "m" / "onnx").exists()


def test_an_output_in_the_models_cache_exports_is_refused(model_dir, tmp_path, monkeypatch):
    from refformer.export.folder import export_locations

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cached = export_locations(model_dir, "fp32")[1]
    cached.mkdir(parents=True)
    (cached / "manifest.json").write_text("{}")
    result = invoke("--model", model_dir, "--provider", "cpu", "Hallo.", "--output", str(cached / "manifest.json"),
                    "--overwrite")
    assert result.exit_code == 1 and "is in the model's export folder" in result.stderr
    assert (cached / "manifest.json").read_text() == "{}"


def test_output_dash_is_stdout_in_json_lines(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("--model", model_dir, "--provider", "cpu", "Hallo.", "--output", "-", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["input"] == "Hallo." and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["manifest.json", "decoder.onnx"])
def test_a_pipe_in_the_export_folder_does_not_hang_generate(model_dir, tmp_path, name):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(model_dir, model)
    (model / "onnx" / "fp32" / name).unlink()
    os.mkfifo(model / "onnx" / "fp32" / name)
    result = run(["--model", str(model), "--provider", "cpu", "Hallo.", "--max-new-tokens", "1"], tmp_path)
    assert result.returncode in (0, 1) and b"Traceback" not in result.stderr  # (the run's timeout: 120 s)
    assert len(result.stderr.decode().splitlines()) <= 2


def test_a_rust_panic_in_the_tokenizer_is_one_line(model_dir, monkeypatch):
    from refformer.runtime.generator import Generator

    class PanicException(BaseException):  # pyo3's: a BaseException, which `except Exception` lets through
        pass

    def panic(self, texts, names=None):
        raise PanicException("called `Option::unwrap()` on a `None` value")

    monkeypatch.setattr(Generator, "encode_rows", panic)
    result = invoke("--model", model_dir, "--provider", "cpu", "Hallo.", "Welt.")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.splitlines() == ["error: generation failed: PanicException: called `Option::unwrap()` on a "
                                          "`None` value"]


def test_a_usage_error_does_not_echo_a_huge_value_whole(tmp_path):
    result = invoke("--model", str(tmp_path / "none"), "x", "--seed", "9" * 5000)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == ["error: Invalid value for '--seed': '" + "9" * 60 + "...' is not a valid "
                                          "integer."]


@pytest.mark.parametrize("field, value, message", [("bos_id", 2, "has <s> at id 1 but config.json's bos_id is 2"),
                                                   ("eos_id", 0, "has </s> at id 2 but config.json's eos_id is 0")])
def test_special_ids_that_contradict_the_tokenizer_are_refused(tmp_path, tokenizer_file,  # noqa: F811
                                                               field, value, message):
    """eos_id 0 (the pad id) gave empty outputs with exit 0."""
    make_model(tmp_path / "m", tokenizer_file, "encoder-decoder")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, field: value}))
    result = invoke("--model", str(tmp_path / "m"), "--provider", "cpu", "Hallo.", "Welt.")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [f"error: {tmp_path / 'm'}/tokenizer.json {message}"]


def test_control_characters_in_outputs_are_spaces_in_plain_lines_and_kept_in_json(model_dir, tmp_path, monkeypatch):
    from refformer.runtime.generator import Generator

    nasty = 'a\x1b[31mb\x01"q"\\ \U0001F600 \u202e\x85c'
    monkeypatch.setattr(Generator, "decode", lambda self, ids: nasty)
    result = invoke("--model", model_dir, "--provider", "cpu", "Hallo.", "Welt.")  # click strips ESC[..m only in pipes
    assert result.exit_code == 0 and result.stdout.splitlines() == ['a [31mb "q"\\ \U0001F600 \u202e c'] * 2
    result = invoke("--model", model_dir, "--provider", "cpu", "Hallo.")  # one text, streamed
    assert result.exit_code == 0 and result.stdout == 'a [31mb "q"\\ \U0001F600 \u202e c\n'
    out = tmp_path / "out.jsonl"
    result = invoke("--model", model_dir, "--provider", "cpu", "Hallo.", "--json", "--output", str(out))
    assert result.exit_code == 0 and jsonl(out)[0]["output"] == nasty  # jsonl splits with str.splitlines
    result = invoke("--model", model_dir, "--provider", "cpu", "Hallo.", "--json")
    assert [json.loads(line)["output"] for line in result.stdout.splitlines()] == [nasty]


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["generate", "--help"]])
def test_help_and_version_into_a_full_disk_are_one_line(args):
    with open("/dev/full", "w") as full:
        result = subprocess.run(REFFORMER + args, stdout=full, stderr=subprocess.PIPE, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.splitlines() == ["error: No space left on device: cannot write "
                                                                      "the output"], result.stderr


def test_a_deleted_current_folder_is_named(model_dir, tmp_path):
    folder = tmp_path / "gone"
    folder.mkdir()
    script = f"cd {folder} && rmdir {folder} && exec \"$@\""
    result = subprocess.run(["sh", "-c", script, "sh", *REFFORMER, "generate", "--model", model_dir, "Hallo.",
                             "--output", "out.jsonl"], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert result.returncode == 1 and result.stderr.splitlines() == [
        "error: the current folder no longer exists: cd to an existing folder, or pass absolute paths"]


def test_a_path_of_5000_characters_is_not_echoed_whole(model_dir, tmp_path):
    result = invoke("--model", model_dir, "Hallo.", "--output", str(tmp_path / ("a" * 5000)))
    assert result.exit_code == 1 and len(result.stderr) < 300 and result.stderr.count("\n") == 1, result.stderr


def test_an_output_name_with_a_line_break_keeps_the_summary_on_one_line(model_dir, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("Hallo.\n\n")
    out = tmp_path / "new\nline.jsonl"
    result = invoke("--model", model_dir, "--provider", "cpu", "--input", str(source), "--output", str(out))
    assert result.exit_code == 1 and result.stderr.count("\n") == 1 and "new\\nline.jsonl" in result.stderr
    assert [record.get("error") for record in jsonl(out)] == [None, "line 2 is empty"]


@pytest.mark.parametrize("args", [[], ["data"], ["tokenizer"]])
def test_no_command_prints_the_help_and_one_error_line(args):
    result = CliRunner().invoke(main, args, prog_name="refformer")
    assert result.exit_code == 2 and result.stdout.startswith("Usage: refformer")
    assert result.stderr.splitlines() == [f"error: no command given: run `{' '.join(['refformer', *args])} COMMAND` "
                                          "with one of the commands above"]


class FillingFile:
    """A file on a disk that fills up: the second write puts half its text on disk, then fails with ENOSPC."""

    def __init__(self, real):
        self.real, self.writes, self.name = real, 0, real.name

    def write(self, text):
        self.writes += 1
        if self.writes > 1:
            self.real.write(text[: len(text) // 2])
            self.real.flush()
            raise OSError(28, "No space left on device")
        return self.real.write(text)

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.mark.parametrize("existing", [False, True])
def test_a_full_disk_keeps_whole_records_only_and_says_so(tmp_path, existing):
    from refformer.refimpl import RefformerError
    from refformer.runtime.batch import RecordWriter

    out = tmp_path / "out.jsonl"
    if existing:
        out.write_text("old\n")
    writer = RecordWriter(str(out), as_json=True)
    writer.file = FillingFile(writer.file)
    writer.write([{"line": 1, "output": "a"}, {"line": 2, "output": "b"}])
    with pytest.raises(RefformerError, match="No space left on device.*(it was left as it was|2 records were written)"):
        writer.write([{"line": 3, "output": "c" * 100}])
    writer.close(keep=False)
    if existing:
        assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]
    else:
        assert [record["line"] for record in jsonl(out)] == [1, 2]  # no half record at the end


def test_stdout_on_a_full_disk_is_one_line(model_dir, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("Hallo.\n")
    with open("/dev/full", "w") as full:
        result = subprocess.run(REFFORMER + ["generate", "--model", model_dir, "--provider", "cpu", "--input",
                                             str(source)], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120,
                                env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert result.returncode == 1 and result.stderr.splitlines() == [
        "error: cannot write to stdout (No space left on device); 0 records were written before it: free some space "
        "or write elsewhere"]


@pytest.mark.parametrize("delay", [0.05, 0.2])
def test_ctrl_c_while_the_program_starts_is_one_line(tmp_path, delay):
    program = os.path.join(os.path.dirname(sys.executable), "refformer")
    if not os.path.exists(program):
        pytest.skip("the refformer console script is not installed next to this Python")
    child = subprocess.Popen([program, "verify", "--model", str(tmp_path)], stderr=subprocess.PIPE, text=True,
                             stdout=subprocess.DEVNULL, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=60)
    if "Remainder of file ignored" in err:  # the signal landed in Python's own site start-up (a .pth file's import)
        pytest.skip("SIGINT arrived while Python processed site-packages' .pth files, before refformer ran")
    # interrupted (130, whether in the imports or in main), or already finished (the model folder is empty: exit 1)
    # and then, on a loaded machine, ended by the signal while Python shuts down (-SIGINT: a shell's 130)
    finished = err.splitlines()[:1]
    assert (child.returncode, err.splitlines()[:1]) in ((130, ["error: interrupted"]), (1, finished),
                                                        (-signal.SIGINT, finished))
    assert "Traceback" not in err and len(err.splitlines()) == 1, err


def test_an_output_another_run_created_meanwhile_is_not_replaced_without_overwrite(tmp_path):
    from refformer.refimpl import RefformerError
    from refformer.runtime.batch import RecordWriter

    out = tmp_path / "out.jsonl"
    out.write_text("the other run's\n")  # two runs checked --output before either created it
    with pytest.raises(RefformerError, match="was created while this run started .* pass --overwrite"):
        RecordWriter(str(out), as_json=True, overwrite=False)
    assert out.read_text() == "the other run's\n" and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_a_byte_order_mark_at_the_start_of_a_later_line_is_dropped(model_dir, tmp_path):
    path = tmp_path / "joined.jsonl"  # cat a.jsonl b.jsonl, both saved with a mark
    path.write_bytes(b'\xef\xbb\xbf{"text": "Hallo.", "id": 1}\n\xef\xbb\xbf{"text": "Welt.", "id": 2}\r\n')
    result = invoke("--model", model_dir, "--provider", "cpu", "--input", str(path), "--json", "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    assert [(r["id"], r["input"]) for r in map(json.loads, result.stdout.splitlines())] == [(1, "Hallo."), (2, "Welt.")]


def test_a_symbolic_link_loop_as_output_is_refused_before_the_work(model_dir, tmp_path):
    os.symlink("b", tmp_path / "a")
    os.symlink("a", tmp_path / "b")
    for args in (["generate", "--model", model_dir, "Hallo."], ["golden", "--model", model_dir]):
        for extra in ([], ["--overwrite"]):
            flag = "--output" if args[0] == "generate" else "--out"
            result = CliRunner().invoke(main, [*args, flag, str(tmp_path / "a"), *extra])
            assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.output
            assert "symbolic link that leads nowhere" in result.stderr  # golden computed, then said 'created meanwhile'


def test_a_dangling_link_whose_target_can_be_made_is_written_through(model_dir, tmp_path):
    (tmp_path / "real").mkdir()
    os.symlink("real/out.jsonl", tmp_path / "link")
    result = invoke("--model", model_dir, "--provider", "cpu", "Hallo.", "--output", str(tmp_path / "link"),
                    "--overwrite")
    assert result.exit_code == 0, result.output
    assert os.path.islink(tmp_path / "link") and len(jsonl(tmp_path / "real" / "out.jsonl")) == 1


def test_a_device_as_output_is_refused_once_without_asking_for_overwrite(model_dir):
    for extra in ([], ["--overwrite"]):
        result = invoke("--model", model_dir, "Hallo.", "--output", "/dev/full", *extra)
        assert result.exit_code == 1 and result.stderr.startswith("error: --output /dev/full is not a regular file")


def test_a_ctrl_c_python_could_only_report_still_ends_the_command_with_130():
    """A KeyboardInterrupt raised where Python cannot raise it (a weakref callback: 'Exception ignored in ...') was
    printed with a traceback and the command went on to exit 0; one_line_errors raises it again in the main thread."""
    import weakref

    import click

    from refformer.runtime.errors import one_line_errors

    class Thing:
        pass

    def interrupt(_):
        raise KeyboardInterrupt

    @click.command()
    @one_line_errors
    def command():
        thing = Thing()
        _ = weakref.ref(thing, interrupt)
        del thing  # the callback's KeyboardInterrupt goes to sys.unraisablehook
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the replayed interrupt lands here
            pass
        click.echo("finished")

    hook = sys.unraisablehook
    started = time.monotonic()
    result = CliRunner().invoke(command, [])
    assert time.monotonic() - started < 5
    assert result.exit_code == 130 and "error: interrupted" in result.output and "finished" not in result.output
    assert "Traceback" not in result.output and sys.unraisablehook is hook
