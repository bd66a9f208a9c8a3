"""export/session.py: a graph that fails while it runs raises, and ONNX Runtime prints no log line of its own on
stderr (the commands print one `error:` line for it)."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from refformer.export.session import make_session


def test_a_failing_run_prints_nothing_of_onnx_runtime(capfd):
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [None, None]) for name in ("a", "b")]
    graph = helper.make_graph([helper.make_node("Concat", ["a", "b"], ["c"], axis=1)], "g", inputs,
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [None, None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    session = make_session(model.SerializeToString())
    with pytest.raises(Exception, match="mismatched dimensions"):
        session.run(None, {"a": np.zeros((2, 2), np.float32), "b": np.zeros((3, 2), np.float32)})
    assert capfd.readouterr().err == ""
