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

import numpy as np

from .errors import check


@dataclasses.dataclass(frozen=True)
class Batch:
    """One padded batch. src_* [B, S] (None for decoder-only), tgt_ids, tgt_mask, labels [B, T]."""

    src_ids: np.ndarray | None
    src_mask: np.ndarray | None
    tgt_ids: np.ndarray
    tgt_mask: np.ndarray
    labels: np.ndarray

    @property
    def n_rows(self):
        return self.tgt_ids.shape[0]

    @property
    def n_tokens(self):
        """Target tokens the loss is computed on (labels that are not padding)."""
        return int(self.tgt_mask.sum())


# ---------------------------------------------------------------------------- examples


def seq2seq_example(src, tgt, *, bos_id, eos_id):
    """(src_ids, tgt_ids, labels) of one sentence pair, as in the module docstring."""
    return list(src) + [eos_id], [bos_id] + list(tgt), list(tgt) + [eos_id]


def lm_windows(texts, max_len, *, bos_id, eos_id):
    """Token windows of at most max_len + 1 ids from texts (lists of ids), each text as [bos] + ids + [eos]."""
    check(max_len >= 1, f"max_len must be at least 1, got {max_len}")
    stream = []
    for ids in texts:
        stream.extend([bos_id, *ids, eos_id])
    return [stream[start:start + max_len + 1] for start in range(0, max(len(stream) - 1, 0), max_len)]


def pad_rows(rows, pad_id):
    """Rows of ids -> ids [B, L] right-padded with pad_id, and the mask [B, L] (True = real token)."""
    length = max(len(row) for row in rows)
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), length), dtype=bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = row
        mask[i, :len(row)] = True
    return ids, mask


def collate(examples, *, pad_id):
    """A Batch from examples: (src_ids, tgt_ids, labels) triples, or (None, tgt_ids, labels) for decoder-only."""
    src_ids = src_mask = None
    if examples[0][0] is not None:
        src_ids, src_mask = pad_rows([e[0] for e in examples], pad_id)
    tgt_ids, tgt_mask = pad_rows([e[1] for e in examples], pad_id)
    labels, _ = pad_rows([e[2] for e in examples], pad_id)
    return Batch(src_ids, src_mask, tgt_ids, tgt_mask, labels)


def seq2seq_examples(pairs, *, bos_id, eos_id, max_len):
    """Training triples from (src, tgt) id pairs; pairs longer than max_len on either side are dropped.

    Returns (examples, number dropped).
    """
    examples = [seq2seq_example(src, tgt, bos_id=bos_id, eos_id=eos_id) for src, tgt in pairs]
    kept = [e for e in examples if len(e[0]) <= max_len and len(e[1]) <= max_len]
    return kept, len(examples) - len(kept)


def lm_examples(texts, *, bos_id, eos_id, max_len):
    """Training triples (None, window[:-1], window[1:]) from texts (lists of ids) cut into max_len windows."""
    return [(None, w[:-1], w[1:]) for w in lm_windows(texts, max_len, bos_id=bos_id, eos_id=eos_id)]


# ---------------------------------------------------------------------------- batches


def make_batches(examples, *, max_tokens, pad_id, seed=0, shuffle_ties=True):
    """Bucket examples (triples from seq2seq_examples or lm_examples) by length into batches of <= max_tokens.

    The cost of a batch is rows x its longest sequence (source or target). A single example
    longer than max_tokens gets a batch of its own.
    """
    check(max_tokens >= 1, f"max_tokens must be positive, got {max_tokens}")
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
            batches.append(collate([examples[j] for j in current], pad_id=pad_id))
            current, longest = [], 0
        current.append(i)
        longest = max(longest, size)
    batches.append(collate([examples[j] for j in current], pad_id=pad_id))
    return batches


def epoch_order(n_batches, seed, epoch):
    """The order in which epoch `epoch` visits the batches."""
    return np.random.default_rng(seed + epoch).permutation(n_batches)


def batch_stream(batches, seed, position=(0, 0)):
    """Yield (batch, next position) forever, starting at position = (epoch, index into that epoch's order)."""
    check(len(batches) > 0, "there are no training batches (is the training data empty?)")
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
    """A sha256 of the batches' ids, stored in checkpoints so resuming on different data is caught."""
    digest = hashlib.sha256()
    for batch in batches:
        for array in (batch.src_ids, batch.tgt_ids, batch.labels):
            if array is not None:
                digest.update(str(array.shape).encode())
                digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    return digest.hexdigest()
