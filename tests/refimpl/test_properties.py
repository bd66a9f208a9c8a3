"""Properties the models must have whatever the weights: causality, padding and batch-row invariance,
incremental decoding (cached self-attention, decoder_step) equal to the full forward, H = 1 attention by hand,
softmax on masked rows, and float32 staying float32. All in float64 to 1e-12 unless said otherwise."""

import math

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from refformer.refimpl import (
    Config,
    attention_backward,
    attention_forward,
    causal_mask,
    cross_entropy_backward,
    cross_entropy_forward,
    decoder_layer_backward,
    decoder_layer_forward,
    decoder_step,
    empty_cache,
    encode,
    encoder_layer_backward,
    encoder_layer_forward,
    feed_forward_backward,
    feed_forward_forward,
    flatten,
    init_params,
    log_softmax_forward,
    mha_backward,
    mha_forward,
    model_backward,
    model_forward,
    padding_mask,
    rel_error,
    softmax_backward,
    softmax_forward,
)
from refformer.refimpl.attention import cached_self_attention_forward, project_kv
from refformer.refimpl.model import left_padded_positions
from tests.helpers import (
    B_sizes,
    decode_incrementally,
    head_counts,
    head_widths,
    keep_mask,
    left_padded,
    lengths,
    model_configs,
    random_mha_params,
    random_params,
    random_tokens,
    right_padded,
    seeds,
)

TOL = 1e-12


def assert_close(actual, expected, tol=TOL, what=""):
    error = rel_error(actual, expected)
    assert error <= tol, f"{what}: rel_error {error:.2e} > {tol:.0e}"


# ---------------------------------------------------------------------------- causality and padding


@given(cfg=model_configs(), seed=seeds, B=B_sizes, S=lengths, T=st.integers(2, 6), data=st.data())
def test_causal_invariance(cfg, seed, B, S, T, data):
    """Changing target tokens at positions >= t leaves the logits of positions < t unchanged."""
    t = data.draw(st.integers(1, T - 1), label="t")
    params = random_params(cfg, seed)
    rng = np.random.default_rng(seed + 1)
    src = right_padded(rng, B, S, cfg)[0] if cfg.is_encoder_decoder else None
    tgt, _ = right_padded(rng, B, T, cfg, min_length=T)
    changed = tgt.copy()
    changed[:, t:] = random_tokens(rng, cfg, (B, T - t))
    before, _ = model_forward(cfg, params, src, tgt)
    after, _ = model_forward(cfg, params, src, changed)
    assert_close(after[:, :t], before[:, :t], what="logits before the changed position")


@given(cfg=model_configs(family="encoder-decoder"), seed=seeds, B=B_sizes, S=lengths, T=lengths,
       extra=st.integers(1, 3))
def test_source_padding_invariance(cfg, seed, B, S, T, extra):
    """Tokens at padded source positions, and padding appended to the source, do not change any logit."""
    assume(S + extra <= cfg.max_positions)
    params = random_params(cfg, seed)
    rng = np.random.default_rng(seed + 1)
    src, src_keep = right_padded(rng, B, S, cfg)
    tgt, tgt_keep = right_padded(rng, B, T, cfg)
    logits, _ = model_forward(cfg, params, src, tgt)

    # the tokens under the padding, with an explicit mask, are ignored
    noisy = np.where(src_keep, src, random_tokens(rng, cfg, src.shape))
    relabelled, _ = model_forward(cfg, params, noisy, tgt, src_mask=src_keep)
    assert_close(relabelled[tgt_keep], logits[tgt_keep], what="tokens at padded source positions")

    # appending padding lengthens S, not the result
    longer = np.concatenate([src, np.full((B, extra), cfg.pad_id)], axis=1)
    appended, _ = model_forward(cfg, params, longer, tgt)
    assert_close(appended[tgt_keep], logits[tgt_keep], what="padding appended to the source")


@given(cfg=model_configs(), seed=seeds, B=B_sizes, S=lengths, T=lengths, extra=st.integers(1, 3))
def test_target_padding_invariance(cfg, seed, B, S, T, extra):
    """Appended target padding, tokens at padded target positions, and left padding with explicit positions
    leave the logits of the real target positions unchanged."""
    assume(T + extra <= cfg.max_positions)
    params = random_params(cfg, seed)
    rng = np.random.default_rng(seed + 1)
    src = right_padded(rng, B, S, cfg)[0] if cfg.is_encoder_decoder else None
    tgt, keep = right_padded(rng, B, T, cfg)
    logits, _ = model_forward(cfg, params, src, tgt)

    longer = np.concatenate([tgt, np.full((B, extra), cfg.pad_id)], axis=1)
    appended, _ = model_forward(cfg, params, src, longer)
    assert_close(appended[:, :T][keep], logits[keep], what="padding appended to the target")

    # left-pad every row by a different amount: same logits at the real tokens, given their positions
    shift = rng.integers(0, extra + 1, size=B)
    lengths = keep.sum(axis=1)
    left = np.full((B, T + extra), cfg.pad_id)
    left_keep = np.zeros((B, T + extra), bool)
    for b in range(B):
        left[b, shift[b]:shift[b] + lengths[b]] = tgt[b, :lengths[b]]
        left_keep[b, shift[b]:shift[b] + lengths[b]] = True
    positions = left_padded_positions(left_keep)
    under_pads = np.where(left_keep, left, random_tokens(rng, cfg, left.shape))  # tokens under pads are ignored
    shifted, _ = model_forward(cfg, params, src, under_pads, tgt_mask=left_keep, tgt_positions=positions)
    assert_close(shifted[left_keep], logits[keep], what="left padding with explicit positions")


@given(cfg=model_configs(), seed=seeds, B=st.integers(2, 3), S=lengths, T=lengths, data=st.data())
def test_batch_rows_are_independent(cfg, seed, B, S, T, data):
    """Row b's logits depend on row b only: alone, or next to other (changed) rows, they are the same."""
    b = data.draw(st.integers(0, B - 1), label="b")
    params = random_params(cfg, seed)
    rng = np.random.default_rng(seed + 1)
    src = right_padded(rng, B, S, cfg)[0] if cfg.is_encoder_decoder else None
    tgt, _ = right_padded(rng, B, T, cfg)
    logits, _ = model_forward(cfg, params, src, tgt)

    alone, _ = model_forward(cfg, params, None if src is None else src[b:b + 1], tgt[b:b + 1])
    assert_close(alone[0], logits[b], what="row alone")

    others = np.arange(B) != b
    src2 = None if src is None else src.copy()
    tgt2 = tgt.copy()
    tgt2[others] = right_padded(rng, B - 1, T, cfg)[0]
    if src2 is not None:
        src2[others] = right_padded(rng, B - 1, S, cfg)[0]
    changed, _ = model_forward(cfg, params, src2, tgt2)
    assert_close(changed[b], logits[b], what="other rows changed")


# ---------------------------------------------------------------------------- incremental decoding


def with_decoder_layers(cfg):
    """At least one decoder layer: see test_decoder_step_without_decoder_layers."""
    return cfg if cfg.n_decoder_layers else cfg.replace(n_decoder_layers=1)


def test_decoder_step_without_decoder_layers():
    cfg = Config(vocab_size=11, d_model=8, n_heads=2, d_ff=12, n_decoder_layers=0, family="decoder-only",
                 max_positions=8)
    params = random_params(cfg, 0)
    ids = np.array([[4, 5, 6], [7, 8, 9]])
    expected, _ = model_forward(cfg, params, None, ids)
    first, past = decoder_step(cfg, params, ids[:, :2], None, np.ones((2, 2), np.int64), empty_cache(cfg, 2))
    last, _ = decoder_step(cfg, params, ids[:, 2:], np.full((2, 1), 2), np.ones((2, 3), np.int64), past)
    assert_close(np.concatenate([first, last], axis=1), expected)



@given(cfg=model_configs(), seed=seeds, B=B_sizes, S=lengths, prompt=st.integers(2, 4), steps=st.integers(1, 3),
       ragged=st.booleans())
def test_decoder_step_matches_model_forward(cfg, seed, B, S, prompt, steps, ragged):
    """A prompt pass (T > 1) then single-token steps give model_forward's logits, rows of different lengths
    included (left-padded prompts with attention_mask and positions)."""
    total = prompt + steps
    assume(total <= cfg.max_positions)
    cfg = with_decoder_layers(cfg)
    params = random_params(cfg, seed)
    rng = np.random.default_rng(seed + 1)
    if ragged:
        prompt_ids, prompt_keep, prompt_positions = left_padded(rng, B, prompt, cfg)
    else:
        prompt_ids = random_tokens(rng, cfg, (B, prompt))
        prompt_keep = np.ones((B, prompt), bool)
        prompt_positions = np.broadcast_to(np.arange(prompt), (B, prompt))
    new_ids = random_tokens(rng, cfg, (B, steps))
    ids = np.concatenate([prompt_ids, new_ids], axis=1)
    keep = np.concatenate([prompt_keep, np.ones((B, steps), bool)], axis=1)
    positions = np.concatenate([prompt_positions, prompt_positions[:, -1:] + 1 + np.arange(steps)], axis=1)

    src, src_keep, cross_kv = None, None, None
    if cfg.is_encoder_decoder:
        src, src_keep = right_padded(rng, B, S, cfg)
        _, cross_kv = encode(cfg, params, src, src_keep.astype(np.int64))
    expected, _ = model_forward(cfg, params, src, ids, tgt_mask=keep, tgt_positions=positions)

    got, caches = decode_incrementally(cfg, params, ids, positions, keep, prompt, cross_kv, src_keep)
    for t, past in enumerate(caches[1:], start=prompt):
        for k, v in past:
            assert k.shape == v.shape == (B, cfg.n_kv_heads, t + 1, cfg.head_dim)
    assert_close(got, expected, what="decoder_step vs model_forward (padding queries included)")
    assert np.all(np.isfinite(got))


@given(cfg=model_configs(), seed=seeds, B=B_sizes, S=lengths, T=lengths)
def test_decoder_step_one_token_at_a_time_from_empty(cfg, seed, B, S, T):
    cfg = with_decoder_layers(cfg)
    params = random_params(cfg, seed)
    rng = np.random.default_rng(seed + 1)
    ids = random_tokens(rng, cfg, (B, T))
    src, cross_kv, encoder_mask = None, None, None
    if cfg.is_encoder_decoder:
        src, src_keep = right_padded(rng, B, S, cfg)
        encoder_mask = src_keep.astype(np.int64)
        memory, cross_kv = encode(cfg, params, src)
        assert memory.shape == (B, S, cfg.d_model) and len(cross_kv) == cfg.n_decoder_layers
    expected, _ = model_forward(cfg, params, src, ids)
    past = empty_cache(cfg, B, np.float64)
    pieces = []
    for t in range(T):
        positions = np.full((B, 1), t)
        logits, past = decoder_step(cfg, params, ids[:, t:t + 1], positions, np.ones((B, t + 1), np.int64), past,
                                    cross_kv, encoder_mask)
        pieces.append(logits)
    assert_close(np.concatenate(pieces, axis=1), expected, what="step by step from an empty cache")


# ---------------------------------------------------------------------------- attention by hand


@given(seed=seeds, B=B_sizes, T=lengths, S=lengths, D=st.integers(1, 16), cross=st.booleans(), masked=st.booleans())
def test_single_head_mha_is_plain_attention(seed, B, T, S, D, cross, masked):
    rng = np.random.default_rng(seed)
    p = random_mha_params(rng, D)
    xq = rng.standard_normal((B, T, D))
    xkv = rng.standard_normal((B, S, D)) if cross else xq
    S = xkv.shape[1]
    keep = keep_mask(rng, B, S) if masked else np.ones((B, S), bool)
    y, _ = mha_forward(p, xq, xkv, padding_mask(keep), n_heads=1)

    def project(x, name):
        return x @ p[name]["weight"] + p[name]["bias"]

    q, k, v = project(xq, "q_proj"), project(xkv, "k_proj"), project(xkv, "v_proj")  # [B, T or S, D]
    scores = np.einsum("btd,bsd->bts", q, k) / math.sqrt(D)
    scores = np.where(keep[:, None, :], scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights /= weights.sum(axis=-1, keepdims=True)
    expected = project(np.einsum("bts,bsd->btd", weights, v), "out_proj")
    assert_close(y, expected, what="H=1 mha vs by hand")

    via_attention, _ = attention_forward(q[:, None], k[:, None], v[:, None], padding_mask(keep))  # [B, 1, T, D]
    assert_close(project(via_attention[:, 0], "out_proj"), expected, what="H=1 via attention_forward")


@given(seed=seeds, B=B_sizes, P=st.integers(0, 5), T=lengths, H=head_counts, Dh=head_widths, masked=st.booleans())
def test_cached_self_attention_is_the_last_rows_of_full_self_attention(seed, B, P, T, H, Dh, masked):
    """attention.cached_self_attention_forward over a cache of P positions gives mha_forward's last T rows over all
    P + T positions (keys and values of a position depend on it alone), and its present cache is project_kv of all."""
    rng = np.random.default_rng(seed)
    D = H * Dh
    p = random_mha_params(rng, D)
    x = rng.standard_normal((B, P + T, D))
    keep = keep_mask(rng, B, P + T) if masked else np.ones((B, P + T), bool)
    mask = causal_mask(P + T)[None, None] & padding_mask(keep)  # [B, 1, P + T, P + T]
    full, _ = mha_forward(p, x, x, mask, n_heads=H)
    past_k, past_v = project_kv(p, x[:, :P], H)
    y, (k, v) = cached_self_attention_forward(p, x[:, P:], past_k, past_v, mask[:, :, P:], n_heads=H)
    assert_close(y, full[:, P:], what="cached vs full self-attention")
    all_k, all_v = project_kv(p, x, H)
    assert_close(k, all_k, what="present keys")
    assert_close(v, all_v, what="present values")


# ---------------------------------------------------------------------------- softmax and masked rows


@given(seed=seeds, shape=st.lists(st.integers(1, 6), min_size=1, max_size=4),
       scale=st.sampled_from([1.0, 1e3, 1e150]))
def test_softmax_rows_sum_to_one(seed, shape, scale):
    rng = np.random.default_rng(seed)
    x = scale * rng.standard_normal(shape)
    y, _ = softmax_forward(x)
    assert np.all(np.isfinite(y)) and np.all(y >= 0)
    np.testing.assert_allclose(y.sum(axis=-1), 1.0, rtol=0, atol=1e-14)
    logp, _ = log_softmax_forward(x)
    assert np.all(np.isfinite(logp)) and np.all(logp <= 0)


@given(seed=seeds, B=B_sizes, H=head_counts, T=lengths, S=lengths, Dh=head_widths)
def test_fully_masked_rows_are_exactly_zero(seed, B, H, T, S, Dh):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((B, H, T, S))
    allowed = rng.random((B, H, T, S)) < 0.6
    allowed[:, :, 0, :] = False  # the first query of every row sees nothing
    y, cache = softmax_forward(np.where(allowed, scores, -np.inf))
    assert not np.any(np.isnan(y))
    assert np.all(y[:, :, 0, :] == 0.0)
    assert np.all(y[~allowed] == 0.0)
    rows = allowed.any(axis=-1)
    np.testing.assert_allclose(y.sum(axis=-1)[rows], 1.0, rtol=0, atol=1e-14)
    assert np.all(softmax_backward(cache, rng.standard_normal(y.shape))[:, :, 0, :] == 0.0)

    # attention: a query with no key gets a zero output and passes no gradient, for bool and -inf masks
    q, k, v = (rng.standard_normal((B, H, L, Dh)) for L in (T, S, S))
    for mask in (allowed, np.where(allowed, 0.0, -np.inf)):
        out, cache = attention_forward(q, k, v, mask)
        assert np.all(np.isfinite(out)) and np.all(out[:, :, 0, :] == 0.0)
        dq, dk, dv = attention_backward(cache, rng.standard_normal(out.shape))
        assert all(np.all(np.isfinite(g)) for g in (dq, dk, dv))
        assert np.all(dq[:, :, 0, :] == 0.0)


def test_model_with_an_all_padding_source_row_is_finite():
    cfg = Config(vocab_size=11, d_model=8, n_heads=2, d_ff=12, n_encoder_layers=1, n_decoder_layers=1,
                 max_positions=8)
    params = random_params(cfg, 0)
    src = np.array([[4, 5, 6], [0, 0, 0]])
    tgt = np.array([[1, 7], [1, 8]])
    logits, cache = model_forward(cfg, params, src, tgt)
    assert np.all(np.isfinite(logits))
    grads = model_backward(cfg, params, cache, np.ones_like(logits))
    assert all(np.all(np.isfinite(g)) for g in flatten(grads).values())


# ---------------------------------------------------------------------------- float32 stays float32


@pytest.mark.parametrize("family", ["encoder-decoder", "decoder-only"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_float32_stays_float32(family, dropout):
    cfg = Config(vocab_size=11, d_model=8, n_heads=2, d_ff=12, n_encoder_layers=1, n_decoder_layers=1,
                 family=family, max_positions=8, dropout=dropout, activation="gelu", positional="learned",
                 tie_embeddings=False, lm_head_bias=True)
    params = init_params(cfg, np.random.default_rng(0), np.float32)
    assert all(a.dtype == np.float32 for a in flatten(params).values())
    rng = np.random.default_rng(1)
    src = right_padded(rng, 2, 5, cfg)[0] if cfg.is_encoder_decoder else None
    tgt, _ = right_padded(rng, 2, 4, cfg)
    train_rng = np.random.default_rng(2) if dropout else None
    logits, cache = model_forward(cfg, params, src, tgt, rng=train_rng)
    assert logits.dtype == np.float32
    loss, loss_cache = cross_entropy_forward(logits, tgt, ignore_id=cfg.pad_id, label_smoothing=0.1)
    assert np.asarray(loss).dtype == np.float32
    dlogits = cross_entropy_backward(loss_cache)
    assert dlogits.dtype == np.float32
    grads = model_backward(cfg, params, cache, dlogits)
    wrong = {name: g.dtype for name, g in flatten(grads).items() if g.dtype != np.float32}
    assert not wrong, wrong

    x = rng.standard_normal((2, 4, 8)).astype(np.float32)
    mask = causal_mask(4)
    layer = params["decoder"]["layers"][0]
    memory = rng.standard_normal((2, 3, 8)).astype(np.float32) if family == "encoder-decoder" else None
    y, c = decoder_layer_forward(layer, x, mask, memory, None, cfg)
    dx, dmemory, dp = decoder_layer_backward(layer, c, np.ones_like(y), cfg)
    assert y.dtype == dx.dtype == np.float32 and all(g.dtype == np.float32 for g in flatten(dp).values())
    if memory is not None:
        assert dmemory.dtype == np.float32
        y, c = encoder_layer_forward(params["encoder"]["layers"][0], x, None, cfg)
        dx, dp = encoder_layer_backward(params["encoder"]["layers"][0], c, np.ones_like(y), cfg)
        assert y.dtype == dx.dtype == np.float32 and all(g.dtype == np.float32 for g in flatten(dp).values())
    y, c = mha_forward(layer["self_attn"], x, x, mask, n_heads=cfg.n_heads)
    dxq, dxkv, dp = mha_backward(layer["self_attn"], c, np.ones_like(y))
    assert y.dtype == dxq.dtype == dxkv.dtype == np.float32
    y, c = feed_forward_forward(layer["ffn"], x, cfg, np.random.default_rng(3))
    dx, dp = feed_forward_backward(layer["ffn"], c, np.ones_like(y))
    assert y.dtype == dx.dtype == np.float32 and all(g.dtype == np.float32 for g in flatten(dp).values())

    cross_kv, encoder_mask = None, None
    if cfg.is_encoder_decoder:
        memory, cross_kv = encode(cfg, params, src)
        assert memory.dtype == np.float32 and all(k.dtype == v.dtype == np.float32 for k, v in cross_kv)
        encoder_mask = (src != cfg.pad_id).astype(np.int64)
    step_logits, present = decoder_step(cfg, params, tgt[:, :1], np.zeros((2, 1), np.int64),
                                        np.ones((2, 1), np.int64), empty_cache(cfg, 2), cross_kv, encoder_mask)
    assert step_logits.dtype == np.float32 and all(k.dtype == v.dtype == np.float32 for k, v in present)


@pytest.mark.parametrize("kind", ["relu", "gelu", "gelu_tanh", "silu"])
def test_float32_activations_and_norms(kind):
    from refformer.refimpl import (
        activation_backward,
        activation_forward,
        layer_norm_backward,
        layer_norm_forward,
        rms_norm_backward,
        rms_norm_forward,
    )

    x = np.random.default_rng(0).standard_normal((2, 3, 8)).astype(np.float32)
    y, c = activation_forward(x, kind)
    assert y.dtype == activation_backward(c, np.ones_like(y), kind).dtype == np.float32
    p = {"weight": np.ones(8, np.float32), "bias": np.zeros(8, np.float32)}
    y, c = layer_norm_forward(p, x, 1e-5)
    dx, dp = layer_norm_backward(p, c, np.ones_like(y))
    assert y.dtype == dx.dtype == dp["weight"].dtype == dp["bias"].dtype == np.float32
    y, c = rms_norm_forward({"weight": p["weight"]}, x, 1e-5)
    dx, dp = rms_norm_backward({"weight": p["weight"]}, c, np.ones_like(y))
    assert y.dtype == dx.dtype == dp["weight"].dtype == np.float32
