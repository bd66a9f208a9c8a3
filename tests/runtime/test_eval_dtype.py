"""Issue 15: `refformer eval --dtype fp32|fp16|int8` measures the exported graphs on ONNX Runtime (loss from the
decoder graph fed each target, BLEU/chrF from greedy decoding through the Generator's stepper); without --dtype it
is the NumPy reference, as before. fp32 through the runtime gives the reference's figures."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from refformer.refimpl import Config, init_params, save
from refformer.refimpl.training.setup import evaluate_split
from refformer.runtime.cli import main
from refformer.runtime.generator import evaluate_on_runtime

from ..helpers import write_word_level_tokenizer

V = 40


pytestmark = pytest.mark.usefixtures("user_cache")  # tests/conftest.py: a per-user cache of its own


@pytest.fixture
def workspace(tmp_path):
    tokenizer = write_word_level_tokenizer(tmp_path / "tokenizer.json", V)
    for family, seed in (("encoder-decoder", 1), ("decoder-only", 2)):
        cfg = Config(vocab_size=V, d_model=16, n_heads=4, d_ff=32, n_encoder_layers=1, n_decoder_layers=1,
                     max_positions=32, dropout=0.0, family=family)
        save(tmp_path / family, cfg, init_params(cfg, np.random.default_rng(seed)), tokenizer=tokenizer)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "test.tsv").write_text("".join(f"w{i} w{i + 1} w{i + 5}\tw{i + 2} w{i + 3}\n"
                                                        for i in range(4, 30)))
    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "test.txt").write_text("".join(f"w{i} w{i + 2} w{i + 1} w{i + 4}\n" for i in range(4, 30)))
    return tmp_path


def test_fp32_through_the_runtime_gives_the_reference_figures(workspace):
    model, data = workspace / "encoder-decoder", workspace / "data"
    _, reference = evaluate_split(data, model, "test")
    _, runtime = evaluate_on_runtime(data, model, "test", dtype="fp32", provider="cpu")
    assert runtime["examples"] == reference["examples"] == 26 and runtime["tokens"] == reference["tokens"]
    assert runtime["loss"] == pytest.approx(reference["loss"], rel=1e-5)
    assert runtime["bleu"] == reference["bleu"] and runtime["chrf"] == reference["chrf"]
    assert runtime["dtype"] == "fp32" and runtime["variant"] == "reference" and len(runtime["hypotheses"]) == 26


def test_int8_is_measured_on_its_own_graphs(workspace):
    model, data = workspace / "encoder-decoder", workspace / "data"
    _, fp32 = evaluate_on_runtime(data, model, "test", dtype="fp32", provider="cpu")
    _, int8 = evaluate_on_runtime(data, model, "test", dtype="int8", provider="cpu")
    assert (model / "onnx" / "int8" / "manifest.json").is_file()
    assert int8["loss"] != fp32["loss"] and int8["loss"] == pytest.approx(fp32["loss"], rel=0.05)
    same = sum(a == b for a, b in zip(fp32["hypotheses"], int8["hypotheses"]))
    assert same >= 20  # measured: 26 of 26 greedy translations equal on this model


def test_decoder_only_gives_loss_only(workspace):
    model, data = workspace / "decoder-only", workspace / "lm"
    _, reference = evaluate_split(data, model, "test")
    _, runtime = evaluate_on_runtime(data, model, "test", dtype="fp32", provider="cpu")
    assert runtime["loss"] == pytest.approx(reference["loss"], rel=1e-5) and runtime["tokens"] == reference["tokens"]
    assert runtime["bleu"] is None and runtime["chrf"] is None and runtime["hypotheses"] is None


@pytest.mark.parametrize("dtype", [None, "int8"])
def test_eval_command_names_what_decoded(workspace, dtype):
    args = ["eval", str(workspace / "data"), "--model", str(workspace / "encoder-decoder"), "--split", "test"]
    result = CliRunner().invoke(main, args + ([] if dtype is None else ["--dtype", dtype]))
    assert result.exit_code == 0, result.output
    decoding = "NumPy reference" if dtype is None else "ONNX Runtime int8 (CPUExecutionProvider, reference decoder)"
    assert f"decoding    {decoding}" in result.output and "chrF" in result.output
    result = CliRunner().invoke(main, args + ["--json"] + ([] if dtype is None else ["--dtype", dtype]))
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output[result.output.index("{"):])
    assert figures["decoding"] == decoding and "hypotheses" not in figures and figures["examples"] == 26


@pytest.mark.parametrize("args, code, message", [
    (["--dtype", "int4"], 2, "'int4' is not one of 'fp32', 'fp16', 'int8'"),
    (["--dtype", ""], 2, "is not one of"),
    (["--dtype", "int8", "--max-tokens", "0"], 1, "--max-tokens must be a positive integer"),
])
def test_bad_dtype_values_are_one_line(workspace, args, code, message):
    result = CliRunner().invoke(main, ["eval", str(workspace / "data"), "--model", str(workspace / "encoder-decoder"),
                                       "--split", "test", *args])
    assert result.exit_code == code and message in result.output, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (workspace / "encoder-decoder" / "onnx").exists()
