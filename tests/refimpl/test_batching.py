"""Batching: sequence conventions, padding, the token budget, determinism, and exact resumption."""

import itertools

import numpy as np
import pytest

from refformer.refimpl.errors import RefformerError
from refformer.refimpl.training.batching import (
    batch_stream,
    collate,
    fingerprint,
    lm_examples,
    lm_windows,
    make_batches,
    seq2seq_examples,
)

PAD, BOS, EOS = 0, 1, 2


def _pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    def sequence():
        return rng.integers(4, 20, size=rng.integers(1, 12)).tolist()

    return [(sequence(), sequence()) for _ in range(n)]


def test_seq2seq_conventions_and_padding():
    examples, dropped = seq2seq_examples([([5, 6], [7, 8, 9]), ([5], [7])], bos_id=BOS, eos_id=EOS, max_len=8)
    assert dropped == 0
    assert examples[0] == ([5, 6, EOS], [BOS, 7, 8, 9], [7, 8, 9, EOS])
    batch = collate(examples, pad_id=PAD)
    np.testing.assert_array_equal(batch.src_ids, [[5, 6, EOS], [5, EOS, PAD]])
    np.testing.assert_array_equal(batch.tgt_ids, [[BOS, 7, 8, 9], [BOS, 7, PAD, PAD]])
    np.testing.assert_array_equal(batch.labels, [[7, 8, 9, EOS], [7, EOS, PAD, PAD]])
    np.testing.assert_array_equal(batch.src_mask, batch.src_ids != PAD)
    np.testing.assert_array_equal(batch.tgt_mask, batch.tgt_ids != PAD)
    assert batch.n_tokens == 6 and batch.n_rows == 2


def test_too_long_pairs_are_dropped():
    examples, dropped = seq2seq_examples([([5] * 7, [6]), ([5], [6] * 7), ([5] * 6, [6] * 6)], bos_id=BOS,
                                         eos_id=EOS, max_len=7)
    assert dropped == 2 and len(examples) == 1


def test_lm_windows_predict_every_token_once():
    texts = [[5, 6, 7], [8], [9, 10, 11, 12]]
    stream = [BOS, 5, 6, 7, EOS, BOS, 8, EOS, BOS, 9, 10, 11, 12, EOS]
    windows = lm_windows(texts, 4, bos_id=BOS, eos_id=EOS)
    assert all(len(w) <= 5 for w in windows)
    assert [w[0] for w in windows] == stream[:-1:4]
    examples = lm_examples(texts, bos_id=BOS, eos_id=EOS, max_len=4)
    assert list(itertools.chain(*[e[2] for e in examples])) == stream[1:]  # each token a label exactly once
    assert list(itertools.chain(*[e[1] for e in examples])) == stream[:-1]
    batch = collate(examples, pad_id=PAD)
    assert batch.src_ids is None and batch.tgt_ids.shape == (4, 4)


def test_batches_respect_the_budget_and_cover_every_example():
    examples, _ = seq2seq_examples(_pairs(300), bos_id=BOS, eos_id=EOS, max_len=64)
    batches = make_batches(examples, max_tokens=100, pad_id=PAD, seed=3)
    for batch in batches:
        assert batch.n_rows * max(batch.src_ids.shape[1], batch.tgt_ids.shape[1]) <= 100
    assert sum(b.n_rows for b in batches) == 300
    seen = sorted(tuple(row[m].tolist()) for b in batches for row, m in zip(b.labels, b.tgt_mask))
    assert seen == sorted(tuple(e[2]) for e in examples)
    lengths = [b.tgt_ids.shape[1] for b in batches]
    assert lengths == sorted(lengths)  # bucketed: made in length order (then shuffled per epoch)
    # a single over-long example still gets a batch of its own
    assert make_batches(examples[:1], max_tokens=1, pad_id=PAD)[0].n_rows == 1
    with pytest.raises(RefformerError):
        make_batches(examples, max_tokens=0, pad_id=PAD)


def test_batches_are_deterministic_given_the_seed():
    examples, _ = seq2seq_examples(_pairs(200), bos_id=BOS, eos_id=EOS, max_len=64)
    a = make_batches(examples, max_tokens=120, pad_id=PAD, seed=1)
    b = make_batches(examples, max_tokens=120, pad_id=PAD, seed=1)
    c = make_batches(examples, max_tokens=120, pad_id=PAD, seed=2)
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


def test_stream_shuffles_per_epoch_and_resumes_exactly():
    examples, _ = seq2seq_examples(_pairs(200), bos_id=BOS, eos_id=EOS, max_len=64)
    batches = make_batches(examples, max_tokens=150, pad_id=PAD, seed=0)
    n = len(batches)
    index_of = {id(b): i for i, b in enumerate(batches)}
    full = list(itertools.islice(batch_stream(batches, seed=7), 3 * n + 5))
    order = [index_of[id(b)] for b, _ in full]
    assert sorted(order[:n]) == list(range(n)) and sorted(order[n:2 * n]) == list(range(n))
    assert order[:n] != order[n:2 * n]  # a new order every epoch
    assert full[n - 1][1] == (1, 0) and full[n][1] == (1, 1)
    for k in (1, n - 1, n, 2 * n + 3):  # stop after k batches, resume from the stored position
        position = full[k - 1][1]
        resumed = [index_of[id(b)] for b, _ in itertools.islice(batch_stream(batches, 7, position), 10)]
        assert resumed == order[k:k + 10]
    with pytest.raises(RefformerError):
        next(batch_stream([], 0))


GOOD = [([5, 6, EOS], [BOS, 7], [7, EOS])]


@pytest.mark.parametrize("call, words", [
    (lambda: make_batches(GOOD, max_tokens=0, pad_id=PAD), "max_tokens must be an integer >= 1, got 0"),
    (lambda: make_batches(GOOD, max_tokens=-3, pad_id=PAD), "max_tokens"),
    (lambda: make_batches(GOOD, max_tokens=float("nan"), pad_id=PAD), "max_tokens"),
    (lambda: make_batches(GOOD, max_tokens=None, pad_id=PAD), "max_tokens"),
    (lambda: make_batches(GOOD, max_tokens=8, pad_id=PAD, seed=-1), "seed must be an integer >= 0"),
    (lambda: make_batches(None, max_tokens=8, pad_id=PAD), "examples must be a list"),
    (lambda: make_batches([(1, 2)], max_tokens=8, pad_id=PAD), "example 0 must be a (src_ids, tgt_ids, labels)"),
    (lambda: make_batches([([], [BOS], [EOS])], max_tokens=8, pad_id=PAD), "example 0's src_ids must be a non-empty"),
    (lambda: make_batches([([5], [BOS, 7], [7])], max_tokens=8, pad_id=PAD), "the same length"),
    (lambda: make_batches([*GOOD, (None, [BOS], [EOS])], max_tokens=8, pad_id=PAD), "mixes decoder-only"),
    (lambda: make_batches([([5.5], [BOS], [EOS])], max_tokens=8, pad_id=PAD), "integer ids"),
    (lambda: collate([], pad_id=PAD), "at least one example"),
    (lambda: collate(GOOD, pad_id=None), "pad_id must be an integer"),
    (lambda: lm_windows([[5]], 0, bos_id=BOS, eos_id=EOS), "max_len must be an integer >= 1"),
    (lambda: lm_examples(None, bos_id=BOS, eos_id=EOS, max_len=4), "texts must be a list"),
    (lambda: lm_examples(["text"], bos_id=BOS, eos_id=EOS, max_len=4), "text 0 must be a list of integer ids"),
    (lambda: seq2seq_examples([([5], "x")], bos_id=BOS, eos_id=EOS, max_len=4), "pair 0 must be (src ids, tgt ids)"),
    (lambda: seq2seq_examples([([5], [6])], bos_id=BOS, eos_id=EOS, max_len=0), "max_len must be an integer >= 1"),
    (lambda: next(batch_stream([], 0)), "no training batches"),
    (lambda: next(batch_stream(make_batches(GOOD, max_tokens=8, pad_id=PAD), 0, (0, -1))), "position must be"),
])
def test_bad_input_raises_refformer_error(call, words):
    """Malformed examples, budgets and positions are one RefformerError naming the argument, never a bare
    KeyError/ValueError/TypeError from inside."""
    with pytest.raises(RefformerError) as raised:
        call()
    assert words in str(raised.value) and type(raised.value) is RefformerError


def test_no_examples_give_no_batches_and_a_huge_budget_one_batch():
    assert make_batches([], max_tokens=8, pad_id=PAD) == []
    examples, _ = seq2seq_examples(_pairs(30), bos_id=BOS, eos_id=EOS, max_len=16)
    assert len(make_batches(examples, max_tokens=10 ** 30, pad_id=PAD)) == 1
