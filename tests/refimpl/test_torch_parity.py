"""refimpl against torch.nn with the same weights: forward outputs and every gradient (docs/DESIGN.md, "Correctness
chain", step 2).

Error metric: max|ours - torch| / max|torch| per tensor, <= 1e-10 in float64 and <= 1e-5 in
float32; a failure lists every tensor's error, worst first. torch runs with dropout=0, eval
mode, and its fused fast path off (it is also off whenever autograd is needed, as here).

No query row is ever fully masked: key 0 is always a real token and causal masks always let
a query see key 0: nn.MultiheadAttention with need_weights=True (its default) gives NaN for such a
row, while refimpl gives zeros, as torch 2.13's F.scaled_dot_product_attention does
(test_fully_masked_queries_give_zeros_as_torch_sdpa checks both facts).
"""

import copy
import math
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refformer.refimpl import (
    causal_mask,
    decoder_layer_backward,
    decoder_layer_forward,
    encoder_layer_backward,
    encoder_layer_forward,
    flatten,
    mha_backward,
    mha_forward,
    model_backward,
    model_forward,
    sinusoidal_table,
)
from refformer.refimpl.config import Config
from refformer.refimpl.convert.torch import (
    config_from_torch_layer,
    decoder_layer_params_from_torch,
    encoder_layer_params_from_torch,
    from_torch,
    mha_params_from_torch,
)
from tests.helpers import randomize_torch

torch = pytest.importorskip("torch")
nn = torch.nn

pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")

DTYPES = [np.float64, np.float32]
TOLERANCE = {np.float64: 1e-10, np.float32: 1e-5}
TORCH_DTYPE = {np.float64: torch.float64, np.float32: torch.float32}
SLACK = 10.0  # float32, ill-conditioned cases: refimpl's error may be this multiple of torch's own (see below)
WORST = {}  # dtype name -> (error, what): the largest error seen, printed at the end (pytest -s)
SLACK_USED = []  # (refimpl's error, torch's own, what), both against torch float64, where 1e-5 was exceeded


@pytest.fixture(autouse=True, scope="module")
def report_worst(torch_slow_path):
    """Run on torch's plain path (conftest.py); print the worst errors seen at the end (pytest -s)."""
    yield
    for dtype, (err, what) in sorted(WORST.items()):
        print(f"\nworst refimpl-vs-torch error in {dtype}: {err:.2e} ({what})")
    for err, own, what in sorted(SLACK_USED, key=lambda item: -item[0] / item[1])[:3]:
        print(f"float32 beyond 1e-5 from torch float32; against torch float64 refimpl {err:.2e}, "
              f"torch float32 {own:.2e} ({what})")


# ---------------------------------------------------------------------------- comparison


SCORE_PATH = re.compile(r"(q_proj|k_proj)\.(weight|bias)$")


def error(ours, theirs, name, floors):
    """The metric of docs/DESIGN.md ("Correctness chain"), max|a - b| / max|b|, with a floor for gradients that flow
    only through the softmax.

    softmax_backward computes p * (g - sum(g * p)): its absolute rounding error scales with g,
    the gradient reaching the attention weights, which also makes the value path's gradient.
    Through the scores alone (q_proj, k_proj, and xq in cross-attention) a gradient may be 0 in
    exact arithmetic: always for k_proj.bias (q . b_k shifts a query's scores alike, softmax
    ignores it), and wherever each query sees a single key (S = 1, T = 1 causal). Such tensors
    are measured against max(their own scale, the value path's: v_proj.weight, or floors[name]).
    """
    floor = 1e-30
    if SCORE_PATH.search(name):
        floor = np.max(np.abs(theirs[SCORE_PATH.sub("v_proj.weight", name)]))
    elif name in floors:
        floor = np.max(np.abs(theirs[floors[name]]))
    a, b = np.asarray(ours[name], np.float64), np.asarray(theirs[name], np.float64)
    return float(np.max(np.abs(a - b), initial=0.0) / max(np.max(np.abs(b), initial=0.0), floor, 1e-30))


def assert_matches_torch(ours, run_torch, module, dtype, label, floors=None):
    """Compare ours {name: array} with run_torch(module) -> {name: array}, every tensor, worst error first.

    float64: each error <= 1e-10. float32: each error <= 1e-5, or, in an ill-conditioned case
    (post-LN over 3 features, say) where torch's own float32 result is that far from torch in
    float64, refimpl's float32 error against torch float64 (run_torch on a float64 copy of
    module: same weights, same inputs) may be up to SLACK times torch's own float32 noise level
    (its largest error over the module's tensors), as PyTorch's test suite measures long chains
    against a higher-precision reference.
    """
    floors = floors or {}
    module.zero_grad(set_to_none=True)  # run_torch accumulates into .grad
    reference_module = copy.deepcopy(module).double() if dtype == np.float32 else None
    theirs = run_torch(module)
    assert set(ours) == set(theirs), f"{label}: tensor names differ: {sorted(set(ours) ^ set(theirs))}"
    for name in theirs:
        assert np.shape(ours[name]) == np.shape(theirs[name]), f"{label}: {name} shapes differ"
    errors = {name: error(ours, theirs, name, floors) for name in theirs}
    tolerance = TOLERANCE[dtype]
    ok = {name: errors[name] <= tolerance for name in theirs}
    notes = dict.fromkeys(theirs, "")
    if reference_module is not None and not all(ok.values()):
        reference = run_torch(reference_module)
        # torch's own float32 error per tensor varies by luck (1.6e-6 on one gradient, 7.8e-6 on its neighbour
        # in one D = 3 case); the chain's float32 noise level is the largest of them.
        noise = max(error(theirs, reference, name, floors) for name in theirs)
        for name in theirs:
            own, ours_to_reference = error(theirs, reference, name, floors), error(ours, reference, name, floors)
            ok[name] = ok[name] or ours_to_reference <= SLACK * noise
            notes[name] = f" (vs torch float64: refimpl {ours_to_reference:.1e}, torch float32 {own:.1e})"
            if errors[name] > tolerance and ok[name]:
                SLACK_USED.append((ours_to_reference, own, f"{label}: {name}"))

    dtype_name = np.dtype(dtype).name
    worst = max(errors, key=lambda key: (np.nan_to_num(errors[key], nan=np.inf), key))
    if not errors[worst] <= WORST.get(dtype_name, (-1.0, ""))[0]:
        WORST[dtype_name] = (errors[worst], f"{label}: {worst}")
    if not all(ok.values()):
        lines = "\n".join(f"  {name}: {errors[name]:.3e}{notes[name]}"
                          for name in sorted(theirs, key=lambda n: -np.nan_to_num(errors[n], nan=np.inf)))
        pytest.fail(f"{label} ({dtype_name}) differs from torch beyond {tolerance:g}:\n{lines}")


def torch_gradient_tree(module, convert):
    """convert(copy of module whose parameters hold their .grad): torch's gradients in our parameter layout.

    The conversions only transpose, split and copy, so they map gradients exactly as they map weights.
    """
    clone = copy.deepcopy(module)
    with torch.no_grad():
        for theirs, mine in zip(clone.parameters(), module.parameters()):
            theirs.copy_(mine.grad if mine.grad is not None else torch.zeros_like(mine))
    return convert(clone)


def tensor(array, like=None, requires_grad=False):
    """numpy -> torch; floating arrays take the dtype of module `like` (float64 for the reference copy)."""
    t = torch.from_numpy(np.array(array))
    if like is not None and t.is_floating_point():
        t = t.to(next(like.parameters()).dtype)
    return t.requires_grad_(requires_grad)


def numpy(t):
    return t.detach().numpy()


def prefixed(prefix, tree):
    return {f"{prefix}.{key}": value for key, value in flatten(tree).items()}


def key_padding(rng, batch, length, padded, min_length=1):
    """torch's key_padding_mask [B, L] (True = padding), right padding, keys 0 .. min_length-1 always real."""
    lengths = rng.integers(min(min_length, length), length + 1, size=batch) if padded else np.full(batch, length)
    return np.arange(length)[None, :] >= lengths[:, None]


def time_major(t, batch_first):
    """[B, L, D] -> [L, B, D] for torch modules built with batch_first=False (and back)."""
    return t if batch_first else t.transpose(0, 1)


@st.composite
def sizes(draw):
    """B, T, S, D, H, F: tiny, with H drawn from the divisors of D (1 included)."""
    # D >= 3: LayerNorm over 1 or 2 features outputs (nearly) constants, its gradient is ~eps-small
    # cancellation noise and no relative error is meaningful.
    D = draw(st.integers(3, 16))
    H = draw(st.sampled_from([h for h in range(1, D + 1) if D % h == 0]))
    return {"B": draw(st.integers(1, 3)), "T": draw(st.integers(1, 6)), "S": draw(st.integers(1, 6)),
            "D": D, "H": H, "F": draw(st.integers(1, 16))}


# ---------------------------------------------------------------------------- multi-head attention


def check_mha(dtype, B, T, S, D, H, *, cross, mask_kind, padded, seed):
    """nn.MultiheadAttention vs mha_forward/mha_backward; mask_kind: none, causal (bool) or float (additive)."""
    rng = np.random.default_rng(seed)
    S = S if cross else T
    mha = randomize_torch(nn.MultiheadAttention(D, H, dropout=0.0, batch_first=True, dtype=TORCH_DTYPE[dtype]), rng)
    p = mha_params_from_torch(mha)
    xq = rng.normal(size=(B, T, D)).astype(dtype)
    xkv = rng.normal(size=(B, S, D)).astype(dtype) if cross else xq
    dy = rng.normal(size=(B, T, D)).astype(dtype)

    pad = key_padding(rng, B, S, padded)  # [B, S], True = padding
    keep = ~pad[:, None, None, :]  # ours: True = attend, [B, 1, 1, S]
    torch_pad = pad if padded else None
    if mask_kind == "causal":
        allowed = causal_mask(T, S)  # [T, S], key 0 always visible
        torch_mask, mask = ~allowed, keep & allowed[None, None]
    elif mask_kind == "float":
        bias = rng.normal(size=(T, S))
        bias[:, 1:][rng.random((T, S - 1)) < 0.3] = -np.inf  # some keys dropped, key 0 never
        torch_mask = bias.astype(dtype)
        mask = (np.where(pad, -np.inf, 0.0)[:, None, None, :] + bias[None, None]).astype(dtype)
        if padded:  # torch wants both masks of one type
            torch_pad = np.where(pad, -np.inf, 0.0).astype(dtype)
    else:
        torch_mask, mask = None, keep

    y, cache = mha_forward(p, xq, xkv, mask, n_heads=H)
    dxq, dxkv, dp = mha_backward(p, cache, dy)
    ours = {"y": y, "dxq": dxq + (0 if cross else dxkv), **prefixed("dp", dp)}  # self-attention: x feeds q, k, v
    if cross:
        ours["dxkv"] = dxkv

    def run_torch(module):
        tq = tensor(xq, module, requires_grad=True)
        tkv = tensor(xkv, module, requires_grad=True) if cross else tq
        ty, _ = module(tq, tkv, tkv, need_weights=False,
                       key_padding_mask=None if torch_pad is None else tensor(torch_pad, module),
                       attn_mask=None if torch_mask is None else tensor(torch_mask, module))
        ty.backward(tensor(dy, module))
        theirs = {"y": numpy(ty), "dxq": numpy(tq.grad),
                  **prefixed("dp", torch_gradient_tree(module, mha_params_from_torch))}
        if cross:
            theirs["dxkv"] = numpy(tkv.grad)
        return theirs

    assert_matches_torch(ours, run_torch, mha, dtype, f"mha H={H} cross={cross} mask={mask_kind} padded={padded}",
                         floors={"dxq": "dxkv"} if cross else None)


@pytest.mark.parametrize("dtype", DTYPES)
@given(n=sizes(), cross=st.booleans(), mask_kind=st.sampled_from(["none", "causal", "float"]),
       padded=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_mha_matches_torch(dtype, n, cross, mask_kind, padded, seed):
    check_mha(dtype, n["B"], n["T"], n["S"], n["D"], n["H"], cross=cross, mask_kind=mask_kind, padded=padded,
              seed=seed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H", [1, 4])
@pytest.mark.parametrize("cross, mask_kind", [(False, "causal"), (True, "none"), (True, "causal"), (False, "float")])
def test_mha_fixed_cases(dtype, H, cross, mask_kind):
    check_mha(dtype, 3, 5, 4, 8, H, cross=cross, mask_kind=mask_kind, padded=True, seed=H)


# ---------------------------------------------------------------------------- layers


def layer_kwargs(n, dtype, norm_first, activation, batch_first):
    return {"d_model": n["D"], "nhead": n["H"], "dim_feedforward": n["F"], "dropout": 0.0, "activation": activation,
            "norm_first": norm_first, "batch_first": batch_first, "dtype": TORCH_DTYPE[dtype]}


@pytest.mark.parametrize("dtype", DTYPES)
@given(n=sizes(), norm_first=st.booleans(), activation=st.sampled_from(["relu", "gelu"]), causal=st.booleans(),
       padded=st.booleans(), batch_first=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_encoder_layer_matches_torch(dtype, n, norm_first, activation, causal, padded, batch_first, seed):
    """TransformerEncoderLayer vs encoder_layer_*; causal, also vs our decoder-only layer (the same structure)."""
    rng = np.random.default_rng(seed)
    B, S, D = n["B"], n["S"], n["D"]
    kwargs = layer_kwargs(n, dtype, norm_first, activation, batch_first)
    layer = randomize_torch(nn.TransformerEncoderLayer(**kwargs), rng)
    cfg = Config(**config_from_torch_layer(layer))
    assert (cfg.norm_first, cfg.activation, cfg.dropout) == (norm_first, activation, 0.0)
    p = encoder_layer_params_from_torch(layer)
    x = rng.normal(size=(B, S, D)).astype(dtype)
    dy = rng.normal(size=(B, S, D)).astype(dtype)
    pad = key_padding(rng, B, S, padded)
    mask = ~pad[:, None, None, :]  # [B, 1, 1, S]
    if causal:
        mask = mask & causal_mask(S)[None, None]

    def run_torch(module):
        tx = tensor(x, module, requires_grad=True)
        ty = module(time_major(tx, batch_first), src_mask=tensor(~causal_mask(S)) if causal else None,
                    src_key_padding_mask=tensor(pad) if padded else None)
        time_major(ty, batch_first).backward(tensor(dy, module))
        return {"y": numpy(time_major(ty, batch_first)), "dx": numpy(tx.grad),
                **prefixed("dp", torch_gradient_tree(module, encoder_layer_params_from_torch))}

    label = f"encoder layer H={n['H']} norm_first={norm_first} {activation} causal={causal} padded={padded}"
    y, cache = encoder_layer_forward(p, x, mask, cfg)
    dx, dp = encoder_layer_backward(p, cache, dy, cfg)
    assert_matches_torch({"y": y, "dx": dx, **prefixed("dp", dp)}, run_torch, layer, dtype, label)
    if causal:  # the same layer as refimpl's decoder-only layer (decoder_layer_* without cross_attn)
        y, cache = decoder_layer_forward(p, x, mask, None, None, cfg)
        dx, dmemory, dp = decoder_layer_backward(p, cache, dy, cfg)
        assert dmemory is None
        assert_matches_torch({"y": y, "dx": dx, **prefixed("dp", dp)}, run_torch, layer, dtype,
                             "decoder-only " + label)


@pytest.mark.parametrize("dtype", DTYPES)
@given(n=sizes(), norm_first=st.booleans(), activation=st.sampled_from(["relu", "gelu"]), padded=st.booleans(),
       batch_first=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_decoder_layer_matches_torch(dtype, n, norm_first, activation, padded, batch_first, seed):
    """TransformerDecoderLayer (causal self-attention, target and memory padding) vs decoder_layer_*.

    At least 2 memory keys stay visible: with one, cross-attention's output does not depend on
    its query, and in pre-LN the whole cross_attn_norm gradient is rounding noise around 0.
    """
    rng = np.random.default_rng(seed)
    B, T, S, D = n["B"], n["T"], max(n["S"], 2), n["D"]
    kwargs = layer_kwargs(n, dtype, norm_first, activation, batch_first)
    layer = randomize_torch(nn.TransformerDecoderLayer(**kwargs), rng)
    cfg = Config(**config_from_torch_layer(layer))
    p = decoder_layer_params_from_torch(layer)
    x = rng.normal(size=(B, T, D)).astype(dtype)
    memory = rng.normal(size=(B, S, D)).astype(dtype)
    dy = rng.normal(size=(B, T, D)).astype(dtype)
    tgt_pad, src_pad = key_padding(rng, B, T, padded), key_padding(rng, B, S, padded, min_length=2)
    self_mask = causal_mask(T)[None, None] & ~tgt_pad[:, None, None, :]  # [B, 1, T, T]
    memory_mask = ~src_pad[:, None, None, :]  # [B, 1, 1, S]

    def run_torch(module):
        tx, tmemory = tensor(x, module, requires_grad=True), tensor(memory, module, requires_grad=True)
        ty = module(time_major(tx, batch_first), time_major(tmemory, batch_first), tgt_mask=tensor(~causal_mask(T)),
                    tgt_key_padding_mask=tensor(tgt_pad) if padded else None,
                    memory_key_padding_mask=tensor(src_pad) if padded else None)
        time_major(ty, batch_first).backward(tensor(dy, module))
        return {"y": numpy(time_major(ty, batch_first)), "dx": numpy(tx.grad), "dmemory": numpy(tmemory.grad),
                **prefixed("dp", torch_gradient_tree(module, decoder_layer_params_from_torch))}

    y, cache = decoder_layer_forward(p, x, self_mask, memory, memory_mask, cfg)
    dx, dmemory, dp = decoder_layer_backward(p, cache, dy, cfg)
    ours = {"y": y, "dx": dx, "dmemory": dmemory, **prefixed("dp", dp)}
    assert_matches_torch(ours, run_torch, layer, dtype,
                         f"decoder layer H={n['H']} norm_first={norm_first} {activation} padded={padded}")


# ---------------------------------------------------------------------------- whole models


class TorchSeq2Seq(nn.Module):
    """The classic model: token embedding * sqrt(D) + positions -> nn.Transformer -> Linear head.

    Positions are refimpl's sinusoidal table (a buffer) or learned tables src_pos / tgt_pos.
    """

    def __init__(self, V, D, H, F, n_encoder_layers, n_decoder_layers, *, norm_first, activation, share, tie,
                 head_bias, learned_positions=False, max_positions=16, batch_first=True, dtype=torch.float64):
        super().__init__()
        self.batch_first = batch_first
        self.tgt_embed = nn.Embedding(V, D, dtype=dtype)
        self.src_embed = self.tgt_embed if share else nn.Embedding(V, D, dtype=dtype)
        if learned_positions:
            self.src_pos = nn.Embedding(max_positions, D, dtype=dtype)
            self.tgt_pos = nn.Embedding(max_positions, D, dtype=dtype)
        else:
            self.register_buffer("pe", torch.tensor(sinusoidal_table(max_positions, D), dtype=dtype))
        self.transformer = nn.Transformer(D, H, n_encoder_layers, n_decoder_layers, F, dropout=0.0,
                                          activation=activation, norm_first=norm_first, batch_first=batch_first,
                                          dtype=dtype)
        self.generator = nn.Linear(D, V, bias=head_bias, dtype=dtype)
        if tie:
            self.generator.weight = self.tgt_embed.weight
        self.scale = math.sqrt(D)

    def embed(self, table, positions, ids):
        L = ids.shape[1]
        pos = self.pe[:L] if positions is None else positions(torch.arange(L))
        return time_major(table(ids) * self.scale + pos, self.batch_first)

    def forward(self, src, tgt, src_pad, tgt_pad):
        """src [B, S], tgt [B, T] ids; src_pad, tgt_pad: True = padding (torch's convention) -> logits [B, T, V]."""
        T = tgt.shape[1]
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)  # True = masked
        h = self.transformer(self.embed(self.src_embed, getattr(self, "src_pos", None), src),
                             self.embed(self.tgt_embed, getattr(self, "tgt_pos", None), tgt), tgt_mask=causal,
                             src_key_padding_mask=src_pad, tgt_key_padding_mask=tgt_pad,
                             memory_key_padding_mask=src_pad)
        return self.generator(time_major(h, self.batch_first))


class TorchLM(nn.Module):
    """Decoder-only: token embedding * sqrt(D) + sinusoidal positions -> nn.TransformerEncoder (causal) -> Linear."""

    def __init__(self, V, D, H, F, n_layers, *, norm_first, activation, final_norm, tie, head_bias,
                 max_positions=16, dtype=torch.float64):
        super().__init__()
        self.embed = nn.Embedding(V, D, dtype=dtype)
        self.register_buffer("pe", torch.tensor(sinusoidal_table(max_positions, D), dtype=dtype))
        layer = nn.TransformerEncoderLayer(D, H, F, dropout=0.0, activation=activation, norm_first=norm_first,
                                           batch_first=True, dtype=dtype)
        self.decoder = nn.TransformerEncoder(layer, n_layers, norm=nn.LayerNorm(D, dtype=dtype) if final_norm else None,
                                             enable_nested_tensor=False)
        self.lm_head = nn.Linear(D, V, bias=head_bias, dtype=dtype)
        if tie:
            self.lm_head.weight = self.embed.weight
        self.scale = math.sqrt(D)

    def forward(self, ids, pad):
        T = ids.shape[1]
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
        h = self.decoder(self.embed(ids) * self.scale + self.pe[:T], mask=causal, src_key_padding_mask=pad)
        return self.lm_head(h)


def token_batch(rng, V, B, L):
    """ids [B, L] and torch's padding mask (True = pad; right padding, first token real)."""
    pad = key_padding(rng, B, L, True)
    ids = rng.integers(0, V, size=(B, L))
    return np.where(pad, 0, ids), pad


def run_torch_model(*inputs, dlogits):
    """run_torch for a whole model: logits and every parameter gradient in our layout."""
    def run(model):
        logits = model(*(tensor(x) for x in inputs))
        logits.backward(tensor(dlogits, model))
        return {"logits": numpy(logits), **prefixed("d", torch_gradient_tree(model, lambda m: from_torch(m)[1]))}

    return run


SEQ2SEQ_CASES = [
    dict(norm_first=False, activation="relu", share=True, tie=True, head_bias=False),
    dict(norm_first=True, activation="gelu", share=False, tie=False, head_bias=True),
    dict(norm_first=False, activation="gelu", share=False, tie=True, head_bias=True, batch_first=False),
    dict(norm_first=True, activation="relu", share=True, tie=False, head_bias=False, learned_positions=True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SEQ2SEQ_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_seq2seq_model_matches_torch(dtype, case):
    """Embedding + positions + nn.Transformer + Linear vs model_forward / model_backward: logits and every gradient."""
    rng = np.random.default_rng(len(str(case)))
    V, D, H, F, B, S, T = 11, 8, 2, 12, 3, 6, 5
    model = randomize_torch(TorchSeq2Seq(V, D, H, F, 2, 2, dtype=TORCH_DTYPE[dtype], **case), rng)
    cfg, params = from_torch(model)
    assert (cfg.family, cfg.norm_first, cfg.activation, cfg.share_embeddings, cfg.tie_embeddings, cfg.lm_head_bias,
            cfg.dropout) == ("encoder-decoder", case["norm_first"], case["activation"], case["share"], case["tie"],
                             case["head_bias"], 0.0)
    src, src_pad = token_batch(rng, V, B, S)
    tgt, tgt_pad = token_batch(rng, V, B, T)
    dlogits = rng.normal(size=(B, T, V)).astype(dtype)

    logits, cache = model_forward(cfg, params, src, tgt, src_mask=~src_pad, tgt_mask=~tgt_pad)
    grads = model_backward(cfg, params, cache, dlogits)
    assert_matches_torch({"logits": logits, **prefixed("d", grads)},
                         run_torch_model(src, tgt, src_pad, tgt_pad, dlogits=dlogits), model, dtype, f"seq2seq {case}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_first, activation, final_norm, tie, head_bias", [
    (False, "relu", True, True, False), (True, "gelu", True, False, True), (True, "relu", False, True, True)])
def test_decoder_only_model_matches_torch(dtype, norm_first, activation, final_norm, tie, head_bias):
    """Embedding + positions + causal nn.TransformerEncoder + Linear vs the decoder-only family."""
    rng = np.random.default_rng(7)
    V, D, H, F, B, T = 13, 8, 4, 12, 3, 6
    model = randomize_torch(TorchLM(V, D, H, F, 2, norm_first=norm_first, activation=activation,
                                    final_norm=final_norm, tie=tie, head_bias=head_bias, dtype=TORCH_DTYPE[dtype]), rng)
    cfg, params = from_torch(model)
    assert (cfg.family, cfg.final_norm, cfg.n_encoder_layers) == ("decoder-only", final_norm, 0)
    ids, pad = token_batch(rng, V, B, T)
    dlogits = rng.normal(size=(B, T, V)).astype(dtype)

    logits, cache = model_forward(cfg, params, None, ids, tgt_mask=~pad)
    grads = model_backward(cfg, params, cache, dlogits)
    assert_matches_torch({"logits": logits, **prefixed("d", grads)}, run_torch_model(ids, pad, dlogits=dlogits),
                         model, dtype, f"decoder-only norm_first={norm_first} {activation} final_norm={final_norm} "
                                       f"tie={tie}")


# ---------------------------------------------------------------------------- layer norm with an optional bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_matches_torch(dtype, bias):
    """layer_norm_forward / _backward against F.layer_norm(x, (D,), weight, bias or None): y, dx, dweight, dbias."""
    from refformer.refimpl import layer_norm_backward, layer_norm_forward, rel_error

    rng = np.random.default_rng(11)
    x = (rng.standard_normal((3, 4, 6)) * 2.0 + rng.standard_normal((3, 4, 1))).astype(dtype)
    p = {"weight": (1.0 + 0.3 * rng.standard_normal(6)).astype(dtype)}
    if bias:
        p["bias"] = rng.standard_normal(6).astype(dtype)
    upstream = rng.standard_normal(x.shape).astype(dtype)
    y, cache = layer_norm_forward(p, x, 1e-5)
    dx, dp = layer_norm_backward(p, cache, upstream)
    assert set(dp) == set(p)

    tx = torch.tensor(x, requires_grad=True)
    tp = {name: torch.tensor(value, requires_grad=True) for name, value in p.items()}
    ty = torch.nn.functional.layer_norm(tx, (6,), tp["weight"], tp.get("bias"), 1e-5)
    ty.backward(torch.tensor(upstream))
    pairs = {"y": (y, ty), "dx": (dx, tx.grad), **{f"d{name}": (dp[name], tp[name].grad) for name in p}}
    errors = {name: rel_error(ours, theirs.detach().numpy()) for name, (ours, theirs) in pairs.items()}
    assert max(errors.values()) <= TOLERANCE[dtype], errors


# ---------------------------------------------------------------------------- a query whose keys are all masked


def test_fully_masked_queries_give_zeros_as_torch_sdpa():
    """torch 2.13: F.scaled_dot_product_attention gives a zero output (and zero gradients) for a query whose keys
    are all masked, with a boolean or an additive mask, as refimpl's attention_forward does. torch.softmax and
    nn.MultiheadAttention with need_weights=True (its default) give NaN there; need_weights=False gives finite
    output. These are the facts the README and the docstrings state."""
    from refformer.refimpl import attention_backward, attention_forward

    rng = np.random.default_rng(12)
    q, k, v = (rng.standard_normal(shape) for shape in [(1, 2, 3, 4), (1, 2, 5, 4), (1, 2, 5, 4)])
    keep = rng.random((1, 1, 3, 5)) < 0.6
    keep[..., 0, :] = False  # query 0 may attend to nothing
    keep[..., 1:, 0] = True
    out, cache = attention_forward(q, k, v, keep)
    dq, dk, dv = attention_backward(cache, np.ones_like(out))
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    for mask in (torch.tensor(keep), torch.tensor(np.where(keep, 0.0, -np.inf))):
        for a in (tq, tk, tv):
            a.grad = None
        theirs = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask)
        theirs.sum().backward()
        assert torch.all(theirs[..., 0, :] == 0)
        np.testing.assert_allclose(out, theirs.detach().numpy(), rtol=0, atol=1e-12)
        for ours, tensor in ((dq, tq), (dk, tk), (dv, tv)):
            np.testing.assert_allclose(ours, tensor.grad.numpy(), rtol=0, atol=1e-12)
    assert np.all(out[..., 0, :] == 0) and np.all(np.isfinite(out))

    assert torch.isnan(torch.softmax(torch.full((3,), -math.inf), dim=-1)).all()
    mha = nn.MultiheadAttention(4, 1, batch_first=True, dtype=torch.float64)
    x = torch.tensor(rng.standard_normal((1, 2, 4)))
    all_padding = torch.ones(1, 2, dtype=torch.bool)  # True = masked, in nn.MultiheadAttention
    with torch.no_grad():
        assert torch.isnan(mha(x, x, x, key_padding_mask=all_padding)[0]).all()  # need_weights=True by default
        assert torch.isfinite(mha(x, x, x, key_padding_mask=all_padding, need_weights=False)[0]).all()
