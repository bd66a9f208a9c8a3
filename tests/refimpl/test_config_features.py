"""Issue 13's Config fields (the Hugging Face families' options): validation, format 1 still loading, the parameter
shapes each field adds, and the forward refusing an option it does not implement yet."""

import json

import numpy as np
import pytest

from refformer.refimpl import Config, RefformerError, init_params, load, model_forward
from refformer.refimpl.config import FORMAT_1_FIELDS, FORMAT_VERSION, parameter_count
from refformer.refimpl.io import flatten_shapes
from refformer.refimpl.layers import feed_forward_backward, feed_forward_forward
from refformer.refimpl.ops import rms_norm_backward, rms_norm_forward
from refformer.refimpl.tree import flatten
from refformer.runtime.generator import default_model_dir
from tests.helpers import (
    RELU_MARGIN,
    assert_param_gradients,
    float64_faithful_rms_norms,
    random_params,
    relu_margin,
    weighted_sum,
)

PARITY = 1e-10  # against transformers in float64: max|ours - theirs| / max|theirs|, forward and every gradient

SMALL = dict(vocab_size=24, d_model=8, n_heads=2, d_ff=12, n_encoder_layers=1, n_decoder_layers=1, max_positions=16,
             dropout=0.0)


def shapes(cfg):
    return flatten_shapes(cfg)


# ---------------------------------------------------------------------------- format 1 and 2


def test_format_1_config_of_the_bundled_model_loads_unchanged():
    """The bundled model's config.json is format 1: it loads with the defaults, which are today's architecture."""
    data = json.loads((default_model_dir() / "config.json").read_text())
    assert data["format_version"] == 1
    cfg = Config.from_dict(data)
    defaults = Config().to_dict()
    assert cfg.to_dict() == {**defaults, **data, "format_version": FORMAT_VERSION}
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.attention_scale) == (4, 64, 1 / 8)
    load(default_model_dir())  # config, weights and tokenizer


def test_format_1_refuses_the_new_fields_and_format_2_round_trips():
    data = Config(**SMALL).to_dict()
    assert data["format_version"] == 2 and data["head_dim"] is None and data["n_kv_heads"] is None
    v1 = {key: value for key, value in data.items() if key in FORMAT_1_FIELDS}
    assert Config.from_dict({**v1, "format_version": 1}) == Config(**SMALL)
    with pytest.raises(RefformerError, match=r"unknown config keys \['ffn_gated'\]"):
        Config.from_dict({**v1, "format_version": 1, "ffn_gated": True})
    cfg = Config(**SMALL, n_kv_heads=1, head_dim=3, attention_scale=1.0, ffn_gated=True, positional="learned",
                 position_offset=2, pad_id=None, bos_id=None)
    assert Config.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(RefformerError, match="format_version 3 is not supported"):
        Config.from_dict({**data, "format_version": 3})


def test_null_fields_read_as_their_effective_values_and_stay_null():
    cfg = Config(**SMALL)
    assert (cfg.n_kv_heads, cfg.head_dim, cfg.attention_scale) == (2, 4, 0.5)
    assert (cfg.raw("n_kv_heads"), cfg.raw("head_dim"), cfg.raw("attention_scale")) == (None, None, None)
    wider = cfg.replace(d_model=16)  # null follows the new d_model, it is not frozen at 4
    assert wider.head_dim == 8 and wider.raw("head_dim") is None
    assert cfg != cfg.replace(head_dim=4)  # the same model, but another config.json
    assert cfg.replace(head_dim=4).head_dim == 4 and hash(cfg) == hash(Config(**SMALL))


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize("changes, message", [
    ({"n_kv_heads": 0}, "n_kv_heads must be a positive integer or null, got 0"),
    ({"n_kv_heads": 3, "n_heads": 4}, "n_kv_heads=3 must divide n_heads=4"),
    ({"head_dim": True}, "head_dim must be a positive integer or null, got true"),
    ({"n_heads": 3}, "n_heads=3 must divide d_model=8"),
    ({"attention_scale": 0.0}, "attention_scale must be a finite number > 0 or null, got 0.0"),
    ({"attention_scale": float("inf")}, "attention_scale must be a finite number, got Infinity"),
    ({"attention_qkv_bias": 1}, "attention_qkv_bias must be true or false, got 1"),
    ({"attention_out_bias": "false"}, 'attention_out_bias must be true or false, got "false"'),
    ({"ffn_gated": None}, "ffn_gated must be true or false, got null"),
    ({"ffn_bias": 0}, "ffn_bias must be true or false, got 0"),
    ({"embed_norm": "yes"}, 'embed_norm must be true or false, got "yes"'),
    ({"positional": "alibi"}, 'positional must be one of "sinusoidal", "learned", "none", "relative", "rotary"'),
    ({"position_offset": -1}, "position_offset must be an integer >= 0, got -1"),
    ({"position_offset": 2}, 'position_offset=2 needs positional "learned"'),
    ({"relative_num_buckets": 0}, "relative_num_buckets must be a positive integer, got 0"),
    ({"relative_max_distance": 1.5}, "relative_max_distance must be a positive integer, got 1.5"),
    ({"rope_theta": -1.0}, "rope_theta must be a finite number > 0, got -1.0"),
    ({"rope_theta": None}, "rope_theta must be a finite number, got null"),
    ({"head_scale": 0}, "head_scale must be a finite number > 0, got 0"),
    ({"pad_id": -1}, r"pad_id must be an integer >= 0 \(a token id\) or null, got -1"),
    ({"eos_id": 24}, r"eos_id must be a token id in \[0, 24\) or null, got 24"),
    ({"bos_id": 1.0}, r"bos_id must be an integer >= 0 \(a token id\) or null, got 1.0"),
])
def test_each_field_is_validated_with_a_message_naming_it(changes, message):
    with pytest.raises(RefformerError, match=message):
        Config(**{**SMALL, **changes})


def test_explicit_head_dim_lifts_the_divisibility_rule_and_special_ids_may_be_null():
    cfg = Config(**{**SMALL, "n_heads": 3}, head_dim=5, pad_id=None, bos_id=None, eos_id=None, unk_id=None)
    assert cfg.head_dim == 5 and cfg.attention_scale == 5 ** -0.5
    assert (cfg.pad_id, cfg.bos_id, cfg.eos_id, cfg.unk_id) == (None, None, None, None)


# ---------------------------------------------------------------------------- parameter shapes


def test_attention_shapes_follow_heads_kv_heads_head_dim_and_bias_flags():
    cfg = Config(**{**SMALL, "n_heads": 4}, n_kv_heads=2, head_dim=3, attention_qkv_bias=True,
                 attention_out_bias=False)
    got = shapes(cfg)
    layer = "decoder.layers.0."
    for block in ("self_attn", "cross_attn"):
        assert got[f"{layer}{block}.q_proj.weight"] == (8, 12) and got[f"{layer}{block}.q_proj.bias"] == (12,)
        assert got[f"{layer}{block}.k_proj.weight"] == (8, 6) and got[f"{layer}{block}.v_proj.bias"] == (6,)
        assert got[f"{layer}{block}.out_proj.weight"] == (12, 8) and f"{layer}{block}.out_proj.bias" not in got
    no_bias = shapes(cfg.replace(attention_qkv_bias=False))
    assert not any(name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for name in no_bias)


def test_ffn_embedding_and_position_shapes():
    cfg = Config(**SMALL, ffn_gated=True, ffn_bias=False, positional="learned", position_offset=2, embed_norm=True,
                 norm="rmsnorm", share_embeddings=True)
    got = shapes(cfg)
    ffn = "encoder.layers.0.ffn."
    assert (got[ffn + "fc1.weight"], got[ffn + "fc_up.weight"], got[ffn + "fc2.weight"]) == ((8, 12), (8, 12), (12, 8))
    assert not any(name.endswith("bias") for name in got if ".ffn." in name)
    assert got["encoder.embed_positions.weight"] == got["decoder.embed_positions.weight"] == (18, 8)
    assert got["encoder.embed_norm.weight"] == got["decoder.embed_norm.weight"] == (8,)  # BART has two
    assert "encoder.embed_tokens.weight" not in got
    relative = shapes(Config(**SMALL, positional="relative", relative_num_buckets=5))
    assert relative["encoder.relative_attention_bias.weight"] == relative["decoder.relative_attention_bias.weight"]
    assert relative["decoder.relative_attention_bias.weight"] == (5, 2)
    assert not any("embed_positions" in name for name in relative)


@pytest.mark.parametrize("changes", [
    {}, {"n_kv_heads": 1, "head_dim": 3, "attention_qkv_bias": False, "attention_out_bias": False},
    {"ffn_gated": True, "ffn_bias": False, "embed_norm": True, "norm": "rmsnorm"},
    {"positional": "learned", "position_offset": 2, "share_embeddings": False, "tie_embeddings": False},
    {"positional": "relative", "family": "decoder-only", "n_encoder_layers": 0, "final_norm": False},
    {"positional": "rotary", "n_heads": 4, "n_kv_heads": 2, "lm_head_bias": True},
])
def test_parameter_count_and_init_params_follow_param_shapes(changes):
    cfg = Config(**{**SMALL, **changes})
    assert parameter_count(cfg) == sum(int(np.prod(shape)) for shape in shapes(cfg).values())
    params = flatten(init_params(cfg, np.random.default_rng(0), np.float64))
    assert {name: value.shape for name, value in params.items()} == shapes(cfg)
    assert all(np.all(params[name] == 1.0) for name in params if name.endswith("embed_norm.weight"))


# ---------------------------------------------------------------------------- not implemented yet


def test_options_the_forward_does_not_implement_yet_are_refused_by_name():
    cfg = Config(**SMALL, head_scale=0.5)
    params = init_params(cfg, np.random.default_rng(0), np.float64)
    ids = np.array([[1, 5, 2]])
    with pytest.raises(RefformerError, match="head_scale is not supported yet"):
        model_forward(cfg, params, ids, ids)


# ---------------------------------------------------------------------------- feed-forward


def ffn_params(cfg, seed):
    return random_params(cfg, seed)["encoder"]["layers"][0]["ffn"]


@pytest.mark.parametrize("activation, gated, bias, dropout", [
    ("silu", True, False, 0.0), ("gelu_tanh", True, False, 0.3), ("gelu", True, True, 0.0),
    ("relu", False, False, 0.0), ("relu", True, True, 0.3), ("silu", False, False, 0.3)])
def test_gated_and_bias_free_feed_forward_gradients(activation, gated, bias, dropout):
    """Centred finite differences in float64 (<= 1e-6) of every input and parameter, dropout on and off."""
    cfg = Config(**{**SMALL, "dropout": dropout}, activation=activation, ffn_gated=gated, ffn_bias=bias)
    p = ffn_params(cfg, 3)
    assert set(p) == ({"fc1", "fc_up", "fc2"} if gated else {"fc1", "fc2"})
    assert all(("bias" in linear) == bias for linear in p.values())
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, cfg.d_model))

    def new_rng():
        return np.random.default_rng(5) if dropout else None

    y, cache = feed_forward_forward(p, x, cfg, new_rng())
    assert relu_margin(cache) > RELU_MARGIN
    upstream = rng.standard_normal(y.shape)
    dx, dp = feed_forward_backward(p, cache, upstream)
    assert_param_gradients(weighted_sum(lambda: feed_forward_forward(p, x, cfg, new_rng())[0], upstream),
                           {"x": x, "p": p}, {"x": dx, "p": dp}, label=str(cfg))


def test_feed_forward_backward_refuses_a_p_of_the_other_kind():
    cfg = Config(**SMALL, ffn_gated=True)
    p = ffn_params(cfg, 0)
    _, cache = feed_forward_forward(p, np.ones((1, 2, 8)), cfg)
    with pytest.raises(RefformerError, match="disagree on the gate"):
        feed_forward_backward({"fc1": p["fc1"], "fc2": p["fc2"]}, cache, np.ones((1, 2, 8)))


def relative(ours, theirs):
    return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-300))


def torch_parity(module, named, x, forward, upstream):
    """Run module (float64) on x with the weights named = {torch parameter name: our [in, out] array}; returns the
    worst relative error of forward()'s (y, dx, {name: dweight}) against the module's output and autograd."""
    import torch

    module = module.double().eval()
    with torch.no_grad():
        for name, value in named.items():
            module.get_parameter(name).copy_(torch.from_numpy(value.T if value.ndim == 2 else value))
    xt = torch.from_numpy(x).requires_grad_(True)
    yt = module(xt)
    yt.backward(torch.from_numpy(upstream))
    y, dx, dweights = forward()
    errors = {"y": relative(y, yt.detach().numpy()), "dx": relative(dx, xt.grad.numpy())}
    for name, value in dweights.items():
        theirs = module.get_parameter(name).grad.numpy()
        errors[name] = relative(value, theirs.T if theirs.ndim == 2 else theirs)
    return errors


def ffn_parity(cfg, module, names, seed=0):
    """Our feed-forward against a transformers MLP module; names maps our linears (fc1, fc_up, fc2) to its."""
    p = ffn_params(cfg, seed)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((2, 5, cfg.d_model))
    upstream = rng.standard_normal(x.shape)
    named = {f"{names[linear]}.{key}": value for linear, tensors in p.items() for key, value in tensors.items()}

    def forward():
        y, cache = feed_forward_forward(p, x, cfg)
        dx, dp = feed_forward_backward(p, cache, upstream)
        return y, dx, {f"{names[linear]}.{key}": value for linear, tensors in dp.items()
                       for key, value in tensors.items()}

    errors = torch_parity(module, named, x, forward, upstream)
    assert max(errors.values()) <= PARITY, errors
    return errors


@pytest.mark.parametrize("bias", [False, True])
def test_swiglu_matches_llama_mlp(bias):
    """SwiGLU: fc2(silu(fc1(x)) * fc_up(x)) = transformers' LlamaMLP (gate_proj, up_proj, down_proj; mlp_bias)."""
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = Config(**SMALL, activation="silu", ffn_gated=True, ffn_bias=bias)
    module = LlamaMLP(LlamaConfig(hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, hidden_act="silu",
                                  mlp_bias=bias, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads))
    ffn_parity(cfg, module, {"fc1": "gate_proj", "fc_up": "up_proj", "fc2": "down_proj"})


@pytest.mark.parametrize("gated, activation, hf_activation", [
    (True, "gelu_tanh", "gelu_new"), (True, "gelu_tanh", "gelu_pytorch_tanh"), (False, "relu", "relu")])
def test_t5_feed_forwards_match_t5_dense_modules(gated, activation, hf_activation):
    """T5 v1.1's gated-gelu (T5DenseGatedActDense: wi_0, wi_1, wo) and T5 v1.0's relu (T5DenseActDense: wi, wo),
    both without biases."""
    pytest.importorskip("transformers")
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5DenseActDense, T5DenseGatedActDense

    cfg = Config(**SMALL, activation=activation, ffn_gated=gated, ffn_bias=False)
    t5 = T5Config(d_model=cfg.d_model, d_ff=cfg.d_ff, dropout_rate=0.0, feed_forward_proj=hf_activation,
                  dense_act_fn=hf_activation)
    if gated:
        ffn_parity(cfg, T5DenseGatedActDense(t5), {"fc1": "wi_0", "fc_up": "wi_1", "fc2": "wo"})
    else:
        ffn_parity(cfg, T5DenseActDense(t5), {"fc1": "wi", "fc2": "wo"})


# ---------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("module_name", ["T5LayerNorm", "LlamaRMSNorm", "Qwen2RMSNorm"])
def test_rms_norm_matches_transformers_rms_norms(module_name, monkeypatch):
    """rms_norm (no mean, no bias, eps from the config) = T5's "LayerNorm", Llama's and Qwen2's RMSNorm, forward and
    gradients, in float64: at <= 1e-10 against their formula in float64 (tests.helpers.float64_faithful_rms_norms),
    and within float32 rounding (<= 1e-6) of the modules as shipped, which compute in float32 whatever the input."""
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    module_class = {"T5LayerNorm": T5LayerNorm, "LlamaRMSNorm": LlamaRMSNorm, "Qwen2RMSNorm": Qwen2RMSNorm}[module_name]
    rng = np.random.default_rng(0)
    D, eps = 8, 1e-6
    p = {"weight": 1.0 + 0.2 * rng.standard_normal(D)}
    x = rng.standard_normal((2, 5, D))
    upstream = rng.standard_normal(x.shape)

    def forward():
        y, cache = rms_norm_forward(p, x, eps)
        dx, dp = rms_norm_backward(p, cache, upstream)
        return y, dx, {"weight": dp["weight"]}

    as_shipped = torch_parity(module_class(D, eps=eps), {"weight": p["weight"]}, x, forward, upstream)
    assert max(as_shipped.values()) <= 1e-6, as_shipped
    float64_faithful_rms_norms(monkeypatch)
    faithful = torch_parity(module_class(D, eps=eps), {"weight": p["weight"]}, x, forward, upstream)
    assert max(faithful.values()) <= PARITY, faithful
