"""int8 on the CPU: variant auto runs decoder_static_fused.onnx (GroupQueryAttention over a static cache written in
place), measured faster than the int8 reference decoder on the bundled model and the Marian-base shape
(benchmarks/RESULTS.md, generate_cpu_variants), wherever contract.variant_runs says it computes the model; the
reference decoder otherwise, and as the fallback."""

import pytest

from refformer.refimpl import Config
from refformer.runtime.generator import Generator, auto_variant, default_model_dir


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_auto_variant_for_int8_on_the_cpu():
    encoder_decoder = Config(vocab_size=30, d_model=32, n_heads=4, d_ff=32)  # head size 8: GroupQueryAttention
    assert auto_variant(encoder_decoder, on_cuda=False, dtype="int8") == ("static_fused", "reference")
    head_4 = Config(vocab_size=30, d_model=16, n_heads=4, d_ff=32)  # head size 4: no GroupQueryAttention
    assert auto_variant(head_4, on_cuda=False, dtype="int8") == ("reference",)
    relative = Config(vocab_size=30, d_model=32, n_heads=4, d_ff=32, positional="relative")
    assert auto_variant(relative, on_cuda=False, dtype="int8") == ("reference",)
    # fp32 and fp16 on the CPU keep the reference graph for refformer's own encoder-decoders
    assert auto_variant(encoder_decoder, on_cuda=False, dtype="fp32") == ("reference",)
    assert auto_variant(encoder_decoder, on_cuda=False, dtype="fp16") == ("reference",)


def test_int8_generator_runs_static_fused_on_the_bundled_model(tmp_path):
    generator = Generator(provider="cpu", dtype="int8", threads=1)
    assert generator.variant == "static_fused"
    assert generator.onnx_dir == tmp_path / "cache" / "refformer" / generator.onnx_dir.parent.name / \
        "int8-static128-fused"
    texts = ["Wo ist der Bahnhof?", "Das Wetter ist heute schön."]
    by_hand = Generator(provider="cpu", dtype="int8", threads=1, variant="static_fused")
    assert by_hand.onnx_dir == generator.onnx_dir  # the same set: nothing exported twice
    assert generator.generate_ids(texts) == by_hand.generate_ids(texts)
    assert all(generator.generate(texts))
    assert generator.model_dir == default_model_dir()
