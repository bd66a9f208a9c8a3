"""The training loop: label-smoothed cross-entropy, dropout, AdamW, warmup, clipping, evaluation,
atomic checkpoints that resume exactly, the training log and the final model directory.

One step reads as the math does:

    logits = model(src, tgt_in; dropout rng)        loss = CE_smoothed(logits, labels)
    g = clip(d loss / d params)                     params = AdamW(params, g, lr(step))

Everything that decides the next step lives in the checkpoint: parameters, AdamW moments
and step, the dropout Generator's state, the data position (epoch, index), the config and
the options; so a resumed run repeats the uninterrupted one's losses exactly. Checkpoints
are safetensors + JSON (never pickle):

    OUT/checkpoints/latest.json            {"dir": "step-00000100", "step": 100}, replaced atomically
    OUT/checkpoints/step-00000100/         model.safetensors, optimizer.safetensors, trainer_state.json

A new checkpoint is written into a temporary folder, renamed into place, and only then
does latest.json point to it; a failure at any moment leaves the previous one in use.
"""

import contextlib
import csv
import dataclasses
import json
import math
import numbers
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .batching import Batch, batch_stream, collate, fingerprint, make_batches
from ..config import Config, check_fits_memory, parameter_bytes, physical_memory_bytes
from ..errors import RefformerError, check
from ..generate import greedy, strip
from ..io import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, atomic_write, save, sha256, unflatten_checked
from ..loss import cross_entropy_backward, cross_entropy_forward
from ..model import model_backward, model_forward
from ..optim import adamw_init, adamw_update, clip_by_global_norm, inverse_sqrt_lr
from ..tree import flatten, unflatten

LOG_COLUMNS = ("step", "loss", "lr", "tokens_per_s", "valid_loss", "valid_ppl", "bleu", "chrf", "elapsed")
CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
CHECKPOINT_FORMAT = 1
TRAINING_COPIES = 7  # parameters, gradients, two AdamW moments, and the three updated trees
LOG_FILE = "train_log.csv"
PLOT_FILE = "loss.png"
# What a training run writes into its output directory; a folder holding any of these holds a (trained) model.
OUTPUT_NAMES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, LOG_FILE, PLOT_FILE, CHECKPOINT_DIR)


class TrainingDiverged(RefformerError):
    """The loss or the gradient norm became NaN or infinite; nothing from that state was written."""

    def __init__(self, step, what, value, hint="lower --lr (or raise --warmup)"):
        self.step, self.what, self.value = step, what, value
        super().__init__(f"training diverged at step {step}: {what} is {value}; {hint} and train again; "
                         f"nothing from the diverged state was saved")


def _divergence_hint(options):
    if options.lr * options.weight_decay >= 1.0:  # p * (1 - lr * wd) flips or zeroes every matrix
        return f"lower --lr or --weight-decay (lr x weight decay is {options.lr * options.weight_decay:g}, at least 1)"
    return "lower --lr (or raise --warmup)"


def _is_integer(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_finite(value):
    return _is_real(value) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """How to train (the architecture, dropout included, is the Config).

    lr is the peak of the inverse-square-root schedule; clip is the global gradient norm
    (0 = off); eval_every / save_every count steps (0 = only at the end); eval_sentences
    is how many validation sentences are greedily decoded for BLEU/chrF (0: none); time_limit is
    in seconds of this session (None = none), checked between steps after the session's first.
    Every field is checked for type and range: RefformerError naming it.
    """

    steps: int = 1000
    max_tokens: int = 4096
    lr: float = 7e-4
    warmup: int = 400
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-9
    weight_decay: float = 0.01
    clip: float = 1.0
    label_smoothing: float = 0.1
    eval_every: int = 0
    eval_sentences: int = 100
    save_every: int = 0
    seed: int = 0
    time_limit: float | None = None

    # Options a resumed run may change; every other one shapes the trajectory and must match.
    RESUMABLE_CHANGES = ("steps", "eval_every", "eval_sentences", "save_every", "time_limit")

    def __post_init__(self):
        """Raises RefformerError naming the first field that is of the wrong type or out of range."""
        def need(name, ok, what):
            check(ok, f"{name} must be {what}, got {getattr(self, name)!r}")

        for name, least in (("steps", 1), ("max_tokens", 1), ("warmup", 0), ("eval_every", 0),
                            ("eval_sentences", 0), ("save_every", 0), ("seed", 0)):
            value = getattr(self, name)
            need(name, _is_integer(value) and value >= least,
                 "a positive integer" if least else "an integer >= 0")
        need("lr", _is_finite(self.lr) and self.lr > 0, "a positive finite number")
        need("eps", _is_finite(self.eps) and self.eps > 0, "a positive finite number")
        need("weight_decay", _is_finite(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0")
        need("clip", _is_finite(self.clip) and self.clip >= 0, "a finite number >= 0 (0 turns clipping off)")
        need("label_smoothing", _is_real(self.label_smoothing) and 0.0 <= self.label_smoothing < 1.0,
             "a number in [0, 1)")
        need("time_limit", self.time_limit is None or (_is_finite(self.time_limit) and self.time_limit > 0),
             "a positive finite number of seconds, or None for no limit")
        betas = self.betas
        need("betas", isinstance(betas, (tuple, list)) and len(betas) == 2
             and all(_is_real(b) and 0.0 <= b < 1.0 for b in betas), "two numbers in [0, 1)")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def to_dict(self):
        return {**dataclasses.asdict(self), "betas": list(self.betas)}

    @classmethod
    def from_dict(cls, data):
        """TrainOptions from to_dict()'s output; RefformerError for unknown or invalid fields."""
        check(isinstance(data, dict), f"training options must be a dict, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        check(not unknown, f"unknown training options {unknown}")
        return cls(**data)


@dataclasses.dataclass
class TrainResult:
    """What train returns: the final parameters and optimizer state, the log rows, and why it stopped."""

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
    check(isinstance(batch, Batch), f"batch must be a Batch (from refimpl.training.batching), got {type(batch).__name__}")
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
    check(isinstance(opt_state, dict) and _is_integer(opt_state.get("step")),
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


# ---------------------------------------------------------------------------- before any work


def check_output_dir(out_dir, *, resume=False, overwrite=False, inputs=()):
    """Refuse an output directory a training run must not write into, before any work starts.

    Raises RefformerError when out_dir is a file, is one of inputs (e.g. the data directory), cannot be
    created or written (its parent folder missing or read-only), or already holds a trained model or
    checkpoints (any of OUTPUT_NAMES, except a file that is one of inputs, e.g. the tokenizer.json being
    trained with) while neither resume nor overwrite is given, or that is a checkpoints folder or a checkpoint itself
    (latest.json, trainer_state.json, step-*); also for one of OUTPUT_NAMES of the wrong
    kind (a file named checkpoints, a folder named model.safetensors), for resume and overwrite together,
    and for resume without a checkpoint.
    """
    check(isinstance(out_dir, (str, os.PathLike)), f"out_dir must be a path, got {type(out_dir).__name__}")
    check(isinstance(resume, (bool, np.bool_)) and isinstance(overwrite, (bool, np.bool_)),
          f"resume and overwrite must be True or False, got {resume!r}, {overwrite!r}")
    check(isinstance(inputs, (list, tuple)) and all(given is None or isinstance(given, (str, os.PathLike))
                                                    for given in inputs), "inputs must be a list of paths")
    check(not (resume and overwrite), "pass either --resume (continue the run in --out) or --overwrite "
                                      "(replace it), not both")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RefformerError(f"--out {out} is a file, not a folder: name a folder for the model")
    if out.is_symlink() and not out.exists():
        raise RefformerError(f"--out {out} is a symbolic link to {os.readlink(out)}, which does not exist: create "
                             f"that folder or name another --out")
    for given in inputs:
        if given is not None and Path(given).exists() and out.exists() and out.resolve() == Path(given).resolve():
            raise RefformerError(f"--out {out} is the input {given}: write the model to a folder of its own")
    if not out.exists():
        parent = out.absolute().parent
        if not parent.is_dir():
            raise RefformerError(f"cannot create --out {out}: its parent folder {parent} does not exist")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise RefformerError(f"cannot create --out {out}: its parent folder {parent} is not writable")
        check(not resume, f"no checkpoint to resume from: {out} does not exist")
        return
    if not os.access(out, os.W_OK | os.X_OK):
        raise RefformerError(f"cannot write to --out {out}: the folder is not writable")
    checkpoint_files = sorted(path.name for path in out.iterdir()
                              if path.name in ("latest.json", STATE_FILE) or path.name.startswith("step-"))
    if checkpoint_files:  # a run's checkpoints folder, or one checkpoint: the model goes into a folder of its own
        raise RefformerError(f"--out {out} holds a training run's checkpoints ({', '.join(checkpoint_files[:3])}): "
                             f"name the run's own folder (the one above checkpoints), or a new folder")
    for name in OUTPUT_NAMES:  # with --overwrite or --resume these are written: each must be of its kind
        path = out / name
        if name == CHECKPOINT_DIR and path.exists() and not path.is_dir():
            raise RefformerError(f"{path} is a file, not a checkpoint folder: move it out of --out {out}")
        if name != CHECKPOINT_DIR and path.is_dir():
            raise RefformerError(f"{path} is a folder, not a file the model is saved as: move it out of --out {out}")
    if resume:
        pointer = out / CHECKPOINT_DIR / "latest.json"
        check(pointer.is_file(), f"no checkpoint to resume from: {pointer} is missing")
        return
    own_inputs = {Path(given).resolve() for given in inputs if given is not None and Path(given).exists()}
    found = [name for name in OUTPUT_NAMES if (out / name).exists() and (out / name).resolve() not in own_inputs]
    if found and not overwrite:
        raise RefformerError(f"--out {out} already holds a model or checkpoints ({', '.join(found)}); pass --resume "
                             f"to continue its training or --overwrite to replace it")


def estimate_batch_memory(cfg, rows, src_len, tgt_len, *, training=True, bytes_per_value=4):
    """A rough lower bound of the bytes the activations of one batch of rows x src_len / tgt_len tokens need
    (their gradients too when training), from the sizes alone. Raises RefformerError for a cfg that is not a
    Config or sizes that are not integers >= 0."""
    check(isinstance(cfg, Config), f"cfg must be a Config, got {type(cfg).__name__}")
    check(all(_is_integer(n) and n >= 0 for n in (rows, src_len, tgt_len)),
          f"rows, src_len and tgt_len must be integers >= 0, got {rows!r}, {src_len!r}, {tgt_len!r}")
    D, F, H, V = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.vocab_size
    source, target = rows * src_len, rows * tgt_len
    values = cfg.n_encoder_layers * source * (14 * D + 3 * F + 3 * H * src_len) if cfg.is_encoder_decoder else 0
    values += cfg.n_decoder_layers * target * (24 * D + 3 * F + 3 * H * (tgt_len + src_len))
    values += target * 4 * V + (source + target) * 2 * D  # logits, log-probabilities, their gradient; embeddings
    return values * (2 if training else 1) * bytes_per_value


def check_fits(cfg, batches=(), *, training=True):
    """Refuse (RefformerError) a model, or its largest batch, that cannot fit in this machine's memory.

    Call it with no batches before init_params (the parameters, and when training their gradients, AdamW
    moments and updated copies: config.check_fits_memory), then with the batches made.
    """
    check(isinstance(batches, (list, tuple)) and all(isinstance(batch, Batch) for batch in batches),
          "batches must be a list of Batch (from refimpl.training.batching.make_batches)")
    check_fits_memory(cfg, copies=TRAINING_COPIES if training else 1)
    if not batches:
        return
    limit = physical_memory_bytes()
    params = parameter_bytes(cfg) * (TRAINING_COPIES if training else 1)

    def longest(batch):
        return max(batch.tgt_ids.shape[1], 0 if batch.src_ids is None else batch.src_ids.shape[1])

    largest = max(batches, key=lambda batch: batch.n_rows * longest(batch))
    src_len = 0 if largest.src_ids is None else largest.src_ids.shape[1]
    need = params + estimate_batch_memory(cfg, largest.n_rows, src_len, largest.tgt_ids.shape[1], training=training)
    if need > limit:
        raise RefformerError(f"a batch of {largest.n_rows} rows x {longest(largest)} tokens needs about "
                             f"{need / 2 ** 30:,.1f} GiB to {'train' if training else 'evaluate'}, more than this "
                             f"machine's {limit / 2 ** 30:,.1f} GiB: lower "
                             + ("--max-tokens" if largest.n_rows > 1 else "--max-positions (one example alone is "
                                                                           "too long) or the model's size"))


# ---------------------------------------------------------------------------- evaluation


def evaluate(cfg, params, examples, *, max_tokens=4096, decode=None, references=None, max_sentences=None,
             max_translations=None):
    """Loss and perplexity on examples (triples from refimpl.training.batching), and for encoder-decoder greedy BLEU/chrF.

    decode(ids) -> text turns ids into text for BLEU/chrF (skipped without it); references are
    the reference texts aligned with examples (default: decode of each example's labels).
    max_sentences limits everything to the first N examples, max_translations only the decoded
    ones. Returns a dict: loss, ppl, tokens, sentences, bleu, chrf (None when skipped), notes.
    Raises RefformerError for a cfg that is not a Config, a count that is not an integer >= 0 (max_sentences,
    max_translations; max_tokens >= 1), a decode that is not callable, and malformed examples or references.
    """
    check(decode is None or callable(decode), f"decode must be a function ids -> text, got {type(decode).__name__}")
    check(isinstance(cfg, Config), f"cfg must be a Config, got {type(cfg).__name__}")
    for name, value in (("max_sentences", max_sentences), ("max_translations", max_translations)):
        check(value is None or (_is_integer(value) and value >= 0), f"{name} must be an integer >= 0 or None, "
                                                                   f"got {value!r}")
    check(_is_integer(max_tokens) and max_tokens >= 1, f"max_tokens must be a positive integer, got {max_tokens!r}")
    check(references is None or (isinstance(references, (list, tuple))
                                 and all(isinstance(text, str) for text in references)),
          "references must be a list of texts, one per example")
    try:
        examples = list(examples)[:max_sentences]
    except TypeError:
        raise RefformerError(f"examples must be a list of (src_ids, tgt_ids, labels) triples, "
                             f"got {type(examples).__name__}") from None
    result = {"loss": None, "ppl": None, "bleu": None, "chrf": None, "tokens": 0, "sentences": len(examples),
              "notes": []}
    if not examples:
        result["notes"].append("no evaluation examples")
        return result
    with np.errstate(all="ignore"):  # extreme weights give an inf/NaN loss in the result, not NumPy warnings
        return _evaluate(cfg, params, examples, result, max_tokens, decode, references, max_translations)


def _evaluate(cfg, params, examples, result, max_tokens, decode, references, max_translations):
    total, n_tokens = 0.0, 0
    for batch in make_batches(examples, max_tokens=max_tokens, pad_id=cfg.pad_id, shuffle_ties=False):
        logits, _ = model_forward(cfg, params, batch.src_ids, batch.tgt_ids, src_mask=batch.src_mask,
                                  tgt_mask=batch.tgt_mask)
        loss, _ = cross_entropy_forward(logits, batch.labels, ignore_id=cfg.pad_id)
        total += float(loss) * batch.n_tokens
        n_tokens += batch.n_tokens
    result["loss"] = total / max(n_tokens, 1)
    result["ppl"] = math.exp(min(result["loss"], 700.0)) if not math.isnan(result["loss"]) else math.nan
    result["tokens"] = n_tokens
    n = len(examples) if max_translations is None else min(max_translations, len(examples))
    if cfg.is_encoder_decoder and n > 0:  # max_translations=0: loss only
        refs = None if references is None else list(references)[:n]
        scores, note = translation_scores(cfg, params, examples[:n], decode, refs, max_tokens)
        result.update(scores)
        if note:
            result["notes"].append(note)
    return result


def translation_scores(cfg, params, examples, decode, references, max_tokens):
    """Greedy-decode the sources and score them with sacrebleu -> ({"bleu", "chrf"}, note or None).

    Raises RefformerError when references are given but fewer than the examples."""
    check(references is None or len(references) >= len(examples),
          f"references must have one text per example: {len(examples)} examples, "
          f"{len(references) if references is not None else 0} references")
    if decode is None:
        return {}, "BLEU/chrF skipped: no tokenizer to turn ids into text"
    try:
        import sacrebleu
    except ImportError:
        return {}, "BLEU/chrF skipped: sacrebleu is not installed (pip install 'refformer[train]')"
    hypotheses = translate_examples(cfg, params, examples, decode, max_tokens)
    if references is None:
        references = [decode(labels[:-1]) for _, _, labels in examples]
    references = list(references)[:len(examples)]
    bleu = sacrebleu.corpus_bleu(hypotheses, [references]).score
    chrf = sacrebleu.corpus_chrf(hypotheses, [references]).score
    return {"bleu": bleu, "chrf": chrf}, None


def translate_examples(cfg, params, examples, decode, max_tokens=4096):
    """Greedy translations (texts) of the examples' sources, in the examples' order, batched by length.

    Raises RefformerError for a decode that is not callable and for decoder-only examples."""
    check(callable(decode), f"decode must be a function ids -> text, got {type(decode).__name__}")
    check(all(isinstance(e, (tuple, list)) and len(e) == 3 and e[0] is not None for e in examples),
          "translate_examples needs (src_ids, tgt_ids, labels) examples of an encoder-decoder model")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    hypotheses = [None] * len(examples)
    start = 0
    while start < len(order):
        longest = len(examples[order[min(start + 63, len(order) - 1)]][0])
        rows = max(1, min(64, max_tokens // (3 * longest)))  # source + roughly twice as many generated
        chunk = order[start:start + rows]
        batch = collate([(examples[i][0], [cfg.bos_id], [cfg.eos_id]) for i in chunk], pad_id=cfg.pad_id)
        for i, ids in zip(chunk, strip(greedy(cfg, params, batch.src_ids, batch.src_mask), cfg)):
            hypotheses[i] = decode(ids)
        start += len(chunk)
    return hypotheses


# ---------------------------------------------------------------------------- checkpoints


def save_checkpoint(out_dir, cfg, params, opt_state, state):
    """Write OUT/checkpoints/step-N atomically, point latest.json at it, then delete older ones.

    state: the JSON-able rest (step, rng, position, options, data fingerprint, elapsed, log).
    Raises RefformerError for a state that is not a dict or an opt_state without its step.
    """
    check(isinstance(state, dict), f"state must be a dict, got {type(state).__name__}")
    check(isinstance(opt_state, dict) and _is_integer(opt_state.get("step")) and "m" in opt_state
          and "v" in opt_state, "opt_state must be the optimizer state from refimpl.optim.adamw_init")
    root = Path(out_dir) / CHECKPOINT_DIR
    root.mkdir(parents=True, exist_ok=True)
    with interrupts_deferred():  # Ctrl-C lands after the save, never between the rename and the pointer
        final = _save_checkpoint(root, cfg, params, opt_state, state)
    for old in [*root.glob("step-*"), *root.glob(".step-*.tmp")]:  # older ones, and leftovers of a crash
        if old.name != final.name:
            shutil.rmtree(old, ignore_errors=True)
    for old in root.glob(".latest.json.*.tmp"):  # a pointer written by a process killed before its rename
        old.unlink(missing_ok=True)
    return final


@contextlib.contextmanager
def interrupts_deferred():
    """Hold SIGINT (Ctrl-C) for the duration: its handler (KeyboardInterrupt) runs when the block ends, never
    halfway through the file switches inside it. Outside the main thread (which Python's handlers run in), a no-op.

    A Python-level handler rather than a signal mask: the signal may be delivered to any thread (BLAS threads
    included), and Python then raises in the main thread at once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if caught and callable(previous):
            previous(signal.SIGINT, caught[0])  # Python's default handler raises KeyboardInterrupt here
        elif caught and previous == signal.SIG_DFL:
            signal.raise_signal(signal.SIGINT)


def _pointed_at(root):
    """The folder name latest.json names, or None when it is missing or unreadable."""
    try:
        return json.loads((root / "latest.json").read_text())["dir"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None


def _save_checkpoint(root, cfg, params, opt_state, state):
    from safetensors.numpy import save_file

    name = f"step-{opt_state['step']:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    final = None
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in flatten(params).items()}, tmp / "model.safetensors")
        moments = {f"{which}.{k}": np.ascontiguousarray(v)
                   for which in ("m", "v") for k, v in flatten(opt_state[which]).items()}
        save_file(moments, tmp / "optimizer.safetensors")
        full_state = {"format": "refformer-checkpoint", "format_version": CHECKPOINT_FORMAT,
                      "step": opt_state["step"], "config": cfg.to_dict(), **state,
                      "sha256": {f: sha256(tmp / f) for f in ("model.safetensors", "optimizer.safetensors")}}
        (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=1) + "\n")
        final, copy = root / name, 1
        while final.exists():  # the same step saved again (after a final evaluation): never overwrite
            copy += 1
            final = root / f"{name}-{copy}"
        tmp.rename(final)
        pointer = json.dumps({"dir": final.name, "step": opt_state["step"]}) + "\n"
        atomic_write(root / "latest.json", lambda path: Path(path).write_text(pointer))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if final is not None and _pointed_at(root) != final.name:  # renamed but never pointed to
            shutil.rmtree(final, ignore_errors=True)
        raise
    return final


def load_checkpoint(out_dir):
    """Read the latest checkpoint of OUT -> (cfg, params, opt_state, state); RefformerError if missing or corrupt.

    When latest.json names a folder that is gone (a save interrupted by an earlier version), the newest complete
    step-* folder is used.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    root = Path(out_dir) / CHECKPOINT_DIR
    pointer = root / "latest.json"
    if not pointer.is_file():
        raise RefformerError(f"no checkpoint to resume from: {pointer} is missing")
    try:
        where = root / json.loads(pointer.read_text())["dir"]
        if not where.is_dir():  # a save interrupted by an older version: use the newest complete checkpoint
            complete = sorted(path for path in root.glob("step-*") if (path / STATE_FILE).is_file())
            check(complete, f"no checkpoint to resume from: {pointer} names {where.name}, which is missing")
            where = complete[-1]
        state = json.loads((where / STATE_FILE).read_text())
        check(isinstance(state, dict) and state.get("format") == "refformer-checkpoint"
              and state.get("format_version") == CHECKPOINT_FORMAT,
              f"{where} is not a refformer checkpoint of format {CHECKPOINT_FORMAT}")
        _check_state(state, where / STATE_FILE)
        for file, digest in state["sha256"].items():
            check(sha256(where / file) == digest, f"{where / file} is corrupt (its sha256 does not match)")
        cfg = Config.from_dict(state.pop("config"))
        params = unflatten_checked(cfg, load_file(where / "model.safetensors"), str(where / "model.safetensors"))
        moments = load_file(where / "optimizer.safetensors")
    except RefformerError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError, SafetensorError) as error:
        raise RefformerError(f"the checkpoint in {root} is unreadable or corrupt: {error}") from None
    try:
        opt_state = {"step": state["step"],
                     **{which: unflatten({k: moments[f"{which}.{k}"] for k in flatten(params)}, params)
                        for which in ("m", "v")}}
    except KeyError as error:
        raise RefformerError(f"the checkpoint in {root} lacks optimizer moment {error}") from None
    return cfg, params, opt_state, state


def _check_state(state, path):
    """RefformerError naming the field of a trainer_state.json (not covered by the sha256s) of the wrong kind."""
    def need(ok, what):
        check(ok, f"{path} is damaged: {what}; train into a new --out (or --overwrite)")

    need(_is_integer(state.get("step")) and state["step"] >= 0, "step must be an integer >= 0")
    need(isinstance(state.get("sha256"), dict) and set(state["sha256"]) == {"model.safetensors",
                                                                           "optimizer.safetensors"},
         "sha256 must name model.safetensors and optimizer.safetensors")
    need(isinstance(state.get("config"), dict) and isinstance(state.get("options"), dict), "config and options "
                                                                                          "must be objects")
    need(isinstance(state.get("rng"), dict), "rng must be an object")
    position = state.get("position")
    need(isinstance(position, list) and len(position) == 2 and all(_is_integer(v) and v >= 0 for v in position),
         "position must be two integers >= 0")
    need(isinstance(state.get("data_fingerprint"), str), "data_fingerprint must be a string")
    need(_is_finite(state.get("elapsed")) and state["elapsed"] >= 0, "elapsed must be a number of seconds >= 0")
    log = state.get("log")
    need(isinstance(log, list) and all(isinstance(row, dict) and set(row) == set(LOG_COLUMNS)
                                       and all(value is None or _is_real(value) for value in row.values())
                                       for row in log), f"log must be a list of rows of {', '.join(LOG_COLUMNS)}")
    need(all(_is_integer(row["step"]) for row in log) and [row["step"] for row in log] == list(
        range(state["step"] - len(log) + 1, state["step"] + 1)), "the log's steps must end at the checkpoint's step")


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


# ---------------------------------------------------------------------------- the log


def _check_finite(params, step):
    """TrainingDiverged unless every parameter is finite (checked before anything is written)."""
    for name, value in flatten(params).items():
        if not np.isfinite(value).all():
            raise TrainingDiverged(step, f"parameter {name}", "not finite")


def _check_path(path):
    """A file path is a str or os.PathLike: an integer would be taken as an open file descriptor (and closed)."""
    check(isinstance(path, (str, os.PathLike)), f"path must be a file path, got {type(path).__name__}")


def _evaluated(log):
    return sum(row["valid_loss"] is not None for row in log)


def write_log(path, log):
    """train_log.csv: one row per step, empty cells where nothing was measured (written atomically).

    Raises RefformerError unless log is a list of dicts (rows of LOG_COLUMNS)."""
    _check_path(path)
    check(isinstance(log, list) and all(isinstance(row, dict) for row in log), "log must be a list of dict rows")
    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
            writer.writeheader()
            for row in log:
                writer.writerow({k: "" if row.get(k) is None else row[k] for k in LOG_COLUMNS})

    atomic_write(path, write)


def read_log(path):
    """The rows of a train_log.csv as dicts of floats (None for empty cells).

    Raises RefformerError for a file that is missing, unreadable, or holds a cell that is not a number."""
    _check_path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return [{k: (None if v == "" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError) as error:
        raise RefformerError(f"cannot read the training log {path}: {error}") from None
    except (ValueError, TypeError) as error:
        raise RefformerError(f"{path} is not a training log of numbers: {error}") from None


def plot_log(path, log):
    """loss.png: training and validation loss against step. Returns False when matplotlib is missing.

    Raises RefformerError unless log is a list of rows with step, loss and valid_loss."""
    _check_path(path)
    check(isinstance(log, list) and all(isinstance(row, dict) and {"step", "loss", "valid_loss"} <= set(row)
                                        for row in log), "log must be a list of rows with step, loss and valid_loss")
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no global backend
    except ImportError:
        return False
    figure = Figure(figsize=(7, 4), dpi=100)
    axes = figure.add_subplot()
    axes.plot([r["step"] for r in log], [r["loss"] for r in log], lw=0.8, label="train (label-smoothed)")
    valid = [r for r in log if r["valid_loss"] is not None]
    if valid:
        axes.plot([r["step"] for r in valid], [r["valid_loss"] for r in valid], "o-", label="valid")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats/token)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    return True
