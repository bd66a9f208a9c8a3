"""`refformer train` / `eval` as a careless or hostile user drives them: real Ctrl-C mid-run, output folders that
are a run's checkpoints, diverged models' numbers. Each case: one error line, no traceback, nothing lost."""

import csv
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from refformer.refimpl.training.tokenizer import MIN_VOCAB_SIZE, save_tokenizer, train_tokenizer
from refformer.runtime.cli import main
from refformer.runtime.train_cli import format_number

PAIRS = [("ein Haus", "a house"), ("das Haus ist rot", "the house is red"), ("ich bin hier", "I am here"),
         ("der Hund", "the dog"), ("die Katze schläft", "the cat sleeps"), ("wir gehen", "we go")]
TINY = ["--d-model", "16", "--n-heads", "2", "--d-ff", "32", "--layers", "1", "--max-positions", "64",
        "--max-tokens", "64", "--warmup", "2", "--eval-sentences", "2", "--dropout", "0.1"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    (root / "de-en").mkdir()
    for split in ("train", "valid"):
        (root / "de-en" / f"{split}.tsv").write_text("".join(f"{de}\t{en}\n" for de, en in PAIRS))
    save_tokenizer(train_tokenizer(root / "de-en", MIN_VOCAB_SIZE + 20), root / "tokenizer.json")
    return root


def _run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    print(result.output)
    return result


def _log(path):
    with open(path, newline="") as f:
        return [(row["step"], row["loss"], row["valid_loss"]) for row in csv.DictReader(f)]


def test_out_that_is_a_runs_checkpoints_folder_is_refused(data, tmp_path):
    """--out MODEL/checkpoints (or one checkpoint in it) wrote a second model into the first run's checkpoints."""
    out = tmp_path / "model"
    assert _run("train", data / "de-en", "--tokenizer", data / "tokenizer.json", "--out", out, *TINY,
                "--steps", "2").exit_code == 0
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    step = next((out / "checkpoints").glob("step-*"))
    for target in (out / "checkpoints", step):
        for extra in ([], ["--overwrite"]):
            result = _run("train", data / "de-en", "--tokenizer", data / "tokenizer.json", "--out", target, *TINY,
                          "--steps", "2", *extra)
            assert result.exit_code == 1 and "holds a training run's checkpoints" in result.output
            assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_real_ctrl_c_keeps_the_checkpoint_and_resume_repeats_the_run(data, tmp_path):
    """SIGINT to a training process mid-run: exit 130, a notice naming the kept checkpoint, one error line, no
    traceback; --resume then ends exactly where the uninterrupted run ends."""
    args = ["train", data / "de-en", "--tokenizer", data / "tokenizer.json", *TINY, "--steps", "150",
            "--save-every", "1", "--eval-every", "50"]
    full = tmp_path / "full"
    assert _run(*args, "--out", full).exit_code == 0
    out = tmp_path / "interrupted"
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    command = [sys.executable, "-c", "from refformer.runtime.cli import main; main()", *map(str, args), "--out",
               str(out)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 60
    while not (out / "checkpoints" / "latest.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)  # well inside the run: a checkpoint every step
    process.send_signal(signal.SIGINT)
    stderr = process.communicate(timeout=60)[1].decode()
    print(stderr)
    if process.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert process.returncode == 130
    lines = stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in stderr
    assert lines[0].startswith("notice: the checkpoint of step ") and "--resume" in lines[0]
    assert lines[1].startswith("error: ") or lines[1] == "interrupted"
    assert not (out / "model.safetensors").exists()
    assert _run(*args, "--out", out, "--resume").exit_code == 0
    assert _log(out / "train_log.csv") == _log(full / "train_log.csv")
    assert (out / "model.safetensors").read_bytes() == (full / "model.safetensors").read_bytes()


def test_numbers_of_a_diverged_model_are_short():
    """A perplexity of e^700 printed 300 digits."""
    assert format_number(1.0142e304, 2) == "1.01e+304"
    assert format_number(float("inf"), 2) == "inf"
    assert format_number(None, 2) == format_number(float("nan"), 2) == "-"
    assert format_number(388.25, 2) == "388.25"


def test_a_second_run_into_the_same_out_is_refused_while_the_first_writes(data, tmp_path):
    """Two runs into one new --out both passed the output check and interleaved their checkpoints."""
    import fcntl

    from refformer.refimpl.training.loop import LOCK_FILE

    out = tmp_path / "busy"
    out.mkdir()
    with open(out / LOCK_FILE, "a") as held:  # what a running `refformer train --out busy` holds
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = _run("train", data / "de-en", "--tokenizer", data / "tokenizer.json", "--out", out, *TINY,
                      "--steps", "2")
    assert result.exit_code == 1 and "another training run is writing to --out" in result.output
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # nothing written
    result = _run("train", data / "de-en", "--tokenizer", data / "tokenizer.json", "--out", out, *TINY, "--steps", "2")
    assert result.exit_code == 0 and not (out / LOCK_FILE).exists()


def test_out_that_is_a_dangling_symbolic_link_is_refused_before_training(data, tmp_path):
    """It failed after loading the data with 'error: File exists: LINK'."""
    (tmp_path / "link").symlink_to(tmp_path / "missing")
    result = _run("train", data / "de-en", "--tokenizer", data / "tokenizer.json", "--out", tmp_path / "link", *TINY,
                  "--steps", "1")
    assert result.exit_code == 1 and "is a symbolic link to" in result.output and "training" not in result.output
    assert not (tmp_path / "missing").exists()


def test_a_huge_line_is_skipped_unencoded_and_the_tokenizer_trains_on_it_quickly(data, tmp_path, monkeypatch):
    """A 50 MB line in train.tsv took 70 s and 9 GB to encode in train (only to be skipped as too long), and over
    5 minutes in `tokenizer train`. Train skips it before encoding; the tokenizer trainer takes it in pieces."""
    import refformer.refimpl.training.tokenizer as tokenizer_module

    corpus = tmp_path / "de-en"
    corpus.mkdir()
    for split in ("train", "valid"):
        (corpus / f"{split}.tsv").write_text("".join(f"{de}\t{en}\n" for de, en in PAIRS) + "a" * 1_000_000 + "\tb\n")
    lengths = []
    real_encode = tokenizer_module.encode
    monkeypatch.setattr(tokenizer_module, "encode",
                        lambda tok, texts: lengths.extend(map(len, texts)) or real_encode(tok, texts))
    result = _run("train", corpus, "--tokenizer", data / "tokenizer.json", "--out", tmp_path / "m", *TINY,
                  "--steps", "1")
    assert result.exit_code == 0 and "1 longer than 64 tokens skipped" in result.output
    assert max(lengths) < 1000
    start = time.monotonic()
    assert train_tokenizer(corpus, MIN_VOCAB_SIZE + 20).get_vocab_size() > MIN_VOCAB_SIZE
    assert time.monotonic() - start < 10
    assert [len(piece) for piece in tokenizer_module.training_pieces(["x" * 25_000, "y"])] == [10_000, 10_000, 5_000, 1]


def test_messages_say_what_to_do(data, tmp_path):
    """eval of pairs all too long named --max-positions, an option eval does not have; --resume with other data or
    options said only that they differ."""
    long = tmp_path / "long"
    long.mkdir()
    (long / "valid.tsv").write_text("ein Haus " * 60 + "\ta house\n")
    model = tmp_path / "m"
    assert _run("train", data / "de-en", "--tokenizer", data / "tokenizer.json", "--out", model, *TINY,
                "--steps", "2").exit_code == 0
    result = _run("eval", long, "--model", model)
    assert result.exit_code == 1
    assert "use shorter pairs, or a model trained with a larger --max-positions" in result.output
    other = tmp_path / "other"
    other.mkdir()
    (other / "train.tsv").write_text("".join(f"{de}\t{en}\n" for de, en in PAIRS[:-1]))
    (other / "valid.tsv").write_text("".join(f"{de}\t{en}\n" for de, en in PAIRS))
    result = _run("train", other, "--tokenizer", data / "tokenizer.json", "--out", model, *TINY, "--steps", "4",
                  "--resume")
    assert result.exit_code == 1 and "train into a new --out directory" in result.output
    assert result.output.count("error:") == 1 and "Traceback" not in result.output


def test_an_encoder_decoder_without_decoder_layers_is_refused(data, tmp_path):
    """--layers 0 trained an encoder-decoder model whose output ignores the source (no layer cross-attends), exit 0."""
    for extra in (["--layers", "0"], ["--decoder-layers", "0"]):
        result = _run("train", data / "de-en", "--tokenizer", data / "tokenizer.json", "--out", tmp_path / "m", *TINY,
                      "--steps", "1", *extra)
        assert result.exit_code == 1
        assert f"{extra[0]} 0 leaves an encoder-decoder model no decoder layer" in result.output
        assert not (tmp_path / "m").exists()


def test_split_files_that_are_pipes_folders_or_dangling_links_are_named(data, tmp_path):
    """A pipe or folder as valid.tsv was ignored (training ran without evaluation, exit 0); eval and train called a
    pipe, a device link or a dangling link 'missing'."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.tsv").write_text("".join(f"{de}\t{en}\n" for de, en in PAIRS))
    os.mkfifo(corpus / "valid.tsv")
    model = tmp_path / "m"
    args = ["--tokenizer", data / "tokenizer.json", "--out", model, *TINY, "--steps", "1"]
    result = _run("train", corpus, *args)
    assert result.exit_code == 1 and "valid.tsv is not a regular file" in result.output and not model.exists()
    (corpus / "valid.tsv").unlink()
    (corpus / "valid.tsv").mkdir()
    assert "valid.tsv is not a regular file" in _run("train", corpus, *args).output
    (corpus / "valid.tsv").rmdir()
    (corpus / "valid.tsv").symlink_to(tmp_path / "nowhere")
    assert "valid.tsv is a symbolic link to nothing" in _run("train", corpus, *args).output
    (corpus / "valid.tsv").unlink()
    assert _run("train", corpus, *args).exit_code == 0  # no valid split: trained without evaluation
    (corpus / "test.tsv").symlink_to("/dev/zero")
    result = _run("eval", corpus, "--model", model, "--split", "test")
    assert result.exit_code == 1 and "test.tsv is not a regular file" in result.output
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    os.mkfifo(pipe / "train.tsv")
    result = _run("tokenizer", "train", pipe, "--vocab-size", MIN_VOCAB_SIZE, "--out", tmp_path / "t.json")
    assert result.exit_code == 1 and "train.tsv is not a regular file" in result.output


def test_empty_paths_and_tokenizers_over_a_models_files_are_refused(data, tmp_path, monkeypatch):
    """train --out '' trained into the current folder; tokenizer train --out MODEL/model.safetensors --overwrite
    replaced the weights with a tokenizer (the model could not be loaded any more)."""
    monkeypatch.chdir(tmp_path)
    tok = data / "tokenizer.json"
    for args in (["train", data / "de-en", "--tokenizer", tok, "--out", ""],
                 ["train", "", "--tokenizer", tok, "--out", "m"],
                 ["train", data / "de-en", "--tokenizer", "", "--out", "m"], ["eval", ""],
                 ["data", "de-en", "--out", ""],
                 ["tokenizer", "train", "", "--vocab-size", "300", "--out", "t.json"],
                 ["tokenizer", "train", data / "de-en", "--vocab-size", "300", "--out", ""]):
        result = _run(*args)
        assert result.exit_code == 2 and "is an empty path" in result.output
    assert list(tmp_path.iterdir()) == []
    model = tmp_path / "m"
    assert _run("train", data / "de-en", "--tokenizer", tok, "--out", model, *TINY, "--steps", "1").exit_code == 0
    before = {path: path.read_bytes() for path in model.rglob("*") if path.is_file()}
    step = next((model / "checkpoints").glob("step-*"))
    for target in (model / "model.safetensors", model / "tokenizer.json", model / "checkpoints" / "latest.json",
                   step / "model.safetensors"):
        result = _run("tokenizer", "train", data / "de-en", "--vocab-size", "300", "--out", target, "--overwrite")
        assert result.exit_code == 1 and "is one of the files of the" in result.output
    assert {path: path.read_bytes() for path in model.rglob("*") if path.is_file()} == before


def test_eval_of_a_checkpoint_names_the_model_folder(data, tmp_path):
    """eval --model RUN/checkpoints/step-N said 'config.json is missing: not a refformer model directory'."""
    model = tmp_path / "m"
    assert _run("train", data / "de-en", "--tokenizer", data / "tokenizer.json", "--out", model, *TINY,
                "--steps", "1").exit_code == 0
    for target in (model / "checkpoints", next((model / "checkpoints").glob("step-*"))):
        result = _run("eval", data / "de-en", "--model", target)
        assert result.exit_code == 1 and f"evaluate the model the run wrote, --model {model}" in result.output


def test_resume_with_fewer_steps_than_the_checkpoint_says_nothing_was_trained(data, tmp_path):
    """--resume --steps 2 on a checkpoint of step 3 printed the old step-3 summary as if it had trained."""
    model = tmp_path / "m"
    args = ["train", data / "de-en", "--tokenizer", data / "tokenizer.json", "--out", model, *TINY]
    assert _run(*args, "--steps", "3").exit_code == 0
    result = _run(*args, "--steps", "2", "--resume")
    assert result.exit_code == 0
    assert "nothing trained: the checkpoint is already at step 3, past --steps 2" in result.output
