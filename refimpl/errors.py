"""The one exception type users see, the small argument checks that raise it, and the machine's memory that size
checks compare to (physical_memory_bytes)."""

import contextlib
import math
import numbers
import os

import numpy as np

FALLBACK_MEMORY_BYTES = 1 << 40  # where the OS does not say how much memory there is


class RefformerError(ValueError):
    """Bad input to refformer: the message says what was wrong and what was expected.

    A ValueError, so callers that catch ValueError catch it too; raised by the checks throughout refimpl, export and
    runtime, and printed by the CLI as `error: MESSAGE` (runtime/errors.py).
    """


def physical_memory_bytes():
    """This machine's physical memory in bytes (os.sysconf), or FALLBACK_MEMORY_BYTES where the OS does not say:
    the limit that the checks here and config.check_fits_memory compare sizes to.

    An int. Raises nothing: an OS that cannot say gives the fallback.
    """
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return FALLBACK_MEMORY_BYTES
    return total if total > 0 else FALLBACK_MEMORY_BYTES


def check(condition, message):
    """Raise RefformerError(message) unless condition holds."""
    if not condition:
        raise RefformerError(message)


def check_array(name, x, ndim=None, shape=None, kind=None, dtype=None):
    """Check an argument's type, rank, shape (None entries match anything), dtype kind and exact dtype.

    kind: "f" floating, "i" integer ("i" also accepts unsigned), "b" boolean. Raises RefformerError naming the
    argument for a non-array, another rank, shape, kind or dtype, or an array (a broadcast view) whose size is
    beyond this machine's memory.
    """
    if not isinstance(x, np.ndarray):
        raise RefformerError(f"{name} must be a numpy array, got {type(x).__name__}")
    if x.nbytes > 1 << 30:  # a broadcast view (np.broadcast_to) can be far larger than the memory it uses
        check(x.nbytes <= physical_memory_bytes(), f"{name} of shape {list(x.shape)} is larger than this machine's "
                                                   f"memory ({x.nbytes / 2 ** 30:,.0f} GiB): results of its size "
                                                   f"cannot be made")
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


def check_number(name, value, low=None, high=None, *, low_open=False, high_open=False, integer=False):
    """value must be a real number (an integer where integer=True; not a bool, NaN or inf) in [low, high], the ends
    open with low_open / high_open and left out when None; returns it.

    Raises RefformerError naming the argument and the requirement: `top_k must be an integer >= 0, got 1.5`,
    `top_p must be in (0, 1], got 2`. An integer too large for a float (10**400) is an integer, not a finite float.
    """
    if low is not None and high is not None:
        where = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        where = f"{'>' if low_open else '>='} {low}"
    elif high is not None:
        where = f"{'<' if high_open else '<='} {high}"
    else:
        where = ""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, kind) or not is_finite(value, integer):
        word = "an integer" if integer else "a finite number"
        raise RefformerError(f"{name} must be {word}{' ' + where if where else ''}, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise RefformerError(f"{name} must be {where}, got {value!r}")
    return value


def is_integer(value):
    """True for an int or NumPy integer, False for bool (and np.bool_) and everything else.

    Raises nothing.
    """
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value):
    """True for an int, float or NumPy number (not bool), whatever its value (NaN and inf included).

    Raises nothing.
    """
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def is_finite(value, integer=False):
    """math.isfinite for any real number, without its OverflowError: an integer too large for a float (10**400) is
    finite as an integer (integer=True) and not where a float is wanted (it would overflow).

    Raises TypeError (math.isfinite's) for a value that is not a real number; its callers check the type first.
    """
    try:
        return math.isfinite(value)
    except OverflowError:
        return integer


def check_rng(name, rng, allow_none=True):
    """Raises RefformerError naming the argument unless rng is a numpy.random.Generator (or None where
    allow_none)."""
    if rng is None and allow_none:
        return
    if not isinstance(rng, np.random.Generator):
        raise RefformerError(f"{name} must be a numpy.random.Generator (np.random.default_rng(seed))"
                             f"{' or None' if allow_none else ''}, got {type(rng).__name__}")


def check_seed(name, seed):
    """A seed must be an integer >= 0 (numpy refuses negative seeds with its own error); returns it as an int.
    Raises RefformerError naming the argument otherwise."""
    return int(check_number(name, seed, 0, integer=True))


def check_tree(what, tree, spec):
    """tree must have exactly spec's structure (nested dicts and lists) with floating arrays of spec's shapes.

    spec's leaves are shape tuples (None entries match any size). Raises RefformerError for a missing or extra
    entry, a list of another length, or a leaf of another shape or a non-floating one, named dotted:
    p.q_proj.weight.
    """
    if isinstance(spec, dict):
        if not isinstance(tree, dict):
            raise RefformerError(f"{what} must be a dict of parameters, got {type(tree).__name__}")
        missing = [key for key in spec if key not in tree]
        check(not missing, f"{what} has no {missing[0]!r} (expected {', '.join(map(str, spec))})" if missing else "")
        extra = [str(key) for key in tree if key not in spec]
        check(not extra, f"{what} has unexpected entries {extra} (expected {', '.join(map(str, spec))})")
        for key, value in spec.items():
            check_tree(f"{what}.{key}", tree[key], value)
    elif isinstance(spec, list):
        if not isinstance(tree, list) or len(tree) != len(spec):
            got = f"{len(tree)} entries" if isinstance(tree, list) else type(tree).__name__
            raise RefformerError(f"{what} must be a list of {len(spec)} entries, got {got}")
        for i, (item, item_spec) in enumerate(zip(tree, spec)):
            check_tree(f"{what}.{i}", item, item_spec)
    else:
        check_array(what, tree, shape=spec, kind="f")


def check_upstream(name, dy, shape):
    """Raises RefformerError naming the argument unless dy (an upstream gradient) is a floating array of the
    forward output's shape."""
    check_array(name, dy, shape=shape, kind="f")


@contextlib.contextmanager
def reading_cache(what):
    """Around a backward's use of its cache: a cache that is not the one `what` returned (a dict with entries
    missing or replaced) raises RefformerError instead of a KeyError or TypeError from inside."""
    try:
        yield
    except RefformerError:
        raise
    except (KeyError, TypeError, IndexError, AttributeError, ValueError) as error:
        raise RefformerError(f"cache must be the cache {what} returned ({type(error).__name__}: {error})") from error
