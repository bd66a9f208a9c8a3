"""Scaled dot-product attention, masks, and multi-head attention (self and cross), forward and backward, with the
inference-only forms incremental decoding uses (project_kv, mha_cached_forward, cached_self_attention_forward).
The ONNX twin is export/attention.py.

Masks at this level (attention_forward, mha_forward, the layers): a boolean mask is True where a query
may attend (as in torch's scaled_dot_product_attention and the ONNX graphs' 1 = keep); a floating mask
is added to the scores (0 keep, -inf drop), as torch's float attn_mask. Either broadcasts to [B, H, T, S];
integer masks are refused. torch.nn.MultiheadAttention's boolean masks mean the opposite (True = drop):
convert with `~mask`.

Keep masks at the model level (padding_mask, model_forward, encode, decoder_step, generate) are [B, L]
token masks, boolean or integer 0/1, 1 = real token (attend to it). A floating mask is refused there,
since an additive 0 / -inf mask would read inverted: pass `mask == 0` for an additive one.

A query whose keys are all masked gets zero weights and a zero attention output, as torch 2.13's
F.scaled_dot_product_attention (every backend) and nn.MultiheadAttention with need_weights=False do;
torch.softmax and nn.MultiheadAttention with need_weights=True (its default) give NaN there.
"""

import math

import numpy as np

from .errors import (
    RefformerError,
    check,
    check_array,
    check_number,
    check_rng,
    check_tree,
    check_upstream,
    physical_memory_bytes,
    reading_cache,
)
from .ops import dropout_backward, dropout_forward, linear_backward, linear_forward, softmax_backward, softmax_forward

# ---------------------------------------------------------------------------- masks


def causal_mask(n_queries, n_keys=None, past=0):
    """Boolean [T, S] (T = n_queries, S = n_keys, default past + T): query i, at absolute position past + i, may
    attend to keys 0 .. past + i (the decoder's masking of future positions, Vaswani et al. 2017, sec. 3.2.3).

    Raises RefformerError for negative or non-integer sizes, or a mask too large for memory.
    """
    check_number("n_queries", n_queries, 0, integer=True)
    check_number("past", past, 0, np.iinfo(np.int64).max // 2, integer=True)  # positions are int64
    n_keys = past + n_queries if n_keys is None else check_number("n_keys", n_keys, 0, integer=True)
    check(n_queries * n_keys + 8 * (n_queries + n_keys) <= physical_memory_bytes(),
          f"a causal mask of {n_queries} x {n_keys} does not fit in this machine's memory")
    return np.arange(n_keys)[None, :] <= past + np.arange(n_queries)[:, None]


def padding_mask(keep):
    """Key-padding mask: keep [B, S] (boolean or integer 0/1, 1 = real token) -> boolean [B, 1, 1, S].

    Raises RefformerError for a floating (additive) mask, values other than 0/1, or another rank.
    """
    return check_keep_mask("keep", keep, ndim=2)[:, None, None, :]


def check_keep_mask(name, mask, shape=None, ndim=None):
    """A token keep mask as booleans: mask is boolean, or integer 0/1 (1 = real token, attend to it), a numpy array
    or nested lists, of the given shape (or rank) -> a boolean array of that shape.

    Raises RefformerError naming `name` for another type, shape or rank, values other than 0/1, or a floating mask
    (an additive mask, 0 attend and -inf masked, would read inverted).
    """
    if isinstance(mask, (list, tuple)):
        try:
            mask = np.asarray(mask)
        except ValueError:  # rows of different lengths
            raise RefformerError(f"{name} must be a rectangular array of booleans or 0/1 integers") from None
    if not isinstance(mask, np.ndarray):
        raise RefformerError(f"{name} must be a numpy array of booleans or 0/1 integers, got {type(mask).__name__}")
    if mask.dtype.kind == "f":
        raise RefformerError(f"{name} is floating-point ({mask.dtype}); it must be a keep mask of booleans or 0/1 "
                             f"integers (1 = real token). For an additive mask (0 = attend, -inf = masked) "
                             f"pass {name} == 0")
    check(mask.dtype.kind in "biu", f"{name} must hold booleans or 0/1 integers, got dtype {mask.dtype}")
    if ndim is not None:
        check(mask.ndim == ndim, f"{name} must have {ndim} dimensions, got shape {list(mask.shape)}")
    if shape is not None:
        check(mask.shape == tuple(shape), f"{name} must have shape {list(shape)}, got {list(mask.shape)}")
    if mask.dtype.kind != "b" and mask.size and (mask.min() < 0 or mask.max() > 1):
        raise RefformerError(f"{name} must hold only 0 and 1 (1 = real token), "
                             f"got values from {mask.min()} to {mask.max()}")
    return mask.astype(bool)


def check_mask(name, mask, scores_shape):
    """Raises RefformerError unless mask is None, boolean (True = attend) or floating (added: 0 attend, -inf
    masked; no NaN or +inf), and broadcasts to the scores' shape [B, H, T, S]."""
    if mask is None:
        return
    if not isinstance(mask, np.ndarray) or mask.dtype.kind not in "bf":
        raise RefformerError(f"{name} must be a boolean (True = attend) or floating (additive: 0 attend, -inf "
                             f"masked) numpy array, got {getattr(mask, 'dtype', type(mask).__name__)}")
    ok = mask.ndim <= 4 and all(m in (1, s) for m, s in zip(mask.shape[::-1], scores_shape[::-1]))
    check(ok, f"{name} has shape {list(mask.shape)}, which does not broadcast to the scores' "
              f"[B, H, T, S] = {list(scores_shape)}")
    # after the shape check: a mask is then no larger than the scores, so this test fits in memory too
    check(mask.dtype.kind == "b" or not np.any(np.isnan(mask) | (mask == np.inf)),
          f"{name} is an additive mask and must not hold NaN or +inf (0 = attend, -inf = masked)")


# ---------------------------------------------------------------------------- attention


def attention_forward(q, k, v, mask=None, *, dropout=0.0, rng=None):
    """Scaled dot-product attention (Vaswani et al. 2017, sec. 3.2.1): softmax(q k^T / sqrt(Dh) + mask) v.
    q [B, H, T, Dh], k, v [B, H, S, Dh], one floating dtype -> out [B, H, T, Dh], cache.

    mask: boolean (True = attend) or floating additive (0 attend, -inf masked), broadcasting to
    [B, H, T, S]; the two forms of the same mask give the same result. A query whose keys are all
    masked gets zero weights and a zero output, as torch's F.scaled_dot_product_attention gives
    (torch.softmax gives NaN). Raises RefformerError for bad shapes, dtypes, masks, dropout or rng.
    """
    check_array("q", q, ndim=4, kind="f")
    check_number("dropout", dropout, 0.0, 1.0, high_open=True)
    check_rng("rng", rng)
    check_array("k", k, shape=q.shape[:2] + (None, q.shape[3]), kind="f", dtype=q.dtype)
    check_array("v", v, shape=k.shape, kind="f", dtype=q.dtype)
    scores_shape = q.shape[:3] + (k.shape[2],)
    check_mask("mask", mask, scores_shape)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q @ k.swapaxes(-1, -2)) * scale  # [B, H, T, S]
    if mask is not None and mask.dtype == bool:
        scores = np.where(mask, scores, -np.inf)
    elif mask is not None:
        scores = scores + mask.astype(scores.dtype)
    probs, softmax_cache = softmax_forward(scores)
    dropped, dropout_cache = dropout_forward(probs, dropout, rng)
    out = dropped @ v  # [B, H, T, Dh]
    cache = {"q": q, "k": k, "v": v, "probs": probs, "weights": dropped,
             "softmax": softmax_cache, "dropout": dropout_cache, "scale": scale}
    return out, cache


def attention_backward(cache, dout):
    """dout [B, H, T, Dh] -> dq [B, H, T, Dh], dk, dv [B, H, S, Dh] (masks have no gradient).

    Raises RefformerError for a cache or dout that does not match the forward.
    """
    check(isinstance(cache, dict), "cache must be the cache attention_forward returned")
    with reading_cache("attention_forward"):
        q, k, v, weights, scale = cache["q"], cache["k"], cache["v"], cache["weights"], cache["scale"]
        for name, value in (("q", q), ("k", k), ("v", v), ("weights", weights)):
            check_array(f"cache {name}", value, ndim=4, kind="f")
        check_upstream("dout", dout, q.shape[:3] + v.shape[3:])
        return _attention_backward(cache, q, k, v, weights, scale, dout)


def _attention_backward(cache, q, k, v, weights, scale, dout):
    dweights = dout @ v.swapaxes(-1, -2)  # [B, H, T, S]
    dv = weights.swapaxes(-1, -2) @ dout  # [B, H, S, Dh]
    dprobs = dropout_backward(cache["dropout"], dweights)
    dscores = softmax_backward(cache["softmax"], dprobs) * scale
    dq = dscores @ k  # [B, H, T, Dh]
    dk = dscores.swapaxes(-1, -2) @ q  # [B, H, S, Dh]
    return dq, dk, dv


# ---------------------------------------------------------------------------- multi-head attention


def split_heads(x, n_heads):
    """x [B, T, D] -> [B, H, T, Dh] with H = n_heads and Dh = D / H (head h takes features h Dh .. (h + 1) Dh - 1).

    Raises RefformerError unless x is [B, T, D] and n_heads divides D.
    """
    check_array("x", x, ndim=3)
    check_heads(n_heads, x.shape[2])
    B, T, D = x.shape
    return x.reshape(B, T, n_heads, D // n_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """x [B, H, T, Dh] -> [B, T, D = H Dh], split_heads inverted.

    Raises RefformerError unless x is [B, H, T, Dh].
    """
    check_array("x", x, ndim=4)
    B, H, T, Dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * Dh)


def mha_shapes(D):
    """The parameter shapes of attention at width D: q_proj, k_proj, v_proj, out_proj, each {"weight" (D, D),
    "bias" (D,)}. No checks (D comes from a checked Config)."""
    return {name: {"weight": (D, D), "bias": (D,)} for name in ("q_proj", "k_proj", "v_proj", "out_proj")}


def check_mha_params(p):
    """Returns (D, dtype) of attention parameters p. Raises RefformerError unless p is mha_shapes(D) for some D
    (read from q_proj.weight) in one floating dtype."""
    weight = p.get("q_proj", {}).get("weight") if isinstance(p, dict) and isinstance(p.get("q_proj"), dict) else None
    check(isinstance(weight, np.ndarray) and weight.ndim == 2,
          "p must hold q_proj, k_proj, v_proj and out_proj, each {'weight' [D, D], 'bias' [D]}")
    check_tree("p", p, mha_shapes(weight.shape[0]))
    dtypes = {value.dtype for linear in p.values() for value in linear.values()}
    check(len(dtypes) == 1, f"p's arrays must share one dtype, got {sorted(map(str, dtypes))}")
    return weight.shape[0], weight.dtype


def check_heads(n_heads, D):
    """Raises RefformerError unless n_heads is a positive integer that divides D."""
    check(isinstance(n_heads, (int, np.integer)) and not isinstance(n_heads, bool) and n_heads >= 1
          and D % n_heads == 0, f"n_heads={n_heads!r} must be a positive integer that divides D={D}")


def check_mha_inputs(p, xq, xkv, n_heads):
    """Raises RefformerError unless p is attention parameters of width D, n_heads divides D, and xq [B, T, D] and
    xkv [B, S, D] are floating arrays of p's dtype."""
    D, dtype = check_mha_params(p)
    check_heads(n_heads, D)
    check_array("xq", xq, ndim=3, shape=(None, None, D), kind="f", dtype=dtype)
    check_array("xkv", xkv, ndim=3, shape=(xq.shape[0], None, D), kind="f", dtype=dtype)


def project_kv(p, xkv, n_heads):
    """Keys and values of xkv [B, S, D] for every head: k, v [B, H, S, Dh] in xkv's dtype (what a KV cache holds):
    split_heads(xkv @ W_k + b_k) and split_heads(xkv @ W_v + b_v).

    Raises RefformerError for bad p, xkv or n_heads.
    """
    check_mha_inputs(p, xkv, xkv, n_heads)
    k = split_heads(linear_forward(p["k_proj"], xkv)[0], n_heads)
    v = split_heads(linear_forward(p["v_proj"], xkv)[0], n_heads)
    return k, v


def mha_forward(p, xq, xkv, mask=None, *, n_heads, dropout=0.0, rng=None):
    """Multi-head attention (Vaswani et al. 2017, sec. 3.2.2). xq [B, T, D] attends to xkv [B, S, D] -> y [B, T, D],
    cache; H = n_heads heads of Dh = D / H, floating, in p's dtype.

    p holds q_proj, k_proj, v_proj, out_proj ({"weight" [D, D], "bias" [D]}). Self-attention
    passes the same array as xq and xkv. mask broadcasts to [B, H, T, S]; dropout (rate, with rng) acts on the
    attention weights.
    Raises RefformerError for bad p, inputs, mask, n_heads, dropout or rng.
    """
    check_mha_inputs(p, xq, xkv, n_heads)
    q_lin, q_cache = linear_forward(p["q_proj"], xq)
    k_lin, k_cache = linear_forward(p["k_proj"], xkv)
    v_lin, v_cache = linear_forward(p["v_proj"], xkv)
    q = split_heads(q_lin, n_heads)  # [B, H, T, Dh]
    k = split_heads(k_lin, n_heads)  # [B, H, S, Dh]
    v = split_heads(v_lin, n_heads)  # [B, H, S, Dh]
    context, attention_cache = attention_forward(q, k, v, mask, dropout=dropout, rng=rng)
    merged = merge_heads(context)  # [B, T, D]
    y, out_cache = linear_forward(p["out_proj"], merged)
    cache = {"q_proj": q_cache, "k_proj": k_cache, "v_proj": v_cache,
             "attention": attention_cache, "context": merged, "out_proj": out_cache, "output": y}
    return y, cache


def mha_backward(p, cache, dy):
    """dy [B, T, D] -> dxq [B, T, D], dxkv [B, S, D], dp with p's keys (for self-attention the input gradient is
    dxq + dxkv).

    Raises RefformerError for a p, cache or dy that does not match the forward.
    """
    check_mha_params(p)
    check(isinstance(cache, dict), "cache must be the cache mha_forward returned")
    with reading_cache("mha_forward"):
        return _mha_backward(p, cache, dy)


def _mha_backward(p, cache, dy):
    dmerged, d_out_proj = linear_backward(p["out_proj"], cache["out_proj"], dy)
    n_heads = cache["attention"]["q"].shape[1]
    dq, dk, dv = attention_backward(cache["attention"], split_heads(dmerged, n_heads))
    dxq, d_q_proj = linear_backward(p["q_proj"], cache["q_proj"], merge_heads(dq))
    dxk, d_k_proj = linear_backward(p["k_proj"], cache["k_proj"], merge_heads(dk))
    dxv, d_v_proj = linear_backward(p["v_proj"], cache["v_proj"], merge_heads(dv))
    dp = {"q_proj": d_q_proj, "k_proj": d_k_proj, "v_proj": d_v_proj, "out_proj": d_out_proj}
    return dxq, dxk + dxv, dp


def mha_cached_forward(p, xq, k, v, mask=None, *, n_heads):
    """Inference-only attention of xq [B, T, D] to already projected k, v [B, H, S, Dh] -> y [B, T, D], in p's dtype;
    mask broadcasts to [B, H, T, S]. No dropout, no cache for a backward.

    The building block of incremental decoding: k, v come from project_kv (cross-attention,
    computed once) or from a self-attention cache extended by the new positions.
    Raises RefformerError for bad p, xq, k, v, mask or n_heads.
    """
    check_mha_inputs(p, xq, xq, n_heads)
    q = split_heads(linear_forward(p["q_proj"], xq)[0], n_heads)  # [B, H, T, Dh]
    context, _ = attention_forward(q, k, v, mask)
    return linear_forward(p["out_proj"], merge_heads(context))[0]


def cached_self_attention_forward(p, x, past_k, past_v, mask=None, *, n_heads):
    """Self-attention of T new positions over a KV cache of P earlier ones (incremental decoding).

    x [B, T, D]; past_k, past_v [B, H, P, Dh] (P may be 0) -> y [B, T, D] and the present cache (k, v)
    [B, H, P + T, Dh]: the past with the new positions' keys and values appended on axis 2. The same numbers as
    mha_forward(p, x_all, x_all) for the last T queries of all P + T positions x_all, since a position's key and
    value depend on it alone (Vaswani et al. 2017, sec. 3.2.2). mask broadcasts to [B, H, T, P + T]
    (causal_mask(T, P + T, past=P) with the key padding). Inference only: no dropout, no backward.
    Raises RefformerError for bad p, x, past_k, past_v, mask or n_heads.
    """
    k_new, v_new = project_kv(p, x, n_heads)  # [B, H, T, Dh]
    check_array("past_k", past_k, shape=k_new.shape[:2] + (None, k_new.shape[3]), kind="f", dtype=k_new.dtype)
    check_array("past_v", past_v, shape=past_k.shape, kind="f", dtype=k_new.dtype)
    k = np.concatenate([past_k, k_new], axis=2)  # [B, H, P + T, Dh]
    v = np.concatenate([past_v, v_new], axis=2)
    return mha_cached_forward(p, x, k, v, mask, n_heads=n_heads), (k, v)
