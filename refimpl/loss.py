"""Token-level cross-entropy with an ignored (padding) id and label smoothing, as torch's F.cross_entropy."""

import numpy as np

from .errors import check, check_array, check_number, reading_cache
from .ops import log_softmax_backward, log_softmax_forward


def cross_entropy_forward(logits, targets, *, ignore_id=None, label_smoothing=0.0):
    """Mean over non-ignored tokens of (1 - e) * -log p[target] + e * mean_v(-log p[v]): label smoothing e as
    Szegedy et al. 2016 and torch's F.cross_entropy(ignore_index=ignore_id, label_smoothing=e).

    logits [B, T, V] (or [N, V]) floating, targets [B, T] (or [N]) integer -> a scalar loss in logits' dtype
    (0.0 when every target is ignored; torch gives NaN there), cache. A logit of -inf (a class that can never be
    the answer) is allowed: the loss is finite unless a target's logit is -inf (or label_smoothing > 0 meets a
    -inf logit), where it is inf. Raises RefformerError for bad shapes, ids, ignore_id or label_smoothing.
    """
    check_array("logits", logits, kind="f")
    check(logits.ndim >= 1 and logits.shape[-1] >= 1, f"logits must have a last axis of V >= 1 classes, "
                                                       f"got shape {list(logits.shape)}")
    check_array("targets", targets, shape=logits.shape[:-1], kind="i")
    check_number("label_smoothing", label_smoothing, 0.0, 1.0)
    check(ignore_id is None or (isinstance(ignore_id, (int, np.integer)) and not isinstance(ignore_id, bool)),
          f"ignore_id must be an integer or None, got {ignore_id!r}")
    V = logits.shape[-1]
    valid = np.ones(targets.shape, bool) if ignore_id is None else targets != ignore_id
    safe_targets = np.where(valid, targets, 0)
    check(safe_targets.size == 0 or (safe_targets.min() >= 0 and safe_targets.max() < V),
          f"targets must hold ids in [0, {V}) (or the ignored id)")
    logp, logp_cache = log_softmax_forward(logits)
    nll = -np.take_along_axis(logp, safe_targets[..., None], axis=-1)[..., 0]  # [B, T]
    # A term whose weight is 0 is left out, not multiplied by 0: a -inf logit (a banned class) makes the mean
    # over classes inf, and 0 * inf would turn the loss into NaN.
    per_token = nll if label_smoothing == 0 else -logp.mean(axis=-1) if label_smoothing == 1 else (
        (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(axis=-1))  # [B, T]
    n_tokens = int(valid.sum())
    loss = (per_token * valid).sum() / max(n_tokens, 1)
    cache = {"log_softmax": logp_cache, "targets": safe_targets, "valid": valid, "n_tokens": n_tokens,
             "label_smoothing": label_smoothing}
    return loss, cache


def cross_entropy_backward(cache, dloss=1.0):
    """dlogits of the logits' shape [..., V] and dtype: the gradient of dloss * the mean loss.

    Raises RefformerError for a cache that cross_entropy_forward did not return or a non-finite dloss.
    """
    check(isinstance(cache, dict) and "log_softmax" in cache, "cache must be the cache cross_entropy_forward returned")
    check_number("dloss", dloss)
    with reading_cache("cross_entropy_forward"):
        return _cross_entropy_backward(cache, dloss)


def _cross_entropy_backward(cache, dloss):
    (logp,) = cache["log_softmax"]
    e = cache["label_smoothing"]
    V = logp.shape[-1]
    weight = (cache["valid"] * (dloss / max(cache["n_tokens"], 1))).astype(logp.dtype)[..., None]  # [B, T, 1]
    dlogp = np.full(logp.shape, -e / V, dtype=logp.dtype)
    np.put_along_axis(dlogp, cache["targets"][..., None], -e / V - (1.0 - e), axis=-1)
    return log_softmax_backward(cache["log_softmax"], dlogp * weight)
