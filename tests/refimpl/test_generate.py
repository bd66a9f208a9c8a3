"""Greedy decoding with the KV cache (decoder_step) against argmax of repeated full model_forward calls."""

import numpy as np
import pytest

from refformer.refimpl import Config, init_params, model_forward
from refformer.refimpl.errors import RefformerError
from refformer.refimpl.generate import greedy, greedy_lm, strip


def _model(family, seed, eos_bias, **changes):
    cfg = Config(vocab_size=7, d_model=16, n_heads=2, d_ff=24, n_encoder_layers=2, n_decoder_layers=2,
                 family=family, max_positions=24, lm_head_bias=True, tie_embeddings=False, **changes)
    params = init_params(cfg, np.random.default_rng(seed), dtype=np.float64)
    params["lm_head"]["bias"][cfg.eos_id] = eos_bias  # rows should stop at different steps
    params["lm_head"]["bias"][cfg.pad_id] = -5.0
    return cfg, params


def _greedy_full(cfg, params, src, prefix, max_new_tokens):
    """One row, no cache: re-run the whole model on the growing sequence and take the last argmax."""
    seq, out = list(prefix), []
    for _ in range(max_new_tokens):
        src_ids = None if src is None else np.array([src])
        tgt_ids = np.array([seq])  # a generated pad id is a real token here, as in greedy's cache
        logits, _ = model_forward(cfg, params, src_ids, tgt_ids, tgt_mask=np.ones(tgt_ids.shape, bool))
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token == cfg.eos_id:
            break
        seq.append(token)
    return out


@pytest.mark.parametrize("norm_first", [False, True])
def test_greedy_matches_full_forward(norm_first):
    cfg, params = _model("encoder-decoder", 4, 2.5, norm_first=norm_first, positional="learned")
    rng = np.random.default_rng(4)
    rows = [list(rng.integers(4, 7, size=n)) + [cfg.eos_id] for n in (1, 3, 5, 2)]
    src = np.full((len(rows), 6), cfg.pad_id)
    for i, row in enumerate(rows):
        src[i, :len(row)] = row
    out = greedy(cfg, params, src, max_new_tokens=8)
    expected = [_greedy_full(cfg, params, row, [cfg.bos_id], 8) for row in rows]
    print("greedy:", out.tolist())
    assert out.shape[1] == max(len(e) for e in expected)
    for got, want in zip(out.tolist(), expected):
        assert got[:len(want)] == want
        assert all(t == cfg.pad_id for t in got[len(want):])
    assert any(len(e) < 8 for e in expected) and any(len(e) == 8 for e in expected), \
        "rows should stop at different steps, some at eos and some at max_new_tokens"
    assert strip(out, cfg) == [e[:-1] if e[-1] == cfg.eos_id else e for e in expected]


def test_greedy_lm_matches_full_forward_with_left_padding():
    cfg, params = _model("decoder-only", 4, 1.0)
    prompts = [[cfg.bos_id, 4, 5, 6], [cfg.bos_id, 6], [cfg.bos_id, 5, 5]]
    ids = np.full((3, 4), cfg.pad_id)
    for i, prompt in enumerate(prompts):
        ids[i, 4 - len(prompt):] = prompt  # left padding
    out = greedy_lm(cfg, params, ids, max_new_tokens=10)
    expected = [_greedy_full(cfg, params, None, prompt, 10) for prompt in prompts]
    print("greedy_lm:", out.tolist())
    for got, want in zip(out.tolist(), expected):
        assert got[:len(want)] == want
        assert all(t == cfg.pad_id for t in got[len(want):])
    assert len({len(e) for e in expected}) > 1, "rows should stop at different steps"


def test_budgets_and_errors():
    cfg, params = _model("decoder-only", 5, 0.5)
    params["lm_head"]["bias"][cfg.eos_id] = -100.0  # never stop
    out = greedy_lm(cfg, params, np.array([[cfg.bos_id, 4]]))
    assert out.shape == (1, cfg.max_positions - 1)  # the last token sits at position max_positions - 1
    assert greedy_lm(cfg, params, np.array([[cfg.bos_id]]), max_new_tokens=0).shape == (1, 0)
    with pytest.raises(RefformerError, match="left-padded"):
        greedy_lm(cfg, params, np.array([[cfg.bos_id, cfg.pad_id]]))
    with pytest.raises(RefformerError, match="encoder-decoder"):
        greedy(cfg, params, np.array([[4, 2]]))
