"""ONNX builders that mirror refimpl's functions one to one (same names, same order).

Each builder takes the Graph, the dotted prefix of its parameters (which is also its node
path), the parameter subtree and its input names, and returns output names. Only inference
is exported: dropout is the identity.
"""

import math

import numpy as np
from onnx import TensorProto

from .graph import node_path

# ---------------------------------------------------------------------------- ops


def linear(g, prefix, p, x):
    """x @ W + b:   x ──MatMul(W)──Add(b)──▶ y"""
    at = node_path(prefix)
    y = g.op("MatMul", [x, g.weight(f"{prefix}.weight", p["weight"])], at)
    if "bias" in p:
        y = g.op("Add", [y, g.weight(f"{prefix}.bias", p["bias"])], at)
    return y


def layer_norm(g, prefix, p, x, eps):
    """LayerNormalization over the last axis; statistics in float32 (stash_type=1) even in fp16 graphs."""
    at = node_path(prefix)
    return g.op("LayerNormalization", [x, g.weight(f"{prefix}.weight", p["weight"]), g.weight(f"{prefix}.bias", p["bias"])],
                at, axis=-1, epsilon=float(eps), stash_type=1)


def rms_norm(g, prefix, p, x, eps):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32:

    x ─Cast─┬─Mul(x)─ReduceMean─Add(eps)─Sqrt─┐
            └──────────────────────────────Div─Cast─Mul(weight)─▶ y
    """
    at = node_path(prefix)
    x32 = g.to_float32(x, at)
    mean_square = g.reduce_mean_last(g.op("Mul", [x32, x32], at), at)
    rms = g.op("Sqrt", [g.op("Add", [mean_square, g.const(eps, "rms_eps", np.float32)], at)], at)
    xhat = g.to_graph_float(g.op("Div", [x32, rms], at), at)
    return g.op("Mul", [xhat, g.weight(f"{prefix}.weight", p["weight"])], at)


def norm(g, cfg, prefix, p, x):
    """Dispatch like refimpl.ops.norm_forward."""
    if cfg.norm == "layernorm":
        return layer_norm(g, prefix, p, x, cfg.norm_eps)
    return rms_norm(g, prefix, p, x, cfg.norm_eps)


def scalar(g, value, name):
    """A scalar in the graph's float type."""
    return g.weight(f"scalar.{name}", np.asarray(value))


def activation(g, kind, x, at):
    """relu: Relu; gelu: 0.5 x (1 + Erf(x / sqrt 2)); gelu_tanh: 0.5 x (1 + Tanh(...)); silu: x Sigmoid(x)."""
    if kind == "relu":
        return g.op("Relu", [x], at)
    if kind == "silu":
        return g.op("Mul", [x, g.op("Sigmoid", [x], at)], at)
    if kind == "gelu":
        inner = g.op("Erf", [g.op("Mul", [x, scalar(g, 1.0 / math.sqrt(2.0), "inv_sqrt2")], at)], at)
    else:
        cube = g.op("Mul", [g.op("Mul", [x, x], at), x], at)
        poly = g.op("Add", [x, g.op("Mul", [cube, scalar(g, 0.044715, "gelu_c")], at)], at)
        inner = g.op("Tanh", [g.op("Mul", [poly, scalar(g, math.sqrt(2.0 / math.pi), "sqrt_2_over_pi")], at)], at)
    half_x = g.op("Mul", [x, scalar(g, 0.5, "half")], at)
    return g.op("Mul", [half_x, g.op("Add", [inner, scalar(g, 1.0, "one")], at)], at)


# ---------------------------------------------------------------------------- embeddings


def embed(g, cfg, prefix, p_tokens_name, p_tokens, p_stack, ids, positions):
    """E[ids] * sqrt(D)? + pos[positions]:

    ids ──Gather(E)──Mul(sqrt D)──┐
    positions ──Gather(pos)──────Add──▶ x
    """
    at = node_path(prefix) + "/embed"
    x = g.op("Gather", [g.weight(f"{p_tokens_name}.weight", p_tokens["weight"]), ids], at, name="GatherTokens")
    if cfg.embed_scale:
        x = g.op("Mul", [x, scalar(g, math.sqrt(cfg.d_model), "embed_scale")], at)
    if cfg.positional == "learned":
        table = g.weight(f"{prefix}.embed_positions.weight", p_stack["embed_positions"]["weight"])
    else:
        from refformer.refimpl.ops import sinusoidal_table

        table = g.weight(f"{prefix}.sinusoidal_positions", sinusoidal_table(cfg.max_positions, cfg.d_model))
    return g.op("Add", [x, g.op("Gather", [table, positions], at, name="GatherPositions")], at)


# ---------------------------------------------------------------------------- masks and attention


def padding_mask(g, keep, at):
    """keep [B, S] int64 (1 = real token) -> bool [B, 1, 1, S]."""
    as_bool = g.cast(keep, TensorProto.BOOL, at)
    return g.op("Unsqueeze", [as_bool, g.const([1, 2], "axes_1_2")], at)


def causal_padding_mask(g, ids, keep, at):
    """Self-attention mask of the new queries: key j visible to query i (at index P + i) iff j <= P + i and keep[j].

    keep [B, P + T] ─Cast─Unsqueeze──────────────────────┐
    Range(P, P + T)[:, None] >= Range(0, P + T)[None, :] ─And──▶ bool [B, 1, T, P + T]
    """
    total = g.op("Gather", [g.op("Shape", [keep], at), g.const(1, "one_index")], at, name="TotalLength")  # P + T
    new = g.op("Gather", [g.op("Shape", [ids], at, name="ShapeIds"), g.const(1, "one_index")], at, name="NewLength")
    past = g.op("Sub", [total, new], at)
    query_index = g.op("Range", [past, total, g.const(1, "one")], at, name="QueryIndex")  # [T]
    key_index = g.op("Range", [g.const(0, "zero"), total, g.const(1, "one")], at, name="KeyIndex")  # [P + T]
    causal = g.op("GreaterOrEqual", [g.op("Unsqueeze", [query_index, g.const([1], "axes_1")], at),
                                     key_index], at)  # [T, P + T]
    return g.op("And", [padding_mask(g, keep, at), causal], at)


def attention(g, q, k, v, mask, scale, at):
    """softmax(q k^T / sqrt(Dh), masked) v, in float32 for the softmax; all-masked rows give zeros (as refimpl):

    q ─MatMul(k^T)─Cast─Mul(scale)─Where(mask, ·, lowest)─Softmax─Mul(mask)─Cast─MatMul(v)─▶ out
    """
    scores = g.op("MatMul", [q, g.op("Transpose", [k], at, perm=[0, 1, 3, 2])], at, name="MatMulQK")
    scores = g.op("Mul", [g.to_float32(scores, at, "CastScores"), g.const(scale, "attention_scale", np.float32)], at)
    lowest = g.const(np.finfo(np.float32).min, "lowest", np.float32)
    scores = g.op("Where", [mask, scores, lowest], at)
    probs = g.op("Softmax", [scores], at, axis=-1)
    probs = g.op("Mul", [probs, g.cast(mask, TensorProto.FLOAT, at, "CastMask")], at, name="ZeroMaskedRows")
    return g.op("MatMul", [g.to_graph_float(probs, at, "CastProbs"), v], at, name="MatMulPV")


def split_heads(g, x, n_heads, head_dim, at):
    """[B, T, D] -> [B, H, T, Dh]."""
    x = g.op("Reshape", [x, g.const([0, 0, n_heads, head_dim], "split_heads_shape")], at, name="SplitHeads")
    return g.op("Transpose", [x], at, perm=[0, 2, 1, 3], name="TransposeHeads")


def merge_heads(g, x, d_model, at):
    """[B, H, T, Dh] -> [B, T, D]."""
    x = g.op("Transpose", [x], at, perm=[0, 2, 1, 3], name="TransposeBack")
    return g.op("Reshape", [x, g.const([0, 0, d_model], "merge_heads_shape")], at, name="MergeHeads")


def project_kv(g, cfg, prefix, p, x):
    """Keys and values [B, H, S, Dh] of x [B, S, D] for every head."""
    at = node_path(prefix)
    k = split_heads(g, linear(g, f"{prefix}.k_proj", p["k_proj"], x), cfg.n_heads, cfg.head_dim, at + "/k")
    v = split_heads(g, linear(g, f"{prefix}.v_proj", p["v_proj"], x), cfg.n_heads, cfg.head_dim, at + "/v")
    return k, v


def mha_cached(g, cfg, prefix, p, xq, k, v, mask):
    """xq [B, T, D] attends to projected k, v [B, H, S, Dh] -> [B, T, D]:

    xq ─q_proj─SplitHeads─attention(k, v, mask)─MergeHeads─out_proj─▶ y
    """
    at = node_path(prefix)
    q = split_heads(g, linear(g, f"{prefix}.q_proj", p["q_proj"], xq), cfg.n_heads, cfg.head_dim, at + "/q")
    context = attention(g, q, k, v, mask, 1.0 / math.sqrt(cfg.head_dim), at + "/attention")
    return linear(g, f"{prefix}.out_proj", p["out_proj"], merge_heads(g, context, cfg.d_model, at))


# ---------------------------------------------------------------------------- layers


def feed_forward(g, cfg, prefix, p, x):
    """fc1 ─activation─ fc2."""
    h = linear(g, f"{prefix}.fc1", p["fc1"], x)
    return linear(g, f"{prefix}.fc2", p["fc2"], activation(g, cfg.activation, h, node_path(prefix) + "/act"))


def residual(g, cfg, norm_prefix, p_norm, x, sublayer):
    """post-LN: norm(x + f(x)); pre-LN: x + f(norm(x))."""
    at = node_path(norm_prefix)
    if cfg.norm_first:
        return g.op("Add", [x, sublayer(norm(g, cfg, norm_prefix, p_norm, x))], at, name="Residual")
    return norm(g, cfg, norm_prefix, p_norm, g.op("Add", [x, sublayer(x)], at, name="Residual"))


def encoder_layer(g, cfg, prefix, p, x, mask):
    """residual(self-attention) ─ residual(feed-forward)."""
    def self_attention(h):
        k, v = project_kv(g, cfg, f"{prefix}.self_attn", p["self_attn"], h)
        return mha_cached(g, cfg, f"{prefix}.self_attn", p["self_attn"], h, k, v, mask)

    h = residual(g, cfg, f"{prefix}.self_attn_norm", p["self_attn_norm"], x, self_attention)
    return residual(g, cfg, f"{prefix}.ffn_norm", p["ffn_norm"], h,
                    lambda h: feed_forward(g, cfg, f"{prefix}.ffn", p["ffn"], h))


def concat_cache(g, at, past, new):
    """The growing cache: [B, H, P, Dh] + [B, H, T, Dh] -> [B, H, P + T, Dh]."""
    return g.op("Concat", [past, new], at, name="ConcatPast", axis=2)


def write_cache(slot_mask):
    """The static cache: Where(slot_mask [1, 1, L, 1], new [B, H, 1, Dh], cache [B, H, L, Dh]) writes one slot."""
    def write(g, at, cache, new):
        return g.op("Where", [slot_mask, new, cache], at, name="WriteSlot")
    return write


def decoder_layer_step(g, cfg, prefix, p, x, self_mask, past_k, past_v, cross_k=None, cross_v=None, memory_mask=None,
                       update_cache=concat_cache):
    """residual(cached causal self-attention) ─ residual(cross-attention)? ─ residual(feed-forward).

    Returns y and the present self-attention cache: update_cache(past, new) for keys and values
    (Concat on the length axis for the reference graph; a one-slot write for the static graph).
    """
    present = {}

    def self_attention(h):
        k_new, v_new = project_kv(g, cfg, f"{prefix}.self_attn", p["self_attn"], h)
        at = node_path(f"{prefix}.self_attn")
        present["k"] = update_cache(g, at + "/key_cache", past_k, k_new)  # [B, H, P + T (or L), Dh]
        present["v"] = update_cache(g, at + "/value_cache", past_v, v_new)
        return mha_cached(g, cfg, f"{prefix}.self_attn", p["self_attn"], h, present["k"], present["v"], self_mask)

    h = residual(g, cfg, f"{prefix}.self_attn_norm", p["self_attn_norm"], x, self_attention)
    if "cross_attn" in p:
        h = residual(g, cfg, f"{prefix}.cross_attn_norm", p["cross_attn_norm"], h,
                     lambda h: mha_cached(g, cfg, f"{prefix}.cross_attn", p["cross_attn"], h, cross_k, cross_v, memory_mask))
    y = residual(g, cfg, f"{prefix}.ffn_norm", p["ffn_norm"], h,
                 lambda h: feed_forward(g, cfg, f"{prefix}.ffn", p["ffn"], h))
    return y, present["k"], present["v"]


# ---------------------------------------------------------------------------- fused attention (com.microsoft)


def fused_attention(g, cfg, prefix, p, h, key, value, keep32, past=None, causal=False):
    """ONNX Runtime's MultiHeadAttention contrib op in place of split/attention/merge:

    h ─q_proj─┐
    key, value (projected [B, T, D], or cross-attention's [B, H, S, Dh]) ─MultiHeadAttention(mask, past)─out_proj─▶ y

    keep32 [B, total] int32 (1 = real key); past (k, v) [B, H, P, Dh] for self-attention, whose
    present (k, v) [B, H, P + T, Dh] is returned too. causal: query i sees keys up to P + i.
    Fully masked queries get ONNX Runtime's mask filler instead of zeros; they are padding and
    never compared or used.
    """
    at = node_path(prefix)
    q = linear(g, f"{prefix}.q_proj", p["q_proj"], h)
    inputs = [q, key, value, "", keep32] + (["", past[0], past[1]] if past else [])
    outputs = g.op("MultiHeadAttention", inputs, at, n_outputs=3 if past else 1, domain="com.microsoft",
                   num_heads=cfg.n_heads, unidirectional=int(causal))
    context, present = (outputs[0], outputs[1:]) if past else (outputs, None)
    return linear(g, f"{prefix}.out_proj", p["out_proj"], context), present


def decoder_layer_step_fused(g, cfg, prefix, p, x, keep32, past_k, past_v, cross_k=None, cross_v=None, memory_keep32=None):
    """decoder_layer_step with both attentions as MultiHeadAttention nodes; same inputs, same outputs."""
    present = {}

    def self_attention(h):
        k_new = linear(g, f"{prefix}.self_attn.k_proj", p["self_attn"]["k_proj"], h)
        v_new = linear(g, f"{prefix}.self_attn.v_proj", p["self_attn"]["v_proj"], h)
        y, (present["k"], present["v"]) = fused_attention(g, cfg, f"{prefix}.self_attn", p["self_attn"], h, k_new, v_new,
                                                          keep32, past=(past_k, past_v), causal=True)
        return y

    h = residual(g, cfg, f"{prefix}.self_attn_norm", p["self_attn_norm"], x, self_attention)
    if "cross_attn" in p:
        h = residual(g, cfg, f"{prefix}.cross_attn_norm", p["cross_attn_norm"], h,
                     lambda h: fused_attention(g, cfg, f"{prefix}.cross_attn", p["cross_attn"], h, cross_k, cross_v,
                                               memory_keep32)[0])
    y = residual(g, cfg, f"{prefix}.ffn_norm", p["ffn_norm"], h,
                 lambda h: feed_forward(g, cfg, f"{prefix}.ffn", p["ffn"], h))
    return y, present["k"], present["v"]


# ---------------------------------------------------------------------------- the fast static step (com.microsoft)
#
# decoder_static_fused.onnx: the same layer math with fewer, bigger nodes (what matters once a step is
# replayed as a CUDA graph and each kernel launch is a fixed cost):
#   - q, k and v projected by one MatMul over the concatenated weights;
#   - self-attention as GroupQueryAttention over a max-length cache that is both past and present
#     (one buffer, written in place at the row's position);
#   - each residual sum and its bias folded into the next norm (SkipLayerNormalization /
#     SkipSimplifiedLayerNormalization), whose fourth output is the sum itself.


def linear_unbiased(g, prefix, p, x):
    """x @ W, and the name of b (None without one) for a later op to add."""
    y = g.op("MatMul", [x, g.weight(f"{prefix}.weight", p["weight"])], node_path(prefix))
    return y, (g.weight(f"{prefix}.bias", p["bias"]) if "bias" in p else None)


def skip_norm(g, cfg, prefix, p, delta, bias, x, keep_sum):
    """norm(x + delta + bias) in one node; with keep_sum also x + delta + bias (the residual stream).

    delta ─┐
    x ─────SkipLayerNormalization(gamma, beta, bias)─┬─▶ normed
                                                     └─▶ x + delta + bias   (output 3)
    """
    at = node_path(prefix)
    unused = (1, 2) if keep_sum else (1, 2, 3)
    weight = g.weight(f"{prefix}.weight", p["weight"])
    if cfg.norm == "layernorm":
        outputs = g.op("SkipLayerNormalization", [delta, x, weight, g.weight(f"{prefix}.bias", p["bias"])] + ([bias] if bias else []),
                       at, n_outputs=4, unused=unused, domain="com.microsoft", epsilon=float(cfg.norm_eps))
    else:
        outputs = g.op("SkipSimplifiedLayerNormalization", [delta, x, weight] + ([bias] if bias else []),
                       at, n_outputs=4, unused=unused, domain="com.microsoft", epsilon=float(cfg.norm_eps))
    return outputs[0], (outputs[3] if keep_sum else None)


class ResidualStream:
    """The residual stream x of a layer stack, with each sum done inside the next norm.

    pre-LN  (x + f(norm(x))): the sublayer's output waits as `pending` until the next norm adds it;
    post-LN (norm(x + f(x))): the sum and the norm are one SkipLayerNormalization at once.
    A sublayer function returns (y without its bias, bias name or None).
    """

    def __init__(self, g, cfg, x):
        self.g, self.cfg, self.x, self.pending = g, cfg, x, None

    def sublayer(self, norm_prefix, p_norm, f):
        if self.cfg.norm_first:
            self.pending = f(self.normed(norm_prefix, p_norm))
        else:
            delta, bias = f(self.x)
            self.x = skip_norm(self.g, self.cfg, norm_prefix, p_norm, delta, bias, self.x, keep_sum=False)[0]

    def normed(self, prefix, p):
        """norm(x + pending); x becomes x + pending."""
        if self.pending is None:
            return norm(self.g, self.cfg, prefix, p, self.x)
        (delta, bias), self.pending = self.pending, None
        normed, self.x = skip_norm(self.g, self.cfg, prefix, p, delta, bias, self.x, keep_sum=True)
        return normed

    def value(self, at):
        """x with any pending sublayer output added (the stack's output without a final norm)."""
        if self.pending is not None:
            (delta, bias), self.pending = self.pending, None
            delta = add_bias(self.g, delta, bias, at)
            self.x = self.g.op("Add", [self.x, delta], at, name="Residual")
        return self.x


def add_bias(g, y, bias, at):
    """y + bias (y when there is no bias)."""
    return y if bias is None else g.op("Add", [y, bias], at, name="AddBias")


def packed_qkv(g, prefix, p, h):
    """[q | k | v] = h @ [Wq | Wk | Wv] + [bq | bk | bv]: one MatMul instead of three."""
    at = node_path(prefix) + "/qkv_proj"
    names = ("q_proj", "k_proj", "v_proj")
    weight = np.concatenate([p[n]["weight"] for n in names], axis=1)
    y = g.op("MatMul", [h, g.weight(f"{prefix}.qkv_proj.weight", weight)], at)
    if "bias" in p["q_proj"]:  # the parameter tree gives every projection a bias, or (as linear allows) none
        y = g.op("Add", [y, g.weight(f"{prefix}.qkv_proj.bias", np.concatenate([p[n]["bias"] for n in names]))], at)
    return y


def gqa_self_attention(g, cfg, prefix, p, h, past_k, past_v, seqlens32, total32):
    """Causal self-attention of one new token per row, its k/v written into the cache at slot seqlens32[b]:

    h ─qkv_proj─GroupQueryAttention(past_k, past_v, seqlens, total)─out_proj (bias left to the next norm)─▶ y
                           └─▶ present_k, present_v  (the same buffers as past_k, past_v when bound so)
    """
    at = node_path(prefix)
    qkv = packed_qkv(g, prefix, p, h)
    context, present_k, present_v = g.op("GroupQueryAttention", [qkv, "", "", past_k, past_v, seqlens32, total32], at,
                                         n_outputs=3, domain="com.microsoft", num_heads=cfg.n_heads,
                                         kv_num_heads=cfg.n_heads)
    return linear_unbiased(g, f"{prefix}.out_proj", p["out_proj"], context), present_k, present_v


def cross_attention_fused(g, cfg, prefix, p, h, cross_k, cross_v, memory_keep32):
    """Cross-attention as MultiHeadAttention over the encoder's projected keys/values [B, H, S, Dh]."""
    q = linear(g, f"{prefix}.q_proj", p["q_proj"], h)
    context = g.op("MultiHeadAttention", [q, cross_k, cross_v, "", memory_keep32], node_path(prefix),
                   domain="com.microsoft", num_heads=cfg.n_heads)
    return linear_unbiased(g, f"{prefix}.out_proj", p["out_proj"], context)


def activation_with_bias(g, kind, h, bias, at):
    """activation(h + bias) in one contrib node where ONNX Runtime has one:
    gelu: BiasGelu (erf form); gelu_tanh: FastGelu (the same tanh formula); silu: QuickGelu(alpha = 1) = x sigmoid(x);
    relu: Add, Relu."""
    if kind == "gelu":
        return g.op("BiasGelu" if bias else "Gelu", [h] + ([bias] if bias else []), at, domain="com.microsoft")
    if kind == "gelu_tanh":
        return g.op("FastGelu", [h] + ([bias] if bias else []), at, domain="com.microsoft")
    h = add_bias(g, h, bias, at)
    if kind == "silu":
        return g.op("QuickGelu", [h], at, domain="com.microsoft", alpha=1.0)
    return g.op("Relu", [h], at)


def feed_forward_unbiased(g, cfg, prefix, p, x):
    """feed_forward with fc1's bias inside the activation node and fc2's left to the next norm."""
    h, bias = linear_unbiased(g, f"{prefix}.fc1", p["fc1"], x)
    h = activation_with_bias(g, cfg.activation, h, bias, node_path(prefix) + "/act")
    return linear_unbiased(g, f"{prefix}.fc2", p["fc2"], h)


def mha_static_self_attention(g, cfg, prefix, p, h, past_k, past_v, slot_mask, keep32):
    """The same without GroupQueryAttention (which has no fp32 CUDA kernel): the new k/v written into the static
    cache with Where, then MultiHeadAttention over all L slots with the key mask:

    h ─qkv_proj─Split─┬─ q ────────────────────────────────┐
                      └─ k, v ─Reshape─Where(slot, ·, cache)─MultiHeadAttention(mask)─out_proj─▶ y
    """
    at = node_path(prefix)
    D = cfg.d_model
    q, k, v = g.op("Split", [packed_qkv(g, prefix, p, h), g.const([D, D, D], "qkv_split")], at, n_outputs=3, axis=-1)
    heads = g.const([0, cfg.n_heads, 1, cfg.head_dim], "one_token_heads")  # [B, 1, D] -> [B, H, 1, Dh]: T = 1, no transpose
    present_k = write_cache(slot_mask)(g, at + "/key_cache", past_k, g.op("Reshape", [k, heads], at + "/k"))
    present_v = write_cache(slot_mask)(g, at + "/value_cache", past_v, g.op("Reshape", [v, heads], at + "/v"))
    context = g.op("MultiHeadAttention", [q, present_k, present_v, "", keep32], at, domain="com.microsoft",
                   num_heads=cfg.n_heads)
    return linear_unbiased(g, f"{prefix}.out_proj", p["out_proj"], context), present_k, present_v


def decoder_layer_step_static_fused(g, cfg, prefix, p, stream, self_attention, past_k, past_v, cross_k=None, cross_v=None,
                                    memory_keep32=None):
    """decoder_layer_step for one token per row on the residual stream; self_attention(prefix, p, h, past_k, past_v)
    returns ((y, bias), present_k, present_v). Returns the present cache (k, v)."""
    present = {}

    def attend(h):
        y, present["k"], present["v"] = self_attention(f"{prefix}.self_attn", p["self_attn"], h, past_k, past_v)
        return y

    stream.sublayer(f"{prefix}.self_attn_norm", p["self_attn_norm"], attend)
    if "cross_attn" in p:
        stream.sublayer(f"{prefix}.cross_attn_norm", p["cross_attn_norm"],
                        lambda h: cross_attention_fused(g, cfg, f"{prefix}.cross_attn", p["cross_attn"], h, cross_k,
                                                        cross_v, memory_keep32))
    stream.sublayer(f"{prefix}.ffn_norm", p["ffn_norm"], lambda h: feed_forward_unbiased(g, cfg, f"{prefix}.ffn", p["ffn"], h))
    return present["k"], present["v"]
