"""The NumPy decoding strategies: options validation, sampling draws, filters, penalties and beam search
(against exhaustive search on a tiny vocabulary)."""

import itertools
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refformer.refimpl import Config, init_params, model_forward
from refformer.refimpl.errors import RefformerError
from refformer.refimpl.generate import (
    MAX_BEAMS,
    GenerationOptions,
    ReferenceStepper,
    apply_repetition_penalty,
    banned_ngram_tokens,
    beam_search,
    filter_top_k_top_p,
    generate,
    greedy,
    sample,
    search_iter,
    search_memory_bytes,
    step_budget,
)
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
    options = GenerationOptions(num_beams=1, max_new_tokens=6)
    beams, _ = beam_search(ReferenceStepper(cfg, params), cfg, options, src_ids=src)
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
    options = GenerationOptions(num_beams=V ** L, max_new_tokens=L, length_penalty=length_penalty,
                                num_return_sequences=3)
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
    """The runtime steppers' blocked ranking gives the reference Stepper.top_candidates' indices (the stable argsort
    head). Few distinct levels make many ties; -inf entries are dead beams; a NaN now and then."""
    from refformer.runtime.stepper import top_candidates

    rng = np.random.default_rng(seed)
    values = rng.integers(0, levels, size).astype(np.float64)
    values[rng.random(size) < dead] = -np.inf
    if seed % 5 == 0:
        values[rng.integers(0, size, 1 + seed % 3)] = np.nan
    expected = np.argsort(-values, kind="stable")[:n]
    np.testing.assert_array_equal(REFERENCE_STEPPER.top_candidates(values, n), expected)
    np.testing.assert_array_equal(top_candidates(values, n, block=8), expected)
    np.testing.assert_array_equal(top_candidates(values, n), expected)


REFERENCE_STEPPER = ReferenceStepper(*tiny())


class ArgmaxStepper(ReferenceStepper):
    """The reference model declaring the argmax capability: search_iter takes Stepper's step_argmax path."""

    argmax_in_graph = True

    def step_argmax(self, ids, positions, attention_mask):
        self.argmax_calls = getattr(self, "argmax_calls", 0) + 1
        return super().step_argmax(ids, positions, attention_mask)


@pytest.mark.parametrize("options", [dict(max_new_tokens=6), dict(max_new_tokens=6, min_new_tokens=4),
                                     dict(max_new_tokens=6, repetition_penalty=1.5)])
def test_argmax_capability_gives_the_same_tokens(options):
    """A stepper with argmax_in_graph is asked for step_argmax (not step) when nothing but min_new_tokens touches the
    scores, and the tokens are those of the ordinary path (eos banned through last_logits before min_new_tokens)."""
    cfg, params = tiny(V=7, seed=6)  # greedy gives eos at once: min_new_tokens must ban it through last_logits
    src = np.array([[4, 5, 6, 2], [5, 2, 0, 0]])
    options = GenerationOptions(**options)
    stepper = ArgmaxStepper(cfg, params)
    fast = list(search_iter(stepper, cfg, options, src_ids=src))
    plain = list(search_iter(ReferenceStepper(cfg, params), cfg, options, src_ids=src))
    np.testing.assert_array_equal(np.stack(fast), np.stack(plain))
    assert getattr(stepper, "argmax_calls", 0) == (0 if options.repetition_penalty != 1.0 else len(fast))


# ---------------------------------------------------------------------------- batch independence


def long_runner(family, seed=4):
    """A model whose rows never stop early (eos held down): every row runs to its own length budget."""
    cfg = Config(vocab_size=30, d_model=8, n_heads=2, d_ff=16, n_encoder_layers=1, n_decoder_layers=1, family=family,
                 max_positions=20, dropout=0.0, tie_embeddings=False, lm_head_bias=True)
    params = init_params(cfg, np.random.default_rng(seed), dtype=np.float64)
    params["lm_head"]["bias"][cfg.eos_id] = -30.0
    return cfg, params


def padded_batch(cfg, rows):
    """Sources right-padded (+ eos) or prompts left-padded (bos +), as the runtime pads them."""
    if cfg.is_encoder_decoder:
        rows = [row + [cfg.eos_id] for row in rows]
        ids = np.full((len(rows), max(map(len, rows))), cfg.pad_id)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = row
        return {"src_ids": ids}
    rows = [[cfg.bos_id] + row for row in rows]
    ids = np.full((len(rows), max(map(len, rows))), cfg.pad_id)
    for i, row in enumerate(rows):
        ids[i, ids.shape[1] - len(row):] = row
    return {"prompt_ids": ids}


@pytest.mark.parametrize("family", ["encoder-decoder", "decoder-only"])
@pytest.mark.parametrize("options", [dict(), dict(do_sample=True, seed=9, temperature=1.3),
                                     dict(do_sample=True, seed=1, num_return_sequences=3),
                                     dict(num_beams=3, num_return_sequences=2), dict(max_new_tokens=12, num_beams=2),
                                     dict(repetition_penalty=1.5, no_repeat_ngram_size=2)],
                         ids=["greedy", "sampling", "samples", "beams", "beams-max", "penalties"])
def test_a_row_gives_the_same_ids_alone_and_in_a_batch(family, options):
    """Default length budgets (2 S + 10, or the room left in max_positions), length limits and seeded draws are per
    row: a row's output never depends on the other rows of its batch."""
    cfg, params = long_runner(family)
    rows = [[5, 6], [7, 8, 9, 10, 11, 12, 13, 14, 15], [5, 6], [20]]
    options = GenerationOptions(**options)
    together = generate(cfg, params, options=options, **padded_batch(cfg, rows))
    alone = [generate(cfg, params, options=options, **padded_batch(cfg, [row]))[0] for row in rows]
    assert together == alone
    assert together[0] == together[2]  # the same row at another index draws the same
    if options.max_new_tokens is None or not cfg.is_encoder_decoder:  # (else every budget is max_new_tokens)
        assert len({len(s[0]) for s in together}) > 1, "the rows should run to different budgets"


class KeepingStepper(ReferenceStepper):
    """The reference stepper computing every row to the end (as the runtime's static graphs do)."""
    drops_finished_rows = False


class CountingStepper(ReferenceStepper):
    def step(self, ids, positions, attention_mask):
        self.rows_per_step = getattr(self, "rows_per_step", []) + [len(ids)]
        return super().step(ids, positions, attention_mask)


@pytest.mark.parametrize("family", ["encoder-decoder", "decoder-only"])
@pytest.mark.parametrize("options", [dict(), dict(do_sample=True, seed=3, top_k=5),
                                     dict(repetition_penalty=1.5, no_repeat_ngram_size=2, min_new_tokens=2)])
def test_dropping_finished_rows_changes_no_token(family, options):
    """search_iter drops a finished row from the stepper's batch (Stepper.drops_finished_rows): every step yields the
    same [B] ids as a stepper that computes all rows to the end, and later steps compute fewer rows."""
    cfg, params = long_runner(family)
    rows = [[5, 6], [7, 8, 9, 10, 11, 12, 13, 14, 15], [20], [9, 8, 7]]
    options = GenerationOptions(**options)
    counting = CountingStepper(cfg, params)
    dropping = list(search_iter(counting, cfg, options, **padded_batch(cfg, rows)))
    keeping = list(search_iter(KeepingStepper(cfg, params), cfg, options, **padded_batch(cfg, rows)))
    np.testing.assert_array_equal(np.stack(dropping), np.stack(keeping))
    assert counting.rows_per_step[0] == 4 and counting.rows_per_step[-1] == 1
    assert counting.rows_per_step == sorted(counting.rows_per_step, reverse=True)


def test_default_budgets_are_per_row():
    cfg, _ = long_runner("encoder-decoder")
    keep = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    budgets = step_budget(cfg, GenerationOptions(), keep, np.zeros((2, 1), np.int64))
    assert budgets.tolist() == [16, 20]  # 2 x 3 + 10, and 2 x 5 + 10 capped at max_positions
    cfg, _ = long_runner("decoder-only")
    positions = np.array([[0, 0, 0, 1], [0, 1, 2, 3]])  # a left-padded prompt of 2 and one of 4
    assert step_budget(cfg, GenerationOptions(), None, positions).tolist() == [19, 17]
    assert step_budget(cfg, GenerationOptions(max_new_tokens=10**30), None, positions).tolist() == [19, 17]


def test_the_k_th_sample_draws_from_default_rng_seed_k():
    """The documented draws: the first of several samples is the single sample of the same seed."""
    cfg, params = long_runner("encoder-decoder")
    inputs = padded_batch(cfg, [[5, 6, 7]])
    one = generate(cfg, params, options=GenerationOptions(do_sample=True, seed=3, max_new_tokens=6), **inputs)[0]
    three = generate(cfg, params, options=GenerationOptions(do_sample=True, seed=3, max_new_tokens=6,
                                                            num_return_sequences=3), **inputs)[0]
    assert three[0] == one[0] and len({tuple(s) for s in three}) > 1


def test_seed_none_draws_a_seed():
    seeds = [GenerationOptions().seed for _ in range(4)]
    assert len(set(seeds)) == 4 and all(0 <= seed < 2**32 for seed in seeds)
    assert GenerationOptions(seed=7).seed == 7


# ---------------------------------------------------------------------------- bad arguments and numeric extremes


@pytest.mark.parametrize("options, message", [
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=10**400), "temperature"), (dict(temperature="1"), "temperature"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=float("nan")), "top_p"), (dict(top_p="0.5"), "top_p"), (dict(top_p=None), "top_p"),
    (dict(top_k=True), "top_k"), (dict(top_k=2.0), "top_k"), (dict(max_new_tokens=1.5), "max_new_tokens"),
    (dict(max_new_tokens=False), "max_new_tokens"), (dict(min_new_tokens=None), "min_new_tokens"),
    (dict(num_beams=MAX_BEAMS + 1), "num_beams"), (dict(num_beams=10**12), "num_beams"),
    (dict(do_sample=True, num_return_sequences=10**12), "num_return_sequences"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(length_penalty=float("nan")), "length_penalty"), (dict(length_penalty="x"), "length_penalty"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"), (dict(seed=-1), "seed must be >= 0"),
    (dict(seed=1.0), "seed must be an integer"), (dict(seed="1"), "seed"), (dict(do_sample="yes"), "do_sample"),
    (dict(early_stopping=1), "early_stopping"),
])
def test_bad_option_values_are_refused(options, message):
    with pytest.raises(RefformerError, match=message):
        GenerationOptions(**options)
    assert issubclass(RefformerError, ValueError)


def test_unknown_option_names_are_refused():
    with pytest.raises(RefformerError, match="unknown generation option 'beams'"):
        GenerationOptions.from_keywords(beams=2)


@pytest.mark.parametrize("call, message", [
    (lambda cfg, params: generate(cfg, params, np.array([[4, 2]]), options={"num_beams": 2}),
     "options must be a GenerationOptions"),
    (lambda cfg, params: generate("cfg", params, np.array([[4, 2]])), "cfg must be a refformer Config"),
    (lambda cfg, params: generate(cfg, None, np.array([[4, 2]])), "params must be the model's parameter dict"),
    (lambda cfg, params: generate(cfg, params, [[4, 2]]), "src_ids must be a numpy array"),
    (lambda cfg, params: generate(cfg, params, np.array([[4, 99]])), "token ids"),
    (lambda cfg, params: generate(cfg, params, np.array([[4, 2]]), stepper=object()), "stepper must have"),
    (lambda cfg, params: list(search_iter(ReferenceStepper(cfg, params), cfg, GenerationOptions(num_beams=2),
                                          src_ids=np.array([[4, 2]]))), "num_beams = 1"),
    (lambda cfg, params: greedy(None, params, np.array([[4, 2]])), "cfg must be a refformer Config"),
])
def test_bad_library_arguments_are_refformer_errors(call, message):
    cfg, params = tiny()
    with pytest.raises(RefformerError, match=message):
        call(cfg, params)


def test_an_empty_batch_gives_nothing():
    cfg, params = tiny()
    assert generate(cfg, params, np.zeros((0, 3), np.int64)) == []
    assert generate(cfg, params, np.zeros((0, 3), np.int64), options=GenerationOptions(num_beams=2)) == []


def test_beams_without_room_give_empty_sequences():
    cfg, params = tiny()
    options = GenerationOptions(num_beams=3, num_return_sequences=2, max_new_tokens=0)
    assert generate(cfg, params, np.array([[4, 2], [5, 2]]), options=options) == [[[], []], [[], []]]


@pytest.mark.parametrize("options", [
    dict(do_sample=True, temperature=1e-300), dict(do_sample=True, temperature=1e300),
    dict(do_sample=True, top_p=1e-300),
    dict(do_sample=True, top_k=10**12), dict(repetition_penalty=1e-300), dict(repetition_penalty=1e300),
    dict(do_sample=True, repetition_penalty=1e-300), dict(num_beams=3, length_penalty=1e300),
    dict(num_beams=3, length_penalty=-1e300), dict(num_beams=2, repetition_penalty=1e-300),
    dict(no_repeat_ngram_size=10**9), dict(min_new_tokens=10**9), dict(max_new_tokens=10**30),
    dict(do_sample=True, seed=10**40),
])
def test_extreme_values_that_make_sense_run_cleanly(options):
    cfg, params = long_runner("decoder-only")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow or invalid-value warnings either
        out = generate(cfg, params, prompt_ids=np.array([[0, 1, 5], [1, 6, 7]]), options=GenerationOptions(**options))
    assert all(0 <= t < cfg.vocab_size for sequences in out for s in sequences for t in s)


def test_a_tiny_temperature_samples_the_argmax():
    cfg, params = long_runner("encoder-decoder")
    inputs = padded_batch(cfg, [[5, 6, 7], [8]])
    greedy_ids = generate(cfg, params, options=GenerationOptions(max_new_tokens=8), **inputs)
    cold_options = GenerationOptions(do_sample=True, temperature=1e-300, max_new_tokens=8)
    cold = generate(cfg, params, options=cold_options, **inputs)
    assert cold == greedy_ids


def test_every_public_function_refuses_junk_with_a_refformer_error():
    """Each public function of refimpl.generate, each required argument replaced by junk in turn: RefformerError or a
    result, never a bare TypeError / ValueError / KeyError / AttributeError from inside."""
    import inspect

    from refformer.refimpl import generate as module

    cfg, params = tiny()
    good = {"cfg": cfg, "params": params, "options": GenerationOptions(), "stepper": ReferenceStepper(cfg, params),
            "scores": np.zeros((2, 7)), "logits": np.zeros((2, 7)), "sequences": [[1], [1]], "penalty": 1.5,
            "sequence": [1, 2], "n": 2, "n_generated": 0, "top_k": 2, "top_p": 0.5,
            "rngs": [np.random.default_rng(0)] * 2,
            "seed": 1, "sequence_numbers": [0, 0], "src_keep": np.ones((2, 3)), "positions": np.zeros((2, 1), np.int64),
            "token_steps": [], "batch_size": 2, "pad_id": 0, "values": np.arange(5.0), "row": [1, 2],
            "ids": np.zeros((2, 3), np.int64), "src_ids": np.array([[4, 2]]), "prompt_ids": np.array([[1, 4]]),
            "temperature": 1.0, "rows": 2, "bad_words_ids": [[1], [2, 3]], "vocab_size": 7}
    junk = [None, -1, "x", [], [[1]], np.zeros(2), np.zeros((2, 3)), np.full((1, 2), np.nan), {}, 1.5, float("nan"),
            object(), np.array([["a"]])]
    checked = 0
    for name, function in vars(module).items():
        if name.startswith("_") or not callable(function) or getattr(function, "__module__", "") != module.__name__:
            continue
        required = [p.name for p in inspect.signature(function).parameters.values()
                    if p.default is p.empty and p.kind == p.POSITIONAL_OR_KEYWORD]
        for argument in required:
            for value in junk:
                arguments = {**{p: good[p] for p in required}, argument: value}
                try:
                    result = function(**arguments)
                    if inspect.isgenerator(result):
                        list(result)
                except RefformerError:
                    pass
                checked += 1
    assert checked > 300


def test_searches_that_cannot_fit_in_memory_are_refused(monkeypatch):
    cfg, params = tiny()
    per_row = search_memory_bytes(cfg, 1)
    monkeypatch.setattr("refformer.refimpl.generate.physical_memory_bytes", lambda: 10 * per_row)
    src = np.array([[4, 2]] * 3)
    generate(cfg, params, src, options=GenerationOptions(num_beams=3, max_new_tokens=2))  # 9 rows fit
    for options in (GenerationOptions(num_beams=4, max_new_tokens=2),
                    GenerationOptions(do_sample=True, num_return_sequences=4, max_new_tokens=2)):
        with pytest.raises(RefformerError, match="12 sequences at once need up to"):
            generate(cfg, params, src, options=options)
    with pytest.raises(RefformerError, match="11 sequences"):
        list(search_iter(ReferenceStepper(cfg, params), cfg, GenerationOptions(), src_ids=np.array([[4, 2]] * 11)))
