"""export/ops.py's builders, each as a one-function graph on both ONNX evaluators, against its refimpl/ops.py twin."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from refformer.export import ops as xops
from refformer.export.graph import Graph
from refformer.refimpl import Config, ops

from .graph_runner import FLOAT, check, dims, run_both


@given(B=dims, T=dims, D=st.sampled_from([2, 4, 8]), F=st.sampled_from([3, 8]), seed=st.integers(0, 2**16))
def test_linear(B, T, D, F, seed):
    rng = np.random.default_rng(seed)
    p = {"weight": rng.normal(size=(D, F)), "bias": rng.normal(size=F)}
    x = rng.normal(size=(B, T, D))
    g = Graph("linear")
    xops.linear(g, "lin", p, g.input("x", FLOAT, [B, T, D]))
    got = run_both(g, {"x": x.astype(np.float32)}, (B, T, F))
    check(ops.linear_forward(p, x)[0], *got)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
@given(B=dims, T=dims, D=st.sampled_from([1, 4, 16]), seed=st.integers(0, 2**16))
def test_norm(kind, B, T, D, seed):
    rng = np.random.default_rng(seed)
    cfg = Config(d_model=4, n_heads=1, norm=kind)
    p = {"weight": rng.normal(size=D)}
    if kind == "layernorm":
        p["bias"] = rng.normal(size=D)
    x = rng.normal(size=(B, T, D)) * 3 + 1
    g = Graph("norm")
    xops.norm(g, cfg, "norm", p, g.input("x", FLOAT, [B, T, D]))
    got = run_both(g, {"x": x.astype(np.float32)}, (B, T, D))
    check(ops.norm_forward(p, x, kind, cfg.norm_eps)[0], *got)


@pytest.mark.parametrize("kind", ["relu", "gelu", "gelu_tanh", "silu"])
@given(shape=st.tuples(dims, dims, dims), seed=st.integers(0, 2**16))
def test_activation(kind, shape, seed):
    x = np.random.default_rng(seed).normal(size=shape) * 3
    x.flat[0] = 1.5  # the max-norm metric needs one output of ordinary size: a lone x = -5 gives gelu ~ -1e-6,
    # which float32 computes as 0 by cancellation in 1 + tanh (a relative error of 1 on a meaningless scale)
    g = Graph("act")
    xops.activation(g, kind, g.input("x", FLOAT, list(shape)), "/act")
    got = run_both(g, {"x": x.astype(np.float32)}, shape)
    check(ops.activation_forward(x, kind)[0], *got)
