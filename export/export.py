"""`refformer export`: write one export set (graphs + manifest.json) atomically, checked and measured.

Layout: every export set has its own folder, named by export_name: MODEL_DIR/onnx/<dtype>[-static<L>][-fused]
(e.g. onnx/fp32, onnx/fp16-static128-fused), or <cache>/<model key>/<the same name> in the per-user cache
(XDG_CACHE_HOME or ~/.cache, then refformer/) for the bundled model and for model folders that are not writable.
"""

import datetime
import errno
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from pathlib import Path

import numpy as np
import onnx

from refformer.refimpl.errors import RefformerError
from refformer.refimpl.io import (CONFIG_FILE, WEIGHTS_FILE, current_umask, load, load_config, process_alive, read_json,
                                  sha256)
from refformer.refimpl.tree import flatten

from .contract import DTYPES
from .model import build_decoder, build_decoder_static, build_decoder_static_fused, build_encoder

MANIFEST_FORMAT = 2  # 2: one folder per export set, and every file's sha256 under "files"
MANIFEST_FILE = "manifest.json"
EXPORTS_FOLDER = "onnx"  # MODEL_DIR/onnx/<export_name>
EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # protobuf cannot hold 2 GB: bigger graphs keep weights beside them
FP16_MAX = 65504.0
HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40]
LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)@(?P<host>\w*)-")


# ---------------------------------------------------------------------------- where export sets live


def owner():
    """PID@HOST: in the names of this process's temporary folders, so that only a dead owner's are cleaned up."""
    return f"{os.getpid()}@{HOST}"


def export_name(dtype="fp32", static_length=None, fused_attention=False):
    """The folder name of one export set: "fp32", "fp16-static128", "fp32-fused", "fp16-static128-fused"."""
    return dtype + ("" if static_length is None else f"-static{static_length}") + ("-fused" if fused_attention else "")


# generate and verify find exports in MODEL/onnx and the per-user cache only: an export elsewhere (--out) is no help
CACHE_ADVICE = "set XDG_CACHE_HOME to a writable folder (where generate and verify look for exports)"


def is_folder(path):
    """Path.is_dir that says False, not PermissionError, for a path under a folder this user cannot enter."""
    try:
        return Path(path).is_dir()
    except OSError:
        return False


def cache_root():
    """The per-user cache of exports: $XDG_CACHE_HOME/refformer, or ~/.cache/refformer. A relative XDG_CACHE_HOME is
    ignored, as the XDG base directory specification says (it named a folder under whatever the current folder was).
    Without a home folder (HOME unset, no entry in the password file) the cache is <temporary folder>/refformer-UID."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(base):
        return Path(base) / "refformer"
    home = os.path.expanduser("~")
    if os.path.isabs(home):
        return Path(home) / ".cache" / "refformer"
    return Path(tempfile.gettempdir()) / f"refformer-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def model_hashes(model_dir):
    """sha256 of config.json and model.safetensors: what the manifest records to detect a stale export.

    Raises RefformerError when either file is missing."""
    model_dir = Path(model_dir)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (model_dir / name).is_file():
            raise RefformerError(f"{model_dir / name} is missing")
    return {"config_sha256": file_sha256(model_dir / CONFIG_FILE), "weights_sha256": file_sha256(model_dir / WEIGHTS_FILE)}


_HASHES = {}  # (path, device, inode, size, mtime_ns) -> sha256: a big weights file is read once per process


def file_sha256(path):
    """sha256 of a file, remembered while the file's inode, size and modification time stay the same."""
    path = Path(path).resolve()
    info = path.stat()
    key = (str(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256(path)
    return _HASHES[key]


def model_key(model_dir):
    """20 hex digits naming a model's config and weights: its folder in the per-user cache."""
    hashes = model_hashes(model_dir)
    return sha256_text(hashes["config_sha256"] + hashes["weights_sha256"])[:20]


def sha256_text(text):
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def export_locations(model_dir, name):
    """(MODEL_DIR/onnx/NAME, <cache>/<model key>/NAME): the two places an export set of model_dir may live."""
    model_dir = Path(model_dir)
    return model_dir / EXPORTS_FOLDER / name, cache_root() / model_key(model_dir) / name


def packaged(model_dir):
    """True for a model folder inside refformer's own package folders (the bundled model, installed or editable):
    its exports go to the per-user cache, never into site-packages or the source tree."""
    import refformer
    import refformer.runtime

    model = Path(model_dir).resolve()
    roots = {Path(module.__file__).resolve().parent for module in (refformer, refformer.runtime)}
    return any(root == model or root in model.parents for root in roots)


def writable(model_dir):
    """Whether an export can go into MODEL_DIR/onnx (it, or the model folder when onnx/ is missing, is writable)."""
    folder = Path(model_dir) / EXPORTS_FOLDER
    return os.access(folder if folder.exists() else model_dir, os.W_OK)


def default_export_dir(model_dir, dtype="fp32", static_length=None, fused_attention=False):
    """Where `refformer export` (no --out) and generate write an export set of model_dir: MODEL_DIR/onnx/NAME,
    or the per-user cache's folder for the bundled model and for a model folder that is not writable."""
    local, cached = export_locations(model_dir, export_name(dtype, static_length, fused_attention))
    return cached if packaged(model_dir) or not writable(model_dir) else local


def existing_exports(model_dir):
    """{name: folder} of the export sets of model_dir with a manifest.json: MODEL_DIR/onnx/* first, then the
    per-user cache's (a name in both: the model folder's)."""
    found = {}
    local, cached = export_locations(model_dir, "-")
    for parent in (local.parent, cached.parent):
        if parent.is_dir():
            for folder in sorted(parent.iterdir()):
                if not folder.name.startswith(".") and (folder / MANIFEST_FILE).is_file():
                    found.setdefault(folder.name, folder)
    return found


def find_export(model_dir, dtype=None, static_length=None, fused_attention=False):
    """The export set of model_dir that verify checks when no folder is given: the one named by the options (dtype
    default fp32), in MODEL_DIR/onnx or the per-user cache. With no options: fp32 if it exists, else the only one
    there is. Raises RefformerError naming what exists when none or several match."""
    load_config(model_dir)  # a missing or bad model folder is named first
    recover_leftovers(Path(model_dir) / EXPORTS_FOLDER)
    found = existing_exports(model_dir)
    options_given = dtype is not None or static_length is not None or fused_attention
    name = export_name(dtype or "fp32", static_length, fused_attention)
    if name in found:
        return found[name]
    if not options_given and len(found) == 1:
        return next(iter(found.values()))
    local, cached = export_locations(model_dir, name)
    if not found:
        raise RefformerError(f"no export of {model_dir} in {local.parent} or {cached.parent}: run `refformer export` "
                             "first (or pass --onnx-dir DIR)")
    raise RefformerError(f"no {name} export of {model_dir}; found {', '.join(found)}: pass --dtype, --static-length "
                         "and --fused-attention to name one (or --onnx-dir DIR)")


# ---------------------------------------------------------------------------- checks before any work


def check_out_dir(model_dir, out_dir, what=None):
    """Refuse an --out that would destroy what the user had: the model folder, a folder holding it, a file, a
    symbolic link, or a folder that exists and is not a refformer export (an empty folder is fine). what names the
    folder in messages (default "--out DIR"; "the export folder DIR" for a default place). Raises RefformerError."""
    out, model = Path(out_dir), Path(model_dir).resolve()
    what = what or f"--out {out}"
    try:
        target = out.resolve()
    except (RuntimeError, OSError):  # Python 3.11's resolve raises RuntimeError for a loop of symbolic links
        raise RefformerError(f"{what} is (or lies under) a loop of symbolic links; remove the link") from None
    if target == model or target in model.parents:
        raise RefformerError(f"{what} is the model folder or holds it; pick a folder outside {model_dir}")
    if packaged(target):
        raise RefformerError(f"{what} is inside refformer's own package folder (where the bundled model lives): "
                             "exports never go there; pick another folder")
    try:
        os.lstat(out)
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError as error:  # e.g. a cache under a home folder this user cannot enter
        raise RefformerError(f"{what} cannot be looked at ({error.strerror}): " + (
            "pick a folder you can write" if what.startswith("--out") else CACHE_ADVICE)) from None
    if out.is_symlink():
        raise RefformerError(f"{what} is a symbolic link; " + ("pass the folder it points to" if what.startswith("--out")
                             else "remove the link (or pass the folder it points to as `refformer export --out`)"))
    if out.exists() and not out.is_dir():
        raise RefformerError(f"{what} exists and is not a folder; remove it" + (
            " or pick another folder" if what.startswith("--out") else ""))
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise RefformerError(f"{what} exists and is not a refformer export (no manifest.json of ours, or files "
                             "that are not the export's); pick a new folder or remove it")


def is_export(folder):
    """True when folder holds a refformer export and nothing else: a manifest.json of ours and only the files it
    names (graphs and their .data files)."""
    folder = Path(folder)
    try:
        if not (folder / MANIFEST_FILE).is_file():  # (a pipe named manifest.json would block the read forever)
            return False
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        if not isinstance(manifest, dict) or manifest.get("format_version") not in (1, MANIFEST_FORMAT):
            return False
        files = set(manifest.get("files") or [])
        for graph in (manifest.get("graphs") or {}).values():
            files |= {graph["file"], graph["file"] + ".data"}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return False
    return all(entry.name == MANIFEST_FILE or entry.name in files for entry in folder.iterdir())


def check_weights(params, dtype, source):
    """Raise RefformerError naming the first tensor with a NaN or inf, or (dtype "fp16") with values beyond
    float16's range: such a model cannot be exported or verified."""
    for name, value in flatten(params).items():
        value = np.asarray(value)
        finite = np.isfinite(value)
        if not finite.all():
            raise RefformerError(f"{source}: {name} has {int(value.size - finite.sum())} non-finite values (NaN or inf); "
                                 "fix or retrain the model before exporting it")
        if dtype == "fp16" and value.size and np.abs(value).max() > FP16_MAX:
            raise RefformerError(f"{source}: {name} has values up to {np.abs(value).max():.3g}, beyond float16's "
                                 f"range ({FP16_MAX:g}): export with --dtype fp32")


def file_hashes(folder, names):
    """{file name: sha256} of the named files of folder that exist."""
    return {name: sha256(Path(folder) / name) for name in sorted(names) if (Path(folder) / name).is_file()}


SAME_EXPORT_KEYS = ("format_version", "family", "dtype", "opset", "config_sha256", "weights_sha256", "graphs", "files")


def same_export(folder, manifest):
    """True when folder already holds this export: a manifest agreeing with manifest on SAME_EXPORT_KEYS (the model's
    hashes, the graphs and every file's sha256), and files that still have those hashes."""
    try:
        files = [Path(folder) / name for name in [MANIFEST_FILE, *manifest["files"]]]
        if not all(path.is_file() for path in files):  # missing, or a pipe whose read would block forever
            return False
        existing = json.loads((Path(folder) / MANIFEST_FILE).read_text())
        return all(existing.get(key) == manifest[key] for key in SAME_EXPORT_KEYS) and all(
            sha256(Path(folder) / name) == digest for name, digest in manifest["files"].items())
    except (OSError, ValueError, AttributeError):
        return False


def check_files(onnx_dir, manifest):
    """Every file the manifest records has its recorded sha256: graphs copied in from another export (or changed)
    are refused. Raises RefformerError saying to export again."""
    onnx_dir = Path(onnx_dir)
    for name, digest in manifest["files"].items():
        path = onnx_dir / name
        if not path.is_file():
            raise RefformerError(f"{path} is missing: run `refformer export` again")
        if sha256(path) != digest:
            raise RefformerError(f"{path} is not the file its manifest.json records (changed, or copied from another "
                                 "export): run `refformer export` again")


# ---------------------------------------------------------------------------- graphs


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
    from .verify import import_onnxruntime

    onnxruntime = import_onnxruntime()
    from importlib.metadata import version

    return {"refformer": version("refformer"), "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__}


def check_path(name, value):
    """A folder argument must be a str or os.PathLike naming something (RefformerError otherwise)."""
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)) or not str(value):
        raise RefformerError(f"{name} must be a folder path (str or pathlib.Path), got {value!r}")


def export_model(model_dir, out_dir=None, dtype="fp32", opset=17, external_data=None, measure=True, static_length=None,
                 fused_attention=False):
    """Export model_dir to out_dir (default: default_export_dir) through a temporary folder renamed into place.

    Returns the manifest. measure=True runs refformer verify's random-input check on ONNX Runtime CPU
    and records the error in the manifest. static_length adds decoder_static.onnx, the fixed-size-cache
    variant with in-graph argmax (for CUDA-graph replay), with that many cache slots. fused_attention adds
    decoder_fused.onnx: decoder.onnx's inputs and outputs, with ONNX Runtime's MultiHeadAttention contrib op;
    with static_length too, also decoder_static_mha.onnx (decoder_static.onnx's contract with contrib ops and
    fused norms) and, when the head size is a multiple of 8, decoder_static_fused.onnx (GroupQueryAttention
    over a cache updated in place).

    Raises RefformerError for a bad option (a model_dir or out_dir that is not a path, flags that are not booleans),
    an out_dir that check_out_dir refuses (its parent must exist, unless it is
    one of export_locations), weights with NaN or inf (or beyond float16's range for fp16), or (measure=True) a measured
    error that is not finite or beyond the dtype's bound (1e-5 fp32, 1e-2 fp16).
    Leftovers of killed exports in the target's parent folder are removed first (recover_leftovers).
    """
    check_path("model_dir", model_dir)
    if out_dir is not None:
        check_path("out_dir", out_dir)
    for name, value in (("fused_attention", fused_attention), ("measure", measure), ("external_data", external_data)):
        if not isinstance(value, (bool, np.bool_)) and not (name == "external_data" and value is None):
            raise RefformerError(f"{name} must be True or False{' (or None)' if name == 'external_data' else ''}, "
                                 f"got {value!r}")
    if isinstance(static_length, np.integer):
        static_length = int(static_length)
    if isinstance(opset, np.integer):  # np.int64(17) was refused as "must be between 17 and 28, got 17"
        opset = int(opset)
    if dtype not in DTYPES:
        raise RefformerError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or not 17 <= opset <= onnx.defs.onnx_opset_version():
        raise RefformerError(f"--opset must be between 17 (LayerNormalization) and {onnx.defs.onnx_opset_version()} "
                             f"(an integer), got {opset!r}")
    if static_length is not None and (isinstance(static_length, bool) or not isinstance(static_length, int)
                                      or static_length < 1):
        raise RefformerError(f"--static-length must be a positive integer, got {static_length}")
    model_dir = Path(model_dir)
    load_config(model_dir)  # a missing or bad model folder is named before anything else
    if out_dir is None:
        out_dir = default_export_dir(model_dir, dtype, static_length, fused_attention)
    out_dir = Path(out_dir)
    from .verify import check_native_path

    check_native_path(out_dir.absolute())  # the onnx checker takes its graphs by path
    own_places = export_locations(model_dir, export_name(dtype, static_length, fused_attention))
    own_place = out_dir in own_places
    if not own_place and not is_folder(out_dir.parent):  # the default places' folders are made as needed
        raise RefformerError(f"--out {out_dir}: folder {out_dir.parent} does not exist; create it first")
    check_out_dir(model_dir, out_dir, f"the export folder {out_dir}" if own_place else None)
    cfg, params = load(model_dir)
    check_weights(params, dtype, model_dir / WEIGHTS_FILE)
    if static_length is not None and static_length > cfg.max_positions:
        raise RefformerError(f"--static-length must be between 1 and max_positions={cfg.max_positions}, got {static_length}")
    static_mha = static_length is not None and fused_attention
    static_fused = static_mha and cfg.head_dim % 8 == 0  # GroupQueryAttention's kernels need it
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

            try:
                rows = export_checks(cfg, params, tmp, dtype, variants)
            except RefformerError as error:
                if opset > 17 and str(error).startswith("ONNX Runtime cannot load"):  # e.g. opset 27 on ORT 1.31
                    from .verify import import_onnxruntime

                    raise RefformerError(f"ONNX Runtime {import_onnxruntime().__version__} cannot load opset {opset} graphs; "
                                         "pass a lower --opset (17 loads everywhere); nothing was written") from None
                raise
            worst = max(row["error"] for row in rows)
            if not np.isfinite(worst):
                bad = next(row for row in rows if not np.isfinite(row["error"]))
                raise RefformerError(f"the exported graphs give non-finite outputs ({bad['output']}: {bad['error']}); "
                                     "nothing was written")
            if worst > ERROR_BOUNDS[dtype]:  # graphs that do not compute the model: never written, never used
                bad = max(rows, key=lambda row: row["error"])
                advice = "export with --dtype fp32" if dtype == "fp16" else "please report it with the model's config.json"
                raise RefformerError(f"the exported graphs differ from refimpl by {worst:.2e} ({bad['check']}: "
                                     f"{bad['output']}), beyond the {dtype} bound {ERROR_BOUNDS[dtype]:.0e}; nothing "
                                     f"was written: {advice}")
            manifest["error"] = {"provider": "CPUExecutionProvider", "bound": ERROR_BOUNDS[dtype], "max": worst,
                                 "per_output": {(row["output"] if row["check"] == "random" else f"{row['check']}: {row['output']}"):
                                                row["error"] for row in rows}}
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


# ---------------------------------------------------------------------------- the switch, and what a kill leaves


def replace_folder(new, target):
    """Rename the folder new to target. An existing target is first renamed aside to .NAME.old-PID@HOST-*, and
    removed after the swap; a process killed between the two renames leaves that folder, and the next
    recover_leftovers renames it back. Safe when several processes export the same target at once (the last
    one wins; each swap is whole)."""
    target = Path(target)
    for _ in range(100):
        try:
            os.replace(new, target)  # atomic when target is missing (or an empty folder)
            return
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        old = target.with_name(f".{target.name}.old-{owner()}-{uuid.uuid4().hex[:8]}")
        try:
            os.replace(target, old)
        except FileNotFoundError:  # another process moved it aside first
            continue
        try:
            os.replace(new, target)
        except OSError as error:
            if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                try:
                    os.replace(old, target)
                except OSError:
                    pass  # recover_leftovers puts it back on the next start
                raise
            shutil.rmtree(old, ignore_errors=True)  # another process's export took the place in between: again
            continue
        shutil.rmtree(old, ignore_errors=True)
        return
    raise RefformerError(f"could not rename {new} to {target}: other processes keep replacing it")


FOREIGN_LEFTOVER_AGE_S = 24 * 3600


def older_than(path, seconds):
    """Whether path was last modified more than seconds ago (False when it cannot be read)."""
    import time

    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def recover_leftovers(parent):
    """Clean up after exports killed in parent: remove their .NAME.tmp-PID@HOST-* folders, and put a
    .NAME.old-PID@HOST-* folder back in place of a missing NAME (a kill between replace_folder's two renames),
    or remove it. Folders of this host whose process is gone are touched (concurrent exports keep theirs), and
    those of another host name once they are a day old (a container's host name changes at every start)."""
    parent = Path(parent)
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        match = LEFTOVER.match(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir():
            continue
        if match["host"] == HOST and process_alive(int(match["pid"])):
            continue
        if match["host"] != HOST and not older_than(entry, FOREIGN_LEFTOVER_AGE_S):  # another machine's export, or
            continue  # this one's under an earlier host name (a container gets a new one at every start)
        target = parent / match["name"]
        if match["kind"] == "old" and not target.exists():
            try:
                os.replace(entry, target)
                continue
            except OSError:
                pass
        shutil.rmtree(entry, ignore_errors=True)


LEGACY_LEFTOVER = re.compile(r"^\.onnx(-fp16)?\.(tmp-\w{8}|old-\d+)$")  # refformer before export sets had folders of their own
LEGACY_AGE_S = 3600


def remove_legacy_leftovers(model_dir):
    """Remove the .onnx.tmp-* / .onnx.old-* (and -fp16) folders that exports killed before this layout left in the
    model folder (their names carry no host: only those untouched for an hour go)."""
    import time

    try:
        entries = list(Path(model_dir).iterdir())
    except OSError:
        return
    for entry in entries:
        try:
            if LEGACY_LEFTOVER.match(entry.name) and entry.is_dir() and time.time() - entry.stat().st_mtime > LEGACY_AGE_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def read_manifest(onnx_dir):
    """manifest.json of an export folder; RefformerError saying what is wrong (missing, not JSON, an older format)."""
    path = Path(onnx_dir) / MANIFEST_FILE
    manifest = read_json(path, "run `refformer export` first")
    if not isinstance(manifest, dict) or not isinstance(manifest.get("graphs"), dict):
        raise RefformerError(f"{path} is not a refformer export manifest: run `refformer export` again")
    if manifest.get("format_version") != MANIFEST_FORMAT:
        raise RefformerError(f"{path}: manifest format {manifest.get('format_version')} is not this refformer's "
                             f"({MANIFEST_FORMAT}): run `refformer export` again")
    files = manifest.get("files")
    if not (isinstance(files, dict) and files and all(
            isinstance(name, str) and isinstance(digest, str) and name == Path(name).name and not name.startswith(".")
            for name, digest in files.items())
            and all(isinstance(graph, dict) and graph.get("file") in files for graph in manifest["graphs"].values())):
        raise RefformerError(f"{path} does not list the export's files as refformer writes them: run `refformer export` "
                             "again")
    return manifest


def is_stale(model_dir, manifest):
    """True when the model's config or weights changed since the export."""
    hashes = model_hashes(model_dir)
    return any(manifest.get(key) != value for key, value in hashes.items())
