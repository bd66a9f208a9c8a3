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
