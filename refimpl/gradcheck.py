"""The error metric of the correctness chain and a centred finite-difference gradient check."""

import numpy as np

from .errors import RefformerError, check, check_array, check_number, check_rng


def rel_error(a, b):
    """max|a - b| / max(max|b|, 1e-30): the max-norm relative error of a against reference b, a Python float
    computed in float64 (0.0 for empty arrays); the metric of the correctness chain (docs/DESIGN.md).

    Raises RefformerError when a and b are not numeric or differ in shape.
    """
    for name, value in (("a", a), ("b", b)):  # a broadcast view larger than memory: float64 copies cannot fit
        if isinstance(value, np.ndarray):
            check_array(name, np.broadcast_to(np.zeros((), np.float64), value.shape))
    try:
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
    except (TypeError, ValueError):
        raise RefformerError("rel_error needs two numeric arrays") from None
    if a.shape != b.shape:
        raise RefformerError(f"rel_error: shapes differ: {a.shape} vs {b.shape}")
    if a.size == 0:
        return 0.0
    with np.errstate(over="ignore", invalid="ignore"):
        difference = np.max(np.abs(a - b))
    if np.isinf(difference) and np.isfinite(a).all() and np.isfinite(b).all():  # a - b beyond the float range
        return float(np.max(np.abs(a * 0.5 - b * 0.5)) / max(float(np.max(np.abs(b))) * 0.5, 0.5e-30))
    return float(difference / max(float(np.max(np.abs(b))), 1e-30))


def _scalar(f):
    """f() as a float; RefformerError when it is not a number."""
    value = f()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RefformerError(f"f must return a number, got {type(value).__name__}") from None


def numerical_gradient(f, x, eps=1e-6, max_entries=None, rng=None):
    """Centred differences (f(x + eps e_i) - f(x - eps e_i)) / 2 eps of the scalar f() wrt array x.

    x is perturbed in place and restored (also when f raises). The divisor is the step x's dtype actually took
    (x + eps rounds in float32), not 2 eps (2 eps for an entry that is inf). With max_entries, only that many
    randomly chosen entries are checked; returns (indices, gradient at those indices) in x.ravel() order.
    Raises RefformerError unless f is callable, x a contiguous floating array, eps > 0 and max_entries >= 1, and
    when eps is too small to change an entry of x in its dtype.
    """
    check(callable(f), "f must be a function of no arguments returning a number")
    check_array("x", x, kind="f")
    check(x.flags.c_contiguous, "x must be C-contiguous (it is perturbed through x.reshape(-1))")
    check_number("eps", eps, 0.0, float(np.finfo(x.dtype).max) / 4, low_open=True)  # x +- eps stays finite
    if max_entries is not None:
        check_number("max_entries", max_entries, 1, integer=True)
    check_rng("rng", rng)
    flat = x.reshape(-1)
    if max_entries is None or flat.size <= max_entries:
        indices = np.arange(flat.size)
    else:
        indices = np.sort((rng or np.random.default_rng(0)).choice(flat.size, max_entries, replace=False))
    grad = np.empty(len(indices))
    for n, i in enumerate(indices):
        old = flat[i]
        try:
            flat[i] = old + eps
            up = float(flat[i])
            plus = _scalar(f)
            flat[i] = old - eps
            down = float(flat[i])
            minus = _scalar(f)
        finally:
            flat[i] = old
        if not np.isfinite(old):  # an inf entry (a masked score) does not move: its difference is 0 or NaN
            grad[n] = (plus - minus) / (2 * eps)
            continue
        check(up > down, f"eps={eps} is too small to change x's entry {i} ({float(old)!r}) in {x.dtype}: pass a "
                         "larger eps")
        grad[n] = (plus - minus) / (up - down)
    return indices, grad
