"""Tiny random Hugging Face models, built locally from a config with transformers (no hub), for the parity tests.

    build(family, seed=0) -> model      a seeded float64 model in eval mode (FAMILIES lists the families)
    saved_models(tmp_path_factory)      family -> (model, its save_pretrained folder), each built and saved once
    float64_exact()                     a context in which transformers' float32 shortcuts compute in float64

Every parameter (and Marian's/BART's final_logits_bias buffer) is redrawn from a seeded generator at a scale that
makes every term matter (norm weights near 1, biases and biases of the head non-zero), so a wrong mapping cannot
hide behind the library's near-zero initialisation. nn.Embedding's padding_idx is cleared: it only freezes that row's
gradient in training (the forward is unchanged), and Marian's decoder starts every target with its pad id, so the
true gradient of that row is not zero.

float64_exact(): transformers computes some things in float32 whatever the model's dtype, which caps float64
parity near 1e-7: T5LayerNorm, LlamaRMSNorm and Qwen2RMSNorm cast to float32 before the variance (meant as an upcast
for half precision), and the RoPE modules build their inverse frequencies and angles in float32. Inside the context
these compute the same formulas in the input's dtype (the norms with tests.helpers.rms_norm_in_input_dtype; the
RoPE inverse frequencies are rebuilt in float64). Eager attention of Llama/Qwen2 also softmaxes in float32, so those
models use the "sdpa" attention (float64 throughout). Without the context the float64 logits differ from refformer's
by 7e-8 (T5) to 5e-7 (T5 v1.1): float32 rounding, not a different function.
"""

import contextlib
import functools
from unittest import mock

import torch
from transformers import (
    BartForConditionalGeneration,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    MarianMTModel,
    Qwen2ForCausalLM,
    T5ForConditionalGeneration,
)
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.t5 import modeling_t5

from tests.helpers import rms_norm_in_input_dtype

V = 96  # vocabulary of every tiny model

# family -> (model class, config, attention implementation). Sizes: D 16-32, 1-2 layers, V = 96. The variants
# (marian-unshared, bart-untied) take the other branches of the embedding ties; llama's head_dim is not D / H.
FAMILIES = {
    "gpt2": (GPT2LMHeadModel, dict(vocab_size=V, n_positions=40, n_embd=24, n_layer=2, n_head=3,
                                   activation_function="gelu_new", layer_norm_epsilon=1e-5, bos_token_id=1,
                                   eos_token_id=2, pad_token_id=None), "eager"),
    "marian": (MarianMTModel, dict(vocab_size=V, d_model=16, encoder_layers=2, decoder_layers=2,
                                   encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=40,
                                   decoder_ffn_dim=40, activation_function="swish", scale_embedding=True,
                                   max_position_embeddings=40, pad_token_id=V - 1, eos_token_id=0,
                                   decoder_start_token_id=V - 1, forced_eos_token_id=0), "eager"),
    "marian-unshared": (MarianMTModel, dict(vocab_size=V, d_model=18, encoder_layers=1, decoder_layers=2,
                                            encoder_attention_heads=3, decoder_attention_heads=3, encoder_ffn_dim=30,
                                            decoder_ffn_dim=30, activation_function="relu", scale_embedding=False,
                                            share_encoder_decoder_embeddings=False, max_position_embeddings=24,
                                            pad_token_id=V - 1, eos_token_id=0, decoder_start_token_id=V - 1),
                        "eager"),
    "bart": (BartForConditionalGeneration, dict(vocab_size=V, d_model=16, encoder_layers=2, decoder_layers=2,
                                                encoder_attention_heads=4, decoder_attention_heads=4,
                                                encoder_ffn_dim=40, decoder_ffn_dim=40, activation_function="gelu",
                                                max_position_embeddings=40, pad_token_id=1, bos_token_id=0,
                                                eos_token_id=2, decoder_start_token_id=2), "eager"),
    "bart-untied": (BartForConditionalGeneration, dict(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1,
                                                       encoder_attention_heads=2, decoder_attention_heads=2,
                                                       encoder_ffn_dim=24, decoder_ffn_dim=24, scale_embedding=True,
                                                       activation_function="gelu_new", tie_word_embeddings=False,
                                                       max_position_embeddings=20, pad_token_id=1, bos_token_id=0,
                                                       eos_token_id=2, decoder_start_token_id=2), "eager"),
    "t5": (T5ForConditionalGeneration, dict(vocab_size=V, d_model=24, d_kv=8, num_heads=2, d_ff=40, num_layers=2,
                                            relative_attention_num_buckets=8, relative_attention_max_distance=12,
                                            feed_forward_proj="relu", pad_token_id=0, eos_token_id=1,
                                            decoder_start_token_id=0), "eager"),
    "t5-v1.1": (T5ForConditionalGeneration, dict(vocab_size=V, d_model=16, d_kv=8, num_heads=2, d_ff=40,
                                                 num_layers=2, num_decoder_layers=1, relative_attention_num_buckets=8,
                                                 relative_attention_max_distance=12, feed_forward_proj="gated-gelu",
                                                 tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                                                 decoder_start_token_id=0), "eager"),
    "llama": (LlamaForCausalLM, dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                     max_position_embeddings=64, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
                                     pad_token_id=0, tie_word_embeddings=False,
                                     rope_parameters={"rope_type": "default", "rope_theta": 500.0}), "sdpa"),
    "qwen2": (Qwen2ForCausalLM, dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64,
                                     rms_norm_eps=1e-6, eos_token_id=2, tie_word_embeddings=True,
                                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), "sdpa"),
}


def build(family, seed=0):
    """A seeded float64 transformers model of the family (a key of FAMILIES), in eval mode, every weight redrawn."""
    model_class, options, attention = FAMILIES[family]
    config = model_class.config_class(**options)
    config._attn_implementation = attention
    torch.manual_seed(seed)
    model = model_class(config)
    if family == "t5-v1.1":  # transformers 5.24 ties T5 whatever the config says; an untied head is a separate table
        model.lm_head.weight = torch.nn.Parameter(torch.empty_like(model.shared.weight))
    model = model.to(torch.float64).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("inv_freq") or "embed_positions" in name and isinstance(model, MarianMTModel):
                continue  # RoPE's frequencies and Marian's sinusoids are functions, not weights
            noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
            if "norm" in name and name.endswith("weight"):
                tensor.copy_(1.0 + 0.2 * noise)
            elif tensor.ndim == 1 or name.endswith("final_logits_bias"):
                tensor.copy_(0.2 * noise)
            else:
                tensor.copy_(noise / tensor.shape[-1] ** 0.5 * (3.0 if "relative_attention_bias" in name else 1.0))
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            module.padding_idx = None
    return model


def saved_models(tmp_path_factory):
    """A function family -> (build(family), the folder it was saved to with save_pretrained), each built and saved
    once (for a module-scoped fixture: pass pytest's tmp_path_factory)."""
    @functools.cache
    def saved(family):
        model = build(family)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        return model, folder

    return saved


# ---------------------------------------------------------------------------- float64 throughout


def _rotary(module, x, position_ids):
    """LlamaRotaryEmbedding.forward in the input's dtype, with inverse frequencies 1 / theta^(2i/Dh) in float64."""
    config = module.config
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freqs = position_ids[..., None].to(torch.float64) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


@contextlib.contextmanager
def float64_exact():
    """Inside: transformers' RMS norms and RoPE compute in the model's dtype instead of float32 (see the module
    docstring); outside, the library is untouched."""
    with contextlib.ExitStack() as stack:
        for cls in (modeling_t5.T5LayerNorm, modeling_llama.LlamaRMSNorm, modeling_qwen2.Qwen2RMSNorm):
            stack.enter_context(mock.patch.object(cls, "forward", rms_norm_in_input_dtype))
        for cls in (modeling_llama.LlamaRotaryEmbedding, modeling_qwen2.Qwen2RotaryEmbedding):
            stack.enter_context(mock.patch.object(cls, "forward", _rotary))
        yield
