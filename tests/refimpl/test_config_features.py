"""Issue 13's Config fields (the Hugging Face families' options): validation, format 1 still loading, the parameter
shapes each field adds, and the forward refusing an option it does not implement yet."""

import json

import numpy as np
import pytest

from refformer.refimpl import Config, RefformerError, init_params, load, model_forward, save
from refformer.refimpl.config import FORMAT_1_FIELDS, FORMAT_VERSION, parameter_count
from refformer.refimpl.convert.golden import golden, golden_inputs, write_golden
from refformer.refimpl.generate import GenerationOptions, generate, greedy, greedy_lm, strip, trim_after_eos
from refformer.refimpl.io import flatten_shapes
from refformer.refimpl.layers import feed_forward_backward, feed_forward_forward
from refformer.refimpl.model import (
    decoder_step,
    embed_backward,
    embed_forward,
    empty_cache,
    encode,
    left_pad,
    token_keep_mask,
)
from refformer.refimpl.ops import rms_norm_backward, rms_norm_forward
from refformer.refimpl.training.setup import load_examples
from refformer.refimpl.tree import flatten
from refformer.runtime.generator import default_model_dir
from tests.helpers import (
    RELU_MARGIN,
    assert_param_gradients,
    decode_incrementally,
    float64_faithful_rms_norms,
    left_padded,
    random_params,
    random_tokens,
    relu_margin,
    right_padded,
    weighted_sum,
)
from tests.refimpl.test_gradients import check_model_gradients, must

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
    ({"relative_num_buckets": 3}, "relative_num_buckets=3 must be at least 4"),
    ({"relative_num_buckets": 1, "family": "decoder-only", "n_encoder_layers": 0},
     "relative_num_buckets=1 must be at least 2"),
    ({"relative_num_buckets": 32, "relative_max_distance": 16}, "relative_max_distance=16 must exceed"),
    ({"positional": "rotary", "head_dim": 3}, 'positional "rotary" needs an even head_dim'),
    ({"relative_max_distance": 1.5}, "relative_max_distance must be a positive integer, got 1.5"),
    ({"relative_max_distance": 10**400}, r"relative_max_distance=1000.* must be below 2\*\*63"),  # was OverflowError
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


# ---------------------------------------------------------------------------- embeddings, head, whole models


def test_bart_embeddings_match_transformers():
    """Learned positions at row position + 2 and layernorm_embedding after the sum (embed_forward with
    position_offset=2, embed_norm): transformers' BartScaledWordEmbedding + BartLearnedPositionalEmbedding +
    layernorm_embedding, forward and gradients of the three tables, in float64 (positions 0 .. T-1, as BART's)."""
    pytest.importorskip("transformers")
    import torch
    from transformers.models.bart.modeling_bart import BartLearnedPositionalEmbedding, BartScaledWordEmbedding

    cfg = Config(**SMALL, positional="learned", position_offset=2, embed_norm=True, embed_scale=True)
    params = random_params(cfg, 0)
    p = params["decoder"]
    ids = np.array([[3, 7, 1, 9, 0], [4, 4, 2, 0, 0]])
    positions = np.broadcast_to(np.arange(5), ids.shape)
    upstream = np.random.default_rng(1).standard_normal((2, 5, cfg.d_model))
    x, cache = embed_forward(cfg, p["embed_tokens"], p, ids, positions)
    dtokens, own = embed_backward(cfg, p["embed_tokens"], p, cache, upstream)

    # padding_idx=None: with BART's padding_idx torch leaves the pad row's gradient at zero (a frozen row), where
    # refimpl gives the row's true gradient; the forward is the same either way
    tokens = BartScaledWordEmbedding(cfg.vocab_size, cfg.d_model, None, cfg.d_model ** 0.5).double()
    table = BartLearnedPositionalEmbedding(cfg.max_positions, cfg.d_model).double()
    norm = torch.nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps).double()
    with torch.no_grad():
        tokens.weight.copy_(torch.from_numpy(p["embed_tokens"]["weight"]))
        table.weight.copy_(torch.from_numpy(p["embed_positions"]["weight"]))
        norm.weight.copy_(torch.from_numpy(p["embed_norm"]["weight"]))
        norm.bias.copy_(torch.from_numpy(p["embed_norm"]["bias"]))
    ids_t = torch.from_numpy(ids)
    theirs = norm(tokens(ids_t) + table(ids_t))
    theirs.backward(torch.from_numpy(upstream))
    errors = {"x": relative(x, theirs.detach().numpy()),
              "embed_tokens": relative(dtokens["weight"], tokens.weight.grad.numpy()),
              "embed_positions": relative(own["embed_positions"]["weight"], table.weight.grad.numpy()),
              "embed_norm.weight": relative(own["embed_norm"]["weight"], norm.weight.grad.numpy()),
              "embed_norm.bias": relative(own["embed_norm"]["bias"], norm.bias.grad.numpy())}
    assert max(errors.values()) <= PARITY, errors
    assert table.weight.shape[0] == cfg.max_positions + 2 == p["embed_positions"]["weight"].shape[0]


def test_no_positions_add_nothing_and_head_scale_scales_the_logits():
    cfg = Config(**SMALL, positional="none", embed_scale=False, tie_embeddings=True)
    params = random_params(cfg, 0)
    p = params["decoder"]
    ids = np.array([[3, 7, 1]])
    x, _ = embed_forward(cfg, p["embed_tokens"], p, ids, np.array([[0, 1, 2]]))
    assert np.array_equal(x, p["embed_tokens"]["weight"][ids])  # nn.Embedding alone: no position, no scale
    src = np.array([[5, 6, 7, 8]])
    plain, _ = model_forward(cfg, params, src, ids)
    scaled, _ = model_forward(cfg.replace(head_scale=8 ** -0.5), params, src, ids)  # T5 v1.0: tied head * D^-0.5
    np.testing.assert_allclose(scaled, plain * 8 ** -0.5, rtol=1e-13, atol=0)


NEW_OPTIONS = {  # each of F2's options of issue 13 on in some case, with the others as the families combine them
    "T5-like: rmsnorm pre-LN, no positions, gated gelu_tanh, no ffn bias, head_scale": dict(
        norm="rmsnorm", norm_first=True, positional="none", ffn_gated=True, ffn_bias=False, activation="gelu_tanh",
        head_scale=8 ** -0.5, embed_scale=False),
    "BART-like: learned + 2, embed_norm, gelu, unshared, final_logits_bias": dict(
        positional="learned", position_offset=2, embed_norm=True, activation="gelu", share_embeddings=False,
        lm_head_bias=True, embed_scale=False, final_norm=False),
    "Llama-like decoder-only: rmsnorm, SwiGLU without biases, untied, dropout": dict(
        family="decoder-only", n_encoder_layers=0, norm="rmsnorm", norm_first=True, positional="none",
        ffn_gated=True, ffn_bias=False, activation="silu", tie_embeddings=False, dropout=0.2),
    "decoder-only embed_norm rmsnorm, learned + 2, head_scale": dict(
        family="decoder-only", n_encoder_layers=0, norm="rmsnorm", embed_norm=True, positional="learned",
        position_offset=2, head_scale=0.5),
}


@pytest.mark.parametrize("case", list(NEW_OPTIONS))
def test_model_gradients_with_the_new_options(case):
    """Every parameter of model_forward / model_backward against centred differences (<= 1e-6, float64), padded
    rows included, with each new option on (test_gradients.check_model_gradients)."""
    cfg = Config(**{**SMALL, **NEW_OPTIONS[case]})
    check_model_gradients(cfg, 1234, B=3, S=5, T=4, explicit_masks=True, empty_source_row=cfg.is_encoder_decoder,
                          left_pad=not cfg.is_encoder_decoder, require=must)


@pytest.mark.parametrize("case", list(NEW_OPTIONS))
def test_decoder_step_equals_the_full_forward_with_the_new_options(case):
    """A left-padded prompt pass, then one token at a time: decoder_step's logits = model_forward's (<= 1e-12)."""
    cfg = Config(**{**SMALL, **NEW_OPTIONS[case], "dropout": 0.0})
    params = random_params(cfg, 5)
    rng = np.random.default_rng(6)
    B, prompt, steps = 3, 3, 3
    prompt_ids, prompt_keep, prompt_positions = left_padded(rng, B, prompt, cfg)
    ids = np.concatenate([prompt_ids, random_tokens(rng, cfg, (B, steps))], axis=1)
    keep = np.concatenate([prompt_keep, np.ones((B, steps), bool)], axis=1).astype(np.int64)
    positions = np.concatenate([prompt_positions, prompt_positions[:, -1:] + 1 + np.arange(steps)], axis=1)
    src, src_keep, cross_kv = None, None, None
    if cfg.is_encoder_decoder:
        src, src_keep = right_padded(rng, B, 4, cfg)
        src_keep = src_keep.astype(np.int64)
        _, cross_kv = encode(cfg, params, src, src_keep)
    expected, _ = model_forward(cfg, params, src, ids, tgt_mask=keep, tgt_positions=positions)
    got, _ = decode_incrementally(cfg, params, ids, positions, keep, prompt, cross_kv, src_keep)
    assert relative(got, expected) <= 1e-12


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


# ---------------------------------------------------------------------------- null special ids


def test_without_pad_id_every_token_is_real():
    cfg = Config(**SMALL, pad_id=None)
    params = random_params(cfg, 0)
    ids = np.array([[0, 5, 0, 6]])  # 0 is an ordinary token here
    default, _ = model_forward(cfg, params, ids, ids)
    explicit, _ = model_forward(cfg, params, ids, ids, src_mask=np.ones((1, 4), bool), tgt_mask=np.ones((1, 4), bool))
    assert np.array_equal(default, explicit)
    assert np.array_equal(token_keep_mask("mask", None, ids, cfg), np.ones((1, 4), bool))
    assert left_pad([[5], [6, 7]], None)[0].tolist() == [[0, 5], [6, 7]]  # keep, not the id, marks padding


@pytest.mark.parametrize("pad_id, fill", [(0, 0), (None, 2)])
def test_finished_rows_take_pad_or_else_eos(pad_id, fill):
    """A finished row yields pad_id, or eos_id when the model has no pad (as transformers' generate does)."""
    cfg = Config(**{**SMALL, "family": "decoder-only", "n_encoder_layers": 0}, lm_head_bias=True,
                 tie_embeddings=False, pad_id=pad_id)
    assert cfg.fill_id == fill
    params = random_params(cfg, 1)
    params["lm_head"]["bias"][:] = 0.0
    params["lm_head"]["weight"][:] = 0.0
    params["lm_head"]["bias"][cfg.eos_id] = 1.0  # every row says eos at once ...
    out = greedy_lm(cfg, params, np.array([[4, 5], [6, 7]]), max_new_tokens=3)
    assert out.tolist() == [[2], [2]]
    options = GenerationOptions(max_new_tokens=3, min_new_tokens=2)  # ... or after two tokens
    rows = generate(cfg, params, prompt_ids=np.array([[4, 5]]), options=options)
    assert rows[0][0][-1] == cfg.eos_id and len(rows[0][0]) == 3


def test_without_eos_generation_stops_only_at_the_budget_and_without_bos_an_encoder_decoder_refuses():
    cfg = Config(**{**SMALL, "family": "decoder-only", "n_encoder_layers": 0}, eos_id=None, pad_id=None)
    assert cfg.fill_id == 0
    params = random_params(cfg, 2)
    out = greedy_lm(cfg, params, np.array([[4, 5], [6, 7]]), max_new_tokens=4)
    assert out.shape == (2, 4)
    assert strip(out, cfg) == out.tolist() and trim_after_eos(out[0].tolist(), cfg) == out[0].tolist()
    beams = generate(cfg, params, prompt_ids=np.array([[4, 5]]), options=GenerationOptions(max_new_tokens=3,
                                                                                         num_beams=2))
    assert [len(row) for row in beams[0]] == [3]
    seq2seq = Config(**SMALL, bos_id=None)
    with pytest.raises(RefformerError, match="starts its decoder with bos_id, and this model has none"):
        greedy(seq2seq, random_params(seq2seq, 0), np.array([[4, 5, 2]]), max_new_tokens=2)


@pytest.mark.parametrize("changes", [{"pad_id": None}, {"bos_id": None, "eos_id": None, "unk_id": None},
                                     {"pad_id": None, "bos_id": None, "eos_id": None, "unk_id": None}])
def test_golden_inputs_leave_out_null_special_ids(changes):
    cfg = Config(**SMALL, **changes)
    inputs = golden_inputs(cfg, 0, batch_size=2, length=5)
    specials = {cfg.pad_id, cfg.bos_id, cfg.eos_id, cfg.unk_id} - {None}
    ordinary = set(range(cfg.vocab_size)) - specials
    rows = slice(None) if cfg.pad_id is None else slice(None, -1)  # the last row is padded only with a pad_id
    assert set(inputs["tgt_ids"][rows, 1:].ravel().tolist()) <= ordinary
    assert set(inputs["src_ids"][rows].ravel().tolist()) <= ordinary
    if cfg.eos_id is None:  # the last label is an ordinary token, not eos
        assert set(inputs["labels"][rows, -1].tolist()) <= ordinary
    out = golden(cfg, random_params(cfg, 0), 0)
    assert np.isfinite(out["loss"]) and all(np.isfinite(value).all() for value in out.values())


def test_training_refuses_a_model_without_pad_bos_or_eos(tmp_path):
    cfg = Config(**SMALL, pad_id=None)
    with pytest.raises(RefformerError, match="training and evaluation need pad_id"):
        load_examples(tmp_path, "train", cfg.family, None, cfg)


# ---------------------------------------------------------------------------- the families, end to end

FAMILY_LIKE = {  # tiny stand-ins with each family's options and special ids (not their weights)
    "T5 v1.0": dict(norm="rmsnorm", norm_first=True, positional="relative", relative_num_buckets=8,
                    relative_max_distance=16, attention_scale=1.0, attention_qkv_bias=False, attention_out_bias=False,
                    ffn_bias=False, embed_scale=False, head_scale=8 ** -0.5, pad_id=0, eos_id=1, unk_id=2, bos_id=0),
    "T5 v1.1": dict(norm="rmsnorm", norm_first=True, positional="relative", relative_num_buckets=8,
                    relative_max_distance=16, attention_scale=1.0, attention_qkv_bias=False, attention_out_bias=False,
                    ffn_gated=True, ffn_bias=False, activation="gelu_tanh", tie_embeddings=False, embed_scale=False,
                    head_dim=3, pad_id=0, eos_id=1, unk_id=None, bos_id=0),
    "BART": dict(positional="learned", position_offset=2, embed_norm=True, activation="gelu", embed_scale=False,
                 lm_head_bias=True, final_norm=False, bos_id=0, pad_id=1, eos_id=2, unk_id=3),
    "Marian": dict(positional="sinusoidal", activation="silu", lm_head_bias=True, final_norm=False, eos_id=0,
                   unk_id=1, pad_id=23, bos_id=23),
    "GPT-2": dict(family="decoder-only", n_encoder_layers=0, positional="learned", norm_first=True,
                  activation="gelu_tanh", embed_scale=False, pad_id=None, bos_id=22, eos_id=22, unk_id=None),
    "Llama GQA": dict(family="decoder-only", n_encoder_layers=0, n_heads=4, n_kv_heads=2, positional="rotary",
                      norm="rmsnorm", norm_first=True, ffn_gated=True, ffn_bias=False, activation="silu",
                      attention_qkv_bias=False, attention_out_bias=False, embed_scale=False, tie_embeddings=False,
                      pad_id=None, bos_id=1, eos_id=2, unk_id=0),
    "Qwen2 MQA": dict(family="decoder-only", n_encoder_layers=0, n_heads=4, n_kv_heads=1, positional="rotary",
                      norm="rmsnorm", norm_first=True, ffn_gated=True, ffn_bias=False, activation="silu",
                      attention_qkv_bias=True, attention_out_bias=False, embed_scale=False, rope_theta=1e6,
                      pad_id=None, bos_id=None, eos_id=21, unk_id=None),
}


@pytest.mark.parametrize("family", list(FAMILY_LIKE))
def test_golden_and_incremental_decoding_work_for_every_family(family, tmp_path):
    """write_golden on a saved folder of each family's options (null ids included): every array finite, the
    gradients those of model_backward; and decoder_step one token at a time = model_forward (<= 1e-12)."""
    cfg = Config(**{**SMALL, **FAMILY_LIKE[family]})
    params = random_params(cfg, 7)
    save(tmp_path / "model", cfg, params)
    arrays = write_golden(tmp_path / "model", tmp_path / "golden.npz")
    assert all(np.isfinite(value).all() for name, value in arrays.items() if name != "config_json")
    assert Config.from_dict(json.loads(str(arrays["config_json"]))) == cfg
    assert {name[len("grads."):] for name in arrays if name.startswith("grads.")} == set(flatten(params))

    rng = np.random.default_rng(8)
    B, T = 2, 5
    ids = random_tokens(rng, cfg, (B, T))
    src, cross_kv, src_keep = None, None, None
    if cfg.is_encoder_decoder:
        src, keep = right_padded(rng, B, 4, cfg)
        src_keep = keep.astype(np.int64)
        _, cross_kv = encode(cfg, params, src, src_keep)
    expected, _ = model_forward(cfg, params, src, ids, src_mask=src_keep)
    past = empty_cache(cfg, B, np.float64)
    assert all(k.shape == (B, cfg.n_kv_heads, 0, cfg.head_dim) for k, _ in past)
    pieces = []
    for t in range(T):
        logits, past = decoder_step(cfg, params, ids[:, t:t + 1], np.full((B, 1), t), np.ones((B, t + 1), np.int64),
                                    past, cross_kv, src_keep)
        pieces.append(logits)
    assert relative(np.concatenate(pieces, axis=1), expected) <= 1e-12


@pytest.mark.parametrize("family", list(FAMILY_LIKE))
def test_model_gradients_of_family_like_models(family):
    """Centred differences (<= 1e-6, float64) of every parameter with the family's options combined, padded rows
    marked by explicit masks (GPT-2 and Qwen2 have no pad_id)."""
    cfg = Config(**{**SMALL, **FAMILY_LIKE[family]})
    check_model_gradients(cfg, 1234, B=2, S=4, T=4, explicit_masks=True, left_pad=not cfg.is_encoder_decoder,
                          require=must)


def test_the_decoder_start_token_is_real_even_when_it_is_the_pad_id():
    """T5 and Marian start their decoder with the pad id: model_forward's default target mask keeps column 0 of an
    encoder-decoder's targets (the padding after the tokens is still dropped)."""
    cfg = Config(**SMALL, pad_id=0, bos_id=0)  # T5: decoder start = pad = 0
    params = random_params(cfg, 3)
    src, tgt = np.array([[5, 6, 7, 8]]), np.array([[0, 9, 10, 0]])
    default, _ = model_forward(cfg, params, src, tgt)
    explicit, _ = model_forward(cfg, params, src, tgt, tgt_mask=np.array([[1, 1, 1, 0]]))
    assert np.array_equal(default, explicit)
