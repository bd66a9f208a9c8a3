"""The training log: train_log.csv (one row per step, written atomically) and its plot, loss.png."""

import csv
import os

from ..errors import RefformerError, check
from ..io import atomic_write

LOG_COLUMNS = ("step", "loss", "lr", "tokens_per_s", "valid_loss", "valid_ppl", "bleu", "chrf", "elapsed")
LOG_FILE = "train_log.csv"
PLOT_FILE = "loss.png"


def _check_path(path):
    """A file path is a str or os.PathLike: an integer would be taken as an open file descriptor (and closed)."""
    check(isinstance(path, (str, os.PathLike)), f"path must be a file path, got {type(path).__name__}")


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
