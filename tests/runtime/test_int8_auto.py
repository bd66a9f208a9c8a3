"""int8 on the CPU: variant auto stays on the reference decoder (decoder.onnx) for refformer's own encoder-decoders,
even where decoder_static_fused.onnx can run. Measured (benchmarks/RESULTS.md, generate_cpu_variants): static_fused
is faster per step at B 1 and with forced lengths, but its static cache keeps finished rows in the batch, and over
the bundled model's test split at batch sizes 16 and 64 it was slower. static_fused stays one --variant away."""

import pytest

from refformer.refimpl import Config
from refformer.runtime.generator import Generator, auto_variant


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def test_auto_variant_for_int8_on_the_cpu_is_the_reference_graph():
    head_8 = Config(vocab_size=30, d_model=32, n_heads=4, d_ff=32)  # static_fused could run (GroupQueryAttention)
    head_4 = Config(vocab_size=30, d_model=16, n_heads=4, d_ff=32)
    for cfg in (head_8, head_4):
        for dtype in ("int8", "fp32", "fp16"):
            assert auto_variant(cfg, on_cuda=False, dtype=dtype) == ("reference",)


def test_int8_generator_on_the_bundled_model_runs_the_reference_graph_unless_asked(tmp_path):
    auto = Generator(provider="cpu", dtype="int8", threads=1)
    assert auto.variant == "reference" and auto.onnx_dir.name == "int8"
    fused = Generator(provider="cpu", dtype="int8", threads=1, variant="static_fused")
    assert fused.variant == "static_fused" and fused.onnx_dir.name == "int8-static128-fused"
    text = "Wo ist der Bahnhof?"
    assert auto.generate(text) == fused.generate(text) == "Where is the station?"  # one row: no batch effect
