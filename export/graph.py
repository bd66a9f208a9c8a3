"""A tiny ONNX graph builder: one small helper per op, each returning its output name.

Node names are paths derived from the parameter being used ("/decoder/layers.0/self_attn/q_proj/MatMul"),
initializer names are the checkpoint's dotted names, so a weight can be traced from NumPy to graph.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from refformer.refimpl.errors import RefformerError
from refformer.refimpl.tree import flatten

from .contract import DEFAULT_OPSET, FP16, FP32

FLOAT_TYPES = {FP32: TensorProto.FLOAT, FP16: TensorProto.FLOAT16}
NUMPY_TYPES = {FP32: np.float32, FP16: np.float16}
FP16_MAX = 65504.0  # float16's largest finite value
MICROSOFT = "com.microsoft"  # ONNX Runtime's contrib-op domain (the ops of export/fused.py)


def check_weights(params, dtype, source):
    """Raise RefformerError naming the first tensor of the parameter tree with a NaN or inf, or (dtype "fp16") with
    values beyond float16's range (FP16_MAX): a graph of that dtype cannot hold such a model, so it is neither
    exported nor verified. dtype None checks finiteness only; source names the model in the message."""
    for name, value in flatten(params).items():
        value = np.asarray(value)
        finite = np.isfinite(value)
        if not finite.all():
            raise RefformerError(f"{source}: {name} has {int(value.size - finite.sum())} non-finite values (NaN or "
                                 "inf); fix or retrain the model before exporting it")
        if dtype == FP16 and value.size and np.abs(value).max() > FP16_MAX:
            raise RefformerError(f"{source}: {name} has values up to {np.abs(value).max():.3g}, beyond float16's "
                                 f"range ({FP16_MAX:g}): use --dtype fp32")


def node_path(prefix):
    """"decoder.layers.0.self_attn" -> "/decoder/layers.0/self_attn" (layer indices stay with their list).

    Raises nothing.
    """
    parts = []
    for part in prefix.split("."):
        if part.isdigit() and parts:
            parts[-1] += "." + part
        elif part:
            parts.append(part)
    return "/" + "/".join(parts)


class Graph:
    """Collects nodes, initializers, inputs and outputs of one graph. dtype: "fp32" or "fp16" activations.

    Graph(name, dtype, opset) raises KeyError for a dtype other than fp32/fp16 (export_model checks it first).
    """

    def reduce_mean_last(self, x, at):
        """Mean over the last axis, keeping it (axes moved from attribute to input in opset 18).

        x and the output in its float type. Raises nothing.
        """
        if self.opset < 18:
            return self.op("ReduceMean", [x], at, axes=[-1], keepdims=1)
        return self.op("ReduceMean", [x, self.const([-1], "axes_last")], at, keepdims=1)

    def __init__(self, name, dtype=FP32, opset=DEFAULT_OPSET):
        self.name = name
        self.opset = opset
        self.dtype = dtype
        self.float_type = FLOAT_TYPES[dtype]
        self.nodes, self.inputs, self.outputs = [], [], []
        self.initializers = {}
        self.renames = {}  # node output -> graph output name
        self._names = set()

    # ------------------------------------------------------------ bookkeeping
    def op(self, op_type, inputs, at, *, name=None, n_outputs=1, unused=(), domain=None, **attributes):
        """Add a node named at/name (name defaults to op_type); returns its output name (or names).

        unused: indices of optional outputs left unnamed (ONNX Runtime then need not compute them).

        Raises nothing: onnx's helper.make_node checks the attributes' types only.
        """
        node_name = f"{at}/{name or op_type}"
        base, k = node_name, 1
        while node_name in self._names:  # the same op twice at one path: number it
            node_name, k = f"{base}_{k}", k + 1
        self._names.add(node_name)
        outputs = ["" if i in unused else f"{node_name}/output_{i}" for i in range(n_outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=node_name, domain=domain, **attributes))
        return outputs[0] if n_outputs == 1 else outputs

    def weight(self, name, array, dtype=None):
        """An initializer named by its checkpoint name, stored in the graph's float type (or dtype).

        Raises what np.asarray raises for an array that cannot be cast; the builders pass checked parameters.
        """
        if name not in self.initializers:
            target = NUMPY_TYPES[self.dtype] if dtype is None else dtype
            # np.asarray(order="C"), not np.ascontiguousarray, which would make a 0-d array 1-d
            self.initializers[name] = numpy_helper.from_array(np.asarray(array, dtype=target, order="C"), name)
        return name

    def const(self, value, name, dtype=np.int64):
        """A constant initializer (shapes, axes, scalars).

        Raises nothing: the builders pass their own constants.
        """
        return self.weight(f"const.{name}", np.asarray(value, dtype=dtype), dtype=dtype)

    def input(self, name, elem_type, shape):
        """A graph input (elem_type: a TensorProto type; shape: ints and axis names); returns its name.

        Raises nothing.
        """
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, source, name, elem_type, shape):
        """Expose source under the contract name: the producing node's output is renamed (an Identity node
        instead would make ONNX Runtime copy every cache tensor at every step).

        Raises nothing.
        """
        self.renames[source] = name
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def model(self, producer_version="0"):
        """The onnx.ModelProto (IR version 10 at most, com.microsoft opset 1 when a contrib op is used), its shapes
        inferred in strict mode: raises onnx's InferenceError for a graph whose shapes or types do not check."""
        for node in self.nodes:
            node.input[:] = [self.renames.get(name, name) for name in node.input]
            node.output[:] = [self.renames.get(name, name) for name in node.output]
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  initializer=list(self.initializers.values()))
        fused = any(n.domain == MICROSOFT for n in self.nodes)
        domains = [helper.make_opsetid(MICROSOFT, 1)] if fused else []
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)] + domains,
                                  producer_name="refformer", producer_version=producer_version)
        model.ir_version = min(model.ir_version, 10)  # readable by older onnxruntime builds too
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)

    # ------------------------------------------------------------ op helpers
    def cast(self, x, to, at, name="Cast"):
        """x cast to the TensorProto type to (a Cast node at/name).

        Raises nothing.
        """
        return self.op("Cast", [x], at, name=name, to=to)

    def to_float32(self, x, at, name="CastToFloat"):
        """Cast to float32 where accuracy needs it (a no-op graph-wise in fp32 graphs).

        Raises nothing.
        """
        return x if self.dtype == FP32 else self.cast(x, TensorProto.FLOAT, at, name)

    def to_graph_float(self, x, at, name="CastToGraphFloat"):
        """Cast a float32 x back to the graph's float type (a no-op graph-wise in fp32 graphs).

        Raises nothing.
        """
        return x if self.dtype == FP32 else self.cast(x, self.float_type, at, name)
