"""export/layers.py's builders on both ONNX evaluators against their refimpl/layers.py twins."""

from functools import partial

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto
from onnx.reference import ReferenceEvaluator

from refformer.export import attention as xattention
from refformer.export import fused
from refformer.export import layers as xlayers
from refformer.export.contract import STATIC_VARIANTS, VARIANTS
from refformer.export.graph import Graph
from refformer.refimpl import Config, attention
from refformer.refimpl.layers import decoder_layer_forward, encoder_layer_forward, feed_forward_forward
from refformer.refimpl.model import init_params

from .graph_runner import FLOAT, check, dims, finish, run_both, run_ort


@pytest.mark.parametrize("norm_first", [False, True])
@given(B=dims, S=dims, H=st.sampled_from([1, 2, 4]), activation=st.sampled_from(["relu", "gelu"]),
       seed=st.integers(0, 2**16))
def test_encoder_layer(norm_first, B, S, H, activation, seed):
    cfg = Config(d_model=8, n_heads=H, d_ff=12, norm_first=norm_first, activation=activation, dropout=0.0)
    rng = np.random.default_rng(seed)
    p = init_params(cfg, rng, np.float64)["encoder"]["layers"][0]
    x = rng.normal(size=(B, S, 8))
    keep = rng.random((B, S)) < 0.8
    keep[:, 0] = True
    g = Graph("encoder_layer")
    mask = xattention.padding_mask(g, g.input("keep", TensorProto.INT64, [B, S]), "/mask")
    xlayers.encoder_layer(g, cfg, "encoder.layers.0", p, g.input("x", FLOAT, [B, S, 8]), mask)
    got = run_both(g, {"x": x.astype(np.float32), "keep": keep.astype(np.int64)}, (B, S, 8))
    check(encoder_layer_forward(p, x, attention.padding_mask(keep), cfg)[0], *got)


@given(B=dims, T=dims, seed=st.integers(0, 2**16))
def test_feed_forward(B, T, seed):
    cfg = Config(d_model=8, n_heads=2, d_ff=12, activation="silu", dropout=0.0)
    rng = np.random.default_rng(seed)
    p = init_params(cfg, rng, np.float64)["decoder"]["layers"][0]["ffn"]
    x = rng.normal(size=(B, T, 8))
    g = Graph("ffn")
    xlayers.feed_forward(g, cfg, "ffn", p, g.input("x", FLOAT, [B, T, 8]))
    got = run_both(g, {"x": x.astype(np.float32)}, (B, T, 8))
    check(feed_forward_forward(p, x, cfg)[0], *got)


def decoder_layer_graph(variant, cfg, p, B, T, P, S):
    """A graph of one layers.decoder_layer with the pieces the variant's decoder graph passes it (model.py's table):
    inputs x [B, T, D], past_k/past_v [B, H, P (or L = P + 2 slots for the static variants), Dh], keep, and for
    encoder-decoder cross_k/cross_v [B, H, S, Dh], src_keep [B, S]; outputs y0 = y, y1, y2 = the present cache."""
    static = variant in STATIC_VARIANTS
    L = P + 2 if static else P
    g = Graph("decoder_layer")
    x = g.input("x", FLOAT, [B, T, cfg.d_model])
    past = tuple(g.input(name, FLOAT, [B, cfg.n_heads, L, cfg.head_dim]) for name in ("past_k", "past_v"))
    cross, src_keep = (None, None), None
    if cfg.is_encoder_decoder:
        cross = tuple(g.input(name, FLOAT, [B, cfg.n_heads, S, cfg.head_dim]) for name in ("cross_k", "cross_v"))
        src_keep = g.input("src_keep", TensorProto.INT64, [B, S])
    int32 = partial(g.cast, to=TensorProto.INT32)
    keep = g.input("keep", TensorProto.INT64, [B, L if static else P + T]) if variant != "static_fused" else None
    pieces = {}
    if variant in ("reference", "static"):
        if static:
            slot_mask = xattention.write_slot_mask(g, g.input("write_index", TensorProto.INT64, [1]), L)
            self_attention = partial(xattention.cached_self_attention, mask=xattention.padding_mask(g, keep, "/m"),
                                     update_cache=xattention.write_cache(slot_mask))
        else:
            mask = xattention.causal_padding_mask(g, g.input("ids", TensorProto.INT64, [B, T]), keep, "/m")
            self_attention = partial(xattention.cached_self_attention, mask=mask)
        memory_mask = xattention.padding_mask(g, src_keep, "/mm") if src_keep else None
        cross_attention = partial(xattention.mha_cached, mask=memory_mask)
    elif variant == "fused":
        self_attention = partial(fused.mha_self_attention, keep32=int32(keep, at="/m"))
        cross_attention = partial(fused.mha_cross_attention, keep32=int32(src_keep, at="/mm") if src_keep else None)
    else:
        if variant == "static_mha":
            slot_mask = xattention.write_slot_mask(g, g.input("write_index", TensorProto.INT64, [1]), L)
            self_attention = partial(fused.mha_static_self_attention, slot_mask=slot_mask, keep32=int32(keep, at="/m"))
        else:  # static_fused: the new token's slot is its position
            positions = g.input("positions", TensorProto.INT64, [B, 1])
            seqlens32 = int32(g.op("Squeeze", [positions, g.const([1], "axes_1")], "/s"), at="/s")
            self_attention = partial(fused.gqa_self_attention, seqlens32=seqlens32,
                                     total32=g.const(L, "cache_length", np.int32))
        cross_attention = partial(fused.mha_cross_attention_unbiased,
                                  keep32=int32(src_keep, at="/mm") if src_keep else None)
        pieces = {"residual": fused.stream_residual, "feed_forward": fused.feed_forward_unbiased}
        x = fused.ResidualStream(g, cfg, x)
    y, k, v = xlayers.decoder_layer(g, cfg, "decoder.layers.0", p, x, past, cross, self_attention, cross_attention,
                                    **pieces)
    if pieces:
        y = y.value("/out")
    cache_shape = [B, cfg.n_heads, L if static else P + T, cfg.head_dim]
    return finish(g, [y, k, v], shapes=[[B, T, cfg.d_model], cache_shape, cache_shape])


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("family, norm_first, norm, activation", [
    ("encoder-decoder", False, "layernorm", "relu"), ("encoder-decoder", True, "layernorm", "gelu"),
    ("decoder-only", True, "rmsnorm", "silu"), ("decoder-only", False, "rmsnorm", "gelu_tanh")])
@given(B=dims, T=dims, P=st.integers(0, 3), S=dims, seed=st.integers(0, 2**16))
def test_decoder_layer_with_each_variants_pieces(variant, family, norm_first, norm, activation, B, T, P, S, seed):
    """THE decoder layer builder with the attention, cache, residual and feed-forward pieces of each decoder variant
    against refimpl.layers.decoder_layer_forward(past=..., cross_kv=...): its output and its present cache.
    The static variants take one token (T = 1) written at slot P of L = P + 2; the contrib-op variants run on
    ONNX Runtime only (onnx's ReferenceEvaluator has no com.microsoft ops)."""
    static = variant in STATIC_VARIANTS
    T = 1 if static else T
    cfg = Config(d_model=16, n_heads=2, d_ff=12, dropout=0.0, family=family, norm_first=norm_first, norm=norm,
                 activation=activation, n_encoder_layers=0 if family == "decoder-only" else 1)
    rng = np.random.default_rng(seed)
    p = init_params(cfg, rng, np.float64)["decoder"]["layers"][0]
    H, Dh = cfg.n_heads, cfg.head_dim
    x = rng.normal(size=(B, T, 16))
    past_k, past_v = (rng.normal(size=(B, H, P, Dh)) for _ in range(2))
    keep = np.ones((B, P + T), np.int64)
    if variant != "static_fused":  # in place, a row's slots hold its real tokens only: no padding
        keep[:, : P // 2] = 0
    cross_k, cross_v = (rng.normal(size=(B, H, S, Dh)) for _ in range(2))
    src_keep = np.ones((B, S), np.int64)
    src_keep[1:, S // 2 + 1:] = 0
    encoder_decoder = family == "encoder-decoder"
    y_ref, cache = decoder_layer_forward(
        p, x, attention.causal_mask(T, P + T, past=P)[None, None] & attention.padding_mask(keep), None,
        attention.padding_mask(src_keep) if encoder_decoder else None, cfg, past=(past_k, past_v),
        cross_kv=(cross_k, cross_v) if encoder_decoder else None)
    k_ref, v_ref = cache["present"]

    L = P + 2 if static else P
    feeds = {"x": x, "past_k": np.zeros((B, H, L, Dh)), "past_v": np.zeros((B, H, L, Dh))}
    feeds["past_k"][:, :, :P], feeds["past_v"][:, :, :P] = past_k, past_v
    if encoder_decoder:
        feeds.update(cross_k=cross_k, cross_v=cross_v, src_keep=src_keep)
    if variant in ("reference", "fused"):
        feeds.update(keep=keep, ids=np.zeros((B, T), np.int64))
    elif variant in ("static", "static_mha"):
        feeds.update(keep=np.concatenate([keep, np.zeros((B, 1), np.int64)], axis=1), write_index=np.array([P]))
    else:
        feeds.update(positions=np.full((B, 1), P))
    model = decoder_layer_graph(variant, cfg, p, B, T, P, S)
    names = {value.name for value in model.graph.input}
    feeds = {name: value.astype(np.float32) if value.dtype == np.float64 else value
             for name, value in feeds.items() if name in names}
    runs = [run_ort(model, feeds)] + ([ReferenceEvaluator(model).run(None, feeds)] if variant in ("reference",
                                                                                               "static") else [])
    real = keep[:, -T:].astype(bool)[:, :, None]  # queries of padding are not compared (contrib ops fill them)
    for y, k, v in runs:
        check(y_ref * real, y * real)
        check(k_ref, k[:, :, : P + T])
        check(v_ref, v[:, :, : P + T])
