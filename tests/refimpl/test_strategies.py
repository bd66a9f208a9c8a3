"""The NumPy decoding strategies: options validation, sampling draws, filters, penalties and beam search
(against exhaustive search on a tiny vocabulary)."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refformer.refimpl import Config, init_params, model_forward
from refformer.refimpl.errors import RefformerError
from refformer.refimpl.generate import (GenerationOptions, banned_ngram_tokens, beam_search, filter_top_k_top_p, top_candidates,
                                        generate, greedy, ReferenceStepper, apply_repetition_penalty, sample)
from refformer.refimpl.ops import log_softmax_forward


def tiny(family="encoder-decoder", V=7, seed=0, **changes):
    cfg = Config(vocab_size=V, d_model=8, n_heads=2, d_ff=16, n_encoder_layers=1, n_decoder_layers=2, family=family,
                 max_positions=16, dropout=0.0, **changes)
    return cfg, init_params(cfg, np.random.default_rng(seed), dtype=np.float64)


@pytest.mark.parametrize("options, message", [
    (dict(temperature=0), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(num_beams=0), "num_beams"), (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(top_k=-1), "top_k"), (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(min_new_tokens=5, max_new_tokens=2), "min_new_tokens"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(do_sample=True, num_beams=2), "sampling with beams"),
])
def test_invalid_options(options, message):
    with pytest.raises(RefformerError, match=message):
        GenerationOptions(**options)


def test_sample_uses_the_documented_inverse_cdf_draw():
    scores = np.log(np.array([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]]))
    u = np.random.default_rng(5).random(2)
    cdf = np.cumsum(np.exp(scores), axis=-1)
    expected = [int(np.argmax(cdf[b] > u[b])) for b in range(2)]
    assert sample(scores, np.random.default_rng(5)).tolist() == expected


def test_top_k_and_top_p_filters():
    scores = np.log(np.array([[0.05, 0.5, 0.3, 0.15]]))
    assert np.isfinite(filter_top_k_top_p(scores, 2, 1.0)).tolist() == [[False, True, True, False]]
    assert np.isfinite(filter_top_k_top_p(scores, 0, 0.5)).tolist() == [[False, True, False, False]]
    assert np.isfinite(filter_top_k_top_p(scores, 0, 0.75)).tolist() == [[False, True, True, False]]
    assert np.isfinite(filter_top_k_top_p(scores, 0, 0.81)).tolist() == [[False, True, True, True]]


def test_penalties():
    scores = np.array([[2.0, -2.0, 1.0]])
    assert apply_repetition_penalty(scores, [[0, 1]], 2.0).tolist() == [[1.0, -4.0, 1.0]]
    assert banned_ngram_tokens([5, 6, 7, 5, 6], 3) == [7]
    assert banned_ngram_tokens([5, 6, 7], 1) == [5, 6, 7]
    assert banned_ngram_tokens([5], 2) == []


def test_no_repeat_ngram_and_min_new_tokens_hold():
    cfg, params = tiny()
    src = np.array([[4, 5, 6, 2]])
    out = generate(cfg, params, src, options=GenerationOptions(max_new_tokens=12, no_repeat_ngram_size=2,
                                                               min_new_tokens=4))[0][0]
    pairs = list(zip(out, out[1:]))
    assert len(pairs) == len(set(pairs))
    assert cfg.eos_id not in out[:4]


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    cfg, params = tiny()
    src = np.array([[4, 5, 6, 2], [6, 6, 2, 0]])
    options = GenerationOptions(do_sample=True, temperature=1.5, top_k=5, top_p=0.9, seed=3, max_new_tokens=8)
    first = generate(cfg, params, src, options=options)
    assert first == generate(cfg, params, src, options=options)
    others = [generate(cfg, params, src, options=GenerationOptions(do_sample=True, seed=s, max_new_tokens=8))
              for s in range(4)]
    assert len({str(o) for o in others}) > 1


def test_one_beam_is_greedy():
    cfg, params = tiny()
    src = np.array([[4, 5, 6, 2], [6, 6, 2, 0]])
    beams, _ = beam_search(ReferenceStepper(cfg, params), cfg, GenerationOptions(num_beams=1, max_new_tokens=6), src_ids=src)
    rows = greedy(cfg, params, src, max_new_tokens=6).tolist()
    for got, row in zip(beams, rows):
        want = row[: row.index(cfg.eos_id) + 1] if cfg.eos_id in row else row
        assert got[0] == want


def sequence_score(cfg, params, src, tokens, length_penalty):
    """sum log p of tokens after bos, by the full model, length-normalised as beam_search scores."""
    tgt = np.array([[cfg.bos_id] + tokens[:-1]])
    logits, _ = model_forward(cfg, params, src, tgt, tgt_mask=np.ones(tgt.shape, bool))
    logp = log_softmax_forward(logits)[0][0]
    return sum(logp[i, t] for i, t in enumerate(tokens)) / len(tokens) ** length_penalty


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_wide_beam_equals_exhaustive_search(length_penalty):
    """With as many beams as candidate sequences, beam search must find the best one exactly."""
    V, L = 5, 3
    cfg, params = tiny(V=V, seed=1)
    src = np.array([[4, 3, 2]])
    options = GenerationOptions(num_beams=V ** L, max_new_tokens=L, length_penalty=length_penalty, num_return_sequences=3)
    beams, scores = beam_search(ReferenceStepper(cfg, params), cfg, options, src_ids=src)
    candidates = []
    for n in range(1, L + 1):
        for seq in itertools.product(range(V), repeat=n):
            seq = list(seq)
            if cfg.eos_id in seq[:-1] or (n < L and seq[-1] != cfg.eos_id):
                continue  # a hypothesis ends at its first eos, or is cut at the length limit
            candidates.append((sequence_score(cfg, params, src, seq, length_penalty), seq))
    candidates.sort(key=lambda c: -c[0])
    assert beams[0] == [c[1] for c in candidates[:3]]
    np.testing.assert_allclose(scores[0], [c[0] for c in candidates[:3]], rtol=1e-10)


def test_beam_search_batched_rows_match_single_rows():
    cfg, params = tiny(seed=2)
    src = np.array([[4, 5, 6, 2], [6, 2, 0, 0]])
    options = GenerationOptions(num_beams=3, num_return_sequences=2, max_new_tokens=6, length_penalty=0.8)
    together = generate(cfg, params, src, options=options)
    alone = [generate(cfg, params, src[i:i + 1, : 4 - i * 2], options=options)[0] for i in range(2)]
    assert together == alone


def test_decoder_only_batched_prompts_match_single_prompts():
    cfg, params = tiny(family="decoder-only", seed=3)
    prompts = np.array([[0, 0, 1, 4], [1, 5, 6, 4]])
    options = GenerationOptions(max_new_tokens=5, repetition_penalty=1.3)
    together = generate(cfg, params, prompt_ids=prompts, options=options)
    alone = [generate(cfg, params, prompt_ids=prompts[i:i + 1, 2 - 2 * i:], options=options)[0] for i in range(2)]
    assert together == alone


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 5000), n=st.integers(1, 12), levels=st.integers(1, 40), dead=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**31 - 1))
def test_top_candidates_is_the_stable_argsort_head(size, n, levels, dead, seed):
    """Few distinct levels make many ties; -inf entries are dead beams; a NaN now and then."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, levels, size).astype(np.float64)
    values[rng.random(size) < dead] = -np.inf
    if seed % 5 == 0:
        values[rng.integers(0, size, 1 + seed % 3)] = np.nan
    expected = np.argsort(-values, kind="stable")[:n]
    np.testing.assert_array_equal(top_candidates(values, n, block=8), expected)
    np.testing.assert_array_equal(top_candidates(values, n), expected)
