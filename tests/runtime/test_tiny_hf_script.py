"""scripts/tiny-hf-models.py, which the README's "Bring your own model" examples use: its six folders import, and
`generate --json` gives transformers' `model.generate(input_ids)` ids on each (the checkpoint's defaults)."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from refformer.runtime.cli import main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "tiny-hf-models.py"
TEXTS = {"t5": "translate English to German: The house is small.", "bart": "Das Haus ist klein.",
         "marian": "Das Haus ist klein.", "gpt2": "The house is", "llama": "The house is", "qwen2": "The house is"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "hf"
    subprocess.run([sys.executable, str(SCRIPT), str(out)], check=True, capture_output=True)
    return out


def hf_ids(folder, family, text):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer, MarianTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = (MarianTokenizer(*(str(folder / name) for name in ("source.spm", "target.spm", "vocab.json")))
                     if family == "marian" else AutoTokenizer.from_pretrained(folder))
        causal = family in ("gpt2", "llama", "qwen2")
        model = (AutoModelForCausalLM if causal else AutoModelForSeq2SeqLM).from_pretrained(folder).eval()
        input_ids = tokenizer(text, return_tensors="pt").input_ids
        output = model.generate(input_ids)[0].tolist()
    return output[input_ids.shape[1]:] if causal else output[1:]


def test_the_script_refuses_an_existing_folder(folders):
    result = subprocess.run([sys.executable, str(SCRIPT), str(folders)], capture_output=True, text=True)
    assert result.returncode != 0 and "must not exist" in result.stderr


@pytest.mark.parametrize("family", list(TEXTS))
def test_each_folder_imports_and_generates_transformers_ids(family, folders, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["import-hf", str(folders / family), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["generate", "--model", str(tmp_path / "m"), "--json", TEXTS[family]])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["ids"] == hf_ids(folders / family, family, TEXTS[family])
