"""Feed-forward, the residual block, the encoder layer and the decoder layer (post-LN or pre-LN), forward and
backward; the stacks that repeat them are in model.py, the ONNX twin is export/layers.py.

A layer's sublayers each sit in a residual block (Vaswani et al. 2017, sec. 3.1, post-LN; pre-LN as Xiong et al.
2020 and torch's norm_first):
    post-LN (norm_first=False):  x = norm(x + dropout(f(x)))
    pre-LN  (norm_first=True):   x = x + dropout(f(norm(x)))
The layer functions take the model's Config for these choices and rng (a numpy.random.Generator, or None for
eval mode) for dropout. Activations are [B, T, D] (S for the source), floating, in the parameters' dtype.
"""

from .attention import cached_self_attention_forward, mha_backward, mha_cached_forward, mha_forward, mha_shapes
from .config import check_config
from .errors import RefformerError, check, check_array, check_tree, reading_cache
from .ops import (
    activation_backward,
    activation_forward,
    dropout_backward,
    dropout_forward,
    linear_backward,
    linear_forward,
    norm_backward,
    norm_forward,
)

# ---------------------------------------------------------------------------- parameter shapes


def linear_shapes(d_in, d_out, bias=True):
    """{"weight": (d_in, d_out), "bias": (d_out,)}: the shapes of a linear layer y = x @ W + b (no "bias" when
    bias is False: y = x @ W). No checks."""
    return {"weight": (d_in, d_out), "bias": (d_out,)} if bias else {"weight": (d_in, d_out)}


def attention_shapes(cfg):
    """The shapes of one attention block of cfg: q_proj [D, H Dh], k_proj and v_proj [D, Hkv Dh], out_proj
    [H Dh, D]; the q/k/v biases only with attention_qkv_bias, out_proj's only with attention_out_bias. No checks
    (cfg is a checked Config): attention.mha_shapes of cfg's sizes."""
    return mha_shapes(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, qkv_bias=cfg.attention_qkv_bias,
                      out_bias=cfg.attention_out_bias)


def norm_shapes(cfg):
    """The shapes of one norm of cfg: {"weight": (D,), "bias": (D,)} for layernorm, {"weight": (D,)} for rmsnorm.
    No checks (cfg is a checked Config)."""
    D = cfg.d_model
    return {"weight": (D,), "bias": (D,)} if cfg.norm == "layernorm" else {"weight": (D,)}


def feed_forward_shapes(cfg):
    """The shapes of the feed-forward: fc1 [D, F] + [F], (fc_up [D, F] + [F] when ffn_gated,) fc2 [F, D] + [D];
    the biases only with ffn_bias. No checks (cfg is a checked Config)."""
    D, F, bias = cfg.d_model, cfg.d_ff, cfg.ffn_bias
    shapes = {"fc1": linear_shapes(D, F, bias)}
    if cfg.ffn_gated:
        shapes["fc_up"] = linear_shapes(D, F, bias)
    shapes["fc2"] = linear_shapes(F, D, bias)
    return shapes


def layer_shapes(cfg, cross):
    """The shapes of an encoder layer (cross=False; also a decoder-only layer) or a decoder layer (cross=True):
    self_attn, self_attn_norm, (cross_attn, cross_attn_norm,) ffn, ffn_norm. No checks (cfg is a checked Config)."""
    p = {"self_attn": attention_shapes(cfg), "self_attn_norm": norm_shapes(cfg)}
    if cross:
        p.update(cross_attn=attention_shapes(cfg), cross_attn_norm=norm_shapes(cfg))
    p.update(ffn=feed_forward_shapes(cfg), ffn_norm=norm_shapes(cfg))
    return p


# ---------------------------------------------------------------------------- feed-forward


def feed_forward_forward(p, x, cfg, rng=None):
    """Position-wise feed-forward (Vaswani et al. 2017, sec. 3.3): fc2(dropout(act(fc1(x)))); with cfg.ffn_gated
    the gated form fc2(dropout(act(fc1(x)) * fc_up(x))) (Shazeer 2020, "GLU Variants Improve Transformer": SwiGLU
    with silu, as transformers' LlamaMLP; GEGLU with gelu_tanh, as T5DenseGatedActDense, whose dropout sits after
    the product). x [B, T, D] -> y [B, T, D] via [B, T, F], cache; act is cfg.activation; linears without a bias
    when not cfg.ffn_bias.

    Raises RefformerError unless p has cfg's shapes and x is floating with D features.
    """
    check_config(cfg, rng)
    check_tree("p", p, feed_forward_shapes(cfg))
    h, fc1_cache = linear_forward(p["fc1"], x)  # [B, T, F]
    a, act_cache = activation_forward(h, cfg.activation)
    cache = {"fc1": fc1_cache, "hidden": a, "activation": act_cache, "kind": cfg.activation}
    if cfg.ffn_gated:
        up, cache["fc_up"] = linear_forward(p["fc_up"], x)  # [B, T, F]
        cache.update(up=up, gated=a * up)
    d, cache["dropout"] = dropout_forward(cache.get("gated", a), cfg.dropout, rng)
    y, cache["fc2"] = linear_forward(p["fc2"], d)
    cache["output"] = y
    return y, cache


def feed_forward_backward(p, cache, dy):
    """dy [B, T, D] -> dx [B, T, D], dp with p's keys (fc1, fc_up when gated, fc2).

    Raises RefformerError for a p, cache or dy that does not match the forward.
    """
    check(isinstance(p, dict) and "fc1" in p and "fc2" in p and set(p) <= {"fc1", "fc_up", "fc2"},
          "p must hold fc1, fc2 and, for a gated feed-forward, fc_up")
    if not isinstance(cache, dict):
        raise RefformerError("cache must be the cache feed_forward_forward returned")
    check(("fc_up" in p) == ("fc_up" in cache), "p and cache disagree on the gate (fc_up): pass the p of the forward")
    with reading_cache("feed_forward_forward"):
        return _feed_forward_backward(p, cache, dy)


def _feed_forward_backward(p, cache, dy):
    dp = {}
    dd, dp["fc2"] = linear_backward(p["fc2"], cache["fc2"], dy)
    dgated = dropout_backward(cache["dropout"], dd)
    da = dgated * cache["up"] if "fc_up" in p else dgated  # gated = a * up
    dh = activation_backward(cache["activation"], da, cache["kind"])
    dx, dp["fc1"] = linear_backward(p["fc1"], cache["fc1"], dh)
    if "fc_up" in p:
        dx_up, dp["fc_up"] = linear_backward(p["fc_up"], cache["fc_up"], dgated * cache["hidden"])
        dx = dx + dx_up
    return dx, {key: dp[key] for key in p}


# ---------------------------------------------------------------------------- residual block


def residual_forward(p_norm, x, sublayer, cfg, rng=None):
    """post-LN: y = norm(x + dropout(f(x))); pre-LN: y = x + dropout(f(norm(x))). x [B, T, D] -> y [B, T, D], cache.

    sublayer(h) -> (f, cache) is the attention or feed-forward applied to h; p_norm the block's norm. No checks of
    its own (the layer functions check p, x and cfg before they call it).
    """
    if cfg.norm_first:
        h, norm_cache = norm_forward(p_norm, x, cfg.norm, cfg.norm_eps)
        f, sublayer_cache = sublayer(h)
        d, dropout_cache = dropout_forward(f, cfg.dropout, rng)
        y = x + d
    else:
        f, sublayer_cache = sublayer(x)
        d, dropout_cache = dropout_forward(f, cfg.dropout, rng)
        y, norm_cache = norm_forward(p_norm, x + d, cfg.norm, cfg.norm_eps)
    return y, {"norm": norm_cache, "sublayer": sublayer_cache, "dropout": dropout_cache, "output": y}


def residual_backward(p_norm, cache, dy, sublayer_backward, cfg):
    """dy [B, T, D] -> dx [B, T, D], dnorm (the norm's gradients), extra; sublayer_backward(cache, df) ->
    (dh, extra) inverts the sublayer. No checks of its own (reached through the layer backwards)."""
    if cfg.norm_first:
        df = dropout_backward(cache["dropout"], dy)  # y = x + d
        dh, extra = sublayer_backward(cache["sublayer"], df)
        dx_norm, dnorm = norm_backward(p_norm, cache["norm"], dh, cfg.norm)
        dx = dy + dx_norm
    else:
        dsum, dnorm = norm_backward(p_norm, cache["norm"], dy, cfg.norm)  # y = norm(x + d)
        df = dropout_backward(cache["dropout"], dsum)
        dh, extra = sublayer_backward(cache["sublayer"], df)
        dx = dsum + dh
    return dx, dnorm, extra


# ---------------------------------------------------------------------------- encoder layer


def check_layer_input(p, x, cfg, rng, cross):
    """Raises RefformerError unless cfg is a Config, rng None or a Generator, p has cfg's layer shapes (with
    cross-attention when cross) and x is floating [B, T, D] of p's dtype."""
    check_config(cfg, rng)
    check_tree("p", p, layer_shapes(cfg, cross))
    weight = p["self_attn"]["q_proj"]["weight"]
    check_array("x", x, ndim=3, shape=(None, None, weight.shape[0]), kind="f", dtype=weight.dtype)


def check_layer_cache(cache, cfg, what):
    """Raises RefformerError unless cfg is a Config and cache looks like the cache the layer forward `what` returned."""
    check_config(cfg)
    if not (isinstance(cache, dict) and "ffn" in cache and "self_attn" in cache):
        raise RefformerError(f"cache must be the cache {what} returned")


def encoder_layer_forward(p, x, mask, cfg, rng=None, *, rotary=None, position_bias=None):
    """The encoder layer (Vaswani et al. 2017, sec. 3.1): self-attention then feed-forward, each in a residual block.
    x [B, S, D] -> y [B, S, D], cache.

    mask broadcasts to [B, H, S, S] (typically the source key-padding mask [B, 1, 1, S]): boolean
    True = attend, or floating additive. The stack's position inputs of the self-attention (model.py computes them
    once per stack): rotary = (cos, sin) [B, S, Dh] (attention.rotary_tables of the positions, positional "rotary"),
    position_bias broadcasting to [B, H, S, S] (attention.relative_position_bias_forward, positional "relative").
    The attention scale is cfg.attention_scale. Raises RefformerError for bad p, x, mask, rotary, position_bias, cfg
    or rng.
    """
    check_layer_input(p, x, cfg, rng, cross=False)
    def self_attention(h):
        return mha_forward(p["self_attn"], h, h, mask, n_heads=cfg.n_heads, scale=cfg.raw("attention_scale"),
                           position_bias=position_bias, rotary=rotary, dropout=cfg.dropout, rng=rng)

    h, attn_block = residual_forward(p["self_attn_norm"], x, self_attention, cfg, rng)
    y, ffn_block = residual_forward(p["ffn_norm"], h, lambda h: feed_forward_forward(p["ffn"], h, cfg, rng), cfg, rng)
    return y, {"self_attn": attn_block, "ffn": ffn_block, "output": y}


def encoder_layer_backward(p, cache, dy, cfg):
    """dy [B, S, D] -> dx [B, S, D], dp with p's keys: the forward read bottom-up; when the forward had a
    position_bias, its gradient (the shape of position_bias) comes third.

    Raises RefformerError for a p, cache, dy or cfg that does not match the forward.
    """
    check_layer_cache(cache, cfg, "encoder_layer_forward")
    check_tree("p", p, layer_shapes(cfg, cross=False))
    with reading_cache("encoder_layer_forward"):
        return _encoder_layer_backward(p, cache, dy, cfg)


def _encoder_layer_backward(p, cache, dy, cfg):
    dh, d_ffn_norm, d_ffn = residual_backward(
        p["ffn_norm"], cache["ffn"], dy, lambda c, df: feed_forward_backward(p["ffn"], c, df), cfg)
    dx, d_attn_norm, (d_attn, dbias) = residual_backward(
        p["self_attn_norm"], cache["self_attn"], dh, lambda c, df: _self_attention_backward(p["self_attn"], c, df), cfg)
    return (dx, {"self_attn": d_attn, "self_attn_norm": d_attn_norm, "ffn": d_ffn, "ffn_norm": d_ffn_norm}, *dbias)


def _self_attention_backward(p, cache, df):
    dxq, dxkv, dp, *dbias = mha_backward(p, cache, df)  # dbias: [d position_bias] when the forward had one, else []
    return dxq + dxkv, (dp, dbias)  # queries, keys and values all came from the same h


# ---------------------------------------------------------------------------- decoder layer


def decoder_layer_forward(p, x, self_mask, memory, memory_mask, cfg, rng=None, *, past=None, cross_kv=None,
                          rotary=None, position_bias=None):
    """The decoder layer (Vaswani et al. 2017, sec. 3.1): causal self-attention, cross-attention to memory,
    feed-forward, each in a residual block. x [B, T, D] -> y [B, T, D], cache.

    self_mask broadcasts to [B, H, T, T] (causal and target padding); memory [B, S, D] is the encoder output
    and memory_mask broadcasts to [B, H, T, S]. A decoder-only layer has no "cross_attn" in p and takes
    memory=None. Masks are boolean (True = attend) or floating additive.

    The self-attention's position inputs, computed once per stack (model.py): rotary = (cos, sin) [B, T, Dh] of the
    T new positions (attention.rotary_tables, positional "rotary"; it rotates queries and keys, so a cache holds
    rotated keys), position_bias broadcasting to [B, H, T, P + T] (attention.relative_position_bias_forward,
    positional "relative"). Cross-attention gets neither (as T5's and every transformers decoder). Every attention
    uses the scale cfg.attention_scale and the key/value heads Hkv = cfg.n_kv_heads.

    Incremental decoding (model.decoder_step) runs the same layer on T new positions: past is this layer's
    self-attention cache (k, v) [B, Hkv, P, Dh], self_mask then broadcasts to [B, H, T, P + T], and
    cache["present"] holds (k, v) [B, Hkv, P + T, Dh] (attention.cached_self_attention_forward); cross_kv is the
    memory's (k, v) [B, Hkv, S, Dh] from attention.project_kv, passed instead of memory. Inference only (rng=None).
    Raises RefformerError for bad p, x, memory, masks, past, cross_kv, rotary, position_bias, cfg or rng.
    """
    check_layer_input(p, x, cfg, rng, cross=isinstance(p, dict) and "cross_attn" in p)
    check(past is None or rng is None, "incremental decoding (past) is inference only: pass rng=None")
    for name, pair in (("past", past), ("cross_kv", cross_kv)):
        check(pair is None or (isinstance(pair, (list, tuple)) and len(pair) == 2),
              f"{name} must be None or this layer's (k, v), each [B, Hkv, L, Dh]")
    present = {}
    heads = {"n_heads": cfg.n_heads, "scale": cfg.raw("attention_scale")}
    positions = {"rotary": rotary, "position_bias": position_bias}

    def self_attention(h):
        if past is None:
            return mha_forward(p["self_attn"], h, h, self_mask, **heads, **positions, dropout=cfg.dropout, rng=rng)
        y, present["kv"] = cached_self_attention_forward(p["self_attn"], h, *past, self_mask, **heads, **positions)
        return y, None

    def cross_attention(h):
        if cross_kv is None:
            return mha_forward(p["cross_attn"], h, memory, memory_mask, **heads, dropout=cfg.dropout, rng=rng)
        return mha_cached_forward(p["cross_attn"], h, *cross_kv, memory_mask, **heads), None

    if "cross_attn" not in p and (memory is not None or cross_kv is not None):
        raise RefformerError("this decoder layer has no cross-attention (a decoder-only layer): pass memory=None")
    h, self_block = residual_forward(p["self_attn_norm"], x, self_attention, cfg, rng)
    cache = {"self_attn": self_block}
    if "cross_attn" in p:
        if cross_kv is None:
            check_array("memory", memory, ndim=3, shape=(x.shape[0], None, x.shape[2]), kind="f", dtype=x.dtype)
        else:
            check(memory is None, "pass memory or cross_kv, not both")
        h, cache["cross_attn"] = residual_forward(p["cross_attn_norm"], h, cross_attention, cfg, rng)
    y, cache["ffn"] = residual_forward(p["ffn_norm"], h, lambda h: feed_forward_forward(p["ffn"], h, cfg, rng), cfg,
                                       rng)
    cache["output"] = y
    if past is not None:
        cache["present"] = present["kv"]
    return y, cache


def decoder_layer_backward(p, cache, dy, cfg):
    """dy [B, T, D] -> dx [B, T, D], dmemory [B, S, D] (None without cross-attention), dp with p's keys; when the
    forward had a position_bias, its gradient (the shape of position_bias) comes fourth.
    Not for a forward run with past (incremental decoding keeps no cache for a backward).

    Raises RefformerError for a p, cache, dy or cfg that does not match the forward.
    """
    check_layer_cache(cache, cfg, "decoder_layer_forward")
    check_tree("p", p, layer_shapes(cfg, cross=isinstance(p, dict) and "cross_attn" in p))
    with reading_cache("decoder_layer_forward"):
        return _decoder_layer_backward(p, cache, dy, cfg)


def _decoder_layer_backward(p, cache, dy, cfg):
    dp = {}
    dh, dp["ffn_norm"], dp["ffn"] = residual_backward(
        p["ffn_norm"], cache["ffn"], dy, lambda c, df: feed_forward_backward(p["ffn"], c, df), cfg)
    dmemory = None
    if "cross_attn" in p:
        def cross_attention_backward(c, df):
            dxq, dxkv, dcross = mha_backward(p["cross_attn"], c, df)
            return dxq, (dxkv, dcross)

        dh, dp["cross_attn_norm"], (dmemory, dp["cross_attn"]) = residual_backward(
            p["cross_attn_norm"], cache["cross_attn"], dh, cross_attention_backward, cfg)
    dx, dp["self_attn_norm"], (dp["self_attn"], dbias) = residual_backward(
        p["self_attn_norm"], cache["self_attn"], dh, lambda c, df: _self_attention_backward(p["self_attn"], c, df), cfg)
    return (dx, dmemory, dp, *dbias)
