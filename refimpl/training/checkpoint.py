"""Checkpoints that resume a run exactly, as safetensors + JSON (never pickle):

    OUT/checkpoints/latest.json            {"dir": "step-00000100", "step": 100}, replaced atomically
    OUT/checkpoints/step-00000100/         model.safetensors, optimizer.safetensors, trainer_state.json

A new checkpoint is written into a temporary folder, renamed into place, and only then does latest.json point to
it; a failure at any moment leaves the previous one in use. trainer_state.json holds the rest of what decides the
next step: the step, the config and options, the dropout Generator's state, the data position (epoch, index), the
data fingerprint, the elapsed seconds and the log rows so far.
"""

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..config import Config
from ..errors import RefformerError, check, is_integer, is_real
from ..io import WEIGHTS_FILE, atomic_write, sha256, unflatten_checked
from ..tree import flatten, unflatten
from .interrupts import interrupts_deferred
from .log import LOG_COLUMNS
from .options import is_finite

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"  # the Adam moments of a checkpoint
LATEST_FILE = "latest.json"  # OUT/checkpoints/latest.json: the newest complete checkpoint
CHECKPOINT_FORMAT = 1


def save_checkpoint(out_dir, cfg, params, opt_state, state):
    """Write OUT/checkpoints/step-N atomically, point latest.json at it, then delete older ones.

    state: the JSON-able rest (step, rng, position, options, data fingerprint, elapsed, log).
    Raises RefformerError for a state that is not a dict or an opt_state without its step.
    """
    check(isinstance(state, dict), f"state must be a dict, got {type(state).__name__}")
    check(isinstance(opt_state, dict) and is_integer(opt_state.get("step")) and "m" in opt_state
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


def latest_step(out_dir):
    """The step of out_dir's latest checkpoint (what latest.json names), or None when there is none or latest.json
    is unreadable.

    Raises nothing: an unreadable latest.json gives None.
    """
    try:
        return json.loads((Path(out_dir) / CHECKPOINT_DIR / LATEST_FILE).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None


def _pointed_at(root):
    """The folder name latest.json names, or None when it is missing or unreadable."""
    try:
        return json.loads((root / LATEST_FILE).read_text())["dir"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None


def _save_checkpoint(root, cfg, params, opt_state, state):
    from safetensors.numpy import save_file

    name = f"step-{opt_state['step']:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    final = None
    try:
        save_file({k: np.ascontiguousarray(v) for k, v in flatten(params).items()}, tmp / WEIGHTS_FILE)
        moments = {f"{which}.{k}": np.ascontiguousarray(v)
                   for which in ("m", "v") for k, v in flatten(opt_state[which]).items()}
        save_file(moments, tmp / OPTIMIZER_FILE)
        full_state = {"format": "refformer-checkpoint", "format_version": CHECKPOINT_FORMAT,
                      "step": opt_state["step"], "config": cfg.to_dict(), **state,
                      "sha256": {f: sha256(tmp / f) for f in (WEIGHTS_FILE, OPTIMIZER_FILE)}}
        (tmp / STATE_FILE).write_text(json.dumps(full_state, indent=1) + "\n")
        final, copy = root / name, 1
        while final.exists():  # the same step saved again (after a final evaluation): never overwrite
            copy += 1
            final = root / f"{name}-{copy}"
        tmp.rename(final)
        pointer = json.dumps({"dir": final.name, "step": opt_state["step"]}) + "\n"
        atomic_write(root / LATEST_FILE, lambda path: Path(path).write_text(pointer))
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
    pointer = root / LATEST_FILE
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
        params = unflatten_checked(cfg, load_file(where / WEIGHTS_FILE), str(where / WEIGHTS_FILE))
        moments = load_file(where / OPTIMIZER_FILE)
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

    need(is_integer(state.get("step")) and state["step"] >= 0, "step must be an integer >= 0")
    need(isinstance(state.get("sha256"), dict) and set(state["sha256"]) == {WEIGHTS_FILE, OPTIMIZER_FILE},
         "sha256 must name model.safetensors and optimizer.safetensors")
    need(isinstance(state.get("config"), dict) and isinstance(state.get("options"), dict), "config and options "
                                                                                          "must be objects")
    need(isinstance(state.get("rng"), dict), "rng must be an object")
    position = state.get("position")
    need(isinstance(position, list) and len(position) == 2 and all(is_integer(v) and v >= 0 for v in position),
         "position must be two integers >= 0")
    need(isinstance(state.get("data_fingerprint"), str), "data_fingerprint must be a string")
    need(is_finite(state.get("elapsed")) and state["elapsed"] >= 0, "elapsed must be a number of seconds >= 0")
    log = state.get("log")
    need(isinstance(log, list) and all(isinstance(row, dict) and set(row) == set(LOG_COLUMNS)
                                       and all(value is None or is_real(value) for value in row.values())
                                       for row in log), f"log must be a list of rows of {', '.join(LOG_COLUMNS)}")
    need(all(is_integer(row["step"]) for row in log) and [row["step"] for row in log] == list(
        range(state["step"] - len(log) + 1, state["step"] + 1)), "the log's steps must end at the checkpoint's step")
