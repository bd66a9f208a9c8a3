"""Greedy decoding with a KV cache: the NumPy reference every runtime decoding strategy must match.

Both functions return the generated ids [B, L] only (no bos, no prompt): each row runs up to
and including its eos, then holds pad_id; L is the longest row (at most max_new_tokens).
"""

import numpy as np

from .errors import check
from .model import _check_ids, _keep_mask, decoder_step, empty_cache, encode


def _budget(cfg, max_new_tokens, used, default):
    """How many tokens may still be generated: max_new_tokens (or default), within max_positions."""
    wanted = default if max_new_tokens is None else max_new_tokens
    check(wanted >= 0, f"max_new_tokens must be non-negative, got {wanted}")
    return max(0, min(wanted, cfg.max_positions - used))


def _finish(tokens, batch_size, cfg):
    """Stack the per-step tokens into [B, L] (L may be 0)."""
    if not tokens:
        return np.full((batch_size, 0), cfg.pad_id, dtype=np.int64)
    return np.stack(tokens, axis=1)


def greedy(cfg, params, src_ids, src_mask=None, max_new_tokens=None):
    """Encoder-decoder greedy decoding. src_ids [B, S] (src + [eos], padded) -> ids [B, L].

    The decoder starts from bos at position 0; max_new_tokens defaults to 2 S + 10.
    """
    check(cfg.is_encoder_decoder, "greedy needs an encoder-decoder model; use greedy_lm for decoder-only")
    src_keep = _keep_mask("src_mask", src_mask, src_ids, cfg)
    _, cross_kv = encode(cfg, params, src_ids, src_keep)
    B = src_ids.shape[0]
    steps = _budget(cfg, max_new_tokens, 0, 2 * src_ids.shape[1] + 10)
    dtype = params["decoder"]["embed_tokens"]["weight"].dtype
    past = empty_cache(cfg, B, dtype)
    ids = np.full((B, 1), cfg.bos_id, dtype=np.int64)
    finished = np.zeros(B, dtype=bool)
    tokens = []
    for t in range(steps):
        positions = np.full((B, 1), t, dtype=np.int64)
        attention_mask = np.ones((B, t + 1), dtype=np.int64)  # finished rows keep running on pad; ignored
        logits, past = decoder_step(cfg, params, ids, positions, attention_mask, past, cross_kv, src_keep)
        next_ids = np.where(finished, cfg.pad_id, logits[:, -1].argmax(axis=-1))  # [B]
        tokens.append(next_ids)
        finished |= next_ids == cfg.eos_id
        if finished.all():
            break
        ids = next_ids[:, None]
    return _finish(tokens, B, cfg)


def greedy_lm(cfg, params, prompt_ids, prompt_mask=None, max_new_tokens=None):
    """Decoder-only greedy continuation. prompt_ids [B, P], left-padded with pad_id -> ids [B, L].

    Prompts are used as given (start them with bos as in training). Positions count real
    tokens only, so a left-padded row is decoded exactly as it would be alone.
    max_new_tokens defaults to whatever fits in max_positions.
    """
    check(not cfg.is_encoder_decoder, "greedy_lm needs a decoder-only model; use greedy for encoder-decoder")
    _check_ids("prompt_ids", prompt_ids, cfg)
    keep = _keep_mask("prompt_mask", prompt_mask, prompt_ids, cfg).astype(np.int64)  # [B, P]
    B, P = prompt_ids.shape
    check(P >= 1 and bool(keep[:, -1].all()),
          "every prompt needs at least one token and must be left-padded (its last column real)")
    lengths = keep.sum(axis=1)  # [B]
    positions = np.maximum(np.cumsum(keep, axis=1) - 1, 0)  # [B, P]
    steps = _budget(cfg, max_new_tokens, int(lengths.max()) - 1, cfg.max_positions)  # last fed at max_positions - 1
    dtype = params["decoder"]["embed_tokens"]["weight"].dtype
    ids, attention_mask, past = prompt_ids, keep, empty_cache(cfg, B, dtype)
    finished = np.zeros(B, dtype=bool)
    tokens = []
    for t in range(steps):
        logits, past = decoder_step(cfg, params, ids, positions, attention_mask, past)
        next_ids = np.where(finished, cfg.pad_id, logits[:, -1].argmax(axis=-1))  # [B]
        tokens.append(next_ids)
        finished |= next_ids == cfg.eos_id
        if finished.all():
            break
        ids = next_ids[:, None]
        positions = (lengths + t)[:, None]
        attention_mask = np.concatenate([attention_mask, np.ones((B, 1), dtype=np.int64)], axis=1)
    return _finish(tokens, B, cfg)


def strip(ids, cfg):
    """Rows of generated ids -> lists of ids up to (not including) each row's eos and padding."""
    return [row[:row.index(cfg.eos_id)] if cfg.eos_id in row else row for row in np.asarray(ids).tolist()]
