"""ONNX Runtime's com.microsoft contrib ops: the pieces of the fused decoder variants (docs/DESIGN.md, Variants).

These have no refimpl twin of their own: each computes what the named refimpl function computes, with fewer,
bigger nodes (what matters once a step is replayed as a CUDA graph and each kernel launch is a fixed cost).
verify checks every fused graph against decoder.onnx and refimpl.

  decoder_fused.onnx:          both attentions as MultiHeadAttention (mha_self_attention, mha_cross_attention);
  decoder_static_mha.onnx:     q, k and v projected by one MatMul (packed_qkv), the new key/value written into the
                               static cache with Where, MultiHeadAttention over all L slots (mha_static_self_attention);
  decoder_static_fused.onnx:   the same with GroupQueryAttention over a cache that is both past and present (one
                               buffer, written in place at the row's position: gqa_self_attention);
  both static ones:            each residual sum and its bias folded into the next norm (SkipLayerNormalization /
                               SkipSimplifiedLayerNormalization, through ResidualStream), the first FFN bias into
                               the activation (BiasGelu, FastGelu, QuickGelu: feed_forward_unbiased).

Builders follow export/ops.py's conventions. A builder named *_unbiased, or one returning (y, bias), leaves its
output projection's bias (an initializer name, or None) for the next fused node to add.
"""

import numpy as np

from .attention import write_cache
from .graph import MICROSOFT, node_path
from .ops import linear, norm

# ---------------------------------------------------------------------------- MultiHeadAttention


def scale_attribute(cfg):
    """{"scale": cfg.attention_scale} for the contrib attention ops when it differs, in float32, from their default
    1 / sqrt(head size) (T5's unscaled attention, a checkpoint's query_pre_attn_scalar); else {} (the node as before).

    Raises nothing: cfg is a checked Config.
    """
    default = np.float32(1.0 / np.sqrt(cfg.head_dim))
    return {} if np.float32(cfg.attention_scale) == default else {"scale": float(cfg.attention_scale)}



def multi_head_attention(g, cfg, prefix, p, h, key, value, keep32, past=None, causal=False):
    """refimpl.attention.mha_cached_forward (or, with past, cached_self_attention_forward) as ONNX Runtime's
    MultiHeadAttention contrib op in place of split/attention/merge:

    h ─q_proj─┐
    key, value (projected [B, T, D], or cross-attention's [B, H, S, Dh]) ─MultiHeadAttention(mask, past)─out_proj─▶ y

    keep32 [B, total] int32 (1 = real key); past (k, v) [B, H, P, Dh] for self-attention, whose present (k, v)
    [B, H, P + T, Dh] is returned too (else None). causal: query i sees keys up to P + i. Fully masked queries get
    ONNX Runtime's mask filler instead of zeros; they are padding and never compared or used. Returns (y, present).

    Activations in g's float type (float32 or float16). No checks: reached only through export_model, which loads a
    checked cfg and params.
    """
    at = node_path(prefix)
    q = linear(g, f"{prefix}.q_proj", p["q_proj"], h)
    inputs = [q, key, value, "", keep32] + (["", past[0], past[1]] if past else [])
    outputs = g.op("MultiHeadAttention", inputs, at, n_outputs=3 if past else 1, domain=MICROSOFT,
                   num_heads=cfg.n_heads, unidirectional=int(causal), **scale_attribute(cfg))
    context, present = (outputs[0], outputs[1:]) if past else (outputs, None)
    return linear(g, f"{prefix}.out_proj", p["out_proj"], context), present


def mha_self_attention(g, cfg, prefix, p, h, past_k, past_v, *, keep32):
    """attention.cached_self_attention (refimpl.attention.cached_self_attention_forward) for decoder_fused.onnx: h
    [B, T, D] over past_k, past_v [B, H, P, Dh] with the key mask keep32 [B, P + T] int32 -> (y [B, T, D], present_k,
    present_v [B, H, P + T, Dh]).

    h ─k_proj, v_proj─MultiHeadAttention(causal, past)─out_proj─▶ y

    Activations in g's float type (float32 or float16). No checks: reached only through export_model, which loads a
    checked cfg and params.
    """
    k_new = linear(g, f"{prefix}.k_proj", p["k_proj"], h)
    v_new = linear(g, f"{prefix}.v_proj", p["v_proj"], h)
    y, (present_k, present_v) = multi_head_attention(g, cfg, prefix, p, h, k_new, v_new, keep32,
                                                     past=(past_k, past_v), causal=True)
    return y, present_k, present_v


def mha_cross_attention(g, cfg, prefix, p, h, cross_k, cross_v, *, keep32):
    """attention.mha_cached (refimpl.attention.mha_cached_forward) for decoder_fused.onnx: h [B, T, D] attends to
    cross_k, cross_v [B, H, S, Dh] with the source key mask keep32 [B, S] int32 -> y [B, T, D].

    Activations in g's float type (float32 or float16). No checks: reached only through export_model, which loads a
    checked cfg and params.
    """
    return multi_head_attention(g, cfg, prefix, p, h, cross_k, cross_v, keep32)[0]


# ---------------------------------------------------------------------------- biases left for the next node


def linear_unbiased(g, prefix, p, x):
    """ops.linear (refimpl.ops.linear_forward) without its bias: (x @ W, the name of b or None) for a later fused node
    to add.

    x and y [..., D_out] in g's float type. No checks: reached only through export_model, which loads a checked cfg and
    params.
    """
    y = g.op("MatMul", [x, g.weight(f"{prefix}.weight", p["weight"])], node_path(prefix))
    return y, (g.weight(f"{prefix}.bias", p["bias"]) if "bias" in p else None)


def add_bias(g, y, bias, at):
    """y + bias (y when bias is None).

    Raises nothing: it adds one node.
    """
    return y if bias is None else g.op("Add", [y, bias], at, name="AddBias")


def activation_with_bias(g, kind, h, bias, at):
    """ops.activation(h + bias) (refimpl.ops.activation_forward) in one contrib node where ONNX Runtime has one:
    gelu: BiasGelu (erf form); gelu_tanh: FastGelu (the same tanh formula); silu: QuickGelu(alpha = 1) = x sigmoid(x);
    relu: Add, Relu.

    h [..., F] in g's float type. No checks: reached only through export_model, which loads a checked cfg and params.
    (an unknown kind builds Relu)
    """
    if kind == "gelu":
        return g.op("BiasGelu" if bias else "Gelu", [h] + ([bias] if bias else []), at, domain=MICROSOFT)
    if kind == "gelu_tanh":
        return g.op("FastGelu", [h] + ([bias] if bias else []), at, domain=MICROSOFT)
    h = add_bias(g, h, bias, at)
    if kind == "silu":
        return g.op("QuickGelu", [h], at, domain=MICROSOFT, alpha=1.0)
    return g.op("Relu", [h], at)


def feed_forward_unbiased(g, cfg, prefix, p, x):
    """layers.feed_forward (refimpl.layers.feed_forward_forward) with fc1's bias inside the activation node and fc2's
    left to the next norm: x [B, T, D] -> (y [B, T, D] without fc2's bias, fc2's bias name or None). With cfg.ffn_gated
    (SwiGLU / GEGLU, Shazeer 2020) the activation is multiplied by fc_up(x), in standard ops, before fc2.

    Activations in g's float type (float32 or float16). No checks: reached only through export_model, which loads a
    checked cfg and params.
    """
    h, bias = linear_unbiased(g, f"{prefix}.fc1", p["fc1"], x)
    h = activation_with_bias(g, cfg.activation, h, bias, node_path(prefix) + "/act")
    if cfg.ffn_gated:
        h = g.op("Mul", [h, linear(g, f"{prefix}.fc_up", p["fc_up"], x)], node_path(prefix) + "/gate")
    return linear_unbiased(g, f"{prefix}.fc2", p["fc2"], h)


# ---------------------------------------------------------------------------- residual sums inside the norms


def skip_norm(g, cfg, prefix, p, delta, bias, x, keep_sum):
    """ops.norm(x + delta + bias) (refimpl.ops.norm_forward of the residual sum) in one node; with keep_sum also x +
    delta + bias (the residual stream).

    delta ─┐
    x ─────SkipLayerNormalization(gamma, beta, bias)─┬─▶ normed
                                                     └─▶ x + delta + bias   (output 3)

    SkipSimplifiedLayerNormalization (no beta) for rmsnorm. Returns (normed, the sum or None).

    delta, x [B, T, D] in g's float type. No checks: reached only through export_model, which loads a checked cfg and
    params.
    """
    at = node_path(prefix)
    unused = (1, 2) if keep_sum else (1, 2, 3)
    weight = g.weight(f"{prefix}.weight", p["weight"])
    if cfg.norm == "layernorm":
        inputs = [delta, x, weight, g.weight(f"{prefix}.bias", p["bias"])] + ([bias] if bias else [])
        outputs = g.op("SkipLayerNormalization", inputs, at, n_outputs=4, unused=unused, domain=MICROSOFT,
                       epsilon=float(cfg.norm_eps))
    else:
        outputs = g.op("SkipSimplifiedLayerNormalization", [delta, x, weight] + ([bias] if bias else []),
                       at, n_outputs=4, unused=unused, domain=MICROSOFT, epsilon=float(cfg.norm_eps))
    return outputs[0], (outputs[3] if keep_sum else None)


class ResidualStream:
    """The residual stream x of a layer stack (refimpl.layers.residual_forward), each sum done inside the next norm.

    pre-LN  (x + f(norm(x))): the sublayer's output waits as `pending` until the next norm adds it;
    post-LN (norm(x + f(x))): the sum and the norm are one SkipLayerNormalization at once.
    A sublayer function returns (y without its bias, bias name or None).

    x [B, T, D] in g's float type. No checks: reached only through export_model, which loads a checked cfg and params.
    """

    def __init__(self, g, cfg, x):
        self.g, self.cfg, self.x, self.pending = g, cfg, x, None

    def sublayer(self, norm_prefix, p_norm, f):
        """layers.residual on the stream: f(h) -> (delta, bias) is the sublayer; its norm is norm_prefix, p_norm.

        No checks: reached only through export_model, which loads a checked cfg and params.
        """
        if self.cfg.norm_first:
            self.pending = f(self.normed(norm_prefix, p_norm))
        else:
            delta, bias = f(self.x)
            self.x = skip_norm(self.g, self.cfg, norm_prefix, p_norm, delta, bias, self.x, keep_sum=False)[0]

    def normed(self, prefix, p):
        """norm(x + pending); x becomes x + pending.

        Returns [B, T, D] in g's float type. No checks: reached only through export_model, which loads a checked cfg and
        params.
        """
        if self.pending is None:
            return norm(self.g, self.cfg, prefix, p, self.x)
        (delta, bias), self.pending = self.pending, None
        normed, self.x = skip_norm(self.g, self.cfg, prefix, p, delta, bias, self.x, keep_sum=True)
        return normed

    def value(self, at):
        """x with any pending sublayer output added (the stack's output without a final norm).

        Returns [B, T, D] in g's float type. No checks: reached only through export_model, which loads a checked cfg and
        params.
        """
        if self.pending is not None:
            (delta, bias), self.pending = self.pending, None
            delta = add_bias(self.g, delta, bias, at)
            self.x = self.g.op("Add", [self.x, delta], at, name="Residual")
        return self.x


def stream_residual(g, cfg, norm_prefix, p_norm, stream, sublayer):
    """layers.residual's place in layers.decoder_layer for the static fused graphs: the residual step on a
    ResidualStream (whose graph and config it already holds); returns the stream.

    No checks: reached only through export_model, which loads a checked cfg and params.
    """
    stream.sublayer(norm_prefix, p_norm, sublayer)
    return stream


# ---------------------------------------------------------------------------- the static step's attention


def packed_qkv(g, prefix, p, h):
    """[q | k | v] = h @ [Wq | Wk | Wv] + [bq | bk | bv]: one MatMul for the three refimpl.ops.linear_forward
    projections (q_proj, and refimpl.attention.project_kv's k_proj and v_proj). h [B, T, D] -> [B, T, (H + 2 Hkv) Dh]
    (3D for a model with Hkv = H and H Dh = D).

    Activations in g's float type (float32 or float16). No checks: reached only through export_model, which loads a
    checked cfg and params.
    """
    at = node_path(prefix) + "/qkv_proj"
    names = ("q_proj", "k_proj", "v_proj")
    weight = np.concatenate([p[n]["weight"] for n in names], axis=1)
    y = g.op("MatMul", [h, g.weight(f"{prefix}.qkv_proj.weight", weight)], at)
    if "bias" in p["q_proj"]:  # the parameter tree gives every projection a bias, or (as linear allows) none
        y = g.op("Add", [y, g.weight(f"{prefix}.qkv_proj.bias", np.concatenate([p[n]["bias"] for n in names]))], at)
    return y


def gqa_rotary_caches(g, cfg, max_length):
    """GroupQueryAttention's cos_cache and sin_cache [L, Dh / 2] (L = max_length rows, one per cache slot = position)
    for do_rotary: cos and sin of position * inv_freq, inv_freq = rope_theta ** -(0, 2, .., Dh - 2) / Dh, computed in
    float64 as refimpl.attention.rotary_tables computes them, then cast to g's float type. GroupQueryAttention's
    rotate-half layout (rotary_interleaved = 0) reads column i for both halves, as refimpl's cat(freqs, freqs).

    Returns the two initializer names. Raises nothing: cfg is a checked Config (an even head_dim).
    """
    Dh = cfg.head_dim
    inv_freq = 1.0 / float(cfg.rope_theta) ** (np.arange(0, Dh, 2, dtype=np.float64) / Dh)
    angles = np.arange(max_length, dtype=np.float64)[:, None] * inv_freq  # [L, Dh / 2]
    return g.weight("rope_cos_cache", np.cos(angles)), g.weight("rope_sin_cache", np.sin(angles))


def gqa_self_attention(g, cfg, prefix, p, h, past_k, past_v, *, seqlens32, total32, rotary_caches=None):
    """attention.cached_self_attention (refimpl.attention.cached_self_attention_forward) for decoder_static_fused.onnx:
    causal self-attention of one new token per row h [B, 1, D], its k/v written into the cache past_k, past_v
    [B, Hkv, L, Dh] at slot seqlens32[b] ([B] int32; total32 the int32 constant L) -> ((y [B, 1, D], out_proj's
    bias), present_k, present_v [B, Hkv, L, Dh]):

    h ─qkv_proj─GroupQueryAttention(past_k, past_v, seqlens, total, cos, sin)─out_proj (bias left to the next norm)─▶ y
                           └─▶ present_k, present_v  (the same buffers as past_k, past_v when bound so)

    Grouped-query attention (Hkv < H: kv_num_heads; query head h reads kv head h // (H / Hkv), as transformers'
    repeat_kv), any head_dim, the scale attribute when cfg.attention_scale is not 1 / sqrt(Dh), and with
    rotary_caches (gqa_rotary_caches: cos, sin [L, Dh / 2]) RoPE inside the node (do_rotary, rotate-half): the new
    query and key are rotated at their position seqlens32[b] (ONNX Runtime's token-generation position), so the
    cache holds rotated keys as refimpl's does.

    Activations in g's float type (float32 or float16). No checks: reached only through export_model, which loads a
    checked cfg and params.
    """
    at = node_path(prefix)
    qkv = packed_qkv(g, prefix, p, h)
    inputs = [qkv, "", "", past_k, past_v, seqlens32, total32] + (list(rotary_caches) if rotary_caches else [])
    rotary = {"do_rotary": 1, "rotary_interleaved": 0} if rotary_caches else {}
    context, present_k, present_v = g.op("GroupQueryAttention", inputs, at, n_outputs=3, domain=MICROSOFT,
                                         num_heads=cfg.n_heads, kv_num_heads=cfg.n_kv_heads, **rotary,
                                         **scale_attribute(cfg))
    return linear_unbiased(g, f"{prefix}.out_proj", p["out_proj"], context), present_k, present_v


def mha_static_self_attention(g, cfg, prefix, p, h, past_k, past_v, *, slot_mask, keep32):
    """attention.cached_self_attention (refimpl.attention.cached_self_attention_forward) with attention.write_cache for
    decoder_static_mha.onnx (GroupQueryAttention has no fp32 CUDA kernel): h [B, 1, D], past_k, past_v [B, H, L, Dh],
    slot_mask bool [1, 1, L, 1], keep32 [B, L] int32 -> ((y [B, 1, D], out_proj's bias), present_k, present_v
    [B, H, L, Dh]):

    h ─qkv_proj─Split─┬─ q ────────────────────────────────┐
                      └─ k, v ─Reshape─Where(slot, ·, cache)─MultiHeadAttention(mask)─out_proj─▶ y

    Activations in g's float type (float32 or float16). No checks: reached only through export_model, which loads a
    checked cfg and params.
    """
    at = node_path(prefix)
    D = cfg.n_heads * cfg.head_dim  # d_model unless head_dim says otherwise; Hkv = H (reference_only_features)
    q, k, v = g.op("Split", [packed_qkv(g, prefix, p, h), g.const([D, D, D], "qkv_split")], at, n_outputs=3, axis=-1)
    heads = g.const([0, cfg.n_heads, 1, cfg.head_dim], "one_token_heads")  # [B, 1, D] -> [B, H, 1, Dh]: T = 1
    present_k = write_cache(slot_mask)(g, at + "/key_cache", past_k, g.op("Reshape", [k, heads], at + "/k"))
    present_v = write_cache(slot_mask)(g, at + "/value_cache", past_v, g.op("Reshape", [v, heads], at + "/v"))
    context = g.op("MultiHeadAttention", [q, present_k, present_v, "", keep32], at, domain=MICROSOFT,
                   num_heads=cfg.n_heads, **scale_attribute(cfg))
    return linear_unbiased(g, f"{prefix}.out_proj", p["out_proj"], context), present_k, present_v


def mha_cross_attention_unbiased(g, cfg, prefix, p, h, cross_k, cross_v, *, keep32):
    """mha_cross_attention (refimpl.attention.mha_cached_forward) with out_proj's bias left to the next norm: h
    [B, 1, D] attends to cross_k, cross_v [B, H, S, Dh] with keep32 [B, S] int32 -> (y [B, 1, D], out_proj's bias name
    or None).

    Activations in g's float type (float32 or float16). No checks: reached only through export_model, which loads a
    checked cfg and params.
    """
    q = linear(g, f"{prefix}.q_proj", p["q_proj"], h)
    context = g.op("MultiHeadAttention", [q, cross_k, cross_v, "", keep32], node_path(prefix), domain=MICROSOFT,
                   num_heads=cfg.n_heads, **scale_attribute(cfg))
    return linear_unbiased(g, f"{prefix}.out_proj", p["out_proj"], context)
