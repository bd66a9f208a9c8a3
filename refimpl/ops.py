"""Elementwise and row-wise building blocks, each a forward/backward pair: linear, embedding, the sinusoidal
position table, LayerNorm and RMSNorm, the activations, dropout, softmax and log-softmax.

Every forward returns (y, cache) where cache is a tuple of the saved arrays (composite layers elsewhere keep dicts
that name their activations); every backward takes (p, cache, dy) for layers with parameters and (cache, dy) for
those without, and returns the input gradient(s) and, for layers with parameters, dp with exactly p's keys.
Arrays are floating (float32 or float64; the output has the input's dtype). Shapes: D features, V vocabulary.
"""

import math

import numpy as np

from .errors import RefformerError, check, check_array, check_number, check_rng, check_upstream, physical_memory_bytes


def check_weights(p, *, ndim, bias=True, what="p"):
    """p must be {"weight": floating [ndim dims], "bias": [its last dim] (optional when bias, else refused)}.

    Raises RefformerError naming `what` otherwise."""
    if not isinstance(p, dict):
        raise RefformerError(f"{what} must be a dict with a 'weight' array, got {type(p).__name__}")
    check("weight" in p, f"{what} has no 'weight'")
    extra = sorted(str(key) for key in p if key not in (("weight", "bias") if bias else ("weight",)))
    check(not extra, f"{what} has unexpected entries {extra}")
    check_array(f"{what}['weight']", p["weight"], ndim=ndim, kind="f")
    if "bias" in p:
        check_array(f"{what}['bias']", p["bias"], shape=p["weight"].shape[-1:], kind="f", dtype=p["weight"].dtype)


def check_cache(cache, n, what):
    """Raises RefformerError unless cache is a tuple of n entries, as the forward `what` returned it."""
    check(isinstance(cache, tuple) and len(cache) == n, f"cache must be the cache {what} returned")


def check_features(name, x, weight):
    """x must be floating, of the weight's dtype, with last axis = weight's rows (the features a layer reads).

    Raises RefformerError naming `name` otherwise."""
    check_array(name, x, kind="f", dtype=weight.dtype)
    check(x.ndim >= 1 and x.shape[-1] == weight.shape[0],
          f"{name} must have {weight.shape[0]} features in its last axis, got shape {list(x.shape)}")


# ---------------------------------------------------------------------------- linear


def linear_forward(p, x):
    """y = x @ W + b. x [..., Din], W [Din, Dout], b [Dout] (optional) -> y [..., Dout].

    Raises RefformerError for a p without a [Din, Dout] weight or an x of another width or dtype.
    """
    check_weights(p, ndim=2)
    check_features("x", x, p["weight"])
    # One [N, Din] @ [Din, Dout] product over all N leading positions: a stacked x @ W would make
    # NumPy call BLAS once per leading index ([T, Din] each), several times slower.
    x2 = x.reshape(-1, x.shape[-1])  # [..., Din] -> [N, Din]
    y = (x2 @ p["weight"]).reshape(x.shape[:-1] + p["weight"].shape[1:])  # [N, Dout] -> [..., Dout]
    if "bias" in p:
        y = y + p["bias"]
    return y, (x,)


def linear_backward(p, cache, dy):
    """Inverts y = x @ W + b: returns dx, {"weight": dW, "bias": db} ("bias" only when p has one).

    Raises RefformerError for a p, cache or dy that does not match the forward.
    """
    check_weights(p, ndim=2)
    check_cache(cache, 1, "linear_forward")
    (x,) = cache
    check_upstream("dy", dy, x.shape[:-1] + p["weight"].shape[1:])
    x2 = x.reshape(-1, x.shape[-1])  # [N, Din]
    dy2 = dy.reshape(-1, dy.shape[-1])  # [N, Dout]
    dx = (dy2 @ p["weight"].T).reshape(x.shape)  # [N, Din] -> [..., Din], one product as in the forward
    dp = {"weight": x2.T @ dy2}
    if "bias" in p:
        dp["bias"] = dy2.sum(axis=0)
    return dx, dp


# ---------------------------------------------------------------------------- embedding


def embedding_forward(p, ids):
    """Row lookup: ids [...] integer, weight [V, D] -> y [..., D] = weight[ids], in the weight's dtype.

    Raises RefformerError for a p other than {"weight" [V, D]}, non-integer ids, or ids outside [0, V).
    """
    check_weights(p, ndim=2, bias=False)
    check_array("ids", ids, kind="i")
    V = p["weight"].shape[0]
    check(ids.size == 0 or (ids.min() >= 0 and ids.max() < V), f"ids must hold token ids in [0, {V})")
    return p["weight"][ids], (ids,)


def embedding_backward(p, cache, dy):
    """Scatter-add of dy [..., D] into the rows that were gathered -> {"weight": dW [V, D]} (ids have no gradient).

    Raises RefformerError for a p, cache or dy that does not match the forward.
    """
    check_weights(p, ndim=2, bias=False)
    check_cache(cache, 1, "embedding_forward")
    (ids,) = cache
    check_upstream("dy", dy, ids.shape + p["weight"].shape[1:])
    dweight = np.zeros_like(p["weight"])
    np.add.at(dweight, ids.reshape(-1), dy.reshape(-1, dy.shape[-1]))
    return {"weight": dweight}


def sinusoidal_table(n_positions, d_model, dtype=np.float64):
    """The sinusoidal position table [n_positions, D] of Vaswani et al. 2017, sec. 3.5: column 2i holds
    sin(pos / 10000^(2i/D)), column 2i + 1 cos(pos / 10000^(2i/D)); computed in float64, returned in dtype.

    Raises RefformerError for a negative n_positions, a d_model < 1, or a table larger than this machine's memory.
    """
    check_number("n_positions", n_positions, 0, integer=True)
    check_number("d_model", d_model, 1, integer=True)
    check((n_positions + 1) * d_model * 8 <= physical_memory_bytes(),
          f"a sinusoidal table of {n_positions} x {d_model} does not fit in this machine's memory")
    position = np.arange(n_positions, dtype=np.float64)[:, None]  # [N, 1]
    frequency = np.exp(-math.log(10000.0) * np.arange(0, d_model, 2, dtype=np.float64) / d_model)  # [ceil(D/2)]
    angles = position * frequency  # [N, ceil(D/2)]
    table = np.zeros((n_positions, d_model), dtype=np.float64)
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles[:, : d_model // 2])
    return table.astype(dtype)


# ---------------------------------------------------------------------------- norms


def check_eps(eps):
    """Raises RefformerError unless eps is a finite number > 0 (a norm's epsilon)."""
    check_number("eps", eps, 0.0, low_open=True)


def layer_norm_forward(p, x, eps):
    """Layer normalization (Ba et al. 2016): y = (x - mean) / sqrt(var + eps) * weight + bias over the last axis,
    with the biased variance, as torch's F.layer_norm. x [..., D] -> y [..., D], cache (xhat, rstd).

    p = {"weight" [D], "bias" [D]}; the bias is optional, as in ONNX LayerNormalization (torch's
    F.layer_norm(x, (D,), weight, None)). Raises RefformerError for a bad p, x or eps.
    """
    check_weights(p, ndim=1)
    check_features("x", x, p["weight"])
    check_eps(eps)
    with np.errstate(over="ignore", invalid="ignore"):  # rows whose sums or squares overflow are redone below
        mean = x.mean(axis=-1, keepdims=True)
        centred = x - mean
        var = (centred * centred).mean(axis=-1, keepdims=True)
    rstd = 1.0 / np.sqrt(var + eps)
    if np.isinf(var).any() or np.isinf(mean).any():  # rare: finite x whose squares overflow (1e20 in float32)
        rstd, centred = _rescaled_rows(x, var, mean, eps, centre=True, rstd=rstd, centred=centred)
    xhat = centred * rstd
    y = xhat * p["weight"]
    if "bias" in p:
        y = y + p["bias"]
    return y, (xhat, rstd)


def _rescaled_rows(x, var, mean, eps, *, centre, rstd, centred):
    """For the rows whose mean or variance overflowed, recompute with x / max|x| (scale s): var = s^2 var(x / s),
    so rstd = 1 / (s sqrt(var(x / s) + eps / s^2)), which is representable (1e-20 for rows of 1e20 in float32).
    Rows holding inf or NaN stay as they were (NaN propagates). Returns (rstd, centred)."""
    finite_rows = np.isfinite(x).all(axis=-1, keepdims=True)
    rows = (np.isinf(var) | (np.isinf(mean) if mean is not None else False)) & finite_rows
    scale = np.where(rows, np.abs(np.where(finite_rows, x, 0)).max(axis=-1, keepdims=True), 1.0)
    scale = np.where(scale > 0, scale, 1.0).astype(x.dtype)
    xs = x / scale
    cs = xs - xs.mean(axis=-1, keepdims=True) if centre else xs
    with np.errstate(under="ignore"):
        small_eps = eps / scale / scale  # underflows to 0 for a huge scale, as it should
    denominator = scale * np.sqrt((cs * cs).mean(axis=-1, keepdims=True) + small_eps)
    with np.errstate(divide="ignore"):  # a constant row has variance 0: rstd = 1 / sqrt(eps), as in the plain path
        rescaled = np.where(denominator > 0, 1.0 / denominator, 1.0 / np.sqrt(x.dtype.type(eps)))
    return np.where(rows, rescaled, rstd), np.where(rows, cs * scale, centred) if centre else centred


def layer_norm_backward(p, cache, dy):
    """dy [..., D] -> dx [..., D], {"weight" [D], "bias" [D]} ("bias" only when p has one):
    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy * weight (the mean over the last axis).

    Raises RefformerError for a p, cache or dy that does not match the forward.
    """
    check_weights(p, ndim=1)
    check_cache(cache, 2, "layer_norm_forward")
    xhat, rstd = cache
    check_upstream("dy", dy, xhat.shape)
    reduce_axes = tuple(range(dy.ndim - 1))
    dp = {"weight": (dy * xhat).sum(axis=reduce_axes)}
    if "bias" in p:
        dp["bias"] = dy.sum(axis=reduce_axes)
    g = dy * p["weight"]
    dx = rstd * (g - g.mean(axis=-1, keepdims=True) - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, dp


def rms_norm_forward(p, x, eps):
    """RMSNorm (Zhang & Sennrich 2019): y = x / sqrt(mean(x^2) + eps) * weight over the last axis (no centring,
    no bias). x [..., D] -> y [..., D], cache (xhat, rrms).

    Raises RefformerError for a p other than {"weight" [D]}, a bad x or eps.
    """
    check_weights(p, ndim=1, bias=False)
    check_features("x", x, p["weight"])
    check_eps(eps)
    with np.errstate(over="ignore"):  # rows whose squares overflow are redone below
        ms = (x * x).mean(axis=-1, keepdims=True)
    rrms = 1.0 / np.sqrt(ms + eps)
    if np.isinf(ms).any():  # rare: finite x whose squares overflow (1e20 in float32)
        rrms, _ = _rescaled_rows(x, ms, None, eps, centre=False, rstd=rrms, centred=x)
    xhat = x * rrms
    return xhat * p["weight"], (xhat, rrms)


def rms_norm_backward(p, cache, dy):
    """dy [..., D] -> dx [..., D], {"weight" [D]}: dx = rrms * (g - xhat * mean(g * xhat)), g = dy * weight.

    Raises RefformerError for a p, cache or dy that does not match the forward.
    """
    check_weights(p, ndim=1, bias=False)
    check_cache(cache, 2, "rms_norm_forward")
    xhat, rrms = cache
    check_upstream("dy", dy, xhat.shape)
    reduce_axes = tuple(range(dy.ndim - 1))
    dp = {"weight": (dy * xhat).sum(axis=reduce_axes)}
    g = dy * p["weight"]
    dx = rrms * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))
    return dx, dp


def norm_forward(p, x, kind, eps):
    """layer_norm_forward or rms_norm_forward by kind ("layernorm" / "rmsnorm"): x [..., D] -> y [..., D].

    Raises RefformerError for an unknown kind or bad p, x, eps.
    """
    check(kind in ("layernorm", "rmsnorm"), f"kind must be 'layernorm' or 'rmsnorm', got {kind!r}")
    return layer_norm_forward(p, x, eps) if kind == "layernorm" else rms_norm_forward(p, x, eps)


def norm_backward(p, cache, dy, kind):
    """layer_norm_backward or rms_norm_backward by kind: dy [..., D] -> dx [..., D], dp.

    Raises RefformerError for an unknown kind or a p, cache or dy that does not match the forward.
    """
    check(kind in ("layernorm", "rmsnorm"), f"kind must be 'layernorm' or 'rmsnorm', got {kind!r}")
    return layer_norm_backward(p, cache, dy) if kind == "layernorm" else rms_norm_backward(p, cache, dy)


# ---------------------------------------------------------------------------- activations

_erf = np.frompyfunc(math.erf, 1, 1)  # NumPy has no erf; math.erf is exact to the last bit
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def erf(x):
    """Elementwise error function of a floating x (math.erf, exact), in x's dtype. No checks: reached through
    activation_forward / activation_backward, which check x."""
    return np.asarray(_erf(x)).astype(np.asarray(x).dtype)


def relu_forward(x):
    """max(x, 0) -> (y, (x,)). No checks (reached through activation_forward)."""
    return np.maximum(x, 0), (x,)


def relu_backward(cache, dy):
    """dy * (x > 0). No checks (reached through activation_backward)."""
    (x,) = cache
    return dy * (x > 0)


def gelu_forward(x):
    """Exact GELU (Hendrycks & Gimpel 2016): x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), torch's F.gelu.
    No checks (reached through activation_forward)."""
    return 0.5 * x * (1.0 + erf(x * (1.0 / math.sqrt(2.0)))), (x,)


def gelu_backward(cache, dy):
    """dy * d/dx [x Phi(x)] = dy * (Phi(x) + x phi(x)). No checks (reached through activation_backward)."""
    (x,) = cache
    cdf = 0.5 * (1.0 + erf(x * (1.0 / math.sqrt(2.0))))
    with np.errstate(over="ignore"):  # x * x overflows for |x| > ~1e19 in float32: exp(-inf) = 0, exactly right
        pdf = np.exp(-0.5 * x * x) * (1.0 / math.sqrt(2.0 * math.pi))
    return dy * (cdf + x * pdf)


def gelu_tanh_forward(x):
    """GELU's tanh approximation (Hendrycks & Gimpel 2016; torch's F.gelu(approximate="tanh")):
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). No checks (reached through activation_forward)."""
    with np.errstate(over="ignore"):  # x^3 overflows for |x| > ~1e12 in float32: tanh(+-inf) = +-1, exactly right
        t = np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
    return 0.5 * x * (1.0 + t), (x, t)


def gelu_tanh_backward(cache, dy):
    """dy * (0.5 (1 + t) + 0.5 x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2)), t the forward's tanh.
    No checks (reached through activation_backward)."""
    x, t = cache
    with np.errstate(over="ignore", invalid="ignore"):
        dinner = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
        tail = 0.5 * x * (1.0 - t * t) * dinner
    # Where tanh saturates (t * t == 1, |x| large) the second term is 0; x * x may have overflowed to inf there,
    # and 0 * inf would make the gradient NaN (float32 |x| > ~1e19).
    return dy * (0.5 * (1.0 + t) + np.where(t * t < 1.0, tail, 0.0).astype(x.dtype, copy=False))


def silu_forward(x):
    """SiLU (Elfwing et al. 2017; the swish of Ramachandran et al. 2017): x * sigmoid(x), torch's F.silu.
    No checks (reached through activation_forward)."""
    with np.errstate(over="ignore"):  # exp(-x) overflows for x < ~-89 in float32: s = 0, exactly right
        s = 1.0 / (1.0 + np.exp(-x))
    return x * s, (x, s)


def silu_backward(cache, dy):
    """dy * s (1 + x (1 - s)), s = sigmoid(x). No checks (reached through activation_backward)."""
    x, s = cache
    return dy * (s * (1.0 + x * (1.0 - s)))


ACTIVATIONS = {
    "relu": (relu_forward, relu_backward),
    "gelu": (gelu_forward, gelu_backward),
    "gelu_tanh": (gelu_tanh_forward, gelu_tanh_backward),
    "silu": (silu_forward, silu_backward),
}


def activation_forward(x, kind):
    """The activation named kind (relu, gelu, gelu_tanh, silu) of a floating x, elementwise: y of x's shape and
    dtype, and its cache.

    Raises RefformerError for an unknown kind or a non-floating x.
    """
    check_activation(kind)
    check_array("x", x, kind="f")
    return ACTIVATIONS[kind][0](x)


def activation_backward(cache, dy, kind):
    """The input gradient of activation_forward(x, kind), given its cache.

    Raises RefformerError for an unknown kind or a cache or dy that does not match the forward.
    """
    check_activation(kind)
    check(isinstance(cache, tuple) and cache and isinstance(cache[0], np.ndarray),
          "cache must be the cache activation_forward returned")
    check_upstream("dy", dy, cache[0].shape)
    return ACTIVATIONS[kind][1](cache, dy)


def check_activation(kind):
    """Raises RefformerError unless kind names an activation: relu, gelu, gelu_tanh or silu."""
    check(isinstance(kind, str) and kind in ACTIVATIONS,
          f"kind must be one of {', '.join(ACTIVATIONS)}, got {kind!r}")


# ---------------------------------------------------------------------------- dropout


def dropout_forward(x, rate, rng):
    """Inverted dropout (Srivastava et al. 2014, as torch's F.dropout): zero each entry of a floating x with
    probability rate, scale the rest by 1 / (1 - rate); y has x's shape and dtype.

    rng is a numpy.random.Generator; rng=None (eval mode) or rate=0 is the identity.
    Raises RefformerError for a rate outside [0, 1) or an rng that is not a Generator.
    """
    check_array("x", x, kind="f")
    check_number("rate", rate, 0.0, 1.0, high_open=True)
    check_rng("rng", rng)
    if rng is None or rate == 0.0:
        return x, (None,)
    keep = (rng.random(x.shape) >= rate).astype(x.dtype) * (1.0 / (1.0 - rate))  # [same as x]
    return x * keep, (keep,)


def dropout_backward(cache, dy):
    """dy times the forward's scaled keep mask (dy itself in eval mode).

    Raises RefformerError for a cache or dy that does not match the forward.
    """
    check_cache(cache, 1, "dropout_forward")
    (keep,) = cache
    check_array("dy", dy, kind="f")
    check(keep is None or dy.shape == keep.shape, f"dy must have shape {list(getattr(keep, 'shape', ()))}")
    return dy if keep is None else dy * keep


# ---------------------------------------------------------------------------- softmax


def softmax_forward(x, axis=-1):
    """Numerically stable softmax; entries at -inf get 0, and a row that is all -inf gives all zeros.

    torch.softmax returns NaN for an all -inf row; here such a row (a query that may attend
    to nothing, e.g. a padding query) yields zeros and so contributes nothing downstream, as torch's
    F.scaled_dot_product_attention does (2.13, every backend) for a query whose keys are all masked.
    y has x's shape and dtype. Raises RefformerError for a non-floating x or an axis it does not have.
    """
    check_axis(x, axis)
    row_max = np.max(x, axis=axis, keepdims=True, initial=-np.inf)  # initial: an empty axis (S = 0) is allowed
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)  # all -inf row: subtract 0, exp gives zeros
    with np.errstate(over="ignore"):  # a row spanning more than the float range: -inf there, exp gives 0 (exact)
        e = np.exp(x - row_max)
    total = e.sum(axis=axis, keepdims=True)
    y = e / np.where(total == 0.0, 1.0, total)
    return y, (y,)


def softmax_backward(cache, dy, axis=-1):
    """dx = y * (dy - sum(dy * y)); zero wherever y is zero.

    Raises RefformerError for a cache, dy or axis that does not match the forward.
    """
    check_cache(cache, 1, "softmax_forward")
    (y,) = cache
    check_upstream("dy", dy, y.shape)
    check_axis(y, axis)
    return y * (dy - (dy * y).sum(axis=axis, keepdims=True))


def log_softmax_forward(x, axis=-1):
    """x - logsumexp(x), stable for large |x|. A row that is all -inf gives all -inf (the log of softmax_forward's
    zeros; torch gives NaN), a log-probability below the float range -inf.

    Raises RefformerError for a non-floating x or an axis it does not have.
    """
    check_axis(x, axis)
    row_max = np.max(x, axis=axis, keepdims=True, initial=-np.inf)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)  # all -inf row: -inf throughout, as log(softmax's zeros)
    with np.errstate(over="ignore"):  # a row spanning more than the float range: -inf there (log of 0 in floats)
        shifted = x - row_max
    total = np.exp(shifted).sum(axis=axis, keepdims=True)
    y = shifted - np.log(np.where(total == 0.0, 1.0, total))
    return y, (y,)


def log_softmax_backward(cache, dy, axis=-1):
    """dx = dy - softmax(x) * sum(dy).

    Raises RefformerError for a cache, dy or axis that does not match the forward.
    """
    check_cache(cache, 1, "log_softmax_forward")
    (y,) = cache
    check_upstream("dy", dy, y.shape)
    check_axis(y, axis)
    return dy - np.exp(y) * dy.sum(axis=axis, keepdims=True)


def check_axis(x, axis):
    """Raises RefformerError unless x is floating with at least one axis and axis an integer naming one of them."""
    check_array("x", x, kind="f")
    check(x.ndim >= 1, "x must have at least one axis")
    check_number("axis", axis, -x.ndim, x.ndim - 1, integer=True)
