"""Weight quantization of an exported fp32 graph (issue 15): the int8 variant `refformer export --quantize` writes.

    quantize_graph("onnx/fp32/decoder.onnx", "onnx/int8/decoder.onnx", method="int8")

What "int8" means is chosen by measurement (benchmarks/generate_cpu_int8.py, benchmarks/RESULTS.md); the interface
stays. Today: ONNX Runtime's dynamic quantization (onnxruntime.quantization.quantize_dynamic) of every MatMul whose
weight is a constant [K, N] matrix, weights int8 per output channel (symmetric), activations quantized per call to
uint8 (MatMulInteger + DynamicQuantizeLinear). The tied output projection, which the exported graphs compute as
MatMul(x, Transpose(embed_tokens.weight)), first gets its own constant [D, V] weight so that it is quantized too (the
[D, V] head is a large share of a decoder step); the embedding Gather keeps the fp32 [V, D] table.
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

QUANTIZE_METHODS = ("int8",)  # the values of quantize_graph's method (and of `refformer export --quantize`)


def quantize_graph(src_path, dst_path, *, method="int8"):
    """Read the fp32 graph at src_path and write its quantized variant at dst_path, atomically.

    Input and output names, shapes and dtypes are untouched: the int8 graph takes and returns the same float32
    tensors (logits [B, T, V], caches [B, H, T, Dh]) and int64 ids as the fp32 one, so the same stepper runs it.
    Inside, each quantized MatMul's constant weight [K, N] becomes int8 with one float32 scale per output column N.

    dst_path is written through a temporary file in its own folder and renamed over it at the end: a failure leaves
    a file already there untouched (deciding whether it may be replaced is the caller's job). A source whose weights
    are external (PATH.data) gives a destination whose weights are external too, in DST.data beside it.

    Uses onnxruntime.quantization.quantize_dynamic (op_types_to_quantize=["MatMul"], per_channel=True,
    weight_type=QInt8). Raises RefformerError for a method not in QUANTIZE_METHODS, a src_path that is missing or
    not an ONNX graph, and dst_path equal to src_path or in a folder that does not exist.
    """
    if method not in QUANTIZE_METHODS:
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

    from onnxruntime.quantization import QuantType, quantize_dynamic

    # quantized in a private folder beside dst (same file system), then renamed: data file first, graph last
    work = Path(tempfile.mkdtemp(prefix=f".{dst_path.name}.", suffix=".tmp", dir=dst_path.parent))
    try:
        out = work / dst_path.name
        with quiet_root_logger():  # its "consider pre-processing" advice is for calibrated static quantization
            quantize_dynamic(model, out, op_types_to_quantize=["MatMul"], per_channel=True, reduce_range=False,
                             weight_type=QuantType.QInt8, use_external_data_format=external)
        if external:
            quantized = onnx.load(str(out))
            out.unlink()
            for leftover in work.iterdir():
                leftover.unlink()
            onnx.save_model(quantized, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=dst_path.name + ".data", size_threshold=1024)
            os.replace(work / (dst_path.name + ".data"), dst_path.parent / (dst_path.name + ".data"))
        os.replace(out, dst_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def untie_head(model):
    """Give every MatMul(x, Transpose(W)) of a constant W (the tied output projection) its own constant W^T, in
    place, so that weight quantization sees a constant [K, N] weight. A Transpose left unused is removed."""
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
    """ONNX Runtime's quantization tools log advice through the root logger (a `WARNING:root:` line on stderr):
    drop those records while they run."""
    root = logging.getLogger()
    previous = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(previous)
