"""Tokenizer glue: train one shared byte-level vocabulary (Hugging Face tokenizers) on a corpus's train split.

Choices:
    special tokens   <pad>=0, <s>=1 (bos), </s>=2 (eos), <unk>=3, always these ids in this order
    normalizer       NFC
    pre-tokenizer    ByteLevel (no prefix space), decoder ByteLevel: every string maps to the 256 byte symbols,
                     which are all in the vocabulary, so nothing is ever unknown and
                     decode(encode(x)) == unicodedata.normalize("NFC", x) for every string x
    model            BPE (default) or Unigram
encode() adds no special tokens (the training code adds bos/eos) and treats "<s>" etc. in text as plain text.
A tokenizer.json's own `padding` and `truncation` sections (common in Hugging Face files) are switched off on
load and in encode(): the model sees exactly the tokens of the text (long inputs are the caller's to cut).
"""

import unicodedata
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from ..errors import RefformerError
from ..io import atomic_write, read_tokenizer, silenced_native_output, without_padding_or_truncation
from .data import detect_family, read_lines, read_tsv, split_path

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0, 1, 2, 3
SPECIAL_NAMES = ("pad_id", "bos_id", "eos_id", "unk_id")
MODELS = ("bpe", "unigram")
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256  # the specials and the byte alphabet


def training_texts(data_dir):
    """The texts of data_dir's train split: both columns of train.tsv, or the lines of train.txt.

    Raises RefformerError (detect_family, read_tsv, read_lines) for a data_dir without a regular train.tsv or train.txt,
    and for a split file that is unreadable, not UTF-8, malformed or empty (naming file:line).
    """
    family = detect_family(data_dir)
    path = split_path(data_dir, "train", family)
    if family == "encoder-decoder":
        return [text for pair in read_tsv(path) for text in pair]
    return read_lines(path)


def new_tokenizer(vocab_size, model="bpe"):
    """An untrained byte-level tokenizer and its trainer (model "bpe" or "unigram"). Raises RefformerError for
    another model or a vocab_size below MIN_VOCAB_SIZE."""
    if model not in MODELS:
        raise RefformerError(f"tokenizer model must be one of {', '.join(MODELS)}, got {model!r}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise RefformerError(f"vocab size must be at least {MIN_VOCAB_SIZE} (4 special tokens and 256 byte "
                             f"symbols), got {vocab_size}")
    common = dict(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    if model == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        trainer = trainers.BpeTrainer(**common)
    else:
        tokenizer = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(unk_token="<unk>", **common)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer, trainer


MAX_VOCAB_SIZE = 1_000_000  # the Rust trainer reserves ~70 bytes per entry up front, and aborts when that fails


def train_tokenizer(data_dir, vocab_size, model="bpe"):
    """A tokenizer trained on data_dir's train split; its vocabulary may come out smaller on a small corpus.

    Raises RefformerError (before the native trainer runs) for a vocab_size that is not an integer in
    [MIN_VOCAB_SIZE, MAX_VOCAB_SIZE], an unknown model, and a data_dir without a train split or with an empty one.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not (
            MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE):
        raise RefformerError(f"vocab size must be an integer from {MIN_VOCAB_SIZE} (4 special tokens and 256 byte "
                             f"symbols) to {MAX_VOCAB_SIZE:,}, got {vocab_size!r}")
    tokenizer, trainer = new_tokenizer(vocab_size, model)
    tokenizer.train_from_iterator(training_pieces(training_texts(data_dir)), trainer)
    special_ids(tokenizer)  # trained tokenizers must have the special ids fixed above
    return tokenizer


TRAINING_PIECE = 10_000  # characters; the trainer takes a longer line in pieces this long


def training_pieces(texts):
    """texts, a line longer than TRAINING_PIECE characters cut into pieces of that length: the native trainer takes
    minutes and gigabytes on one very long word (a 50 MB line ran over 5 minutes), and a piece boundary changes
    only the counts of the word it cuts.

    texts: an iterable of str; yields str. Raises nothing.
    """
    for text in texts:
        if len(text) <= TRAINING_PIECE:
            yield text
        else:
            yield from (text[start:start + TRAINING_PIECE] for start in range(0, len(text), TRAINING_PIECE))


def special_ids(tokenizer):
    """{"pad_id", "bos_id", "eos_id", "unk_id"} -> id; RefformerError if the tokenizer lacks one."""
    ids = {}
    for name, token in zip(SPECIAL_NAMES, SPECIAL_TOKENS):
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise RefformerError(f"tokenizer has no {token} token: train it with 'refformer tokenizer train'")
        ids[name] = token_id
    return ids


def encode(tokenizer, texts):
    """Token ids of each text, without special tokens, padding or truncation; text that looks like a special token
    stays text. Raises RefformerError for a text that is not a str or not valid Unicode, and for a tokenizer that
    panics (a crafted normalizer; the library's panic message is not printed)."""
    tokenizer.encode_special_tokens = True  # not stored in tokenizer.json, so set on every call
    without_padding_or_truncation(tokenizer)
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)):
        raise RefformerError(f"texts must be a list of str, got {type(texts).__name__}")
    for number, text in enumerate(texts):
        if not isinstance(text, str):
            raise RefformerError(f"text {number} must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise RefformerError(f"text {number} is not valid Unicode (it has a lone surrogate)") from None
    try:
        with silenced_native_output():  # a panic's message and backtrace (RUST_BACKTRACE) go nowhere
            encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    except BaseException as error:  # pyo3's PanicException is a BaseException
        if type(error).__name__ != "PanicException":
            raise
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else "a panic"
        raise RefformerError(f"the tokenizer failed inside the tokenizers library ({reason}): its tokenizer.json's "
                             "normalizer or pre-tokenizer is broken; use one from `refformer tokenizer train`"
                             ) from None
    return [encoding.ids for encoding in encodings]


def decode(tokenizer, ids):
    """The text of a list of token ids, special tokens skipped. Raises RefformerError for an id outside the
    vocabulary."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    ids = [int(token_id) for token_id in ids]
    bad = [token_id for token_id in ids if not 0 <= token_id < size]
    if bad:
        raise RefformerError(f"token id {bad[0]} is outside the vocabulary (size {size})")
    return tokenizer.decode(ids, skip_special_tokens=True)


LONG_TEXT_MARGIN = 4  # NFC shrinks a text at most 3 times: a text over 4 x longest token x N characters has more than N
# tokens whatever the tokenizer does (unless its normalizer deletes three quarters of it)


def longest_token(tokenizer):
    """The most characters one vocabulary token has (at least 1; a byte-level token's characters stand for one byte
    each, a text's characters for one or more): no token covers more of a text.

    An int, in characters. Raises nothing.
    """
    return max([len(token) for token in tokenizer.get_vocab(with_added_tokens=True)] + [1])


def most_characters(tokenizer, n_tokens, longest=None):
    """The most characters a text of n_tokens tokens can have: a longer one is too long without being tokenized (a
    55 MB line took 90 s and 12 GB to tokenize, only to be refused). longest: longest_token(tokenizer), if known.

    An int. Raises nothing.
    """
    return LONG_TEXT_MARGIN * (longest_token(tokenizer) if longest is None else longest) * n_tokens


def normalize(text):
    """What decode(encode(text)) gives back: the NFC form of text.

    No checks: its one caller, prepare_training, passes read_tsv's checked str (TypeError for a non-str).
    """
    return unicodedata.normalize("NFC", text)


def save_tokenizer(tokenizer, path):
    """Write tokenizer.json atomically.

    Raises RefformerError (atomic_write) when path is a device, pipe, folder or dangling link, or the disk is full;
    OSError for other write failures.
    """
    text = tokenizer.to_str(pretty=True)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(text.encode("utf-8")))


def load_tokenizer(path):
    """A tokenizer.json file, checked to have the special tokens at their ids, with its padding and truncation
    switched off. Raises RefformerError for a missing or invalid file."""
    path = Path(path)
    if not path.is_file():
        raise RefformerError(f"{path} not found: train one with 'refformer tokenizer train', or, for a model imported "
                             "from Hugging Face, import its folder again with its tokenizer files")
    tokenizer = read_tokenizer(path)  # refimpl.io's one reader: padding and truncation off
    ids = special_ids(tokenizer)
    if list(ids.values()) != list(range(len(SPECIAL_TOKENS))):
        raise RefformerError(f"{path}: special tokens must be {', '.join(SPECIAL_TOKENS)} at ids 0-3, got {ids}")
    return tokenizer
