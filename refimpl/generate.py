"""Text generation on the reference model: greedy, sampling (temperature, top-k, top-p), beam search,
repetition penalty, no-repeat n-grams, min/max new tokens — the NumPy twin every runtime strategy
must match token for token.

The search talks to the model through a Stepper (the class below), so the same search runs on refimpl
(ReferenceStepper, here) and on ONNX Runtime (refformer.runtime.stepper's OrtStepper and StaticOrtStepper):

    stepper.start(src_ids, src_keep, B)      encode the source once (encoder-decoder; None for decoder-only)
    stepper.step(ids, positions, attention_mask) -> logits [B, T, V]   extends the self-attention cache
    stepper.reorder(rows)                    keep/duplicate cache rows (beam search, expanding to beams)

and through its optional capabilities, whose reference definitions are in Stepper: argmax_in_graph with
step_argmax and last_logits (greedy without the logits' trip to the host), and top_candidates (beam ranking).
A runtime overrides them with the same results, faster.

Batch independence: a row's output depends only on its own input, the options and the seed, never on the
other rows of its batch. Each row has its own length budget (step_budget: max_new_tokens, or by default
2 S + 10 for a source of S tokens, eos included, within max_positions), and its own random generator.

Random draws (so seeded sampling matches across implementations): row r, the k-th sequence of its input
(k = 0 .. num_return_sequences - 1), draws from its own numpy.random.default_rng([seed, k]); at every step
each row draws one uniform u = rng.random() (a finished row's later draws, where a stepper keeps it, are
unused); the token is the first id whose cumulative probability (ids in increasing order, float64, after
temperature, top-k and top-p) exceeds u times the total. GenerationOptions(seed=None), the default, draws a
fresh seed (so sampling differs from run to run) and keeps it in options.seed.
"""

import abc
import dataclasses
import numbers
import secrets

import numpy as np

from .config import check_config, format_bytes
from .errors import check, check_array, check_number, physical_memory_bytes
from .model import check_ids, check_model, decoder_step, empty_cache, encode, left_padded_positions, token_keep_mask
from .ops import log_softmax_forward, softmax_forward

MAX_BEAMS = 1024  # num_beams and num_return_sequences above this are refused before anything is allocated
SEED_RANGE = 2 ** 32  # a seed drawn for seed=None lies in [0, SEED_RANGE)


def _check_scores(name, scores):
    """scores: a [B, V] floating array (V >= 1)."""
    check_array(name, scores, ndim=2, kind="f")
    check(scores.shape[1] >= 1, f"{name} must have at least one column (the vocabulary)")


def _check_token_list(name, sequence, vocab_size=None):
    """A list/tuple/1-D integer array of token ids (in [0, vocab_size) when given) -> a list of ints."""
    if isinstance(sequence, np.ndarray):
        check(sequence.ndim == 1 and (sequence.size == 0 or sequence.dtype.kind in "iu"),
              f"{name} must be a 1-D array of token ids")
        sequence = sequence.tolist()
    check(isinstance(sequence, (list, tuple)) and all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                                      and t >= 0 for t in sequence),
          f"{name} must be a list of token ids (integers >= 0)")
    check(vocab_size is None or all(t < vocab_size for t in sequence),
          f"{name} must hold token ids below the vocabulary size {vocab_size}")
    return list(sequence)


def _check_sequences(sequences, rows, vocab_size):
    check(isinstance(sequences, (list, tuple)) and len(sequences) == rows,
          f"sequences must be a list of {rows} token lists, one per row")
    return [_check_token_list(f"sequences[{b}]", sequence, vocab_size) for b, sequence in enumerate(sequences)]


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """Decoding options (names as in Hugging Face's generate). Invalid values raise RefformerError.

    seed=None (the default) draws a seed at construction: sampling differs from one GenerationOptions to the
    next, and options.seed says which seed was used (pass it back to reproduce the draws).
    """

    max_new_tokens: int | None = None  # default: max_length's, else 2 S + 10 for translation, max_positions for a LM
    max_length: int | None = None  # the decoder's input (start token or prompt) plus new tokens; max_new_tokens wins
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None  # None: draw one
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    num_return_sequences: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    decoder_start_token_id: int | None = None  # encoder-decoder: the decoder's first input (None: cfg.bos_id)
    forced_bos_token_id: int | None = None  # the first token generated after a one-token decoder input
    forced_eos_token_id: int | None = None  # the token generated at the last step of a row's budget
    bad_words_ids: tuple | None = None  # token sequences never generated (a list of lists; eos alone is ignored)

    def __post_init__(self):
        if self.max_new_tokens is not None:
            check_number("max_new_tokens", self.max_new_tokens, 0, integer=True)
        if self.max_length is not None:
            check_number("max_length", self.max_length, 0, integer=True)
        check_number("min_new_tokens", self.min_new_tokens, 0, integer=True)
        check(self.max_new_tokens is None or self.min_new_tokens <= self.max_new_tokens,
              f"min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens ({self.max_new_tokens})")
        check(isinstance(self.do_sample, bool), f"do_sample must be True or False, got {self.do_sample!r}")
        check(isinstance(self.early_stopping, bool),
              f"early_stopping must be True or False, got {self.early_stopping!r}")
        check_number("temperature", self.temperature, 0, low_open=True)
        check_number("top_k", self.top_k, 0, integer=True)
        check_number("top_p", self.top_p, 0, 1, low_open=True)
        if self.seed is not None:
            check_number("seed", self.seed, 0, integer=True)
        check_number("num_beams", self.num_beams, 1, MAX_BEAMS, integer=True)
        check_number("num_return_sequences", self.num_return_sequences, 1, MAX_BEAMS, integer=True)
        check(self.num_return_sequences <= self.num_beams or (self.do_sample and self.num_beams == 1),
              f"num_return_sequences ({self.num_return_sequences}) must not exceed num_beams ({self.num_beams})")
        check(not (self.do_sample and self.num_beams > 1),
              "sampling with beams (do_sample with num_beams > 1) is not supported")
        check_number("repetition_penalty", self.repetition_penalty, 0, low_open=True)
        check_number("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, integer=True)
        check_number("length_penalty", self.length_penalty)
        for name in ("decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), 0, integer=True)
        if self.bad_words_ids is not None:
            check(isinstance(self.bad_words_ids, (list, tuple)) and len(self.bad_words_ids) > 0,
                  "bad_words_ids must be a non-empty list of token id lists")
            words = tuple(tuple(int(t) for t in _check_token_list(f"bad_words_ids[{i}]", word)) for i, word in
                          enumerate(self.bad_words_ids))
            check(all(words), "bad_words_ids must not hold an empty list")
            object.__setattr__(self, "bad_words_ids", words)
        for name in ("max_new_tokens", "max_length", "min_new_tokens", "top_k", "seed", "num_beams",
                     "num_return_sequences", "no_repeat_ngram_size", "decoder_start_token_id", "forced_bos_token_id",
                     "forced_eos_token_id"):  # NumPy integers become Python ints (no overflow in sums)
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, int(value))
        for name in ("temperature", "top_p", "repetition_penalty", "length_penalty"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.seed is None:
            object.__setattr__(self, "seed", secrets.randbelow(SEED_RANGE))

    @classmethod
    def from_keywords(cls, **options):
        """GenerationOptions(**options), an unknown name refused with RefformerError instead of TypeError."""
        fields = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(options) - fields)
        check(not unknown, f"unknown generation option {unknown[0]!r}; the options are {', '.join(sorted(fields))}"
              if unknown else "")
        return cls(**options)


def _check_options(options):
    check(isinstance(options, GenerationOptions), f"options must be a GenerationOptions, got {type(options).__name__}")


def search_memory_bytes(cfg, rows, itemsize=4):
    """A bound on the memory a search of `rows` sequences at once holds: per row, the self-attention cache at its
    longest (max_positions, twice that after a left-padded prompt), the cross-attention keys and values, and a few
    float64 copies of the scores. Raises RefformerError for a bad cfg or rows."""
    check_config(cfg)
    check_number("rows", rows, 0, integer=True)
    check_number("itemsize", itemsize, 1, integer=True)
    width = cfg.n_decoder_layers * 2 * cfg.d_model * itemsize  # keys and values of one position, every layer
    self_cache = width * cfg.max_positions * (1 if cfg.is_encoder_decoder else 2)
    cross = width * cfg.max_positions if cfg.is_encoder_decoder else 0
    return rows * (self_cache + cross + 4 * cfg.vocab_size * 8)


def check_search_fits_memory(cfg, options, batch_size):
    """Refuse, before anything is allocated, a search whose batch_size inputs x num_beams (or num_return_sequences)
    rows cannot fit in this machine's memory (search_memory_bytes). Raises RefformerError naming what to lower."""
    _check_options(options)
    check_number("batch_size", batch_size, 0, integer=True)
    per_input = options.num_beams if options.num_beams > 1 else options.num_return_sequences
    rows = batch_size * per_input
    need, available = search_memory_bytes(cfg, rows), physical_memory_bytes()
    check(need <= available,
          f"{batch_size} inputs x {per_input} {'beams' if options.num_beams > 1 else 'sequences'} = {rows:,} sequences "
          f"at once need up to {format_bytes(need)} of memory for their caches, more than this machine's "
          f"{format_bytes(available)}: lower num_beams, num_return_sequences or the batch size")


# ---------------------------------------------------------------------------- the stepper interface


class Stepper(abc.ABC):
    """The model behind the search, one decoder step at a time: what search_iter and beam_search call.

    A subclass implements start, step and reorder. The members after them are optional capabilities with
    reference definitions here; a faster runtime overrides them with the same results (refformer.runtime's
    OrtStepper ranks beams with a blocked search, StaticOrtStepper takes the greedy argmax in its graph).
    The search calls a Stepper with checked inputs; a Stepper raises RefformerError for bad ones, as
    model.decoder_step does (reorder, given rows out of range, may raise IndexError).
    """

    @abc.abstractmethod
    def start(self, src_ids, src_keep, batch_size):
        """Begin a search of batch_size rows: encode the source once (src_ids [B, S] int64 and src_keep [B, S],
        1 = real token, for an encoder-decoder model; both None for decoder-only) and empty the self-attention
        cache (P = 0). An implementation raises RefformerError for inputs it cannot take."""

    @abc.abstractmethod
    def step(self, ids, positions, attention_mask):
        """Feed T new tokens per row: ids, positions [B, T] int64 and attention_mask [B, P + T] int64 (1 = real
        token; the P cached positions, then the new ones) -> logits [B, T, V] on the host, float32 or float64.
        The cache grows to P + T positions (model.decoder_step). An implementation raises RefformerError for inputs
        it cannot take."""

    @abc.abstractmethod
    def reorder(self, rows):
        """Keep or duplicate cache rows: row i of the new cache is row rows[i] of the old (rows [B'] int64;
        beam search expanding inputs to beams, and reordering beams every step). The search passes rows in range;
        an implementation may raise IndexError for others."""

    argmax_in_graph = False
    """True where step_argmax finds the greedy token without bringing the logits [B, V] to the host (the static
    ONNX graph's ArgMax): search_iter then calls step_argmax instead of step when nothing but min_new_tokens
    touches the scores (greedy, no repetition penalty, no n-gram ban)."""

    drops_finished_rows = False
    """True where search_iter may drop finished rows from the batch (stepper.reorder with the rows still going):
    the steps after cost only the rows still generating. Results are the same either way (batch independence).
    False for the runtime's static graphs, whose buffers are allocated per batch size."""

    last_step_logits = None  # the reference step_argmax's logits [B, 1, V], for last_logits

    def step_argmax(self, ids, positions, attention_mask):
        """step, returning only the greedy next token of every row: ids [B] int64, the argmax of the last
        position's logits, ties to the lowest id. Reference: step, then the argmax on the host. Raises what step
        raises."""
        self.last_step_logits = self.step(ids, positions, attention_mask)[:, -1:]
        return self.last_step_logits[:, -1].argmax(axis=-1)

    def last_logits(self):
        """The last position's logits [B, 1, V] of the latest step_argmax (search_iter reads them only when eos
        must be banned, before min_new_tokens); None before any step_argmax. Raises nothing."""
        return self.last_step_logits

    def top_candidates(self, values, n):
        """Indices of the n largest of values (1-D float64: the K V candidate scores of one input in beam search),
        largest first, ties to the lower index. Reference: the stable argsort. No checks: the search passes its own
        scores."""
        return np.argsort(-values, kind="stable")[:n]


class ReferenceStepper(Stepper):
    """model.encode + model.decoder_step as a Stepper (the cache kept in NumPy); the reference capabilities.
    Raises RefformerError where model.encode / model.decoder_step do."""

    drops_finished_rows = True

    def __init__(self, cfg, params):
        """Raises RefformerError unless cfg is a Config and params its parameter tree (float32 or float64)."""
        self.dtype = check_model(cfg, params)
        self.cfg, self.params = cfg, params

    def start(self, src_ids, src_keep, batch_size):
        """Stepper.start: model.encode's cross-attention keys and values, model.empty_cache in the parameters'
        dtype. Raises RefformerError for bad src_ids or src_keep."""
        self.cross_kv, self.src_keep = None, None
        if self.cfg.is_encoder_decoder:
            _, self.cross_kv = encode(self.cfg, self.params, src_ids, src_keep)
            self.src_keep = src_keep
        self.past = empty_cache(self.cfg, batch_size, self.dtype)

    def step(self, ids, positions, attention_mask):
        """Stepper.step: model.decoder_step on the cache. Raises RefformerError for bad inputs."""
        logits, self.past = decoder_step(self.cfg, self.params, ids, positions, attention_mask, self.past,
                                         self.cross_kv, self.src_keep)
        return logits

    def reorder(self, rows):
        """Stepper.reorder: NumPy fancy indexing of every cache tensor (IndexError for rows out of range)."""
        self.past = [(k[rows], v[rows]) for k, v in self.past]
        if self.cross_kv is not None:
            self.cross_kv = [(k[rows], v[rows]) for k, v in self.cross_kv]
            self.src_keep = self.src_keep[rows]


# ---------------------------------------------------------------------------- logits processing


LOGIT_CAP = float(np.finfo(np.float32).max) / 4  # the largest |score| a repetition penalty makes: beyond any real
# logit, and a difference of two such scores (softmax's x - max) is still finite in float32


def apply_repetition_penalty(scores, sequences, penalty):
    """The repetition penalty of CTRL (Keskar et al. 2019), as Hugging Face's RepetitionPenaltyLogitsProcessor: on
    every token already in a row's sequence, divide a positive score by penalty and multiply a negative one.
    scores [B, V] floating, sequences B lists of token ids, penalty > 0 -> scores [B, V] (a copy, scores' dtype;
    scores itself when penalty is 1; results clipped to +-LOGIT_CAP, -inf kept). Raises RefformerError for bad
    input."""
    _check_scores("scores", scores)
    sequences = _check_sequences(sequences, scores.shape[0], scores.shape[1])
    check_number("penalty", penalty, 0, low_open=True)
    return _apply_repetition_penalty(scores, sequences, float(penalty))


def _apply_repetition_penalty(scores, sequences, penalty):
    if penalty == 1.0:
        return scores
    scores = scores.copy()
    for b, sequence in enumerate(sequences):
        seen = np.unique(np.asarray(sequence, dtype=np.int64))
        values = scores[b, seen]
        wide = values.astype(np.float64)  # in float32 a penalty below 1e-45 is 0 and one above 3e38 is inf
        with np.errstate(over="ignore", under="ignore", invalid="ignore"):  # -inf * tiny: the -inf is kept below
            penalized = np.where(wide > 0, wide / penalty, wide * penalty)
        # a penalty near 0 or near the float limit must not turn finite scores into +-inf (inf - inf is NaN later);
        # a banned token's -inf stays -inf
        scores[b, seen] = np.where(np.isneginf(values), values, np.clip(penalized, -LOGIT_CAP, LOGIT_CAP))
    return scores


def banned_ngram_tokens(sequence, n):
    """Tokens that would repeat an n-gram of sequence (Hugging Face's no_repeat_ngram_size): a list of the ids that
    followed its last n-1 tokens before (empty for n = 0). Raises RefformerError unless sequence is a list of token
    ids and n an integer >= 0."""
    sequence = _check_token_list("sequence", sequence)
    check_number("n", n, 0, integer=True)
    return _banned_ngram_tokens(sequence, int(n))


def _banned_ngram_tokens(sequence, n):
    if n == 0 or len(sequence) < n:
        return []
    prefix = tuple(sequence[len(sequence) - n + 1:]) if n > 1 else ()
    return [sequence[i + n - 1] for i in range(len(sequence) - n + 1) if tuple(sequence[i:i + n - 1]) == prefix]


def banned_bad_words(sequence, bad_words_ids, eos_id=None):
    """Tokens that would complete one of bad_words_ids after sequence (Hugging Face's NoBadWordsLogitsProcessor):
    a one-token word always, a longer word's last token when sequence ends with the rest of it; a word that is eos
    alone is ignored, as transformers does. Returns a list of ids. Raises RefformerError unless sequence is a list
    of token ids and bad_words_ids a list of non-empty token lists."""
    sequence = _check_token_list("sequence", sequence)
    check(isinstance(bad_words_ids, (list, tuple)), "bad_words_ids must be a list of token id lists")
    words = [_check_token_list(f"bad_words_ids[{i}]", word) for i, word in enumerate(bad_words_ids)]
    check(all(words), "bad_words_ids must not hold an empty list")
    return _banned_bad_words(sequence, words, eos_id)


def _banned_bad_words(sequence, bad_words_ids, eos_id):
    banned = []
    for word in bad_words_ids:
        prefix = list(word[:-1])
        if list(word) != [eos_id] and len(prefix) <= len(sequence) and sequence[len(sequence) - len(prefix):] == prefix:
            banned.append(word[-1])
    return banned


def process_logits(logits, sequences, n_generated, options, cfg, first_step=False, last_step=None):
    """Float64 scores [B, V] of the next token from logits [B, V] (raw logits in greedy search and sampling, the
    log-probabilities in beam search), in the order of transformers' _get_logits_processor: repetition penalty,
    no-repeat n-grams, bad words, min_new_tokens (eos banned), forced bos, forced eos.

    first_step: the decoder's input is one token (an encoder-decoder's start token, or a one-token prompt) and
    nothing is generated yet, where ForcedBOSTokenLogitsProcessor forces forced_bos_token_id. last_step [B] bool:
    the rows at the last step of their budget, where ForcedEOSTokenLogitsProcessor forces forced_eos_token_id. A
    forced token scores 0 and every other -inf. A NaN score becomes -inf and +inf the largest float64 (a tiny
    repetition_penalty can overflow), so the softmaxes downstream never see inf - inf. sequences: B lists of token
    ids (the decoder's input and what was generated), n_generated >= 0. Raises RefformerError for bad input.
    """
    _check_scores("logits", logits)
    _check_options(options)
    check_config(cfg)
    check(cfg.eos_id is None or logits.shape[1] > cfg.eos_id,
          f"logits must have a column for every token id (eos is {cfg.eos_id})")
    check_vocabulary(options, logits.shape[1])
    sequences = _check_sequences(sequences, logits.shape[0], logits.shape[1])
    check_number("n_generated", n_generated, 0, integer=True)
    check(isinstance(first_step, bool), "first_step must be True or False")
    if last_step is not None:
        last_step = np.asarray(last_step)
        check(last_step.shape == (logits.shape[0],) and last_step.dtype == bool, "last_step must be a [B] bool array")
    return _process_logits(logits, sequences, n_generated, options, cfg, first_step, last_step)


def _force_token(scores, rows, token):
    """ForcedBOS/EOSTokenLogitsProcessor: in the given rows every score -inf, token's 0."""
    scores[rows] = -np.inf
    scores[rows, token] = 0.0


def _process_logits(logits, sequences, n_generated, options, cfg, first_step=False, last_step=None):
    scores = _apply_repetition_penalty(logits.astype(np.float64), sequences, options.repetition_penalty)
    if options.no_repeat_ngram_size:
        for b, sequence in enumerate(sequences):
            scores[b, _banned_ngram_tokens(list(sequence), options.no_repeat_ngram_size)] = -np.inf
    if options.bad_words_ids:
        for b, sequence in enumerate(sequences):
            scores[b, _banned_bad_words(list(sequence), options.bad_words_ids, cfg.eos_id)] = -np.inf
    if n_generated < options.min_new_tokens and cfg.eos_id is not None:  # no eos: nothing to ban
        scores[:, cfg.eos_id] = -np.inf
    if first_step and options.forced_bos_token_id is not None:
        _force_token(scores, slice(None), options.forced_bos_token_id)
    if options.forced_eos_token_id is not None and last_step is not None and last_step.any():
        _force_token(scores, last_step, options.forced_eos_token_id)
    if not np.isfinite(scores).all():
        # np.nan_to_num(nan=-inf, posinf=float64 max, neginf=-inf) in place (scores is this function's own array:
        # astype copies), in two passes instead of nan_to_num's several: -inf stays, the same values, ~4x faster
        nan = np.isnan(scores)
        if nan.any():
            scores[nan] = -np.inf
        scores[scores == np.inf] = np.finfo(np.float64).max
    return scores


def check_vocabulary(options, vocab_size):
    """Raises RefformerError unless every token id the options name (decoder start, forced tokens, bad words) is
    below vocab_size."""
    _check_options(options)
    for name in ("decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id"):
        value = getattr(options, name)
        check(value is None or value < vocab_size,
              f"{name} ({value}) must be a token id below the vocabulary size {vocab_size}")
    for i, word in enumerate(options.bad_words_ids or ()):
        check(max(word) < vocab_size, f"bad_words_ids[{i}] must hold token ids below the vocabulary size {vocab_size}")


def apply_temperature(scores, temperature):
    """(scores - row max) / temperature -> [B, V] in scores' dtype: the same softmax as scores / temperature,
    without overflow at a tiny temperature (a row whose scores are all -inf stays all -inf). Raises RefformerError
    for scores that are not [B, V] floating or a temperature that is not > 0 and finite."""
    _check_scores("scores", scores)
    check_number("temperature", temperature, 0, low_open=True)
    return _apply_temperature(scores, float(temperature))


def _apply_temperature(scores, temperature):
    top = scores.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(over="ignore"):
        return (scores - top) / temperature


def filter_top_k_top_p(scores, top_k, top_p):
    """Keep the top_k highest scores (ties with the k-th kept; Fan et al. 2018) and the smallest set of most likely
    tokens whose probability reaches top_p (the most likely always kept; nucleus sampling, Holtzman et al. 2020),
    top-k first, as Hugging Face applies them (after the temperature); the rest become -inf. Returns a copy
    [B, V]. Raises RefformerError for scores that are not [B, V] floating, top_k not an integer >= 0 or top_p
    outside (0, 1]."""
    _check_scores("scores", scores)
    check_number("top_k", top_k, 0, integer=True)
    check_number("top_p", top_p, 0, 1, low_open=True)
    return _filter_top_k_top_p(scores, int(top_k), float(top_p))


def _filter_top_k_top_p(scores, top_k, top_p):
    scores = scores.copy()
    if top_k and top_k < scores.shape[-1]:
        kth = np.sort(scores, axis=-1)[:, -top_k][:, None]
        scores[scores < kth] = -np.inf
    if top_p < 1.0:
        order = np.argsort(-scores, axis=-1, kind="stable")  # most likely first, ties by id
        probs = np.take_along_axis(softmax_forward(scores)[0], order, axis=-1)
        before = np.cumsum(probs, axis=-1) - probs  # mass of the more likely tokens
        drop_sorted = before >= top_p
        drop = np.zeros_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=-1)
        scores[drop] = -np.inf
    return scores


def sample(scores, rngs):
    """One token per row by the documented draw: u = rngs[b].random() for row b, first id with cdf > u * total.

    scores [B, V] floating -> ids [B] int64. rngs: one numpy Generator per row (a single Generator is used for
    every row, in row order). A row whose scores are all -inf takes its argmax, as greedy would. Raises
    RefformerError for bad scores or generators.
    """
    _check_scores("scores", scores)
    if isinstance(rngs, np.random.Generator):
        rngs = [rngs] * scores.shape[0]
    check(isinstance(rngs, (list, tuple)) and len(rngs) == scores.shape[0]
          and all(isinstance(rng, np.random.Generator) for rng in rngs),
          f"rngs must be a numpy Generator or a list of {scores.shape[0]}, one per row")
    return _sample(scores, rngs)


def _sample(scores, rngs):
    live = np.isfinite(scores.max(axis=-1))
    with np.errstate(invalid="ignore"):
        probs, _ = softmax_forward(np.where(live[:, None], scores, 0.0))
    cdf = np.cumsum(probs, axis=-1)
    u = [rng.random() for rng in rngs]
    choice = np.array([np.searchsorted(row, value * row[-1], side="right") for row, value in zip(cdf, u)],
                      dtype=np.int64)
    choice = np.where(live, choice, scores.argmax(axis=-1))
    return np.minimum(choice, scores.shape[-1] - 1)


def row_generators(seed, sequence_numbers):
    """The documented per-row random generators, a list of numpy Generators: default_rng([seed, k]) for a row that
    is its input's k-th sequence (sequence_numbers [B]).
    Raises RefformerError unless seed is an integer >= 0 and sequence_numbers integers >= 0."""
    check_number("seed", seed, 0, integer=True)
    _check_token_list("sequence_numbers", sequence_numbers)
    return [np.random.default_rng([seed, int(k)]) for k in sequence_numbers]


# ---------------------------------------------------------------------------- inputs


def prepare_inputs(cfg, src_ids=None, src_mask=None, prompt_ids=None, prompt_mask=None, decoder_start_id=None):
    """Decoder start: decoder_start_id (default cfg.bos_id; transformers' decoder_start_token_id) for
    encoder-decoder, the left-padded prompt for decoder-only.

    Returns (ids [B, P], attention_mask [B, P], positions [B, P], all int64, and src_keep [B, S] bool or None);
    P = 1 (the start token) for encoder-decoder, the prompt length for decoder-only. Raises RefformerError for
    missing, malformed or out-of-vocabulary inputs.
    """
    check_config(cfg)
    if cfg.is_encoder_decoder:
        check(src_ids is not None, "an encoder-decoder model needs src_ids")
        check_ids("src_ids", src_ids, cfg)
        src_keep = token_keep_mask("src_mask", src_mask, src_ids, cfg)
        check(src_ids.shape[1] >= 1 and bool(src_keep.any(axis=1).all()), "every source needs at least one token")
        B = src_ids.shape[0]
        start = cfg.bos_id if decoder_start_id is None else decoder_start_id
        check(start is not None, "an encoder-decoder model starts its decoder with bos_id, and this model has "
                                 "none (bos_id is null): set bos_id in config.json to its decoder start token, or "
                                 "pass decoder_start_token_id")
        check_number("decoder_start_id", start, 0, cfg.vocab_size - 1, integer=True)
        ids = np.full((B, 1), start, dtype=np.int64)
        return ids, np.ones((B, 1), np.int64), np.zeros((B, 1), np.int64), src_keep
    check(prompt_ids is not None, "a decoder-only model needs prompt_ids")
    check_ids("prompt_ids", prompt_ids, cfg)
    keep = token_keep_mask("prompt_mask", prompt_mask, prompt_ids, cfg).astype(np.int64)
    check(prompt_ids.shape[1] >= 1 and bool(keep[:, -1].all()),
          "every prompt needs at least one token and must be left-padded (its last column real)")
    positions = left_padded_positions(keep)
    return prompt_ids.astype(np.int64), keep, positions, None


def step_budget(cfg, options, src_keep, positions):
    """How many tokens each row may generate, [B]: max_new_tokens, else max_length less the row's decoder input (its
    start token, or its prompt without the padding: transformers counts the padded width), else 2 S + 10 for a
    source of S tokens, or what fits for a prompt; within max_positions. Per row, so a row's budget never depends on
    its batch. src_keep [B, S] (encoder-decoder), positions [B, T] integer. Raises RefformerError for bad input."""
    check_config(cfg)
    _check_options(options)
    check_array("positions", positions, ndim=2, kind="i")
    check(positions.shape[1] >= 1, "positions must have at least one column")
    if cfg.is_encoder_decoder and options.max_new_tokens is None:
        src_keep = np.asarray(src_keep) if src_keep is not None else None
        check(src_keep is not None and src_keep.ndim == 2 and src_keep.shape[0] == positions.shape[0]
              and src_keep.dtype.kind in "biu", "src_keep must be a [B, S] mask of the sources")
    return _step_budget(cfg, options, src_keep, positions)


def _step_budget(cfg, options, src_keep, positions):
    room = cfg.max_positions - positions[:, -1].astype(np.int64)  # the token at max_positions - 1 is the last one fed
    if options.max_new_tokens is not None:
        wanted = np.full_like(room, min(options.max_new_tokens, cfg.max_positions))
    elif options.max_length is not None:  # positions count from 0: the last input token's position + 1 = its length
        longest = int(positions[:, -1].max()) + 1
        check(longest < options.max_length, f"max_length {options.max_length} leaves no room after a decoder input of "
              f"{longest} tokens (as transformers, which refuses it): give max_new_tokens instead")
        wanted = options.max_length - 1 - positions[:, -1].astype(np.int64)
    elif cfg.is_encoder_decoder:
        wanted = 2 * np.asarray(src_keep).sum(axis=1).astype(np.int64) + 10
    else:
        wanted = room
    return np.maximum(0, np.minimum(wanted, room))


def _next_positions(positions, cfg):
    """Each row's next position, [B, 1]; a finished row that ran out of room stays at max_positions - 1."""
    return np.minimum(positions[:, -1:] + 1, cfg.max_positions - 1)


# ---------------------------------------------------------------------------- greedy and sampling


def search_iter(stepper, cfg, options, src_ids=None, src_mask=None, prompt_ids=None, prompt_mask=None,
                sequence_numbers=None):
    """Greedy (or, with do_sample, sampled) decoding, yielding the next token of every row, [B] int64, per step.

    Finished rows (after eos, or at their length budget) yield cfg.fill_id (pad_id; eos_id for a model without
    pad, as transformers' generate; 0 with neither). A model without eos_id stops only at the budget. Streaming
    callers print tokens as they
    come. sequence_numbers [B]: which sequence of its input each row is (the k of its draws; default all 0).
    Raises RefformerError for bad options or inputs.
    """
    check_search_arguments(cfg, options, stepper)
    check(options.num_beams == 1, "search_iter is for num_beams = 1; use beam_search")
    ids, attention_mask, positions, src_keep = prepare_inputs(cfg, src_ids, src_mask, prompt_ids, prompt_mask,
                                                              options.decoder_start_token_id)
    B = ids.shape[0]
    if B == 0:
        return
    check_search_fits_memory(cfg, dataclasses.replace(options, num_return_sequences=1), B)  # (B counts the copies)
    sequence_numbers = np.zeros(B, np.int64) if sequence_numbers is None else np.asarray(sequence_numbers)
    check(sequence_numbers.shape == (B,), f"sequence_numbers must have one entry per row ({B})")
    stepper.start(src_ids, src_keep, B)
    # the sequences the penalties look at: bos (+ prompt) and what was generated (kept only when a penalty is on:
    # a Python loop over the rows every step is a large share of a fast GPU step at B = 64)
    sequences = [row[keep == 1].tolist() for row, keep in zip(ids, attention_mask)]
    penalties = options.repetition_penalty != 1.0 or options.no_repeat_ngram_size > 0 or bool(options.bad_words_ids)
    rngs = row_generators(options.seed, sequence_numbers) if options.do_sample else None
    budgets = _step_budget(cfg, options, src_keep, positions)
    steps = int(budgets.max())
    finished = budgets <= 0
    # A stepper with an in-graph argmax (the runtime's static graph) spares the logits' trip to the host
    # when nothing but min_new_tokens touches the scores; it is the same argmax, ties to the lowest id.
    in_graph_argmax = stepper.argmax_in_graph and not options.do_sample and not penalties
    width = ids.shape[1]  # the decoder's input: transformers' ForcedBOSTokenLogitsProcessor acts when it is 1 token
    # the rows the stepper still computes (all B unless it drops finished rows: Stepper.drops_finished_rows);
    # ids, positions and attention_mask hold these rows only
    active = np.arange(B)
    for t in range(steps):
        first_step, last_step = t == 0 and width == 1, budgets[active] == t + 1
        rows_sequences = sequences if len(active) == B else [sequences[b] for b in active]
        if in_graph_argmax:
            next_ids = stepper.step_argmax(ids, positions, attention_mask)
            banned_eos = t < options.min_new_tokens and cfg.eos_id is not None and (next_ids == cfg.eos_id).any()
            forced = (first_step and options.forced_bos_token_id is not None
                      or options.forced_eos_token_id is not None and last_step.any())
            if banned_eos or forced:  # look again at the scores
                next_ids = _process_logits(stepper.last_logits()[:, -1], rows_sequences, t, options, cfg, first_step,
                                           last_step).argmax(axis=-1)
        else:
            logits = stepper.step(ids, positions, attention_mask)[:, -1]  # [B, V]
            scores = _process_logits(logits, rows_sequences, t, options, cfg, first_step, last_step)
            if options.do_sample:
                scores = _apply_temperature(scores, options.temperature)
                scores = _filter_top_k_top_p(scores, options.top_k, options.top_p)
                next_ids = _sample(scores, rngs if len(active) == B else [rngs[b] for b in active])
            else:
                next_ids = scores.argmax(axis=-1)
        all_ids = np.full(B, cfg.fill_id, np.int64)
        all_ids[active] = next_ids
        next_ids = np.where(finished, cfg.fill_id, all_ids).astype(np.int64)  # [B]
        yield next_ids
        if penalties:
            for b in active:
                sequences[b].append(int(next_ids[b]))
        if cfg.eos_id is not None:
            finished |= next_ids == cfg.eos_id
        finished |= budgets <= t + 1
        if finished.all():
            return
        ids = next_ids[active, None]
        positions = _next_positions(positions, cfg)
        attention_mask = np.concatenate([attention_mask, np.ones((len(active), 1), np.int64)], axis=1)
        if stepper.drops_finished_rows and finished[active].any():  # finished rows leave the batch
            keep = np.flatnonzero(~finished[active])
            stepper.reorder(keep)
            active, ids, positions, attention_mask = active[keep], ids[keep], positions[keep], attention_mask[keep]


def stack_rows(token_steps, batch_size, pad_id):
    """Per-step tokens ([B] each) -> [B, L] int64 (L may be 0). Raises RefformerError for steps of another batch
    size."""
    check_number("batch_size", batch_size, 0, integer=True)
    check_number("pad_id", pad_id, 0, integer=True)
    check(isinstance(token_steps, (list, tuple)) and all(np.shape(step) == (batch_size,) for step in token_steps),
          f"token_steps must be a list of [{batch_size}] arrays")
    return _stack_rows(token_steps, batch_size, pad_id)


def _stack_rows(token_steps, batch_size, pad_id):
    if not token_steps:
        return np.full((batch_size, 0), pad_id, dtype=np.int64)
    return np.stack(token_steps, axis=1)


# ---------------------------------------------------------------------------- beam search


def beam_search(stepper, cfg, options, src_ids=None, src_mask=None, prompt_ids=None, prompt_mask=None):
    """Beam search with num_beams, length_penalty, early_stopping, num_return_sequences, as transformers 5.24's
    GenerationMixin._beam_search (names and meanings as in Hugging Face's generate).

    Returns (sequences, scores): for each input row, num_return_sequences lists of generated ids (ending with eos
    when one was produced) and their scores, best first.

    Every step, as transformers does: the log-softmax of the logits, then the logits processors (process_logits:
    repetition penalty, n-grams, bad words, min_new_tokens, forced tokens) applied to these log-probabilities,
    which are not renormalized after them; a candidate's score is its beam's score plus that value. The 2 K best
    candidates of an input are ranked; one of the first K that ends in eos, or any of the first K at the last step
    of the input's budget (step_budget), becomes a hypothesis scored sum / len ** length_penalty (len counting the
    generated tokens, eos included); the K best others continue. An input is done when it has K hypotheses and
    early_stopping is set, or when its best running beam, normalized by its current length, cannot beat the worst
    kept hypothesis (transformers' _check_early_stop_heuristic with early_stopping False), or at its budget.
    The cache is reordered by beam every step through stepper.reorder. An input with fewer hypotheses than
    num_return_sequences (a budget of 0) gets empty sequences, scored -inf, after them. Raises
    RefformerError for bad options or inputs.
    """
    check_search_arguments(cfg, options, stepper)
    K = options.num_beams
    ids, attention_mask, positions, src_keep = prepare_inputs(cfg, src_ids, src_mask, prompt_ids, prompt_mask,
                                                              options.decoder_start_token_id)
    B = ids.shape[0]
    if B == 0:
        return [], []
    check_search_fits_memory(cfg, options, B)
    budgets = _step_budget(cfg, options, src_keep, positions)
    steps = int(budgets.max())
    stepper.start(src_ids, src_keep, B)
    prompts = [row[keep == 1].tolist() for row, keep in zip(ids, attention_mask)]  # row r keeps prompts[r // K]
    width = ids.shape[1]
    expand = np.repeat(np.arange(B), K)  # row b*K + k is beam k of input b
    stepper.reorder(expand)
    ids, attention_mask, positions = ids[expand], attention_mask[expand], positions[expand]
    generated = [[] for _ in range(B * K)]
    # only beam 0 is live at first; the others start at transformers' -1e9 (not -inf): where forced tokens leave
    # beam 0 fewer than K candidates, their copies fill the beams (and the hypotheses) as in transformers
    beam_scores = np.tile(np.array([0.0] + [-1e9] * (K - 1)), B)
    hypotheses = [[] for _ in range(B)]  # (score, tokens)
    done = budgets <= 0

    def length_normalised(total, length):
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            return total / np.float64(length) ** options.length_penalty  # inf or 0 at huge penalties, never an error

    for t in range(steps):
        logits = stepper.step(ids, positions, attention_mask)[:, -1]  # [B K, V]
        last_step = np.repeat(budgets == t + 1, K)
        logp = log_softmax_forward(logits.astype(np.float64))[0]
        logp = _process_logits(logp, [prompts[r // K] + g for r, g in enumerate(generated)], t, options, cfg,
                               t == 0 and width == 1, last_step)
        candidates = (beam_scores[:, None] + logp).reshape(B, -1)  # [B, K V]
        V = logp.shape[-1]
        next_rows, next_tokens, next_scores = [], [], []
        for b in range(B):
            if done[b]:  # keep the rows in place; their output is ignored
                next_rows += [b * K] * K
                next_tokens += [cfg.fill_id] * K
                next_scores += [-np.inf] * K
                continue
            last = budgets[b] == t + 1  # every candidate stops here (transformers' max_length criterion)
            order = stepper.top_candidates(candidates[b], 2 * K)
            chosen = 0
            for rank, flat in enumerate(order):
                total = candidates[b, flat]
                if not np.isfinite(total):
                    break
                beam, token = divmod(int(flat), V)
                row = b * K + beam
                if token == cfg.eos_id or last:  # eos: never, for a model without eos (None)
                    if rank < K:
                        tokens = generated[row] + [token]
                        hypotheses[b].append((length_normalised(total, len(tokens)), tokens))
                    continue
                next_rows.append(row)
                next_tokens.append(token)
                next_scores.append(total)
                chosen += 1
                if chosen == K:
                    break
            while chosen < K:  # fewer live candidates than beams (tiny vocabularies, the last step): dead beams
                next_rows.append(b * K)
                next_tokens.append(cfg.fill_id)
                next_scores.append(-np.inf)
                chosen += 1
            hypotheses[b] = sorted(hypotheses[b], key=lambda h: -h[0])[:K]
            best_running = max(next_scores[-K:])
            if last or not np.isfinite(best_running):
                done[b] = True
            elif len(hypotheses[b]) == K:
                if options.early_stopping:
                    done[b] = True
                else:  # can the best running beam still beat the worst kept hypothesis?
                    done[b] = length_normalised(best_running, t + 1) <= hypotheses[b][-1][0]
        if done.all():
            break
        rows = np.array(next_rows)
        stepper.reorder(rows)
        generated = [generated[r] + [tok] for r, tok in zip(rows, next_tokens)]
        beam_scores = np.array(next_scores)
        ids = np.array(next_tokens, dtype=np.int64)[:, None]
        positions = _next_positions(positions[rows], cfg)
        attention_mask = np.concatenate([attention_mask[rows], np.ones((B * K, 1), np.int64)], axis=1)
    n = options.num_return_sequences
    hypotheses = [hyps[:n] + [(-np.inf, [])] * (n - len(hyps[:n])) for hyps in hypotheses]
    return [[h[1] for h in hyps] for hyps in hypotheses], [[h[0] for h in hyps] for hyps in hypotheses]


# ---------------------------------------------------------------------------- entry points


def check_search_arguments(cfg, options, stepper):
    """Raises RefformerError unless cfg is a Config, options a GenerationOptions and stepper a Stepper."""
    check_config(cfg)
    _check_options(options)
    check(isinstance(stepper, Stepper), f"stepper must have start, step and reorder: a subclass of "
                                        f"refformer.refimpl.generate.Stepper, got {type(stepper).__name__}")
    check_vocabulary(options, cfg.vocab_size)


def generate(cfg, params, src_ids=None, prompt_ids=None, options=None, src_mask=None, prompt_mask=None, stepper=None):
    """Generate with any strategy: a list (per input row) of lists (num_return_sequences) of generated ids.

    Each sequence stops after its eos (kept) or at its length budget (step_budget). stepper defaults to the
    reference model on params. A row's output depends only on its input, the options and options.seed.
    Raises RefformerError for bad options, inputs or parameters.
    """
    options = GenerationOptions() if options is None else options
    _check_options(options)
    check_config(cfg)
    if stepper is None:
        check(isinstance(params, dict), "params must be the model's parameter dict (or pass a stepper)")
        stepper = ReferenceStepper(cfg, params)
    inputs = dict(src_ids=src_ids, src_mask=src_mask, prompt_ids=prompt_ids, prompt_mask=prompt_mask)
    if options.num_beams > 1:
        return beam_search(stepper, cfg, options, **inputs)[0]
    ids, _, positions, src_keep = prepare_inputs(cfg, **inputs, decoder_start_id=options.decoder_start_token_id)
    check_search_fits_memory(cfg, options, ids.shape[0])  # before the inputs are repeated
    copies = options.num_return_sequences
    budgets = np.repeat(_step_budget(cfg, options, src_keep, positions), copies)
    if copies > 1:  # independent samples: each input repeated, rows in input order
        inputs = {k: None if v is None else np.repeat(np.asarray(v), copies, axis=0) for k, v in inputs.items()}
    B = ids.shape[0] * copies
    numbers = np.tile(np.arange(copies), ids.shape[0])
    rows = _stack_rows(list(search_iter(stepper, cfg, options, **inputs, sequence_numbers=numbers)), B, cfg.fill_id)
    sequences = [_trim_after_eos(row[:budget], cfg) for row, budget in zip(rows.tolist(), budgets.tolist())]
    return [sequences[i:i + copies] for i in range(0, B, copies)]


def trim_after_eos(row, cfg):
    """Generated ids up to and including the first eos (the pads after it dropped). Raises RefformerError unless
    row is a list of token ids and cfg a Config."""
    check_config(cfg)
    return _trim_after_eos(_check_token_list("row", row), cfg)


def _trim_after_eos(row, cfg):
    return row[: row.index(cfg.eos_id) + 1] if cfg.eos_id in row else row


def greedy(cfg, params, src_ids, src_mask=None, max_new_tokens=None, stepper=None):
    """Encoder-decoder greedy decoding. src_ids [B, S] (src + [eos], padded) -> ids [B, L] int64 (eos, then pad).
    stepper: the model behind the search (default: the reference model on params; the runtime passes its ONNX
    Runtime stepper). Raises RefformerError for a decoder-only cfg or bad params, ids, mask or max_new_tokens."""
    check_config(cfg)
    check(cfg.is_encoder_decoder, "greedy needs an encoder-decoder model; use greedy_lm for decoder-only")
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    stepper = ReferenceStepper(cfg, params) if stepper is None else stepper
    steps = search_iter(stepper, cfg, options, src_ids=src_ids, src_mask=src_mask)
    return _stack_rows(list(steps), np.shape(src_ids)[0], cfg.fill_id)


def greedy_lm(cfg, params, prompt_ids, prompt_mask=None, max_new_tokens=None):
    """Decoder-only greedy continuation of left-padded prompts [B, P] -> ids [B, L] int64 (eos, then pad).
    Raises RefformerError for an encoder-decoder cfg or bad params, prompts, mask or max_new_tokens."""
    check_config(cfg)
    check(not cfg.is_encoder_decoder, "greedy_lm needs a decoder-only model; use greedy for encoder-decoder")
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    steps = search_iter(ReferenceStepper(cfg, params), cfg, options, prompt_ids=prompt_ids, prompt_mask=prompt_mask)
    return _stack_rows(list(steps), np.shape(prompt_ids)[0], cfg.fill_id)


def strip(ids, cfg):
    """Rows of generated ids [B, L] -> lists of ids up to (not including) each row's eos. Raises RefformerError
    unless ids is a 2-D integer array (or list of equal-length lists) and cfg a Config."""
    check_config(cfg)
    ids = np.asarray(ids) if isinstance(ids, (list, tuple, np.ndarray)) else None
    check(ids is not None and ids.ndim == 2 and (ids.size == 0 or ids.dtype.kind in "iu"),
          "ids must be a [B, L] array of token ids")
    return [row[:row.index(cfg.eos_id)] if cfg.eos_id in row else row for row in ids.tolist()]
