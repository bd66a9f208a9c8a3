"""export/attention.py's builders on both ONNX evaluators against their refimpl/attention.py twins."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto
from onnx.reference import ReferenceEvaluator

from refformer.export import attention as xattention
from refformer.export.graph import Graph
from refformer.refimpl import Config, attention
from refformer.refimpl.model import init_params

from .graph_runner import FLOAT, check, dims, finish, run_both, run_ort


@given(B=dims, H=st.sampled_from([1, 2]), T=dims, S=dims, Dh=st.sampled_from([1, 4]), seed=st.integers(0, 2**16))
def test_attention_with_padding_and_causal_masks(B, H, T, S, Dh, seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.normal(size=(B, H, n, Dh)) for n in (T, S, S))
    keep = rng.random((B, S)) < 0.7
    keep[0] = False  # a fully masked row: zeros on both sides
    mask = attention.padding_mask(keep) & attention.causal_mask(T, S, past=max(S - T, 0))[None, None]
    g = Graph("attention")
    names = [g.input(n, FLOAT, list(a.shape)) for n, a in (("q", q), ("k", k), ("v", v))]
    mask_name = g.input("mask", TensorProto.BOOL, list(mask.shape))
    xattention.attention(g, *names, mask_name, 1.0 / math.sqrt(Dh), "/attention")
    feeds = {"q": q.astype(np.float32), "k": k.astype(np.float32), "v": v.astype(np.float32), "mask": mask}
    got = run_both(g, feeds, (B, H, T, Dh))
    expected = attention.attention_forward(q, k, v, mask)[0]
    assert np.all(np.isfinite(got[1]))
    check(expected, *got)


@given(B=dims, T=dims, P=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_causal_padding_mask(B, T, P, seed):
    keep = (np.random.default_rng(seed).random((B, P + T)) < 0.8).astype(np.int64)
    g = Graph("mask")
    ids, keep_name = g.input("ids", TensorProto.INT64, [B, T]), g.input("keep", TensorProto.INT64, [B, P + T])
    xattention.causal_padding_mask(g, ids, keep_name, "/m")
    got = run_both(g, {"ids": np.zeros((B, T), np.int64), "keep": keep}, (B, 1, T, P + T), TensorProto.BOOL)
    expected = attention.causal_mask(T, P + T, past=P)[None, None] & attention.padding_mask(keep)
    for result in got:
        np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize("static", [False, True])
@given(B=dims, T=dims, P=st.integers(0, 3), H=st.sampled_from([1, 2]), seed=st.integers(0, 2**16))
def test_cached_self_attention(static, B, T, P, H, seed):
    """The growing cache (concat_cache: T new positions after P) and the static one (write_cache: one new position
    written at slot P of L = P + 2 slots) against refimpl.attention.cached_self_attention_forward."""
    T = 1 if static else T
    cfg = Config(d_model=8, n_heads=H, d_ff=12, dropout=0.0)
    rng = np.random.default_rng(seed)
    p = init_params(cfg, rng, np.float64)["decoder"]["layers"][0]["self_attn"]
    x = rng.normal(size=(B, T, 8))
    past_k, past_v = (rng.normal(size=(B, H, P, cfg.head_dim)) for _ in range(2))
    keep = np.ones((B, P + T), np.int64)
    keep[:, : P // 2] = 0  # left padding in the past
    mask = attention.causal_mask(T, P + T, past=P)[None, None] & attention.padding_mask(keep)
    y_ref, (k_ref, v_ref) = attention.cached_self_attention_forward(p, x, past_k, past_v, mask, n_heads=H)
    L = P + 2 if static else P
    g = Graph("cached_self_attention")
    feeds = {"x": x, "past_k": np.zeros((B, H, L, cfg.head_dim)), "past_v": np.zeros((B, H, L, cfg.head_dim))}
    feeds["past_k"][:, :, :P], feeds["past_v"][:, :, :P] = past_k, past_v
    names = [g.input(name, FLOAT, list(value.shape)) for name, value in feeds.items()]
    if static:
        feeds["keep"] = np.concatenate([keep, np.zeros((B, L - P - 1), np.int64)], axis=1)  # unwritten slots: 0
        feeds["write_index"] = np.array([P], np.int64)
        slot_mask = xattention.write_slot_mask(g, g.input("write_index", TensorProto.INT64, [1]), L)
        key_mask = xattention.padding_mask(g, g.input("keep", TensorProto.INT64, [B, L]), "/mask")
        update = {"update_cache": xattention.write_cache(slot_mask)}
    else:
        feeds["keep"], feeds["ids"] = keep, np.zeros((B, T), np.int64)
        ids, keep_name = g.input("ids", TensorProto.INT64, [B, T]), g.input("keep", TensorProto.INT64, [B, P + T])
        key_mask, update = xattention.causal_padding_mask(g, ids, keep_name, "/mask"), {}
    y, k, v = xattention.cached_self_attention(g, cfg, "self_attn", p, *names, mask=key_mask, **update)
    model = finish(g, [y, k, v])
    feeds = {name: value.astype(np.float32) if value.dtype == np.float64 else value for name, value in feeds.items()}
    for got in (ReferenceEvaluator(model).run(None, feeds), run_ort(model, feeds)):
        check(y_ref, got[0])
        if static:  # slot P holds the new position; the others are the past's (or the zeros of unwritten slots)
            check(k_ref[:, :, : P + 1], got[1][:, :, : P + 1])
            check(v_ref[:, :, : P + 1], got[2][:, :, : P + 1])
            assert not got[1][:, :, P + 1:].any()
        else:
            check(k_ref, got[1])
            check(v_ref, got[2])
