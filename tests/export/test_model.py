"""export/model.py's whole graphs: node and initializer names, and the graph contract."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto

from refformer.export import contract
from refformer.export import model as xmodel
from refformer.export.contract import DTYPES, ERROR_BOUNDS
from refformer.export.export import io_spec
from refformer.export.graph import NUMPY_TYPES, Graph
from refformer.export.model import build_decoder, build_decoder_variant, build_encoder
from refformer.refimpl import Config
from refformer.refimpl.model import embed_forward, init_params, lm_head_params
from refformer.refimpl.ops import linear_forward

from .graph_runner import check, dims, run_both


def test_node_and_initializer_names_are_paths_and_checkpoint_names():
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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("family", ["encoder-decoder", "decoder-only"])
def test_every_graph_has_the_contracts_inputs_and_outputs(family, dtype):
    """Each graph's inputs and outputs (names, order, shapes, element types) are its contract signature, as
    export records them in the manifest: what verify and the runtime bind by name."""
    cfg = Config(d_model=16, n_heads=2, d_ff=12, dropout=0.0, family=family,
                 n_encoder_layers=0 if family == "decoder-only" else 1)
    params = init_params(cfg, np.random.default_rng(0))
    float_name = {"fp32": "float32", "fp16": "float16"}[dtype]

    def spec(signature):
        return [{"name": name, "shape": shape, "dtype": float_name if elem_type == contract.FLOAT else elem_type}
                for name, elem_type, shape in signature]

    graphs = {variant: (build_decoder_variant(cfg, params, variant, dtype, static_length=6),
                        contract.decoder_signature(cfg, variant, 6 if variant in contract.STATIC_VARIANTS else None))
              for variant in contract.VARIANTS}
    if cfg.is_encoder_decoder:
        graphs[contract.ENCODER] = build_encoder(cfg, params, dtype), contract.encoder_signature(cfg)
    for name, (model, (inputs, outputs)) in graphs.items():
        assert io_spec(model) == {"inputs": spec(inputs), "outputs": spec(outputs)}, name
        graph = name if name == contract.ENCODER else contract.decoder_graph(name)
        assert model.graph.name == contract.GRAPH_NAME_PREFIX + graph


@pytest.mark.parametrize("positional, embed_scale", [("sinusoidal", True), ("learned", False)])
@given(B=dims, T=dims, seed=st.integers(0, 2**16))
def test_embed(positional, embed_scale, B, T, seed):
    """model.embed against refimpl.model.embed_forward: tokens (scaled by sqrt(D) or not) plus positions."""
    cfg = Config(d_model=8, n_heads=2, d_ff=12, dropout=0.0, positional=positional, embed_scale=embed_scale,
                 vocab_size=20, max_positions=16)
    rng = np.random.default_rng(seed)
    p = init_params(cfg, rng, np.float64)["decoder"]
    ids, positions = rng.integers(0, 20, (B, T)), rng.integers(0, 16, (B, T))
    g = Graph("embed")
    xmodel.embed(g, cfg, "decoder", "decoder.embed_tokens", p["embed_tokens"], p,
                 g.input("ids", TensorProto.INT64, [B, T]), g.input("positions", TensorProto.INT64, [B, T]))
    got = run_both(g, {"ids": ids, "positions": positions}, (B, T, 8))
    check(embed_forward(cfg, p["embed_tokens"], p, ids, positions)[0], *got)


@pytest.mark.parametrize("tie_embeddings, lm_head_bias", [(True, False), (False, True)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_lm_head(tie_embeddings, lm_head_bias, dtype):
    """model.lm_head against refimpl's head, linear_forward(lm_head_params(...)): float32 logits in both dtypes (the
    fp16 graph casts the hidden state up), within the dtype's bound."""
    cfg = Config(d_model=8, n_heads=2, d_ff=12, dropout=0.0, vocab_size=20, tie_embeddings=tie_embeddings,
                 lm_head_bias=lm_head_bias)
    rng = np.random.default_rng(0)
    params = init_params(cfg, rng, np.float64)
    x = rng.normal(size=(2, 3, 8))
    g = Graph("lm_head", dtype)
    xmodel.lm_head(g, cfg, params, g.input("x", g.float_type, [2, 3, 8]))
    got = run_both(g, {"x": x.astype(NUMPY_TYPES[dtype])}, (2, 3, 20))
    check(linear_forward(lm_head_params(cfg, params), x)[0], *got, bound=ERROR_BOUNDS[dtype])
