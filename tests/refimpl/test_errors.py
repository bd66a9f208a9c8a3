"""Bad input gives one exception type, RefformerError, whose message names the argument that was wrong.

Each case is (label, call, words the message must contain). The calls are built lazily in fixtures so a
broken case fails alone.
"""

import numpy as np
import pytest

from refformer.refimpl import (Config, RefformerError, attention_forward, cross_entropy_forward, decoder_layer_forward,
                               decoder_step, embedding_forward, empty_cache, encode, encoder_layer_forward,
                               feed_forward_forward, init_params, layer_norm_forward, linear_forward, mha_forward,
                               model_forward, padding_mask, rms_norm_forward)

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
