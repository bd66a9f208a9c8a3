"""`refformer train` and `refformer eval` on a tiny data directory with a tiny tokenizer (smoke tests)."""

import json

import pytest
from click.testing import CliRunner

from refformer.refimpl import load, save
from refformer.runtime.cli import main
from refformer.runtime.tokenizer import MIN_VOCAB_SIZE, save_tokenizer, train_tokenizer

PAIRS = [("ein Haus", "a house"), ("das Haus ist rot", "the house is red"), ("ich bin hier", "I am here"),
         ("der Hund", "the dog"), ("die Katze schläft", "the cat sleeps"), ("wir gehen", "we go")]
TINY = ["--d-model", "16", "--n-heads", "2", "--d-ff", "32", "--layers", "1", "--max-positions", "64"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A data dir with train/valid/test.tsv and train/valid.txt in a sibling, and a shared tokenizer."""
    root = tmp_path_factory.mktemp("data")
    tsv, txt = root / "de-en", root / "prose"
    tsv.mkdir()
    txt.mkdir()
    for split in ("train", "valid", "test"):
        (tsv / f"{split}.tsv").write_text("".join(f"{de}\t{en}\n" for de, en in PAIRS))
        (txt / f"{split}.txt").write_text("".join(f"{en}.\n" for _, en in PAIRS))
    save_tokenizer(train_tokenizer(tsv, MIN_VOCAB_SIZE + 20), root / "tokenizer.json")
    return root


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    print(result.output)
    return result


def test_train_then_eval_translation(data, tmp_path):
    out = tmp_path / "model"
    result = _run("train", data / "de-en", "--tokenizer", data / "tokenizer.json", "--out", out, *TINY,
                  "--steps", "3", "--max-tokens", "64", "--warmup", "2", "--eval-sentences", "2")
    assert result.exit_code == 0, result.output
    assert "encoder-decoder" in result.output and "BLEU" in result.output
    for name in ("config.json", "model.safetensors", "tokenizer.json", "train_log.csv", "loss.png"):
        assert (out / name).is_file(), name
    cfg, _ = load(out)
    assert cfg.family == "encoder-decoder" and cfg.d_model == 16 and cfg.n_encoder_layers == 1

    result = _run("eval", data / "de-en", "--model", out, "--split", "test", "--max-sentences", "3", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["examples"] == 3 and report["loss"] > 0 and report["bleu"] is not None
    result = _run("eval", data / "de-en", "--model", out)
    assert result.exit_code == 0 and "perplexity" in result.output and "chrF" in result.output

    # resume to a later step; a different architecture is refused in one line
    result = _run("train", data / "de-en", "--tokenizer", data / "tokenizer.json", "--out", out, *TINY,
                  "--steps", "4", "--max-tokens", "64", "--warmup", "2", "--eval-sentences", "2", "--resume")
    assert result.exit_code == 0, result.output
    assert load(out)[0] == cfg
    result = _run("train", data / "de-en", "--tokenizer", data / "tokenizer.json", "--out", out, *TINY,
                  "--d-ff", "48", "--steps", "5", "--max-tokens", "64", "--resume")
    assert result.exit_code == 1
    assert "error: cannot resume: the config differs from the checkpoint's (d_ff: 32 -> 48)" in result.output

    # fine-tune from the trained model
    result = _run("train", data / "de-en", "--tokenizer", data / "tokenizer.json", "--out", tmp_path / "tuned",
                  "--init", out, "--steps", "1", "--max-tokens", "64")
    assert result.exit_code == 0, result.output
    result = _run("train", data / "de-en", "--tokenizer", data / "tokenizer.json", "--out", tmp_path / "x",
                  "--init", out, "--d-model", "32")
    assert result.exit_code == 1 and "--d-model" in result.output

    # a model whose special ids differ from the tokenizer's is refused before training, not at the final save
    saved_cfg, params = load(out)
    save(tmp_path / "swapped", saved_cfg.replace(bos_id=saved_cfg.eos_id, eos_id=saved_cfg.bos_id), params)
    result = _run("train", data / "de-en", "--tokenizer", data / "tokenizer.json", "--out", tmp_path / "y",
                  "--init", tmp_path / "swapped", "--steps", "1", "--max-tokens", "64")
    assert result.exit_code == 1 and "the model's bos_id is 2" in result.output
    assert not (tmp_path / "y").exists()


def test_train_decoder_only_and_errors(data, tmp_path):
    result = _run("train", data / "prose", "--tokenizer", data / "tokenizer.json", "--out", tmp_path / "lm", *TINY,
                  "--steps", "2", "--max-tokens", "128")
    assert result.exit_code == 0, result.output
    assert load(tmp_path / "lm")[0].family == "decoder-only"
    result = _run("eval", data / "prose", "--model", tmp_path / "lm", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["bleu"] is None

    result = _run("train", tmp_path, "--tokenizer", data / "tokenizer.json", "--out", tmp_path / "m")
    assert result.exit_code == 1 and "no train.tsv or train.txt" in result.output
    result = _run("eval", data / "prose", "--model", tmp_path / "missing")
    assert result.exit_code == 1 and result.output.startswith("error:")
