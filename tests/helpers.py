"""Shared test helpers: the weighted finite-difference gradient check and hypothesis strategies.

Import as `from tests.helpers import ...` (tests/ and tests/refimpl/ are packages, and pytest
puts the repository root on sys.path for them).
"""

import math

import numpy as np
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from refformer.refimpl import Config, flatten, init_params, numerical_gradient, rel_error
from refformer.refimpl.model import left_padded_positions
from refformer.refimpl.tree import tree_map

GRAD_TOL = 1e-6  # correctness chain step 1: refimpl backward vs centred differences, float64

# The centred difference's own error is truncation ~h^2 |f'''| plus rounding ~u |f| / h (u = machine epsilon).
# The step that balances the two for an O(1) function is h ~ u^(1/3) ~ 6e-6. But no single step suits every
# tensor: where a gradient is small next to the terms of f (nearly equal keys, so attention barely moves;
# a unit near a flat spot) rounding dominates and reads as a ~1e-6 "error" that is only FD noise. So a
# tensor that misses the tolerance at FD_STEP is measured again, the same entries, at FD_STEP_RETRY = 10 *
# FD_STEP (rounding 10x smaller, truncation 100x larger, still far below 1e-6 for these functions), and
# passes if the analytic gradient is within GRAD_TOL of that estimate. The tolerance and the metric do not
# change; both measurements are reported when the check fails.
FD_STEP = float(np.finfo(np.float64).eps) ** (1.0 / 3.0)
FD_STEP_RETRY = 10.0 * FD_STEP

# A tensor whose true gradient is exactly zero (attention k_proj.bias: softmax is shift-invariant per
# row, so adding the same bias to every key shifts each score row by a constant) has a finite-difference
# estimate that is pure rounding noise, ~u |f| / FD_STEP (1e-11 to 1e-9 here), and the relative metric
# divides noise by noise. So when the numerical gradient is below ZERO_NUMERICAL everywhere (zero up to FD
# noise), an analytic gradient whose every entry is within ZERO_ANALYTIC of zero passes too. This is a
# second way to pass, not a replacement: a gradient that is small but real (1e-7 when attention is almost
# uniform) still passes on rel_error, and a non-zero analytic gradient where the true one is zero fails both.
ZERO_NUMERICAL = 1e-7
ZERO_ANALYTIC = 1e-8

# relu is not differentiable at 0: a centred difference that straddles the kink measures the mean of the two
# one-sided slopes. Tests with relu inside skip (hypothesis.assume) draws whose pre-activations come closer
# to 0 than this; a step of FD_STEP_RETRY moves a pre-activation by ~1e-5 or less.
RELU_MARGIN = 1e-4


# ---------------------------------------------------------------------------- gradient checks


def weighted_sum(forward, upstream):
    """The scalar f() = sum(forward() * upstream): a random upstream gradient weights every output entry."""
    def f():
        return float(np.sum(forward() * upstream))

    return f


def _measure(f, x, analytic, step, max_entries, seed):
    """(badness, text) of one finite-difference measurement at step; badness > 1 is a failure."""
    indices, numerical = numerical_gradient(f, x, eps=step, max_entries=max_entries,
                                            rng=np.random.default_rng(seed))  # the same entries at either step
    analytic = analytic.reshape(-1)[indices]
    error = rel_error(analytic, numerical)
    badness, text = error / GRAD_TOL, f"rel_error {error:.2e} at step {step:.0e} (limit {GRAD_TOL:.0e})"
    largest = float(np.max(np.abs(numerical))) if numerical.size else 0.0
    if largest < ZERO_NUMERICAL:  # zero up to FD noise: an exactly zero analytic gradient passes too
        worst = float(np.max(np.abs(analytic))) if analytic.size else 0.0
        badness = min(badness, worst / ZERO_ANALYTIC)
        text += f", or numerical ~ 0 (max {largest:.1e}) and max|analytic| {worst:.2e} (limit {ZERO_ANALYTIC:.0e})"
    return badness, text


def gradient_report(f, tensors, grads, *, max_entries=None, seed=0):
    """{name: (badness, text)} comparing grads[name] with centred differences of f() wrt tensors[name].

    tensors are perturbed in place (and restored), so f must read them. badness > 1 is a failure.
    max_entries: check only that many random entries of larger tensors.
    """
    report = {}
    for n, (name, x) in enumerate(tensors.items()):
        analytic = np.asarray(grads[name])
        assert analytic.shape == x.shape, f"{name}: gradient shape {analytic.shape} != tensor shape {x.shape}"
        assert x.flags.c_contiguous, f"{name}: numerical_gradient perturbs x.reshape(-1), which must be a view"
        report[name] = _measure(f, x, analytic, FD_STEP, max_entries, [seed, n])
        if report[name][0] > 1.0:
            retry = _measure(f, x, analytic, FD_STEP_RETRY, max_entries, [seed, n])
            report[name] = (min(report[name][0], retry[0]), f"{report[name][1]}; {retry[1]}")
    return report


def assert_gradients(f, tensors, grads, *, max_entries=None, seed=0, label=""):
    """Check every named gradient; on failure the message lists every tensor, worst first."""
    report = gradient_report(f, tensors, grads, max_entries=max_entries, seed=seed)
    if any(badness > 1.0 for badness, _ in report.values()):
        lines = [f"{'FAIL' if badness > 1.0 else 'ok  '} {name} -> {text}"
                 for name, (badness, text) in sorted(report.items(), key=lambda item: -item[1][0])]
        raise AssertionError(f"gradient check failed{' for ' + label if label else ''}:\n" + "\n".join(lines))
    return report


def relu_margin(cache):
    """The smallest |pre-activation| of every relu in a (nested) cache; inf if there is none."""
    if isinstance(cache, dict):
        if cache.get("kind") == "relu":
            (pre_activation,) = cache["activation"]
            own = float(np.min(np.abs(pre_activation))) if pre_activation.size else np.inf
        else:
            own = np.inf
        return min([own] + [relu_margin(value) for value in cache.values()])
    if isinstance(cache, (list, tuple)):
        return min([np.inf] + [relu_margin(value) for value in cache])
    return np.inf


def assert_same_tree(grads, params):
    """dp has exactly p's keys, shapes and dtypes."""
    flat_grads, flat_params = flatten(grads), flatten(params)
    differ = sorted(set(flat_grads) ^ set(flat_params))
    assert not differ, f"gradient and parameter names differ: {differ}"
    for name, value in flat_params.items():
        assert flat_grads[name].shape == value.shape, name
        assert flat_grads[name].dtype == value.dtype, f"{name}: {flat_grads[name].dtype} != {value.dtype}"


def assert_param_gradients(f, params, grads, **kwargs):
    """assert_same_tree, then the gradient check of every parameter tensor."""
    assert_same_tree(grads, params)
    return assert_gradients(f, flatten(params), flatten(grads), **kwargs)


# ---------------------------------------------------------------------------- random data


def randomize(params, rng, scale=0.2):
    """Biases and norm weights moved off their symmetric init (zeros, ones) so no gradient is checked at a
    special point; matrices keep their (random) init scale, so attention does not saturate."""
    return tree_map(lambda a: (a + scale * rng.standard_normal(a.shape)).astype(a.dtype) if a.ndim == 1 else a,
                    params)


def random_params(cfg, seed, dtype=np.float64):
    """init_params, randomized; learned position rows get the token rows' scale (init's N(0, 0.02) makes two
    positions of the same token nearly equal, and attention's gradient then sinks below FD noise)."""
    rng = np.random.default_rng(seed)
    params = randomize(init_params(cfg, rng, dtype), rng)
    for name, value in flatten(params).items():
        if name.endswith("embed_positions.weight"):
            value[...] = rng.normal(0.0, cfg.d_model ** -0.5, value.shape)
    return params


def randomize_torch(module, rng):
    """A torch module with every parameter random (biases and norm weights too, so that none hides behind a zero or
    a one), in eval mode. torch is imported here, so that tests without torch can import this file."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                values = rng.normal(0.0, 1.0 / math.sqrt(p.shape[-1]), p.shape)
            elif "norm" in name and name.endswith("weight"):
                values = 1.0 + 0.2 * rng.normal(size=p.shape)
            else:
                values = 0.2 * rng.normal(size=p.shape)
            p.copy_(torch.from_numpy(values))
    return module.eval()


def random_mha_params(rng, D):
    """Attention parameters for width D: q/k/v/out projections with N(0, 1/D) weights and N(0, 1) biases."""
    return {name: {"weight": rng.standard_normal((D, D)) / np.sqrt(D), "bias": rng.standard_normal(D)}
            for name in ("q_proj", "k_proj", "v_proj", "out_proj")}


def away_from_zero(rng, shape, low=0.1, high=2.0):
    """Random values with |x| in [low, high]: for relu, whose derivative jumps at 0."""
    return rng.choice([-1.0, 1.0], size=shape) * rng.uniform(low, high, size=shape)


def keep_mask(rng, B, L, *, allow_empty_row=False):
    """Random [B, L] boolean key-padding mask (True = real); every row keeps a token unless allow_empty_row."""
    keep = rng.random((B, L)) < 0.7
    for b in range(B):
        if not keep[b].any() and not allow_empty_row:
            keep[b, rng.integers(L)] = True
    return keep


def random_tokens(rng, cfg, shape):
    """Random ids that are never pad_id (any id when pad_id is null)."""
    ids = rng.integers(0, cfg.vocab_size, size=shape)
    if cfg.pad_id is None:
        return ids
    return np.where(ids == cfg.pad_id, (cfg.pad_id + 1) % cfg.vocab_size, ids)


def right_padded(rng, B, L, cfg, *, min_length=1):
    """ids [B, L] with random lengths in [min_length, L] and pad_id after them (cfg.fill_id when pad_id is null:
    only the mask marks the padding then), and the boolean keep mask."""
    lengths = rng.integers(min_length, L + 1, size=B)
    keep = np.arange(L)[None, :] < lengths[:, None]
    return np.where(keep, random_tokens(rng, cfg, (B, L)), cfg.fill_id), keep  # real tokens are never pad


def left_padded(rng, B, L, cfg, *, min_length=1):
    """ids [B, L] left-padded to random lengths, keep mask, and positions 0 .. length-1 of the real tokens."""
    ids, keep = right_padded(rng, B, L, cfg, min_length=min_length)
    lengths = keep.sum(axis=1)
    ids = np.stack([np.roll(row, L - n) for row, n in zip(ids, lengths)])
    keep = np.stack([np.roll(row, L - n) for row, n in zip(keep, lengths)])
    positions = left_padded_positions(keep)
    return ids, keep, positions


def word_level_tokenizer(vocab_size):
    """A tiny WordLevel tokenizer (words split on whitespace) of vocab_size tokens: <pad> <s> </s> <unk> at ids
    0..3 (the Config defaults), then w0, w1, ... at ids 4, 5, ..."""
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + [f"w{i}" for i in range(vocab_size - len(specials))])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def write_word_level_tokenizer(path, vocab_size):
    """word_level_tokenizer(vocab_size) saved to path (a tokenizer.json); returns path."""
    word_level_tokenizer(vocab_size).save(str(path))
    return path


# ---------------------------------------------------------------------------- strategies

seeds = st.integers(0, 2**32 - 1)
B_sizes = st.integers(1, 3)
lengths = st.integers(1, 6)  # S and T
head_counts = st.sampled_from([1, 2, 4])  # H (1 always in the mix)
head_widths = st.integers(1, 4)  # Dh, so D = H * Dh <= 16
hidden_widths = st.integers(4, 16)  # F: with F = 1 or 2 one unit near an activation's flat spot starves a gradient
activations = st.sampled_from(["relu", "gelu", "gelu_tanh", "silu"])
norms = st.sampled_from(["layernorm", "rmsnorm"])


def norm_widths(H):
    """D = H * Dh in [4, 16]. A norm over 1 or 2 features saturates (layer norm of 2 values is +-1), so its
    gradient is ~eps and a finite-difference estimate of it is rounding noise: not a useful check."""
    return st.integers(-(-4 // H), 16 // H).map(lambda Dh: H * Dh)


@st.composite
def layer_configs(draw, **fixed):
    """A small Config for layer-level tests (dropout off unless drawn by the test)."""
    H = draw(head_counts)
    fields = dict(vocab_size=13, d_model=draw(norm_widths(H)), n_heads=H, d_ff=draw(hidden_widths),
                  n_encoder_layers=1, n_decoder_layers=1, norm_first=draw(st.booleans()), norm=draw(norms),
                  activation=draw(activations), max_positions=16, dropout=0.0, ffn_gated=draw(st.booleans()),
                  ffn_bias=draw(st.booleans()))
    fields.update(draw(attention_options(H, fields["d_model"], "sinusoidal")))
    fields.update(fixed)
    return Config(**fields)


@st.composite
def attention_options(draw, H, D, positional):
    """The attention options of a Config with H heads at width D (issue 13): n_kv_heads (a divisor of H), head_dim
    (D / H or another width), attention_scale, the q/k/v and output bias flags, and positional's own settings
    (rope_theta with an even head_dim; relative buckets with a max_distance beyond their exact range)."""
    options = dict(n_kv_heads=draw(st.sampled_from([h for h in range(1, H + 1) if H % h == 0])),
                   head_dim=draw(st.sampled_from([None, None, 2, 3])),
                   attention_scale=draw(st.sampled_from([None, None, 1.0])),
                   attention_qkv_bias=draw(st.booleans()), attention_out_bias=draw(st.booleans()))
    if positional == "rotary":
        if (options["head_dim"] or D // H) % 2:
            options["head_dim"] = 2
        options["rope_theta"] = draw(st.sampled_from([10000.0, 50.0]))
    if positional == "relative":
        buckets = draw(st.sampled_from([4, 8]))
        options.update(relative_num_buckets=buckets,
                       relative_max_distance=draw(st.sampled_from([buckets // 2 + 1, 20])))
    return options


@st.composite
def model_configs(draw, family=None, **fixed):
    """A tiny Config with every architecture choice drawn."""
    H = draw(head_counts)
    fields = dict(
        vocab_size=draw(st.integers(5, 13)), d_model=draw(norm_widths(H)), n_heads=H, d_ff=draw(hidden_widths),
        n_encoder_layers=draw(st.integers(0, 2)), n_decoder_layers=draw(st.integers(0, 2)),
        family=family or draw(st.sampled_from(["encoder-decoder", "decoder-only"])),
        norm_first=draw(st.booleans()), norm=draw(norms), final_norm=draw(st.booleans()),
        activation=draw(activations),
        positional=draw(st.sampled_from(["sinusoidal", "learned", "none", "relative", "rotary"])),
        max_positions=draw(st.integers(6, 10)), embed_scale=draw(st.booleans()),
        share_embeddings=draw(st.booleans()), tie_embeddings=draw(st.booleans()),
        lm_head_bias=draw(st.booleans()), dropout=draw(st.sampled_from([0.0, 0.0, 0.25])),
        ffn_gated=draw(st.booleans()), ffn_bias=draw(st.booleans()), embed_norm=draw(st.booleans()),
        head_scale=draw(st.sampled_from([1.0, 1.0, 0.5])))
    if fields["positional"] == "learned":
        fields["position_offset"] = draw(st.sampled_from([0, 2]))
    fields.update(draw(attention_options(H, fields["d_model"], fields["positional"])))
    fields.update(fixed)
    return Config(**fields)


# ---------------------------------------------------------------------------- transformers in float64


def rms_norm_in_input_dtype(self, hidden_states):
    """transformers' T5LayerNorm / LlamaRMSNorm / Qwen2RMSNorm forward without its float32 upcast: the same formula,
    weight * (x * rsqrt(mean(x^2) + eps)), in the input's dtype. Those modules compute the mean (T5) or the whole
    norm (Llama, Qwen2) in float32 whatever the input, so in float64 they round to ~1e-7; a 1e-10 parity check
    needs this float64-faithful forward. torch is imported lazily."""
    import torch

    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def float64_faithful_rms_norms(monkeypatch):
    """Patch the RMSNorm modules of transformers' T5, Llama and Qwen2 with rms_norm_in_input_dtype (monkeypatch is
    pytest's fixture, so the classes are restored after the test)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    for module in (T5LayerNorm, LlamaRMSNorm, Qwen2RMSNorm):
        monkeypatch.setattr(module, "forward", rms_norm_in_input_dtype)


def decode_incrementally(cfg, params, ids, positions, keep, prompt, cross_kv=None, src_keep=None):
    """decoder_step over ids [B, T]: the first `prompt` columns in one call (P = 0), then one token per call, with
    keep [B, T] (1 = real) and positions [B, T]; cross_kv / src_keep for an encoder-decoder. Returns the logits of
    every column concatenated [B, T, V] and the cache after each call (a list), for comparison with model_forward."""
    from refformer.refimpl import decoder_step, empty_cache

    mask = np.asarray(keep).astype(np.int64)  # the graph contract: int64, 1 = keep
    encoder_mask = None if src_keep is None else np.asarray(src_keep).astype(np.int64)
    dtype = next(iter(flatten(params).values())).dtype
    logits, past = decoder_step(cfg, params, ids[:, :prompt], positions[:, :prompt], mask[:, :prompt],
                                empty_cache(cfg, ids.shape[0], dtype), cross_kv, encoder_mask)
    pieces, caches = [logits], [past]
    for t in range(prompt, ids.shape[1]):
        logits, past = decoder_step(cfg, params, ids[:, t:t + 1], positions[:, t:t + 1], mask[:, :t + 1], past,
                                    cross_kv, encoder_mask)
        pieces.append(logits)
        caches.append(past)
    return np.concatenate(pieces, axis=1), caches


def save_random_model(path, base, seed=0, **overrides):
    """A tiny model folder of Config(**base, **overrides) with every parameter redrawn (biases non-zero, norm weights
    near 1), so that a term an implementation leaves out would show. Returns the Config."""
    from refformer.refimpl import save
    from refformer.refimpl.tree import unflatten

    cfg = Config(**{**base, **overrides})
    rng = np.random.default_rng(seed)
    template = init_params(cfg, rng)
    flat = {name: (value + 0.3 * rng.standard_normal(value.shape)).astype(value.dtype)
            for name, value in flatten(template).items()}
    save(path, cfg, unflatten(flat, template))
    return cfg


def save_word_level_model(folder, tmp_path, vocab_size=40, seed=1):
    """A tiny encoder-decoder (D 16, 4 heads, 1 + 1 layers, 32 positions) with a word-level tokenizer of vocab_size
    ids (w0 .. wN), saved at folder; the int8 tests' model. Returns folder."""
    from refformer.refimpl import Config, init_params, save

    cfg = Config(vocab_size=vocab_size, d_model=16, n_heads=4, d_ff=32, n_encoder_layers=1, n_decoder_layers=1,
                 max_positions=32, dropout=0.0)
    save(folder, cfg, init_params(cfg, np.random.default_rng(seed)),
         tokenizer=write_word_level_tokenizer(tmp_path / "tokenizer.json", vocab_size))
    return folder
