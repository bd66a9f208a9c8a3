"""int8 on the CPU: variant auto runs decoder_static_fused.onnx first for refformer's own encoder-decoders where it
computes the model (contract.variant_runs), then the reference decoder (decoder.onnx). Measured
(benchmarks/RESULTS.md, generate_cpu_variants, "static_fused drops finished rows"): once its stepper dropped finished
rows and ran the encoder on the unpadded source on the CPU, it was faster than the reference graph over the bundled
model's whole test split in chunks of 16 and 64 at 1 and 2 threads. fp32 and fp16 stay on the reference graph
(fp32 tied one of those cells); int8 decoder-only models were not measured and stay on it too."""

import pytest

from refformer.refimpl import Config
from refformer.runtime.generator import Generator, auto_variant

pytestmark = pytest.mark.usefixtures("user_cache")  # tests/conftest.py: a per-user cache of its own


def test_auto_variant_for_int8_on_the_cpu_is_static_fused_where_it_computes_the_model():
    head_8 = Config(vocab_size=30, d_model=32, n_heads=4, d_ff=32)  # an encoder-decoder GroupQueryAttention takes
    assert auto_variant(head_8, on_cuda=False, dtype="int8") == ("static_fused", "reference")
    for dtype in ("fp32", "fp16"):
        assert auto_variant(head_8, on_cuda=False, dtype=dtype) == ("reference",)
    # head size 4 (GroupQueryAttention takes multiples of 8), relative attention (T5's bias), grouped-query
    # cross-attention (MultiHeadAttention needs n_kv_heads = n_heads), a decoder-only model (not measured)
    for other in (dict(d_model=16), dict(positional="relative"), dict(n_kv_heads=2),
                  dict(family="decoder-only", positional="rotary", head_dim=16)):
        cfg = Config(**{**dict(vocab_size=30, d_model=32, n_heads=4, d_ff=32), **other})
        assert auto_variant(cfg, on_cuda=False, dtype="int8") == ("reference",), other


def test_int8_generator_on_the_bundled_model_runs_static_fused_unless_asked(tmp_path):
    auto = Generator(provider="cpu", dtype="int8", threads=1)
    assert auto.variant == "static_fused" and auto.onnx_dir.name == "int8-static128-fused"
    assert auto.stepper.drops_finished_rows
    reference = Generator(provider="cpu", dtype="int8", threads=1, variant="reference")
    assert reference.variant == "reference"  # decoder.onnx of the same set (it holds every variant's graphs)
    assert reference.stepper.decoder.get_modelmeta().graph_name == "refformer_decoder"
    text = "Wo ist der Bahnhof?"
    assert auto.generate(text) == reference.generate(text) == "Where is the station?"
