"""The model directory: config.json + model.safetensors (+ tokenizer.json). No pickle, ever."""

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .config import Config
from .errors import RefformerError
from .model import param_shapes
from .tree import flatten, tree_cast, unflatten

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
SPECIAL_TOKEN_NAMES = {"pad_id": ("<pad>", "[PAD]"), "bos_id": ("<s>", "<bos>", "[BOS]"),
                       "eos_id": ("</s>", "<eos>", "[EOS]"), "unk_id": ("<unk>", "[UNK]")}


def atomic_write(path, write):
    """Write a file through write(temporary_path), then rename it over path: a failure leaves path untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; keep the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sha256(path):
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save(model_dir, cfg, params, tokenizer=None, dtype=None):
    """Write a model directory: config.json, model.safetensors (float32, or dtype e.g. np.float16), tokenizer.json.

    tokenizer is a tokenizers.Tokenizer or a path to a tokenizer.json; its vocabulary must match cfg.
    Every file is written to a temporary name and renamed, so an interrupted save keeps the old files.
    """
    from safetensors.numpy import save_file

    model_dir = Path(model_dir)
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RefformerError(f"cannot create model directory {model_dir}: {error.strerror}") from None
    check_params(cfg, params)
    dtype = np.float32 if dtype is None else dtype
    flat = {name: np.ascontiguousarray(value, dtype=dtype) for name, value in flatten(params).items()}
    tokenizer_json = None
    if tokenizer is not None:
        tokenizer_json = Path(tokenizer).read_text() if isinstance(tokenizer, (str, Path)) else tokenizer.to_str()
        check_tokenizer(cfg, tokenizer_json, "the tokenizer")
    atomic_write(model_dir / WEIGHTS_FILE, lambda tmp: save_file(flat, tmp, metadata={"format": "refformer"}))
    atomic_write(model_dir / CONFIG_FILE, lambda tmp: Path(tmp).write_text(cfg.to_json()))
    if tokenizer_json is not None:
        atomic_write(model_dir / TOKENIZER_FILE, lambda tmp: Path(tmp).write_text(tokenizer_json))


def read_json(path, when_missing):
    """The JSON value in path; RefformerError "{path} is missing: {when_missing}" or "... is not valid JSON"."""
    path = Path(path)
    if not path.is_file():
        raise RefformerError(f"{path} is missing: {when_missing}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RefformerError(f"{path} is not valid JSON: {error}") from None


def load_config(model_dir):
    """Read and validate config.json of a model directory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise RefformerError(f"model directory {model_dir} does not exist")
    path = model_dir / CONFIG_FILE
    data = read_json(path, "not a refformer model directory")
    if not isinstance(data, dict):
        raise RefformerError(f"{path} must hold a JSON object")
    try:
        return Config.from_dict(data)
    except TypeError as error:
        raise RefformerError(f"{path}: {error}") from None


def load(model_dir, dtype=np.float32):
    """Read a model directory -> (cfg, params), parameters upcast to dtype (float32 or float64)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    model_dir = Path(model_dir)
    path = model_dir / WEIGHTS_FILE
    if model_dir.is_dir() and not path.is_file():
        pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise RefformerError(f"{path} is missing; found {', '.join(pickles)}, which refformer will not unpickle: "
                                 f"convert a torch state_dict with `refformer convert-torch`")
    cfg = load_config(model_dir)
    if not path.is_file():
        raise RefformerError(f"{path} is missing")
    try:
        flat = load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise RefformerError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None
    params = unflatten_checked(cfg, flat, str(path))
    return cfg, tree_cast(params, dtype)


def unflatten_checked(cfg, flat, source):
    """Rebuild the parameter tree of cfg from {dotted name: array}, checking names and shapes."""
    shapes = flatten_shapes(cfg)
    missing = sorted(set(shapes) - set(flat))
    extra = sorted(set(flat) - set(shapes))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if extra:
            parts.append(f"unexpected {_few(extra)}")
        raise RefformerError(f"{source} does not match its config: {'; '.join(parts)}")
    for name, shape in shapes.items():
        if tuple(flat[name].shape) != shape:
            raise RefformerError(f"{source}: {name} has shape {list(flat[name].shape)}, the config needs {list(shape)}")
        if flat[name].dtype.kind != "f":
            raise RefformerError(f"{source}: {name} has dtype {flat[name].dtype}, expected floating point")
    return unflatten(flat, param_shapes(cfg))


def check_params(cfg, params):
    """Raise RefformerError unless params has exactly cfg's names and shapes."""
    unflatten_checked(cfg, flatten(params), "params")


def flatten_shapes(cfg):
    """{dotted name: shape} of cfg's parameters."""
    out = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{prefix}{i}.")
        else:
            out[prefix[:-1]] = tuple(node)

    walk(param_shapes(cfg), "")
    return out


def _few(names, limit=4):
    """The first few of names, sorted, and how many more there are."""
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_tokenizer(cfg, tokenizer_json, source):
    """The tokenizer's vocabulary size and special ids must match the config."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_str(tokenizer_json)
    except Exception as error:  # tokenizers raises its own exception types
        raise RefformerError(f"{source} is not a valid tokenizer.json: {error}") from None
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != cfg.vocab_size:
        raise RefformerError(f"{source} has {size} tokens but the model's vocab_size is {cfg.vocab_size}")
    for field, names in SPECIAL_TOKEN_NAMES.items():
        for name in names:
            token_id = tokenizer.token_to_id(name)
            if token_id is not None and token_id != getattr(cfg, field):
                raise RefformerError(f"{source} has {name} at id {token_id} but the model's {field} is {getattr(cfg, field)}")
    return tokenizer


def load_tokenizer(model_dir):
    """The model directory's tokenizer.json, checked against its config."""
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    path = model_dir / TOKENIZER_FILE
    if not path.is_file():
        raise RefformerError(f"{path} is missing")
    return check_tokenizer(cfg, path.read_text(), str(path))
