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
import numbers

import numpy as np

from .errors import check, check_number
from .tree import flatten, tree_map, unflatten


def _check_state(state):
    check(isinstance(state, dict) and {"step", "m", "v"} <= set(state),
          "state must be the optimizer state from adamw_init: a dict with step, m and v")
    check(isinstance(state["step"], numbers.Integral) and state["step"] >= 0,
          f"state['step'] must be an integer >= 0, got {state['step']!r}")


def decays(value):
    """True when a parameter (an array) gets weight decay: matrices (ndim >= 2), not vectors. No checks."""
    return value.ndim >= 2


def adamw_init(params):
    """Optimizer state for params: {"step": 0, "m": zeros like params, "v": zeros like params} (each parameter's
    shape and dtype).

    Raises RefformerError unless params is a tree (dicts and lists) of arrays."""
    check(isinstance(params, (dict, list)) and flatten(params),
          f"params must be a non-empty tree of arrays, got {type(params).__name__}")
    zeros = tree_map(np.zeros_like, params)
    return {"step": 0, "m": zeros, "v": tree_map(np.zeros_like, params)}


def adamw_update(params, grads, state, *, lr, betas=(0.9, 0.98), eps=1e-9, weight_decay=0.0):
    """One AdamW step (Loshchilov & Hutter 2019; torch.optim.AdamW) -> (new params, new state), each array in its
    parameter's dtype.

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  t = step + 1
    p = p (1 - lr wd)  -  lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    The decay multiplies the parameter directly (decoupled), not through the gradient.
    Raises RefformerError for betas outside [0, 1), a negative or non-finite lr, eps or weight_decay, a state
    not made by adamw_init, and grads whose names or shapes differ from the parameters'.
    """
    check(isinstance(betas, (tuple, list)) and len(betas) == 2, f"betas must be two numbers in [0, 1), got {betas!r}")
    beta1, beta2 = (check_number(f"betas[{i}]", beta, 0, 1, high_open=True) for i, beta in enumerate(betas))
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        check_number(name, value, 0)
    _check_state(state)
    step = state["step"] + 1
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)
    flat_p, flat_g = flatten(params), flatten(grads)
    flat_m, flat_v = flatten(state["m"]), flatten(state["v"])
    check(flat_g.keys() == flat_p.keys(), "grads must have exactly the parameters' names")
    check(flat_m.keys() == flat_p.keys() and flat_v.keys() == flat_p.keys(),
          "state's moments must have exactly the parameters' names (make the state with adamw_init(params))")
    for name, p in flat_p.items():
        for which, tree in (("grads", flat_g), ("state m", flat_m), ("state v", flat_v)):
            check(np.shape(tree[name]) == p.shape, f"{which} {name} has shape {list(np.shape(tree[name]))}, "
                                                   f"the parameter {list(p.shape)}")
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
    """The Transformer schedule (Vaswani et al. 2017, sec. 5.3, with the peak in place of d_model^-0.5 warmup^-0.5):
    linear warmup to peak over `warmup` steps, then peak * sqrt(warmup / step). Returns a Python float.

    step counts updates from 1. warmup=0 means a constant peak. Raises RefformerError for a negative or
    non-integer warmup and a peak that is not a finite number >= 0.
    """
    check_number("warmup", warmup, 0, integer=True)
    check_number("peak", peak, 0)
    check_number("step", step, integer=True)
    if warmup == 0:
        return float(peak)
    step = max(int(step), 1)
    return peak * min(step / warmup, math.sqrt(warmup / step))


def global_norm(grads):
    """sqrt of the sum of squares of every entry of every gradient, a Python float (float64 accumulation).

    Raises RefformerError unless grads is a tree (dicts and lists) of arrays."""
    check(isinstance(grads, (dict, list)), f"grads must be a tree of arrays, got {type(grads).__name__}")
    return math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in flatten(grads).values()))


def clip_by_global_norm(grads, max_norm):
    """Scale all gradients by min(1, max_norm / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_.

    Returns (clipped grads, each in its own dtype; the norm before clipping, a float). max_norm=None or <= 0
    leaves them unchanged. Raises RefformerError for a max_norm that is NaN or not a number, or grads that are
    not a tree of arrays.
    """
    check(max_norm is None or (isinstance(max_norm, numbers.Real) and not math.isnan(max_norm)),
          f"max_norm must be a number or None, got {max_norm!r}")
    norm = global_norm(grads)
    if max_norm is None or max_norm <= 0:
        return grads, norm
    scale = min(1.0, max_norm / (norm + 1e-6))
    if scale == 1.0:
        return grads, norm
    return tree_map(lambda g: (g * scale).astype(g.dtype, copy=False), grads), norm
