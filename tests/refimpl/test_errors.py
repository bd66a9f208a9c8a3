"""Bad input gives one exception type, RefformerError, whose message names the argument that was wrong.

Each case is (label, call, words the message must contain). The calls are built lazily in fixtures so a
broken case fails alone.
"""

import json
import time

import numpy as np
import pytest
from hypothesis import given, settings

from refformer.refimpl import (
    Config,
    RefformerError,
    attention_forward,
    cross_entropy_forward,
    decoder_layer_forward,
    decoder_step,
    embedding_forward,
    empty_cache,
    encode,
    encoder_layer_forward,
    feed_forward_forward,
    init_params,
    layer_norm_forward,
    linear_forward,
    load_config,
    mha_forward,
    model_forward,
    padding_mask,
    rms_norm_forward,
)
from tests.helpers import model_configs

ED = Config(vocab_size=13, d_model=8, n_heads=2, d_ff=12, n_encoder_layers=1, n_decoder_layers=1, max_positions=10,
            dropout=0.0)
DO = ED.replace(family="decoder-only")


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    params = init_params(ED, rng, np.float64)
    decoder_only = init_params(DO, rng, np.float64)
    src = rng.integers(4, 13, size=(2, 5))
    tgt = rng.integers(4, 13, size=(2, 3))
    x = rng.standard_normal((2, 3, 8))
    memory = rng.standard_normal((2, 5, 8))
    q = rng.standard_normal((2, 2, 3, 4))
    k = rng.standard_normal((2, 2, 5, 4))
    _, cross_kv = encode(ED, params, src)
    return dict(params=params, decoder_only=decoder_only, src=src, tgt=tgt, x=x, memory=memory, q=q, k=k,
                cross_kv=cross_kv, layer=params["decoder"]["layers"][0], enc_layer=params["encoder"]["layers"][0],
                attn=params["decoder"]["layers"][0]["self_attn"])


def step(s, **changes):
    """decoder_step of the encoder-decoder model with one argument replaced."""
    args = dict(ids=s["tgt"], positions=None, attention_mask=np.ones((2, 3), np.int64),
                past=empty_cache(ED, 2, np.float64), cross_kv=s["cross_kv"],
                encoder_attention_mask=np.ones((2, 5), np.int64))
    args.update(changes)
    return decoder_step(ED, s["params"], **args)


def model(s, **changes):
    args = dict(src_ids=s["src"], tgt_ids=s["tgt"])
    args.update(changes)
    src, tgt = args.pop("src_ids"), args.pop("tgt_ids")
    return model_forward(ED, s["params"], src, tgt, **args)


CASES = {
    # ------------------------------------------------------------------ wrong shapes and types
    "model tgt_ids 1-D": (lambda s: model(s, tgt_ids=s["tgt"][0]), ["tgt_ids", "dimensions"]),
    "model src_ids 3-D": (lambda s: model(s, src_ids=s["src"][..., None]), ["src_ids", "dimensions"]),
    "model tgt_ids float": (lambda s: model(s, tgt_ids=s["tgt"].astype(float)), ["tgt_ids", "integer"]),
    "model src_ids list": (lambda s: model(s, src_ids=s["src"].tolist()), ["src_ids", "numpy array"]),
    "model batch sizes differ": (lambda s: model(s, src_ids=s["src"][:1]), ["src_ids", "tgt_ids", "batch size"]),
    "model src_ids missing": (lambda s: model(s, src_ids=None), ["src_ids"]),
    "decoder-only given src_ids": (lambda s: model_forward(DO, s["decoder_only"], s["src"], s["tgt"]), ["src_ids"]),
    "attention q 3-D": (lambda s: attention_forward(s["q"][0], s["k"], s["k"]), ["q", "dimensions"]),
    "attention k head width": (lambda s: attention_forward(s["q"], s["k"][..., :3], s["k"]), ["k", "shape"]),
    "attention v length": (lambda s: attention_forward(s["q"], s["k"], s["k"][:, :, :4]), ["v", "shape"]),
    "mha xq width": (lambda s: mha_forward(s["attn"], s["x"][..., :4], s["x"], n_heads=2), ["xq", "shape"]),
    "mha xkv batch": (lambda s: mha_forward(s["attn"], s["x"], s["memory"][:1], n_heads=2), ["xkv", "shape"]),
    "encoder layer x width": (lambda s: encoder_layer_forward(s["enc_layer"], s["x"][..., :4], None, ED), ["x"]),
    "decoder layer memory width": (
        lambda s: decoder_layer_forward(s["layer"], s["x"], None, s["memory"][..., :4], None, ED), ["memory", "shape"]),
    "decoder layer memory missing": (
        lambda s: decoder_layer_forward(s["layer"], s["x"], None, None, None, ED), ["memory"]),
    "cross_entropy targets shape": (
        lambda s: cross_entropy_forward(s["x"], np.zeros((2, 4), np.int64)), ["targets", "shape"]),
    "cross_entropy targets float": (
        lambda s: cross_entropy_forward(s["x"], np.zeros((2, 3))), ["targets", "integer"]),
    "cross_entropy label_smoothing": (
        lambda s: cross_entropy_forward(s["x"], np.zeros((2, 3), np.int64), label_smoothing=1.5), ["label_smoothing"]),
    "decoder_step past per layer": (lambda s: step(s, past=[]), ["past"]),
    "decoder_step cross_kv missing": (lambda s: step(s, cross_kv=None), ["cross_kv"]),
    "decoder_step encoder mask missing": (lambda s: step(s, encoder_attention_mask=None), ["encoder_attention_mask"]),
    # ------------------------------------------------------------------ mismatched dtypes
    "mha float32 xq, float64 params": (
        lambda s: mha_forward(s["attn"], s["x"].astype(np.float32), s["x"], n_heads=2), ["xq", "float32", "float64"]),
    "mha float32 xkv, float64 params": (
        lambda s: mha_forward(s["attn"], s["x"], s["x"].astype(np.float32), n_heads=2), ["xkv", "float32"]),
    "attention float32 k": (lambda s: attention_forward(s["q"], s["k"].astype(np.float32), s["k"]), ["k", "float32"]),
    "attention float32 v": (lambda s: attention_forward(s["q"], s["k"], s["k"].astype(np.float32)), ["v", "float32"]),
    "encoder layer float32 x": (
        lambda s: encoder_layer_forward(s["enc_layer"], s["x"].astype(np.float32), None, ED), ["float32"]),
    "decoder layer float32 memory": (
        lambda s: decoder_layer_forward(s["layer"], s["x"], None, s["memory"].astype(np.float32), None, ED),
        ["memory", "float32"]),
    "model float16 params": (
        lambda s: model_forward(DO, {"decoder": {**s["decoder_only"]["decoder"], "embed_tokens": {
            "weight": s["decoder_only"]["decoder"]["embed_tokens"]["weight"].astype(np.float16)}}}, None, s["tgt"]),
        ["parameters", "float16"]),
    # ------------------------------------------------------------------ heads that do not divide D
    "Config n_heads": (lambda s: Config(d_model=10, n_heads=3), ["n_heads=3", "d_model=10"]),
    "Config n_heads zero": (lambda s: Config(d_model=8, n_heads=0), ["n_heads"]),
    "mha n_heads": (lambda s: mha_forward(s["attn"], s["x"], s["x"], n_heads=3), ["n_heads=3", "D=8"]),
    # ------------------------------------------------------------------ masks of the wrong shape
    "attention mask": (lambda s: attention_forward(s["q"], s["k"], s["k"], np.ones((2, 1, 3, 4), bool)), ["mask"]),
    "attention mask dtype": (lambda s: attention_forward(s["q"], s["k"], s["k"], np.ones((3, 5), np.int64)),
                             ["mask", "boolean", "floating"]),
    "mha mask": (lambda s: mha_forward(s["attn"], s["x"], s["x"], np.ones((4, 3), bool), n_heads=2), ["mask"]),
    "encoder layer mask": (lambda s: encoder_layer_forward(s["enc_layer"], s["x"], padding_mask(np.ones((2, 4))), ED),
                           ["mask"]),
    "model src_mask": (lambda s: model(s, src_mask=np.ones((2, 4))), ["src_mask", "[2, 5]"]),
    "model tgt_mask": (lambda s: model(s, tgt_mask=np.ones((2, 3, 1))), ["tgt_mask", "[2, 3]"]),
    "encode src_mask": (lambda s: encode(ED, s["params"], s["src"], np.ones((2, 6))), ["src_mask"]),
    "decoder_step attention_mask": (lambda s: step(s, attention_mask=np.ones((2, 4), np.int64)),
                                    ["attention_mask", "[B, P + T]"]),
    # ------------------------------------------------------------------ ids out of range
    "model tgt_ids >= V": (lambda s: model(s, tgt_ids=s["tgt"] + 13), ["tgt_ids", "[0, 13)"]),
    "model tgt_ids < 0": (lambda s: model(s, tgt_ids=-s["tgt"]), ["tgt_ids", "[0, 13)"]),
    "model src_ids >= V": (lambda s: model(s, src_ids=s["src"] + 13), ["src_ids", "[0, 13)"]),
    "encode src_ids >= V": (lambda s: encode(ED, s["params"], s["src"] + 13), ["src_ids"]),
    "decoder_step ids >= V": (lambda s: step(s, ids=s["tgt"] + 13), ["ids", "[0, 13)"]),
    "cross_entropy targets >= V": (
        lambda s: cross_entropy_forward(s["x"], np.full((2, 3), 8)), ["targets", "[0, 8)"]),
    "Config pad_id": (lambda s: Config(vocab_size=4, pad_id=4), ["pad_id"]),
    # ------------------------------------------------------------------ positions >= max_positions
    "model tgt_positions": (lambda s: model(s, tgt_positions=np.full((2, 3), 10)),
                            ["tgt_positions", "max_positions=10"]),
    "model src_positions": (lambda s: model(s, src_positions=np.full((2, 5), 10)), ["src_positions", "max_positions"]),
    "model negative positions": (lambda s: model(s, tgt_positions=np.full((2, 3), -1)), ["tgt_positions"]),
    "model source too long": (lambda s: model(s, src_ids=np.full((2, 11), 5)), ["src_positions", "max_positions"]),
    "model target too long": (lambda s: model(s, tgt_ids=np.full((2, 11), 5)), ["tgt_positions", "max_positions"]),
    "encode source too long": (lambda s: encode(ED, s["params"], np.full((2, 11), 5)), ["max_positions"]),
    "decoder_step positions": (lambda s: step(s, positions=np.full((2, 3), 10)), ["positions", "max_positions"]),
    "model positions shape": (lambda s: model(s, tgt_positions=np.zeros((2, 2), np.int64)), ["tgt_positions"]),
    # ------------------------------------------------------------------ the layer building blocks and the cache
    "decoder_step past of the wrong shape": (
        lambda s: step(s, past=[(np.zeros((2, 2, 1, 3)), np.zeros((2, 2, 1, 3)))],
                       attention_mask=np.ones((2, 4), np.int64)), ["past"]),
    "decoder_step float32 past, float64 params": (
        lambda s: step(s, past=empty_cache(ED, 2, np.float32)), ["past", "float32"]),
    "decoder_step encoder_attention_mask of the wrong shape": (
        lambda s: step(s, encoder_attention_mask=np.ones((2, 4), np.int64)), ["encoder_attention_mask"]),
    "feed_forward float32 x, float64 params": (
        lambda s: feed_forward_forward(s["layer"]["ffn"], s["x"].astype(np.float32), ED), ["x", "float32"]),
    "feed_forward x width": (lambda s: feed_forward_forward(s["layer"]["ffn"], s["x"][..., :4], ED), ["x"]),
    "linear x width": (lambda s: linear_forward(s["layer"]["ffn"]["fc1"], s["x"][..., :4]), ["x"]),
    "linear float32 x, float64 params": (
        lambda s: linear_forward(s["layer"]["ffn"]["fc1"], s["x"].astype(np.float32)), ["x", "float32"]),
    "layer_norm float32 x, float64 params": (
        lambda s: layer_norm_forward(s["layer"]["ffn_norm"], s["x"].astype(np.float32), 1e-5), ["x", "float32"]),
    "rms_norm x width": (
        lambda s: rms_norm_forward({"weight": np.ones(8)}, s["x"][..., :4], 1e-5), ["x"]),
    "embedding ids >= V": (
        lambda s: embedding_forward(s["params"]["decoder"]["embed_tokens"], s["tgt"] + 13), ["ids"]),
    "encoder layer float32 x, named x": (
        lambda s: encoder_layer_forward(s["enc_layer"], s["x"].astype(np.float32), None, ED), ["x has dtype"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_refformer_error(setup, case):
    call, words = CASES[case]
    with pytest.raises(RefformerError) as info:
        call(setup)
    message = str(info.value)
    missing = [word for word in words if word not in message]
    assert not missing, f"message {message!r} does not mention {missing}"


def test_refformer_error_is_a_value_error():
    assert issubclass(RefformerError, ValueError)


# ---------------------------------------------------------------------------- the systematic sweep
#
# Every public function of refimpl (refimpl.__all__ and the public functions of the modules below) is called with a
# good set of arguments, then with one argument at a time replaced by each bad value of a table: None, a list, a
# string, a bool, NaN, a negative number, arrays of the wrong rank, dtype or width, empty batches, ids out of range,
# and parameter dicts with a key missing, an extra key or a leaf of the wrong shape. Each call must either raise
# RefformerError or return normally (a correct result for inputs that are fine after all, e.g. an empty batch);
# any other exception is a failure.

import inspect  # noqa: E402

import refformer.refimpl as refimpl  # noqa: E402
from refformer.refimpl import attention as attention_module  # noqa: E402
from refformer.refimpl import gradcheck as gradcheck_module  # noqa: E402
from refformer.refimpl import layers as layers_module  # noqa: E402
from refformer.refimpl import loss as loss_module  # noqa: E402
from refformer.refimpl import model as model_module  # noqa: E402
from refformer.refimpl import ops as ops_module  # noqa: E402
from refformer.refimpl import tree as tree_module  # noqa: E402
from refformer.refimpl.config import check_fits_memory, parameter_bytes, parameter_count  # noqa: E402
from refformer.refimpl.convert.golden import golden, golden_inputs  # noqa: E402

# io (load, save, load_config, load_tokenizer) is another module's, tested in test_io.py.
NOT_SWEPT = {"load", "load_config", "load_tokenizer", "save", "from_torch", "from_hf", "Config", "RefformerError"}


def _array_variants(x):
    """Bad replacements for an array argument."""
    out = {"None": None, "list": x.tolist() if x.size < 50 else [1, 2], "string": "x", "bool": True,
           "nan scalar": np.nan, "rank +1": x[None], "rank -1": x.reshape(-1) if x.ndim > 1 else np.zeros(()),
           "0-d": np.zeros(())}
    if x.dtype.kind == "f":
        out.update({"int dtype": x.astype(np.int64), "bool dtype": x > 0, "float16": x.astype(np.float16),
                    "float32": x.astype(np.float32), "NaN": np.where(np.ones_like(x, bool), np.nan, x),
                    "narrower": x[..., :-1] if x.shape and x.shape[-1] > 1 else x[..., :0]})
    if x.dtype.kind in "iu":
        out.update({"float dtype": x.astype(np.float64), "negative": -1 - x, "huge": x + 10**6,
                    "int8 wrap": x.astype(np.uint8)})
    if x.dtype.kind == "b":
        out.update({"float": x.astype(np.float64), "int 2": x.astype(np.int64) * 2})
    if x.ndim >= 1:
        out["empty batch"] = x[:0]
    if x.ndim >= 2:
        out["empty axis 1"] = x[:, :0]
    return out


def _tree_variants(p):
    """Bad replacements for a parameter dict: a key missing, an extra key, a leaf of the wrong shape or type."""
    out = {"None": None, "list": [p], "string": "p", "empty dict": {}}
    if isinstance(p, dict):
        for key in list(p)[:3]:
            out[f"without {key}"] = {k: v for k, v in p.items() if k != key}
        out["extra key"] = {**p, "unexpected": np.zeros(1)}
        first = next(iter(p))
        leaf = p[first]
        if isinstance(leaf, np.ndarray):
            out[f"{first} transposed"] = {**p, first: leaf.T[..., None] if leaf.ndim == 1 else leaf.T[:-1]}
            out[f"{first} a list"] = {**p, first: leaf.tolist()}
            out[f"{first} int"] = {**p, first: leaf.astype(np.int64)}
        else:
            out[f"{first} None"] = {**p, first: None}
    return out


def _scalar_variants(value):
    return {"None": None, "string": "1", "list": [value], "bool": True, "NaN": np.nan, "inf": np.inf,
            "negative": -1, "zero": 0, "huge": 10**12, "float": 1.5}


def _variants(value):
    if isinstance(value, np.ndarray):
        return _array_variants(value)
    if isinstance(value, dict):
        return _tree_variants(value)
    if isinstance(value, (list, tuple)):
        return {"None": None, "empty": [], "string": "x", "one short": list(value)[:-1] if value else [None],
                "wrong entries": [None] * max(len(value), 1)}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _scalar_variants(value)
    if isinstance(value, str):
        return {"None": None, "unknown": "nonsense", "int": 3}
    if isinstance(value, np.random.Generator):
        return {"int": 3, "legacy RandomState": np.random.RandomState(0), "string": "rng"}
    if isinstance(value, Config):
        return {"None": None, "dict": value.to_dict(), "other width": value.replace(d_model=value.d_model * 2)}
    if callable(value):
        return {"None": None, "not callable": 3}
    return {"None": None}


def good_calls(s):
    """{function name: (function, positional args, keyword args)}: one good call of every swept function."""
    rng = np.random.default_rng(1)
    p, layer, enc_layer, attn = s["params"], s["layer"], s["enc_layer"], s["attn"]
    x, q, k = s["x"], s["q"], s["k"]
    linear = layer["ffn"]["fc1"]
    norm = layer["ffn_norm"]
    y_lin, c_lin = linear_forward(linear, x)
    y_emb, c_emb = embedding_forward(p["decoder"]["embed_tokens"], s["tgt"])
    y_ln, c_ln = layer_norm_forward(norm, x, 1e-5)
    y_rms, c_rms = rms_norm_forward({"weight": np.ones(8)}, x, 1e-5)
    y_act, c_act = refimpl.activation_forward(x, "gelu")
    y_drop, c_drop = refimpl.dropout_forward(x, 0.5, np.random.default_rng(0))
    y_sm, c_sm = refimpl.softmax_forward(x)
    y_lsm, c_lsm = refimpl.log_softmax_forward(x)
    y_att, c_att = attention_forward(q, k, k)
    y_mha, c_mha = mha_forward(attn, x, x, n_heads=2)
    query_positions, key_positions = np.tile(np.arange(3), (2, 1)), np.tile(np.arange(5), (2, 1))
    cos, sin = attention_module.rotary_tables(query_positions, 4, 10000.0)
    y_rot, c_rot = attention_module.rotary_forward(q, cos, sin)
    table = rng.standard_normal((8, 2))
    buckets = {"bidirectional": True, "max_distance": 20}
    y_rel, c_rel = attention_module.relative_position_bias_forward(table, query_positions, key_positions, **buckets)
    y_ffn, c_ffn = feed_forward_forward(layer["ffn"], x, ED)
    y_enc, c_enc = encoder_layer_forward(enc_layer, s["memory"], None, ED)
    y_dec, c_dec = decoder_layer_forward(layer, x, None, s["memory"], None, ED)
    logits, c_model = model_forward(ED, p, s["src"], s["tgt"])
    labels = np.full((2, 3), 5)
    loss, c_loss = cross_entropy_forward(logits, labels)
    ones_tgt = np.ones((2, 3), np.int64)
    ones_src = np.ones((2, 5), np.int64)
    work = rng.standard_normal((2, 3))
    calls = {
        "linear_forward": (linear_forward, [linear, x], {}),
        "linear_backward": (refimpl.linear_backward, [linear, c_lin, y_lin], {}),
        "embedding_forward": (embedding_forward, [p["decoder"]["embed_tokens"], s["tgt"]], {}),
        "embedding_backward": (refimpl.embedding_backward, [p["decoder"]["embed_tokens"], c_emb, y_emb], {}),
        "sinusoidal_table": (refimpl.sinusoidal_table, [10, 8], {}),
        "layer_norm_forward": (layer_norm_forward, [norm, x, 1e-5], {}),
        "layer_norm_backward": (refimpl.layer_norm_backward, [norm, c_ln, y_ln], {}),
        "rms_norm_forward": (rms_norm_forward, [{"weight": np.ones(8)}, x, 1e-5], {}),
        "rms_norm_backward": (refimpl.rms_norm_backward, [{"weight": np.ones(8)}, c_rms, y_rms], {}),
        "norm_forward": (ops_module.norm_forward, [norm, x, "layernorm", 1e-5], {}),
        "norm_backward": (ops_module.norm_backward, [norm, c_ln, y_ln, "layernorm"], {}),
        "activation_forward": (refimpl.activation_forward, [x, "gelu"], {}),
        "activation_backward": (refimpl.activation_backward, [c_act, y_act, "gelu"], {}),
        "dropout_forward": (refimpl.dropout_forward, [x, 0.5, np.random.default_rng(0)], {}),
        "dropout_backward": (refimpl.dropout_backward, [c_drop, y_drop], {}),
        "softmax_forward": (refimpl.softmax_forward, [x], {"axis": -1}),
        "softmax_backward": (refimpl.softmax_backward, [c_sm, y_sm], {"axis": -1}),
        "log_softmax_forward": (refimpl.log_softmax_forward, [x], {"axis": -1}),
        "log_softmax_backward": (refimpl.log_softmax_backward, [c_lsm, y_lsm], {"axis": -1}),
        "causal_mask": (refimpl.causal_mask, [3, 5, 2], {}),
        "padding_mask": (padding_mask, [ones_src], {}),
        "check_keep_mask": (attention_module.check_keep_mask, ["mask", ones_src], {}),
        "attention_forward": (attention_forward, [q, k, k, np.ones((3, 5), bool)],
                              {"dropout": 0.5, "rng": np.random.default_rng(0)}),
        "attention_backward": (refimpl.attention_backward, [c_att, y_att], {}),
        "split_heads": (attention_module.split_heads, [x, 2], {}),
        "merge_heads": (attention_module.merge_heads, [q], {}),
        "project_kv": (refimpl.project_kv, [attn, x, 2], {}),
        "mha_forward": (mha_forward, [attn, x, s["memory"], np.ones((3, 5), bool)], {"n_heads": 2}),
        "mha_backward": (refimpl.mha_backward, [attn, c_mha, y_mha], {}),
        "mha_cached_forward": (attention_module.mha_cached_forward, [attn, x, k, k, np.ones((3, 5), bool)],
                               {"n_heads": 2}),
        "cached_self_attention_forward": (attention_module.cached_self_attention_forward,
                                          [attn, x, k, k, np.ones((3, 5 + 3), bool)], {"n_heads": 2}),
        "rotary_tables": (attention_module.rotary_tables, [query_positions, 4, 10000.0], {"dtype": np.float64}),
        "rotary_forward": (attention_module.rotary_forward, [q, cos, sin], {}),
        "rotary_backward": (attention_module.rotary_backward, [c_rot, y_rot], {}),
        "relative_position_bucket": (attention_module.relative_position_bucket, [key_positions - 2],
                                     {**buckets, "num_buckets": 8}),
        "relative_position_bias_forward": (attention_module.relative_position_bias_forward,
                                           [table, query_positions, key_positions], buckets),
        "relative_position_bias_backward": (attention_module.relative_position_bias_backward, [c_rel, y_rel], {}),
        "left_padded_positions": (model_module.left_padded_positions, [np.array([[0, 1, 1], [1, 1, 1]])], {}),
        "left_pad": (model_module.left_pad, [[[5, 6], [7]], 0], {}),
        "token_keep_mask": (model_module.token_keep_mask, ["src_mask", ones_src, s["src"], ED], {}),
        "feed_forward_forward": (feed_forward_forward, [layer["ffn"], x, ED], {}),
        "feed_forward_backward": (refimpl.feed_forward_backward, [layer["ffn"], c_ffn, y_ffn], {}),
        "encoder_layer_forward": (encoder_layer_forward, [enc_layer, s["memory"], padding_mask(ones_src), ED], {}),
        "encoder_layer_backward": (refimpl.encoder_layer_backward, [enc_layer, c_enc, y_enc, ED], {}),
        "decoder_layer_forward": (decoder_layer_forward, [layer, x, np.ones((3, 3), bool), s["memory"],
                                                          padding_mask(ones_src), ED], {}),
        "decoder_layer_backward": (refimpl.decoder_layer_backward, [layer, c_dec, y_dec, ED], {}),
        "param_shapes": (refimpl.param_shapes, [ED], {}),
        "init_params": (init_params, [ED, np.random.default_rng(0)], {"dtype": np.float64}),
        "model_forward": (model_forward, [ED, p, s["src"], s["tgt"]],
                          {"src_mask": ones_src, "tgt_mask": ones_tgt, "src_positions": None,
                           "tgt_positions": np.tile(np.arange(3), (2, 1)), "rng": None}),
        "model_backward": (refimpl.model_backward, [ED, p, c_model, logits], {}),
        "encode": (encode, [ED, p, s["src"], ones_src], {}),
        "decoder_step": (decoder_step, [ED, p, s["tgt"], None, ones_tgt, empty_cache(ED, 2, np.float64),
                                        s["cross_kv"], ones_src], {}),
        "empty_cache": (empty_cache, [ED, 2], {"dtype": np.float64}),
        "cross_entropy_forward": (cross_entropy_forward, [logits, labels], {"ignore_id": 0, "label_smoothing": 0.1}),
        "cross_entropy_backward": (refimpl.cross_entropy_backward, [c_loss, 1.0], {}),
        "rel_error": (refimpl.rel_error, [work, work + 1e-9], {}),
        "numerical_gradient": (refimpl.numerical_gradient, [lambda: float(np.sum(work ** 2)), work],
                               {"eps": 1e-6, "max_entries": 3, "rng": np.random.default_rng(0)}),
        "flatten": (refimpl.flatten, [p], {}),
        "unflatten": (refimpl.unflatten, [refimpl.flatten(p), refimpl.param_shapes(ED)], {}),
        "tree_cast": (tree_module.tree_cast, [p, np.float32], {}),
        "parameter_count": (parameter_count, [ED], {}),
        "parameter_bytes": (parameter_bytes, [ED], {}),
        "check_fits_memory": (check_fits_memory, [ED], {}),
        "golden_inputs": (golden_inputs, [ED, 0], {"batch_size": 2, "length": 4}),
        "golden": (golden, [ED, p, 0], {"label_smoothing": 0.1}),
    }
    return calls


def swept_variants(s):
    """[(label, function, args, kwargs)]: every good call with one argument replaced by a bad value."""
    out = []
    for name, (function, args, kwargs) in good_calls(s).items():
        for i, value in enumerate(args):
            for label, bad in _variants(value).items():
                out.append((f"{name} arg {i} {label}", function, args[:i] + [bad] + args[i + 1:], kwargs))
        for key, value in kwargs.items():
            for label, bad in _variants(value).items():
                out.append((f"{name} {key}={label}", function, args, {**kwargs, key: bad}))
    return out


def test_sweep_covers_every_public_function(setup):
    """Each public function of refimpl.__all__ and of the modules owned here has a good call in the sweep."""
    swept = set(good_calls(setup))
    public = {name for name in refimpl.__all__ if inspect.isfunction(getattr(refimpl, name))} - NOT_SWEPT
    for module in (ops_module, attention_module, layers_module, model_module, loss_module, gradcheck_module,
                   tree_module):
        public |= {name for name, value in vars(module).items() if inspect.isfunction(value)
                   and value.__module__ == module.__name__ and not name.startswith("_")
                   and not name.startswith("check_") and not name.endswith("_shapes")}
    helpers = {"relu_forward", "relu_backward", "gelu_forward", "gelu_backward", "gelu_tanh_forward",
               "gelu_tanh_backward", "silu_forward", "silu_backward", "erf",  # reached through activation_*
               "residual_forward", "residual_backward", "tree_map", "source_embedding", "lm_head_params",
               "embed_forward", "embed_backward", "encoder_forward", "encoder_backward", "decoder_forward",
               "decoder_backward", "head_forward", "head_backward",
               }  # internal steps of the model, reached through model_forward / model_backward
    missing = sorted(public - swept - helpers)
    assert not missing, f"public functions without a sweep entry: {missing}"


def test_every_bad_argument_raises_refformer_error_or_works(setup):
    failures = []
    for label, function, args, kwargs in swept_variants(setup):
        try:
            function(*args, **kwargs)
        except RefformerError:
            pass
        except Exception as error:  # noqa: BLE001 - the point: nothing but RefformerError may escape
            failures.append(f"{label}: {type(error).__name__}: {str(error)[:120]}")
    assert not failures, f"{len(failures)} calls raised something other than RefformerError:\n" + "\n".join(failures)


# ---------------------------------------------------------------------------- config.json types and ranges

BAD_FIELDS = [
    # (field, value, words in the message)
    ("norm_first", "false", ['norm_first must be true or false, got "false"']),
    ("final_norm", 0, ["final_norm must be true or false, got 0"]),
    ("tie_embeddings", None, ["tie_embeddings", "null"]),
    ("d_model", True, ["d_model must be a positive integer, got true"]),
    ("n_heads", 2.0, ["n_heads must be a positive integer, got 2.0"]),
    ("vocab_size", "64", ["vocab_size", '"64"']),
    ("d_ff", 0, ["d_ff must be a positive integer"]),
    ("max_positions", -1, ["max_positions"]),
    ("max_positions", 1e12, ["max_positions must be a positive integer"]),
    ("n_encoder_layers", -1, ["n_encoder_layers must be an integer >= 0"]),
    ("n_decoder_layers", 1.5, ["n_decoder_layers"]),
    ("pad_id", -1, ["pad_id"]),
    ("eos_id", 64, ["eos_id must be a token id in [0, 64)"]),
    ("unk_id", False, ["unk_id", "false"]),
    ("norm_eps", float("nan"), ["norm_eps must be a finite number, got NaN"]),
    ("norm_eps", float("inf"), ["norm_eps", "Infinity"]),
    ("dropout", 10**400, ["dropout must be a finite number"]),  # an int beyond float range (was OverflowError)
    ("norm_eps", 0, ["norm_eps"]),
    ("norm_eps", -1e-5, ["norm_eps"]),
    ("norm_eps", True, ["norm_eps", "true"]),
    ("norm_eps", "1e-5", ["norm_eps", '"1e-5"']),
    ("dropout", 1.0, ["dropout must be in [0, 1)"]),
    ("dropout", -0.1, ["dropout"]),
    ("dropout", float("nan"), ["dropout"]),
    ("family", 3, ["family must be one of", "got 3"]),
    ("family", "encoder_decoder", ["family"]),
    ("activation", None, ["activation", "null"]),
    ("norm", ["layernorm"], ["norm must be one of"]),
    ("positional", True, ["positional"]),
]


@pytest.mark.parametrize("field, value, words", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS])
def test_config_refuses_wrong_json_types(tmp_path, field, value, words):
    """The same message from Config(...), Config.from_dict and load_config reading a config.json."""
    data = {**Config().to_dict(), field: value}
    (tmp_path / "config.json").write_text(json.dumps(data))
    for call in (lambda: Config(**{field: value}), lambda: Config.from_dict(data), lambda: load_config(tmp_path)):
        with pytest.raises(RefformerError) as info:
            call()
        missing = [word for word in words if word not in str(info.value)]
        assert not missing, f"message {str(info.value)!r} does not mention {missing}"


def test_config_normalizes_numpy_scalars_and_integral_floats_stay_refused():
    cfg = Config(d_model=np.int64(16), norm_eps=np.float32(1e-5), norm_first=np.bool_(True), dropout=0)
    assert type(cfg.d_model) is int and type(cfg.norm_eps) is float and cfg.norm_first is True
    assert type(cfg.dropout) is float
    assert json.loads(cfg.to_json())["d_model"] == 16  # plain types: the config serializes
    with pytest.raises(RefformerError, match="format_version"):
        Config.from_dict({**Config().to_dict(), "format_version": True})  # true == 1 in Python, not in JSON
    with pytest.raises(RefformerError, match="JSON object"):
        Config.from_dict([1, 2])


# ---------------------------------------------------------------------------- sizes that cannot fit in memory

HUGE = [dict(max_positions=10**12), dict(d_model=1_000_000, n_heads=1), dict(vocab_size=10**12),
        dict(n_decoder_layers=10**9), dict(d_ff=10**12), dict(positional="learned", max_positions=10**11)]


@pytest.mark.parametrize("fields", HUGE, ids=[next(iter(f)) if len(f) == 1 else "learned" for f in HUGE])
def test_sizes_that_cannot_fit_are_refused_before_allocating(tmp_path, fields):
    start = time.perf_counter()
    with pytest.raises(RefformerError, match="memory") as info:
        Config(**fields)
    assert "\n" not in str(info.value)
    (tmp_path / "config.json").write_text(json.dumps({**Config().to_dict(), **fields}))
    with pytest.raises(RefformerError, match="memory"):
        load_config(tmp_path)
    assert time.perf_counter() - start < 1.0  # counted, not allocated


def test_memory_limit_is_physical_memory(monkeypatch):
    """A model that fits is accepted; one over the machine's memory (here patched to 1 MiB) is refused by Config,
    check_fits_memory (with copies) and init_params, before init_params allocates."""
    from refformer.refimpl import config as config_module

    cfg = Config(vocab_size=64, d_model=16, n_heads=2, d_ff=32, max_positions=512)
    needed = parameter_bytes(cfg) + 512 * 16 * 8
    monkeypatch.setattr(config_module, "physical_memory_bytes", lambda: needed)
    check_fits_memory(cfg)  # exactly fits
    with pytest.raises(RefformerError, match="2 copies"):
        check_fits_memory(cfg, copies=2)
    with pytest.raises(RefformerError, match="float64"):
        init_params(cfg, np.random.default_rng(0), np.float64)
    with pytest.raises(RefformerError, match="memory"):
        cfg.replace(d_ff=33)
    monkeypatch.setattr(config_module, "physical_memory_bytes", lambda: 1 << 20)
    with pytest.raises(RefformerError, match="memory"):
        Config(vocab_size=64, d_model=64, n_heads=2, d_ff=256, max_positions=512)


@given(cfg=model_configs())
@settings(max_examples=25, deadline=None)
def test_parameter_count_matches_param_shapes(cfg):
    from refformer.refimpl.io import flatten_shapes

    assert parameter_count(cfg) == sum(int(np.prod(shape)) for shape in flatten_shapes(cfg).values())


def test_sinusoidal_positions_are_built_for_the_positions_used(monkeypatch):
    """A model with a long max_positions does not build its whole table at every forward (or step)."""
    from refformer.refimpl import model as model_module

    built = []
    original = model_module.sinusoidal_table
    monkeypatch.setattr(model_module, "sinusoidal_table", lambda n, d, dtype: built.append(n) or original(n, d, dtype))
    cfg = ED.replace(max_positions=100_000)
    params = init_params(cfg, np.random.default_rng(0), np.float64)
    ids = np.full((2, 4), 5)
    logits, _ = model_forward(cfg, params, ids, ids)
    reference, _ = model_forward(ED.replace(max_positions=10), params, ids, ids)
    np.testing.assert_array_equal(logits, reference)
    positions = np.array([[7, 8, 9, 10]] * 2)
    decoder_step(cfg, params, ids, positions, np.ones((2, 4), np.int64), empty_cache(cfg, 2, np.float64),
                 encode(cfg, params, ids)[1], np.ones((2, 4), np.int64))
    assert max(built) <= 11, built


# ---------------------------------------------------------------------------- masks: one meaning at every level


def test_model_level_float_masks_are_refused(setup):
    """model_forward, encode, decoder_step and generate take keep masks; a float (additive) mask is refused."""
    from refformer.refimpl.generate import generate

    s = setup
    additive_src = np.where(np.ones((2, 5), bool), 0.0, -np.inf)
    calls = {
        "model_forward src_mask": lambda: model(s, src_mask=additive_src),
        "model_forward tgt_mask": lambda: model(s, tgt_mask=np.zeros((2, 3))),
        "encode src_mask": lambda: encode(ED, s["params"], s["src"], additive_src),
        "decoder_step attention_mask": lambda: step(s, attention_mask=np.zeros((2, 3))),
        "decoder_step encoder_attention_mask": lambda: step(s, encoder_attention_mask=additive_src),
        "generate src_mask": lambda: generate(ED, s["params"], src_ids=s["src"], src_mask=additive_src),
        "padding_mask": lambda: padding_mask(additive_src),
    }
    for label, call in calls.items():
        with pytest.raises(RefformerError, match="== 0") as info:
            call()
        assert "keep mask" in str(info.value), label


def test_model_level_integer_masks_equal_boolean_ones(setup):
    s = setup
    keep = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    as_int, _ = model(s, src_mask=keep)
    as_bool, _ = model(s, src_mask=keep.astype(bool))
    np.testing.assert_array_equal(as_int, as_bool)
    with pytest.raises(RefformerError, match="only 0 and 1"):
        model(s, src_mask=keep * 2)
    with pytest.raises(RefformerError, match="only 0 and 1"):
        encode(ED, s["params"], s["src"], -keep)


def test_layer_level_float_masks_equal_their_boolean_equivalent(setup):
    """attention_forward, mha_forward and the layers read a float mask as additive: 0 / -inf gives the boolean
    mask's result exactly (a fully masked query included)."""
    s = setup
    rng = np.random.default_rng(3)
    keep = rng.random((2, 1, 3, 5)) < 0.6
    keep[0, 0, 0] = False  # a query that may attend to nothing
    additive = np.where(keep, 0.0, -np.inf)
    np.testing.assert_array_equal(attention_forward(s["q"], s["k"], s["k"], keep)[0],
                                  attention_forward(s["q"], s["k"], s["k"], additive)[0])
    np.testing.assert_array_equal(mha_forward(s["attn"], s["x"], s["memory"], keep, n_heads=2)[0],
                                  mha_forward(s["attn"], s["x"], s["memory"], additive, n_heads=2)[0])
    src_keep = padding_mask(np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
    np.testing.assert_array_equal(encoder_layer_forward(s["enc_layer"], s["memory"], src_keep, ED)[0],
                                  encoder_layer_forward(s["enc_layer"], s["memory"], np.where(src_keep, 0.0, -np.inf),
                                                        ED)[0])
    causal = np.tril(np.ones((3, 3), bool))
    np.testing.assert_array_equal(
        decoder_layer_forward(s["layer"], s["x"], causal, s["memory"], src_keep, ED)[0],
        decoder_layer_forward(s["layer"], s["x"], np.where(causal, 0.0, -np.inf), s["memory"],
                              np.where(src_keep, 0.0, -np.inf), ED)[0])
    with pytest.raises(RefformerError, match="NaN"):
        attention_forward(s["q"], s["k"], s["k"], np.full((3, 5), np.nan))


# ---------------------------------------------------------------------------- seeds and random generators


def test_negative_seeds_and_foreign_generators_are_refused(setup):
    from refformer.refimpl.convert.golden import golden, golden_inputs, write_golden

    with pytest.raises(RefformerError, match="seed must be >= 0"):
        golden_inputs(ED, -1)
    with pytest.raises(RefformerError, match="seed must be >= 0"):
        golden(ED, setup["params"], seed=-5)
    with pytest.raises(RefformerError, match="seed must be an integer"):
        golden(ED, setup["params"], seed=1.5)
    with pytest.raises(RefformerError, match="seed must be >= 0"):
        write_golden("no-such-model", "out.npz", seed=-1)  # before anything is read
    assert golden_inputs(ED, 2**63)["tgt_ids"].shape == (2, 6)  # any integer >= 0 is a seed
    for call in (lambda: init_params(ED, 0), lambda: init_params(ED, np.random.RandomState(0)),
                 lambda: model(setup, rng=1), lambda: refimpl.dropout_forward(setup["x"], 0.5, 7)):
        with pytest.raises(RefformerError, match="numpy.random.Generator"):
            call()


# ---------------------------------------------------------------------------- layer norm without a bias


def test_layer_norm_bias_is_optional():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 8))
    weight = rng.standard_normal(8)
    without, cache = layer_norm_forward({"weight": weight}, x, 1e-5)
    with_zero, _ = layer_norm_forward({"weight": weight, "bias": np.zeros(8)}, x, 1e-5)
    np.testing.assert_array_equal(without, with_zero)
    dx, dp = refimpl.layer_norm_backward({"weight": weight}, cache, np.ones_like(x))
    assert set(dp) == {"weight"} and dx.shape == x.shape
    with pytest.raises(RefformerError, match="bias"):
        layer_norm_forward({"weight": weight, "bias": np.zeros(7)}, x, 1e-5)
    with pytest.raises(RefformerError, match="no 'weight'"):
        layer_norm_forward({"bias": np.zeros(8)}, x, 1e-5)
    with pytest.raises(RefformerError, match="unexpected"):
        rms_norm_forward({"weight": weight, "bias": np.zeros(8)}, x, 1e-5)  # RMSNorm has no bias to apply


def model_level_calls(cfg, params):
    """Good calls of the model-level functions for one config (any family, any number of layers)."""
    rng = np.random.default_rng(2)
    tgt = rng.integers(4, cfg.vocab_size, size=(2, 3))
    src = rng.integers(4, cfg.vocab_size, size=(2, 4)) if cfg.is_encoder_decoder else None
    logits, cache = model_forward(cfg, params, src, tgt)
    cross_kv = encode(cfg, params, src)[1] if cfg.is_encoder_decoder else None
    encoder_mask = np.ones((2, 4), np.int64) if cfg.is_encoder_decoder else None
    calls = {
        "model_forward": (model_forward, [cfg, params, src, tgt], {"tgt_mask": np.ones((2, 3), bool)}),
        "model_backward": (refimpl.model_backward, [cfg, params, cache, logits], {}),
        "decoder_step": (decoder_step, [cfg, params, tgt, np.tile(np.arange(3), (2, 1)), np.ones((2, 3), np.int64),
                                        empty_cache(cfg, 2, np.float64), cross_kv, encoder_mask], {}),
        "golden": (golden, [cfg, params, 1], {}),
    }
    if cfg.is_encoder_decoder:
        calls["encode"] = (encode, [cfg, params, src], {"src_mask": np.ones((2, 4), bool)})
    return calls


OTHER_MODELS = {"decoder-only": DO, "no layers": ED.replace(n_encoder_layers=0, n_decoder_layers=0),
                "decoder-only, no layers, learned": DO.replace(n_decoder_layers=0, positional="learned",
                                                               tie_embeddings=False, lm_head_bias=True)}


@pytest.mark.parametrize("which", list(OTHER_MODELS))
def test_model_level_bad_arguments_in_other_families(which):
    cfg = OTHER_MODELS[which]
    params = init_params(cfg, np.random.default_rng(0), np.float64)
    failures = []
    for name, (function, args, kwargs) in model_level_calls(cfg, params).items():
        variants = [(f"{name} arg {i} {label}", args[:i] + [bad] + args[i + 1:], kwargs)
                    for i, value in enumerate(args) for label, bad in _variants(value).items()]
        variants += [(f"{name} {key}={label}", args, {**kwargs, key: bad})
                     for key, value in kwargs.items() for label, bad in _variants(value).items()]
        for label, bad_args, bad_kwargs in variants:
            try:
                function(*bad_args, **bad_kwargs)
            except RefformerError:
                pass
            except Exception as error:  # noqa: BLE001
                failures.append(f"{label}: {type(error).__name__}: {str(error)[:120]}")
    assert not failures, "\n".join(failures)


def test_empty_batches_give_empty_results(setup):
    """B = 0, T = 0 and S = 0 are not errors: the results have the matching empty shapes."""
    s = setup
    assert model(s, src_ids=s["src"][:0], tgt_ids=s["tgt"][:0])[0].shape == (0, 3, 13)
    assert model(s, tgt_ids=s["tgt"][:, :0])[0].shape == (2, 0, 13)
    logits, cache = model(s, src_ids=s["src"][:, :0])  # an empty source: cross-attention attends to nothing
    assert logits.shape == (2, 3, 13) and np.all(np.isfinite(logits))
    grads = refimpl.model_backward(ED, s["params"], cache, np.ones_like(logits))
    assert all(np.all(np.isfinite(g)) for g in refimpl.flatten(grads).values())
    assert encode(ED, s["params"], s["src"][:, :0])[0].shape == (2, 0, 8)
    loss, cache = cross_entropy_forward(np.zeros((0, 3, 13)), np.zeros((0, 3), np.int64))
    assert loss == 0.0 and refimpl.cross_entropy_backward(cache).shape == (0, 3, 13)
    assert refimpl.softmax_forward(np.zeros((2, 0)))[0].shape == (2, 0)
    with pytest.raises(RefformerError, match="unknown config keys"):
        ED.replace(d_models=3)


def test_inputs_whose_activations_cannot_fit_are_refused(setup, monkeypatch):
    """A batch too large for memory is refused before the forward allocates (here memory is patched to 1 MiB)."""
    from refformer.refimpl import model as model_module

    s = setup
    monkeypatch.setattr(model_module, "physical_memory_bytes", lambda: 1 << 20)
    model(s)  # a small batch fits
    big = np.full((64, 10), 5)
    for call in (lambda: model(s, src_ids=big, tgt_ids=big),
                 lambda: encode(ED, s["params"], np.full((2000, 10), 5)),
                 lambda: model_forward(DO, s["decoder_only"], None, np.full((512, 10), 5))):
        with pytest.raises(RefformerError, match="activations"):
            call()


def test_two_bad_arguments_at_once_raise_refformer_error_or_work(setup):
    """Pairs of bad arguments (a fixed random sample per function): the first check to fail must still be ours."""
    rng = np.random.default_rng(0)
    failures = []
    for name, (function, args, kwargs) in good_calls(setup).items():
        slots = [(i, value) for i, value in enumerate(args)] + list(kwargs.items())
        for _ in range(40 if len(slots) >= 2 else 0):
            bad_args, bad_kwargs, labels = list(args), dict(kwargs), []
            for n in rng.choice(len(slots), 2, replace=False):
                key, value = slots[n]
                variants = list(_variants(value).items())
                label, bad = variants[rng.integers(len(variants))]
                labels.append(f"{key}={label}")
                if isinstance(key, int):
                    bad_args[key] = bad
                else:
                    bad_kwargs[key] = bad
            try:
                function(*bad_args, **bad_kwargs)
            except RefformerError:
                pass
            except Exception as error:  # noqa: BLE001
                failures.append(f"{name} {labels}: {type(error).__name__}: {str(error)[:120]}")
    assert not failures, "\n".join(failures)
