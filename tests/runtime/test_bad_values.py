"""Every command crossed with a table of bad values, as a careless or hostile user types them.

Each row asserts what the README promises for bad input: a non-zero exit status, one `error: ...` line on stderr
(plus at most one `notice:`/`warning:` line), no traceback, a message that names what was wrong, and no file the user
had changed, deleted or added to. The rows run in one workspace holding a tiny model, a model with NaN weights,
broken config.json files, a tokenizer, a data folder, a torch state_dict and some of the user's own files.
"""

import hashlib
import json
import os
import shutil
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from refformer.refimpl import Config, init_params, save
from refformer.runtime.cli import main
from refformer.runtime.generator import default_model_dir

from ..helpers import write_word_level_tokenizer

V = 40
CONFIG = dict(vocab_size=V, d_model=16, n_heads=4, d_ff=24, n_encoder_layers=1, n_decoder_layers=1, max_positions=32,
              dropout=0.0)

# config.json fields of the wrong JSON type or out of range: each is a model folder of its own, ws/bad-<name>
BAD_CONFIGS = {
    "bool-as-string": {"norm_first": "false"},
    "bool-as-number": {"final_norm": 1},
    "number-as-bool": {"d_model": True},
    "float-as-int": {"n_heads": 2.0},
    "string-as-int": {"d_ff": "24"},
    "null-size": {"vocab_size": None},
    "negative-layers": {"n_decoder_layers": -1},
    "zero-heads": {"n_heads": 0},
    "huge-positions": {"max_positions": 10**12},
    "huge-width": {"d_model": 1_000_000, "n_heads": 4},
    "nan-eps": {"norm_eps": float("nan")},
    "negative-eps": {"norm_eps": -1e-5},
    "inf-dropout": {"dropout": float("inf")},
    "number-as-string": {"activation": 3},
    "unknown-family": {"family": "encoder-only"},
    "pad-out-of-range": {"pad_id": V},
    "negative-bos": {"bos_id": -1},
    "unknown-key": {"n_layers": 2},
    "newer-format": {"format_version": 99},
    "eos-is-pad": {"eos_id": 0},
}
# config.json files that are not JSON Python can read whole: ws/raw-<name>
RAW_CONFIGS = {
    "5000-digits": '{"d_model": ' + "9" * 5000 + "}",
    "deep": "[" * 100_000 + "]" * 100_000,
    "not-an-object": "[1, 2, 3]",
}


def _write_workspace(ws):
    cfg = Config(**CONFIG)
    params = init_params(cfg, np.random.default_rng(0))
    tokenizer = write_word_level_tokenizer(ws / "tokenizer.json", V)
    save(ws / "model", cfg, params, tokenizer=tokenizer)
    params["decoder"]["layers"][0]["ffn"]["fc1"]["weight"][0, 0] = np.nan
    save(ws / "nan-model", cfg, params, tokenizer=tokenizer)
    for name, change in BAD_CONFIGS.items():
        folder = ws / f"bad-{name}"
        shutil.copytree(ws / "model", folder)
        data = json.loads((folder / "config.json").read_text())
        data.update(change)
        (folder / "config.json").write_text(json.dumps(data))
    for name, text in RAW_CONFIGS.items():
        shutil.copytree(ws / "model", ws / f"raw-{name}")
        (ws / f"raw-{name}" / "config.json").write_text(text)
    shutil.copytree(ws / "model", ws / "onnx-is-a-file")
    (ws / "onnx-is-a-file" / "onnx").write_text("the user's file where the exports' folder belongs\n")
    (ws / "run" / "checkpoints").mkdir(parents=True)
    (ws / "run" / "checkpoints" / "latest.json").write_text('{"dir": "step-00000002", "step": 2}\n')
    (ws / "utf16-bad.txt").write_bytes(b"\xff\xfeH\x00\x00\xd8")
    (ws / "long-line.txt").write_text("w4 " * 40_000 + "\n")
    (ws / "not-a-model").mkdir()
    (ws / "not-a-model" / "notes.txt").write_text("the user's own notes\n")
    (ws / "user-folder").mkdir()
    (ws / "user-folder" / "keep.txt").write_text("do not delete\n")
    (ws / "data").mkdir()
    pairs = "".join(f"w{i} w{i + 1}\tw{i + 2} w{i + 3}\n" for i in range(4, 20))
    for split in ("train", "valid", "test"):
        (ws / "data" / f"{split}.tsv").write_text(pairs)
    (ws / "empty-data").mkdir()
    (ws / "inputs.txt").write_text("w4 w5\nw6 w7\n")
    (ws / "existing.jsonl").write_text('{"input": "w4", "output": "w5"}\n')
    (ws / "existing.npz").write_bytes(b"the user's golden file")
    (ws / "corrupt.json").write_text("{ not json")
    (ws / "plain.txt").write_text("a plain file, not a folder\n")
    try:
        import torch

        with warnings.catch_warnings():  # nn.Transformer's note on nested tensors, which this model never uses
            warnings.simplefilter("ignore", UserWarning)
            transformer = torch.nn.Transformer(16, 4, 1, 1, 24, dropout=0.0)
        embedding, head = torch.nn.Embedding(V, 16), torch.nn.Linear(16, V)
        state = {**{f"src_tok_emb.embedding.{k}": v for k, v in embedding.state_dict().items()},
                 **{f"tgt_tok_emb.embedding.{k}": v for k, v in embedding.state_dict().items()},
                 **{f"transformer.{k}": v for k, v in transformer.state_dict().items()},
                 **{f"generator.{k}": v for k, v in head.state_dict().items()}}
        torch.save(state, ws / "state.pt")
    except ImportError:
        (ws / "state.pt").write_bytes(b"not a torch file")


def _snapshot(root):
    """{relative path: sha256 (links and pipes: what they are)} of every file under root, and the set of folders."""
    files, folders = {}, set()
    for path in root.rglob("*"):
        relative = str(path.relative_to(root))
        if path.is_symlink():
            files[relative] = f"link to {os.readlink(path)}"
        elif path.is_dir():
            folders.add(relative)
        elif path.is_file():
            files[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            files[relative] = "special file"
    return files, folders


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    ws = tmp_path_factory.mktemp("bad-values")
    _write_workspace(ws)
    return ws


@pytest.fixture
def workspace(template, tmp_path):
    """A fresh copy of the template for each row, so that one row's stray file cannot change another's result."""
    ws = tmp_path / "ws"
    shutil.copytree(template, ws)
    os.mkfifo(ws / "fifo")  # made here: copying a pipe would block
    os.symlink(ws / "nowhere", ws / "dangling")
    (ws / "pipe-data").mkdir()
    shutil.copy(ws / "data" / "train.tsv", ws / "pipe-data" / "train.tsv")
    os.mkfifo(ws / "pipe-data" / "valid.tsv")
    os.symlink(ws / "loop-b", ws / "loop-a")  # links (made here: copying them would fail) that point at each other
    os.symlink(ws / "loop-a", ws / "loop-b")
    shutil.copytree(ws / "model", ws / "onnx-loop")
    os.symlink(ws / "onnx-loop" / "onnx", ws / "onnx-loop" / "onnx")
    return ws


GEN = ["generate", "--model", "{ws}/model", "--provider", "cpu"]
EXPORT = ["export", "--model", "{ws}/model"]
VERIFY = ["verify", "--model", "{ws}/model", "--provider", "cpu"]
GOLDEN = ["golden", "--model", "{ws}/model"]
CONVERT = ["convert-torch", "{ws}/state.pt", "--tokenizer", "{ws}/tokenizer.json", "--n-heads", "4"]
TRAIN = ["train", "{ws}/data", "--tokenizer", "{ws}/tokenizer.json", "--d-model", "16", "--n-heads", "4",
         "--d-ff", "24", "--layers", "1", "--steps", "2", "--max-tokens", "64", "--max-positions", "32"]
EVAL = ["eval", "{ws}/data", "--model", "{ws}/model"]
TOKENIZER = ["tokenizer", "train", "{ws}/data"]


def _rows():
    rows = []

    def add(command, args, mention):
        shown = (command[:1] if command is TRAIN else command) + args  # the train prefix is long and always the same
        rows.append(pytest.param(command + args, mention, id=" ".join(shown).replace("{ws}/", "")[:100]))

    # ---- generate: every decoding option at 0, negative, NaN, inf, huge, and the wrong type
    for option, values in {
        "--max-new-tokens": ["-1", "abc", "1.5"],
        "--min-new-tokens": ["-1", "x"],
        "--temperature": ["0", "-1", "nan", "inf", "-inf"],
        "--top-k": ["-1", "1.5", "nan"],
        "--top-p": ["0", "-0.1", "1.5", "nan", "inf"],
        "--num-beams": ["0", "-1", "1000000000", "nan"],
        "--num-return-sequences": ["0", "-2", "1e9"],
        "--length-penalty": ["nan", "inf", "-inf"],
        "--repetition-penalty": ["0", "-1", "nan", "inf"],
        "--no-repeat-ngram-size": ["-1", "nan"],
        "--batch-size": ["0", "-1", "x"],
        "--threads": ["0", "-1", "two"],
        "--seed": ["-1", "-99999999999", "1.5", "nan"],
        "--dtype": ["fp8", "float32", "", "int4"],
        "--provider": ["tpu", ""],
        "--variant": ["fastest", ""],
    }.items():
        for value in values:
            add(GEN, [option, value, "w4 w5"], option.lstrip("-").split("-")[-1])
    add(GEN, ["--min-new-tokens", "5", "--max-new-tokens", "2", "w4"], "new_tokens")
    # ---- int8 where a line's output would depend on its batch: refused before any extra is imported or work done
    add(["serve", "--model", "{ws}/model", "--dtype", "int8"], [], "max-batch 1")
    add(["serve", "--model", "{ws}/model", "--dtype", "int8", "--max-batch", "2"], [], "max-batch 1")
    add(["batch", "{ws}/inputs.txt", "--out", "{ws}/batch-out", "--model", "{ws}/model", "--dtype", "int8"], [],
        "batch-size 1")
    add(["batch", "{ws}/inputs.txt", "--out", "{ws}/batch-out", "--dtype", "int8", "--batch-size", "4"], [],
        "batch-size 1")
    add(["generate", "--model", "{ws}/model", "--provider", "cuda", "--dtype", "int8", "w4"], [], "CPU only")
    add(GEN, ["--num-beams", "2", "--num-return-sequences", "3", "w4"], "num")
    add(GEN, ["--do-sample", "--num-beams", "2", "w4"], "beam")
    add(GEN, [], "text")
    add(GEN, ["w4", "--input", "{ws}/inputs.txt"], "input")
    add(GEN, ["--input", "{ws}/missing.txt"], "missing.txt")
    add(GEN, ["--input", "{ws}/user-folder"], "user-folder")
    add(GEN, ["--input", "{ws}/inputs.txt", "--output", "{ws}/no-such-folder/out.jsonl"], "no-such-folder")
    add(GEN, ["--input", "{ws}/inputs.txt", "--output", "{ws}/user-folder"], "user-folder")
    add(GEN, ["--input", "{ws}/inputs.txt", "--output", "{ws}/existing.jsonl"], "overwrite")
    add(GEN, ["--input", "{ws}/inputs.txt", "--output", "{ws}/inputs.txt"], "inputs.txt")
    add(GEN, ["w4", "--output", "{ws}/existing.jsonl"], "overwrite")
    add(GEN, ["--foo", "w4"], "foo")
    add(["generate", "--model", "{ws}/missing", "w4"], [], "missing")
    add(["generate", "--model", "{ws}/plain.txt", "w4"], [], "plain.txt")
    add(["generate", "--model", "{ws}/not-a-model", "w4"], [], "config.json")
    add(["generate", "{ws}/model", "w4"], [], "--model")
    add(["generate", "--model", "{ws}/nan-model", "--provider", "cpu", "w4"], [], "finite")
    add(GEN, ["w4", "--output", "{ws}/model/config.json", "--overwrite"], "model folder")
    add(GEN, ["w4", "--output", "{ws}/plain.txt/out.jsonl"], "not a folder")
    add(GEN, ["w4", "--output", ""], "empty")
    add(GEN, ["--input", "{ws}/utf16-bad.txt"], "UTF-16")
    add(GEN, ["--input", "{ws}/fifo", "--output", "{ws}/fifo"], "fifo")
    add(GEN, ["w4", "--seed", "9" * 5000], "seed")
    add(GEN, ["w4", "--output", "{ws}/loop-a", "--overwrite"], "link")
    add(GEN, ["w4", "--output", "/dev/full"], "regular file")
    add(GEN, ["w4", "--output", "/dev/full", "--overwrite"], "regular file")
    # the record names the line and its length; the bundled model, whose export goes to the cache, not to ws
    add(["generate", "--provider", "cpu", "--input", "{ws}/long-line.txt"], [], "inputs failed")
    add(["generate", "--model", "{ws}/onnx-loop", "--provider", "cpu", "w4"], [], "loop")
    for name, change in BAD_CONFIGS.items():
        add(["generate", "--model", f"{{ws}}/bad-{name}", "--provider", "cpu", "w4"], [], next(iter(change)))

    # ---- export
    for option, values in {
        "--opset": ["0", "-1", "16", "1000", "x", "nan"],
        "--dtype": ["fp8", "bf16", "int4"],
        "--static-length": ["0", "-1", "100000000000", "x"],
    }.items():
        for value in values:
            add(EXPORT, [option, value, "--out", "{ws}/new-export"], option.lstrip("-").split("-")[0])
    add(EXPORT, ["--out", "{ws}/user-folder"], "user-folder")
    add(["export", "--model", "{ws}/nan-model", "--dtype", "int8", "--out", "{ws}/new-export"], [], "finite")
    add(EXPORT, ["--out", "{ws}/model"], "model")
    add(EXPORT, ["--out", "{ws}"], "model")
    add(EXPORT, ["--out", "{ws}/plain.txt"], "plain.txt")
    add(EXPORT, ["--out", ""], "empty")
    add(EXPORT, ["--out", "{ws}/dangling"], "dangling")
    add(EXPORT, ["--out", "{bundled}/x"], "package")
    add(["export", "--model", "{ws}/onnx-loop"], [], "loop")
    add(["export", "--model", "{ws}/onnx-is-a-file"], [], "onnx")
    add(EXPORT, ["--out", "{ws}/no-such-folder/deeper/onnx", "--opset", "1"], "opset")
    add(["export", "{ws}/model"], [], "--model")
    add(["export", "--model", "{ws}/missing"], [], "missing")
    add(["export", "--model", "{ws}/not-a-model", "--out", "{ws}/new-export"], [], "config.json")
    add(["export", "--model", "{ws}/nan-model", "--out", "{ws}/new-export"], [], "finite")
    for name, change in BAD_CONFIGS.items():
        if name != "eos-is-pad":  # the graphs need no tokenizer; generate (above) checks the two agree
            add(["export", "--model", f"{{ws}}/bad-{name}", "--out", "{ws}/new-export"], [], next(iter(change)))

    # ---- verify
    add(VERIFY, ["--onnx-dir", "{ws}/user-folder"], "manifest")
    add(VERIFY, ["--onnx-dir", "{ws}/missing"], "missing")
    add(VERIFY, ["--seed", "-1"], "seed")
    add(VERIFY, ["--onnx-dir", ""], "empty")
    add(VERIFY, ["--seed", "x"], "seed")
    add(VERIFY, ["--provider", "gpu"], "provider")
    add(VERIFY, ["--dtype", "int4"], "dtype")
    add(VERIFY, ["--dtype", "int8"], "refformer export")
    add(["verify", "{ws}/model"], [], "--model")
    add(["verify", "--model", "{ws}/missing"], [], "missing")
    for name, change in list(BAD_CONFIGS.items())[:8]:
        add(["verify", "--model", f"{{ws}}/bad-{name}"], [], next(iter(change)))

    # ---- golden
    add(GOLDEN, [], "--out")
    add(GOLDEN, ["--out", "{ws}/existing.npz"], "overwrite")
    add(GOLDEN, ["--out", "{ws}/no-such-folder/g.npz"], "no-such-folder")
    add(GOLDEN, ["--out", "{ws}/user-folder"], "user-folder")
    add(GOLDEN, ["--out", "{ws}/fifo", "--overwrite"], "regular file")
    add(GOLDEN, ["--out", "{ws}/loop-a"], "link")
    add(GOLDEN, ["--out", "{ws}/model/model.safetensors", "--overwrite"], "model")
    add(GOLDEN, ["--out", "{ws}/g.npz", "--seed", "-1"], "seed")
    add(GOLDEN, ["--out", "{ws}/g.npz", "--seed", "1e3"], "seed")
    add(["golden", "{ws}/model", "--out", "{ws}/g.npz"], [], "--model")
    add(["golden", "--model", "{ws}/missing", "--out", "{ws}/g.npz"], [], "missing")
    add(["golden", "--model", "{ws}/nan-model", "--out", "{ws}/g.npz"], [], "finite")
    for name, change in list(BAD_CONFIGS.items())[:8]:
        add(["golden", "--model", f"{{ws}}/bad-{name}", "--out", "{ws}/g.npz"], [], next(iter(change)))

    # ---- convert-torch
    for option, values in {
        "--n-heads": ["0", "-4", "3", "x"],
        "--pad-id": ["-1", str(V), "1000000000000"],
        "--eos-id": ["-2", str(V)],
        "--max-positions": ["0", "-1", "1000000000000"],
        "--activation": ["tanh"],
        "--positional": ["rotary"],
    }.items():
        for value in values:
            add(CONVERT, [option, value, "--out", "{ws}/converted"], option.lstrip("-").split("-")[0])
    add(CONVERT, ["--out", "{ws}/model"], "overwrite")
    add(CONVERT, ["--out", "{ws}/user-folder"], "overwrite")
    add(CONVERT, ["--out", "{ws}/plain.txt"], "plain.txt")
    add(CONVERT, ["--out", "{bundled}", "--overwrite"], "package")
    add(["convert-torch", "/dev/zero", "--tokenizer", "{ws}/tokenizer.json", "--n-heads", "4", "--out",
         "{ws}/converted"], [], "not a file")
    add(["convert-torch", "{ws}/missing.pt", "--tokenizer", "{ws}/tokenizer.json", "--n-heads", "4", "--out",
         "{ws}/converted"], [], "missing.pt")
    add(["convert-torch", "{ws}/corrupt.json", "--tokenizer", "{ws}/tokenizer.json", "--n-heads", "4", "--out",
         "{ws}/converted"], [], "corrupt.json")
    add(["convert-torch", "{ws}/state.pt", "--tokenizer", "{ws}/corrupt.json", "--n-heads", "4", "--out",
         "{ws}/converted"], [], "corrupt.json")
    add(["convert-torch", "{ws}/state.pt", "--n-heads", "4", "--out", "{ws}/converted"], [], "tokenizer")

    # ---- tokenizer train
    for value in ["0", "-1", "3", "2000000000", "1e9", "x"]:
        add(TOKENIZER, ["--vocab-size", value, "--out", "{ws}/tok.json"], "vocab")
    add(TOKENIZER, ["--vocab-size", "300", "--out", "{ws}/tokenizer.json"], "overwrite")
    add(TOKENIZER, ["--vocab-size", "300", "--out", "{ws}/no-such-folder/tok.json"], "no-such-folder")
    add(TOKENIZER, ["--vocab-size", "300", "--out", "{ws}/user-folder"], "user-folder")
    add(TOKENIZER, ["--vocab-size", "300", "--out", "{ws}/data/valid.tsv", "--overwrite"], "split")
    add(TOKENIZER, ["--vocab-size", "300", "--out", "{ws}/fifo", "--overwrite"], "fifo")
    add(TOKENIZER, ["--vocab-size", "300", "--out", ""], "empty")
    add(TOKENIZER, ["--vocab-size", "300", "--out", "{ws}/model/model.safetensors", "--overwrite"], "model")
    add(TOKENIZER, ["--vocab-size", "300", "--out", "{ws}/model/tokenizer.json", "--overwrite"], "model")
    add(TOKENIZER, ["--vocab-size", "300", "--out", "{ws}/run/checkpoints/latest.json", "--overwrite"], "checkpoints")
    add(TOKENIZER, ["--vocab-size", "300", "--out", "{ws}/tok.json", "--model", "wordpiece"], "model")
    add(["tokenizer", "train", "{ws}/empty-data", "--vocab-size", "300", "--out", "{ws}/tok.json"], [], "train")
    add(["tokenizer", "train", "{ws}/missing", "--vocab-size", "300", "--out", "{ws}/tok.json"], [], "missing")

    # ---- data
    add(["data", "de-en", "--out", "{ws}/data"], [], "overwrite")
    add(["data", "pydoc", "--out", "{ws}/data"], [], "overwrite")
    add(["data", "de-en", "--out", "{ws}/plain.txt"], [], "plain.txt")
    add(["data", "klingon"], [], "klingon")
    add(["data", "de-en", "--out", ""], [], "empty")
    for command in (["generate", "w4"], ["export"], ["verify"], ["golden", "--out", "{ws}/g.npz"],
                    ["eval", "{ws}/data"]):
        add(command, ["--model", ""], "empty")
    add(GEN, ["--input", ""], "empty")
    add(GOLDEN, ["--out", ""], "empty")
    add(CONVERT, ["--out", "", "--overwrite"], "empty")
    add(["convert-torch", "", "--tokenizer", "{ws}/tokenizer.json", "--n-heads", "4", "--out", "{ws}/c"], [], "empty")
    add(["data", "pydoc", "--out", ""], [], "empty")

    # ---- train: every option at 0, negative, NaN, inf, huge, the wrong type
    for option, values in {
        "--d-model": ["0", "-16", "1000000", "x"],
        "--n-heads": ["0", "-1", "3"],
        "--d-ff": ["0", "-1", "10000000000"],
        "--layers": ["-1", "1000000000"],
        "--max-positions": ["0", "-1", "1000000000000"],
        "--steps": ["-1", "x"],
        "--max-tokens": ["0", "-1"],
        "--lr": ["nan", "inf", "-1", "0"],
        "--warmup": ["-1"],
        "--weight-decay": ["nan", "-1", "inf"],
        "--clip": ["nan", "-1"],
        "--label-smoothing": ["1", "-0.1", "nan", "2"],
        "--dropout": ["1", "-0.1", "nan"],
        "--eval-every": ["-1"],
        "--eval-sentences": ["-1"],
        "--save-every": ["-1"],
        "--time-limit": ["-1", "nan", "0"],
        "--seed": ["-1", "1.5"],
        "--family": ["encoder-only"],
        "--activation": ["tanh"],
        "--positional": ["rotary"],
    }.items():
        for value in values:
            add(TRAIN, [option, value, "--out", "{ws}/trained"], option.lstrip("-").split("-")[0])
    add(TRAIN, ["--out", "{ws}/model"], "overwrite")
    add(TRAIN, ["--out", "{ws}/trained", "--layers", "0"], "decoder layer")
    add(TRAIN, ["--out", "{ws}/trained", "--decoder-layers", "0"], "decoder layer")
    add(TRAIN, ["--out", ""], "empty")
    add(["train", "", "--tokenizer", "{ws}/tokenizer.json", "--out", "{ws}/trained"], [], "empty")
    add(["train", "{ws}/pipe-data", "--tokenizer", "{ws}/tokenizer.json", "--out", "{ws}/trained"], [],
        "not a regular file")
    add(TRAIN, ["--out", "{ws}/run/checkpoints"], "checkpoints")
    add(TRAIN, ["--out", "{ws}/run/checkpoints", "--overwrite"], "checkpoints")
    add(TRAIN, ["--out", "{ws}/dangling"], "symbolic link")
    add(TRAIN, ["--out", "{ws}/trained", "--steps", "1e3"], "steps")
    add(TRAIN, ["--out", "{ws}/trained", "--time-limit", "-0"], "time-limit")
    add(TRAIN, ["--out", "{ws}/trained", "--clip", "-1e-300"], "clip")
    add(TRAIN, ["--out", "{ws}/trained", "--resume", "--overwrite"], "resume")
    add(TRAIN, ["--out", "{ws}/plain.txt"], "plain.txt")
    add(TRAIN, ["--out", "{ws}/data"], "data")
    add(TRAIN, ["--out", "{ws}/no-such-folder/deeper/m", "--steps", "-1"], "steps")
    add(TRAIN, ["--out", "{ws}/trained", "--resume"], "checkpoint")
    add(["train", "{ws}/data", "--tokenizer", "{ws}/tokenizer.json", "--out", "{ws}/trained", "--init",
         "{ws}/missing"], [], "missing")
    add(["train", "{ws}/data", "--tokenizer", "{ws}/tokenizer.json", "--out", "{ws}/model", "--init",
         "{ws}/model"], [], "overwrite")
    add(["train", "{ws}/data", "--tokenizer", "{ws}/tokenizer.json", "--out", "{ws}/trained", "--init",
         "{ws}/model", "--d-model", "32"], [], "d-model")
    add(["train", "{ws}/data", "--tokenizer", "{ws}/missing.json", "--out", "{ws}/trained"], [], "missing.json")
    add(["train", "{ws}/data", "--tokenizer", "{ws}/corrupt.json", "--out", "{ws}/trained"], [], "corrupt.json")
    add(["train", "{ws}/missing", "--tokenizer", "{ws}/tokenizer.json", "--out", "{ws}/trained"], [], "missing")
    add(["train", "{ws}/empty-data", "--tokenizer", "{ws}/tokenizer.json", "--out", "{ws}/trained"], [], "train")
    add(["train", "{ws}/data", "--out", "{ws}/trained"], [], "tokenizer")

    # ---- eval
    add(EVAL, ["--split", "train"], "split")
    add(EVAL, ["--max-sentences", "-1"], "max-sentences")
    add(EVAL, ["--max-tokens", "0"], "max-tokens")
    add(EVAL, ["--max-tokens", "-5"], "max-tokens")
    add(EVAL, ["--dtype", "int4"], "dtype")
    add(EVAL, ["--dtype", ""], "dtype")
    add(EVAL, ["--dtype", "int8", "--max-tokens", "0"], "max-tokens")
    add(["eval", "{ws}/data", "--model", "{ws}/nan-model", "--dtype", "int8"], [], "finite")
    add(["eval", "{ws}/data", "--model", "{ws}/model", "--dtype", "int8", "--split", "train"], [], "split")
    add(["eval", "{ws}/model", "{ws}/data"], [], "--model")
    add(["eval", "{ws}/model"], [], "is a model folder")
    add(["eval", "", "--model", "{ws}/model"], [], "empty")
    add(["eval", "{ws}/data", "--model", "{ws}/run/checkpoints"], [], "checkpoints")
    add(["eval", "{ws}/pipe-data", "--model", "{ws}/model"], [], "not a regular file")
    add(["eval", "{ws}/data", "--model", "{ws}/missing"], [], "missing")
    add(["eval", "{ws}/missing", "--model", "{ws}/model"], [], "missing")
    add(["eval", "{ws}/empty-data", "--model", "{ws}/model"], [], "valid")
    add(["eval", "{ws}/data", "--model", "{ws}/nan-model"], [], "finite")
    for name in RAW_CONFIGS:
        add(["eval", "{ws}/data", "--model", f"{{ws}}/raw-{name}"], [], "config.json")
        add(["generate", "--model", f"{{ws}}/raw-{name}", "w4"], [], "config.json")
        add(["export", "--model", f"{{ws}}/raw-{name}"], [], "config.json")
    for name, change in list(BAD_CONFIGS.items())[:6]:
        add(["eval", "{ws}/data", "--model", f"{{ws}}/bad-{name}"], [], next(iter(change)))

    # ---- the group itself
    add(["translate"], [], "translate")
    add([], [], "command")
    add(["data"], [], "command")
    add(["--frobnicate"], [], "frobnicate")
    return rows


ROWS = _rows()


def test_the_table_is_large_enough():
    assert len(ROWS) >= 200


@pytest.mark.parametrize("args, mention", ROWS)
def test_bad_value_is_one_line_and_changes_nothing(workspace, tmp_path, monkeypatch, args, mention):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(workspace)
    before = _snapshot(workspace)
    bundled = str(default_model_dir())
    result = CliRunner().invoke(main, [arg.format(ws=workspace, bundled=bundled) for arg in args])
    after = _snapshot(workspace)
    stderr = result.stderr.splitlines()
    assert result.exit_code not in (0, None), f"exit 0 for a bad value; output: {result.output[-500:]}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert len(stderr) <= 2, stderr
    errors = [line for line in stderr if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert all(line.startswith(("error: ", "notice: ", "warning: ")) for line in stderr), stderr
    assert _words(mention) in _words(errors[0]), errors[0]
    assert after == before, _difference(before, after)


def _words(text):
    """Lower case, with - and _ alike: --max-tokens and max_tokens both name the option."""
    return text.lower().replace("_", "-")


def _difference(before, after):
    (files_before, folders_before), (files_after, folders_after) = before, after
    changed = sorted(name for name in files_before if files_after.get(name) != files_before[name])
    added = sorted(set(files_after) - set(files_before)) + sorted(folders_after - folders_before)
    removed = sorted(folders_before - folders_after)
    return f"changed or deleted: {changed[:5]}; added: {added[:5]}; folders removed: {removed[:5]}"
