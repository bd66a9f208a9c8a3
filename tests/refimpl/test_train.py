"""The training loop: it learns (copy task, LM overfit), resumes exactly, and checkpoints atomically."""

import ctypes
import glob
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from refformer.refimpl import Config, init_params, load
from refformer.refimpl.errors import RefformerError
from refformer.refimpl.generate import greedy, greedy_lm, strip
from refformer.refimpl.training.batching import collate, lm_examples, make_batches, seq2seq_examples
from refformer.refimpl.training.checkpoint import load_checkpoint
from refformer.refimpl.training.checks import check_fits, check_output_dir
from refformer.refimpl.training.log import read_log
from refformer.refimpl.training.loop import TrainingDiverged, train
from refformer.refimpl.training.options import TrainOptions
from refformer.refimpl.tree import flatten

PAD, BOS, EOS = 0, 1, 2
SYMBOLS = range(4, 14)  # ten symbols after the four special ids


@pytest.fixture(autouse=True)
def one_blas_thread():
    """Run these tiny-matrix tests on one OpenBLAS thread: on a busy 2-core machine a second BLAS thread
    only adds waiting (measured: a [32, 510] @ [510, 64] product 17x slower), and made the copy task
    take a minute instead of seconds. A no-op where NumPy's bundled OpenBLAS is not found."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "libscipy_openblas*"))
    try:
        blas = ctypes.CDLL(libs[0])
        get, set_ = blas.scipy_openblas_get_num_threads64_, blas.scipy_openblas_set_num_threads64_
    except (IndexError, OSError, AttributeError):
        yield
        return
    before = get()
    set_(1)
    yield
    set_(before)


def _copy_pairs(n, seed):
    rng = np.random.default_rng(seed)
    return [(s, list(s)) for s in (rng.choice(SYMBOLS, size=rng.integers(2, 6)).tolist() for _ in range(n))]


def _spaced(ids):
    return " ".join(map(str, ids))


def test_copy_task_reaches_exact_match():
    """A 1+1-layer D=32 model learns to copy sequences of 2-5 symbols it has never seen."""
    cfg = Config(vocab_size=14, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=1, n_decoder_layers=1,
                 max_positions=16, dropout=0.0)
    train_examples, _ = seq2seq_examples(_copy_pairs(10000, 1), bos_id=BOS, eos_id=EOS, max_len=16)
    seen = {tuple(src) for src, _, _ in train_examples}
    held_out = [pair for pair in _copy_pairs(400, 2) if tuple(pair[0]) + (EOS,) not in seen][:200]
    valid_examples, _ = seq2seq_examples(held_out, bos_id=BOS, eos_id=EOS, max_len=16)
    options = TrainOptions(steps=600, max_tokens=512, lr=3e-3, warmup=50, betas=(0.9, 0.999), eps=1e-8,
                           weight_decay=0.0, label_smoothing=0.0, clip=1.0, seed=1, eval_sentences=200)
    start = time.perf_counter()
    result = train(cfg, init_params(cfg, np.random.default_rng(1)), make_batches(train_examples, max_tokens=512,
                   pad_id=PAD, seed=1), valid_examples, options, decode=_spaced)
    seconds = time.perf_counter() - start

    batch = collate(valid_examples, pad_id=PAD)
    predictions = strip(greedy(cfg, result.params, batch.src_ids, batch.src_mask), cfg)
    exact = np.mean([p == tgt for p, (_, tgt) in zip(predictions, held_out)])
    final = result.log[-1]
    print(f"copy task: {options.steps} steps in {seconds:.1f} s, train loss {final['loss']:.4f}, "
          f"valid loss {final['valid_loss']:.4f}, exact match {exact:.3f}, BLEU {final['bleu']:.1f}")
    assert exact == 1.0
    assert final["bleu"] == pytest.approx(100.0) and final["chrf"] == pytest.approx(100.0)
    assert result.stopped == "steps" and result.step == options.steps and not result.notes


def test_decoder_only_overfits_a_short_text():
    cfg = Config(vocab_size=14, d_model=32, n_heads=2, d_ff=64, n_decoder_layers=1, n_encoder_layers=0,
                 family="decoder-only", max_positions=32, dropout=0.0)
    text = [4, 5, 6, 7, 8, 9, 5, 6, 10, 11, 12, 13, 4, 4, 9, 8, 7, 11, 6, 5]
    examples = lm_examples([text], bos_id=BOS, eos_id=EOS, max_len=24)
    options = TrainOptions(steps=150, max_tokens=512, lr=1e-2, warmup=10, weight_decay=0.0, label_smoothing=0.0)
    result = train(cfg, init_params(cfg, np.random.default_rng(0)), make_batches(examples, max_tokens=512, pad_id=PAD),
                   examples, options)
    print(f"LM overfit: loss {result.log[0]['loss']:.3f} -> {result.log[-1]['loss']:.4f} in {options.steps} steps")
    assert result.log[-1]["valid_loss"] < 0.02
    continuation = greedy_lm(cfg, result.params, np.array([[BOS, *text[:3]]]), max_new_tokens=30)
    assert strip(continuation, cfg)[0] == text[3:]


# ---------------------------------------------------------------------------- resume and checkpoints


def _small_run():
    """A tiny seq2seq setup with dropout and label smoothing, so the RNG and every option matter."""
    cfg = Config(vocab_size=14, d_model=16, n_heads=2, d_ff=32, n_encoder_layers=1, n_decoder_layers=1,
                 max_positions=16, dropout=0.1)
    examples, _ = seq2seq_examples(_copy_pairs(60, 3), bos_id=BOS, eos_id=EOS, max_len=16)
    batches = make_batches(examples, max_tokens=64, pad_id=PAD, seed=5)
    options = TrainOptions(steps=9, max_tokens=64, lr=2e-3, warmup=3, label_smoothing=0.1, eval_every=2,
                           save_every=4, seed=5, eval_sentences=4)
    return cfg, init_params(cfg, np.random.default_rng(0)), batches, examples[:8], options


class Crash(Exception):
    pass


def _crash_at(step):
    def on_step(row):
        if row["step"] == step:
            raise Crash

    return on_step


def _compare(resumed, uninterrupted):
    assert [r["step"] for r in resumed] == [r["step"] for r in uninterrupted]
    worst = 0.0
    for a, b in zip(resumed, uninterrupted):
        for key in ("loss", "lr", "valid_loss", "valid_ppl", "bleu", "chrf"):
            assert (a[key] is None) == (b[key] is None), key
            if a[key] is not None:
                worst = max(worst, abs(a[key] - b[key]) / max(abs(b[key]), 1e-30))
    return worst


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    cfg, params, batches, valid, options = _small_run()
    full = train(cfg, params, batches, valid, options, out_dir=tmp_path / "full", decode=_spaced)

    # crash after step 6 (checkpoint at 4 exists), then resume: steps 5 and 6 are redone
    with pytest.raises(Crash):
        train(cfg, params, batches, valid, options, out_dir=tmp_path / "crash", decode=_spaced, on_step=_crash_at(6))
    assert load_checkpoint(tmp_path / "crash")[2]["step"] == 4
    resumed = train(cfg, None, batches, valid, options, out_dir=tmp_path / "crash", decode=_spaced, resume=True)
    worst = _compare(resumed.log, full.log)

    # stop on the time limit (a fake clock), then resume
    ticks = iter(range(10 ** 6))
    stopped = train(cfg, params, batches, valid, TrainOptions(**{**options.to_dict(), "time_limit": 25}),
                    out_dir=tmp_path / "timed", decode=_spaced, clock=lambda: next(ticks))
    assert stopped.stopped == "time limit" and 0 < stopped.step < options.steps
    resumed_timed = train(cfg, None, batches, valid, options, out_dir=tmp_path / "timed", decode=_spaced, resume=True)
    worst = max(worst, _compare(resumed_timed.log[:stopped.step], stopped.log[:stopped.step]),
                _compare(resumed_timed.log[stopped.step:], full.log[stopped.step:]))
    print(f"resume: worst relative difference of logged values {worst:.1e}")
    assert worst <= 1e-9
    assert _compare(read_log(tmp_path / "crash" / "train_log.csv"), full.log) <= 1e-12  # the CSV round-trips
    assert (tmp_path / "crash" / "model.safetensors").read_bytes() == \
        (tmp_path / "full" / "model.safetensors").read_bytes()


def test_final_model_directory(tmp_path):
    cfg, params, batches, valid, options = _small_run()
    train(cfg, params, batches, valid, TrainOptions(**{**options.to_dict(), "steps": 2}), out_dir=tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "train_log.csv", "loss.png", "checkpoints"} <= names
    loaded_cfg, _ = load(tmp_path)
    assert loaded_cfg == cfg
    log = read_log(tmp_path / "train_log.csv")
    assert [r["step"] for r in log] == [1, 2] and log[-1]["valid_ppl"] > 1
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_refuses_other_config_options_data_and_bad_checkpoints(tmp_path):
    cfg, params, batches, valid, options = _small_run()
    short = TrainOptions(**{**options.to_dict(), "steps": 2})
    with pytest.raises(RefformerError, match="no checkpoint"):
        train(cfg, params, batches, valid, short, out_dir=tmp_path, resume=True)
    train(cfg, params, batches, valid, short, out_dir=tmp_path)
    with pytest.raises(RefformerError, match="config differs.*d_ff"):
        train(cfg.replace(d_ff=48), None, batches, valid, options, out_dir=tmp_path, resume=True)
    with pytest.raises(RefformerError, match="options differ.*lr"):
        train(cfg, None, batches, valid, TrainOptions(**{**options.to_dict(), "lr": 1e-3}), out_dir=tmp_path,
              resume=True)
    with pytest.raises(RefformerError, match="batches differ"):
        train(cfg, None, batches[:-1], valid, options, out_dir=tmp_path, resume=True)

    checkpoint = tmp_path / "checkpoints" / json.loads((tmp_path / "checkpoints" / "latest.json").read_text())["dir"]
    weights = checkpoint / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:len(good) // 2])  # truncated
    with pytest.raises(RefformerError, match="corrupt"):
        load_checkpoint(tmp_path)
    weights.write_bytes(good)
    (checkpoint / "trainer_state.json").write_text("{not json")
    with pytest.raises(RefformerError, match="unreadable or corrupt"):
        load_checkpoint(tmp_path)
    (checkpoint / "trainer_state.json").write_text("[]")
    with pytest.raises(RefformerError, match="not a refformer checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoints" / "latest.json").write_text('{"dir": 5}')
    with pytest.raises(RefformerError, match="unreadable or corrupt"):
        load_checkpoint(tmp_path)
    # a pointer to a folder that is gone falls back to the newest complete checkpoint; with none, one line
    (tmp_path / "checkpoints" / "latest.json").write_text('{"dir": "step-99999999"}')
    (checkpoint / "trainer_state.json").unlink()
    with pytest.raises(RefformerError, match="names step-99999999, which is missing"):
        load_checkpoint(tmp_path)


def test_checkpoint_is_atomic(tmp_path, monkeypatch):
    """A save that fails half-way (here: writing the optimizer state) leaves the previous checkpoint in use."""
    import safetensors.numpy

    cfg, params, batches, valid, options = _small_run()
    options = TrainOptions(**{**options.to_dict(), "steps": 4, "save_every": 2, "eval_every": 0})
    real_save_file = safetensors.numpy.save_file
    calls = []

    def failing_save_file(tensors, path, *args, **kwargs):
        calls.append(Path(path).name)
        if len(calls) == 4:  # the second checkpoint (step 4): model written, optimizer fails
            Path(path).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real_save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.numpy, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space"):
        train(cfg, params, batches, valid, options, out_dir=tmp_path)
    assert calls == ["model.safetensors", "optimizer.safetensors", "model.safetensors", "optimizer.safetensors"]
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step-00000002"]  # no half-written folder
    _, _, opt_state, state = load_checkpoint(tmp_path)
    assert opt_state["step"] == 2 and [r["step"] for r in state["log"]] == [1, 2]

    # a failure while switching latest.json (after the new folder is complete) also keeps step 2 in use
    monkeypatch.setattr(safetensors.numpy, "save_file", real_save_file)
    import refformer.refimpl.training.checkpoint as checkpoint_module

    def failing_atomic_write(path, write):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(checkpoint_module, "atomic_write", failing_atomic_write)
    with pytest.raises(OSError):
        train(cfg, None, batches, valid, options, out_dir=tmp_path, resume=True)
    assert load_checkpoint(tmp_path)[2]["step"] == 2
    monkeypatch.undo()
    result = train(cfg, None, batches, valid, options, out_dir=tmp_path, resume=True)
    assert result.step == 4 and load_checkpoint(tmp_path)[2]["step"] == 4
    assert sorted(p.name for p in root.iterdir()) == ["latest.json", "step-00000004"]  # leftovers cleaned


def test_ctrl_c_while_saving_keeps_a_checkpoint_to_resume_from(tmp_path, monkeypatch):
    """A KeyboardInterrupt right after latest.json was switched (it removed the checkpoint it named, so --resume
    failed for good) keeps that checkpoint; a real SIGINT during a save is held until the save is done."""
    import signal

    import refformer.refimpl.training.checkpoint as checkpoint_module

    cfg, params, batches, valid, options = _small_run()
    options = TrainOptions(**{**options.to_dict(), "steps": 4, "save_every": 2, "eval_every": 0})
    full = train(cfg, params, batches, valid, options, out_dir=tmp_path / "full")
    real_atomic_write = checkpoint_module.atomic_write
    pointers = []

    def interrupted_after_the_switch(path, write):
        real_atomic_write(path, write)
        if Path(path).name == "latest.json":
            pointers.append(path)
            if len(pointers) == 2:
                raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "atomic_write", interrupted_after_the_switch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, params, batches, valid, options, out_dir=tmp_path / "run")
    assert load_checkpoint(tmp_path / "run")[2]["step"] == 4
    monkeypatch.undo()

    def ctrl_c_during_save(tensors, path, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # held: the save finishes first
        real_save_file(tensors, path, *args, **kwargs)

    import safetensors.numpy

    real_save_file = safetensors.numpy.save_file
    monkeypatch.setattr(safetensors.numpy, "save_file", ctrl_c_during_save)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, params, batches, valid, options, out_dir=tmp_path / "sigint")
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "sigint")[2]["step"] == 2
    resumed = train(cfg, None, batches, valid, options, out_dir=tmp_path / "sigint", resume=True)
    assert _compare(resumed.log, full.log) == 0.0

    # a checkpoint folder removed under its pointer (by an earlier version): resume from the newest complete one
    root = tmp_path / "run" / "checkpoints"
    (root / "step-00000009").mkdir()  # an empty folder is not complete
    saved = json.loads((root / "latest.json").read_text())["dir"]
    (root / saved).rename(root / "step-00000003")
    assert load_checkpoint(tmp_path / "run")[2]["step"] == 4
    resumed = train(cfg, None, batches, valid, options, out_dir=tmp_path / "run", resume=True)
    assert resumed.step == 4


@pytest.mark.parametrize("field, value", [("step", "2"), ("step", 10 ** 30), ("log", None), ("log", [1, 2]),
                                          ("log", [{"step": 1}]), ("elapsed", "x"), ("elapsed", float("nan")),
                                          ("sha256", []), ("sha256", {"../../x": "0"}), ("position", [0]),
                                          ("rng", None), ("data_fingerprint", 5), ("options", None)])
def test_a_damaged_trainer_state_is_one_error(tmp_path, field, value):
    """trainer_state.json is not covered by the sha256s: fields of the wrong kind gave TypeError/KeyError tracebacks."""
    cfg, params, batches, valid, options = _small_run()
    options = TrainOptions(**{**options.to_dict(), "steps": 2, "save_every": 2})
    train(cfg, params, batches, valid, options, out_dir=tmp_path)
    path = next((tmp_path / "checkpoints").glob("step-*")) / "trainer_state.json"
    state = json.loads(path.read_text())
    state[field] = value
    path.write_text(json.dumps(state))
    with pytest.raises(RefformerError, match="is damaged"):
        train(cfg, None, batches, valid, TrainOptions(**{**options.to_dict(), "steps": 3}), out_dir=tmp_path,
              resume=True)


def test_missing_train_extra_is_a_note_not_a_failure(tmp_path, monkeypatch):
    """Without sacrebleu and matplotlib (the `train` extra) BLEU/chrF and loss.png are skipped with a note."""
    import sys

    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    cfg, params, batches, valid, options = _small_run()
    (tmp_path / "loss.png").write_bytes(b"an earlier run's plot")
    result = train(cfg, params, batches, valid, TrainOptions(**{**options.to_dict(), "steps": 1}), out_dir=tmp_path,
                   decode=_spaced, overwrite=True)
    assert result.log[-1]["valid_loss"] is not None and result.log[-1]["bleu"] is None
    assert any("sacrebleu is not installed" in note for note in result.notes)
    assert any("matplotlib is not installed" in note for note in result.notes)
    assert not (tmp_path / "loss.png").exists() and (tmp_path / "train_log.csv").is_file()


# ---------------------------------------------------------------------------- issue 11: options, divergence, outputs


@pytest.mark.parametrize("field, value", [
    ("steps", 0), ("steps", -1), ("steps", 2.5), ("steps", True), ("max_tokens", 0), ("max_tokens", None),
    ("lr", 0.0), ("lr", -1e-3), ("lr", float("nan")), ("lr", float("inf")), ("lr", "1e-3"), ("warmup", -1),
    ("weight_decay", float("nan")), ("weight_decay", -0.1), ("clip", -1.0), ("clip", float("nan")),
    ("clip", float("inf")), ("label_smoothing", -0.1), ("label_smoothing", 1.0), ("label_smoothing", float("nan")),
    ("eval_every", -1), ("save_every", -1), ("eval_sentences", -1), ("seed", -1), ("time_limit", 0.0),
    ("time_limit", -5.0), ("time_limit", float("nan")), ("time_limit", float("inf")), ("eps", 0.0),
    ("betas", (0.9, 1.0)), ("betas", (0.9,)),
])
def test_train_options_refuse_bad_values_naming_the_field(field, value):
    with pytest.raises(RefformerError, match=rf"^{field} must be"):
        TrainOptions(**{field: value})


def test_train_options_accept_the_edges():
    options = TrainOptions(steps=1, max_tokens=1, lr=1e-12, warmup=0, weight_decay=0.0, clip=0.0,
                           label_smoothing=0.0, eval_every=0, save_every=0, eval_sentences=0, seed=2 ** 70,
                           time_limit=1e-3)
    assert TrainOptions.from_dict(options.to_dict()) == options
    with pytest.raises(RefformerError, match="unknown training options"):
        TrainOptions.from_dict({**options.to_dict(), "learning_rate": 1.0})


def test_train_refuses_bad_arguments(tmp_path):
    cfg, params, batches, valid, options = _small_run()
    for call, words in [
        (lambda: train(None, params, batches, valid, options), "cfg must be a Config"),
        (lambda: train(cfg, params, batches, valid, options.to_dict()), "options must be TrainOptions"),
        (lambda: train(cfg, params, [], valid, options), "no training batches"),
        (lambda: train(cfg, params, [[1, 2]], valid, options), "list of Batch"),
        (lambda: train(cfg, params, batches, None, options), "valid_examples must be a list"),
        (lambda: train(cfg, None, batches, valid, options), "params must be the parameter tree"),
        (lambda: train(cfg, params["decoder"], batches, valid, options), "does not match"),
        (lambda: train(cfg, params, batches, valid, options, resume=True), "resume needs out_dir"),
        (lambda: train(cfg, params, batches, valid, options, out_dir=tmp_path / "f" / "x"), "does not exist"),
    ]:
        with pytest.raises(RefformerError, match=words):
            call()


def _losses_nan_at_step_1(cfg, params):
    return {**params, "decoder": {**params["decoder"], "final_norm": {
        name: np.full_like(value, np.nan) for name, value in params["decoder"]["final_norm"].items()}}}


def test_divergence_stops_before_anything_is_written(tmp_path):
    """A NaN loss ends the run with TrainingDiverged naming the step; nothing of that state reaches the disk."""
    cfg, params, batches, valid, options = _small_run()
    # at step 1 nothing was updated yet: the starting weights overflow, and a lower --lr would not help
    with pytest.raises(TrainingDiverged, match=r"^training diverged at step 1: loss is nan; start from other weights "
                                               r"\(with --init") as raised:
        train(cfg, _losses_nan_at_step_1(cfg, params), batches, valid, options, out_dir=tmp_path / "out")
    assert raised.value.step == 1 and isinstance(raised.value, RefformerError)
    assert not (tmp_path / "out").exists()

    # lr 1e6: the first steps are finite (and checkpointed), then the loss blows up; no NaN checkpoint, no model
    huge = TrainOptions(**{**options.to_dict(), "lr": 1e6, "warmup": 0, "save_every": 1, "steps": 50})
    with pytest.raises(TrainingDiverged) as raised:
        train(cfg, params, batches, valid, huge, out_dir=tmp_path / "huge")
    assert 1 < raised.value.step <= 50
    print(f"lr 1e6: {raised.value}")
    _, saved, _, _ = load_checkpoint(tmp_path / "huge")
    assert all(np.isfinite(value).all() for value in flatten(saved).values())
    assert not (tmp_path / "huge" / "model.safetensors").exists()


def test_overwrite_keeps_the_old_run_until_the_new_one_has_saved(tmp_path):
    cfg, params, batches, valid, options = _small_run()
    short = TrainOptions(**{**options.to_dict(), "steps": 2, "save_every": 2, "eval_every": 0})
    train(cfg, params, batches, valid, short, out_dir=tmp_path)
    weights = (tmp_path / "model.safetensors").read_bytes()
    for resume, overwrite, words in [(False, False, r"already holds a model or checkpoints \(config.json, "
                                                    r"model.safetensors, train_log.csv, loss.png, checkpoints\); "
                                                    r"pass --resume to continue its training or --overwrite"),
                                     (True, True, "not both")]:
        with pytest.raises(RefformerError, match=words):
            train(cfg, params, batches, valid, short, out_dir=tmp_path, resume=resume, overwrite=overwrite)

    # a new run stopped before its first save leaves the old checkpoint and model in place
    other = init_params(cfg, np.random.default_rng(9))
    with pytest.raises(Crash):
        train(cfg, other, batches, valid, short, out_dir=tmp_path, overwrite=True, on_step=_crash_at(1))
    assert load_checkpoint(tmp_path)[2]["step"] == 2 and (tmp_path / "model.safetensors").read_bytes() == weights
    # a diverged new run replaces nothing either
    with pytest.raises(TrainingDiverged):
        train(cfg, _losses_nan_at_step_1(cfg, other), batches, valid, short, out_dir=tmp_path, overwrite=True)
    assert (tmp_path / "model.safetensors").read_bytes() == weights
    # a finished one replaces the model, and its first checkpoint replaces the old ones
    train(cfg, other, batches, valid, short, out_dir=tmp_path, overwrite=True)
    assert (tmp_path / "model.safetensors").read_bytes() != weights
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert len(names) == 2 and names[0] == "latest.json" and names[1].startswith("step-00000002")  # the new one only


def test_check_output_dir(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RefformerError, match="is a file"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(RefformerError, match="is the input"):
        check_output_dir(tmp_path, inputs=(tmp_path,))
    with pytest.raises(RefformerError, match="parent folder .* does not exist"):
        check_output_dir(tmp_path / "a" / "b")
    with pytest.raises(RefformerError, match="no checkpoint to resume from"):
        check_output_dir(tmp_path, resume=True)
    (tmp_path / "notes.txt").write_text("a folder of other files is fine")
    check_output_dir(tmp_path)
    check_output_dir(tmp_path / "new")
    (tmp_path / "checkpoints").write_text("not a folder")  # would fail at the first save, after training
    with pytest.raises(RefformerError, match="checkpoints is a file, not a checkpoint folder"):
        check_output_dir(tmp_path, overwrite=True)
    (tmp_path / "checkpoints").unlink()
    (tmp_path / "model.safetensors").mkdir()
    with pytest.raises(RefformerError, match="model.safetensors is a folder"):
        check_output_dir(tmp_path, overwrite=True)


def test_check_fits_refuses_a_batch_too_big_for_memory(monkeypatch):
    import refformer.refimpl.training.checks as checks_module

    cfg, _, _, _, _ = _small_run()
    examples, _ = seq2seq_examples(_copy_pairs(400, 4), bos_id=BOS, eos_id=EOS, max_len=16)
    small = make_batches(examples, max_tokens=64, pad_id=PAD)
    big = make_batches(examples, max_tokens=10 ** 12, pad_id=PAD)
    assert len(big) == 1
    limit = checks_module.parameter_bytes(cfg) * checks_module.TRAINING_COPIES + \
        checks_module.estimate_batch_memory(cfg, big[0].n_rows, big[0].src_ids.shape[1], big[0].tgt_ids.shape[1]) // 2
    monkeypatch.setattr(checks_module, "physical_memory_bytes", lambda: limit)
    check_fits(cfg, small)
    with pytest.raises(RefformerError, match=r"^a batch of \d+ rows x \d+ tokens needs about .* lower --max-tokens"):
        check_fits(cfg, big)
    with pytest.raises(RefformerError, match="this model needs"):
        check_fits(cfg.replace(d_model=100_000, n_heads=4))


def test_public_functions_refuse_bad_arguments(tmp_path):
    """Every public function of refimpl.training's loop, checkpoint, evaluate and log modules raises RefformerError
    naming what was wrong, never a bare KeyError/TypeError/IndexError from inside."""
    from refformer.refimpl.optim import adamw_init
    from refformer.refimpl.training.checkpoint import save_checkpoint
    from refformer.refimpl.training.evaluate import evaluate, translate_examples, translation_scores
    from refformer.refimpl.training.log import plot_log, write_log
    from refformer.refimpl.training.loop import loss_and_grads, train_step

    cfg, params, batches, valid, options = _small_run()
    rng = np.random.default_rng(0)
    for call, words in [
        (lambda: loss_and_grads(cfg, params, None), "batch must be a Batch"),
        (lambda: train_step(cfg, params, adamw_init(params), batches[0], {}, rng), "options must be TrainOptions"),
        (lambda: train_step(cfg, params, None, batches[0], options, rng), "opt_state must be"),
        (lambda: translate_examples(cfg, params, valid, None), "decode must be a function"),
        (lambda: translate_examples(cfg, params, [(None, [1], [2])], _spaced), "encoder-decoder"),
        (lambda: translation_scores(cfg, params, valid, _spaced, ["one"], 64), "one text per example"),
        (lambda: evaluate(cfg, params, valid, decode=5), "decode must be a function"),
        (lambda: evaluate(cfg, params, valid, max_tokens=0), "max_tokens must be a positive integer"),
        (lambda: evaluate(cfg, params, valid, max_sentences=-1), "max_sentences must be an integer >= 0"),
        (lambda: evaluate(cfg, params, None), "examples must be a list"),
        (lambda: save_checkpoint(tmp_path, cfg, params, adamw_init(params), None), "state must be a dict"),
        (lambda: write_log(tmp_path / "log.csv", [1]), "log must be a list of dict rows"),
        (lambda: plot_log(tmp_path / "loss.png", [{"step": 1}]), "log must be a list of rows"),
        (lambda: read_log(tmp_path / "absent.csv"), "cannot read the training log"),
        (lambda: check_output_dir(None), "out_dir must be a path"),
    ]:
        with pytest.raises(RefformerError, match=words):
            call()
    (tmp_path / "log.csv").write_text("step,loss\n1,not-a-number\n")
    with pytest.raises(RefformerError, match="not a training log of numbers"):
        read_log(tmp_path / "log.csv")
    assert evaluate(cfg, params, valid, max_translations=0, decode=_spaced)["bleu"] is None  # loss only


@pytest.mark.parametrize("field", ["lr", "eps", "weight_decay", "clip", "time_limit"])
def test_train_options_refuse_an_integer_too_large_for_a_float(field):
    """10**400 was an OverflowError from math.isfinite: now RefformerError naming the field."""
    with pytest.raises(RefformerError, match=field):
        TrainOptions(**{field: 10**400})
