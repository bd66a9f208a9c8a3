"""Correctness chain step 1: every refimpl backward against centred finite differences in float64.

Each check differentiates f = sum(forward(...) * W) with a random upstream gradient W, so the
backward is exercised with a dense, non-symmetric dy. Error per tensor: rel_error <= 1e-6.
tests/helpers.py explains the finite-difference step (and its one re-measurement at a larger step), the
tensors whose true gradient is exactly zero (attention k_proj.bias), and why draws with a relu input
within 1e-4 of its kink are skipped.
"""

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from refformer.refimpl import (
    Config,
    activation_backward,
    activation_forward,
    attention_backward,
    attention_forward,
    causal_mask,
    cross_entropy_backward,
    cross_entropy_forward,
    decoder_layer_backward,
    decoder_layer_forward,
    dropout_backward,
    dropout_forward,
    embedding_backward,
    embedding_forward,
    encoder_layer_backward,
    encoder_layer_forward,
    feed_forward_backward,
    feed_forward_forward,
    flatten,
    layer_norm_backward,
    layer_norm_forward,
    linear_backward,
    linear_forward,
    log_softmax_backward,
    log_softmax_forward,
    mha_backward,
    mha_forward,
    model_backward,
    model_forward,
    padding_mask,
    rel_error,
    rms_norm_backward,
    rms_norm_forward,
    softmax_backward,
    softmax_forward,
)
from tests.helpers import (
    RELU_MARGIN,
    B_sizes,
    assert_gradients,
    assert_param_gradients,
    away_from_zero,
    head_counts,
    head_widths,
    keep_mask,
    layer_configs,
    left_padded,
    lengths,
    model_configs,
    random_mha_params,
    random_params,
    relu_margin,
    right_padded,
    seeds,
    weighted_sum,
)

widths = st.integers(1, 16)  # D, Din, Dout


def rng_factory(seed):
    """A fresh Generator of the same seed per call, so dropout draws the same mask in every forward."""
    return (lambda: np.random.default_rng(seed)) if seed is not None else (lambda: None)


dropout_seeds = st.one_of(st.none(), seeds)  # None: eval mode (no dropout)


# ---------------------------------------------------------------------------- ops


@given(seed=seeds, B=B_sizes, T=lengths, Din=widths, Dout=widths, bias=st.booleans(), rank=st.integers(1, 3))
def test_linear(seed, B, T, Din, Dout, bias, rank):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, Din)[3 - rank:])
    p = {"weight": rng.standard_normal((Din, Dout))}
    if bias:
        p["bias"] = rng.standard_normal(Dout)
    y, cache = linear_forward(p, x)
    upstream = rng.standard_normal(y.shape)
    dx, dp = linear_backward(p, cache, upstream)
    f = weighted_sum(lambda: linear_forward(p, x)[0], upstream)
    assert_param_gradients(f, {"x": x, "p": p}, {"x": dx, "p": dp}, label="linear")


@given(seed=seeds, B=B_sizes, T=lengths, V=st.integers(1, 13), D=widths)
def test_embedding(seed, B, T, V, D):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, size=(B, T))  # repeated ids: the backward must add, not overwrite
    p = {"weight": rng.standard_normal((V, D))}
    y, cache = embedding_forward(p, ids)
    upstream = rng.standard_normal(y.shape)
    dp = embedding_backward(p, cache, upstream)
    f = weighted_sum(lambda: embedding_forward(p, ids)[0], upstream)
    assert_param_gradients(f, p, dp, label="embedding")


@given(seed=seeds, B=B_sizes, T=lengths, D=st.integers(4, 16), scale=st.sampled_from([0.1, 1.0, 5.0]),
       eps=st.sampled_from([1e-5, 1e-6]), rms=st.booleans(), bias=st.booleans())
@example(seed=3, B=2, T=3, D=5, scale=1.0, eps=1e-5, rms=False, bias=False)  # always run: layer norm without a bias
def test_norms(seed, B, T, D, scale, eps, rms, bias):
    """rms_norm, and layer_norm with and without its (optional, as in ONNX LayerNormalization) bias."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, D)) * scale + rng.standard_normal((B, T, 1))  # rows with an offset
    p = {"weight": 1.0 + 0.5 * rng.standard_normal(D)}
    if not rms and bias:
        p["bias"] = rng.standard_normal(D)
    forward, backward = (rms_norm_forward, rms_norm_backward) if rms else (layer_norm_forward, layer_norm_backward)
    y, cache = forward(p, x, eps)
    upstream = rng.standard_normal(y.shape)
    dx, dp = backward(p, cache, upstream)
    f = weighted_sum(lambda: forward(p, x, eps)[0], upstream)
    assert_param_gradients(f, {"x": x, "p": p}, {"x": dx, "p": dp}, label="rms_norm" if rms else "layer_norm")


@pytest.mark.parametrize("kind", ["relu", "gelu", "gelu_tanh", "silu"])
@given(seed=seeds, B=B_sizes, T=lengths, D=widths)
def test_activation(kind, seed, B, T, D):
    rng = np.random.default_rng(seed)
    if kind == "relu":
        x = away_from_zero(rng, (B, T, D))  # relu' jumps at 0, where a centred difference is meaningless
    else:
        x = rng.uniform(-3.0, 3.0, (B, T, D))  # further left the gradients (~x phi(x)) sink below FD noise
    y, cache = activation_forward(x, kind)
    upstream = rng.standard_normal(y.shape)
    dx = activation_backward(cache, upstream, kind)
    f = weighted_sum(lambda: activation_forward(x, kind)[0], upstream)
    assert_gradients(f, {"x": x}, {"x": dx}, label=kind)


@given(seed=seeds, dropout_seed=seeds, B=B_sizes, T=lengths, D=widths, rate=st.sampled_from([0.0, 0.1, 0.5, 0.9]))
def test_dropout(seed, dropout_seed, B, T, D, rate):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, D))
    y, cache = dropout_forward(x, rate, np.random.default_rng(dropout_seed))
    upstream = rng.standard_normal(y.shape)
    dx = dropout_backward(cache, upstream)
    f = weighted_sum(lambda: dropout_forward(x, rate, np.random.default_rng(dropout_seed))[0], upstream)
    assert_gradients(f, {"x": x}, {"x": dx}, label=f"dropout rate={rate}")


def test_dropout_eval_is_identity():
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    for rate, rng in [(0.5, None), (0.0, np.random.default_rng(1))]:
        y, cache = dropout_forward(x, rate, rng)
        np.testing.assert_array_equal(y, x)
        np.testing.assert_array_equal(dropout_backward(cache, x), x)


@given(seed=seeds, shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), data=st.data(),
       offset=st.sampled_from([0.0, 10.0]), log=st.booleans())
def test_softmax_and_log_softmax(seed, shape, data, offset, log):
    # unit-scale scores: a saturated softmax has gradients ~exp(-gap) that FD cannot resolve (large inputs are
    # checked for stability in test_properties)
    rng = np.random.default_rng(seed)
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    x = rng.standard_normal(shape) + offset
    forward, backward = (log_softmax_forward, log_softmax_backward) if log else (softmax_forward, softmax_backward)
    y, cache = forward(x, axis=axis)
    upstream = rng.standard_normal(y.shape)
    dx = backward(cache, upstream, axis=axis)
    f = weighted_sum(lambda: forward(x, axis=axis)[0], upstream)
    assert_gradients(f, {"x": x}, {"x": dx}, label=f"{'log_' if log else ''}softmax axis={axis}")


@given(seed=seeds, B=B_sizes, T=lengths, S=lengths)
def test_softmax_with_masked_entries_and_rows(seed, B, T, S):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, S))
    x = np.where(rng.random((B, T, S)) < 0.3, -np.inf, x)
    x[0, 0, :] = -np.inf  # a row that may attend to nothing
    y, cache = softmax_forward(x)
    upstream = rng.standard_normal(y.shape)
    dx = softmax_backward(cache, upstream)
    assert np.all(np.isfinite(dx)) and np.all(dx[np.isneginf(x)] == 0.0)
    f = weighted_sum(lambda: softmax_forward(x)[0], upstream)
    assert_gradients(f, {"x": x}, {"x": dx}, label="softmax with -inf")


# ---------------------------------------------------------------------------- attention

mask_kinds = st.sampled_from(["none", "bool", "float", "causal", "padding"])


def draw_attention_mask(rng, kind, B, H, T, S):
    """A mask of the given kind for scores [B, H, T, S]; bool, float and padding include a fully masked row."""
    if kind == "none":
        return None
    if kind == "causal":
        return causal_mask(T, S, past=max(S - T, 0))  # [T, S], broadcast over B and H
    if kind == "padding":
        keep = keep_mask(rng, B, S)
        keep[-1] = False  # the last batch row is all padding: every one of its queries is fully masked
        return padding_mask(keep)  # [B, 1, 1, S]
    allowed = rng.random((B, H if rng.random() < 0.5 else 1, T, S)) < 0.7
    allowed[0, 0, 0, :] = False
    if kind == "bool":
        return allowed
    return np.where(allowed, rng.standard_normal(allowed.shape), -np.inf)  # additive: finite biases and -inf


@given(seed=seeds, B=B_sizes, H=head_counts, T=lengths, S=lengths, Dh=head_widths, kind=mask_kinds,
       dropout_seed=dropout_seeds)
@example(seed=1, B=2, H=1, T=1, S=4, Dh=3, kind="padding", dropout_seed=None)  # always run: H = 1, T = 1, S != T
@example(seed=2, B=2, H=2, T=4, S=3, Dh=2, kind="causal", dropout_seed=5)
def test_attention(seed, B, H, T, S, Dh, kind, dropout_seed):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, H, L, Dh)) for L in (T, S, S))
    mask = draw_attention_mask(rng, kind, B, H, T, S)
    new_rng = rng_factory(dropout_seed)
    rate = 0.3 if dropout_seed is not None else 0.0

    def forward():
        return attention_forward(q, k, v, mask, dropout=rate, rng=new_rng())[0]

    out, cache = attention_forward(q, k, v, mask, dropout=rate, rng=new_rng())
    upstream = rng.standard_normal(out.shape)
    dq, dk, dv = attention_backward(cache, upstream)
    assert_gradients(weighted_sum(forward, upstream), {"q": q, "k": k, "v": v}, {"q": dq, "k": dk, "v": dv},
                     label=f"attention mask={kind} dropout={rate}")


@given(seed=seeds, B=B_sizes, H=head_counts, Dh=head_widths, T=lengths, S=lengths, cross=st.booleans(),
       kind=mask_kinds, dropout_seed=dropout_seeds)
@example(seed=1, B=2, H=1, Dh=4, T=1, S=5, cross=True, kind="padding", dropout_seed=None)
@example(seed=2, B=2, H=1, Dh=4, T=4, S=4, cross=False, kind="causal", dropout_seed=None)
@example(seed=3, B=2, H=4, Dh=2, T=3, S=5, cross=True, kind="float", dropout_seed=None)
def test_mha(seed, B, H, Dh, T, S, cross, kind, dropout_seed):
    rng = np.random.default_rng(seed)
    D = H * Dh
    p = random_mha_params(rng, D)
    xq = rng.standard_normal((B, T, D))
    xkv = rng.standard_normal((B, S, D)) if cross else xq  # self-attention: one array, so FD moves both
    mask = draw_attention_mask(rng, kind, B, H, T, S if cross else T)
    new_rng = rng_factory(dropout_seed)
    rate = 0.3 if dropout_seed is not None else 0.0

    def forward():
        return mha_forward(p, xq, xkv, mask, n_heads=H, dropout=rate, rng=new_rng())[0]

    y, cache = mha_forward(p, xq, xkv, mask, n_heads=H, dropout=rate, rng=new_rng())
    upstream = rng.standard_normal(y.shape)
    dxq, dxkv, dp = mha_backward(p, cache, upstream)
    inputs, grads = ({"xq": xq, "xkv": xkv}, {"xq": dxq, "xkv": dxkv}) if cross else ({"x": xq}, {"x": dxq + dxkv})
    assert_param_gradients(weighted_sum(forward, upstream), {**inputs, "p": p}, {**grads, "p": dp},
                           label=f"mha {'cross' if cross else 'self'} H={H} mask={kind} dropout={rate}")


def test_k_proj_bias_gradient_is_exactly_zero():
    """The fact the gradient helper relies on: softmax is shift-invariant per row, so d/d(k_proj.bias) = 0."""
    rng = np.random.default_rng(0)
    p = random_mha_params(rng, 8)
    x = rng.standard_normal((2, 5, 8))
    y, cache = mha_forward(p, x, x, causal_mask(5), n_heads=2)
    _, _, dp = mha_backward(p, cache, rng.standard_normal(y.shape))
    assert np.max(np.abs(dp["k_proj"]["bias"])) <= 1e-12 * np.max(np.abs(dp["q_proj"]["bias"]))


# ---------------------------------------------------------------------------- layers


@given(cfg=layer_configs(), seed=seeds, B=B_sizes, T=lengths, dropout_seed=dropout_seeds)
def test_feed_forward(cfg, seed, B, T, dropout_seed):
    cfg = cfg.replace(dropout=0.0 if dropout_seed is None else 0.3)
    p = random_params(cfg, seed)["encoder"]["layers"][0]["ffn"]
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((B, T, cfg.d_model))
    new_rng = rng_factory(dropout_seed)
    y, cache = feed_forward_forward(p, x, cfg, new_rng())
    assume(relu_margin(cache) > RELU_MARGIN)
    upstream = rng.standard_normal(y.shape)
    dx, dp = feed_forward_backward(p, cache, upstream)
    assert_param_gradients(weighted_sum(lambda: feed_forward_forward(p, x, cfg, new_rng())[0], upstream),
                           {"x": x, "p": p}, {"x": dx, "p": dp}, label=f"feed_forward {cfg.activation}")


@given(cfg=layer_configs(family="encoder-decoder"), seed=seeds, B=B_sizes, S=lengths, padded_row=st.booleans(),
       dropout_seed=dropout_seeds)
def test_encoder_layer(cfg, seed, B, S, padded_row, dropout_seed):
    cfg = cfg.replace(dropout=0.0 if dropout_seed is None else 0.2)
    p = random_params(cfg, seed)["encoder"]["layers"][0]
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((B, S, cfg.d_model))
    keep = keep_mask(rng, B, S)
    if padded_row:
        keep[-1] = False
    mask = padding_mask(keep)  # [B, 1, 1, S]
    new_rng = rng_factory(dropout_seed)
    y, cache = encoder_layer_forward(p, x, mask, cfg, new_rng())
    assume(relu_margin(cache) > RELU_MARGIN)
    upstream = rng.standard_normal(y.shape)
    dx, dp = encoder_layer_backward(p, cache, upstream, cfg)
    f = weighted_sum(lambda: encoder_layer_forward(p, x, mask, cfg, new_rng())[0], upstream)
    assert_param_gradients(f, {"x": x, "p": p}, {"x": dx, "p": dp}, max_entries=24, seed=seed,
                           label=f"encoder_layer {'pre' if cfg.norm_first else 'post'}-LN {cfg.norm}")


@given(cfg=layer_configs(), cross=st.booleans(), seed=seeds, B=B_sizes, T=lengths, S=lengths,
       dropout_seed=dropout_seeds)
def test_decoder_layer(cfg, cross, seed, B, T, S, dropout_seed):
    cfg = cfg.replace(family="encoder-decoder" if cross else "decoder-only",
                      dropout=0.0 if dropout_seed is None else 0.2)
    p = random_params(cfg, seed)["decoder"]["layers"][0]
    assert ("cross_attn" in p) == cross
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((B, T, cfg.d_model))
    self_mask = causal_mask(T)[None, None] & padding_mask(keep_mask(rng, B, T))  # [B, 1, T, T]
    memory, memory_mask = None, None
    if cross:
        memory = rng.standard_normal((B, S, cfg.d_model))
        memory_mask = padding_mask(keep_mask(rng, B, S, allow_empty_row=True))  # [B, 1, 1, S]
    new_rng = rng_factory(dropout_seed)

    def forward():
        return decoder_layer_forward(p, x, self_mask, memory, memory_mask, cfg, new_rng())[0]

    y, cache = decoder_layer_forward(p, x, self_mask, memory, memory_mask, cfg, new_rng())
    assume(relu_margin(cache) > RELU_MARGIN)
    upstream = rng.standard_normal(y.shape)
    dx, dmemory, dp = decoder_layer_backward(p, cache, upstream, cfg)
    tensors, grads = {"x": x, "p": p}, {"x": dx, "p": dp}
    if cross:
        tensors["memory"], grads["memory"] = memory, dmemory
    else:
        assert dmemory is None
    assert_param_gradients(weighted_sum(forward, upstream), tensors, grads, max_entries=24, seed=seed,
                           label=f"decoder_layer cross={cross} {'pre' if cfg.norm_first else 'post'}-LN {cfg.norm}")


# ---------------------------------------------------------------------------- full models


def must(condition):
    """assume() for the fixed cases outside hypothesis: their seeds were chosen to satisfy it."""
    assert condition, "a relu pre-activation lies within RELU_MARGIN of 0: choose another seed"


def check_model_gradients(cfg, seed, B, S, T, *, explicit_masks=False, empty_source_row=False, left_pad=False,
                          max_entries=16, require=assume):
    """Gradient check of every parameter of model_forward/model_backward, with padding in src and tgt."""
    params = random_params(cfg, seed)
    rng = np.random.default_rng(seed + 1)
    src_ids, kwargs = None, {}
    if cfg.is_encoder_decoder:
        src_ids, src_keep = right_padded(rng, B, S, cfg)
        if empty_source_row:
            src_ids[-1], src_keep[-1] = cfg.pad_id, False
        if explicit_masks:
            kwargs["src_mask"] = src_keep.astype(np.int64)
    if left_pad:
        tgt_ids, tgt_keep, kwargs["tgt_positions"] = left_padded(rng, B, T, cfg)
        kwargs["tgt_mask"] = tgt_keep.astype(np.int64)
    else:
        tgt_ids, tgt_keep = right_padded(rng, B, T, cfg)
        if explicit_masks:
            kwargs["tgt_mask"] = tgt_keep
    new_rng = rng_factory(seed + 2 if cfg.dropout > 0 else None)

    def forward():
        return model_forward(cfg, params, src_ids, tgt_ids, rng=new_rng(), **kwargs)[0]

    logits, cache = model_forward(cfg, params, src_ids, tgt_ids, rng=new_rng(), **kwargs)
    require(relu_margin(cache) > RELU_MARGIN)
    assert logits.shape == (B, T, cfg.vocab_size)
    upstream = rng.standard_normal(logits.shape)
    grads = model_backward(cfg, params, cache, upstream)
    assert_param_gradients(weighted_sum(forward, upstream), params, grads, max_entries=max_entries, seed=seed,
                           label=str(cfg))
    return grads


MODEL_CASES = {
    # every option appears in both states across these, whatever hypothesis draws
    "enc-dec post-LN layernorm sinusoidal tied shared": dict(family="encoder-decoder"),
    "enc-dec pre-LN rmsnorm learned untied unshared bias gelu": dict(
        family="encoder-decoder", norm_first=True, norm="rmsnorm", positional="learned", tie_embeddings=False,
        share_embeddings=False, lm_head_bias=True, activation="gelu", embed_scale=False),
    "enc-dec pre-LN layernorm tied unshared bias silu dropout": dict(
        family="encoder-decoder", norm_first=True, share_embeddings=False, lm_head_bias=True, activation="silu",
        dropout=0.2, n_heads=1),
    "dec-only post-LN rmsnorm learned untied gelu_tanh": dict(
        family="decoder-only", norm="rmsnorm", positional="learned", tie_embeddings=False, activation="gelu_tanh"),
    "dec-only pre-LN layernorm sinusoidal tied bias no final norm dropout": dict(
        family="decoder-only", norm_first=True, lm_head_bias=True, final_norm=False, dropout=0.2),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_cases(case):
    cfg = Config(**{**dict(vocab_size=11, d_model=8, n_heads=2, d_ff=12, n_encoder_layers=2, n_decoder_layers=2,
                           max_positions=8, dropout=0.0), **MODEL_CASES[case]})
    check_model_gradients(cfg, 1234, B=3, S=5, T=4, explicit_masks=True, empty_source_row=True,
                          left_pad=not cfg.is_encoder_decoder, require=must)


@settings(max_examples=min(settings().max_examples, 12))
@given(cfg=model_configs(), seed=seeds, B=B_sizes, S=lengths, T=lengths, explicit_masks=st.booleans(),
       empty_source_row=st.booleans(), left_pad=st.booleans())
@example(cfg=Config(vocab_size=9, d_model=4, n_heads=1, d_ff=6, n_encoder_layers=1, n_decoder_layers=1,
                    max_positions=8),
         seed=3, B=2, S=5, T=1, explicit_masks=False, empty_source_row=False, left_pad=False)  # T = 1, H = 1
def test_model(cfg, seed, B, S, T, explicit_masks, empty_source_row, left_pad):
    check_model_gradients(cfg, seed, B, S, T, explicit_masks=explicit_masks, empty_source_row=empty_source_row,
                          left_pad=left_pad)


def test_model_without_decoder_layers():
    """Nothing reads the memory: the encoder's gradients are exactly zero (model_backward once crashed here)."""
    cfg = Config(vocab_size=11, d_model=8, n_heads=2, d_ff=12, n_encoder_layers=1, n_decoder_layers=0,
                 max_positions=8, dropout=0.0)
    grads = check_model_gradients(cfg, 7, B=2, S=4, T=3, require=must)
    assert all(np.all(g == 0.0) for g in flatten(grads["encoder"]).values())


# ---------------------------------------------------------------------------- loss


def torch_cross_entropy(logits, targets, ignore_id, label_smoothing, dloss):
    logits_t = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    V = logits.shape[-1]
    loss = torch.nn.functional.cross_entropy(
        logits_t.reshape(-1, V), torch.tensor(targets.reshape(-1)),
        ignore_index=-100 if ignore_id is None else ignore_id, label_smoothing=label_smoothing)
    (loss * dloss).backward()
    return loss.item(), logits_t.grad.numpy().reshape(-1, V)


@given(seed=seeds, B=B_sizes, T=lengths, V=st.integers(2, 13), ignore=st.booleans(),
       label_smoothing=st.sampled_from([0.0, 0.1, 0.5, 1.0]), flat=st.booleans())
def test_cross_entropy(seed, B, T, V, ignore, label_smoothing, flat):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((B * T, V) if flat else (B, T, V))  # larger: p ~ 1, the gradient drowns in FD noise
    targets = rng.integers(0, V, size=logits.shape[:-1])
    ignore_id = int(targets.reshape(-1)[-1]) if ignore else None  # some, but never all, targets ignored
    if ignore:
        targets.reshape(-1)[0] = (ignore_id + 1) % V
    dloss = float(rng.standard_normal())
    loss, cache = cross_entropy_forward(logits, targets, ignore_id=ignore_id, label_smoothing=label_smoothing)
    dlogits = cross_entropy_backward(cache, dloss)
    assert dlogits.shape == logits.shape

    def f():
        return dloss * float(cross_entropy_forward(logits, targets, ignore_id=ignore_id,
                                                   label_smoothing=label_smoothing)[0])

    assert_gradients(f, {"logits": logits}, {"logits": dlogits}, label="cross_entropy")

    torch_loss, torch_grad = torch_cross_entropy(logits, targets, ignore_id, label_smoothing, dloss)
    assert rel_error(loss, torch_loss) <= 1e-10, (loss, torch_loss)
    assert rel_error(dlogits.reshape(-1, V), torch_grad) <= 1e-10


def test_cross_entropy_all_ignored_is_zero():
    logits = np.random.default_rng(0).standard_normal((2, 3, 5))
    targets = np.zeros((2, 3), np.int64)
    loss, cache = cross_entropy_forward(logits, targets, ignore_id=0, label_smoothing=0.1)
    assert loss == 0.0
    dlogits = cross_entropy_backward(cache)
    assert np.all(dlogits == 0.0)
