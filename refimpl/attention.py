"""Scaled dot-product attention, masks, and multi-head attention (self and cross), forward and backward.

Masks: a boolean mask is True where a query may attend (as in torch's scaled_dot_product_attention
and the ONNX graphs' 1 = keep); a floating mask is added to the scores (0 keep, -inf drop).
Either broadcasts to [B, H, T, S]. torch.nn.MultiheadAttention's boolean masks mean the
opposite (True = drop): convert with `~mask`.
"""

import math

import numpy as np

from .errors import RefformerError, check, check_array
from .ops import dropout_backward, dropout_forward, linear_backward, linear_forward, softmax_backward, softmax_forward

# ---------------------------------------------------------------------------- masks


def causal_mask(n_queries, n_keys=None, past=0):
    """Boolean [T, S]: query i (at absolute position past + i) may attend to keys 0 .. past + i."""
    n_keys = past + n_queries if n_keys is None else n_keys
    return np.arange(n_keys)[None, :] <= past + np.arange(n_queries)[:, None]


def padding_mask(keep):
    """Key-padding mask: keep [B, S] (1/True = real token) -> boolean [B, 1, 1, S]."""
    return np.asarray(keep).astype(bool)[:, None, None, :]


def check_mask(name, mask, scores_shape):
    """A mask must be boolean or floating and broadcast to the scores' shape [B, H, T, S]."""
    if mask is None:
        return
    if not isinstance(mask, np.ndarray) or mask.dtype.kind not in "bf":
        raise RefformerError(f"{name} must be a boolean or floating numpy array")
    ok = mask.ndim <= 4 and all(m in (1, s) for m, s in zip(mask.shape[::-1], scores_shape[::-1]))
    check(ok, f"{name} has shape {list(mask.shape)}, which does not broadcast to the scores' "
              f"[B, H, T, S] = {list(scores_shape)}")


# ---------------------------------------------------------------------------- attention


def attention_forward(q, k, v, mask=None, *, dropout=0.0, rng=None):
    """softmax(q k^T / sqrt(Dh) + mask) v. q [B, H, T, Dh], k, v [B, H, S, Dh] -> [B, H, T, Dh].

    A query whose keys are all masked gets zero weights (and a zero output), not NaN.
    """
    check_array("q", q, ndim=4, kind="f")
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
    """Returns dq, dk, dv (masks have no gradient)."""
    q, k, v, weights, scale = cache["q"], cache["k"], cache["v"], cache["weights"], cache["scale"]
    dweights = dout @ v.swapaxes(-1, -2)  # [B, H, T, S]
    dv = weights.swapaxes(-1, -2) @ dout  # [B, H, S, Dh]
    dprobs = dropout_backward(cache["dropout"], dweights)
    dscores = softmax_backward(cache["softmax"], dprobs) * scale
    dq = dscores @ k  # [B, H, T, Dh]
    dk = dscores.swapaxes(-1, -2) @ q  # [B, H, S, Dh]
    return dq, dk, dv


# ---------------------------------------------------------------------------- multi-head attention


def split_heads(x, n_heads):
    """[B, T, D] -> [B, H, T, Dh]."""
    B, T, D = x.shape
    return x.reshape(B, T, n_heads, D // n_heads).transpose(0, 2, 1, 3)


def merge_heads(x):
    """[B, H, T, Dh] -> [B, T, D]."""
    B, H, T, Dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, T, H * Dh)


def check_mha_inputs(p, xq, xkv, n_heads):
    D = p["q_proj"]["weight"].shape[0]
    dtype = p["q_proj"]["weight"].dtype
    check(isinstance(n_heads, int) and n_heads >= 1 and D % n_heads == 0,
          f"n_heads={n_heads} must be a positive integer that divides D={D}")
    check_array("xq", xq, ndim=3, shape=(None, None, D), kind="f", dtype=dtype)
    check_array("xkv", xkv, ndim=3, shape=(xq.shape[0], None, D), kind="f", dtype=dtype)


def project_kv(p, xkv, n_heads):
    """Keys and values of xkv [B, S, D] for every head: k, v [B, H, S, Dh] (what a KV cache holds)."""
    k = split_heads(linear_forward(p["k_proj"], xkv)[0], n_heads)
    v = split_heads(linear_forward(p["v_proj"], xkv)[0], n_heads)
    return k, v


def mha_forward(p, xq, xkv, mask=None, *, n_heads, dropout=0.0, rng=None):
    """Multi-head attention. xq [B, T, D] attends to xkv [B, S, D] -> y [B, T, D].

    p holds q_proj, k_proj, v_proj, out_proj ({"weight" [D, D], "bias" [D]}). Self-attention
    passes the same array as xq and xkv. mask broadcasts to [B, H, T, S].
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
    """Returns dxq, dxkv, dp (for self-attention the input gradient is dxq + dxkv)."""
    dmerged, d_out_proj = linear_backward(p["out_proj"], cache["out_proj"], dy)
    n_heads = cache["attention"]["q"].shape[1]
    dq, dk, dv = attention_backward(cache["attention"], split_heads(dmerged, n_heads))
    dxq, d_q_proj = linear_backward(p["q_proj"], cache["q_proj"], merge_heads(dq))
    dxk, d_k_proj = linear_backward(p["k_proj"], cache["k_proj"], merge_heads(dk))
    dxv, d_v_proj = linear_backward(p["v_proj"], cache["v_proj"], merge_heads(dv))
    dp = {"q_proj": d_q_proj, "k_proj": d_k_proj, "v_proj": d_v_proj, "out_proj": d_out_proj}
    return dxq, dxk + dxv, dp


def mha_cached_forward(p, xq, k, v, mask=None, *, n_heads):
    """Inference-only attention of xq [B, T, D] to already projected k, v [B, H, S, Dh] -> [B, T, D].

    The building block of incremental decoding: k, v come from project_kv (cross-attention,
    computed once) or from a self-attention cache extended by the new positions.
    """
    q = split_heads(linear_forward(p["q_proj"], xq)[0], n_heads)  # [B, H, T, Dh]
    context, _ = attention_forward(q, k, v, mask)
    return linear_forward(p["out_proj"], merge_heads(context))[0]
