"""ONNX twins of refimpl/attention.py: masks, scaled dot-product attention, heads, multi-head attention and the
cached self-attention of incremental decoding (with its two cache layouts: growing, and static slots).

Builders follow export/ops.py's conventions (Graph g, dotted prefix = node path, output names returned).
Shapes: B batch, T queries, S (or P + T, or L) keys, D model width, H query heads, Hkv key/value heads (dividing
H: grouped-query attention), Dh head size (cfg.head_dim; D / H unless the model says otherwise).
The position features of issue 13 are computed once per stack and passed to every self-attention: rotary_tables
(RoPE's cos, sin from the positions) and relative_position_bias (T5's bias from the query and key indices).
"""

import numpy as np
from onnx import TensorProto

from refformer.refimpl.attention import relative_position_bucket

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
    query_index, key_index = sequence_indices(g, ids, keep, at)
    causal = g.op("GreaterOrEqual", [g.op("Unsqueeze", [query_index, g.const([1], "axes_1")], at),
                                     key_index], at)  # [T, P + T]
    return g.op("And", [padding_mask(g, keep, at), causal], at)


def sequence_indices(g, ids, keep, at):
    """The places in the sequence of the T new queries, P .. P + T - 1, and of all P + T keys, 0 .. P + T - 1
    (int64 [T] and [P + T]), from ids [B, T] and keep [B, P + T]: what causal_padding_mask and T5's relative bias
    (refimpl.model's _self_attention_positions: query index P + i, key index j) read.

    Raises nothing: node building only.
    """
    total = g.op("Gather", [g.op("Shape", [keep], at), g.const(1, "one_index")], at, name="TotalLength")  # P + T
    new = g.op("Gather", [g.op("Shape", [ids], at, name="ShapeIds"), g.const(1, "one_index")], at, name="NewLength")
    past = g.op("Sub", [total, new], at)
    query_index = g.op("Range", [past, total, g.const(1, "one")], at, name="QueryIndex")  # [T]
    key_index = g.op("Range", [g.const(0, "zero"), total, g.const(1, "one")], at, name="KeyIndex")  # [P + T]
    return query_index, key_index


# ---------------------------------------------------------------------------- position features


def rotary_tables(g, cfg, positions, at):
    """Twin of refimpl.attention.rotary_tables: RoPE's cos and sign-folded sin of positions [B, T] int64, as
    [B, 1, T, Dh] in g's float type (broadcast over the heads). angle[b, t, i] = positions[b, t] * inv_freq[i mod
    Dh/2], inv_freq = rope_theta ** -(0, 2, .., Dh - 2) / Dh (Su et al. 2021, in transformers' rotate-half layout),
    computed in float64 as refimpl computes it, then cast. The sin table comes with rotate_half's sign folded in
    (-sin on the first half, sin on the second), so that rotate needs no Neg: (-x2) sin = x2 (-sin) exactly.

    positions ─Cast(double)─Unsqueeze─Mul(inv_freq ++ inv_freq)─┬─Cos──────────────Cast─Unsqueeze─▶ cos
                                                                └─Sin─Mul(-1 ++ 1)─Cast─Unsqueeze─▶ signed sin

    Computed once per stack and step (every layer reads them). No checks: reached only through export_model, which
    loads a checked cfg (an even head_dim) and params.
    """
    Dh = cfg.head_dim
    inv_freq = 1.0 / float(cfg.rope_theta) ** (np.arange(0, Dh, 2, dtype=np.float64) / Dh)
    frequencies = g.const(np.concatenate([inv_freq, inv_freq]), "rope_inv_freq", np.float64)  # [Dh]
    signs = g.const(np.repeat([-1.0, 1.0], Dh // 2), "rope_half_signs", np.float64)  # [Dh]
    as_double = g.cast(positions, TensorProto.DOUBLE, at)
    angles = g.op("Mul", [g.op("Unsqueeze", [as_double, g.const([2], "axes_2")], at), frequencies], at)  # [B, T, Dh]
    tables = []
    for op in ("Cos", "Sin"):
        table = g.op(op, [angles], at)
        if op == "Sin":
            table = g.op("Mul", [table, signs], at, name="SignedSin")
        table = g.cast(table, g.float_type, at, name=f"Cast{op}")
        tables.append(g.op("Unsqueeze", [table, g.const([1], "axes_1")], at, name=f"Unsqueeze{op}"))
    return tuple(tables)


def rotate(g, x, rotary, head_dim, at):
    """Twin of refimpl.attention.rotary_forward: x [B, h, T, Dh] -> x * cos + rotate_half(x) * sin with rotary =
    (cos, signed sin) [B, 1, T, Dh] (rotary_tables); rotate_half(x) = cat(-x[..., Dh/2:], x[..., :Dh/2])
    (transformers' rotate_half), computed as cat(x[..., Dh/2:], x[..., :Dh/2]) times the signed sin: the same
    products, without a Neg node (a Gather of the swapped halves was slower on the CPU than Split and Concat).

    x ─┬─Mul(cos)─────────────────────────────────────┐
       └─Split(halves)─Concat(second, first)─Mul(signed sin)─Add─▶ rotated x

    x and the output in g's float type. No checks: reached only through export_model.
    """
    cos, signed_sin = rotary
    half = head_dim // 2
    first, second = g.op("Split", [x, g.const([half, half], "rope_halves")], at, n_outputs=2, axis=-1)
    swapped = g.op("Concat", [second, first], at, name="SwapHalves", axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos], at), g.op("Mul", [swapped, signed_sin], at)], at, name="Rotary")


def relative_bucket_table(cfg, bidirectional):
    """T5's bucket of each relative position r = key index - query index in [-M, M] (M = relative_max_distance),
    an int64 array [2M + 1] indexed by r + M: refimpl.attention.relative_position_bucket itself, evaluated at
    export. Beyond M every distance falls in the last bucket of its side (the logarithmic buckets stop at M), so
    the graph clips r to [-M, M] and gathers: no float logarithm in the graph to round differently.

    Raises nothing: cfg is a checked Config.
    """
    M = cfg.relative_max_distance
    return relative_position_bucket(np.arange(-M, M + 1), bidirectional=bidirectional,
                                    num_buckets=cfg.relative_num_buckets, max_distance=M)


def relative_position_bias(g, cfg, name, table, query_index, key_index, *, bidirectional, at):
    """Twin of refimpl.attention.relative_position_bias_forward with transformers' T5 index semantics: bias[0, h,
    i, j] = table[bucket(key_index[j] - query_index[i]), h] -> float32 [1, H, T, S]; query_index [T], key_index [S]
    int64 (sequence_indices: query P + i, key j). table [num_buckets, H] is the stack's
    relative_attention_bias.weight (initializer name), kept in float32 in fp16 graphs too. bidirectional in the
    encoder, causal in the decoder.

    key_index ─Sub(query_index)─Min(M)─Max(-M)─Add(M)─Gather(relative_bucket_table)─Gather(table)─Transpose─▶ bias

    No checks: reached only through export_model, which loads a checked cfg and params.
    """
    M = cfg.relative_max_distance
    side = "bidirectional" if bidirectional else "causal"
    relative = g.op("Sub", [g.op("Unsqueeze", [key_index, g.const([0], "axes_0")], at),
                            g.op("Unsqueeze", [query_index, g.const([1], "axes_1")], at)], at)  # [T, S]
    clipped = g.op("Max", [g.op("Min", [relative, g.const(M, "relative_max")], at), g.const(-M, "relative_min")], at)
    index = g.op("Add", [clipped, g.const(M, "relative_max")], at)
    buckets = g.op("Gather", [g.const(relative_bucket_table(cfg, bidirectional), f"relative_buckets_{side}"), index],
                   at, name="GatherBuckets")
    bias = g.op("Gather", [g.weight(name, table, dtype=np.float32), buckets], at, name="GatherBias")  # [T, S, H]
    return g.op("Unsqueeze", [g.op("Transpose", [bias], at, perm=[2, 0, 1]), g.const([0], "axes_0")], at)


# ---------------------------------------------------------------------------- attention and heads


def repeat_kv(g, x, n_heads, n_rep, head_dim, at, name):
    """Twin of refimpl.attention's repeat_kv (transformers' repeat_kv; grouped-query attention, Ainslie et al. 2023):
    x [B, Hkv, S, Dh] -> [B, Hkv * n_rep = H, S, Dh], each kv head n_rep times in a row (query head h reads kv head
    h // n_rep). x ─Unsqueeze(2)─Expand(n_rep)─Reshape─▶ [B, H, S, Dh]

    Keeps x's dtype. No checks: reached only through export_model.
    """
    x = g.op("Unsqueeze", [x, g.const([2], "axes_2")], at, name=f"Unsqueeze{name}")
    x = g.op("Expand", [x, g.const([1, 1, n_rep, 1, 1], "repeat_kv")], at, name=f"Repeat{name}")
    return g.op("Reshape", [x, g.const([0, n_heads, -1, head_dim], "repeat_kv_shape")], at, name=f"Merge{name}")


def attention(g, q, k, v, mask, scale, at, *, groups=None, position_bias=None):
    """Twin of refimpl.attention.attention_forward (Vaswani et al. 2017, eq. 1): softmax(q k^T * scale + position_bias,
    masked) v. q [B, H, T, Dh], k, v [B, Hkv, S, Dh] (groups = (H, Hkv, Dh) when Hkv < H), mask bool broadcasting
    to [B, H, T, S] (True = attend), position_bias float32 broadcasting to [B, H, T, S] or None -> [B, H, T, Dh].

    The softmax runs in float32 (fp16 graphs too); rows with every key masked give zeros, as refimpl's:
    q ─MatMul(k^T)─Cast─Mul(scale)─Add(position_bias)?─Where(mask, ·, lowest)─Softmax─Mul(mask)─Cast─MatMul(v)─▶ out

    Grouped-query attention (Hkv < H, Ainslie et al. 2023; query head h reads kv head h // (H / Hkv), as
    transformers' repeat_kv): without a position bias, q is viewed as [B, Hkv, G, T, Dh] (G = H / Hkv) against k, v
    as [B, Hkv, 1, S, Dh], so MatMul's broadcasting reads each kv head for its G query heads without copying the
    cache G times (grouped_scores); with one, k and v are repeated (repeat_kv).

    q, k, v and the output in g's float type. No checks: reached only through export_model, which loads a checked cfg
    and params.
    """
    grouped = groups is not None and groups[1] != groups[0]
    if grouped and position_bias is None:
        return grouped_attention(g, q, k, v, mask, scale, at, groups)
    if grouped:
        n_heads, n_kv_heads, head_dim = groups
        k = repeat_kv(g, k, n_heads, n_heads // n_kv_heads, head_dim, at, "Keys")
        v = repeat_kv(g, v, n_heads, n_heads // n_kv_heads, head_dim, at, "Values")
    scores = g.op("MatMul", [q, g.op("Transpose", [k], at, perm=[0, 1, 3, 2])], at, name="MatMulQK")
    scores = g.op("Mul", [g.to_float32(scores, at, "CastScores"), g.const(scale, "attention_scale", np.float32)], at)
    if position_bias is not None:
        scores = g.op("Add", [scores, position_bias], at, name="PositionBias")
    return masked_softmax_values(g, scores, mask, v, at)


def masked_softmax_values(g, scores, mask, v, at):
    """attention's second half: Where(mask, scores, lowest)─Softmax─Mul(mask)─Cast─MatMul(v) (scores float32, mask
    bool broadcasting to them). Raises nothing: node building only."""
    lowest = g.const(np.finfo(np.float32).min, "lowest", np.float32)
    scores = g.op("Where", [mask, scores, lowest], at)
    probs = g.op("Softmax", [scores], at, axis=-1)
    probs = g.op("Mul", [probs, g.cast(mask, TensorProto.FLOAT, at, "CastMask")], at, name="ZeroMaskedRows")
    return g.op("MatMul", [g.to_graph_float(probs, at, "CastProbs"), v], at, name="MatMulPV")


def grouped_attention(g, q, k, v, mask, scale, at, groups):
    """attention for Hkv < H without a position bias, the same values without repeat_kv's copies:

    q [B, H, T, Dh] ─Reshape [B, Hkv, G, T, Dh]─┐
    k [B, Hkv, S, Dh] ─Unsqueeze(2)─Transpose───MatMul─▶ [B, Hkv, G, T, S] ─(attention's scale, mask, softmax)
    v [B, Hkv, S, Dh] ─Unsqueeze(2)──────────────────────────────MatMul─Reshape─▶ [B, H, T, Dh]

    mask [B, 1, T, S] (or broadcasting to it) gets an axis for G. Raises nothing: node building only.
    """
    n_heads, n_kv_heads, head_dim = groups
    q = g.op("Reshape", [q, g.const([0, n_kv_heads, n_heads // n_kv_heads, -1, head_dim], "group_heads_shape")],
             at, name="GroupHeads")
    k = g.op("Unsqueeze", [k, g.const([2], "axes_2")], at, name="UnsqueezeKeys")
    v = g.op("Unsqueeze", [v, g.const([2], "axes_2")], at, name="UnsqueezeValues")
    scores = g.op("MatMul", [q, g.op("Transpose", [k], at, perm=[0, 1, 2, 4, 3])], at, name="MatMulQK")
    scores = g.op("Mul", [g.to_float32(scores, at, "CastScores"), g.const(scale, "attention_scale", np.float32)], at)
    mask = g.op("Unsqueeze", [mask, g.const([2], "axes_2")], at, name="UnsqueezeMask")
    context = masked_softmax_values(g, scores, mask, v, at)
    return g.op("Reshape", [context, g.const([0, n_heads, -1, head_dim], "merge_groups_shape")], at,
                name="MergeGroups")


def split_heads(g, x, n_heads, head_dim, at, shape_name="split_heads_shape"):
    """Twin of refimpl.attention.split_heads: [B, T, h Dh] -> [B, h, T, Dh] (h = n_heads: the query heads H, or the
    kv heads Hkv with their own shape constant shape_name).

    Keeps x's dtype (g's float type). No checks: reached only through export_model, which loads a checked cfg and
    params.
    """
    x = g.op("Reshape", [x, g.const([0, 0, n_heads, head_dim], shape_name)], at, name="SplitHeads")
    return g.op("Transpose", [x], at, perm=[0, 2, 1, 3], name="TransposeHeads")


def merge_heads(g, x, d_model, at):
    """Twin of refimpl.attention.merge_heads: [B, H, T, Dh] -> [B, T, H Dh] (d_model = H Dh, D unless head_dim says
    otherwise).

    Keeps x's dtype (g's float type). No checks: reached only through export_model, which loads a checked cfg and
    params.
    """
    x = g.op("Transpose", [x], at, perm=[0, 2, 1, 3], name="TransposeBack")
    return g.op("Reshape", [x, g.const([0, 0, d_model], "merge_heads_shape")], at, name="MergeHeads")


def project_kv(g, cfg, prefix, p, x, rotary=None):
    """Twin of refimpl.attention.project_kv: keys and values k, v [B, Hkv, S, Dh] of x [B, S, D] for every kv head
    (Hkv = cfg.n_kv_heads), the keys rotated by rotary = (cos, sin) [B, 1, S, Dh] (rotary_tables) when given, so a
    cache holds rotated keys.

    Activations in g's float type (float32 or float16). No checks: reached only through export_model, which loads a
    checked cfg and params.
    """
    at = node_path(prefix)
    shape_name = "split_heads_shape" if cfg.n_kv_heads == cfg.n_heads else "split_kv_heads_shape"
    k = split_heads(g, linear(g, f"{prefix}.k_proj", p["k_proj"], x), cfg.n_kv_heads, cfg.head_dim, at + "/k",
                    shape_name)
    v = split_heads(g, linear(g, f"{prefix}.v_proj", p["v_proj"], x), cfg.n_kv_heads, cfg.head_dim, at + "/v",
                    shape_name)
    if rotary is not None:
        k = rotate(g, k, rotary, cfg.head_dim, at + "/k/rotary")
    return k, v


def mha_cached(g, cfg, prefix, p, xq, k, v, mask, *, rotary=None, position_bias=None):
    """Twin of refimpl.attention.mha_cached_forward: xq [B, T, D] attends to projected k, v [B, Hkv, S, Dh] ->
    [B, T, D], with the scale cfg.attention_scale; rotary = (cos, sin) [B, 1, T, Dh] of the queries' positions
    rotates q (the keys were rotated when projected); position_bias float32 [1, H, T, S] is added to the scores.

    xq ─q_proj─SplitHeads─rotate?─attention(k, v, mask, position_bias)─MergeHeads─out_proj─▶ y

    Activations in g's float type (float32 or float16). No checks: reached only through export_model, which loads a
    checked cfg and params.
    """
    at = node_path(prefix)
    q = split_heads(g, linear(g, f"{prefix}.q_proj", p["q_proj"], xq), cfg.n_heads, cfg.head_dim, at + "/q")
    if rotary is not None:
        q = rotate(g, q, rotary, cfg.head_dim, at + "/q/rotary")
    context = attention(g, q, k, v, mask, cfg.attention_scale, at + "/attention",
                        groups=(cfg.n_heads, cfg.n_kv_heads, cfg.head_dim), position_bias=position_bias)
    return linear(g, f"{prefix}.out_proj", p["out_proj"], merge_heads(g, context, cfg.n_heads * cfg.head_dim, at))


def mha(g, cfg, prefix, p, xq, xkv, mask, *, rotary=None, position_bias=None):
    """Twin of refimpl.attention.mha_forward (inference): xq [B, T, D] attends to xkv [B, S, D] -> [B, T, D]
    (rotary: the self-attention's, as mha_cached's; position_bias float32 [1, H, T, S] or None).

    xkv ─project_kv─▶ k, v;  xq ─mha_cached(k, v, mask)─▶ y

    Activations in g's float type (float32 or float16). No checks: reached only through export_model, which loads a
    checked cfg and params.
    """
    k, v = project_kv(g, cfg, prefix, p, xkv, rotary)
    return mha_cached(g, cfg, prefix, p, xq, k, v, mask, rotary=rotary, position_bias=position_bias)


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


def cached_self_attention(g, cfg, prefix, p, x, past_k, past_v, *, mask, update_cache=concat_cache, rotary=None,
                          position_bias=None):
    """Twin of refimpl.attention.cached_self_attention_forward: self-attention of the T new positions x [B, T, D]
    over the cache past_k, past_v [B, Hkv, P, Dh] -> (y [B, T, D], present_k, present_v). rotary (cos, sin)
    [B, 1, T, Dh] of the new positions rotates their queries and keys before the cache; position_bias float32
    [1, H, T, P + T] (T5's relative bias) is added to the scores.

    x ─project_kv─▶ k_new, v_new ─update_cache(past, new)─▶ present k, v ─┐
    x ─────────────────────────────────────────────────mha_cached(present, mask)─▶ y

    update_cache: concat_cache (the growing cache: present [B, H, P + T, Dh], mask [B, 1, T, P + T]) or
    write_cache(slot_mask) (the static cache: T = 1, present [B, H, L, Dh], mask [B, 1, 1, L]).

    Activations in g's float type (float32 or float16). No checks: reached only through export_model, which loads a
    checked cfg and params.
    """
    k_new, v_new = project_kv(g, cfg, prefix, p, x, rotary)  # [B, Hkv, T, Dh]
    at = node_path(prefix)
    present_k = update_cache(g, at + "/key_cache", past_k, k_new)
    present_v = update_cache(g, at + "/value_cache", past_v, v_new)
    y = mha_cached(g, cfg, prefix, p, x, present_k, present_v, mask, rotary=rotary, position_bias=position_bias)
    return y, present_k, present_v
