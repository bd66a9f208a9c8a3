"""Run a one-function ONNX graph on onnx.reference.ReferenceEvaluator and ONNX Runtime CPU, and compare it with
its refimpl twin (float64 reference, fp32 graph: <= 1e-5, the fp32 bound of docs/DESIGN.md's correctness chain)."""

import onnx
import onnxruntime as ort
from hypothesis import strategies as st
from onnx import TensorProto
from onnx.reference import ReferenceEvaluator

from refformer.export.contract import CPU_PROVIDER, ERROR_BOUNDS
from refformer.refimpl.gradcheck import rel_error

FLOAT = TensorProto.FLOAT
BOUND = ERROR_BOUNDS["fp32"]
dims = st.integers(1, 4)


def finish(g, outputs=None, elem_type=FLOAT, shapes=None):
    """The model of a one-function graph: outputs (node output names; default the last node's) exposed as y0, y1, ...
    of the given shapes (None: left to shape inference, which does not know the com.microsoft ops)."""
    outputs = outputs or [g.nodes[-1].output[0]]
    for i, (name, shape) in enumerate(zip(outputs, shapes or [None] * len(outputs))):
        g.output(name, f"y{i}", elem_type, shape)
    model = g.model()
    onnx.checker.check_model(model, full_check=True)
    return model


def run_ort(model, feeds):
    """All outputs of model on ONNX Runtime CPU."""
    return ort.InferenceSession(model.SerializeToString(), providers=[CPU_PROVIDER]).run(None, feeds)


def run_both(g, feeds, output_shape, elem_type=FLOAT):
    """Finish a one-function graph (its last node's output is the result) and run it on both evaluators:
    (ReferenceEvaluator's result, ONNX Runtime's), each checked to have output_shape."""
    model = finish(g, None, elem_type)
    reference = ReferenceEvaluator(model).run(None, feeds)[0]
    runtime = run_ort(model, feeds)[0]
    assert reference.shape == tuple(output_shape) and runtime.shape == tuple(output_shape)
    return reference, runtime


def check(expected, *got, bound=BOUND):
    """Every result in got is within bound (rel_error) of expected."""
    errors = [rel_error(g, expected) for g in got]
    assert max(errors) <= bound, f"errors (ReferenceEvaluator, ORT): {errors}"
