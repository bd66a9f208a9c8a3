"""ONNX twins of refimpl/ops.py: linear, the norms, the activations and the embedding lookup.

Each builder takes the Graph g, the dotted prefix of its parameters (which is also its node path, see
graph.node_path), the parameter subtree and its input names, and returns the name of its output. Only inference
is exported: dropout is the identity. Shapes are those of the refimpl twin; activations are in the graph's float
type (g.dtype: float32 or float16) unless a docstring says otherwise.
"""

import math

import numpy as np

from .graph import node_path


def linear(g, prefix, p, x):
    """Twin of refimpl.ops.linear_forward: y = x @ W + b. x [..., D_in] -> y [..., D_out].

    x ──MatMul(W)──Add(b)──▶ y

    p: {"weight" [D_in, D_out], "bias" [D_out] (optional)}, stored as initializers PREFIX.weight, PREFIX.bias.

    x, W, b and y in g's float type. No checks: reached only through export_model, which loads a checked cfg and params.
    """
    at = node_path(prefix)
    y = g.op("MatMul", [x, g.weight(f"{prefix}.weight", p["weight"])], at)
    if "bias" in p:
        y = g.op("Add", [y, g.weight(f"{prefix}.bias", p["bias"])], at)
    return y


def layer_norm(g, prefix, p, x, eps):
    """Twin of refimpl.ops.layer_norm_forward: LayerNormalization over the last axis D (opset 17), x [..., D] -> y.

    Statistics in float32 (stash_type=1) even in fp16 graphs. p: {"weight" [D], "bias" [D]}; eps a float.

    x, p and y in g's float type. No checks: reached only through export_model, which loads a checked cfg and params.
    """
    at = node_path(prefix)
    weight, bias = g.weight(f"{prefix}.weight", p["weight"]), g.weight(f"{prefix}.bias", p["bias"])
    return g.op("LayerNormalization", [x, weight, bias], at, axis=-1, epsilon=float(eps), stash_type=1)


def rms_norm(g, prefix, p, x, eps):
    """Twin of refimpl.ops.rms_norm_forward: x / sqrt(mean(x^2) + eps) * weight over the last axis, in float32
    (Zhang & Sennrich 2019). x [..., D] -> y [..., D]; p: {"weight" [D]}.

    x ─Cast─┬─Pow(2)─ReduceMean─Add(eps)─Sqrt─┐
            └──────────────────────────────Div─Cast─Mul(weight)─▶ y

    Pow(x, 2) rather than Mul(x, x) (the same float32 values): it is the pattern ONNX Runtime's graph optimizer fuses
    into one SimplifiedLayerNormalization node at session creation (six nodes become one; checked by
    tests/export/test_imported_speed_graph.py).

    x, p and y in g's float type (float32 inside). No checks: reached only through export_model, which loads a checked
    cfg and params.
    """
    at = node_path(prefix)
    x32 = g.to_float32(x, at)
    mean_square = g.reduce_mean_last(g.op("Pow", [x32, g.const(2.0, "two", np.float32)], at), at)
    rms = g.op("Sqrt", [g.op("Add", [mean_square, g.const(eps, "rms_eps", np.float32)], at)], at)
    xhat = g.to_graph_float(g.op("Div", [x32, rms], at), at)
    return g.op("Mul", [xhat, g.weight(f"{prefix}.weight", p["weight"])], at)


def norm(g, cfg, prefix, p, x):
    """Twin of refimpl.ops.norm_forward: layer_norm or rms_norm as cfg.norm says, with cfg.norm_eps.

    No checks: reached only through export_model, which loads a checked cfg and params.
    """
    if cfg.norm == "layernorm":
        return layer_norm(g, prefix, p, x, cfg.norm_eps)
    return rms_norm(g, prefix, p, x, cfg.norm_eps)


def scalar(g, value, name):
    """A scalar initializer "scalar.NAME" in the graph's float type.

    Raises nothing: value is one of the builders' own constants.
    """
    return g.weight(f"scalar.{name}", np.asarray(value))


def activation(g, kind, x, at):
    """Twin of refimpl.ops.activation_forward, elementwise at node path at:
    relu: Relu; gelu: 0.5 x (1 + Erf(x / sqrt 2)); gelu_tanh: 0.5 x (1 + Tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
    (Hendrycks & Gimpel 2016); silu: x Sigmoid(x).

    x and y in g's float type, any shape. No checks: reached only through export_model, which loads a checked cfg and
    params. (an unknown kind builds gelu_tanh)
    """
    if kind == "relu":
        return g.op("Relu", [x], at)
    if kind == "silu":
        return g.op("Mul", [x, g.op("Sigmoid", [x], at)], at)
    if kind == "gelu":
        inner = g.op("Erf", [g.op("Mul", [x, scalar(g, 1.0 / math.sqrt(2.0), "inv_sqrt2")], at)], at)
    else:
        cube = g.op("Mul", [g.op("Mul", [x, x], at), x], at)
        poly = g.op("Add", [x, g.op("Mul", [cube, scalar(g, 0.044715, "gelu_c")], at)], at)
        inner = g.op("Tanh", [g.op("Mul", [poly, scalar(g, math.sqrt(2.0 / math.pi), "sqrt_2_over_pi")], at)], at)
    half_x = g.op("Mul", [x, scalar(g, 0.5, "half")], at)
    return g.op("Mul", [half_x, g.op("Add", [inner, scalar(g, 1.0, "one")], at)], at)


def embedding(g, weight_name, table, ids, at, name):
    """Twin of refimpl.ops.embedding_forward: rows of table [N, D] (initializer weight_name) at ids [B, T] int64
    -> [B, T, D], one Gather node named at/name.

    Output in table's initializer type (g's float type). No checks: reached only through export_model, which loads a
    checked cfg and params.
    """
    return g.op("Gather", [g.weight(weight_name, table), ids], at, name=name)
