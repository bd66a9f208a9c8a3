"""`refformer generate` as a user types it: streaming, batches with per-line errors, bad options."""

import json
import os

import pytest
from click.testing import CliRunner

from refformer.runtime.cli import main

from .test_generator import make_model, tokenizer_file  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_file):  # noqa: F811
    path = tmp_path_factory.mktemp("cli") / "m"
    make_model(path, tokenizer_file, "encoder-decoder")
    return str(path)


def invoke(*args, input=None):
    return CliRunner().invoke(main, ["generate", *args], input=input)


def test_single_text_streams_to_stdout(model_dir):
    result = invoke("--model", model_dir, "--provider", "cpu", "Ich habe Hunger.", "--max-new-tokens", "4")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n")


def test_several_texts_as_json(model_dir):
    result = invoke("--model", model_dir, "--provider", "cpu", "--json", "Ich habe Hunger.", "Wo ist der Bahnhof?",
                    "--max-new-tokens", "3", "--num-beams", "2", "--num-return-sequences", "2")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["input"] for r in records] == ["Ich habe Hunger.", "Wo ist der Bahnhof?"]
    assert all(isinstance(r["output"], list) and len(r["output"]) == 2 for r in records)


def test_json_records_carry_the_generated_ids(model_dir):
    """"ids": the generated token ids (eos kept; no decoder start token), one list per returned sequence in the order
    of the texts: what Generator.generate_ids returns (the search's output), decoding to the record's texts."""
    from refformer.refimpl.generate import GenerationOptions
    from refformer.runtime.generator import Generator

    texts = ["Ich habe Hunger.", "Wo ist der Bahnhof?"]
    for extra, options in ((["--num-beams", "3", "--num-return-sequences", "2"],
                            GenerationOptions(max_new_tokens=4, num_beams=3, num_return_sequences=2)),
                           ([], GenerationOptions(max_new_tokens=4))):
        result = invoke("--model", model_dir, "--provider", "cpu", "--json", *texts, "--max-new-tokens", "4", *extra)
        assert result.exit_code == 0, result.output
        records = [json.loads(line) for line in result.stdout.splitlines()]
        generator = Generator(model_dir, provider="cpu")
        expected = generator.generate_ids(texts, options)
        if options.num_return_sequences == 1:
            assert [r["ids"] for r in records] == [candidates[0] for candidates in expected]
            assert [r["output"] for r in records] == [generator.decode(r["ids"]) for r in records]
        else:
            assert [r["ids"] for r in records] == expected
            assert [r["output"] for r in records] == [[generator.decode(ids) for ids in r["ids"]] for r in records]


def test_input_file_with_bad_lines_reports_them_and_goes_on(model_dir, tmp_path):
    source = tmp_path / "in.txt"
    source.write_bytes(b'Hallo Welt.\n\n{"text": "Guten Morgen."}\n{broken\n\xff\xfe\n' + b"lang " * 100
                       + b"\nIch bin hier.\n")
    out = tmp_path / "out.jsonl"
    result = invoke("--model", model_dir, "--provider", "cpu", "--input", str(source), "--output", str(out),
                    "--max-new-tokens", "3", "--batch-size", "2")
    assert result.exit_code == 1
    assert f"4 of 7 inputs failed (reported in {out})" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 4, 5, 6, 7]
    errors = {r["line"]: r["error"] for r in records if "error" in r}
    assert errors[2] == "line 2 is empty"  # a blank line is reported, as the README says
    assert "not valid JSON" in errors[4] and "not valid UTF-8" in errors[5]
    assert errors[6].startswith("line 6 has ") and "more than the model" in errors[6]
    assert records[2]["input"] == "Guten Morgen." and isinstance(records[2]["output"], str)


def test_truncate_warns_once_for_a_long_line_by_its_number(model_dir, tmp_path):
    source = tmp_path / "in.txt"
    source.write_text("Hallo Welt.\n" + "lang " * 100 + "\n")
    result = invoke("--model", model_dir, "--provider", "cpu", "--input", str(source), "--truncate",
                    "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    assert result.stderr.count("truncated from") == 1, result.stderr
    assert "warning: line 2 truncated from" in result.stderr


def test_texts_are_named_by_their_position(model_dir):
    result = invoke("--model", model_dir, "--provider", "cpu", "Hallo.", "   ", "--max-new-tokens", "2")
    assert result.exit_code == 1
    assert "input 2 is empty" in result.stdout


def test_stdin_input(model_dir):
    result = invoke("--model", model_dir, "--provider", "cpu", "--input", "-", "--max-new-tokens", "2",
                    input="Ich habe Hunger.\nDas ist gut.\n")
    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 2


@pytest.mark.parametrize("args, message", [
    (["x", "--temperature", "0"], "temperature must be > 0"),
    (["x", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["x", "--num-beams", "0"], "--num-beams must be in [1, 1024]"),
    (["x", "--num-beams", "2", "--num-return-sequences", "3"], "must not exceed --num-beams"),
    ([], "give a TEXT"),
    (["x", "--input", "missing.txt"], "not both"),
    (["--input", "/nonexistent/in.txt"], "does not exist"),
    (["   "], "input 1 is empty"),
])
def test_bad_input_is_one_line(model_dir, args, message):
    result = invoke("--model", model_dir, "--provider", "cpu", *args)
    assert result.exit_code == 1
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_model(tmp_path):
    result = invoke("--model", str(tmp_path / "none"), "x")
    assert result.exit_code == 1 and "does not exist" in result.stderr


# ---------------------------------------------------------------------------- output files, Ctrl-C, kills

def lines_file(tmp_path, lines, name="in.txt"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


FIVE = ["Hallo Welt.", "Guten Morgen.", "Ich bin hier.", "Das ist gut.", "Wo ist der Bahnhof?"]


def interrupt_on_call(monkeypatch, number):
    """Generator.generate_rows_and_ids raises KeyboardInterrupt (Ctrl-C) on its number-th call."""
    from refformer.runtime.generator import Generator

    original, calls = Generator.generate_rows_and_ids, []

    def generate_rows_and_ids(self, rows, options):
        calls.append(1)
        if len(calls) == number:
            raise KeyboardInterrupt
        return original(self, rows, options)

    monkeypatch.setattr(Generator, "generate_rows_and_ids", generate_rows_and_ids)


@pytest.mark.parametrize("to_file", [True, False])
def test_ctrl_c_keeps_the_finished_batches(model_dir, tmp_path, monkeypatch, to_file):
    source = lines_file(tmp_path, FIVE)
    out = tmp_path / "out.jsonl"
    interrupt_on_call(monkeypatch, 2)  # the second batch of two
    args = ["--output", str(out)] if to_file else ["--json"]
    result = invoke("--model", model_dir, "--provider", "cpu", "--input", str(source), "--batch-size", "2",
                    "--max-new-tokens", "2", *args)
    assert result.exit_code == 130
    where = str(out) if to_file else "stdout"
    assert result.stderr.strip().splitlines() == [f"error: interrupted: 2 of 5 inputs written to {where}"]
    records = jsonl(out) if to_file else [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["line"] for r in records] == [1, 2] and all("output" in r for r in records)


def test_records_are_flushed_as_each_batch_finishes(model_dir, tmp_path, monkeypatch):
    """What a kill -9 would find: when batch 2 starts, batch 1's records are already in the file."""
    from refformer.runtime.generator import Generator

    source, out, seen = lines_file(tmp_path, FIVE), tmp_path / "out.jsonl", []
    original = Generator.generate_rows_and_ids

    def generate_rows_and_ids(self, rows, options):
        seen.append(len(out.read_text().splitlines()))
        return original(self, rows, options)

    monkeypatch.setattr(Generator, "generate_rows_and_ids", generate_rows_and_ids)
    result = invoke("--model", model_dir, "--provider", "cpu", "--input", str(source), "--batch-size", "2",
                    "--max-new-tokens", "2", "--output", str(out))
    assert result.exit_code == 0, result.output
    assert seen == [0, 2, 4]
    assert len(jsonl(out)) == 5 and result.stderr.strip() == f"wrote 5 records to {out}"


def test_an_existing_output_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("precious\n")
    source = lines_file(tmp_path, FIVE)
    # --model names no folder: the output is checked before any model is loaded
    result = invoke("--model", str(tmp_path / "none"), "--input", str(source), "--output", str(out))
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: --output {out} exists; pass --overwrite to replace it"
    assert out.read_text() == "precious\n"


def test_overwrite_replaces_at_the_end_and_on_ctrl_c(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    source = lines_file(tmp_path, FIVE)
    args = ["--model", model_dir, "--provider", "cpu", "--input", str(source), "--batch-size", "2",
            "--max-new-tokens", "2", "--output", str(out), "--overwrite"]
    assert invoke(*args).exit_code == 0
    assert len(jsonl(out)) == 5
    out.write_text("old\n")
    with monkeypatch.context() as patch:
        interrupt_on_call(patch, 3)
        result = invoke(*args)
    assert result.exit_code == 130 and "4 of 5 inputs written" in result.stderr
    assert [r["line"] for r in jsonl(out)] == [1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.jsonl"]  # no temporary left


def test_a_failing_overwrite_run_keeps_the_old_file(model_dir, tmp_path, monkeypatch):
    from refformer.runtime.generator import Generator

    out = tmp_path / "out.jsonl"
    out.write_text("old\n")
    source = lines_file(tmp_path, FIVE)

    def broken(self, rows, options):
        raise RuntimeError("the device fell over")

    monkeypatch.setattr(Generator, "generate_rows_and_ids", broken)
    result = invoke("--model", model_dir, "--provider", "cpu", "--input", str(source), "--output", str(out),
                    "--overwrite")
    assert result.exit_code != 0
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.jsonl"]


@pytest.mark.parametrize("case", ["missing folder", "a folder", "the input", "input is a folder", "input missing"])
def test_paths_are_checked_before_the_model_is_loaded(tmp_path, case):
    source = lines_file(tmp_path, FIVE)
    (tmp_path / "dir").mkdir()
    output, input_path, message = tmp_path / "out.jsonl", source, None
    if case == "missing folder":
        output, message = tmp_path / "nowhere" / "out.jsonl", "does not exist; create it first"
    elif case == "a folder":
        output, message = tmp_path / "dir", "is a folder; give a file name"
    elif case == "the input":
        output, message = source, "is the --input file"
    elif case == "input is a folder":
        input_path, message = tmp_path / "dir", "is a folder; give a file of texts"
    else:
        input_path, message = tmp_path / "nothing.txt", "does not exist"
    result = invoke("--model", str(tmp_path / "no-model"), "--input", str(input_path), "--output", str(output),
                    "--overwrite")
    assert result.exit_code == 1, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert source.read_text().splitlines() == FIVE


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_an_unwritable_output_folder_is_refused_first(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        result = invoke("--model", str(tmp_path / "no-model"), "x", "--output", str(folder / "out.jsonl"))
    finally:
        folder.chmod(0o700)
    assert result.exit_code == 1 and "is not writable" in result.stderr


# ---------------------------------------------------------------------------- input kinds and output formats

@pytest.mark.parametrize("stdin", [False, True])
def test_a_byte_order_mark_is_dropped(model_dir, tmp_path, stdin):
    data = b"\xef\xbb\xbf" + '{"text": "Guten Morgen.", "id": "a-1"}\nHallo.\n'.encode()
    path = tmp_path / "in.jsonl"
    path.write_bytes(data)
    result = invoke("--model", model_dir, "--provider", "cpu", "--input", "-" if stdin else str(path), "--json",
                    "--max-new-tokens", "2", input=data if stdin else None)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["input"] for r in records] == ["Guten Morgen.", "Hallo."]
    assert records[0]["id"] == "a-1" and "id" not in records[1]


def test_input_prints_plain_lines_unless_json(model_dir, tmp_path):
    source = lines_file(tmp_path, FIVE[:3])
    args = ["--model", model_dir, "--provider", "cpu", "--input", str(source), "--max-new-tokens", "3"]
    plain, as_json = invoke(*args), invoke(*args, "--json")
    assert plain.exit_code == 0 and as_json.exit_code == 0
    outputs = [json.loads(line)["output"] for line in as_json.stdout.splitlines()]
    assert plain.stdout.splitlines() == outputs
    assert not plain.stdout.lstrip().startswith("{")


def test_text_arguments_with_output_write_json_lines(model_dir, tmp_path):
    out = tmp_path / "out.jsonl"
    result = invoke("--model", model_dir, "--provider", "cpu", "Ich habe Hunger.", "--max-new-tokens", "3",
                    "--output", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    [record] = jsonl(out)
    assert record["line"] == 1 and record["input"] == "Ich habe Hunger." and isinstance(record["output"], str)


def test_several_sequences_stay_with_their_input(model_dir, tmp_path):
    source = lines_file(tmp_path, ["Hallo Welt.", "", "Ich bin hier."])
    args = ["--model", model_dir, "--provider", "cpu", "--input", str(source), "--max-new-tokens", "3",
            "--num-beams", "3", "--num-return-sequences", "2"]
    plain, as_json = invoke(*args), invoke(*args, "--json")
    records = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [len(r.get("output", [])) for r in records] == [2, 0, 2]
    want = []
    for record in records:
        if "error" in record:
            want.append(f"error: {record['error']}")
        else:
            want += [f"{record['line']}.{k}\t{text}" for k, text in enumerate(record["output"], start=1)]
    assert plain.stdout.splitlines() == want
    assert plain.exit_code == 1 and as_json.exit_code == 1


def test_a_lone_surrogate_is_reported_by_its_line(model_dir, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "Hallo."}\n{"text": "bad \\ud800"}\n')
    result = invoke("--model", model_dir, "--provider", "cpu", "--input", str(source), "--json", "--max-new-tokens",
                    "2")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records[1]["error"] == "line 2 is not valid Unicode (it has a lone surrogate)"
    assert result.exit_code == 1 and "output" in records[0]


def test_json_that_python_cannot_read_is_a_bad_line(model_dir, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "Hallo.", "id": 1' + "0" * 5000 + '}\n{"text": ' + "[" * 100000 + "\n")
    result = invoke("--model", model_dir, "--provider", "cpu", "--input", str(source), "--json")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["error"].split(":")[0] for r in records] == ["line 1 is not valid JSON", "line 2 is not valid JSON"]
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_a_device_as_input_is_refused(tmp_path):
    result = invoke("--model", str(tmp_path / "no-model"), "--input", "/dev/zero")
    assert result.exit_code == 1 and "is a device" in result.stderr


def test_an_unexpected_failure_is_one_line(model_dir, tmp_path, monkeypatch):
    from refformer.runtime.generator import Generator

    def broken(self, rows, options):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA out of memory\n more detail")

    monkeypatch.setattr(Generator, "generate_rows_and_ids", broken)
    result = invoke("--model", model_dir, "--provider", "cpu", "Hallo.", "Gut.")
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: generation failed: RuntimeError: [ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : CUDA out of memory"]


def test_a_json_id_is_passed_through(model_dir, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"id": 7, "text": "Hallo."}\n{"id": ["x"], "text": ""}\n{"text": "Gut."}\n')
    result = invoke("--model", model_dir, "--provider", "cpu", "--input", str(source), "--json", "--max-new-tokens",
                    "2")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r.get("id") for r in records] == [7, ["x"], None]
    assert "error" in records[1]


# ---------------------------------------------------------------------------- batch independence and seeds

# "x" runs to its length budget (2 x 2 + 10 tokens) on the test model in every strategy; the long line's budget is
# the model's 48 positions, which a batch-wide default gave "x" too
LONG_AND_SHORT = ["Das Wetter ist heute schön, und wir gehen.", "x"]


@pytest.mark.parametrize("options", [[], ["--do-sample", "--seed", "5", "--top-k", "20"], ["--num-beams", "3"]],
                         ids=["greedy", "sampling", "beams"])
def test_a_line_gives_the_same_output_alone_and_in_a_batch(model_dir, tmp_path, options):
    both = lines_file(tmp_path, LONG_AND_SHORT, "both.txt")
    alone = lines_file(tmp_path, LONG_AND_SHORT[1:], "alone.txt")
    args = ["--model", model_dir, "--provider", "cpu", "--json", *options]
    batch = [json.loads(line) for line in invoke(*args, "--input", str(both)).stdout.splitlines()]
    single = [json.loads(line) for line in invoke(*args, "--input", str(alone)).stdout.splitlines()]
    assert batch[1]["output"] == single[0]["output"]


def test_sampling_is_random_without_a_seed_and_reproducible_with_it(model_dir):
    args = ["--model", model_dir, "--provider", "cpu", "--json", "--do-sample", "Hallo Welt.", "Gut.",
            "--max-new-tokens", "6"]
    first, second = ([json.loads(line) for line in invoke(*args).stdout.splitlines()] for _ in range(2))
    assert first[0]["seed"] == first[1]["seed"] and first[0]["seed"] != second[0]["seed"]
    again = [json.loads(line) for line in invoke(*args, "--seed", str(first[0]["seed"])).stdout.splitlines()]
    assert again == first


def test_greedy_records_carry_no_seed(model_dir):
    result = invoke("--model", model_dir, "--provider", "cpu", "--json", "Hallo.", "--max-new-tokens", "2")
    assert "seed" not in json.loads(result.stdout)


# ---------------------------------------------------------------------------- a model folder as TEXT

def test_a_model_folder_as_text_is_refused_with_a_hint(model_dir):
    result = invoke(model_dir, "Ich habe Hunger.")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: refformer generate takes the model folder as --model DIR, not as an argument (got the folder "
        f"{model_dir!r}); use --model {model_dir}"]


# ---------------------------------------------------------------------------- numeric extremes

REFUSED = [
    (["--temperature", t, "--do-sample"], "--temperature") for t in ("0", "-1", "nan", "inf", "-inf", "1e400")
] + [
    (["--top-k", "-1"], "--top-k"), (["--top-p", "0"], "--top-p"), (["--top-p", "-0.5"], "--top-p"),
    (["--top-p", "nan"], "--top-p"), (["--top-p", "inf"], "--top-p"), (["--top-p", "1.0001"], "--top-p"),
    (["--max-new-tokens", "-1"], "--max-new-tokens"), (["--min-new-tokens", "-1"], "--min-new-tokens"),
    (["--min-new-tokens", "5", "--max-new-tokens", "2"], "--min-new-tokens"),
    (["--num-beams", "0"], "--num-beams"), (["--num-beams", "-3"], "--num-beams"),
    (["--num-beams", "1000000000"], "--num-beams"), (["--num-return-sequences", "0"], "--num-return-sequences"),
    (["--num-return-sequences", "-1"], "--num-return-sequences"),
    (["--num-return-sequences", "99999999999", "--do-sample"], "--num-return-sequences"),
    (["--length-penalty", "nan"], "--length-penalty"), (["--length-penalty", "inf"], "--length-penalty"),
    (["--length-penalty", "-inf"], "--length-penalty"),
    (["--repetition-penalty", "0"], "--repetition-penalty"), (["--repetition-penalty", "-1"], "--repetition-penalty"),
    (["--repetition-penalty", "nan"], "--repetition-penalty"),
    (["--repetition-penalty", "inf"], "--repetition-penalty"),
    (["--no-repeat-ngram-size", "-1"], "--no-repeat-ngram-size"),
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "-5"], "--batch-size"),
    (["--threads", "0"], "--threads"), (["--threads", "-2"], "--threads"),
    (["--seed", "-1"], "--seed must be >= 0"),
]


@pytest.mark.parametrize("args, flag", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_bad_numbers_are_refused_in_one_line_before_loading(tmp_path, args, flag):
    result = invoke("--model", str(tmp_path / "no-model"), "Hallo.", *args)
    assert result.exit_code == 1, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and flag in line, line


def test_beams_that_cannot_fit_in_memory_are_refused_before_loading(model_dir, monkeypatch):
    monkeypatch.setattr("refformer.refimpl.generate.physical_memory_bytes", lambda: 10**6)  # a 1 MB machine
    result = invoke("--model", model_dir, "--provider", "cpu", "Hallo.", "--num-beams", "1000", "--batch-size", "4")
    assert result.exit_code == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: 1 inputs x 1000 beams = 1,000 sequences at once need up to ")
    assert "--num-beams" in line
    assert "exporting" not in result.stderr


WORKS = [
    ["--do-sample", "--temperature", "1e-300"], ["--do-sample", "--temperature", "1e300"],
    ["--do-sample", "--top-k", "1000000000000"], ["--do-sample", "--top-p", "1e-300"],
    ["--max-new-tokens", "1000000000000"], ["--max-new-tokens", "0"], ["--min-new-tokens", "1000000000000"],
    ["--num-beams", "3", "--num-return-sequences", "3"], ["--num-beams", "2", "--length-penalty", "1e300"],
    ["--num-beams", "2", "--length-penalty", "-1e300"], ["--num-beams", "2", "--length-penalty", "0"],
    ["--repetition-penalty", "1e-300"], ["--repetition-penalty", "1e300"], ["--no-repeat-ngram-size", "1000000000"],
    ["--batch-size", "1000000000000"], ["--do-sample", "--seed", "100000000000000000000000000000"],
    ["--do-sample", "--seed", "0"], ["--do-sample", "--num-return-sequences", "3"],
]


@pytest.mark.parametrize("args", WORKS, ids=[" ".join(a) for a in WORKS])
def test_extreme_numbers_that_make_sense_work(model_dir, args):
    result = invoke("--model", model_dir, "--provider", "cpu", "--json", "Hallo Welt.", "Gut.", *args)
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 2 and all("output" in r for r in records)
    assert "Traceback" not in result.output and "Warning" not in result.stderr


def test_threads_above_the_cpu_count_are_capped_with_a_notice(model_dir):
    result = invoke("--model", model_dir, "--provider", "cpu", "Hallo.", "--max-new-tokens", "2", "--threads",
                    str((os.cpu_count() or 1) * 1000))
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines() == [
        f"notice: --threads {(os.cpu_count() or 1) * 1000} is more than the {os.cpu_count()} CPUs here; "
        f"using {os.cpu_count()}"]
