"""Each ONNX builder as a one-function graph, on onnx.reference.ReferenceEvaluator and ONNX Runtime CPU,
against the refimpl function it mirrors (float64 reference, fp32 graph: <= 1e-5)."""

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto
from onnx.reference import ReferenceEvaluator

from refformer.export import attention as xattention
from refformer.export import layers as xlayers
from refformer.export import ops as xops
from refformer.export.graph import Graph
from refformer.refimpl import Config, attention, ops
from refformer.refimpl.gradcheck import rel_error
from refformer.refimpl.layers import encoder_layer_forward, feed_forward_forward
from refformer.refimpl.model import init_params

FLOAT = TensorProto.FLOAT


def run_both(g, feeds, output_shape, elem_type=FLOAT):
    """Finish a one-function graph (its last node's output is 'y') and run it on both evaluators."""
    g.output(g.nodes[-1].output[0], "y", elem_type, None)
    model = g.model()
    onnx.checker.check_model(model, full_check=True)
    reference = ReferenceEvaluator(model).run(None, feeds)[0]
    runtime = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert reference.shape == tuple(output_shape) and runtime.shape == tuple(output_shape)
    return reference, runtime


def check(expected, *got, bound=1e-5):
    errors = [rel_error(g, expected) for g in got]
    assert max(errors) <= bound, f"errors (ReferenceEvaluator, ORT): {errors}"


dims = st.integers(1, 4)


@given(B=dims, T=dims, D=st.sampled_from([2, 4, 8]), F=st.sampled_from([3, 8]), seed=st.integers(0, 2**16))
def test_linear(B, T, D, F, seed):
    rng = np.random.default_rng(seed)
    p = {"weight": rng.normal(size=(D, F)), "bias": rng.normal(size=F)}
    x = rng.normal(size=(B, T, D))
    g = Graph("linear")
    xops.linear(g, "lin", p, g.input("x", FLOAT, [B, T, D]))
    got = run_both(g, {"x": x.astype(np.float32)}, (B, T, F))
    check(ops.linear_forward(p, x)[0], *got)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@given(B=dims, T=dims, D=st.sampled_from([1, 4, 16]), seed=st.integers(0, 2**16))
def test_norm(kind, B, T, D, seed):
    rng = np.random.default_rng(seed)
    cfg = Config(d_model=4, n_heads=1, norm=kind)
    p = {"weight": rng.normal(size=D), "bias": rng.normal(size=D)} if kind == "layernorm" else {"weight": rng.normal(size=D)}
    x = rng.normal(size=(B, T, D)) * 3 + 1
    g = Graph("norm")
    xops.norm(g, cfg, "norm", p, g.input("x", FLOAT, [B, T, D]))
    got = run_both(g, {"x": x.astype(np.float32)}, (B, T, D))
    check(ops.norm_forward(p, x, kind, cfg.norm_eps)[0], *got)


@pytest.mark.parametrize("kind", ["relu", "gelu", "gelu_tanh", "silu"])
@given(shape=st.tuples(dims, dims, dims), seed=st.integers(0, 2**16))
def test_activation(kind, shape, seed):
    x = np.random.default_rng(seed).normal(size=shape) * 3
    x.flat[0] = 1.5  # the max-norm metric needs one output of ordinary size: a lone x = -5 gives gelu ~ -1e-6,
    # which float32 computes as 0 by cancellation in 1 + tanh (a relative error of 1 on a meaningless scale)
    g = Graph("act")
    xops.activation(g, kind, g.input("x", FLOAT, list(shape)), "/act")
    got = run_both(g, {"x": x.astype(np.float32)}, shape)
    check(ops.activation_forward(x, kind)[0], *got)


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
    xattention.causal_padding_mask(g, g.input("ids", TensorProto.INT64, [B, T]), g.input("keep", TensorProto.INT64, [B, P + T]), "/m")
    got = run_both(g, {"ids": np.zeros((B, T), np.int64), "keep": keep}, (B, 1, T, P + T), TensorProto.BOOL)
    expected = attention.causal_mask(T, P + T, past=P)[None, None] & attention.padding_mask(keep)
    for result in got:
        np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize("norm_first", [False, True])
@given(B=dims, S=dims, H=st.sampled_from([1, 2, 4]), activation=st.sampled_from(["relu", "gelu"]), seed=st.integers(0, 2**16))
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


def test_node_and_initializer_names_are_paths_and_checkpoint_names():
    from refformer.export.model import build_decoder

    cfg = Config(d_model=8, n_heads=2, d_ff=12, dropout=0.0)
    model = build_decoder(cfg, init_params(cfg, np.random.default_rng(0)))
    names = {node.name for node in model.graph.node}
    assert "/decoder/layers.0/self_attn/q_proj/MatMul" in names
    assert "/decoder/layers.1/cross_attn/out_proj/Add" in names
    initializers = {t.name for t in model.graph.initializer}
    assert "decoder.layers.0.cross_attn.q_proj.weight" in initializers
    assert "decoder.embed_tokens.weight" in initializers
    # shape inference fills every intermediate
    inferred = {v.name for v in model.graph.value_info}
    produced = {o for node in model.graph.node for o in node.output} - {o.name for o in model.graph.output}
    assert produced <= inferred
