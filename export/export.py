"""`refformer export`: write MODEL_DIR/onnx/ (graphs + manifest.json) atomically, checked and measured."""

import datetime
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx

from refformer.refimpl.errors import RefformerError
from refformer.refimpl.io import CONFIG_FILE, WEIGHTS_FILE, current_umask, load, read_json, sha256

from .model import build_decoder, build_decoder_static, build_decoder_static_fused, build_encoder

MANIFEST_FORMAT = 1
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # protobuf cannot hold 2 GB: bigger graphs keep weights beside them
DTYPES = ("fp32", "fp16")


def model_hashes(model_dir):
    """sha256 of config.json and model.safetensors: what the manifest records to detect a stale export."""
    model_dir = Path(model_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (model_dir / name).is_file():
            raise RefformerError(f"{model_dir / name} is missing")
    return {"config_sha256": sha256(model_dir / CONFIG_FILE), "weights_sha256": sha256(model_dir / WEIGHTS_FILE)}


def graph_files(cfg):
    return ["encoder.onnx", "decoder.onnx"] if cfg.is_encoder_decoder else ["decoder.onnx"]


def save_graph(model, path, external_data=None):
    """Save one graph; weights go to PATH.data beside it when external_data is True (or the graph is too big)."""
    path = Path(path)
    if external_data is None:
        external_data = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    if external_data:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)  # small constants stay inline for shape inference
    else:
        onnx.save_model(model, str(path))


def check_external_data(path):
    """Every external-data location of the graph at path must be a relative path inside its folder."""
    path = Path(path)
    folder = path.parent.resolve()
    if not path.is_file():
        raise RefformerError(f"{path} is missing: run `refformer export`")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and friends
        raise RefformerError(f"cannot load {path}: not a valid ONNX file ({error})") from None
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = {entry.key: entry.value for entry in tensor.external_data}.get("location", "")
        target = (folder / location).resolve()
        if os.path.isabs(location) or folder not in target.parents:
            raise RefformerError(f"{path}: external data of {tensor.name} points outside the model folder ({location!r})")
        if not target.is_file():
            raise RefformerError(f"{path}: external data file {location!r} of {tensor.name} is missing")


def io_spec(model):
    """Input/output names, shapes (ints or axis names) and element types, for the manifest."""
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
    import onnxruntime
    from importlib.metadata import version

    return {"refformer": version("refformer"), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__}


def export_model(model_dir, out_dir=None, dtype="fp32", opset=17, external_data=None, measure=True, static_length=None,
                 fused_attention=False):
    """Export model_dir to out_dir (default model_dir/onnx) through a temporary folder renamed into place.

    Returns the manifest. measure=True runs refformer verify's random-input check on ONNX Runtime CPU
    and records the error in the manifest. static_length adds decoder_static.onnx, the fixed-size-cache
    variant with in-graph argmax (for CUDA-graph replay), with that many cache slots. fused_attention adds
    decoder_fused.onnx: decoder.onnx's inputs and outputs, with ONNX Runtime's MultiHeadAttention contrib op;
    with static_length too, also decoder_static_mha.onnx (decoder_static.onnx's contract with contrib ops and
    fused norms) and, when the head size is a multiple of 8, decoder_static_fused.onnx (GroupQueryAttention
    over a cache updated in place).
    """
    if dtype not in DTYPES:
        raise RefformerError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if not isinstance(opset, int) or not 17 <= opset <= onnx.defs.onnx_opset_version():
        raise RefformerError(f"--opset must be between 17 (LayerNormalization) and {onnx.defs.onnx_opset_version()}, got {opset}")
    model_dir = Path(model_dir)
    cfg, params = load(model_dir)
    if static_length is not None and not (isinstance(static_length, int) and 1 <= static_length <= cfg.max_positions):
        raise RefformerError(f"--static-length must be between 1 and max_positions={cfg.max_positions}, got {static_length}")
    static_mha = static_length is not None and fused_attention
    static_fused = static_mha and cfg.head_dim % 8 == 0  # GroupQueryAttention's kernels need it
    out_dir = Path(out_dir) if out_dir is not None else model_dir / "onnx"
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    except OSError as error:
        raise RefformerError(f"output folder {parent} is not writable ({error.strerror}); pass --out DIR") from None
    try:
        graphs = {"decoder.onnx": build_decoder(cfg, params, dtype, opset)}
        if cfg.is_encoder_decoder:
            graphs = {"encoder.onnx": build_encoder(cfg, params, dtype, opset), **graphs}
        variants = {}  # the faster decoders, each verified against decoder.onnx: graph name -> (variant, model)
        if static_length is not None:
            variants["decoder_static"] = "static", build_decoder_static(cfg, params, dtype, opset, static_length)
        if fused_attention:
            variants["decoder_fused"] = "fused", build_decoder(cfg, params, dtype, opset, fused=True)
        if static_mha:
            variants["decoder_static_mha"] = "static_mha", build_decoder_static_fused(cfg, params, dtype, opset,
                                                                                      static_length, in_place=False)
        if static_fused:
            variants["decoder_static_fused"] = "static_fused", build_decoder_static_fused(cfg, params, dtype, opset,
                                                                                          static_length)
        graphs.update({f"{name}.onnx": model for name, (_, model) in variants.items()})
        manifest = {
            "format_version": MANIFEST_FORMAT,
            "family": cfg.family,
            "variant": "reference",
            "dtype": dtype,
            "opset": opset,
            **model_hashes(model_dir),
            "graphs": {},
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(),
        }
        for name, model in graphs.items():
            path = tmp / name
            save_graph(model, path, external_data)
            onnx.checker.check_model(str(path), full_check=True)
            check_external_data(path)
            manifest["graphs"][name.removesuffix(".onnx")] = {"file": name, **io_spec(model)}
        for name, (variant, _) in variants.items():
            static = {} if variant == "fused" else {"max_length": static_length}
            manifest["graphs"][name].update(variant=variant, **static, verified_against="decoder.onnx")
        if measure:
            from .verify import ERROR_BOUNDS, export_checks

            rows = export_checks(cfg, params, tmp, dtype, variants)
            manifest["error"] = {"provider": "CPUExecutionProvider", "bound": ERROR_BOUNDS[dtype],
                                 "max": max(row["error"] for row in rows),
                                 "per_output": {(row["output"] if row["check"] == "random" else f"{row['check']}: {row['output']}"):
                                                row["error"] for row in rows}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes a 0700 folder
        replace_folder(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def replace_folder(new, target):
    """Rename new over target; an existing target is moved aside first and removed only after the swap."""
    target = Path(target)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(onnx_dir):
    """manifest.json of an export folder, or a RefformerError saying what is wrong."""
    path = Path(onnx_dir) / "manifest.json"
    manifest = read_json(path, "run `refformer export` first")
    if manifest.get("format_version") != MANIFEST_FORMAT:
        raise RefformerError(f"{path}: manifest format {manifest.get('format_version')} is not supported")
    return manifest


def is_stale(model_dir, manifest):
    """True when the model's config or weights changed since the export."""
    hashes = model_hashes(model_dir)
    return any(manifest.get(key) != value for key, value in hashes.items())
