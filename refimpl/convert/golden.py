"""Golden files for people checking their own kernels: fixed inputs, every intermediate activation
and every gradient of a model, by dotted name, in float64."""

import io
import json
from pathlib import Path

import numpy as np

from ..config import Config, check_fits_memory, physical_memory_bytes
from ..errors import RefformerError, check, check_number, check_seed
from ..io import atomic_write, load, load_config
from ..loss import cross_entropy_backward, cross_entropy_forward
from ..model import model_backward, model_forward
from ..tree import flatten, tree_cast


def golden_inputs(cfg, seed, batch_size=2, length=6):
    """Fixed random inputs: src/tgt ids with the last row padded at the end, and next-token labels. A null special
    id is left out: no bos first without bos_id, no padding without pad_id, an ordinary last label without eos_id.

    Raises RefformerError for a seed that is not an integer >= 0, or a batch_size or length below 1.
    """
    check(isinstance(cfg, Config), f"cfg must be a refformer Config, got {type(cfg).__name__}")
    rng = np.random.default_rng(check_seed("seed", seed))
    check_number("batch_size", batch_size, 1, integer=True)
    check_number("length", length, 1, integer=True)
    check(batch_size * min(length, cfg.max_positions) * 8 * 4 <= physical_memory_bytes(),
          f"golden inputs of {batch_size} x {length} do not fit in this machine's memory")
    length = min(length, cfg.max_positions)
    specials = {cfg.pad_id, cfg.bos_id, cfg.eos_id, cfg.unk_id} - {None}
    ordinary = np.array([i for i in range(cfg.vocab_size) if i not in specials] or [cfg.fill_id])
    src = rng.choice(ordinary, (batch_size, length))
    tgt = rng.choice(ordinary, (batch_size, length))
    if cfg.bos_id is not None:  # a model without bos starts from an ordinary token
        tgt[:, 0] = cfg.bos_id
    if length > 2 and cfg.pad_id is not None:  # without pad_id every token is real (model.token_keep_mask)
        src[-1, -2:] = cfg.pad_id
        tgt[-1, -1] = cfg.pad_id
    last = cfg.eos_id if cfg.eos_id is not None else rng.choice(ordinary)
    labels = np.concatenate([tgt[:, 1:], np.full((batch_size, 1), last)], axis=1)
    if cfg.pad_id is not None:
        labels[tgt == cfg.pad_id] = cfg.pad_id
    inputs = {"tgt_ids": tgt, "labels": labels}
    if cfg.is_encoder_decoder:
        inputs["src_ids"] = src
    return inputs


def golden(cfg, params, seed=0, label_smoothing=0.0):
    """{name: float64 array}: inputs.*, activations.* (every cached intermediate), logits, loss, grads.*.

    Raises RefformerError for a negative seed, a bad label_smoothing, or params that do not match cfg.
    """
    check_seed("seed", seed)
    check(isinstance(cfg, Config), f"cfg must be a refformer Config, got {type(cfg).__name__}")
    check_fits_memory(cfg, np.float64, copies=2)  # the float64 parameters and their gradients
    params = tree_cast(params, np.float64)
    inputs = golden_inputs(cfg, seed)
    logits, cache = model_forward(cfg, params, inputs.get("src_ids"), inputs["tgt_ids"])
    loss, loss_cache = cross_entropy_forward(logits, inputs["labels"], ignore_id=cfg.pad_id,
                                             label_smoothing=label_smoothing)
    grads = model_backward(cfg, params, cache, cross_entropy_backward(loss_cache))
    out = {f"inputs.{name}": value for name, value in inputs.items()}
    for name, value in flatten(cache).items():
        if value.dtype.kind == "f":
            out[f"activations.{name}"] = value
    out["logits"] = logits
    out["loss"] = np.asarray(loss, dtype=np.float64)
    out.update({f"grads.{name}": value for name, value in flatten(grads).items()})
    return out


def write_golden(model_dir, out_path, seed=0, overwrite=True):
    """Load model_dir in float64 and write golden(...) with the config (as JSON text) to out_path (.npz).

    Raises RefformerError, before loading the weights, for a negative seed, a missing output folder, an out_path
    that is not a regular file (a device, a pipe), or a model whose float64 parameters and gradients cannot fit in
    memory. A symbolic link out_path is written through. overwrite=False: an out_path that another process created
    while this one computed is not replaced (RefformerError).
    """
    check_seed("seed", seed)
    out_path = Path(out_path)
    if not out_path.parent.is_dir():  # before the forward and backward passes, which take a while
        raise RefformerError(f"output folder {out_path.parent} does not exist")
    if out_path.exists() and not out_path.is_file():
        raise RefformerError(f"{out_path} is not a regular file (a device, a pipe or a folder); give a file name")
    check_fits_memory(load_config(model_dir), np.float64, copies=2)
    cfg, params = load(model_dir, dtype=np.float64)
    arrays = golden(cfg, params, seed)
    arrays["config_json"] = np.array(cfg.to_json())
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write(out_path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()), replace=overwrite)
    return arrays


def describe(arrays):
    """A short summary: how many arrays of each group, for the CLI.

    arrays: {dotted name: array}. Raises nothing.
    """
    groups = {}
    for name in arrays:
        groups[name.split(".")[0]] = groups.get(name.split(".")[0], 0) + 1
    return json.dumps(groups)
