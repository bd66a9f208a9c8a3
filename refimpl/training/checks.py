"""Before any work: the checks a run makes before it trains or evaluates (an output folder it may write, a model
and batches that fit in memory)."""

import os
from pathlib import Path

import numpy as np

from ..config import Config, check_fits_memory, parameter_bytes, physical_memory_bytes
from ..errors import RefformerError, check, is_integer
from ..io import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
from .batching import Batch
from .checkpoint import CHECKPOINT_DIR, STATE_FILE
from .log import LOG_FILE, PLOT_FILE

TRAINING_COPIES = 7  # parameters, gradients, two AdamW moments, and the three updated trees
# What a training run writes into its output directory; a folder holding any of these holds a (trained) model.
OUTPUT_NAMES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, LOG_FILE, PLOT_FILE, CHECKPOINT_DIR)


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
    check(all(is_integer(n) and n >= 0 for n in (rows, src_len, tgt_len)),
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
