"""The export folder format (docs/DESIGN.md, "Export sets"): where export sets live, their manifest.json, and what
a killed export leaves behind.

Layout: every export set has its own folder, named by export_name: MODEL_DIR/onnx/<dtype>[-static<L>][-fused]
(e.g. onnx/fp32, onnx/fp16-static128-fused), or <cache>/<model key>/<the same name> in the per-user cache
(XDG_CACHE_HOME or ~/.cache, then refformer/) for the bundled model and for model folders that are not writable.
A set holds the graphs (NAME.onnx, and NAME.onnx.data for weights kept beside a big graph) and manifest.json,
which records the model's hashes, each graph's inputs and outputs, and every file's sha256.
"""

import errno
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path

import onnx

from refformer.refimpl.errors import RefformerError
from refformer.refimpl.io import CONFIG_FILE, HOST, WEIGHTS_FILE, load_config, process_alive, read_json, sha256

from .contract import EXPORT_DTYPES, graph_file, reference_graphs

MANIFEST_FORMAT = 2  # 2: one folder per export set, and every file's sha256 under "files"
MANIFEST_FILE = "manifest.json"
EXPORTS_FOLDER = "onnx"  # MODEL_DIR/onnx/<export_name>
LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)@(?P<host>\w*)-")


# ---------------------------------------------------------------------------- where export sets live


def owner():
    """PID@HOST: in the names of this process's temporary folders, so that only a dead owner's are cleaned up.

    Raises nothing.
    """
    return f"{os.getpid()}@{HOST}"


def export_name(dtype="fp32", static_length=None, fused_attention=False):
    """The folder name of one export set: "fp32", "fp16-static128", "fp32-fused", "fp16-static128-fused".

    Raises nothing: export_model and the CLI checked the options.
    """
    return dtype + ("" if static_length is None else f"-static{static_length}") + ("-fused" if fused_attention else "")


# generate and verify find exports in MODEL/onnx and the per-user cache only: an export elsewhere (--out) is no help
CACHE_ADVICE = "set XDG_CACHE_HOME to a writable folder (where generate and verify look for exports)"


def is_folder(path):
    """Path.is_dir that says False, not PermissionError, for a path under a folder this user cannot enter.

    Raises nothing.
    """
    try:
        return Path(path).is_dir()
    except OSError:
        return False


def cache_root():
    """The per-user cache of exports: $XDG_CACHE_HOME/refformer, or ~/.cache/refformer. A relative XDG_CACHE_HOME is
    ignored, as the XDG base directory specification says (it named a folder under whatever the current folder was).
    Without a home folder (HOME unset, no entry in the password file) the cache is <temporary folder>/refformer-UID.

    Raises nothing: a missing home folder falls back to the temporary folder.
    """
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
    return {"config_sha256": file_sha256(model_dir / CONFIG_FILE),
            "weights_sha256": file_sha256(model_dir / WEIGHTS_FILE)}


_HASHES = {}  # (path, device, inode, size, mtime_ns) -> sha256: a big weights file is read once per process


def file_sha256(path):
    """sha256 of a file, remembered while the file's inode, size and modification time stay the same.

    Raises OSError when the file cannot be read.
    """
    path = Path(path).resolve()
    info = path.stat()
    key = (str(path), info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = sha256(path)
    return _HASHES[key]


def model_key(model_dir):
    """20 hex digits naming a model's config and weights: its folder in the per-user cache.

    Raises RefformerError (model_hashes) when config.json or model.safetensors is missing.
    """
    hashes = model_hashes(model_dir)
    return sha256_text(hashes["config_sha256"] + hashes["weights_sha256"])[:20]


def sha256_text(text):
    """The sha256 hex digest of a str (UTF-8).

    Raises nothing.
    """
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


def export_locations(model_dir, name):
    """(MODEL_DIR/onnx/NAME, <cache>/<model key>/NAME): the two places an export set of model_dir may live.

    Raises RefformerError (model_hashes) when config.json or model.safetensors is missing.
    """
    model_dir = Path(model_dir)
    return model_dir / EXPORTS_FOLDER / name, cache_root() / model_key(model_dir) / name


def packaged(model_dir):
    """True for a model folder inside refformer's own package folders (the bundled model, installed or editable):
    its exports go to the per-user cache, never into site-packages or the source tree.

    Raises nothing.
    """
    from importlib.util import find_spec

    model = Path(model_dir).resolve()
    roots = set()
    for package in ("refformer", "refformer.runtime"):  # located, not imported: export never imports the runtime
        spec = find_spec(package)
        roots |= {Path(folder).resolve() for folder in (spec.submodule_search_locations or [])} if spec else set()
    return any(root == model or root in model.parents for root in roots)


def writable(model_dir):
    """Whether an export can go into MODEL_DIR/onnx (it, or the model folder when onnx/ is missing, is writable).

    Raises nothing: an unreadable folder is not writable.
    """
    folder = Path(model_dir) / EXPORTS_FOLDER
    return os.access(folder if folder.exists() else model_dir, os.W_OK)


def default_export_dir(model_dir, dtype="fp32", static_length=None, fused_attention=False):
    """Where `refformer export` (no --out) and generate write an export set of model_dir: MODEL_DIR/onnx/NAME,
    or the per-user cache's folder for the bundled model and for a model folder that is not writable.

    Raises RefformerError (model_hashes) when config.json or model.safetensors is missing.
    """
    local, cached = export_locations(model_dir, export_name(dtype, static_length, fused_attention))
    return cached if packaged(model_dir) or not writable(model_dir) else local


def existing_exports(model_dir):
    """{name: folder} of the export sets of model_dir with a manifest.json: MODEL_DIR/onnx/* first, then the
    per-user cache's (a name in both: the model folder's).

    Raises RefformerError (model_hashes) when config.json or model.safetensors is missing.
    """
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
        raise RefformerError(f"{what} is a symbolic link; " + (
            "pass the folder it points to" if what.startswith("--out")
            else "remove the link (or pass the folder it points to as `refformer export --out`)"))
    if out.exists() and not out.is_dir():
        raise RefformerError(f"{what} exists and is not a folder; remove it" + (
            " or pick another folder" if what.startswith("--out") else ""))
    if out.is_dir() and any(out.iterdir()) and not is_export(out):
        raise RefformerError(f"{what} exists and is not a refformer export (no manifest.json of ours, or files "
                             "that are not the export's); pick a new folder or remove it")


def is_export(folder):
    """True when folder holds a refformer export and nothing else: a manifest.json of ours and only the files it
    names (graphs and their .data files).

    Raises nothing: an unreadable folder or manifest is not an export.
    """
    folder = Path(folder)
    try:
        if not (folder / MANIFEST_FILE).is_file():  # (a pipe named manifest.json would block the read forever)
            return False
        manifest = read_json(folder / MANIFEST_FILE, "")  # refused unread above JSON_MAX_BYTES: a 300 MB one took
        # 660 MB of memory, then its folder was replaced as an export (a manifest alone is one)
        if not isinstance(manifest, dict) or manifest.get("format_version") not in (1, MANIFEST_FORMAT):
            return False
        files = set(manifest.get("files") or [])
        for graph in (manifest.get("graphs") or {}).values():
            files |= {graph["file"], graph["file"] + ".data"}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return False
    return all(entry.name == MANIFEST_FILE or entry.name in files for entry in folder.iterdir())


def file_hashes(folder, names):
    """{file name: sha256} of the named files of folder that exist.

    Raises OSError when a named file that exists cannot be read.
    """
    return {name: sha256(Path(folder) / name) for name in sorted(names) if (Path(folder) / name).is_file()}


SAME_EXPORT_KEYS = ("format_version", "family", "dtype", "opset", "config_sha256", "weights_sha256", "graphs", "files")


def same_export(folder, manifest):
    """True when folder already holds this export: a manifest agreeing with manifest on SAME_EXPORT_KEYS (the model's
    hashes, the graphs and every file's sha256), and files that still have those hashes.

    Raises nothing: an unreadable folder or manifest is not the same export.
    """
    try:
        files = [Path(folder) / name for name in [MANIFEST_FILE, *manifest["files"]]]
        if not all(path.is_file() for path in files):  # missing, or a pipe whose read would block forever
            return False
        existing = read_json(Path(folder) / MANIFEST_FILE, "")
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


# ---------------------------------------------------------------------------- graph files


def graph_files(cfg):
    """The file names of the graphs every export of cfg holds: encoder.onnx (encoder-decoder only), decoder.onnx.

    Raises nothing: cfg is a checked Config.
    """
    return [graph_file(name) for name in reference_graphs(cfg.is_encoder_decoder)]


def check_external_data(path):
    """Every external-data location of the graph at path must be a relative path inside its folder. Raises
    RefformerError for a missing file, a file onnx cannot load, a location outside the folder, or a missing
    data file."""
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
            raise RefformerError(f"{path}: external data of {tensor.name} points outside the model folder "
                                 f"({location!r})")
        if not target.is_file():
            raise RefformerError(f"{path}: external data file {location!r} of {tensor.name} is missing")


def check_path(name, value):
    """A folder argument (its parameter name, and value) must be a str or os.PathLike naming something. Raises
    RefformerError otherwise."""
    if isinstance(value, bytes) or not isinstance(value, (str, os.PathLike)) or not str(value):
        raise RefformerError(f"{name} must be a folder path (str or pathlib.Path), got {value!r}")


# ---------------------------------------------------------------------------- the switch, and what a kill leaves


def replace_folder(new, target):
    """Rename the folder new to target. An existing target is first renamed aside to .NAME.old-PID@HOST-*, and
    removed after the swap; a process killed between the two renames leaves that folder, and the next
    recover_leftovers renames it back. Safe when several processes export the same target at once (the last
    one wins; each swap is whole). Raises OSError for a rename the file system refuses, RefformerError when
    other processes keep replacing target (100 tries)."""
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
    """Whether path was last modified more than seconds ago (False when it cannot be read).

    seconds: a float, in seconds. Raises nothing.
    """
    import time

    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False


def recover_leftovers(parent):
    """Clean up after exports killed in parent: remove their .NAME.tmp-PID@HOST-* folders, and put a
    .NAME.old-PID@HOST-* folder back in place of a missing NAME (a kill between replace_folder's two renames),
    or remove it. Folders of this host whose process is gone are touched (concurrent exports keep theirs), and
    those of another host name once they are a day old (a container's host name changes at every start).

    Raises nothing: an unreadable parent is skipped, and folders that cannot be removed stay.
    """
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


# what refformer left before export sets had folders of their own
LEGACY_LEFTOVER = re.compile(r"^\.onnx(-fp16)?\.(tmp-\w{8}|old-\d+)$")
LEGACY_AGE_S = 3600


def remove_legacy_leftovers(model_dir):
    """Remove the .onnx.tmp-* / .onnx.old-* (and -fp16) folders that exports killed before this layout left in the
    model folder (their names carry no host: only those untouched for an hour go).

    Raises nothing: unreadable entries are skipped.
    """
    import time

    try:
        entries = list(Path(model_dir).iterdir())
    except OSError:
        return
    for entry in entries:
        try:
            if (LEGACY_LEFTOVER.match(entry.name) and entry.is_dir()
                    and time.time() - entry.stat().st_mtime > LEGACY_AGE_S):
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def read_manifest(onnx_dir):
    """manifest.json of an export folder, as a dict. Raises RefformerError saying what is wrong (missing, not JSON,
    an older format, files not listed as refformer writes them, a dtype that is not one of contract.EXPORT_DTYPES)."""
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
            and all(isinstance(graph, dict) and isinstance(graph.get("file"), str) and graph["file"] in files
                    for graph in manifest["graphs"].values())):  # (a list as "file" was a TypeError: unhashable)
        raise RefformerError(f"{path} does not list the export's files as refformer writes them: run `refformer "
                             "export` again")
    if not isinstance(manifest.get("dtype"), str) or manifest["dtype"] not in EXPORT_DTYPES:  # a list as dtype was
        # a traceback (unhashable) in verify
        raise RefformerError(f"{path}: dtype {manifest.get('dtype')!r} is not one of {', '.join(EXPORT_DTYPES)}: run "
                             "`refformer export` again")
    return manifest


def is_stale(model_dir, manifest):
    """True when the model's config or weights changed since the export (their sha256 against the manifest's).
    Raises RefformerError when config.json or model.safetensors is missing."""
    hashes = model_hashes(model_dir)
    return any(manifest.get(key) != value for key, value in hashes.items())
