"""Issue 14: decoder_static_fused.onnx (GroupQueryAttention with kv_num_heads and rotary inside the node) runs
imported Llama / Qwen2 checkpoints on the CPU, where auto picks it, with transformers' ids."""

import pytest

from refformer.refimpl import Config
from refformer.runtime.generator import auto_variant
from tests.runtime.test_generator import imported_generator, transformers_ids

# tests/hf_models.py's tiny llama (head_dim 12) and qwen2 (head size 8) have head sizes ONNX Runtime's rotary
# GroupQueryAttention refuses (a multiple of 16): the same families with head size 16
FAMILIES = {
    "llama-16": ("LlamaForCausalLM", dict(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                          max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=1,
                                          eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
                                          rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "qwen2-16": ("Qwen2ForCausalLM", dict(vocab_size=32, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                                          rms_norm_eps=1e-6, eos_token_id=2, tie_word_embeddings=True,
                                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
}


@pytest.fixture
def families(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from tests import hf_models

    for name, (model_class, options) in FAMILIES.items():
        monkeypatch.setitem(hf_models.FAMILIES, name, (getattr(transformers, model_class),
                                                       dict(options, vocab_size=hf_models.V), "sdpa"))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("settings", [{}, dict(num_beams=2, repetition_penalty=1.5, max_new_tokens=6)],
                         ids=["greedy", "beams"])
def test_auto_runs_the_gqa_decoder_of_an_imported_model_with_transformers_ids(tmp_path, families, family, settings):
    """On the CPU auto picks static_fused for a decoder-only rotary fp32 model it computes; its ids equal transformers'
    generate, for prompts of one length and ragged ones (left padding: each row's slots are its positions), greedy
    and under beam search (the reorder copies the written slots)."""
    model, generator = imported_generator(tmp_path, family, **settings)
    assert generator.variant == "static_fused"
    assert generator.stepper.decoder.get_modelmeta().graph_name == "refformer_decoder_static_fused"
    options = generator.check_options(None)
    for rows in ([[5, 6, 7, 8], [9, 10, 11, 12]], [[5, 6, 7, 8, 9, 10], [11, 12]]):
        ours = [sequence for row in generator.search_rows(rows, options) for sequence in row]
        theirs = [transformers_ids(model, generator, [row], **settings)[0] for row in rows]  # unpadded, row by row
        assert ours == theirs


def test_auto_variant_on_the_cpu_picks_static_fused_only_where_it_computes_the_model():
    llama = dict(vocab_size=30, d_model=32, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=32, family="decoder-only",
                 positional="rotary", norm="rmsnorm", norm_first=True, ffn_gated=True, activation="silu")
    assert auto_variant(Config(**llama), on_cuda=False, dtype="fp32") == ("static_fused", "reference")
    assert auto_variant(Config(**llama), on_cuda=False, dtype="fp16") == ("reference",)
    assert auto_variant(Config(**llama), on_cuda=False, dtype="int8") == ("reference",)
    # rotary at head size 12 (GroupQueryAttention rotates multiples of 16), relative positions, encoder-decoders,
    # refformer's own positions (not measured: they stay on the reference graph)
    for other in (dict(head_dim=12), dict(positional="relative"), dict(family="encoder-decoder", n_kv_heads=4),
                  dict(positional="learned"), dict(positional="sinusoidal", n_kv_heads=4)):
        assert auto_variant(Config(**{**llama, **other}), on_cuda=False, dtype="fp32") == ("reference",)


def test_a_second_generator_reuses_the_gqa_export_set(tmp_path, families, capsys):
    """The set of a Llama holds decoder_static_fused but no decoder_fused or decoder_static_mha (they cannot take
    it): it is fresh for the next Generator, which exported it again before."""
    from refformer.runtime.generator import Generator

    _, generator = imported_generator(tmp_path, "llama-16")
    assert "notice: exporting" in capsys.readouterr().err
    again = Generator(tmp_path / "m", provider="cpu")
    assert again.variant == "static_fused" and again.onnx_dir == generator.onnx_dir
    assert "exporting" not in capsys.readouterr().err
