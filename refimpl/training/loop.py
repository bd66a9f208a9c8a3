"""The training loop: label-smoothed cross-entropy, dropout, AdamW, warmup, clipping, evaluation,
atomic checkpoints that resume exactly, the training log and the final model directory.

One step reads as the math does:

    logits = model(src, tgt_in; dropout rng)        loss = CE_smoothed(logits, labels)
    g = clip(d loss / d params)                     params = AdamW(params, g, lr(step))

Everything that decides the next step lives in the checkpoint (training/checkpoint.py): parameters, AdamW
moments and step, the dropout Generator's state, the data position (epoch, index), the config and the options; so
a resumed run repeats the uninterrupted one's losses exactly.
"""

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import numpy as np

from ..config import Config
from ..errors import RefformerError, check, is_integer
from ..io import save
from ..loss import cross_entropy_backward, cross_entropy_forward
from ..model import model_backward, model_forward
from ..optim import adamw_init, adamw_update, clip_by_global_norm, inverse_sqrt_lr
from ..tree import flatten
from .batching import Batch, batch_stream, fingerprint
from .checkpoint import load_checkpoint, save_checkpoint
from .checks import check_output_dir
from .evaluate import evaluate
from .interrupts import interrupts_deferred
from .log import LOG_COLUMNS, LOG_FILE, PLOT_FILE, plot_log, write_log
from .options import TrainOptions


class TrainingDiverged(RefformerError):
    """The loss, the gradient norm or a parameter became NaN or infinite; nothing from that state was written.

    A RefformerError raised by train; keeps step (an int), what ("loss", "the gradient norm" or "parameter NAME") and
    value as attributes.
    """

    def __init__(self, step, what, value, hint="lower --lr (or raise --warmup)"):
        self.step, self.what, self.value = step, what, value
        super().__init__(f"training diverged at step {step}: {what} is {value}; {hint} and train again; "
                         f"nothing from the diverged state was saved")


def _divergence_hint(options):
    if options.lr * options.weight_decay >= 1.0:  # p * (1 - lr * wd) flips or zeroes every matrix
        return f"lower --lr or --weight-decay (lr x weight decay is {options.lr * options.weight_decay:g}, at least 1)"
    return "lower --lr (or raise --warmup)"


@dataclasses.dataclass
class TrainResult:
    """What train returns: the final parameters and optimizer state, the log rows, and why it stopped.

    A plain dataclass: no checks.
    """

    params: dict
    opt_state: dict
    step: int
    log: list
    stopped: str  # "steps" or "time limit"
    notes: list


# ---------------------------------------------------------------------------- one step


def loss_and_grads(cfg, params, batch, *, label_smoothing=0.0, rng=None):
    """Mean label-smoothed cross-entropy over the batch's target tokens and its gradient tree.

    Raises RefformerError for a batch that is not a Batch (and whatever model_forward refuses)."""
    check(isinstance(batch, Batch),
          f"batch must be a Batch (from refimpl.training.batching), got {type(batch).__name__}")
    logits, cache = model_forward(cfg, params, batch.src_ids, batch.tgt_ids, src_mask=batch.src_mask,
                                  tgt_mask=batch.tgt_mask, rng=rng)  # [B, T, V]
    loss, loss_cache = cross_entropy_forward(logits, batch.labels, ignore_id=cfg.pad_id,
                                             label_smoothing=label_smoothing)
    grads = model_backward(cfg, params, cache, cross_entropy_backward(loss_cache))
    return float(loss), grads


def train_step(cfg, params, opt_state, batch, options, rng):
    """One optimizer step -> (params, opt_state, loss, lr).

    Raises TrainingDiverged (a RefformerError) when the loss or the gradient norm is NaN or infinite,
    before the parameters change; RefformerError for options or opt_state of the wrong kind.
    """
    check(isinstance(options, TrainOptions), f"options must be TrainOptions, got {type(options).__name__}")
    check(isinstance(opt_state, dict) and is_integer(opt_state.get("step")),
          "opt_state must be the optimizer state from refimpl.optim.adamw_init")
    step = opt_state["step"] + 1
    lr = inverse_sqrt_lr(step, peak=options.lr, warmup=options.warmup)
    with np.errstate(all="ignore"):  # a diverging step overflows; it is reported below, not as NumPy warnings
        loss, grads = loss_and_grads(cfg, params, batch, label_smoothing=options.label_smoothing, rng=rng)
        if not math.isfinite(loss):  # at step 1 no update has happened yet: the starting weights overflow
            raise TrainingDiverged(step, "loss", loss, "start from other weights (with --init, a model whose "
                                   "outputs do not overflow)" if step == 1 else _divergence_hint(options))
        grads, norm = clip_by_global_norm(grads, options.clip)
        if not math.isfinite(norm):
            raise TrainingDiverged(step, "the gradient norm", norm, _divergence_hint(options))
        params, opt_state = adamw_update(params, grads, opt_state, lr=lr, betas=options.betas, eps=options.eps,
                                         weight_decay=options.weight_decay)
    return params, opt_state, loss, lr


def _check_resumable(cfg, saved_cfg, options, saved_options, data_fingerprint, saved_fingerprint):
    if cfg != saved_cfg:
        ours, theirs = cfg.to_dict(), saved_cfg.to_dict()
        changed = ", ".join(f"{k}: {theirs[k]!r} -> {ours[k]!r}" for k in ours if ours[k] != theirs[k])
        raise RefformerError(f"cannot resume: the config differs from the checkpoint's ({changed}); "
                             f"use the same architecture options, or train into a new --out directory")
    ours, theirs = options.to_dict(), TrainOptions.from_dict(saved_options).to_dict()
    changed = [f"{k}: {theirs[k]!r} -> {ours[k]!r}" for k in ours
               if k not in TrainOptions.RESUMABLE_CHANGES and ours[k] != theirs[k]]
    check(not changed, f"cannot resume: training options differ from the checkpoint's ({', '.join(changed)}); "
                       f"use the checkpoint's options, or train into a new --out directory")
    check(data_fingerprint == saved_fingerprint,
          "cannot resume: the training batches differ from the checkpoint's (other data, tokenizer or max_tokens); "
          "resume with the same data, tokenizer and --max-tokens, or train into a new --out directory")


# ---------------------------------------------------------------------------- the loop


def train(cfg, params, train_batches, valid_examples, options, *, out_dir=None, tokenizer=None, decode=None,
          references=None, resume=False, overwrite=False, inputs=(), on_step=None, clock=time.monotonic):
    """Train params (a tree of cfg) on train_batches (from refimpl.training.batching.make_batches) -> TrainResult.

    valid_examples: triples evaluated every options.eval_every steps and at the end (may be empty);
    decode / references as in evaluate. out_dir (None: keep nothing on disk) receives checkpoints
    every options.save_every steps and at the end, and finally the model directory (config.json,
    model.safetensors, tokenizer.json when tokenizer is given, train_log.csv, loss.png).
    resume=True continues from out_dir's checkpoint (the params argument is then not used).
    on_step(row) is called after every step with the logged row (a dict of LOG_COLUMNS).
    An out_dir that already holds a model or checkpoints is refused unless resume or overwrite is given
    (check_output_dir, given the run's input paths); with overwrite, its old checkpoints are removed only
    once this run has saved one.

    Raises RefformerError for bad arguments (check_output_dir included), and TrainingDiverged (a
    RefformerError) when the loss, the gradient norm or a parameter becomes NaN or infinite: the run
    stops there, and nothing from that state is written (no checkpoint, no model).
    """
    check(isinstance(cfg, Config), f"cfg must be a Config, got {type(cfg).__name__}")
    check(isinstance(options, TrainOptions), f"options must be TrainOptions, got {type(options).__name__}")
    check(isinstance(train_batches, (list, tuple)) and all(isinstance(b, Batch) for b in train_batches),
          "train_batches must be a list of Batch (from refimpl.training.batching.make_batches)")
    check(len(train_batches) > 0, "there are no training batches (is the training data empty?)")
    check(isinstance(valid_examples, (list, tuple)), f"valid_examples must be a list of triples, "
                                                     f"got {type(valid_examples).__name__}")
    check(resume or isinstance(params, dict), "params must be the parameter tree of cfg (or resume=True)")
    if out_dir is not None:
        check_output_dir(out_dir, resume=resume, overwrite=overwrite, inputs=inputs)
    elif resume:
        raise RefformerError("resume needs out_dir, where the checkpoint is")
    with output_lock(out_dir):
        if out_dir is not None:  # again, holding the lock: another run may have written there meanwhile
            check_output_dir(out_dir, resume=resume, overwrite=overwrite, inputs=inputs)
        return _train(cfg, params, train_batches, valid_examples, options, out_dir, tokenizer, decode, references,
                      resume, on_step, clock)


LOCK_FILE = ".refformer-train.lock"


@contextlib.contextmanager
def output_lock(out_dir):
    """Hold an exclusive lock on out_dir (creating it) while a run writes there: a second run into the same folder
    is refused (RefformerError) instead of interleaving its checkpoints with the first's. The lock goes with its
    process (a killed run leaves none); a folder it created stays only if the run wrote into it. A no-op for
    out_dir None, or where fcntl is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if out_dir is None or fcntl is None:
        yield
        return
    out = Path(out_dir)
    created = not out.exists()
    out.mkdir(exist_ok=True)
    path = out / LOCK_FILE
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RefformerError(f"another training run is writing to --out {out}: wait for it to finish, or "
                                 f"train into another folder") from None
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            if created and not any(out.iterdir()):  # a run that wrote nothing leaves no folder behind
                out.rmdir()


def _train(cfg, params, train_batches, valid_examples, options, out_dir, tokenizer, decode, references, resume,
           on_step, clock):
    if not resume:
        from ..io import check_params

        check_params(cfg, params)
    data_fingerprint = fingerprint(train_batches)
    notes = []
    if resume:
        saved_cfg, params, opt_state, state = load_checkpoint(out_dir)
        try:
            _check_resumable(cfg, saved_cfg, options, state["options"], data_fingerprint, state["data_fingerprint"])
            rng = np.random.Generator(np.random.PCG64())
            rng.bit_generator.state = state["rng"]
            position, log, elapsed_before = tuple(state["position"]), state["log"], state["elapsed"]
        except (KeyError, TypeError, ValueError) as error:
            if isinstance(error, RefformerError):
                raise
            raise RefformerError(f"the checkpoint in {out_dir} has an incomplete trainer state: {error!r}") from None
    else:
        opt_state = adamw_init(params)
        rng = np.random.default_rng([options.seed, 1])  # the dropout stream, apart from the data order's
        position, log, elapsed_before = (0, 0), [], 0.0

    # (step, number of evaluated rows) of the newest checkpoint, so the end does not save it twice
    saved_at = (opt_state["step"], _evaluated(log)) if resume else None

    def checkpoint():
        nonlocal saved_at
        _check_finite(params, opt_state["step"])
        state = {"options": options.to_dict(), "rng": rng.bit_generator.state, "position": list(position),
                 "data_fingerprint": data_fingerprint, "elapsed": elapsed(), "log": log}
        save_checkpoint(out_dir, cfg, params, opt_state, state)
        write_log(Path(out_dir) / LOG_FILE, log)
        saved_at = (opt_state["step"], _evaluated(log))

    def run_eval(row):
        result = evaluate(cfg, params, valid_examples, max_tokens=options.max_tokens, decode=decode,
                          references=references, max_translations=options.eval_sentences)
        row.update(valid_loss=result["loss"], valid_ppl=result["ppl"], bleu=result["bleu"], chrf=result["chrf"])
        notes.extend(n for n in result["notes"] if n not in notes)

    start = clock()

    def elapsed():
        return elapsed_before + (clock() - start)

    stream = batch_stream(train_batches, options.seed, position)
    stopped = "steps"
    first_step = opt_state["step"]
    while opt_state["step"] < options.steps:
        # the time limit is checked between steps, after at least one step of this session
        if options.time_limit is not None and opt_state["step"] > first_step and clock() - start >= options.time_limit:
            stopped = "time limit"
            break
        batch, position = next(stream)
        step_start = clock()
        params, opt_state, loss, lr = train_step(cfg, params, opt_state, batch, options, rng)
        step = opt_state["step"]
        row = dict.fromkeys(LOG_COLUMNS)
        row.update(step=step, loss=loss, lr=lr, tokens_per_s=batch.n_tokens / max(clock() - step_start, 1e-9))
        if valid_examples and (step == options.steps or options.eval_every and step % options.eval_every == 0):
            run_eval(row)
        row["elapsed"] = elapsed()
        log.append(row)
        if on_step is not None:
            on_step(row)
        if out_dir is not None and options.save_every and step % options.save_every == 0:
            checkpoint()

    if valid_examples and log and log[-1]["valid_loss"] is None:
        run_eval(log[-1])  # stopped early (time limit): the final model is always evaluated
    if out_dir is not None:
        _check_finite(params, opt_state["step"])
        if saved_at != (opt_state["step"], _evaluated(log)):
            checkpoint()
        with interrupts_deferred():  # the model and its log switch together
            save(out_dir, cfg, params, tokenizer=tokenizer)
            write_log(Path(out_dir) / LOG_FILE, log)
        if not plot_log(Path(out_dir) / PLOT_FILE, log):
            (Path(out_dir) / PLOT_FILE).unlink(missing_ok=True)  # an earlier run's plot would not show this one
            notes.append("loss.png skipped: matplotlib is not installed (pip install 'refformer[train]')")
    return TrainResult(params, opt_state, opt_state["step"], log, stopped, notes)


def _check_finite(params, step):
    """TrainingDiverged unless every parameter is finite (checked before anything is written)."""
    for name, value in flatten(params).items():
        if not np.isfinite(value).all():
            raise TrainingDiverged(step, f"parameter {name}", "not finite")


def _evaluated(log):
    return sum(row["valid_loss"] is not None for row in log)
