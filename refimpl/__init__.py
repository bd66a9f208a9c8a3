"""refformer.refimpl: the Transformer in plain NumPy, forward and backward, verified.

Public API (stable; other tools rely on these names):

    Config                         architecture of a model (config.json); every field's JSON type and range is checked
    check_fits_memory(cfg, dtype, copies) / parameter_count(cfg)   refuse a model too large for this machine's memory
    init_params(cfg, rng)          random parameters, a nested dict named like the checkpoint
    save(model_dir, cfg, params, tokenizer=None) / load(model_dir) -> (cfg, params)
    from_torch(module) -> (cfg, params)   from a live nn.Transformer-based torch module
    from_hf(path) -> (cfg, params)        from a local Hugging Face folder (T5, BART, Marian, GPT-2, Llama, Qwen2)
    model_forward(cfg, params, src_ids, tgt_ids, ...) -> (logits, cache)
    model_backward(cfg, params, cache, dlogits) -> grads
    encode / decoder_step          incremental decoding with a KV cache
    cross_entropy_forward / cross_entropy_backward
    the layer pairs X_forward / X_backward below, and RefformerError for bad input.

Every public function raises RefformerError (a ValueError) for bad input, naming the argument. Masks: the
model-level functions take keep masks (boolean or 0/1 integers, 1 = real token) and refuse floating ones;
attention_forward, mha_forward and the layers take boolean (True = attend) or floating additive (0 / -inf) masks.
"""

from .attention import (
    attention_backward,
    attention_forward,
    causal_mask,
    mha_backward,
    mha_forward,
    padding_mask,
    project_kv,
)
from .config import Config, check_fits_memory, parameter_bytes, parameter_count
from .errors import RefformerError
from .gradcheck import numerical_gradient, rel_error
from .io import load, load_config, load_tokenizer, save
from .layers import (
    decoder_layer_backward,
    decoder_layer_forward,
    encoder_layer_backward,
    encoder_layer_forward,
    feed_forward_backward,
    feed_forward_forward,
)
from .loss import cross_entropy_backward, cross_entropy_forward
from .model import decoder_step, empty_cache, encode, init_params, model_backward, model_forward, param_shapes
from .ops import (
    activation_backward,
    activation_forward,
    dropout_backward,
    dropout_forward,
    embedding_backward,
    embedding_forward,
    layer_norm_backward,
    layer_norm_forward,
    linear_backward,
    linear_forward,
    log_softmax_backward,
    log_softmax_forward,
    rms_norm_backward,
    rms_norm_forward,
    sinusoidal_table,
    softmax_backward,
    softmax_forward,
)
from .tree import flatten, unflatten


def from_torch(module, **overrides):
    """(cfg, params) from a live torch module built on nn.Transformer (see refformer.refimpl.convert.torch).

    Raises RefformerError for a module refformer cannot map. torch is imported only here, on first use.
    """
    from .convert.torch import from_torch as convert

    return convert(module, **overrides)


def from_hf(path):
    """(cfg, params) from a local Hugging Face model folder (see refformer.refimpl.convert.hf): T5, BART, Marian,
    GPT-2, Llama, Qwen2. Raises RefformerError naming an option or architecture refformer cannot represent.
    torch is imported only for a pytorch_model.bin; safetensors folders need neither torch nor transformers.
    """
    from .convert.hf import from_hf as convert

    return convert(path)


__all__ = [
    # config, errors, the model folder
    "Config", "check_fits_memory", "parameter_bytes", "parameter_count", "RefformerError",
    "load", "load_config", "load_tokenizer", "save", "from_torch", "from_hf", "flatten", "unflatten",
    # ops
    "linear_forward", "linear_backward", "embedding_forward", "embedding_backward", "sinusoidal_table",
    "layer_norm_forward", "layer_norm_backward", "rms_norm_forward", "rms_norm_backward",
    "activation_forward", "activation_backward", "dropout_forward", "dropout_backward",
    "softmax_forward", "softmax_backward", "log_softmax_forward", "log_softmax_backward",
    # attention
    "causal_mask", "padding_mask", "attention_forward", "attention_backward", "mha_forward", "mha_backward",
    "project_kv",
    # layers
    "feed_forward_forward", "feed_forward_backward", "encoder_layer_forward", "encoder_layer_backward",
    "decoder_layer_forward", "decoder_layer_backward",
    # model, loss, gradient check
    "param_shapes", "init_params", "model_forward", "model_backward", "encode", "decoder_step", "empty_cache",
    "cross_entropy_forward", "cross_entropy_backward", "numerical_gradient", "rel_error",
]
