"""Scaled dot-product attention, masks, and multi-head attention (self and cross), forward and backward, with the
inference-only forms incremental decoding uses (project_kv, mha_cached_forward, cached_self_attention_forward), and
the position features that act inside attention: rotary position embedding (rotary_tables, rotary_forward) and T5's
relative position bias (relative_position_bucket, relative_position_bias_forward). Attention takes grouped-query
(Hkv key/value heads dividing H), an explicit scale and projections with or without biases. The ONNX twin is
export/attention.py (which does not build rotary, relative bias or GQA yet).

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


# ---------------------------------------------------------------------------- position features


def rotary_tables(positions, head_dim, theta, dtype=np.float64):
    """The rotary position embedding's cos, sin [B, T, Dh] of positions [B, T] (integers >= 0), Dh = head_dim (even),
    in dtype (float32 or float64): angle[b, t, i] = positions[b, t] * inv_freq[i mod Dh/2] with
    inv_freq = theta ** -(0, 2, .., Dh - 2) / Dh (Su et al. 2021, RoFormer, sec. 3.4, in the rotate-half layout of
    transformers' LlamaRotaryEmbedding.forward: cat(freqs, freqs)).

    The angles are computed in float64 and cast to dtype at the end. transformers' LlamaRotaryEmbedding computes them
    in float32 whatever the model's dtype, so its float64 models carry float32 rounding in cos and sin (~1e-6 at
    position 20); parity in float64 feeds transformers these tables (its attention takes them as an input).
    Raises RefformerError for positions that are not a [B, T] array of integers >= 0, a head_dim that is not an even
    integer >= 2, a theta that is not a finite number > 0, or a dtype other than float32/float64.
    """
    check_array("positions", positions, ndim=2, kind="i")
    check(positions.size == 0 or positions.min() >= 0, "positions must be integers >= 0")
    check_number("head_dim", head_dim, 2, integer=True)
    check(head_dim % 2 == 0, f"head_dim must be even for rotary position embedding, got {head_dim}")
    check_number("theta", theta, 0.0, low_open=True)
    check(dtype in (np.float32, np.float64, np.dtype(np.float32), np.dtype(np.float64)),
          f"dtype must be float32 or float64, got {dtype!r}")
    check(4 * 8 * positions.size * head_dim <= physical_memory_bytes(),
          f"rotary tables of {list(positions.shape)} positions x head_dim={head_dim} do not fit in this machine's "
          f"memory")
    inv_freq = 1.0 / float(theta) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)  # [Dh / 2]
    freqs = positions.astype(np.float64)[..., None] * inv_freq  # [B, T, Dh / 2]
    angles = np.concatenate([freqs, freqs], axis=-1)  # [B, T, Dh]
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def _rotate_half(x):
    """x [..., Dh] -> cat(-x[..., Dh/2:], x[..., :Dh/2]) (transformers' rotate_half); its transpose is -_rotate_half."""
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _check_rotary(name, rotary, shape, dtype):
    """rotary must be a pair (cos, sin) of floating arrays of the given shape [B, T, Dh] and dtype."""
    check(isinstance(rotary, (list, tuple)) and len(rotary) == 2,
          f"{name} must be None or the pair (cos, sin) from rotary_tables, each [B, T, Dh]")
    for part, table in zip(("cos", "sin"), rotary):
        check_array(f"{name} {part}", table, shape=shape, kind="f", dtype=dtype)


def rotary_forward(x, cos, sin):
    """Rotary position embedding of x [B, H, T, Dh]: y = x * cos + rotate_half(x) * sin with cos, sin [B, T, Dh]
    (rotary_tables) broadcast over the heads -> y [B, H, T, Dh] in x's dtype, cache (transformers'
    apply_rotary_pos_emb with unsqueeze_dim=1, applied to q and to k alike).

    Raises RefformerError unless x is a floating [B, H, T, Dh] array with Dh even and cos, sin are [B, T, Dh] of its
    dtype.
    """
    check_array("x", x, ndim=4, kind="f")
    check(x.shape[3] % 2 == 0, f"x's head width Dh={x.shape[3]} must be even for rotary position embedding")
    _check_rotary("(cos, sin)", (cos, sin), (x.shape[0], x.shape[2], x.shape[3]), x.dtype)
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, Dh]
    return x * cos + _rotate_half(x) * sin, (cos, sin)


def rotary_backward(cache, dy):
    """dy [B, H, T, Dh] -> dx [B, H, T, Dh] = dy * cos - rotate_half(dy * sin), rotary_forward's transpose (the
    rotation R of rotate_half has R^T = -R).

    Raises RefformerError for a cache or dy that does not match the forward.
    """
    check(isinstance(cache, tuple) and len(cache) == 2, "cache must be the cache rotary_forward returned")
    cos, sin = cache
    check_array("cache cos", cos, ndim=4, kind="f")
    check_array("cache sin", sin, shape=cos.shape, kind="f", dtype=cos.dtype)
    check_array("dy", dy, ndim=4, shape=(cos.shape[0], None, cos.shape[2], cos.shape[3]), kind="f")
    return dy * cos - _rotate_half(dy * sin)


def _check_buckets(num_buckets, max_distance, bidirectional):
    """num_buckets, max_distance as T5's bucketing needs them: max_exact = (num_buckets, halved when bidirectional)
    // 2 >= 1 and max_distance > max_exact (else its logarithmic buckets divide by zero or run backwards)."""
    check(isinstance(bidirectional, (bool, np.bool_)), f"bidirectional must be True or False, got {bidirectional!r}")
    check_number("num_buckets", num_buckets, 1, integer=True)
    check_number("max_distance", max_distance, 1, integer=True)
    max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    check(max_exact >= 1, f"num_buckets={num_buckets} must be at least {4 if bidirectional else 2} "
                          f"for {'bidirectional' if bidirectional else 'causal'} relative position buckets")
    check(max_distance > max_exact, f"max_distance={max_distance} must exceed the exact buckets' range {max_exact} "
                                    f"(num_buckets={num_buckets})")


def relative_position_bucket(relative_position, *, bidirectional, num_buckets, max_distance):
    """T5's bucket of each relative position (key position - query position), an int64 array of its shape with
    values in [0, num_buckets): transformers' T5Attention._relative_position_bucket (from Mesh TensorFlow; Raffel et
    al. 2020, sec. 2.1). Bidirectional (the encoder): half the buckets for keys after the query; causal (the decoder):
    keys after the query share bucket 0. Of the rest, half are exact distances 0 .. max_exact - 1, half logarithmic up
    to max_distance, beyond which all share the last.

    The logarithmic branch is evaluated in float32, as transformers does (relative_position.float()): its value is an
    exact integer at some distances (16, 32, 64 for T5's 32 buckets and 128), where float32 rounding picks the bucket.
    Raises RefformerError for a non-integer relative_position, a bidirectional that is not a bool, or num_buckets,
    max_distance that are not integers with num_buckets >= 4 (bidirectional) or 2 (causal) and max_distance above the
    exact range.
    """
    check_array("relative_position", relative_position, kind="i")
    _check_buckets(num_buckets, max_distance, bidirectional)
    relative_position = relative_position.astype(np.int64)
    buckets = np.zeros(relative_position.shape, np.int64)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).astype(np.int64) * num_buckets
        distance = np.abs(relative_position)
    else:
        distance = -np.minimum(relative_position, 0)  # keys after the query (masked anyway) count as distance 0
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    ratio = np.maximum(distance, max_exact).astype(np.float32) / np.float32(max_exact)  # >= 1: log is finite
    log_ratio = np.log(ratio.astype(np.float64)).astype(np.float32)  # float32 log, correctly rounded
    large = max_exact + (log_ratio / np.float32(math.log(max_distance / max_exact))
                         * np.float32(num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(is_small, distance, large)


def relative_position_bias_forward(table, query_positions, key_positions, *, bidirectional, max_distance):
    """T5's relative position bias: bias[b, h, i, j] = table[bucket(key_positions[b, j] - query_positions[b, i]), h]
    (transformers' T5Attention.compute_bias, with relative_position_bucket), added to the attention scores before the
    mask. table [num_buckets, H] floating; query_positions [B, T], key_positions [B, S] integers (B may be 1 in
    either, broadcast) -> bias [B, H, T, S] in table's dtype, cache.

    transformers takes the positions 0 .. T - 1 (plus the cached length when decoding); pass those for its numbers.
    Raises RefformerError for a table that is not floating [num_buckets, H], positions that are not 2-D integer
    arrays with broadcastable batch sizes, or bad bucket settings (relative_position_bucket).
    """
    check_array("table", table, ndim=2, kind="f")
    check_array("query_positions", query_positions, ndim=2, kind="i")
    check_array("key_positions", key_positions, ndim=2, kind="i")
    check(query_positions.shape[0] in (1, key_positions.shape[0]) or key_positions.shape[0] == 1,
          f"query_positions {list(query_positions.shape)} and key_positions {list(key_positions.shape)} must have "
          f"the same batch size (or 1)")
    relative = key_positions.astype(np.int64)[:, None, :] - query_positions.astype(np.int64)[:, :, None]  # [B, T, S]
    buckets = relative_position_bucket(relative, bidirectional=bidirectional, num_buckets=table.shape[0],
                                       max_distance=max_distance)
    bias = table[buckets].transpose(0, 3, 1, 2)  # [B, T, S, H] -> [B, H, T, S]
    return bias, {"buckets": buckets, "table": table}


def relative_position_bias_backward(cache, dbias):
    """dbias [B, H, T, S] -> dtable [num_buckets, H]: each entry's gradient added into the table row of its bucket
    (the transpose of the gather in relative_position_bias_forward).

    Raises RefformerError for a cache or dbias that does not match the forward.
    """
    check(isinstance(cache, dict), "cache must be the cache relative_position_bias_forward returned")
    with reading_cache("relative_position_bias_forward"):
        buckets, table = cache["buckets"], cache["table"]
        B, T, S = buckets.shape
        check_upstream("dbias", dbias, (B, table.shape[1], T, S))
        dtable = np.zeros(table.shape, table.dtype)
        np.add.at(dtable, buckets, dbias.transpose(0, 2, 3, 1))  # [B, T, S, H] rows scattered into [num_buckets, H]
        return dtable


# ---------------------------------------------------------------------------- attention


def _repeat_kv(x, n_rep):
    """x [B, Hkv, S, Dh] -> [B, Hkv n_rep, S, Dh], each kv head n_rep times in a row, so query head h reads kv head
    h // n_rep (transformers' repeat_kv; grouped-query attention, Ainslie et al. 2023)."""
    return x if n_rep == 1 else np.repeat(x, n_rep, axis=1)


def _repeat_kv_backward(dx, n_rep):
    """dx [B, Hkv n_rep, S, Dh] -> [B, Hkv, S, Dh]: each kv head's gradient is the sum over the heads that read it."""
    B, H, S, Dh = dx.shape
    return dx if n_rep == 1 else dx.reshape(B, H // n_rep, n_rep, S, Dh).sum(axis=2)


def check_position_bias(name, bias, scores_shape, dtype):
    """Raises RefformerError unless bias is None or a finite floating array of dtype, 4-D, that broadcasts to the
    scores' shape [B, H, T, S]."""
    if bias is None:
        return
    check_array(name, bias, ndim=4, kind="f", dtype=dtype)
    check(all(m in (1, s) for m, s in zip(bias.shape, scores_shape)),
          f"{name} has shape {list(bias.shape)}, which does not broadcast to the scores' [B, H, T, S] = "
          f"{list(scores_shape)}")
    check(bool(np.all(np.isfinite(bias))), f"{name} must be finite (masks go in mask)")


def _sum_to_shape(x, shape):
    """x summed over the axes where shape has 1 (the gradient of a broadcast)."""
    axes = tuple(i for i, (m, s) in enumerate(zip(shape, x.shape)) if m == 1 and s != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


def attention_forward(q, k, v, mask=None, *, scale=None, position_bias=None, dropout=0.0, rng=None):
    """Scaled dot-product attention (Vaswani et al. 2017, sec. 3.2.1): softmax(q k^T * scale + position_bias + mask) v.
    q [B, H, T, Dh], k, v [B, Hkv, S, Dh] with Hkv dividing H, one floating dtype -> out [B, H, T, Dh], cache.

    Grouped-query attention (Ainslie et al. 2023): query head h reads kv head h // (H / Hkv), transformers'
    repeat_kv order (Hkv = 1 is multi-query attention). scale defaults to 1 / sqrt(Dh) (T5 uses 1.0, as
    transformers' eager_attention_forward with scaling). position_bias (e.g. relative_position_bias_forward), floating
    and finite, broadcasts to [B, H, T, S] and is added after the scale, before the mask (T5's scores + position_bias).
    mask: boolean (True = attend) or floating additive (0 attend, -inf masked), broadcasting to
    [B, H, T, S]; the two forms of the same mask give the same result. A query whose keys are all
    masked gets zero weights and a zero output, as torch's F.scaled_dot_product_attention gives
    (torch.softmax gives NaN). Raises RefformerError for bad shapes, dtypes, masks, scale, position_bias, dropout or
    rng.
    """
    check_array("q", q, ndim=4, kind="f")
    check_number("dropout", dropout, 0.0, 1.0, high_open=True)
    check_rng("rng", rng)
    check_array("k", k, ndim=4, shape=(q.shape[0], None, None, q.shape[3]), kind="f", dtype=q.dtype)
    H, Hkv = q.shape[1], k.shape[1]
    check(Hkv == H or (Hkv >= 1 and H % Hkv == 0),
          f"k has shape {list(k.shape)}: its {Hkv} heads must divide q's {H} heads (grouped-query attention)")
    check_array("v", v, shape=k.shape, kind="f", dtype=q.dtype)
    scores_shape = q.shape[:3] + (k.shape[2],)
    check_mask("mask", mask, scores_shape)
    check_position_bias("position_bias", position_bias, scores_shape, q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(check_number("scale", scale, 0.0, low_open=True))
    n_rep = H // Hkv if Hkv else 1
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)  # [B, H, S, Dh]
    scores = (q @ k.swapaxes(-1, -2)) * scale  # [B, H, T, S]
    if position_bias is not None:
        scores = scores + position_bias
    if mask is not None and mask.dtype == bool:
        scores = np.where(mask, scores, -np.inf)
    elif mask is not None:
        scores = scores + mask.astype(scores.dtype)
    probs, softmax_cache = softmax_forward(scores)
    dropped, dropout_cache = dropout_forward(probs, dropout, rng)
    out = dropped @ v  # [B, H, T, Dh]
    cache = {"q": q, "k": k, "v": v, "probs": probs, "weights": dropped, "softmax": softmax_cache,
             "dropout": dropout_cache, "scale": scale, "n_rep": n_rep,
             "position_bias_shape": None if position_bias is None else position_bias.shape}
    return out, cache


def attention_backward(cache, dout):
    """dout [B, H, T, Dh] -> dq [B, H, T, Dh], dk, dv [B, Hkv, S, Dh] (masks have no gradient); when the forward had a
    position_bias, its gradient (the shape of position_bias) comes fourth.

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
    n_rep, bias_shape = cache["n_rep"], cache["position_bias_shape"]
    dweights = dout @ v.swapaxes(-1, -2)  # [B, H, T, S]
    dv = weights.swapaxes(-1, -2) @ dout  # [B, H, S, Dh]
    dprobs = dropout_backward(cache["dropout"], dweights)
    dbiased = softmax_backward(cache["softmax"], dprobs)  # d(scores + position_bias) [B, H, T, S]
    dscores = dbiased * scale
    dq = dscores @ k  # [B, H, T, Dh]
    dk = dscores.swapaxes(-1, -2) @ q  # [B, H, S, Dh]
    grads = (dq, _repeat_kv_backward(dk, n_rep), _repeat_kv_backward(dv, n_rep))
    if bias_shape is None:
        return grads
    return grads + (_sum_to_shape(dbiased, bias_shape),)


# ---------------------------------------------------------------------------- multi-head attention


def split_heads(x, n_heads):
    """x [B, T, H Dh] -> [B, H, T, Dh] with H = n_heads (head h takes features h Dh .. (h + 1) Dh - 1).

    Raises RefformerError unless x is [B, T, W] and n_heads divides W.
    """
    check_array("x", x, ndim=3)
    check_heads(n_heads, x.shape[2])
    B, T, W = x.shape
    return x.reshape(B, T, n_heads, W // n_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """x [B, H, T, Dh] -> [B, T, H Dh], split_heads inverted.

    Raises RefformerError unless x is [B, H, T, Dh].
    """
    check_array("x", x, ndim=4)
    B, H, T, Dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * Dh)


def mha_shapes(D, n_heads=1, n_kv_heads=None, head_dim=None, *, qkv_bias=True, out_bias=True):
    """The parameter shapes of attention at width D with H = n_heads query heads, Hkv = n_kv_heads (default H) key and
    value heads of width Dh = head_dim (default D // H): q_proj {"weight" (D, H Dh), "bias" (H Dh,)}, k_proj and
    v_proj {"weight" (D, Hkv Dh), "bias" (Hkv Dh,)}, out_proj {"weight" (H Dh, D), "bias" (D,)}; the biases only
    with qkv_bias / out_bias. mha_shapes(D) is today's (D, D) projections. No checks (the sizes come from a checked
    Config)."""
    Dh = D // n_heads if head_dim is None else head_dim
    Hkv = n_heads if n_kv_heads is None else n_kv_heads

    def linear(d_in, d_out, bias):
        return {"weight": (d_in, d_out), "bias": (d_out,)} if bias else {"weight": (d_in, d_out)}

    return {"q_proj": linear(D, n_heads * Dh, qkv_bias), "k_proj": linear(D, Hkv * Dh, qkv_bias),
            "v_proj": linear(D, Hkv * Dh, qkv_bias), "out_proj": linear(n_heads * Dh, D, out_bias)}


def check_mha_params(p):
    """Returns (D, dtype) of attention parameters p. Raises RefformerError unless p holds q_proj {"weight" [D, Wq]},
    k_proj and v_proj {"weight" [D, Wkv]} and out_proj {"weight" [Wq, D]}, each with or without its "bias" [out],
    in one floating dtype (mha_shapes for some sizes)."""
    def weight(name):
        linear = p.get(name) if isinstance(p, dict) else None
        value = linear.get("weight") if isinstance(linear, dict) else None
        return value if isinstance(value, np.ndarray) and value.ndim == 2 else None

    q_weight, k_weight = weight("q_proj"), weight("k_proj")
    check(q_weight is not None and k_weight is not None,
          "p must hold q_proj, k_proj, v_proj and out_proj, each {'weight' [in, out]} with an optional 'bias' [out]")
    D, Wq, Wkv = q_weight.shape[0], q_weight.shape[1], k_weight.shape[1]
    spec = {}
    for name, (d_in, d_out) in (("q_proj", (D, Wq)), ("k_proj", (D, Wkv)), ("v_proj", (D, Wkv)), ("out_proj", (Wq, D))):
        spec[name] = {"weight": (d_in, d_out)}
        if isinstance(p.get(name), dict) and "bias" in p[name]:
            spec[name]["bias"] = (d_out,)
    check_tree("p", p, spec)
    dtypes = {value.dtype for linear in p.values() for value in linear.values()}
    check(len(dtypes) == 1, f"p's arrays must share one dtype, got {sorted(map(str, dtypes))}")
    return D, q_weight.dtype


def check_heads(n_heads, D, what="D"):
    """Raises RefformerError unless n_heads is a positive integer that divides D (named `what` in the message)."""
    check(isinstance(n_heads, (int, np.integer)) and not isinstance(n_heads, bool) and n_heads >= 1
          and D % n_heads == 0, f"n_heads={n_heads!r} must be a positive integer that divides {what}={D}")


def check_mha_inputs(p, xq, xkv, n_heads):
    """Returns (H, Hkv, Dh): the query heads, the key/value heads and the head width of attention parameters p with
    n_heads query heads. Raises RefformerError unless p is attention parameters of width D, n_heads divides q_proj's
    width H Dh, k_proj's width is Hkv Dh with Hkv dividing H, and xq [B, T, D] and xkv [B, S, D] are floating arrays
    of p's dtype."""
    D, dtype = check_mha_params(p)
    Wq, Wkv = p["q_proj"]["weight"].shape[1], p["k_proj"]["weight"].shape[1]
    check_heads(n_heads, Wq, "D" if Wq == D else "q_proj's width")
    Dh = Wq // n_heads
    Hkv = Wkv // Dh if Dh else n_heads
    check(Wkv == Hkv * Dh and Hkv >= 1 and n_heads % Hkv == 0,
          f"k_proj and v_proj project to {Wkv} features, which must be n_kv_heads x Dh (Dh = {Dh}) with n_kv_heads "
          f"dividing n_heads={n_heads}")
    check_array("xq", xq, ndim=3, shape=(None, None, D), kind="f", dtype=dtype)
    check_array("xkv", xkv, ndim=3, shape=(xq.shape[0], None, D), kind="f", dtype=dtype)
    return n_heads, Hkv, Dh


def project_kv(p, xkv, n_heads, rotary=None):
    """Keys and values of xkv [B, S, D]: k, v [B, Hkv, S, Dh] in xkv's dtype (what a KV cache holds):
    split_heads(xkv @ W_k + b_k, Hkv) and split_heads(xkv @ W_v + b_v, Hkv), the keys rotated by rotary = (cos, sin)
    [B, S, Dh] of their positions (rotary_tables) when given, so a cache holds rotated keys (as transformers').

    Raises RefformerError for bad p, xkv, n_heads or rotary.
    """
    _, Hkv, Dh = check_mha_inputs(p, xkv, xkv, n_heads)
    k = split_heads(linear_forward(p["k_proj"], xkv)[0], Hkv)
    v = split_heads(linear_forward(p["v_proj"], xkv)[0], Hkv)
    if rotary is not None:
        _check_rotary("rotary", rotary, (xkv.shape[0], xkv.shape[1], Dh), xkv.dtype)
        k = rotary_forward(k, *rotary)[0]
    return k, v


def mha_forward(p, xq, xkv, mask=None, *, n_heads, scale=None, position_bias=None, rotary=None, dropout=0.0,
                rng=None):
    """Multi-head attention (Vaswani et al. 2017, sec. 3.2.2). xq [B, T, D] attends to xkv [B, S, D] -> y [B, T, D],
    cache; H = n_heads query heads of Dh = q_proj's width / H, Hkv key/value heads (k_proj's width / Dh, dividing H:
    grouped-query attention), floating, in p's dtype.

    p holds q_proj [D, H Dh], k_proj, v_proj [D, Hkv Dh], out_proj [H Dh, D], each with or without a bias
    (mha_shapes). Self-attention passes the same array as xq and xkv. mask broadcasts to [B, H, T, S]; scale and
    position_bias as attention_forward; rotary = (cos, sin) [B, T, Dh] (rotary_tables of the rows' positions; S must
    equal T) rotates q and k after the head split (transformers' LlamaAttention: apply_rotary_pos_emb). dropout
    (rate, with rng) acts on the attention weights.
    Raises RefformerError for bad p, inputs, mask, n_heads, scale, position_bias, rotary, dropout or rng.
    """
    H, Hkv, Dh = check_mha_inputs(p, xq, xkv, n_heads)
    if rotary is not None:
        check(xkv.shape[1] == xq.shape[1], f"rotary needs as many keys as queries (self-attention), got "
                                           f"{xkv.shape[1]} and {xq.shape[1]}")
        _check_rotary("rotary", rotary, xq.shape[:2] + (Dh,), xq.dtype)
    q_lin, q_cache = linear_forward(p["q_proj"], xq)
    k_lin, k_cache = linear_forward(p["k_proj"], xkv)
    v_lin, v_cache = linear_forward(p["v_proj"], xkv)
    q = split_heads(q_lin, H)  # [B, H, T, Dh]
    k = split_heads(k_lin, Hkv)  # [B, Hkv, S, Dh]
    v = split_heads(v_lin, Hkv)  # [B, Hkv, S, Dh]
    rotary_cache = None
    if rotary is not None:
        q, q_rotary = rotary_forward(q, *rotary)
        k, k_rotary = rotary_forward(k, *rotary)
        rotary_cache = (q_rotary, k_rotary)
    context, attention_cache = attention_forward(q, k, v, mask, scale=scale, position_bias=position_bias,
                                                 dropout=dropout, rng=rng)
    merged = merge_heads(context)  # [B, T, H Dh]
    y, out_cache = linear_forward(p["out_proj"], merged)
    cache = {"q_proj": q_cache, "k_proj": k_cache, "v_proj": v_cache, "rotary": rotary_cache,
             "attention": attention_cache, "context": merged, "out_proj": out_cache, "output": y}
    return y, cache


def mha_backward(p, cache, dy):
    """dy [B, T, D] -> dxq [B, T, D], dxkv [B, S, D], dp with p's keys (for self-attention the input gradient is
    dxq + dxkv); when the forward had a position_bias, its gradient (the shape of position_bias) comes fourth.

    Raises RefformerError for a p, cache or dy that does not match the forward.
    """
    check_mha_params(p)
    check(isinstance(cache, dict), "cache must be the cache mha_forward returned")
    with reading_cache("mha_forward"):
        return _mha_backward(p, cache, dy)


def _mha_backward(p, cache, dy):
    dmerged, d_out_proj = linear_backward(p["out_proj"], cache["out_proj"], dy)
    n_heads = cache["attention"]["q"].shape[1]
    dq, dk, dv, *dbias = attention_backward(cache["attention"], split_heads(dmerged, n_heads))
    if cache["rotary"] is not None:
        dq = rotary_backward(cache["rotary"][0], dq)
        dk = rotary_backward(cache["rotary"][1], dk)
    dxq, d_q_proj = linear_backward(p["q_proj"], cache["q_proj"], merge_heads(dq))
    dxk, d_k_proj = linear_backward(p["k_proj"], cache["k_proj"], merge_heads(dk))
    dxv, d_v_proj = linear_backward(p["v_proj"], cache["v_proj"], merge_heads(dv))
    dp = {"q_proj": d_q_proj, "k_proj": d_k_proj, "v_proj": d_v_proj, "out_proj": d_out_proj}
    return (dxq, dxk + dxv, dp, *dbias)


def mha_cached_forward(p, xq, k, v, mask=None, *, n_heads, scale=None, position_bias=None, rotary=None):
    """Inference-only attention of xq [B, T, D] to already projected k, v [B, Hkv, S, Dh] -> y [B, T, D], in p's dtype;
    mask and position_bias broadcast to [B, H, T, S]; rotary = (cos, sin) [B, T, Dh] of the queries' positions rotates
    q (the keys were rotated when projected). No dropout, no cache for a backward.

    The building block of incremental decoding: k, v come from project_kv (cross-attention,
    computed once) or from a self-attention cache extended by the new positions.
    Raises RefformerError for bad p, xq, k, v, mask, n_heads, scale, position_bias or rotary.
    """
    H, Hkv, Dh = check_mha_inputs(p, xq, xq, n_heads)
    check_array("k", k, shape=(xq.shape[0], Hkv, None, Dh), kind="f", dtype=xq.dtype)
    q = split_heads(linear_forward(p["q_proj"], xq)[0], H)  # [B, H, T, Dh]
    if rotary is not None:
        _check_rotary("rotary", rotary, xq.shape[:2] + (Dh,), xq.dtype)
        q = rotary_forward(q, *rotary)[0]
    context, _ = attention_forward(q, k, v, mask, scale=scale, position_bias=position_bias)
    return linear_forward(p["out_proj"], merge_heads(context))[0]


def cached_self_attention_forward(p, x, past_k, past_v, mask=None, *, n_heads, scale=None, position_bias=None,
                                  rotary=None):
    """Self-attention of T new positions over a KV cache of P earlier ones (incremental decoding).

    x [B, T, D]; past_k, past_v [B, Hkv, P, Dh] (P may be 0) -> y [B, T, D] and the present cache (k, v)
    [B, Hkv, P + T, Dh]: the past with the new positions' keys and values appended on axis 2. The same numbers as
    mha_forward(p, x_all, x_all) for the last T queries of all P + T positions x_all, since a position's key and
    value depend on it alone (Vaswani et al. 2017, sec. 3.2.2; with rotary, on it and its own position).
    mask and position_bias broadcast to [B, H, T, P + T] (the mask: causal_mask(T, P + T, past=P) with the key
    padding); rotary = (cos, sin) [B, T, Dh] of the new positions rotates their queries and keys, so the cache holds
    rotated keys. Inference only: no dropout, no backward.
    Raises RefformerError for bad p, x, past_k, past_v, mask, n_heads, scale, position_bias or rotary.
    """
    k_new, v_new = project_kv(p, x, n_heads, rotary)  # [B, Hkv, T, Dh]
    check_array("past_k", past_k, shape=k_new.shape[:2] + (None, k_new.shape[3]), kind="f", dtype=k_new.dtype)
    check_array("past_v", past_v, shape=past_k.shape, kind="f", dtype=k_new.dtype)
    k = np.concatenate([past_k, k_new], axis=2)  # [B, Hkv, P + T, Dh]
    v = np.concatenate([past_v, v_new], axis=2)
    y = mha_cached_forward(p, x, k, v, mask, n_heads=n_heads, scale=scale, position_bias=position_bias, rotary=rotary)
    return y, (k, v)
