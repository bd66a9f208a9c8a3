"""`refformer export`: write one export set (graphs + manifest.json) atomically, checked and measured.

The graphs come from export/model.py (and export/fused.py's variants); the folder they go to, and its manifest,
follow export/folder.py; the measurement is verify's export_checks. Dependencies run one way:
export -> verify -> folder, session, contract.
"""

import datetime
import errno
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import numpy as np
import onnx

from refformer.refimpl.errors import RefformerError, is_integer
from refformer.refimpl.io import WEIGHTS_FILE, current_umask, load, load_config

from .contract import (
    CPU_PROVIDER,
    DECODER_FILE,
    DEFAULT_OPSET,
    ERROR_BOUNDS,
    EXPORT_DTYPES,
    FUSED,
    MIN_OPSET,
    QUANTIZED_DTYPES,
    REFERENCE,
    check_exportable,
    check_variants_exportable,
    decoder_graph,
    exported_variants,
    graph_dtype,
    graph_file,
    graph_variant,
    reference_graphs,
)
from .folder import (
    CACHE_ADVICE,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    check_external_data,
    check_out_dir,
    check_path,
    default_export_dir,
    export_locations,
    export_name,
    file_hashes,
    is_folder,
    model_hashes,
    owner,
    recover_leftovers,
    remove_legacy_leftovers,
    replace_folder,
    same_export,
)
from .graph import check_weights
from .model import build_decoder_variant, build_reference_graph
from .quantize import QUANTIZE_METHODS, quantize_graph
from .session import check_native_path, import_onnxruntime
from .verify import export_checks

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # protobuf cannot hold 2 GB: bigger graphs keep weights beside them
SOURCE_FOLDER = ".source"  # inside an int8 export's temporary folder: the fp32 graphs it is quantized from


# ---------------------------------------------------------------------------- graphs


def save_graph(model, path, external_data=None):
    """Save one onnx.ModelProto at path; weights go to PATH.data beside it when external_data is True (or, with
    None, when they exceed EXTERNAL_DATA_THRESHOLD bytes). Raises what onnx.save_model raises (OSError)."""
    path = Path(path)
    if external_data is None:
        external_data = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    if external_data:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data",
                        size_threshold=1024)  # small constants stay inline for shape inference
        data = path.with_name(path.name + ".data")
        if data.exists():  # onnx writes it 0600: readable by whoever may read the graph beside it
            os.chmod(data, stat.S_IMODE(path.stat().st_mode))
    else:
        onnx.save_model(model, str(path))


def quantized_graph(name):
    """Whether a quantized (int8) export set quantizes the graph name: the decoders do; encoder.onnx stays in its
    source float type (fp32). The encoder runs once per input (the decoder once per token), and on the bundled
    model's test split a float32 encoder kept more greedy outputs equal to fp32's: 424 of 493 against 403 with both
    graphs quantized by quantize's dynamic int8 (as of 50ca1bc), 445 against 439 by its MatMulNBits 8-bit recipe
    (benchmarks/RESULTS.md, issue 15).

    Raises nothing: a comparison of names.
    """
    return graph_variant(name) is not None


def write_graph(model, folder, name, dtype, external_data=None):
    """Write graph name's model (an onnx.ModelProto of graph_dtype(dtype)) into folder as NAME.onnx, checked by onnx's
    full checker and check_external_data. For a quantized dtype (contract.QUANTIZED_DTYPES) a graph quantized_graph
    names is written into folder/.source first and quantize.quantize_graph's result (method: the dtype's name) goes in
    its place; the caller removes .source. Returns the written graph (onnx.ModelProto; a quantized one read back
    without external data), for the manifest.

    Raises what onnx.save_model raises (OSError), RefformerError (quantize_graph, check_external_data), and onnx's
    ValidationError for a graph the checker refuses (a bug of the builders).
    """
    path = Path(folder) / graph_file(name)
    if dtype in QUANTIZED_DTYPES and quantized_graph(name):
        source = Path(folder) / SOURCE_FOLDER / graph_file(name)
        source.parent.mkdir(exist_ok=True)
        save_graph(model, source, external_data)
        quantize_graph(source, path, method=dtype)
        written = None
    else:
        save_graph(model, path, external_data)
        written = model
    onnx.checker.check_model(str(path), full_check=True)
    check_external_data(path)
    return written if written is not None else onnx.load(str(path), load_external_data=False)


def quantization_record(dtype, graphs):
    """The manifest's "quantization" entry of a quantized export set: the method (quantize_graph's, named as the
    dtype), the float type of its inputs and outputs (the source graphs'), and the op types the quantized graphs
    hold that the source graphs do not (what the method is, read from the graphs: e.g. DynamicQuantizeLinear and
    MatMulInteger), and which graphs are quantized (quantized_graph). graphs: {name: (source onnx.ModelProto, written
    onnx.ModelProto)} of every graph of the set.

    Raises nothing.
    """
    names = [name for name in graphs if quantized_graph(name)]
    source_ops = {node.op_type for name in names for node in graphs[name][0].graph.node}
    ops = {node.op_type for name in names for node in graphs[name][1].graph.node}
    return {"method": dtype, "from": graph_dtype(dtype), "tool": "refformer.export.quantize.quantize_graph",
            "graphs": names, "ops_added": sorted(ops - source_ops)}


def io_spec(model):
    """{"inputs": [...], "outputs": [...]} of an onnx.ModelProto, each {"name", "shape" (ints or axis names),
    "dtype" (numpy's name: "int64", "float32", "float16")}, for the manifest.

    Raises nothing: model is a graph export_model built.
    """
    def spec(values):
        out = []
        for value in values:
            tensor_type = value.type.tensor_type
            shape = [d.dim_param if d.dim_param else d.dim_value for d in tensor_type.shape.dim]
            out.append({"name": value.name, "shape": shape,
                        "dtype": onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name})
        return out

    return {"inputs": spec(model.graph.input), "outputs": spec(model.graph.output)}


def versions():
    """The versions of refformer and the libraries that made and checked the graphs, for the manifest.

    Raises RefformerError (import_onnxruntime) when onnxruntime cannot be imported, and importlib.metadata's
    PackageNotFoundError when refformer is not installed.
    """
    onnxruntime = import_onnxruntime()
    from importlib.metadata import version

    return {"refformer": version("refformer"), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__}


def export_model(model_dir, out_dir=None, dtype="fp32", opset=DEFAULT_OPSET, external_data=None, measure=True,
                 static_length=None, fused_attention=False):
    """Export model_dir to out_dir (default: default_export_dir) through a temporary folder renamed into place.

    Returns the manifest. dtype: fp32, fp16, or int8: the fp32 graphs, the decoders quantized by
    quantize.quantize_graph (weights int8; inputs, outputs and caches stay float32; encoder.onnx stays fp32:
    quantized_graph), named as such in the manifest ("dtype": "int8" and
    "quantization": the method, the graphs quantized and the ops it adds); every decoder variant has an int8 twin.
    measure=True runs refformer verify's random-input check on ONNX
    Runtime CPU and records the error in the manifest. static_length adds decoder_static.onnx, the fixed-size-cache
    variant with in-graph argmax (for CUDA-graph replay), with that many cache slots. fused_attention adds
    decoder_fused.onnx: decoder.onnx's inputs and outputs, with ONNX Runtime's MultiHeadAttention contrib op;
    with static_length too, also decoder_static_mha.onnx (decoder_static.onnx's contract with contrib ops and
    fused norms) and, when the head size is a multiple of 8, decoder_static_fused.onnx (GroupQueryAttention
    over a cache updated in place, with kv_num_heads and rotary inside the node: the one that takes Llama / Qwen2
    imports). A contrib-op variant that does not compute the model (contract.variant_unsupported_features) is
    left out of the set; the export is refused when none of the asked ones does.

    Raises RefformerError for a bad option (a model_dir or out_dir that is not a path, flags that are not booleans),
    a model using options the graphs do not compute yet (contract.check_exportable: one line naming them, before any
    work; contract.check_variants_exportable when fused_attention asks for the contrib-op variants), an out_dir
    that check_out_dir refuses (its parent must exist, unless it is one of export_locations), weights with NaN or
    inf (or beyond float16's range for fp16), or (measure=True) a measured error that is not finite or beyond the
    dtype's bound (contract.ERROR_BOUNDS).
    Leftovers of killed exports in the target's parent folder are removed first (recover_leftovers).
    """
    check_path("model_dir", model_dir)
    if out_dir is not None:
        check_path("out_dir", out_dir)
    for name, value in (("fused_attention", fused_attention), ("measure", measure), ("external_data", external_data)):
        if not isinstance(value, (bool, np.bool_)) and not (name == "external_data" and value is None):
            raise RefformerError(f"{name} must be True or False{' (or None)' if name == 'external_data' else ''}, "
                                 f"got {value!r}")
    if is_integer(static_length):
        static_length = int(static_length)
    if is_integer(opset):  # np.int64(17) was refused as "must be between 17 and 28, got 17"
        opset = int(opset)
    if not isinstance(dtype, str) or dtype not in EXPORT_DTYPES:
        raise RefformerError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    if dtype in QUANTIZED_DTYPES and dtype not in QUANTIZE_METHODS:  # contract and quantize.py disagree: a bug
        raise RefformerError(f"--dtype {dtype}: export/quantize.py has no method of that name "
                             f"({', '.join(QUANTIZE_METHODS)}); please report it")
    newest = onnx.defs.onnx_opset_version()
    if not is_integer(opset) or not MIN_OPSET <= opset <= newest:
        raise RefformerError(f"--opset must be between {MIN_OPSET} (LayerNormalization) and {newest} "
                             f"(an integer), got {opset!r}")
    if static_length is not None and (not is_integer(static_length) or static_length < 1):
        raise RefformerError(f"--static-length must be a positive integer, got {static_length}")
    model_dir = Path(model_dir)
    check_exportable(load_config(model_dir), ids=False)  # a missing or bad model folder, or options the graphs
    # do not compute
    check_variants_exportable(load_config(model_dir), static_length, fused_attention)  # ... or a variant does not
    if out_dir is None:
        out_dir = default_export_dir(model_dir, dtype, static_length, fused_attention)
    out_dir = Path(out_dir)
    check_native_path(out_dir.absolute())  # the onnx checker takes its graphs by path
    own_places = export_locations(model_dir, export_name(dtype, static_length, fused_attention))
    own_place = out_dir in own_places
    if not own_place and not is_folder(out_dir.parent):  # the default places' folders are made as needed
        raise RefformerError(f"--out {out_dir}: folder {out_dir.parent} does not exist; create it first")
    check_out_dir(model_dir, out_dir, f"the export folder {out_dir}" if own_place else None)
    cfg, params = load(model_dir)
    check_weights(params, graph_dtype(dtype), model_dir / WEIGHTS_FILE)
    if static_length is not None and static_length > cfg.max_positions:
        raise RefformerError(f"--static-length must be between 1 and max_positions={cfg.max_positions}, "
                             f"got {static_length}")
    parent = out_dir.parent
    if os.path.lexists(parent) and not is_folder(parent):
        raise RefformerError(f"{parent} is a file, where the exports' folder belongs: remove it")
    remove_legacy_leftovers(model_dir)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        recover_leftovers(parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-{owner()}-", dir=parent))
    except OSError as error:
        raise RefformerError(f"cannot write an export into {parent} ({error.strerror}): " + (
            CACHE_ADVICE if own_place else "pick a writable --out DIR")) from None
    try:
        float_dtype = graph_dtype(dtype)  # an int8 set is built in fp32, then quantized (write_graph)
        graphs = {name: build_reference_graph(cfg, params, name, float_dtype, opset)  # graph name -> model
                  for name in reference_graphs(cfg.is_encoder_decoder)}
        variants = {}  # the faster decoders, each verified against decoder.onnx: graph name -> (variant, model)
        for variant in exported_variants(cfg, static_length, fused_attention):
            variants[decoder_graph(variant)] = variant, build_decoder_variant(cfg, params, variant, float_dtype,
                                                                              opset, static_length)
        graphs.update({name: model for name, (_, model) in variants.items()})
        manifest = {
            "format_version": MANIFEST_FORMAT,
            "family": cfg.family,
            "variant": REFERENCE,
            "dtype": dtype,
            "opset": opset,
            **model_hashes(model_dir),
            "graphs": {},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
        }
        written = {}
        for name, model in graphs.items():
            written[name] = model, write_graph(model, tmp, name, dtype, external_data)
            manifest["graphs"][name] = {"file": graph_file(name), **io_spec(written[name][1])}
        if dtype in QUANTIZED_DTYPES:
            shutil.rmtree(tmp / SOURCE_FOLDER)
            manifest["quantization"] = quantization_record(dtype, written)
        del written
        for name, (variant, _) in variants.items():
            static = {} if variant == FUSED else {"max_length": static_length}
            manifest["graphs"][name].update(variant=variant, **static, verified_against=DECODER_FILE)
        if measure:
            try:
                rows = export_checks(cfg, params, tmp, dtype, variants)
            except RefformerError as error:
                if opset > MIN_OPSET and str(error).startswith("ONNX Runtime cannot load"):  # e.g. opset 27 on ORT 1.31
                    raise RefformerError(f"ONNX Runtime {import_onnxruntime().__version__} cannot load opset "
                                         f"{opset} graphs; pass a lower --opset (17 loads everywhere); nothing "
                                         "was written") from None
                raise
            worst = max(row["error"] for row in rows)
            if not np.isfinite(worst):
                bad = next(row for row in rows if not np.isfinite(row["error"]))
                raise RefformerError(f"the exported graphs give non-finite outputs ({bad['output']}: {bad['error']}); "
                                     "nothing was written")
            if worst > ERROR_BOUNDS[dtype]:  # graphs that do not compute the model: never written, never used
                bad = max(rows, key=lambda row: row["error"])
                advice = ("use --dtype fp32" if dtype != "fp32"  # (generate and eval too: the fp32 set may exist)
                          else "please report it with the model's config.json")
                raise RefformerError(f"the exported graphs differ from refimpl by {worst:.2e} ({bad['check']}: "
                                     f"{bad['output']}), beyond the {dtype} bound {ERROR_BOUNDS[dtype]:.0e}; nothing "
                                     f"was written: {advice}")
            per_output = {(row["output"] if row["check"] == "random" else f"{row['check']}: {row['output']}"):
                          row["error"] for row in rows}
            manifest["error"] = {"provider": CPU_PROVIDER, "bound": ERROR_BOUNDS[dtype], "max": worst,
                                 "per_output": per_output}
        manifest["files"] = file_hashes(tmp, [entry.name for entry in tmp.iterdir()])
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes a 0700 folder
        if same_export(out_dir, manifest):  # a concurrent first run wrote the same export: keep its folder
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            replace_folder(tmp, out_dir)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise RefformerError(f"cannot write the export into {parent} ({error.strerror}); nothing was written: "
                                 "free some space, or pass `refformer export` an --out DIR elsewhere") from None
        raise
    return manifest


