"""Padded batches bucketed by length under a token budget, in a seeded order that can be resumed.

Sequence conventions (the same at training, evaluation and generation time):

    encoder-decoder  src_ids = src + [eos]           the encoder sees where the sentence ends
                     tgt_ids = [bos] + tgt           decoder input (teacher forcing)
                     labels  = tgt + [eos]           what each decoder position must predict
    decoder-only     each text is [bos] + ids + [eos]; the texts are concatenated into one
                     stream and cut into windows of max_len + 1 tokens that overlap by one,
                     so tgt_ids = window[:-1] and labels = window[1:] predict every token once.

Rows are padded with pad_id (masks are True at real tokens); labels are padded with pad_id,
which the loss ignores. Batches are made once, deterministically: examples are shuffled with
the seed (so equal lengths do not stay in file order), stably sorted by length, and cut
greedily so that rows x longest length <= max_tokens. Each epoch visits all batches in the
order np.random.default_rng(seed + epoch).permutation; a position (epoch, index) names the
next batch to read, so a checkpoint that stores it resumes the exact same stream.
"""

import dataclasses
import hashlib
import itertools

import numpy as np

from ..errors import RefformerError, check, is_integer


def _all_integers(rows):
    """True when every item of every row is an integer (one NumPy conversion of them all, not a Python loop)."""
    flat = list(itertools.chain.from_iterable(rows))
    if not flat:
        return True
    try:
        kind = np.asarray(flat).dtype.kind
    except (ValueError, TypeError):  # ragged or unconvertible items
        return False
    return kind in "iu"


def _check_ids(name, ids):
    """ids must be a non-empty list, tuple or 1-D array (its items are checked to be integers when padded)."""
    if isinstance(ids, np.ndarray):
        if not (ids.ndim == 1 and ids.size > 0 and ids.dtype.kind in "iu"):
            raise RefformerError(f"{name()} must be a non-empty 1-D sequence of integer ids, got an array of shape "
                                 f"{ids.shape} and dtype {ids.dtype}")
    elif not (isinstance(ids, (list, tuple)) and len(ids) > 0):
        raise RefformerError(f"{name()} must be a non-empty list of integer ids, got {str(ids)[:60]}")


def check_examples(examples):
    """RefformerError unless examples is a list of (src_ids or None, tgt_ids, labels) triples of one family,
    with labels as long as tgt_ids. (That the ids are integers is checked as they are padded: pad_rows.)"""
    check(isinstance(examples, (list, tuple)), f"examples must be a list of (src_ids, tgt_ids, labels) triples, "
                                               f"got {type(examples).__name__}")
    decoder_only = None
    for number, example in enumerate(examples):  # messages are built only on failure: this runs per example
        if not (isinstance(example, (list, tuple)) and len(example) == 3):
            raise RefformerError(f"example {number} must be a (src_ids, tgt_ids, labels) triple, "
                                 f"got {str(example)[:60]}")
        src, tgt, labels = example
        if decoder_only is None:
            decoder_only = src is None
        if (src is None) != decoder_only:
            raise RefformerError(f"example {number} mixes decoder-only (src_ids None) and encoder-decoder examples")
        if src is not None:
            _check_ids(lambda: f"example {number}'s src_ids", src)
        _check_ids(lambda: f"example {number}'s tgt_ids", tgt)
        _check_ids(lambda: f"example {number}'s labels", labels)
        if len(tgt) != len(labels):
            raise RefformerError(f"example {number}: tgt_ids and labels must have the same length, "
                                 f"got {len(tgt)} and {len(labels)}")


@dataclasses.dataclass(frozen=True)
class Batch:
    """One padded batch: src_ids int64 and src_mask bool [B, S] (None for decoder-only); tgt_ids int64, tgt_mask
    bool, labels int64 [B, T]. Masks are True at real tokens; padding holds pad_id.

    A plain dataclass: no checks (collate builds it from checked examples).
    """

    src_ids: np.ndarray | None
    src_mask: np.ndarray | None
    tgt_ids: np.ndarray
    tgt_mask: np.ndarray
    labels: np.ndarray

    @property
    def n_rows(self):
        """Rows of the batch (B).

        Raises nothing.
        """
        return self.tgt_ids.shape[0]

    @property
    def n_tokens(self):
        """Target tokens the loss is computed on (labels that are not padding).

        An int. Raises nothing.
        """
        return int(self.tgt_mask.sum())


# ---------------------------------------------------------------------------- examples


def seq2seq_example(src, tgt, *, bos_id, eos_id):
    """(src_ids, tgt_ids, labels) of one sentence pair, as in the module docstring.

    src, tgt: lists of int ids; returns three lists of int ids. No checks: seq2seq_examples checks the pairs first.
    """
    return list(src) + [eos_id], [bos_id] + list(tgt), list(tgt) + [eos_id]


def lm_windows(texts, max_len, *, bos_id, eos_id):
    """Token windows of at most max_len + 1 ids from texts (lists of ids), each text as [bos] + ids + [eos].

    Raises RefformerError unless max_len is an integer >= 1 and texts a list of lists of integer ids.
    """
    check(is_integer(max_len) and max_len >= 1, f"max_len must be an integer >= 1, got {max_len!r}")
    check(isinstance(texts, (list, tuple)), f"texts must be a list of lists of ids, got {type(texts).__name__}")
    stream = []
    for number, ids in enumerate(texts):
        if not isinstance(ids, (list, tuple, np.ndarray)):
            raise RefformerError(f"text {number} must be a list of integer ids, got {str(ids)[:60]}")
        stream.extend([bos_id, *ids, eos_id])
    check(_all_integers([stream]), "texts must hold integer ids (and bos_id, eos_id must be integers)")
    return [stream[start:start + max_len + 1] for start in range(0, max(len(stream) - 1, 0), max_len)]


def pad_rows(rows, pad_id):
    """Rows of ids -> ids [B, L] right-padded with pad_id, and the mask [B, L] (True = real token).

    Raises RefformerError for no rows or a row that is not a sequence of integer ids.
    """
    check(isinstance(rows, (list, tuple)) and len(rows) > 0, "pad_rows needs at least one row of ids")
    check(is_integer(pad_id) and abs(pad_id) <= np.iinfo(np.int64).max, f"pad_id must be an integer id, got "
                                                                         f"{pad_id!r}")
    for number, row in enumerate(rows):
        if not isinstance(row, (list, tuple, np.ndarray)):
            raise RefformerError(f"row {number} must be a list of integer ids, got {str(row)[:60]}")
    check(_all_integers(rows), "rows must hold integer ids only (not floats, strings or None)")
    length = max(len(row) for row in rows)
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = True
    return ids, mask


def collate(examples, *, pad_id):
    """A Batch from examples: (src_ids, tgt_ids, labels) triples, or (None, tgt_ids, labels) for decoder-only.

    Raises RefformerError for no examples or malformed ones (check_examples).
    """
    check_examples(examples)
    check(len(examples) > 0, "collate needs at least one example")
    check(is_integer(pad_id) and abs(pad_id) <= np.iinfo(np.int64).max, f"pad_id must be an integer id, got "
                                                                         f"{pad_id!r}")
    return _collate(examples, pad_id)


def _collate(examples, pad_id):
    src_ids = src_mask = None
    if examples[0][0] is not None:
        src_ids, src_mask = pad_rows([e[0] for e in examples], pad_id)
    tgt_ids, tgt_mask = pad_rows([e[1] for e in examples], pad_id)
    labels, _ = pad_rows([e[2] for e in examples], pad_id)
    return Batch(src_ids, src_mask, tgt_ids, tgt_mask, labels)


def seq2seq_examples(pairs, *, bos_id, eos_id, max_len):
    """Training triples from (src, tgt) id pairs; pairs longer than max_len on either side are dropped.

    Returns (examples, number dropped). Raises RefformerError for a max_len that is not an integer >= 1 and
    for pairs that are not (src ids, tgt ids) pairs.
    """
    check(is_integer(max_len) and max_len >= 1, f"max_len must be an integer >= 1, got {max_len!r}")
    check(isinstance(pairs, (list, tuple)), f"pairs must be a list of (src, tgt) id lists, got {type(pairs).__name__}")
    for number, pair in enumerate(pairs):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                and all(isinstance(side, (list, tuple, np.ndarray)) for side in pair)):
            raise RefformerError(f"pair {number} must be (src ids, tgt ids), two lists of integer ids, "
                                 f"got {str(pair)[:60]}")
    examples = [seq2seq_example(src, tgt, bos_id=bos_id, eos_id=eos_id) for src, tgt in pairs]
    kept = [e for e in examples if len(e[0]) <= max_len and len(e[1]) <= max_len]
    return kept, len(examples) - len(kept)


def lm_examples(texts, *, bos_id, eos_id, max_len):
    """Training triples (None, window[:-1], window[1:]) from texts (lists of ids) cut into max_len windows.

    Raises RefformerError (lm_windows) unless max_len is an integer >= 1 and texts a list of lists of integer ids.
    """
    return [(None, w[:-1], w[1:]) for w in lm_windows(texts, max_len, bos_id=bos_id, eos_id=eos_id)]


# ---------------------------------------------------------------------------- batches


def make_batches(examples, *, max_tokens, pad_id, seed=0, shuffle_ties=True):
    """Bucket examples (triples from seq2seq_examples or lm_examples) by length into batches of <= max_tokens.

    The cost of a batch is rows x its longest sequence (source or target). A single example
    longer than max_tokens gets a batch of its own. No examples give no batches.
    Raises RefformerError unless max_tokens is an integer >= 1 and the examples are well-formed triples.
    """
    check(is_integer(max_tokens) and max_tokens >= 1, f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    check(is_integer(seed) and seed >= 0, f"seed must be an integer >= 0, got {seed!r}")
    check(isinstance(shuffle_ties, (bool, np.bool_)), f"shuffle_ties must be True or False, got {shuffle_ties!r}")
    check(is_integer(pad_id) and abs(pad_id) <= np.iinfo(np.int64).max, f"pad_id must be an integer id, got "
                                                                         f"{pad_id!r}")
    check_examples(examples)
    if not examples:
        return []
    order = np.random.default_rng(seed).permutation(len(examples)) if shuffle_ties else np.arange(len(examples))

    def length(i):
        src, tgt, _ = examples[i]
        return (len(tgt), 0 if src is None else len(src))

    order = sorted(order.tolist(), key=length)  # stable: ties keep the seeded order
    batches, current, longest = [], [], 0
    for i in order:
        size = max(length(i))
        if current and max(longest, size) * (len(current) + 1) > max_tokens:
            batches.append(_collate([examples[j] for j in current], pad_id))
            current, longest = [], 0
        current.append(i)
        longest = max(longest, size)
    batches.append(_collate([examples[j] for j in current], pad_id))
    return batches


def epoch_order(n_batches, seed, epoch):
    """The order in which epoch `epoch` visits the batches. RefformerError for negative or non-integer arguments."""
    check(all(is_integer(v) and v >= 0 for v in (n_batches, seed, epoch)),
          f"n_batches, seed and epoch must be integers >= 0, got {n_batches!r}, {seed!r}, {epoch!r}")
    check(n_batches <= 2 ** 40, f"n_batches must be at most 2**40 (an order of them must fit in memory), got "
                                f"{n_batches}")
    return np.random.default_rng(seed + epoch).permutation(n_batches)


def batch_stream(batches, seed, position=(0, 0)):
    """Yield (batch, next position) forever, starting at position = (epoch, index into that epoch's order).

    Raises RefformerError (at the first next(), as it is a generator) for batches that are not a non-empty list of
    Batch, a position that is not two integers >= 0, and a seed epoch_order refuses."""
    check(isinstance(batches, (list, tuple)) and all(isinstance(batch, Batch) for batch in batches),
          "batches must be a list of Batch (from make_batches)")
    check(len(batches) > 0, "there are no training batches (is the training data empty?)")
    check(isinstance(position, (list, tuple)) and len(position) == 2 and all(is_integer(v) and v >= 0
                                                                             for v in position),
          f"position must be (epoch, index), two integers >= 0, got {position!r}")
    epoch, index = position
    while True:
        order = epoch_order(len(batches), seed, epoch)
        while index < len(batches):
            batch = batches[order[index]]
            index += 1
            next_position = (epoch, index) if index < len(batches) else (epoch + 1, 0)
            yield batch, next_position
        epoch, index = epoch + 1, 0


def fingerprint(batches):
    """A sha256 of the batches' ids, stored in checkpoints so resuming on different data is caught.

    Raises RefformerError unless batches is a list of Batch."""
    check(isinstance(batches, (list, tuple)) and all(isinstance(batch, Batch) for batch in batches),
          "batches must be a list of Batch (from make_batches)")
    digest = hashlib.sha256()
    for batch in batches:
        for array in (batch.src_ids, batch.tgt_ids, batch.labels):
            if array is not None:
                digest.update(str(array.shape).encode())
                digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    return digest.hexdigest()
