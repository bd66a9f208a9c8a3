"""Issue 13's attention features: grouped- and multi-query attention, the explicit scale, per-projection biases, rotary
position embedding and T5's relative position bias. Each against centred finite differences in float64 (rel_error
<= 1e-6, tests/helpers.py) and against the transformers module that defines it, forward and gradients (torch
autograd) in float64 at <= 1e-10: LlamaAttention (GQA + rope, head_dim != D / H), Qwen2Attention (MQA + q/k/v biases,
no output bias), T5Attention (relative bias, no scale; encoder and decoder) and T5's bucket function.

transformers' Llama and Qwen2 attention run with attn_implementation="sdpa": their eager path takes the softmax in
float32 whatever the dtype (eager_attention_forward: softmax(..., dtype=torch.float32)), which would cap float64
parity near 1e-7. Their rotary tables are computed in float32 too (LlamaRotaryEmbedding.forward), so the parity
tests feed transformers' attention the float64 tables of rotary_tables, and test_rotary_tables_match_llama checks
those tables against LlamaRotaryEmbedding within float32 rounding.
"""

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from refformer.refimpl.attention import (
    attention_backward,
    attention_forward,
    cached_self_attention_forward,
    causal_mask,
    mha_backward,
    mha_forward,
    mha_shapes,
    padding_mask,
    project_kv,
    relative_position_bias_backward,
    relative_position_bias_forward,
    relative_position_bucket,
    rotary_backward,
    rotary_forward,
    rotary_tables,
)
from tests.helpers import assert_gradients, assert_param_gradients, decode_incrementally, keep_mask, seeds, weighted_sum

transformers = pytest.importorskip("transformers")

PARITY_TOL = 1e-10  # correctness chain: refimpl vs the defining module, float64, forward and gradients

# (H, Hkv): multi-head, grouped-query, multi-query
head_layouts = st.sampled_from([(2, 2), (4, 2), (4, 1), (6, 3), (3, 1)])


def random_attention_params(rng, D, H, Hkv, Dh, *, qkv_bias=True, out_bias=True):
    """mha_shapes(D, H, Hkv, Dh) filled with N(0, 1/fan_in) weights and N(0, 0.2^2) biases, float64."""
    shapes = mha_shapes(D, H, Hkv, Dh, qkv_bias=qkv_bias, out_bias=out_bias)
    return {name: {key: rng.standard_normal(shape) / np.sqrt(shape[0]) if key == "weight"
                   else 0.2 * rng.standard_normal(shape) for key, shape in linear.items()}
            for name, linear in shapes.items()}


def left_padded_positions_of(keep):
    """Positions 0, 1, .. along each row's real tokens (model.left_padded_positions' formula)."""
    return np.maximum(np.cumsum(keep.astype(np.int64), axis=1) - 1, 0)


# ---------------------------------------------------------------------------- finite differences


@settings(max_examples=8, deadline=None)
@given(seed=seeds, layout=head_layouts, B=st.integers(1, 2), T=st.integers(1, 4), S=st.integers(1, 5),
       Dh=st.integers(1, 3), scale=st.sampled_from([None, 1.0, 0.3]), bias_batch=st.sampled_from([None, 1, "B"]))
@example(seed=1, layout=(4, 2), B=2, T=3, S=4, Dh=2, scale=1.0, bias_batch="B")
def test_attention_gqa_scale_bias_gradients(seed, layout, B, T, S, Dh, scale, bias_batch):
    """attention_forward with Hkv dividing H, an explicit scale and a position bias: dq, dk, dv and dbias."""
    rng = np.random.default_rng(seed)
    H, Hkv = layout
    q = rng.standard_normal((B, H, T, Dh))
    k, v = rng.standard_normal((B, Hkv, S, Dh)), rng.standard_normal((B, Hkv, S, Dh))
    mask = padding_mask(keep_mask(rng, B, S))
    bias = None if bias_batch is None else rng.standard_normal((B if bias_batch == "B" else 1, H, T, S))
    tensors = {"q": q, "k": k, "v": v} if bias is None else {"q": q, "k": k, "v": v, "bias": bias}

    def forward():
        return attention_forward(q, k, v, mask, scale=scale, position_bias=bias)[0]

    out, cache = attention_forward(q, k, v, mask, scale=scale, position_bias=bias)
    upstream = rng.standard_normal(out.shape)
    grads = attention_backward(cache, upstream)
    assert len(grads) == len(tensors)
    assert_gradients(weighted_sum(forward, upstream), tensors, dict(zip(tensors, grads)),
                     label=f"attention H={H} Hkv={Hkv} scale={scale} bias={bias_batch}")


@settings(max_examples=8, deadline=None)
@given(seed=seeds, layout=head_layouts, B=st.integers(1, 2), T=st.integers(1, 4), Dh=st.sampled_from([2, 4]),
       D=st.integers(2, 6), qkv_bias=st.booleans(), out_bias=st.booleans(), rotary=st.booleans(),
       relative=st.booleans())
@example(seed=2, layout=(4, 2), B=2, T=4, Dh=2, D=5, qkv_bias=False, out_bias=False, rotary=True, relative=False)
@example(seed=3, layout=(3, 1), B=2, T=3, Dh=4, D=4, qkv_bias=True, out_bias=False, rotary=False, relative=True)
def test_mha_features_gradients(seed, layout, B, T, Dh, D, qkv_bias, out_bias, rotary, relative):
    """Causal self-attention with GQA, head_dim != D / H, biases on or off, rotary and/or the relative bias table:
    the gradients of x, every parameter and the bias table."""
    rng = np.random.default_rng(seed)
    H, Hkv = layout
    p = random_attention_params(rng, D, H, Hkv, Dh, qkv_bias=qkv_bias, out_bias=out_bias)
    x = rng.standard_normal((B, T, D))
    keep = np.ones((B, T), bool)
    keep[-1, : T // 2] = False  # a left-padded row
    positions = left_padded_positions_of(keep)
    mask = causal_mask(T)[None, None] & padding_mask(keep)
    tables = rotary_tables(positions, Dh, 50.0) if rotary else None
    table = rng.standard_normal((8, H))
    scale = 1.0 if relative else None

    def forward():
        bias = relative_position_bias_forward(table, positions, positions, bidirectional=False, max_distance=10)[0]
        return mha_forward(p, x, x, mask, n_heads=H, scale=scale, position_bias=bias if relative else None,
                           rotary=tables)[0]

    bias, bias_cache = relative_position_bias_forward(table, positions, positions, bidirectional=False,
                                                      max_distance=10)
    y, cache = mha_forward(p, x, x, mask, n_heads=H, scale=scale, position_bias=bias if relative else None,
                           rotary=tables)
    upstream = rng.standard_normal(y.shape)
    dxq, dxkv, dp, *dbias = mha_backward(p, cache, upstream)
    params, grads = {"x": x, "p": p}, {"x": dxq + dxkv, "p": dp}
    if relative:
        params["table"], grads["table"] = table, relative_position_bias_backward(bias_cache, dbias[0])
    else:
        assert not dbias
    assert_param_gradients(weighted_sum(forward, upstream), params, grads,
                           label=f"mha H={H} Hkv={Hkv} Dh={Dh} D={D} rotary={rotary} relative={relative}")


@settings(max_examples=6, deadline=None)
@given(seed=seeds, B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 4), half=st.integers(1, 3))
def test_rotary_gradients(seed, B, H, T, half):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, H, T, 2 * half))
    cos, sin = rotary_tables(rng.integers(0, 30, (B, T)), 2 * half, 10000.0)
    y, cache = rotary_forward(x, cos, sin)
    upstream = rng.standard_normal(y.shape)
    assert_gradients(weighted_sum(lambda: rotary_forward(x, cos, sin)[0], upstream), {"x": x},
                     {"x": rotary_backward(cache, upstream)}, label="rotary")
    assert np.allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-13)  # a rotation


# ---------------------------------------------------------------------------- transformers' functions


def test_relative_position_bucket_matches_t5():
    """Every relative position in [-300, 300] gets T5Attention._relative_position_bucket's bucket, bidirectional and
    causal, for T5's settings and small ones (the float32 logarithm included: distances 16, 32, 64 sit on bucket
    edges for 32 buckets and 128)."""
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = np.arange(-300, 301)
    for num_buckets, max_distance in ((32, 128), (8, 20), (6, 7), (16, 64), (4, 3), (10, 100)):
        for bidirectional in (True, False):
            ours = relative_position_bucket(relative, bidirectional=bidirectional, num_buckets=num_buckets,
                                            max_distance=max_distance)
            theirs = T5Attention._relative_position_bucket(torch.from_numpy(relative), bidirectional=bidirectional,
                                                           num_buckets=num_buckets, max_distance=max_distance)
            np.testing.assert_array_equal(ours, theirs.numpy(), err_msg=f"{num_buckets} {max_distance}")


def test_rotary_tables_match_llama():
    """rotary_tables equals LlamaRotaryEmbedding's cos, sin within float32 rounding (transformers computes the angles
    in float32), and transformers' formula evaluated in float64 at <= 1e-12."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    positions = np.array([[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 30]])
    for head_dim, theta in ((8, 10000.0), (6, 500.0), (2, 1e6)):
        cfg = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, rope_theta=theta)
        x = torch.zeros(1, dtype=torch.float64)
        cos32, sin32 = LlamaRotaryEmbedding(cfg)(x, torch.from_numpy(positions))
        cos, sin = rotary_tables(positions, head_dim, theta)
        assert np.max(np.abs(cos - cos32.numpy())) < 1e-5 and np.max(np.abs(sin - sin32.numpy())) < 1e-5
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        freqs = torch.from_numpy(positions).to(torch.float64)[..., None] * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        assert np.max(np.abs(cos - emb.cos().numpy())) <= 1e-12 and np.max(np.abs(sin - emb.sin().numpy())) <= 1e-12


def to_torch(module, p, names):
    """Copy refimpl attention parameters p into a transformers module (nn.Linear stores W^T); names maps refimpl's
    projection names to the module's."""
    with torch.no_grad():
        for ours, theirs in names.items():
            linear = getattr(module, theirs)
            linear.weight.copy_(torch.from_numpy(p[ours]["weight"].T))
            assert (linear.bias is not None) == ("bias" in p[ours]), ours
            if linear.bias is not None:
                linear.bias.copy_(torch.from_numpy(p[ours]["bias"]))
    return module


def torch_grads(module, names):
    """{refimpl name: {"weight", "bias"}} of the module's .grad, in refimpl's layout."""
    out = {}
    for ours, theirs in names.items():
        linear = getattr(module, theirs)
        out[ours] = {"weight": linear.weight.grad.numpy().T}
        if linear.bias is not None:
            out[ours]["bias"] = linear.bias.grad.numpy()
    return out


def max_tree_error(ours, theirs):
    return max(float(np.max(np.abs(ours[n][k] - theirs[n][k]))) for n in ours for k in ours[n])


def additive(mask):
    """A boolean mask (True = attend) as transformers' additive float mask (0 keep, finfo.min drop)."""
    return torch.from_numpy(np.where(mask, 0.0, np.finfo(np.float64).min))


LLAMA_NAMES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "out_proj": "o_proj"}


@pytest.mark.parametrize("family, H, Hkv, Dh, D", [("llama", 4, 2, 6, 12), ("llama", 2, 2, 4, 8),
                                                   ("qwen2", 4, 1, 4, 16), ("qwen2", 6, 2, 2, 12)])
def test_llama_qwen2_attention_parity(family, H, Hkv, Dh, D):
    """LlamaAttention (GQA, rope, no biases, head_dim != D / H) and Qwen2Attention (MQA/GQA, q/k/v biases, no output
    bias) in float64, causal with a left-padded row: output, input gradient and every parameter gradient."""
    from transformers import LlamaConfig, Qwen2Config
    from transformers.models.llama.modeling_llama import LlamaAttention
    from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention

    rng = np.random.default_rng(13)
    B, T, theta = 2, 5, 300.0
    config_class, module_class = (LlamaConfig, LlamaAttention) if family == "llama" else (Qwen2Config, Qwen2Attention)
    config = config_class(hidden_size=D, num_attention_heads=H, num_key_value_heads=Hkv, head_dim=Dh,
                          rope_theta=theta, attention_dropout=0.0)
    config._attn_implementation = "sdpa"
    module = module_class(config, layer_idx=0).double().eval()
    p = random_attention_params(rng, D, H, Hkv, Dh, qkv_bias=family == "qwen2", out_bias=False)
    to_torch(module, p, LLAMA_NAMES)
    x = rng.standard_normal((B, T, D))
    keep = np.ones((B, T), bool)
    keep[1, :2] = False
    positions = left_padded_positions_of(keep)
    mask = causal_mask(T)[None, None] & padding_mask(keep)  # [B, 1, T, T]
    mask[1, 0, :2, :2] = np.eye(2, dtype=bool)  # padding queries attend to themselves (no fully masked rows)
    cos, sin = rotary_tables(positions, Dh, theta)

    y, cache = mha_forward(p, x, x, mask, n_heads=H, rotary=(cos, sin))
    upstream = rng.standard_normal(y.shape)
    dxq, dxkv, dp = mha_backward(p, cache, upstream)

    xt = torch.from_numpy(x).requires_grad_()
    yt, _ = module(xt, position_embeddings=(torch.from_numpy(cos), torch.from_numpy(sin)),
                   attention_mask=additive(mask))
    (yt * torch.from_numpy(upstream)).sum().backward()
    errors = {"forward": float(np.max(np.abs(y - yt.detach().numpy()))),
              "dx": float(np.max(np.abs(dxq + dxkv - xt.grad.numpy()))),
              "dparams": max_tree_error(dp, torch_grads(module, LLAMA_NAMES))}
    assert max(errors.values()) <= PARITY_TOL, errors


@pytest.mark.parametrize("decoder", [False, True])
def test_t5_attention_parity(decoder):
    """T5Attention with its relative position bias (bidirectional encoder, causal decoder), no 1/sqrt(Dh) scale,
    no biases, d_kv != D / H, in float64 with padding: output, input gradient, every projection's gradient and the
    bias table's gradient."""
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention

    rng = np.random.default_rng(5)
    B, T, D, H, Dh, buckets, max_distance = 2, 7, 8, 2, 3, 8, 6
    config = T5Config(d_model=D, d_kv=Dh, num_heads=H, relative_attention_num_buckets=buckets,
                      relative_attention_max_distance=max_distance, dropout_rate=0.0, is_decoder=decoder)
    config._attn_implementation = "eager"
    module = T5Attention(config, has_relative_attention_bias=True, layer_idx=0, is_causal=decoder).double().eval()
    names = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "o"}
    p = random_attention_params(rng, D, H, H, Dh, qkv_bias=False, out_bias=False)
    to_torch(module, p, names)
    table = rng.standard_normal((buckets, H))
    with torch.no_grad():
        module.relative_attention_bias.weight.copy_(torch.from_numpy(table))
    x = rng.standard_normal((B, T, D))
    keep = np.ones((B, T), bool)
    keep[1, -3:] = False  # right padding, as T5's tokenizer pads
    mask = padding_mask(keep) & (causal_mask(T)[None, None] if decoder else True)
    positions = np.arange(T)[None]  # T5: the index in the sequence

    bias, bias_cache = relative_position_bias_forward(table, positions, positions, bidirectional=not decoder,
                                                      max_distance=max_distance)
    y, cache = mha_forward(p, x, x, mask, n_heads=H, scale=1.0, position_bias=bias)
    upstream = rng.standard_normal(y.shape)
    dxq, dxkv, dp, dbias = mha_backward(p, cache, upstream)
    dtable = relative_position_bias_backward(bias_cache, dbias)

    xt = torch.from_numpy(x).requires_grad_()
    yt, bias_t, _ = module(xt, mask=additive(mask))
    (yt * torch.from_numpy(upstream)).sum().backward()
    errors = {"forward": float(np.max(np.abs(y - yt.detach().numpy()))),
              "bias": float(np.max(np.abs(bias - bias_t.detach().numpy()))),
              "dx": float(np.max(np.abs(dxq + dxkv - xt.grad.numpy()))),
              "dparams": max_tree_error(dp, torch_grads(module, names)),
              "dtable": float(np.max(np.abs(dtable - module.relative_attention_bias.weight.grad.numpy())))}
    assert max(errors.values()) <= PARITY_TOL, errors


# ---------------------------------------------------------------------------- incremental decoding


@settings(max_examples=8, deadline=None)
@given(seed=seeds, layout=head_layouts, P=st.integers(0, 4), T=st.integers(1, 3), rotary=st.booleans(),
       relative=st.booleans())
def test_cached_self_attention_features(seed, layout, P, T, rotary, relative):
    """cached_self_attention_forward with GQA caches [B, Hkv, P, Dh], rotary keys and the relative bias gives
    mha_forward's last T rows over all P + T positions; its present cache is project_kv of all (rotated keys)."""
    rng = np.random.default_rng(seed)
    H, Hkv = layout
    B, D, Dh = 2, 5, 2
    p = random_attention_params(rng, D, H, Hkv, Dh, qkv_bias=bool(seed % 2), out_bias=not seed % 3)
    x = rng.standard_normal((B, P + T, D))
    keep = np.ones((B, P + T), bool)
    keep[1, :1] = False
    positions = left_padded_positions_of(keep)
    table = rng.standard_normal((8, H))
    mask = causal_mask(P + T)[None, None] & padding_mask(keep)
    tables = rotary_tables(positions, Dh, 10000.0) if rotary else None
    bias = relative_position_bias_forward(table, positions, positions, bidirectional=False, max_distance=10)[0]
    full, _ = mha_forward(p, x, x, mask, n_heads=H, rotary=tables, position_bias=bias if relative else None)

    past_k, past_v = project_kv(p, x[:, :P], H, None if tables is None else tuple(t[:, :P] for t in tables))
    assert past_k.shape == (B, Hkv, P, Dh)
    step_bias = relative_position_bias_forward(table, positions[:, P:], positions, bidirectional=False,
                                               max_distance=10)[0]
    y, (k, v) = cached_self_attention_forward(
        p, x[:, P:], past_k, past_v, mask[:, :, P:], n_heads=H,
        rotary=None if tables is None else tuple(t[:, P:] for t in tables),
        position_bias=step_bias if relative else None)
    np.testing.assert_allclose(y, full[:, P:], rtol=0, atol=1e-12)
    k_all, v_all = project_kv(p, x, H, tables)
    np.testing.assert_allclose(k, k_all, rtol=0, atol=1e-12)
    np.testing.assert_allclose(v, v_all, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------- whole models


BASE = dict(vocab_size=11, d_model=8, n_heads=4, d_ff=12, n_encoder_layers=2, n_decoder_layers=2, max_positions=10,
            dropout=0.0, activation="silu")
FEATURE_MODELS = {
    # Llama-like: GQA, rotary, head_dim != D / H, no attention biases, pre-LN rmsnorm
    "dec-only GQA rotary": dict(family="decoder-only", n_kv_heads=2, head_dim=4, positional="rotary", rope_theta=100.0,
                                attention_qkv_bias=False, attention_out_bias=False, norm="rmsnorm", norm_first=True,
                                tie_embeddings=False),
    # Qwen2-like: MQA with q/k/v biases, no output bias
    "dec-only MQA rotary qkv bias": dict(family="decoder-only", n_kv_heads=1, positional="rotary",
                                         attention_out_bias=False, norm="rmsnorm", norm_first=True),
    # T5-like: relative buckets, no scale, d_kv != D / H, no biases
    "enc-dec relative": dict(family="encoder-decoder", positional="relative", relative_num_buckets=8,
                             relative_max_distance=6, attention_scale=1.0, head_dim=3, attention_qkv_bias=False,
                             attention_out_bias=False, norm="rmsnorm", norm_first=True, embed_scale=False,
                             share_embeddings=False),
    "dec-only relative GQA": dict(family="decoder-only", positional="relative", relative_num_buckets=4,
                                  relative_max_distance=3, n_kv_heads=2, attention_scale=0.7),
    "enc-dec GQA rotary post-LN": dict(family="encoder-decoder", n_kv_heads=1, head_dim=2, positional="rotary"),
}


def feature_config(name, **changes):
    from refformer.refimpl import Config

    return Config(**{**BASE, **FEATURE_MODELS[name], **changes})


@pytest.mark.parametrize("name", list(FEATURE_MODELS))
def test_feature_model_gradients(name):
    """model_forward/model_backward of every feature model against finite differences, every parameter tensor (the
    shared relative bias tables included), with padding (left-padded rows for decoder-only models)."""
    from tests.refimpl.test_gradients import check_model_gradients, must

    cfg = feature_config(name)
    grads = check_model_gradients(cfg, 21, B=2, S=5, T=4, explicit_masks=True, left_pad=not cfg.is_encoder_decoder,
                                  max_entries=12, require=must)
    if cfg.positional == "relative":
        stacks = ("encoder", "decoder") if cfg.is_encoder_decoder else ("decoder",)
        assert all(np.any(grads[s]["relative_attention_bias"]["weight"] != 0) for s in stacks)


@pytest.mark.parametrize("name", list(FEATURE_MODELS))
def test_feature_model_decoder_step_matches_model_forward(name):
    """A left-padded prompt (T > 1), then single tokens through decoder_step with its [B, Hkv, P, Dh] caches, give
    model_forward's logits (rotary keys cached rotated; the relative bias of query P + i)."""
    from refformer.refimpl import encode, flatten, init_params, model_forward
    from refformer.refimpl.model import left_pad

    cfg = feature_config(name)
    rng = np.random.default_rng(3)
    params = init_params(cfg, rng, np.float64)
    for value in flatten(params).values():
        value += 0.2 * rng.standard_normal(value.shape)  # no zero biases or unit norms, nor a zero relative table
    prompt_ids, prompt_keep, prompt_positions = left_pad([[4, 5, 6], [7, 8]], cfg.pad_id)
    B, prompt, steps = 2, 3, 3
    new_ids = rng.integers(4, cfg.vocab_size, (B, steps))
    ids = np.concatenate([prompt_ids, new_ids], axis=1)
    keep = np.concatenate([prompt_keep, np.ones((B, steps), np.int64)], axis=1)
    positions = np.concatenate([prompt_positions, prompt_positions[:, -1:] + 1 + np.arange(steps)], axis=1)
    src, src_keep, cross_kv = None, None, None
    if cfg.is_encoder_decoder:
        src, src_keep = np.array([[4, 5, 6, 7, 8], [9, 10, 4, 0, 0]]), np.array([[1] * 5, [1, 1, 1, 0, 0]])
        _, cross_kv = encode(cfg, params, src, src_keep)
        assert cross_kv[0][0].shape == (B, cfg.n_kv_heads, 5, cfg.head_dim)
    expected, _ = model_forward(cfg, params, src, ids, src_mask=src_keep, tgt_mask=keep, tgt_positions=positions)
    got, caches = decode_incrementally(cfg, params, ids, positions, keep, prompt, cross_kv, src_keep)
    for t, past in enumerate(caches[1:], start=prompt):
        assert all(k.shape == v.shape == (B, cfg.n_kv_heads, t + 1, cfg.head_dim) for k, v in past)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)  # padding rows too
