"""`refformer train` and `refformer eval` on a tiny data directory with a tiny tokenizer (smoke tests)."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from refformer.refimpl import load, save
from refformer.refimpl.training.tokenizer import MIN_VOCAB_SIZE, save_tokenizer, train_tokenizer
from refformer.runtime.cli import main

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


# ---------------------------------------------------------------------------- issue 11


def _snapshot(folder):
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(result, *words):
    """Exit 1, exactly one 'error: ...' line containing every word, no traceback."""
    lines = result.stderr.splitlines()
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])  # click >= 8.2 keeps stderr apart
    print(result.stdout, result.stderr)
    return result


TRAIN_FAST = [*TINY, "--max-tokens", "64", "--warmup", "2", "--eval-sentences", "2"]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A trained model folder (with checkpoints) to be protected."""
    out = tmp_path_factory.mktemp("trained") / "model"
    result = _run("train", data / "de-en", "--tokenizer", data / "tokenizer.json", "--out", out, *TRAIN_FAST,
                  "--steps", "2")
    assert result.exit_code == 0, result.output
    return out


def test_train_refuses_an_out_folder_holding_a_model(data, trained, tmp_path):
    """Without --resume or --overwrite, a folder holding a model (or checkpoints) is refused before any work;
    --init M --out M too; nothing changes."""
    before = _snapshot(trained)
    for extra in ([], ["--steps", "3"], ["--init", trained]):
        args = ["train", data / "de-en", "--tokenizer", data / "tokenizer.json", "--out", trained]
        args += extra if extra[:1] == ["--init"] else [*TRAIN_FAST, *extra]
        _one_error_line(_invoke(*args), f"--out {trained} already holds a model or checkpoints", "--overwrite",
                        "--resume")
    _one_error_line(_invoke("train", data / "de-en", "--tokenizer", data / "tokenizer.json", "--out", trained,
                            *TRAIN_FAST, "--resume", "--overwrite"), "not both")
    assert _snapshot(trained) == before

    only_checkpoints = tmp_path / "ckpt"
    (only_checkpoints / "checkpoints").mkdir(parents=True)
    _one_error_line(_invoke("train", data / "de-en", "--tokenizer", data / "tokenizer.json", "--out",
                            only_checkpoints, *TRAIN_FAST), "checkpoints", "--overwrite")


def test_train_checks_out_before_loading_data(data, tmp_path):
    (tmp_path / "plain.txt").write_text("mine")
    base = ["train", data / "de-en", "--tokenizer", data / "tokenizer.json", *TRAIN_FAST]
    _one_error_line(_invoke(*base, "--out", data / "de-en"), "is the input")
    _one_error_line(_invoke(*base, "--out", tmp_path / "missing" / "deeper"), "does not exist")
    _one_error_line(_invoke(*base, "--out", tmp_path / "fresh", "--resume"), "no checkpoint to resume from")
    result = _invoke(*base, "--out", tmp_path / "plain.txt")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "is a file" in result.stderr
    assert (tmp_path / "plain.txt").read_text() == "mine"
    result = _invoke("train", tmp_path / "plain.txt", "--tokenizer", data / "tokenizer.json", "--out", tmp_path / "m",
                     *TRAIN_FAST)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "is a file" in result.stderr
    # a folder of the user's other files is fine: training only adds its own files
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert _invoke(*base, "--out", tmp_path / "mine", "--steps", "1").exit_code == 0
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and (tmp_path / "mine" / "config.json").is_file()


def test_train_overwrite_and_divergence_never_replace_a_good_model(data, trained, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(trained, model)
    before = _snapshot(model)
    base = ["train", data / "de-en", "--tokenizer", data / "tokenizer.json"]
    # --lr 1e6: one error line naming the step, exit 1, nothing of the diverged state written
    for out in (tmp_path / "fresh", model):
        line = _one_error_line(_invoke(*base, "--out", out, "--init", model, "--overwrite", "--lr", "1e6",
                                       "--warmup", "0", "--steps", "20", "--save-every", "1", "--max-tokens", "64"),
                               "training diverged at step", "lower --lr")
        assert "nan" in line or "inf" in line
    assert not (tmp_path / "fresh" / "model.safetensors").exists()
    after = _snapshot(model)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "loss.png"):  # the model is intact
        assert after[name] == before[name], name
    from refformer.refimpl.training.checkpoint import load_checkpoint
    from refformer.refimpl.tree import flatten

    _, saved, _, _ = load_checkpoint(model)  # the checkpoints saved before it diverged are finite
    assert all(np.isfinite(value).all() for value in flatten(saved).values())

    # --overwrite with sane options replaces the model
    result = _invoke(*base, "--out", model, "--init", model, "--overwrite", "--steps", "1", "--max-tokens", "64")
    assert result.exit_code == 0, result.output
    assert (model / "model.safetensors").read_bytes() != before["model.safetensors"]


@pytest.mark.parametrize("option, value, words", [
    ("--d-model", "1000000", "needs"), ("--max-positions", "1000000000000", "max_positions"),
    ("--layers", "1000000000", "layers"), ("--d-ff", "100000000000", "d_ff"), ("--n-heads", "3", "--n-heads"),
    ("--d-model", "0", "--d-model"), ("--layers", "-1", "--layers"), ("--encoder-layers", "-2", "--encoder-layers"),
    ("--steps", "0", "--steps"), ("--steps", "-1", "--steps"), ("--lr", "0", "--lr"), ("--lr", "-1", "--lr"),
    ("--lr", "nan", "--lr"), ("--lr", "inf", "--lr"), ("--warmup", "-1", "--warmup"),
    ("--weight-decay", "nan", "--weight-decay"), ("--weight-decay", "-1", "--weight-decay"),
    ("--clip", "-1", "--clip"), ("--clip", "nan", "--clip"), ("--label-smoothing", "-0.1", "--label-smoothing"),
    ("--label-smoothing", "1", "--label-smoothing"), ("--label-smoothing", "nan", "--label-smoothing"),
    ("--dropout", "1", "--dropout"), ("--dropout", "nan", "--dropout"), ("--dropout", "-0.1", "--dropout"),
    ("--max-tokens", "0", "--max-tokens"), ("--max-tokens", "-5", "--max-tokens"),
    ("--eval-every", "-1", "--eval-every"), ("--save-every", "-1", "--save-every"),
    ("--eval-sentences", "-1", "--eval-sentences"), ("--time-limit", "0", "--time-limit"),
    ("--time-limit", "-1", "--time-limit"), ("--time-limit", "nan", "--time-limit"),
    ("--time-limit", "inf", "--time-limit"), ("--time-limit", "1e308", "--time-limit"), ("--seed", "-1", "--seed"),
])
def test_train_numeric_extremes_are_one_line(data, tmp_path, option, value, words):
    result = _invoke("train", data / "de-en", "--tokenizer", data / "tokenizer.json", "--out", tmp_path / "m",
                     *TRAIN_FAST, option, value)
    _one_error_line(result, words)
    assert not (tmp_path / "m").exists()


def test_train_edges_that_work(data, tmp_path):
    """Huge but harmless values train: one batch for a huge budget, a huge seed, BLEU off with 0 sentences."""
    result = _invoke("train", data / "de-en", "--tokenizer", data / "tokenizer.json", "--out", tmp_path / "m",
                     *TRAIN_FAST, "--steps", "1", "--max-tokens", str(10 ** 18), "--seed", str(2 ** 80),
                     "--eval-sentences", "0", "--eval-every", str(10 ** 18))
    assert result.exit_code == 0, result.output
    assert "in 1 batches" in result.stdout and "BLEU" not in result.stdout


def test_eval_errors_are_one_line(data, trained, tmp_path):
    base = ["eval", data / "de-en", "--model", trained]
    _one_error_line(_invoke(*base, "--max-sentences", "0"), "--max-sentences")
    _one_error_line(_invoke(*base, "--max-sentences", "-2"), "--max-sentences")
    _one_error_line(_invoke(*base, "--max-tokens", "0"), "--max-tokens")
    _one_error_line(_invoke("eval", tmp_path, "--model", trained), "valid.tsv is missing")
    _one_error_line(_invoke("eval", tmp_path / "nowhere", "--model", trained), "not a folder")
    _one_error_line(_invoke("eval", data / "de-en", "--model", tmp_path / "nomodel"), "does not exist")
    (tmp_path / "valid.tsv").write_text("\n \n")
    _one_error_line(_invoke("eval", tmp_path, "--model", trained), "is empty")
    (tmp_path / "valid.tsv").write_text("ein Haus\ta house\nkein Tab\n")
    _one_error_line(_invoke("eval", tmp_path, "--model", trained), "valid.tsv:2: expected exactly one TAB")
    (tmp_path / "valid.tsv").write_text("ein " * 100 + "\ta house\n")
    _one_error_line(_invoke("eval", tmp_path, "--model", trained), "longer than the model's 64 positions")
    (tmp_path / "valid.tsv").write_bytes("\ufeffein Haus\ta house\n".encode())
    result = _invoke("eval", tmp_path, "--model", trained, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["examples"] == 1


def test_tokenizer_train_refusals(data, tmp_path):
    corpus = data / "de-en"
    for size in ("0", "259", "2000000000", "1000001"):
        _one_error_line(_invoke("tokenizer", "train", corpus, "--vocab-size", size, "--out", tmp_path / "t.json"),
                        "vocab size must be an integer from 260")
    (tmp_path / "t.json").write_text("mine")
    _one_error_line(_invoke("tokenizer", "train", corpus, "--vocab-size", "300", "--out", tmp_path / "t.json"),
                    "exists; pass --overwrite")
    assert (tmp_path / "t.json").read_text() == "mine"
    _one_error_line(_invoke("tokenizer", "train", corpus, "--vocab-size", "300", "--out", corpus / "train.tsv",
                            "--overwrite"), "is a split file")
    _one_error_line(_invoke("tokenizer", "train", corpus, "--vocab-size", "300", "--out",
                            tmp_path / "no" / "t.json"), "does not exist")
    _one_error_line(_invoke("tokenizer", "train", tmp_path, "--vocab-size", "300", "--out", tmp_path / "u.json"),
                    "no train.tsv or train.txt")
    (tmp_path / "train.txt").write_text("\n\n")
    _one_error_line(_invoke("tokenizer", "train", tmp_path, "--vocab-size", "300", "--out", tmp_path / "u.json"),
                    "is empty")
    # --overwrite replaces; a byte-order mark is not learned as a token
    (tmp_path / "train.txt").write_bytes("\ufeffein Haus\nder Hund\n".encode())
    result = _invoke("tokenizer", "train", tmp_path, "--vocab-size", "300", "--out", tmp_path / "t.json",
                     "--overwrite")
    assert result.exit_code == 0, result.output
    from refformer.refimpl.training.tokenizer import load_tokenizer

    vocab = load_tokenizer(tmp_path / "t.json").get_vocab()
    assert not any("\ufeff" in token or "ï»¿" in token for token in vocab)


def test_data_commands_refuse_the_users_files(tmp_path):
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "train.tsv").write_text("my\town\n")
    for command in ("de-en", "pydoc"):
        _one_error_line(_invoke("data", command, "--out", out), "--overwrite")
    (tmp_path / "file").write_text("x")
    result = _invoke("data", "de-en", "--out", tmp_path / "file", "--overwrite")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "is a file" in result.stderr
    assert (out / "train.tsv").read_text() == "my\town\n" and sorted(p.name for p in out.iterdir()) == ["train.tsv"]


def test_train_into_the_folder_of_its_own_tokenizer(data, tmp_path):
    """OUT holding only the tokenizer.json trained with is not a model to protect."""
    out = tmp_path / "model"
    out.mkdir()
    shutil.copy(data / "tokenizer.json", out / "tokenizer.json")
    result = _invoke("train", data / "de-en", "--tokenizer", out / "tokenizer.json", "--out", out, *TRAIN_FAST,
                     "--steps", "1")
    assert result.exit_code == 0, result.output
    _one_error_line(_invoke("train", data / "de-en", "--tokenizer", out / "tokenizer.json", "--out", out,
                            *TRAIN_FAST, "--steps", "1"), "already holds a model")


def test_eval_json_stays_strict_json_when_the_loss_overflows(data, trained, tmp_path):
    cfg, params = load(trained)
    params["decoder"]["embed_tokens"]["weight"] *= 1e30  # finite weights whose logits overflow
    save(tmp_path / "big", cfg, params, tokenizer=trained / "tokenizer.json")
    result = _invoke("eval", data / "de-en", "--model", tmp_path / "big", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # no NaN/Infinity tokens
    assert report["loss"] is None and any("overflow" in note for note in report["notes"])
