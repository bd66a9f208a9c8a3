"""Issue 14: every feature the reference gained in issue 13 is computed by the reference graphs (encoder.onnx,
decoder.onnx), each verified against refimpl by `refformer verify` at its bounds (fp32 <= 1e-5, fp16 <= 1e-2: the
random prompt pass, its cached step and the incremental check over left-padded prompts), on tiny models of each
feature and on the imported tiny families (tests/hf_models.py through from_hf). The faster decoder variants refuse,
in one line, the options only the reference graphs compute."""

import functools

import numpy as np
import pytest

from refformer.export.attention import relative_bucket_table
from refformer.export.contract import (
    ERROR_BOUNDS,
    reference_only_features,
    unsupported_features,
    variant_unsupported_features,
)
from refformer.export.export import export_model
from refformer.export.verify import verify
from refformer.refimpl import Config, RefformerError, save
from refformer.refimpl.attention import relative_position_bucket
from tests.helpers import save_random_model

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
    "gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1, family="decoder-only"),
    "head_dim": dict(head_dim=6, attention_qkv_bias=False),
    "attention_scale": dict(attention_scale=1.0),
    "rotary": dict(positional="rotary", family="decoder-only", n_kv_heads=2, rope_theta=500.0),
    "rotary-encdec": dict(positional="rotary", head_dim=6),
    "relative": dict(positional="relative", relative_num_buckets=8, relative_max_distance=12, head_dim=6,
                     attention_scale=1.0),
    "null-ids": dict(pad_id=None, bos_id=None, eos_id=None, unk_id=None),
    "null-ids-decoder-only": dict(pad_id=None, bos_id=None, family="decoder-only"),
    "relative-decoder-only": dict(positional="relative", family="decoder-only", relative_num_buckets=6,
                                  relative_max_distance=5),
}


def make(path, seed=0, **overrides):
    """A tiny model folder of BASE with overrides, every parameter redrawn (tests.helpers.save_random_model)."""
    return save_random_model(path, BASE, seed, **overrides)


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
    assert unsupported_features(cfg, ids=False) == []
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


# the MultiHeadAttention variants (fused, static_mha); BASE's head size 4 is no GroupQueryAttention's
REFERENCE_ONLY = [
    (dict(n_kv_heads=2), "n_kv_heads=2"),
    (dict(positional="rotary"), 'positional="rotary"'),
    (dict(positional="relative", family="decoder-only"), 'positional="relative"'),
    (dict(positional="rotary", n_kv_heads=1, ffn_gated=True), 'n_kv_heads=1, positional="rotary"'),
]


@pytest.mark.parametrize("variants", [dict(fused_attention=True), dict(static_length=8, fused_attention=True)])
@pytest.mark.parametrize("options, named", REFERENCE_ONLY, ids=[named for _, named in REFERENCE_ONLY])
def test_fused_variants_refuse_what_they_do_not_compute_in_one_line(tmp_path, options, named, variants):
    cfg = make(tmp_path / "m", **options)
    assert ", ".join(reference_only_features(cfg)) == named and unsupported_features(cfg) == []
    with pytest.raises(RefformerError) as error:
        export_model(tmp_path / "m", tmp_path / "out", **variants)
    message = str(error.value)
    assert message.startswith(f"the fused decoders (--fused-attention) do not support yet: {named}; export without "
                              "--fused-attention") and "\n" not in message
    assert ("decoder_static_fused.onnx does not either" in message) == ("static_length" in variants)
    assert [entry.name for entry in tmp_path.iterdir()] == ["m"]  # nothing begun


# models every contrib variant asked for computes: (options, the graphs the export writes besides the reference's)
CONTRIB = {
    # SmolLM / Llama's options: only GroupQueryAttention takes Hkv < H and rotary (head size a multiple of 16)
    "llama-like": (dict(family="decoder-only", positional="rotary", n_kv_heads=2, head_dim=16, ffn_gated=True,
                        activation="silu", norm="rmsnorm", norm_first=True, attention_qkv_bias=False,
                        rope_theta=500.0), {"decoder_static.onnx", "decoder_static_fused.onnx"}),
    "mqa-scaled": (dict(family="decoder-only", positional="rotary", n_kv_heads=1, head_dim=16, ffn_gated=True,
                        activation="silu", norm="rmsnorm", norm_first=True, attention_scale=0.3),
                   {"decoder_static.onnx", "decoder_static_fused.onnx"}),
    # an encoder-decoder with H Dh != D, its own scale and a gated feed-forward: every variant
    "encdec-gated": (dict(d_model=32, ffn_gated=True, activation="gelu_tanh", head_dim=16, attention_scale=0.2),
                     {"decoder_static.onnx", "decoder_fused.onnx", "decoder_static_mha.onnx",
                      "decoder_static_fused.onnx"}),
    "encdec-rotary": (dict(d_model=32, positional="rotary", head_dim=16),
                      {"decoder_static.onnx", "decoder_static_fused.onnx"}),
}


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("model", sorted(CONTRIB))
def test_the_contrib_variants_verify_every_feature_they_take(tmp_path, model, dtype):
    """GroupQueryAttention (decoder_static_fused) with kv_num_heads, rotary inside the node (do_rotary over cos/sin
    caches), the scale attribute and any head_dim; the gated feed-forward and RMSNorm's fused skip norms; the
    MultiHeadAttention variants with the scale and head_dim: each verified one token per call (left-padded prompts)
    against decoder.onnx and refimpl; the variants that cannot take the model are left out, not refused."""
    options, written = CONTRIB[model]
    make(tmp_path / "m", **options)
    export_and_verify(tmp_path / "m", tmp_path / "out", dtype, static_length=12, fused_attention=True)
    graphs = {entry.name for entry in (tmp_path / "out").glob("decoder*.onnx")}
    assert graphs == written | {"decoder.onnx"}
    rows, _ = verify(tmp_path / "m", tmp_path / "out", providers=CPU)
    assert {row["check"] for row in rows} >= {"static_fused"}


def test_rotary_with_a_head_size_group_query_attention_refuses_is_refused_in_one_line(tmp_path):
    """ONNX Runtime's CPU GroupQueryAttention rotates only head sizes that are multiples of 16: head_dim 8 with
    rotary is named, static_fused is not built, and with no other contrib variant able the export is refused."""
    cfg = make(tmp_path / "m", family="decoder-only", positional="rotary", n_kv_heads=2, head_dim=8)
    assert variant_unsupported_features(cfg, "static_fused") == ["head_dim=8"]
    with pytest.raises(RefformerError, match=r"decoder_static_fused.onnx does not either: head_dim=8\)$"):
        export_model(tmp_path / "m", tmp_path / "out", static_length=8, fused_attention=True)


STATIC = {
    "llama-like": dict(family="decoder-only", positional="rotary", n_kv_heads=2, head_dim=6, ffn_gated=True,
                       activation="silu", norm="rmsnorm", norm_first=True, attention_qkv_bias=False),
    "t5-like": dict(positional="relative", relative_num_buckets=8, relative_max_distance=6, head_dim=6,
                    attention_scale=1.0, ffn_gated=True, activation="gelu_tanh", norm="rmsnorm", norm_first=True,
                    head_scale=0.5, n_kv_heads=2),
}


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("model", sorted(STATIC))
def test_the_static_decoder_computes_every_feature(tmp_path, model, dtype):
    """decoder_static.onnx is built from the reference's builders: rotary from position_ids, the relative bias
    with the query at write_index, grouped-query caches [B, Hkv, L, Dh], the gated feed-forward; verified one token
    per call against decoder.onnx and refimpl."""
    make(tmp_path / "m", **STATIC[model])
    worst = export_and_verify(tmp_path / "m", tmp_path / "out", dtype, static_length=12)
    rows, _ = verify(tmp_path / "m", tmp_path / "out", providers=CPU)
    assert {row["check"] for row in rows} >= {"static"}
    print(f"{model} static {dtype}: verify max error {worst:.2e}")


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("buckets, distance", [(8, 12), (32, 128), (6, 5)])
def test_the_clipped_bucket_table_is_t5_s_bucketing_at_every_distance(bidirectional, buckets, distance):
    """The graphs clip key - query to [-M, M] and gather relative_bucket_table: the same bucket as refimpl's
    relative_position_bucket (transformers' T5Attention._relative_position_bucket) far beyond M too."""
    if bidirectional and buckets // 2 // 2 >= distance:
        pytest.skip("not a valid bucketing")
    cfg = Config(**{**BASE, "positional": "relative", "relative_num_buckets": buckets,
                    "relative_max_distance": distance})
    relative = np.arange(-20 * distance, 20 * distance + 1)
    want = relative_position_bucket(relative, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance)
    got = relative_bucket_table(cfg, bidirectional)[np.clip(relative, -distance, distance) + distance]
    np.testing.assert_array_equal(got, want)


# ---------------------------------------------------------------------------- the imported tiny families

IMPORTED = ["t5", "t5-v1.1", "bart", "bart-untied", "marian", "marian-unshared", "llama", "qwen2", "gpt2"]


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """family -> a refformer model folder imported by from_hf from the tiny transformers model (tests/hf_models.py),
    built once."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from refformer.refimpl.convert.hf import from_hf
    from tests import hf_models

    saved = hf_models.saved_models(tmp_path_factory)

    @functools.cache
    def get(family):
        cfg, params = from_hf(saved(family)[1])
        folder = tmp_path_factory.mktemp(f"m-{family}")
        save(folder, cfg, params)
        return cfg, folder

    return get


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("family", IMPORTED)
def test_imported_families_export_and_verify(imported, tmp_path, family, dtype):
    cfg, model_dir = imported(family)
    assert unsupported_features(cfg, ids=False) == []
    worst = export_and_verify(model_dir, tmp_path / "out", dtype)
    print(f"{family} {dtype}: verify max error {worst:.2e}")
