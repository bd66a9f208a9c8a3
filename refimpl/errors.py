"""The one exception type users see, and the small argument checks that raise it."""

import numpy as np


class RefformerError(ValueError):
    """Bad input to refformer: the message says what was wrong and what was expected."""


def check(condition, message):
    """Raise RefformerError(message) unless condition holds."""
    if not condition:
        raise RefformerError(message)


def check_array(name, x, ndim=None, shape=None, kind=None, dtype=None):
    """Check an argument's type, rank, shape (None entries match anything) and dtype kind.

    kind: "f" floating, "i" integer ("i" also accepts unsigned), "b" boolean.
    """
    if not isinstance(x, np.ndarray):
        raise RefformerError(f"{name} must be a numpy array, got {type(x).__name__}")
    if ndim is not None and x.ndim != ndim:
        raise RefformerError(f"{name} must have {ndim} dimensions, got shape {x.shape}")
    if shape is not None:
        expected = tuple(shape)
        if len(expected) != x.ndim or any(e is not None and e != s for e, s in zip(expected, x.shape)):
            shown = "[" + ", ".join("*" if e is None else str(e) for e in expected) + "]"
            raise RefformerError(f"{name} must have shape {shown}, got {list(x.shape)}")
    if kind is not None:
        kinds = {"f": "f", "i": "iu", "b": "b"}[kind]
        if x.dtype.kind not in kinds:
            word = {"f": "floating-point", "i": "integer", "b": "boolean"}[kind]
            raise RefformerError(f"{name} must be {word}, got dtype {x.dtype}")
    if dtype is not None and x.dtype != dtype:
        raise RefformerError(f"{name} has dtype {x.dtype} but the parameters are {np.dtype(dtype)}")
