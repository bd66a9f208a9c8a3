"""`refformer generate` as a user types it: streaming, batches with per-line errors, bad options."""

import json

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


def test_input_file_with_bad_lines_reports_them_and_goes_on(model_dir, tmp_path):
    source = tmp_path / "in.txt"
    source.write_bytes(b'Hallo Welt.\n\n{"text": "Guten Morgen."}\n{broken\n\xff\xfe\n' + b"lang " * 100 + b"\nIch bin hier.\n")
    out = tmp_path / "out.jsonl"
    result = invoke("--model", model_dir, "--provider", "cpu", "--input", str(source), "--output", str(out),
                    "--max-new-tokens", "3", "--batch-size", "2")
    assert result.exit_code == 1
    assert "3 of 6 inputs failed" in result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 3, 4, 5, 6, 7]
    errors = {r["line"]: r["error"] for r in records if "error" in r}
    assert "not valid JSON" in errors[4] and "not valid UTF-8" in errors[5]
    assert errors[6].startswith("line 6 has ") and "more than the model" in errors[6]
    assert records[1]["input"] == "Guten Morgen." and isinstance(records[1]["output"], str)


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
    (["x", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["x", "--num-beams", "0"], "num_beams must be >= 1"),
    (["x", "--num-beams", "2", "--num-return-sequences", "3"], "must not exceed num_beams"),
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
