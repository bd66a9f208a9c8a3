"""No command writes into refformer's own package folder (where the bundled model lives), --overwrite or not: a
`golden --out <bundled>/tokenizer.json --overwrite` once replaced the bundled model's tokenizer."""

import hashlib

import pytest
from click.testing import CliRunner

from refformer.runtime.cli import main
from refformer.runtime.generator import default_model_dir

BUNDLED = default_model_dir()


def snapshot():
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(BUNDLED.iterdir()) if p.is_file()}


@pytest.mark.parametrize("args", [
    ["golden", "--out", str(BUNDLED / "tokenizer.json"), "--overwrite"],
    ["golden", "--out", str(BUNDLED / "new.npz")],
    ["generate", "Hallo.", "--provider", "cpu", "--output", str(BUNDLED / "tokenizer.json"), "--overwrite"],
    ["generate", "Hallo.", "--provider", "cpu", "--output", str(BUNDLED / "out.jsonl")],
    ["tokenizer", "train", str(BUNDLED), "--vocab-size", "300", "--out", str(BUNDLED / "tokenizer.json"),
     "--overwrite"],
    ["train", "DATA", "--tokenizer", str(BUNDLED / "tokenizer.json"), "--out", str(BUNDLED), "--overwrite"],
    ["data", "de-en", "--out", str(BUNDLED), "--overwrite"],
], ids=lambda args: " ".join(args[:2]))
def test_outputs_inside_the_package_folder_are_refused(args, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.tsv").write_text("a\tb\n")
    args = [str(tmp_path / "data") if arg == "DATA" else arg for arg in args]
    before = snapshot()
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1, result.output
    assert "refformer's own package folder" in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert snapshot() == before


@pytest.mark.parametrize("command", [["golden"], ["tokenizer", "train", "CORPUS", "--vocab-size", "300"]],
                         ids=["golden", "tokenizer train"])
def test_a_link_to_a_file_still_to_be_made_needs_overwrite_and_says_so(command, tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "train.txt").write_text("one line of text\n" * 20)
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "target")
    args = [str(tmp_path / "corpus") if arg == "CORPUS" else arg for arg in command] + ["--out", str(link)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "a symbolic link to a file still to be made; pass --overwrite" in result.stderr
    assert not (tmp_path / "target").exists()
