"""AdamW, the inverse-square-root learning-rate schedule, and gradient clipping by global norm.

Pure functions on parameter trees: nothing is updated in place, every call returns new trees.
The optimizer state is a plain dict so a checkpoint can hold it:

    {"step": int, "m": tree like params, "v": tree like params}

Weight decay follows common practice (nanoGPT, Hugging Face): it applies to every matrix
(ndim >= 2: linear weights, token and position embeddings, the LM head) and never to
vectors (biases, LayerNorm/RMSNorm weights and biases), whose size is not a capacity
to be regularised. A tied embedding is one matrix and is decayed once.
"""

import math

import numpy as np

from .errors import check
from .tree import flatten, tree_map, unflatten


def decays(value):
    """True when a parameter gets weight decay: matrices, not vectors."""
    return value.ndim >= 2


def adamw_init(params):
    """Optimizer state for params: step 0 and zero first/second moments of each parameter's dtype."""
    zeros = tree_map(np.zeros_like, params)
    return {"step": 0, "m": zeros, "v": tree_map(np.zeros_like, params)}


def adamw_update(params, grads, state, *, lr, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.0):
    """One AdamW step (Loshchilov & Hutter; torch.optim.AdamW) -> (new params, new state).

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  t = step + 1
    p = p (1 - lr wd)  -  lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    The decay multiplies the parameter directly (decoupled), not through the gradient.
    """
    beta1, beta2 = betas
    check(0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0, f"betas must lie in [0, 1), got {betas}")
    check(lr >= 0.0 and eps >= 0.0 and weight_decay >= 0.0,
          f"lr, eps and weight_decay must be non-negative, got {lr}, {eps}, {weight_decay}")
    step = state["step"] + 1
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)
    flat_p, flat_g = flatten(params), flatten(grads)
    flat_m, flat_v = flatten(state["m"]), flatten(state["v"])
    check(flat_g.keys() == flat_p.keys(), "grads must have exactly the parameters' names")
    new_p, new_m, new_v = {}, {}, {}
    for name, p in flat_p.items():
        g = flat_g[name]
        m = beta1 * flat_m[name] + (1.0 - beta1) * g
        v = beta2 * flat_v[name] + (1.0 - beta2) * (g * g)
        if decays(p):
            p = p * (1.0 - lr * weight_decay)
        denom = np.sqrt(v) / bias_correction2_sqrt + eps
        new_p[name] = (p - (lr / bias_correction1) * (m / denom)).astype(p.dtype, copy=False)
        new_m[name], new_v[name] = m.astype(p.dtype, copy=False), v.astype(p.dtype, copy=False)
    new_state = {"step": step, "m": unflatten(new_m, params), "v": unflatten(new_v, params)}
    return unflatten(new_p, params), new_state


def inverse_sqrt_lr(step, *, peak, warmup):
    """The Transformer schedule: linear warmup to peak over `warmup` steps, then peak * sqrt(warmup / step).

    step counts updates from 1. warmup=0 means a constant peak.
    """
    check(warmup >= 0, f"warmup must be non-negative, got {warmup}")
    if warmup == 0:
        return float(peak)
    step = max(int(step), 1)
    return peak * min(step / warmup, math.sqrt(warmup / step))


def global_norm(grads):
    """sqrt of the sum of squares of every entry of every gradient (float64 accumulation)."""
    return math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in flatten(grads).values()))


def clip_by_global_norm(grads, max_norm):
    """Scale all gradients by min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_.

    Returns (clipped grads, the norm before clipping). max_norm=None or <= 0 leaves them unchanged.
    """
    norm = global_norm(grads)
    if max_norm is None or max_norm <= 0:
        return grads, norm
    scale = min(1.0, max_norm / (norm + 1e-6))
    if scale == 1.0:
        return grads, norm
    return tree_map(lambda g: (g * scale).astype(g.dtype, copy=False), grads), norm
