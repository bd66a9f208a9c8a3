"""AdamW, the schedule and clipping against torch.optim.AdamW and torch.nn.utils.clip_grad_norm_ (float64)."""

import math

import numpy as np
import pytest

from refformer.refimpl import Config, init_params, rel_error
from refformer.refimpl.errors import RefformerError
from refformer.refimpl.optim import adamw_init, adamw_update, clip_by_global_norm, decays, global_norm, inverse_sqrt_lr
from refformer.refimpl.tree import flatten, tree_map

torch = pytest.importorskip("torch")


def _params(seed=0):
    cfg = Config(vocab_size=11, d_model=8, n_heads=2, d_ff=12, n_encoder_layers=1, n_decoder_layers=1,
                 positional="learned", max_positions=8, tie_embeddings=False, lm_head_bias=True)
    return init_params(cfg, np.random.default_rng(seed), dtype=np.float64)


def _worst(ours, theirs):
    """The largest rel_error over named tensors, and its name."""
    errors = {name: rel_error(ours[name], theirs[name]) for name in theirs}
    name = max(errors, key=errors.get)
    return errors[name], name


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_matches_torch(weight_decay):
    params = _params()
    rng = np.random.default_rng(1)
    grads_per_step = [tree_map(lambda p: rng.normal(size=p.shape), params) for _ in range(5)]
    lrs = [1e-3, 3e-3, 2e-3, 1e-3, 5e-4]
    betas, eps = (0.9, 0.98), 1e-9

    flat = flatten(params)
    tensors = {name: torch.tensor(value, requires_grad=True) for name, value in flat.items()}
    groups = [{"params": [t for n, t in tensors.items() if decays(flat[n])], "weight_decay": weight_decay},
              {"params": [t for n, t in tensors.items() if not decays(flat[n])], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lrs[0], betas=betas, eps=eps)
    state = adamw_init(params)
    for grads, lr in zip(grads_per_step, lrs):
        params, state = adamw_update(params, grads, state, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for name, value in flatten(grads).items():
            tensors[name].grad = torch.tensor(value)
        optimizer.step()

    expected = {name: t.detach().numpy() for name, t in tensors.items()}
    error, name = _worst(flatten(params), expected)
    print(f"AdamW wd={weight_decay}: worst rel error {error:.2e} ({name})")
    assert error <= 1e-12
    assert state["step"] == 5
    moments = {name: optimizer.state[t]["exp_avg_sq"].numpy() for name, t in tensors.items()}
    assert _worst(flatten(state["v"]), moments)[0] <= 1e-12


def test_adamw_is_pure_and_keeps_dtype():
    params = tree_map(lambda p: p.astype(np.float32), _params())
    before = {name: value.copy() for name, value in flatten(params).items()}
    grads = tree_map(np.ones_like, params)
    new_params, state = adamw_update(params, grads, adamw_init(params), lr=0.1, weight_decay=0.1)
    for name, value in flatten(params).items():
        np.testing.assert_array_equal(value, before[name])
    assert all(v.dtype == np.float32 for v in flatten(new_params).values())
    assert all(v.dtype == np.float32 for v in flatten(state["m"]).values())


def test_decay_only_matrices():
    flat = flatten(_params())
    decayed = sorted(name for name, value in flat.items() if decays(value))
    assert "lm_head.weight" in decayed and "decoder.embed_tokens.weight" in decayed
    assert not any(name.endswith("bias") or "norm" in name for name in decayed)


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_matches_torch(max_norm):
    grads = tree_map(lambda p: np.random.default_rng(2).normal(size=p.shape), _params())
    flat = flatten(grads)
    tensors = [torch.tensor(value, requires_grad=True) for value in flat.values()]
    for t, value in zip(tensors, flat.values()):
        t.grad = torch.tensor(value)
    torch_norm = torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    clipped, norm = clip_by_global_norm(grads, max_norm)
    assert abs(norm - float(torch_norm)) <= 1e-12 * norm
    expected = {name: t.grad.numpy() for name, t in zip(flat, tensors)}
    error, name = _worst(flatten(clipped), expected)
    print(f"clip max_norm={max_norm}: worst rel error {error:.2e} ({name})")
    assert error <= 1e-12


def test_global_norm():
    grads = {"a": np.array([3.0]), "b": [{"c": np.array([[4.0]])}]}
    assert global_norm(grads) == 5.0
    assert clip_by_global_norm(grads, None)[0] is grads


def test_inverse_sqrt_schedule():
    peak, warmup = 1e-3, 100
    assert inverse_sqrt_lr(1, peak=peak, warmup=warmup) == pytest.approx(1e-5)
    assert inverse_sqrt_lr(50, peak=peak, warmup=warmup) == pytest.approx(5e-4)
    assert inverse_sqrt_lr(100, peak=peak, warmup=warmup) == pytest.approx(peak)
    assert inverse_sqrt_lr(400, peak=peak, warmup=warmup) == pytest.approx(peak / 2)
    assert inverse_sqrt_lr(7, peak=peak, warmup=0) == peak
    lrs = [inverse_sqrt_lr(s, peak=peak, warmup=warmup) for s in range(1, 1000)]
    assert max(lrs) == pytest.approx(peak) and int(np.argmax(lrs)) + 1 == warmup
    assert math.isclose(lrs[-1], peak * math.sqrt(100 / 999))
    with pytest.raises(RefformerError):
        inverse_sqrt_lr(1, peak=peak, warmup=-1)


@pytest.mark.parametrize("call, words", [
    (lambda p: adamw_update(p, p, {}, lr=1e-3), "state must be the optimizer state"),
    (lambda p: adamw_update(p, p, {**adamw_init(p), "step": -1}, lr=1e-3), "state['step']"),
    (lambda p: adamw_update(p, p, adamw_init(p), lr=float("nan")), "lr must be a finite number >= 0"),
    (lambda p: adamw_update(p, p, adamw_init(p), lr=float("inf")), "lr must be a finite number >= 0"),
    (lambda p: adamw_update(p, p, adamw_init(p), lr=1e-3, eps=-1.0), "eps must be"),
    (lambda p: adamw_update(p, p, adamw_init(p), lr=1e-3, weight_decay=float("nan")), "weight_decay must be"),
    (lambda p: adamw_update(p, p, adamw_init(p), lr=1e-3, betas=(0.9,)), "betas must be two numbers"),
    (lambda p: adamw_update(p, tree_map(lambda g: g[..., :1], p), adamw_init(p), lr=1e-3), "has shape"),
    (lambda p: adamw_update(p, p, adamw_init(_params(1)["decoder"]), lr=1e-3), "moments must have exactly"),
    (lambda p: adamw_init(None), "params must be a non-empty tree"),
    (lambda p: inverse_sqrt_lr(1, peak=float("nan"), warmup=4), "peak must be a finite number"),
    (lambda p: inverse_sqrt_lr(1, peak=1e-3, warmup=2.5), "warmup must be an integer"),
    (lambda p: clip_by_global_norm(p, float("nan")), "max_norm must be a number"),
    (lambda p: global_norm(None), "grads must be a tree"),
])
def test_bad_arguments_raise_refformer_error(call, words):
    with pytest.raises(RefformerError) as raised:
        call(_params())
    assert words in str(raised.value)
