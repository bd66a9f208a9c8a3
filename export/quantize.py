"""Weight quantization of an exported fp32 graph (issue 15): the int8 sets `refformer export --dtype int8` writes.

    quantize_graph("onnx/fp32/decoder.onnx", "onnx/int8/decoder.onnx", method="int8")

What "int8" means was chosen by measurement (benchmarks/generate_cpu_int8.py; figures in benchmarks/RESULTS.md):
ONNX Runtime's dynamic quantization (onnxruntime.quantization.quantize_dynamic) of every MatMul whose weight is a
constant [K, N] matrix: int8 weights with one float32 scale per output column N (symmetric, per channel), the
activations quantized to uint8 at run time with one scale and zero point per tensor (DynamicQuantizeLinear +
MatMulInteger, which the ONNX Runtime CPU session fuses into DynamicQuantizeMatMul). Because that activation scale
is per tensor, a row's int8 result depends a little on the other rows of its batch (fp32 results do not). The tied
output projection, which the exported graphs compute as MatMul(x, Transpose(embed_tokens.weight)), first gets its
own constant [D, V] weight so that it is quantized too (the [D, V] head is a large share of a decoder step); the
embedding Gather keeps the fp32 [V, D] table. The attention products (Q K^T, P V) stay fp32.

ALTERNATIVES holds the recipes measured against it (not offered by `export --dtype`): ONNX Runtime's MatMulNBits
contrib op with 8-bit weights in blocks of 32 or 128 along K (accuracy_level 4: activations quantized to int8 per
row and block, so rows are independent), the same at accuracy_level 1 (fp32 compute), and 4-bit blocks of 32.
"""

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from refformer.refimpl.errors import RefformerError

from .contract import LOGITS

# method -> recipe; QUANTIZE_METHODS are the values of quantize_graph's method (and of `refformer export --dtype`)
RECIPES = {"int8": dict(kind="dynamic")}
QUANTIZE_METHODS = tuple(RECIPES)
ALTERNATIVES = {
    "int8-blocks32": dict(kind="blocks", bits=8, block_size=32, accuracy_level=4),
    "int8-blocks32-fp32": dict(kind="blocks", bits=8, block_size=32, accuracy_level=1),  # fp32 compute
    "int8-blocks128": dict(kind="blocks", bits=8, block_size=128, accuracy_level=4),
    "int4-blocks32": dict(kind="blocks", bits=4, block_size=32, accuracy_level=4),
}
# recipe kind -> the op types a graph it quantized holds, any one of these sets (read by verify): quantize_dynamic
# writes DynamicQuantizeLinear + MatMulInteger, which ONNX Runtime's optimizer fuses into DynamicQuantizeMatMul (a
# graph saved after it ran); MatMulNBitsQuantizer writes MatMulNBits
SIGNATURE_OPS = {"dynamic": ({"DynamicQuantizeLinear", "MatMulInteger"}, {"DynamicQuantizeMatMul"}),
                 "blocks": ({"MatMulNBits"},)}
# the op types of ONNX and ONNX Runtime's com.microsoft domain that compute on quantized tensors: a float (fp32,
# fp16) graph of refformer's holds none of them
QUANTIZED_OPS = frozenset({"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat",
                           "MatMulNBits", "QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "QGemm",
                           "QAttention", "QOrderedMatMul", "GatherBlockQuantized", "MatMulBnb4", "MatMulFpQ4",
                           "ConvInteger", "QLinearConv"})


def quantize_graph(src_path, dst_path, *, method="int8"):
    """Read the fp32 graph at src_path and write its quantized variant at dst_path, atomically.

    Input and output names, shapes and dtypes are untouched: the int8 graph takes and returns the same float32
    tensors (logits [B, T, V], caches [B, H, T, Dh]) and int64 ids as the fp32 one, so the same stepper runs it.
    Inside, each constant MatMul weight [K, N] becomes int8 (see the module docstring for the recipe).

    dst_path is written through a temporary folder beside it and renamed over it at the end: a failure leaves a
    file already there untouched (deciding whether it may be replaced is the caller's job). A source whose weights
    are external (PATH.data) gives a destination whose weights are external too, in DST.data beside it.

    Uses onnxruntime.quantization.quantize_dynamic (after onnxruntime.tools.symbolic_shape_infer for graphs with
    com.microsoft ops); the ALTERNATIVES use its MatMulNBitsQuantizer (which needs the onnx-ir package). Raises
    RefformerError for a method not in QUANTIZE_METHODS (or ALTERNATIVES), a src_path that is missing or not an
    ONNX graph, dst_path equal to src_path or in a folder that does not exist, and (ALTERNATIVES) onnx-ir missing.
    """
    recipe = RECIPES.get(method) or ALTERNATIVES.get(method)
    if recipe is None:
        raise RefformerError(f"method {method!r} is not a quantization method refformer knows; use one of "
                             f"{', '.join(QUANTIZE_METHODS)}")
    src_path, dst_path = Path(src_path), Path(dst_path)
    if not src_path.is_file():
        raise RefformerError(f"{src_path} is missing: give the fp32 graph of an export (run `refformer export`)")
    if dst_path.resolve() == src_path.resolve():
        raise RefformerError(f"the destination {dst_path} is the source graph: give another file name")
    if not dst_path.parent.is_dir():
        raise RefformerError(f"the folder of the destination {dst_path} does not exist: create it first")
    try:
        model = onnx.load(str(src_path))
    except Exception as error:  # protobuf's DecodeError, a missing external data file ...
        raise RefformerError(f"cannot load {src_path}: not a valid ONNX graph ({error})") from None
    external = any(t.data_location == onnx.TensorProto.EXTERNAL
                   for t in onnx.load(str(src_path), load_external_data=False).graph.initializer)
    untie_head(model)

    # written in a private folder beside dst (same file system), then renamed: data file first, graph last
    work = Path(tempfile.mkdtemp(prefix=f".{dst_path.name}.", suffix=".tmp", dir=dst_path.parent))
    try:
        out = work / dst_path.name
        with quiet_root_logger():  # their advice ("consider pre-processing", opset notes) is not for our users
            if recipe["kind"] == "dynamic":
                quantize_dynamic(model, out, external)
            else:
                quantize_blocks(model, out, external, recipe)
        if external:
            os.replace(work / (dst_path.name + ".data"), dst_path.parent / (dst_path.name + ".data"))
        os.replace(out, dst_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def signature_ops(method):
    """The op-type sets that show a graph quantized by method (a QUANTIZE_METHODS or ALTERNATIVES name), any one of
    which such a graph holds: SIGNATURE_OPS of its recipe's kind, as a tuple of frozensets; () for an unknown method.

    Raises nothing.
    """
    recipe = RECIPES.get(method) or ALTERNATIVES.get(method)
    return tuple(frozenset(ops) for ops in SIGNATURE_OPS[recipe["kind"]]) if recipe else ()


def graph_op_types(path):
    """The set of op types of the nodes of the ONNX graph at path (its weights, internal or external, not read).

    Raises RefformerError for a file that is missing or not an ONNX graph.
    """
    return graph_types(path)[0]


FLOAT_TYPE_NAMES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                    onnx.TensorProto.DOUBLE: "float64", onnx.TensorProto.BFLOAT16: "bfloat16"}


def graph_types(path):
    """(op types, float types) of the ONNX graph at path, read in one load (its weights, internal or external, not
    read): the set of its nodes' op types, and the set of the element types ("float32", "float16", "float64",
    "bfloat16") of its float inputs and outputs other than logits (float32 in every set, contract.LOGITS): the
    export's float type, {"float32"} in fp32 and int8 sets, {"float16"} in fp16 ones (verify's check_quantization).

    Raises RefformerError for a file that is missing or not an ONNX graph.
    """
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError, OSError ...
        raise RefformerError(f"cannot load {path}: not a valid ONNX graph ({error})") from None
    floats = {FLOAT_TYPE_NAMES[value.type.tensor_type.elem_type]
              for value in [*model.graph.input, *model.graph.output]
              if value.name != LOGITS and value.type.tensor_type.elem_type in FLOAT_TYPE_NAMES}
    return {node.op_type for node in model.graph.node}, floats


def quantize_blocks(model, out, external, recipe):
    """MatMulNBits (com.microsoft) for every constant-weight MatMul of model, written at out (weights in
    OUT.data when external). recipe: bits (4 or 8), block_size (along K), accuracy_level (4: int8 compute)."""
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ModuleNotFoundError as error:
        raise RefformerError(f"ONNX Runtime's weight quantizer needs the {error.name} package: pip install "
                             f"{error.name.replace('_', '-')}") from None
    quantizer = MatMulNBitsQuantizer(model, bits=recipe["bits"], block_size=recipe["block_size"], is_symmetric=True,
                                     accuracy_level=recipe["accuracy_level"], op_types_to_quantize=("MatMul",))
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), external)


def quantize_dynamic(model, out, external):
    """onnxruntime.quantization.quantize_dynamic of every constant-weight MatMul (int8 weights per output channel),
    written at out (weights in OUT.data when external)."""
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as quantize

    if any(node.domain not in ("", "ai.onnx") for node in model.graph.node):
        # onnx's shape inference, which quantize_dynamic runs, gives no types past com.microsoft ops
        # (MultiHeadAttention ...): ONNX Runtime's symbolic shape inference knows them
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        for node in model.graph.node:  # it fails on an optional output left unnamed (SkipLayerNormalization's)
            while node.output and not node.output[-1]:
                node.output.pop()
            for i, name in enumerate(node.output):
                if not name:
                    node.output[i] = f"{node.name}/unused_output_{i}"
        model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    quantize(model, out, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=False,
             weight_type=QuantType.QInt8, use_external_data_format=external)
    if external:  # quantize_dynamic names the data file after a temporary of its own: one file, OUT.data
        quantized = onnx.load(str(out))
        for leftover in out.parent.iterdir():
            leftover.unlink()
        onnx.save_model(quantized, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=out.name + ".data", size_threshold=1024)


def untie_head(model):
    """Give every MatMul(x, Transpose(W)) of a constant 2-D W (the tied output projection) its own constant W^T,
    in place, so that weight quantization sees a constant [K, N] weight. A Transpose left unused is removed."""
    initializers = {t.name: t for t in model.graph.initializer}
    rewired = []
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in list(model.graph.node):
        if node.op_type != "MatMul" or node.input[1] not in producers:
            continue
        transpose = producers[node.input[1]]
        if transpose.op_type != "Transpose" or transpose.input[0] not in initializers:
            continue
        perm = [a.ints for a in transpose.attribute if a.name == "perm"]
        weight = numpy_helper.to_array(initializers[transpose.input[0]])
        if weight.ndim != 2 or (perm and list(perm[0]) != [1, 0]):
            continue
        name = transpose.input[0] + ".T"
        if name not in initializers:
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), name))
            initializers[name] = model.graph.initializer[-1]
        node.input[1] = name
        rewired.append(transpose)
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    for transpose in rewired:
        if transpose in model.graph.node and not any(out in used for out in transpose.output):
            model.graph.node.remove(transpose)


@contextlib.contextmanager
def quiet_root_logger():
    """ONNX Runtime's quantization tools log advice through the root logger (a `WARNING:root:` line on stderr), and
    matmul_nbits_quantizer's import calls logging.basicConfig(level=INFO) (a line per node): while they run the
    root logger drops everything below ERROR, and its handlers and level are restored afterwards."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    root.setLevel(logging.ERROR)
    try:
        with contextlib.suppress(ModuleNotFoundError):  # quantize_blocks says what is missing
            import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401  (its basicConfig, here)
        root.setLevel(logging.ERROR)
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
