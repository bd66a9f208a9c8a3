"""ONNX twins of refimpl/layers.py: feed-forward, residual, the encoder layer and THE decoder layer.

There is one decoder layer builder, decoder_layer; the decoder graphs differ only in the pieces they pass it:
the self-attention and cross-attention builders (how attention runs and how the cache is updated) and, for the
static fused graph, the residual and feed-forward builders that fold biases and sums into fused nodes
(export/fused.py). Builders follow export/ops.py's conventions; x is [B, T, D] in the graph's float type.
"""

from .attention import mha
from .graph import node_path
from .ops import activation, linear, norm


def feed_forward(g, cfg, prefix, p, x):
    """Twin of refimpl.layers.feed_forward_forward (inference): x [B, T, D] -> [B, T, D].

    x ─fc1─activation─fc2─▶ y        (p: {"fc1": [D, F] linear, "fc2": [F, D] linear})
    cfg.ffn_gated (SwiGLU / GEGLU, Shazeer 2020): x ─fc1─activation─Mul(fc_up(x))─fc2─▶ y   (p also has "fc_up")

    x, y in g's float type; F = cfg.d_ff. No checks: reached only through export_model, which loads a checked cfg and
    params.
    """
    h = activation(g, cfg.activation, linear(g, f"{prefix}.fc1", p["fc1"], x), node_path(prefix) + "/act")
    if cfg.ffn_gated:
        h = g.op("Mul", [h, linear(g, f"{prefix}.fc_up", p["fc_up"], x)], node_path(prefix) + "/gate")
    return linear(g, f"{prefix}.fc2", p["fc2"], h)


def residual(g, cfg, norm_prefix, p_norm, x, sublayer):
    """Twin of refimpl.layers.residual_forward: post-LN norm(x + f(x)) (Vaswani et al. 2017), or pre-LN
    x + f(norm(x)) when cfg.norm_first (Xiong et al. 2020). sublayer(h) -> f(h), both [B, T, D].

    x in g's float type. No checks: reached only through export_model, which loads a checked cfg and params.
    """
    at = node_path(norm_prefix)
    if cfg.norm_first:
        return g.op("Add", [x, sublayer(norm(g, cfg, norm_prefix, p_norm, x))], at, name="Residual")
    return norm(g, cfg, norm_prefix, p_norm, g.op("Add", [x, sublayer(x)], at, name="Residual"))


def encoder_layer(g, cfg, prefix, p, x, mask, *, rotary=None, position_bias=None):
    """Twin of refimpl.layers.encoder_layer_forward (inference): x [B, S, D], mask bool [B, 1, 1, S] -> [B, S, D];
    the stack's position inputs of the self-attention: rotary (cos, sin) [B, 1, S, Dh] (attention.rotary_tables),
    position_bias float32 [1, H, S, S] (attention.relative_position_bias), or None.

    x ─residual(self-attention)─residual(feed-forward)─▶ y

    Activations in g's float type (float32 or float16). No checks: reached only through export_model, which loads a
    checked cfg and params.
    """
    h = residual(g, cfg, f"{prefix}.self_attn_norm", p["self_attn_norm"], x,
                 lambda h: mha(g, cfg, f"{prefix}.self_attn", p["self_attn"], h, h, mask, rotary=rotary,
                               position_bias=position_bias))
    return residual(g, cfg, f"{prefix}.ffn_norm", p["ffn_norm"], h,
                    lambda h: feed_forward(g, cfg, f"{prefix}.ffn", p["ffn"], h))


def decoder_layer(g, cfg, prefix, p, x, past, cross, self_attention, cross_attention, *, residual=residual,
                  feed_forward=feed_forward):
    """Twin of refimpl.layers.decoder_layer_forward with past (incremental decoding): one decoder layer.

    x ─residual(self_attention)─residual(cross_attention)?─residual(feed_forward)─▶ y

    past: this layer's (past_k, past_v) [B, H, P (or L), Dh]; cross: its (cross_k, cross_v) [B, H, S, Dh], or
    (None, None) for a decoder-only layer (no "cross_attn" in p). The pieces, each called with
    (g, cfg, prefix, p_sublayer, ...):
      self_attention(g, cfg, prefix, p, h, past_k, past_v) -> (y, present_k, present_v);
      cross_attention(g, cfg, prefix, p, h, cross_k, cross_v) -> y;
      residual(g, cfg, norm_prefix, p_norm, x, sublayer) -> x;  feed_forward(g, cfg, prefix, p, h) -> y.
    Graph-wide inputs (masks, cache slots) are bound into them beforehand (functools.partial). Returns
    (y, present_k, present_v).

    x, y and the caches in g's float type. No checks: reached only through export_model, which loads a checked cfg and
    params.
    """
    present = {}

    def attend(h):
        y, present["k"], present["v"] = self_attention(g, cfg, f"{prefix}.self_attn", p["self_attn"], h, *past)
        return y

    h = residual(g, cfg, f"{prefix}.self_attn_norm", p["self_attn_norm"], x, attend)
    if "cross_attn" in p:
        h = residual(g, cfg, f"{prefix}.cross_attn_norm", p["cross_attn_norm"], h,
                     lambda h: cross_attention(g, cfg, f"{prefix}.cross_attn", p["cross_attn"], h, *cross))
    y = residual(g, cfg, f"{prefix}.ffn_norm", p["ffn_norm"], h,
                 lambda h: feed_forward(g, cfg, f"{prefix}.ffn", p["ffn"], h))
    return y, present["k"], present["v"]


def decoder_layers(g, cfg, p, x, past, cross, self_attention, cross_attention, **pieces):
    """The decoder's layer stack (the layer loop of refimpl.model.decoder_forward): decoder_layer for each layer i
    of p["layers"] with past[i] and cross[i] (lists of (k, v)), the same pieces for every layer.
    Returns (x, [(present_k, present_v)] per layer).

    x [B, T, D] in g's float type. No checks: reached only through export_model, which loads a checked cfg and params.
    """
    presents = []
    for i, p_layer in enumerate(p["layers"]):
        x, k, v = decoder_layer(g, cfg, f"decoder.layers.{i}", p_layer, x, past[i], cross[i], self_attention,
                                cross_attention, **pieces)
        presents.append((k, v))
    return x, presents
