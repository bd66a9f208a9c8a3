"""Text generation on the reference model: greedy, sampling (temperature, top-k, top-p), beam search,
repetition penalty, no-repeat n-grams, min/max new tokens — the NumPy twin every runtime strategy
must match token for token.

The search code talks to the model through a *stepper* with three methods, so the same search runs
on refimpl (ReferenceStepper, here) and on ONNX Runtime (refformer.runtime's stepper):

    stepper.start(src_ids, src_keep)         encode the source once (encoder-decoder; None for decoder-only)
    stepper.step(ids, positions, attention_mask) -> logits [B, T, V]   extends the self-attention cache
    stepper.reorder(rows)                    keep/duplicate cache rows (beam search, expanding to beams)

Random draws (so seeded sampling matches across implementations): one Generator,
numpy.random.default_rng(seed); at every step one uniform u = rng.random() per row, rows in batch
order, finished rows included; the token is the first id whose cumulative probability (ids in
increasing order, float64, after temperature, top-k and top-p) exceeds u times the total.
"""

import dataclasses
import math

import numpy as np

from .errors import check
from .model import _check_ids, _keep_mask, decoder_step, empty_cache, encode
from .ops import log_softmax_forward, softmax_forward


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """Decoding options (names as in Hugging Face's generate). Invalid values raise RefformerError."""

    max_new_tokens: int | None = None  # default: 2 S + 10 for translation, up to max_positions for a LM
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool = False
    num_return_sequences: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0

    def __post_init__(self):
        check(self.max_new_tokens is None or (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0),
              f"max_new_tokens must be a non-negative integer, got {self.max_new_tokens!r}")
        check(isinstance(self.min_new_tokens, int) and self.min_new_tokens >= 0,
              f"min_new_tokens must be a non-negative integer, got {self.min_new_tokens!r}")
        check(self.max_new_tokens is None or self.min_new_tokens <= self.max_new_tokens,
              f"min_new_tokens ({self.min_new_tokens}) must not exceed max_new_tokens ({self.max_new_tokens})")
        check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        check(isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be a non-negative integer, got {self.top_k!r}")
        check(0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}")
        check(isinstance(self.num_beams, int) and self.num_beams >= 1, f"num_beams must be >= 1, got {self.num_beams!r}")
        check(isinstance(self.num_return_sequences, int) and self.num_return_sequences >= 1,
              f"num_return_sequences must be >= 1, got {self.num_return_sequences!r}")
        check(self.num_return_sequences <= self.num_beams or (self.do_sample and self.num_beams == 1),
              f"num_return_sequences ({self.num_return_sequences}) must not exceed num_beams ({self.num_beams})")
        check(not (self.do_sample and self.num_beams > 1), "sampling with beams (do_sample with num_beams > 1) is not supported")
        check(self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        check(isinstance(self.no_repeat_ngram_size, int) and self.no_repeat_ngram_size >= 0,
              f"no_repeat_ngram_size must be a non-negative integer, got {self.no_repeat_ngram_size!r}")
        check(math.isfinite(self.length_penalty), f"length_penalty must be finite, got {self.length_penalty}")


# ---------------------------------------------------------------------------- the reference stepper


class ReferenceStepper:
    """refimpl.encode + refimpl.decoder_step behind the stepper interface (cache kept in NumPy)."""

    def __init__(self, cfg, params):
        self.cfg, self.params = cfg, params
        self.dtype = params["decoder"]["embed_tokens"]["weight"].dtype

    def start(self, src_ids, src_keep, batch_size):
        self.cross_kv, self.src_keep = None, None
        if self.cfg.is_encoder_decoder:
            _, self.cross_kv = encode(self.cfg, self.params, src_ids, src_keep)
            self.src_keep = src_keep
        self.past = empty_cache(self.cfg, batch_size, self.dtype)

    def step(self, ids, positions, attention_mask):
        logits, self.past = decoder_step(self.cfg, self.params, ids, positions, attention_mask, self.past,
                                         self.cross_kv, self.src_keep)
        return logits

    def reorder(self, rows):
        self.past = [(k[rows], v[rows]) for k, v in self.past]
        if self.cross_kv is not None:
            self.cross_kv = [(k[rows], v[rows]) for k, v in self.cross_kv]
            self.src_keep = self.src_keep[rows]


# ---------------------------------------------------------------------------- logits processing


def apply_repetition_penalty(scores, sequences, penalty):
    """CTRL's penalty on every token already in a row's sequence: divide positive scores, multiply negative."""
    if penalty == 1.0:
        return scores
    scores = scores.copy()
    for b, sequence in enumerate(sequences):
        seen = np.unique(np.asarray(sequence, dtype=np.int64))
        values = scores[b, seen]
        scores[b, seen] = np.where(values > 0, values / penalty, values * penalty)
    return scores


def banned_ngram_tokens(sequence, n):
    """Tokens that would repeat an n-gram of sequence: those that followed its last n-1 tokens before."""
    if n == 0 or len(sequence) < n:
        return []
    prefix = tuple(sequence[len(sequence) - n + 1:]) if n > 1 else ()
    return [sequence[i + n - 1] for i in range(len(sequence) - n + 1) if tuple(sequence[i:i + n - 1]) == prefix]


def process_logits(logits, sequences, n_generated, options, cfg):
    """Float64 scores of the next token: repetition penalty, no-repeat n-grams, min_new_tokens (eos banned)."""
    scores = apply_repetition_penalty(logits.astype(np.float64), sequences, options.repetition_penalty)
    if options.no_repeat_ngram_size:
        for b, sequence in enumerate(sequences):
            scores[b, banned_ngram_tokens(list(sequence), options.no_repeat_ngram_size)] = -np.inf
    if n_generated < options.min_new_tokens:
        scores[:, cfg.eos_id] = -np.inf
    return scores


def filter_top_k_top_p(scores, top_k, top_p):
    """Keep the top_k highest scores (ties with the k-th kept) and the smallest set of most likely tokens
    whose probability reaches top_p (the most likely always kept); the rest become -inf."""
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


def sample(scores, rng):
    """One token per row by the documented draw: u = rng.random() per row, first id with cdf > u * total."""
    probs, _ = softmax_forward(scores)
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(scores.shape[0])
    choice = np.array([np.searchsorted(row, value * row[-1], side="right") for row, value in zip(cdf, u)])
    return np.minimum(choice, scores.shape[-1] - 1)


# ---------------------------------------------------------------------------- inputs


def prepare_inputs(cfg, src_ids=None, src_mask=None, prompt_ids=None, prompt_mask=None):
    """Decoder start: bos for encoder-decoder, the left-padded prompt for decoder-only.

    Returns (ids [B, P], attention_mask [B, P], positions [B, P], src_keep or None).
    """
    if cfg.is_encoder_decoder:
        check(src_ids is not None, "an encoder-decoder model needs src_ids")
        _check_ids("src_ids", src_ids, cfg)
        src_keep = _keep_mask("src_mask", src_mask, src_ids, cfg)
        check(src_ids.shape[1] >= 1 and bool(src_keep.any(axis=1).all()), "every source needs at least one token")
        B = src_ids.shape[0]
        ids = np.full((B, 1), cfg.bos_id, dtype=np.int64)
        return ids, np.ones((B, 1), np.int64), np.zeros((B, 1), np.int64), src_keep
    check(prompt_ids is not None, "a decoder-only model needs prompt_ids")
    _check_ids("prompt_ids", prompt_ids, cfg)
    keep = _keep_mask("prompt_mask", prompt_mask, prompt_ids, cfg).astype(np.int64)
    check(prompt_ids.shape[1] >= 1 and bool(keep[:, -1].all()),
          "every prompt needs at least one token and must be left-padded (its last column real)")
    positions = np.maximum(np.cumsum(keep, axis=1) - 1, 0)
    return prompt_ids.astype(np.int64), keep, positions, None


def step_budget(cfg, options, src_length, positions):
    """How many tokens to generate: max_new_tokens (default 2 S + 10, or what fits), within max_positions."""
    last_position = int(positions[:, -1].max())
    room = cfg.max_positions - last_position  # the token at max_positions - 1 is the last one fed
    default = 2 * src_length + 10 if cfg.is_encoder_decoder else room
    wanted = default if options.max_new_tokens is None else options.max_new_tokens
    return max(0, min(wanted, room))


# ---------------------------------------------------------------------------- greedy and sampling


def search_iter(stepper, cfg, options, src_ids=None, src_mask=None, prompt_ids=None, prompt_mask=None):
    """Greedy (or, with do_sample, sampled) decoding, yielding the next token of every row, [B], per step.

    Finished rows (after eos) yield pad_id. Streaming callers print tokens as they come.
    """
    check(options.num_beams == 1, "search_iter is for num_beams = 1; use beam_search")
    ids, attention_mask, positions, src_keep = prepare_inputs(cfg, src_ids, src_mask, prompt_ids, prompt_mask)
    B = ids.shape[0]
    stepper.start(src_ids, src_keep, B)
    # the sequences the penalties look at: bos (+ prompt) and what was generated (kept only when a penalty is on:
    # a Python loop over the rows every step is a large share of a fast GPU step at B = 64)
    sequences = [row[keep == 1].tolist() for row, keep in zip(ids, attention_mask)]
    penalties = options.repetition_penalty != 1.0 or options.no_repeat_ngram_size > 0
    rng = np.random.default_rng(options.seed)
    steps = step_budget(cfg, options, 0 if src_ids is None else src_ids.shape[1], positions)
    finished = np.zeros(B, dtype=bool)
    # A stepper with an in-graph argmax (the runtime's static graph) spares the logits' trip to the host
    # when nothing but min_new_tokens touches the scores; it is the same argmax, ties to the lowest id.
    in_graph_argmax = hasattr(stepper, "step_argmax") and not options.do_sample and not penalties
    for t in range(steps):
        if in_graph_argmax:
            next_ids = stepper.step_argmax(ids, positions, attention_mask)
            if t < options.min_new_tokens and (next_ids == cfg.eos_id).any():  # eos is banned: look again
                next_ids = process_logits(stepper.last_logits()[:, -1], sequences, t, options, cfg).argmax(axis=-1)
        else:
            logits = stepper.step(ids, positions, attention_mask)[:, -1]  # [B, V]
            scores = process_logits(logits, sequences, t, options, cfg)
            if options.do_sample:
                scores = filter_top_k_top_p(scores / options.temperature, options.top_k, options.top_p)
                next_ids = sample(scores, rng)
            else:
                next_ids = scores.argmax(axis=-1)
        next_ids = np.where(finished, cfg.pad_id, next_ids).astype(np.int64)  # [B]
        yield next_ids
        if penalties:
            for b in range(B):
                sequences[b].append(int(next_ids[b]))
        finished |= next_ids == cfg.eos_id
        if finished.all():
            return
        ids = next_ids[:, None]
        positions = positions[:, -1:] + 1
        attention_mask = np.concatenate([attention_mask, np.ones((B, 1), np.int64)], axis=1)


def stack_rows(token_steps, batch_size, pad_id):
    """Per-step tokens -> [B, L] (L may be 0)."""
    if not token_steps:
        return np.full((batch_size, 0), pad_id, dtype=np.int64)
    return np.stack(token_steps, axis=1)


# ---------------------------------------------------------------------------- beam search


def top_candidates(values, n, block=256):
    """np.argsort(-values, kind="stable")[:n] (the n largest, ties to the lower index) without sorting all of values.

    Beam search ranks K * V candidates per input every step; a full sort of 128,000 of them costs far more than
    the decode step. values is cut into blocks: the blocks whose maximum is among the n largest block maxima
    (ties included) hold every one of the n best (a value outside them has n larger values ahead of it, one in
    each of n blocks), so only those blocks are sorted.
    """
    values = np.asarray(values).reshape(-1)
    if values.size <= 4 * n * block or np.isnan(values).any():  # NaN maxima would hide their blocks
        return np.argsort(-values, kind="stable")[:n]
    pad = -values.size % block
    blocks = np.concatenate([values, np.full(pad, -np.inf)]).reshape(-1, block)
    maxima = blocks.max(axis=1)
    nth = np.partition(maxima, maxima.size - n)[maxima.size - n]  # the n-th largest block maximum
    chosen = np.flatnonzero(maxima >= nth)  # ascending, so the gathered indices stay ascending
    index = (chosen[:, None] * block + np.arange(block)).reshape(-1)
    index = index[index < values.size]
    return index[np.argsort(-values[index], kind="stable")[:n]]


def beam_search(stepper, cfg, options, src_ids=None, src_mask=None, prompt_ids=None, prompt_mask=None):
    """Beam search with num_beams, length_penalty, early_stopping, num_return_sequences.

    Returns (sequences, scores): for each input row, num_return_sequences lists of generated ids
    (ending with eos when one was produced) and their scores, best first. A hypothesis scores
    sum(log p) / len ** length_penalty, len counting the generated tokens (eos included).
    The cache is reordered by beam every step through stepper.reorder.
    """
    K = options.num_beams
    ids, attention_mask, positions, src_keep = prepare_inputs(cfg, src_ids, src_mask, prompt_ids, prompt_mask)
    B = ids.shape[0]
    steps = step_budget(cfg, options, 0 if src_ids is None else src_ids.shape[1], positions)
    stepper.start(src_ids, src_keep, B)
    prompts = [row[keep == 1].tolist() for row, keep in zip(ids, attention_mask)]  # row r keeps prompts[r // K]
    expand = np.repeat(np.arange(B), K)  # row b*K + k is beam k of input b
    stepper.reorder(expand)
    ids, attention_mask, positions = ids[expand], attention_mask[expand], positions[expand]
    generated = [[] for _ in range(B * K)]
    beam_scores = np.tile(np.array([0.0] + [-np.inf] * (K - 1)), B)  # only beam 0 is live at first
    hypotheses = [[] for _ in range(B)]  # (score, tokens)
    done = np.zeros(B, dtype=bool)

    def length_normalised(total, length):
        return total / (length ** options.length_penalty)

    for t in range(steps):
        logits = stepper.step(ids, positions, attention_mask)[:, -1]  # [B K, V]
        scores = process_logits(logits, [prompts[r // K] + g for r, g in enumerate(generated)], t, options, cfg)
        logp = log_softmax_forward(scores)[0] if np.isfinite(scores).any() else scores
        candidates = (beam_scores[:, None] + logp).reshape(B, -1)  # [B, K V]
        V = logp.shape[-1]
        next_rows, next_tokens, next_scores = [], [], []
        for b in range(B):
            if done[b]:  # keep the rows in place; their output is ignored
                next_rows += [b * K] * K
                next_tokens += [cfg.pad_id] * K
                next_scores += [-np.inf] * K
                continue
            order = top_candidates(candidates[b], 2 * K)
            chosen = 0
            for rank, flat in enumerate(order):
                total = candidates[b, flat]
                if not np.isfinite(total):
                    break
                beam, token = divmod(int(flat), V)
                row = b * K + beam
                if token == cfg.eos_id:
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
            while chosen < K:  # fewer live candidates than beams (tiny vocabularies): pad with dead beams
                next_rows.append(b * K)
                next_tokens.append(cfg.pad_id)
                next_scores.append(-np.inf)
                chosen += 1
            hypotheses[b] = sorted(hypotheses[b], key=lambda h: -h[0])[:K]
            best_running = max(next_scores[-K:])
            if len(hypotheses[b]) == K:
                if options.early_stopping or not np.isfinite(best_running):
                    done[b] = True
                else:  # can a running beam still beat the worst kept hypothesis?
                    best_possible = length_normalised(best_running, t + 1)
                    done[b] = best_possible <= hypotheses[b][-1][0]
            elif not np.isfinite(best_running):
                done[b] = True
        if done.all():
            break
        rows = np.array(next_rows)
        stepper.reorder(rows)
        generated = [generated[r] + [tok] for r, tok in zip(rows, next_tokens)]
        beam_scores = np.array(next_scores)
        ids = np.array(next_tokens, dtype=np.int64)[:, None]
        positions = positions[rows][:, -1:] + 1
        attention_mask = np.concatenate([attention_mask[rows], np.ones((B * K, 1), np.int64)], axis=1)
    for b in range(B):  # inputs still running at the length limit: their live beams are hypotheses too
        if done[b]:
            continue
        for k in range(K):
            row = b * K + k
            if np.isfinite(beam_scores[row]) and generated[row]:
                hypotheses[b].append((length_normalised(beam_scores[row], len(generated[row])), generated[row]))
        hypotheses[b] = sorted(hypotheses[b], key=lambda h: -h[0])[:K]
    n = options.num_return_sequences
    return [[h[1] for h in hyps[:n]] for hyps in hypotheses], [[h[0] for h in hyps[:n]] for hyps in hypotheses]


# ---------------------------------------------------------------------------- entry points


def generate(cfg, params, src_ids=None, prompt_ids=None, options=None, src_mask=None, prompt_mask=None, stepper=None):
    """Generate with any strategy: a list (per input row) of lists (num_return_sequences) of generated ids.

    Each sequence stops after its eos (kept) or at the length limit. stepper defaults to the reference model.
    """
    options = options or GenerationOptions()
    stepper = stepper or ReferenceStepper(cfg, params)
    inputs = dict(src_ids=src_ids, src_mask=src_mask, prompt_ids=prompt_ids, prompt_mask=prompt_mask)
    if options.num_beams > 1:
        return beam_search(stepper, cfg, options, **inputs)[0]
    copies = options.num_return_sequences
    if copies > 1:  # independent samples: each input repeated, rows in input order
        inputs = {k: None if v is None else np.repeat(v, copies, axis=0) for k, v in inputs.items()}
    B = (src_ids if src_ids is not None else prompt_ids).shape[0] * copies
    rows = stack_rows(list(search_iter(stepper, cfg, options, **inputs)), B, cfg.pad_id)
    sequences = [trim_after_eos(row, cfg) for row in rows.tolist()]
    return [sequences[i:i + copies] for i in range(0, B, copies)]


def trim_after_eos(row, cfg):
    """Generated ids up to and including the first eos (the pads after it dropped)."""
    return row[: row.index(cfg.eos_id) + 1] if cfg.eos_id in row else row


def greedy(cfg, params, src_ids, src_mask=None, max_new_tokens=None):
    """Encoder-decoder greedy decoding. src_ids [B, S] (src + [eos], padded) -> ids [B, L] (eos, then pad)."""
    check(cfg.is_encoder_decoder, "greedy needs an encoder-decoder model; use greedy_lm for decoder-only")
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    steps = search_iter(ReferenceStepper(cfg, params), cfg, options, src_ids=src_ids, src_mask=src_mask)
    return stack_rows(list(steps), src_ids.shape[0], cfg.pad_id)


def greedy_lm(cfg, params, prompt_ids, prompt_mask=None, max_new_tokens=None):
    """Decoder-only greedy continuation of left-padded prompts [B, P] -> ids [B, L] (eos, then pad)."""
    check(not cfg.is_encoder_decoder, "greedy_lm needs a decoder-only model; use greedy for encoder-decoder")
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    steps = search_iter(ReferenceStepper(cfg, params), cfg, options, prompt_ids=prompt_ids, prompt_mask=prompt_mask)
    return stack_rows(list(steps), prompt_ids.shape[0], cfg.pad_id)


def strip(ids, cfg):
    """Rows of generated ids -> lists of ids up to (not including) each row's eos and padding."""
    return [row[:row.index(cfg.eos_id)] if cfg.eos_id in row else row for row in np.asarray(ids).tolist()]
