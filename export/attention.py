"""ONNX twins of refimpl/attention.py: masks, scaled dot-product attention, heads, multi-head attention and the
cached self-attention of incremental decoding (with its two cache layouts: growing, and static slots).

Builders follow export/ops.py's conventions (Graph g, dotted prefix = node path, output names returned).
Shapes: B batch, T queries, S (or P + T, or L) keys, D model width, H heads, Dh = D / H.
"""

import math

import numpy as np
from onnx import TensorProto

from .graph import node_path
from .ops import linear

# ---------------------------------------------------------------------------- masks


def padding_mask(g, keep, at):
    """Twin of refimpl.attention.padding_mask: keep [B, S] int64 (1 = real token) -> bool [B, 1, 1, S].

    No checks: reached only through export_model, which loads a checked cfg and params.
    """
    as_bool = g.cast(keep, TensorProto.BOOL, at)
    return g.op("Unsqueeze", [as_bool, g.const([1, 2], "axes_1_2")], at)


def causal_padding_mask(g, ids, keep, at):
    """Twin of refimpl.attention.causal_mask(T, P + T, past=P) & padding_mask(keep): the self-attention mask of the
    T new queries of ids [B, T]; key j is visible to query i (at index P + i) iff j <= P + i and keep[b, j].

    keep [B, P + T] ─Cast─Unsqueeze──────────────────────┐
    Range(P, P + T)[:, None] >= Range(0, P + T)[None, :] ─And──▶ bool [B, 1, T, P + T]

    ids [B, T] int64, keep [B, P + T] int64. No checks: reached only through export_model, which loads a checked cfg and
    params.
    """
    total = g.op("Gather", [g.op("Shape", [keep], at), g.const(1, "one_index")], at, name="TotalLength")  # P + T
    new = g.op("Gather", [g.op("Shape", [ids], at, name="ShapeIds"), g.const(1, "one_index")], at, name="NewLength")
    past = g.op("Sub", [total, new], at)
    query_index = g.op("Range", [past, total, g.const(1, "one")], at, name="QueryIndex")  # [T]
    key_index = g.op("Range", [g.const(0, "zero"), total, g.const(1, "one")], at, name="KeyIndex")  # [P + T]
    causal = g.op("GreaterOrEqual", [g.op("Unsqueeze", [query_index, g.const([1], "axes_1")], at),
                                     key_index], at)  # [T, P + T]
    return g.op("And", [padding_mask(g, keep, at), causal], at)


# ---------------------------------------------------------------------------- attention and heads


def attention(g, q, k, v, mask, scale, at):
    """Twin of refimpl.attention.attention_forward (Vaswani et al. 2017, eq. 1): softmax(q k^T * scale, masked) v.
    q [B, H, T, Dh], k, v [B, H, S, Dh], mask bool broadcasting to [B, H, T, S] (True = attend) -> [B, H, T, Dh].

    The softmax runs in float32 (fp16 graphs too); rows with every key masked give zeros, as refimpl's:
    q ─MatMul(k^T)─Cast─Mul(scale)─Where(mask, ·, lowest)─Softmax─Mul(mask)─Cast─MatMul(v)─▶ out

    q, k, v and the output in g's float type. No checks: reached only through export_model, which loads a checked cfg
    and params.
    """
    scores = g.op("MatMul", [q, g.op("Transpose", [k], at, perm=[0, 1, 3, 2])], at, name="MatMulQK")
    scores = g.op("Mul", [g.to_float32(scores, at, "CastScores"), g.const(scale, "attention_scale", np.float32)], at)
    lowest = g.const(np.finfo(np.float32).min, "lowest", np.float32)
    scores = g.op("Where", [mask, scores, lowest], at)
    probs = g.op("Softmax", [scores], at, axis=-1)
    probs = g.op("Mul", [probs, g.cast(mask, TensorProto.FLOAT, at, "CastMask")], at, name="ZeroMaskedRows")
    return g.op("MatMul", [g.to_graph_float(probs, at, "CastProbs"), v], at, name="MatMulPV")


def split_heads(g, x, n_heads, head_dim, at):
    """Twin of refimpl.attention.split_heads: [B, T, D] -> [B, H, T, Dh].

    Keeps x's dtype (g's float type). No checks: reached only through export_model, which loads a checked cfg and
    params.
    """
    x = g.op("Reshape", [x, g.const([0, 0, n_heads, head_dim], "split_heads_shape")], at, name="SplitHeads")
    return g.op("Transpose", [x], at, perm=[0, 2, 1, 3], name="TransposeHeads")


def merge_heads(g, x, d_model, at):
    """Twin of refimpl.attention.merge_heads: [B, H, T, Dh] -> [B, T, D].

    Keeps x's dtype (g's float type). No checks: reached only through export_model, which loads a checked cfg and
    params.
    """
    x = g.op("Transpose", [x], at, perm=[0, 2, 1, 3], name="TransposeBack")
    return g.op("Reshape", [x, g.const([0, 0, d_model], "merge_heads_shape")], at, name="MergeHeads")


def project_kv(g, cfg, prefix, p, x):
    """Twin of refimpl.attention.project_kv: keys and values k, v [B, H, S, Dh] of x [B, S, D] for every head.

    Activations in g's float type (float32 or float16). No checks: reached only through export_model, which loads a
    checked cfg and params.
    """
    at = node_path(prefix)
    k = split_heads(g, linear(g, f"{prefix}.k_proj", p["k_proj"], x), cfg.n_heads, cfg.head_dim, at + "/k")
    v = split_heads(g, linear(g, f"{prefix}.v_proj", p["v_proj"], x), cfg.n_heads, cfg.head_dim, at + "/v")
    return k, v


def mha_cached(g, cfg, prefix, p, xq, k, v, mask):
    """Twin of refimpl.attention.mha_cached_forward: xq [B, T, D] attends to projected k, v [B, H, S, Dh] -> [B, T, D].

    xq ─q_proj─SplitHeads─attention(k, v, mask)─MergeHeads─out_proj─▶ y

    Activations in g's float type (float32 or float16). No checks: reached only through export_model, which loads a
    checked cfg and params.
    """
    at = node_path(prefix)
    q = split_heads(g, linear(g, f"{prefix}.q_proj", p["q_proj"], xq), cfg.n_heads, cfg.head_dim, at + "/q")
    context = attention(g, q, k, v, mask, 1.0 / math.sqrt(cfg.head_dim), at + "/attention")
    return linear(g, f"{prefix}.out_proj", p["out_proj"], merge_heads(g, context, cfg.d_model, at))


def mha(g, cfg, prefix, p, xq, xkv, mask):
    """Twin of refimpl.attention.mha_forward (inference): xq [B, T, D] attends to xkv [B, S, D] -> [B, T, D].

    xkv ─project_kv─▶ k, v;  xq ─mha_cached(k, v, mask)─▶ y

    Activations in g's float type (float32 or float16). No checks: reached only through export_model, which loads a
    checked cfg and params.
    """
    k, v = project_kv(g, cfg, prefix, p, xkv)
    return mha_cached(g, cfg, prefix, p, xq, k, v, mask)


# ---------------------------------------------------------------------------- the self-attention cache


def concat_cache(g, at, past, new):
    """The growing cache (refimpl's np.concatenate on axis 2): past [B, H, P, Dh] + new [B, H, T, Dh]
    -> [B, H, P + T, Dh].

    Keeps the caches' dtype (g's float type). No checks: reached only through export_model, which loads a checked cfg
    and params.
    """
    return g.op("Concat", [past, new], at, name="ConcatPast", axis=2)


def write_slot_mask(g, write_index, L):
    """The static cache's write position: write_index [1] int64 -> bool [1, 1, L, 1], true at the slot this call
    writes (node path /decoder/slot).

    No checks: reached only through export_model, which loads a checked cfg and params.
    """
    at = "/decoder/slot"
    return g.op("Reshape", [g.op("Equal", [g.const(np.arange(L), "slots"), write_index], at),
                            g.const([1, 1, L, 1], "slot_mask_shape")], at)


def write_cache(slot_mask):
    """The static cache's update (no refimpl twin: refimpl's cache grows), as an update_cache function for
    cached_self_attention: Where(slot_mask [1, 1, L, 1], new [B, H, 1, Dh], cache [B, H, L, Dh]) writes one slot.

    Caches in g's float type. No checks: reached only through export_model, which loads a checked cfg and params.
    """
    def write(g, at, cache, new):
        return g.op("Where", [slot_mask, new, cache], at, name="WriteSlot")
    return write


def cached_self_attention(g, cfg, prefix, p, x, past_k, past_v, *, mask, update_cache=concat_cache):
    """Twin of refimpl.attention.cached_self_attention_forward: self-attention of the T new positions x [B, T, D]
    over the cache past_k, past_v [B, H, P, Dh] -> (y [B, T, D], present_k, present_v).

    x ─project_kv─▶ k_new, v_new ─update_cache(past, new)─▶ present k, v ─┐
    x ─────────────────────────────────────────────────mha_cached(present, mask)─▶ y

    update_cache: concat_cache (the growing cache: present [B, H, P + T, Dh], mask [B, 1, T, P + T]) or
    write_cache(slot_mask) (the static cache: T = 1, present [B, H, L, Dh], mask [B, 1, 1, L]).

    Activations in g's float type (float32 or float16). No checks: reached only through export_model, which loads a
    checked cfg and params.
    """
    k_new, v_new = project_kv(g, cfg, prefix, p, x)  # [B, H, T, Dh]
    at = node_path(prefix)
    present_k = update_cache(g, at + "/key_cache", past_k, k_new)
    present_v = update_cache(g, at + "/value_cache", past_v, v_new)
    return mha_cached(g, cfg, prefix, p, x, present_k, present_v, mask), present_k, present_v
