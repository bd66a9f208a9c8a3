"""Issue 14: every feature the reference gained in issue 13 is computed by the reference graphs (encoder.onnx,
decoder.onnx), each verified against refimpl by `refformer verify` at its bounds (fp32 <= 1e-5, fp16 <= 1e-2: the
random prompt pass, its cached step and the incremental check over left-padded prompts), on tiny models of each
feature and on the imported tiny families (tests/hf_models.py through from_hf). The faster decoder variants refuse,
in one line, the options only the reference graphs compute."""

import numpy as np
import pytest

from refformer.export.contract import ERROR_BOUNDS, reference_only_features, unsupported_features
from refformer.export.export import export_model
from refformer.export.verify import verify
from refformer.refimpl import Config, RefformerError, init_params, save
from refformer.refimpl.tree import flatten, unflatten

BASE = dict(vocab_size=40, d_model=16, n_heads=4, d_ff=24, n_encoder_layers=1, n_decoder_layers=2, max_positions=16,
            dropout=0.0)
CPU = ["CPUExecutionProvider"]

# feature -> the options that turn it on (both families unless the options say decoder-only)
FEATURES = {
    "ffn_gated-silu": dict(ffn_gated=True, activation="silu", ffn_bias=False),
    "ffn_gated-gelu_tanh": dict(ffn_gated=True, activation="gelu_tanh", family="decoder-only"),
    "positional-none": dict(positional="none"),
    "position_offset": dict(positional="learned", position_offset=2),
    "embed_norm": dict(embed_norm=True, share_embeddings=False, tie_embeddings=False),
    "embed_norm-rms": dict(embed_norm=True, norm="rmsnorm", family="decoder-only", positional="learned"),
    "head_scale": dict(head_scale=0.25),
}


def make(path, seed=0, **overrides):
    """A tiny model folder with every parameter redrawn (biases non-zero, norm weights near 1), so that a term left
    out would show."""
    cfg = Config(**{**BASE, **overrides})
    rng = np.random.default_rng(seed)
    template = init_params(cfg, rng)
    flat = {name: (value + 0.3 * rng.standard_normal(value.shape)).astype(value.dtype)
            for name, value in flatten(template).items()}
    save(path, cfg, unflatten(flat, template))
    return cfg


def export_and_verify(model_dir, out_dir, dtype, **variants):
    """Export model_dir in dtype to out_dir and verify it on the CPU; returns verify's largest error (each row
    within its bound is asserted)."""
    manifest = export_model(model_dir, out_dir, dtype=dtype, **variants)
    assert manifest["error"]["max"] <= ERROR_BOUNDS[dtype]
    rows, got_dtype = verify(model_dir, out_dir, providers=CPU)
    assert got_dtype == dtype
    bad = [row for row in rows if not row["ok"]]
    assert not bad, bad
    assert {row["check"] for row in rows} >= {"random", "incremental"}
    return max(row["error"] for row in rows)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_each_feature_exports_and_verifies(tmp_path, feature, dtype):
    cfg = make(tmp_path / "m", **FEATURES[feature])
    assert unsupported_features(cfg) == []
    worst = export_and_verify(tmp_path / "m", tmp_path / "out", dtype)
    print(f"{feature} {dtype}: verify max error {worst:.2e}")


def test_the_variants_take_the_embedding_and_head_features(tmp_path):
    """Positions none or with an offset, the embedding norm and head_scale live in the builders every variant
    shares (model.embed, model.lm_head): every variant exports and verifies."""
    for name, options in (("a", dict(positional="learned", position_offset=2, embed_norm=True, head_scale=0.5)),
                          ("b", dict(positional="none", family="decoder-only", embed_norm=True, norm_first=True))):
        make(tmp_path / name, d_model=32, **options)
        export_and_verify(tmp_path / name, tmp_path / f"out-{name}", "fp32", static_length=8, fused_attention=True)
        graphs = {entry.name for entry in (tmp_path / f"out-{name}").glob("*.onnx")}
        assert {"decoder_fused.onnx", "decoder_static.onnx", "decoder_static_mha.onnx"} <= graphs


@pytest.mark.parametrize("variants", [dict(static_length=8), dict(fused_attention=True)])
def test_variants_refuse_what_only_the_reference_computes_in_one_line(tmp_path, variants):
    cfg = make(tmp_path / "m", ffn_gated=True, activation="silu")
    assert reference_only_features(cfg) == ["ffn_gated=true"]
    with pytest.raises(RefformerError) as error:
        export_model(tmp_path / "m", tmp_path / "out", **variants)
    message = str(error.value)
    assert message.startswith("the static and fused decoders do not support yet: ffn_gated=true; export without "
                              "--static-length and --fused-attention") and "\n" not in message
    assert [entry.name for entry in tmp_path.iterdir()] == ["m"]  # nothing begun
