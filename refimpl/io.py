"""The model folder format (docs/DESIGN.md, "The model folder"): config.json + model.safetensors (+ tokenizer.json),
saved atomically through a journal. No pickle, ever. Imports safetensors and tokenizers lazily, inside the
functions that read or write those files.
"""

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import stat
import sys
import tempfile
import time
from io import StringIO
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
SAVE_JOURNAL = ".refformer-save.json"  # an interrupted save's renames, rolled forward by the next load or save
MODEL_FILES = (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE)
HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40]
SAVE_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>\w*)\..*\.tmp$")
SPECIAL_TOKEN_NAMES = {"pad_id": ("<pad>", "[PAD]"), "bos_id": ("<s>", "<bos>", "[BOS]"),
                       "eos_id": ("</s>", "<eos>", "[EOS]"), "unk_id": ("<unk>", "[UNK]")}


def leads_nowhere(path):
    """True for a symbolic link that no write can go through: a loop, or one whose target's folder is missing (a
    dangling link whose target could be created is written through, as any link); False otherwise.

    Raises nothing.
    """
    if not os.path.islink(path) or os.path.exists(path):
        return False
    try:
        target = Path(path).resolve()
    except (RuntimeError, OSError):  # Python 3.11 raises RuntimeError for a loop
        return True
    return not target.parent.is_dir()


def atomic_write(path, write, replace=True):
    """Write a file through write(temporary_path), then rename it over path: a failure leaves path untouched.

    A symbolic link is written through (the file it points to is replaced, the link stays). Raises RefformerError,
    before writing anything, when path is a device, a pipe or a folder (renaming over /dev/null would replace it),
    or a symbolic link that leads nowhere, and when the disk is full (the temporary is removed, path left as it
    was). replace=False: path must not exist when the write ends (RefformerError if another process created it
    meanwhile)."""
    given = path
    if leads_nowhere(given):
        raise RefformerError(f"{given} is a symbolic link that leads nowhere (a loop, or a missing target); remove "
                             "the link or give another file name")
    path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file():
        raise RefformerError(f"{given} is not a regular file (a device, a pipe or a folder); refformer will not "
                             "replace it")
    remove_dead_temps(path.parent, [path.name])  # what a killed earlier write of this file left
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}@{HOST}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp makes 0600 files: a new file gets the usual permissions, a replaced one keeps its own
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~current_umask())
        if replace:
            os.replace(tmp, path)
        else:  # a link fails where path exists: a file another process wrote meanwhile is never replaced
            try:
                os.link(tmp, path)
                os.unlink(tmp)
            except FileExistsError:
                raise RefformerError(f"{given} was created by another process meanwhile; pass --overwrite to "
                                     "replace it") from None
            except OSError as error:  # a file system without hard links: a plain rename
                if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                    raise
                os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise RefformerError(f"cannot write {given} ({error.strerror}); it was left as it was: free some space "
                                 "or write elsewhere") from None
        raise


def sha256(path):
    """Hex sha256 of a file, read in 1 MiB blocks. OSError (not RefformerError) when it cannot be read."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def current_umask():
    """This process's umask (read by setting and restoring it), for files made with the permissions open() gives.

    An int (permission bits). Raises nothing.
    """
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save(model_dir, cfg, params, tokenizer=None, dtype=None):
    """Write a model directory: config.json, model.safetensors (float32, or dtype e.g. np.float16), tokenizer.json.

    tokenizer is a tokenizers.Tokenizer or a path to a tokenizer.json; its vocabulary must match cfg.
    The files switch together: each is written to a temporary name, then a journal naming the renames is written
    in one rename (the save is decided there), then the files are renamed and the journal removed. A save killed
    before the journal keeps the old files; one killed after it is finished by the next load or save
    (recover_save). Raises RefformerError for parameters that do not match cfg, a config that would not load back,
    a tokenizer that does not match, or a folder that cannot be written.
    """
    from safetensors.numpy import save_file

    model_dir = Path(model_dir)
    check_config_round_trip(cfg)
    check_params(cfg, params)
    dtype = np.float32 if dtype is None else dtype
    flat = {name: np.ascontiguousarray(value, dtype=dtype) for name, value in flatten(params).items()}
    tokenizer_json = None
    if tokenizer is not None:
        tokenizer_json = read_text(tokenizer) if isinstance(tokenizer, (str, Path)) else tokenizer.to_str()
        check_tokenizer(cfg, tokenizer_json, "the tokenizer")
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RefformerError(f"cannot create model directory {model_dir}: {error.strerror}") from None
    recover_save(model_dir)
    remove_dead_save_temps(model_dir)
    for name in MODEL_FILES:
        if (model_dir / name).exists() and not (model_dir / name).is_file() or (model_dir / name).is_symlink():
            raise RefformerError(f"{model_dir / name} is not a plain file; move it away before saving the model here")
    writers = {WEIGHTS_FILE: lambda tmp: save_file(flat, tmp, metadata={"format": "refformer"}),
               CONFIG_FILE: lambda tmp: Path(tmp).write_text(cfg.to_json())}
    if tokenizer_json is not None:
        writers[TOKENIZER_FILE] = lambda tmp: Path(tmp).write_text(tokenizer_json)
    renames, journal_written = [], False
    try:
        for name, write in writers.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}@{HOST}.", suffix=".tmp", dir=model_dir)
            os.close(fd)
            renames.append([Path(tmp).name, name])
            write(tmp)
            os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600 files; keep the usual permissions
            sync_file(tmp)
        atomic_write(model_dir / SAVE_JOURNAL, lambda tmp: Path(tmp).write_text(json.dumps({"renames": renames})))
        journal_written = True
        roll_forward(model_dir, renames)
    except BaseException:
        if not journal_written:  # the old files stand; a written journal is finished by the next load or save
            for tmp, _ in renames:
                try:
                    os.unlink(model_dir / tmp)
                except OSError:
                    pass
        raise


def check_config_round_trip(cfg):
    """cfg must read back from its own JSON as load_config reads it: a saved folder always loads. Raises
    RefformerError ("the config would not load back: ...") otherwise."""
    try:
        Config.from_dict(json.loads(cfg.to_json()))
    except (TypeError, ValueError) as error:
        raise RefformerError(f"the config would not load back: {error}") from None


TOKENIZER_MAX_BYTES = 256 * 2**20  # the largest Hugging Face tokenizer.json files are ~40 MB; a 3 GB one took 15 GB


def read_text(path, max_bytes=None):
    """A text file's content, a UTF-8 byte-order mark at its start removed. A file over max_bytes (if given) is a
    RefformerError, raised before it is read."""
    if max_bytes is not None:
        size = Path(path).stat().st_size
        if size > max_bytes:
            raise RefformerError(f"{path} is {size / 2**20:.0f} MiB, larger than the {max_bytes // 2**20} MiB such a "
                                 "file can be: not a refformer file")
    return Path(path).read_text(encoding="utf-8").removeprefix("\ufeff")


def sync_file(path):
    """fsync a file's content to disk (OSError if it cannot be opened)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def roll_forward(model_dir, renames):
    """Rename each temporary file of a save over its model file (those already renamed are skipped), then remove
    the journal. renames: [(temporary name, model file name)] in model_dir. OSError when a rename fails (recover_save
    turns it into RefformerError)."""
    model_dir = Path(model_dir)
    for tmp, name in renames:
        try:
            os.replace(model_dir / tmp, model_dir / name)
        except FileNotFoundError:  # renamed already (by the save itself, or a concurrent recovery)
            pass
    try:
        os.unlink(model_dir / SAVE_JOURNAL)
    except FileNotFoundError:
        pass


def recover_save(model_dir):
    """Finish a save that was killed after writing its journal (see save): the model files then all are the new
    ones. Raises RefformerError when the journal is not one of ours or the folder cannot be written."""
    model_dir = Path(model_dir)
    path = model_dir / SAVE_JOURNAL
    if not path.is_file():
        return
    try:
        renames = json.loads(path.read_text())["renames"]
        if not all(isinstance(tmp, str) and SAVE_TEMP.match(tmp) and "/" not in tmp and "\\" not in tmp
                   and name in MODEL_FILES and tmp.startswith(f".{name}.") for tmp, name in renames):
            raise ValueError("unexpected entries")
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise RefformerError(f"{path} is not a journal of an interrupted refformer save ({error}); remove it") from None
    try:
        roll_forward(model_dir, renames)
    except OSError as error:
        raise RefformerError(f"{model_dir}: an interrupted save left its files half-replaced, and finishing it failed "
                             f"({error.strerror}); run again with write access to the folder") from None


FOREIGN_TEMP_AGE_S = 24 * 3600  # another host name's temporaries: a container's host name changes at every start


def remove_dead_save_temps(model_dir):
    """Remove the temporary files of saves killed before their journal: on this host when their process is gone,
    under another host name once they are a day old. Never raises: a file that cannot be removed stays."""
    remove_dead_temps(model_dir, MODEL_FILES)


def remove_dead_temps(folder, names):
    """Remove .NAME.PID@HOST.*.tmp files in folder (save's and atomic_write's temporaries) of the given names whose
    writer was killed: on this host when their process is gone, under another host name once a day old. Never
    raises: an unreadable folder or a file that cannot be removed is left as it is."""
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return
    for entry in entries:
        match = SAVE_TEMP.match(entry.name)
        if not match or match["name"] not in names or entry.is_symlink() or not entry.is_file():
            continue
        try:
            dead = (not process_alive(int(match["pid"])) if match["host"] == HOST
                    else time.time() - entry.stat().st_mtime > FOREIGN_TEMP_AGE_S)
            if dead:
                entry.unlink()
        except OSError:
            pass


def process_alive(pid):
    """Whether a process with this id (an int) runs here (one of another user's counts as alive). Never raises."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def flush_standard_streams():
    """Flush sys.stdout and sys.stderr, skipping a missing or closed one. Never raises."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass


@contextlib.contextmanager
def silenced_native_output(stdout=False):
    """The one silencer of native libraries' output: file descriptor 2 (with stdout=True, 1 and 2) pointed at
    /dev/null for the block. It catches what Python cannot: tokenizers' Rust panic message (and, with
    RUST_BACKTRACE, a backtrace of a hundred lines) printed before the panic reaches Python, ONNX Runtime's import
    warning and its C++ CUDA loader errors. With stdout=True sys.stdout and sys.stderr also point at a discarded
    buffer (Python output, also where they are not file descriptors 1 and 2, as under click's test runner).

    Raises nothing of its own: without the file descriptors (no stderr) the block runs unsilenced; whatever the
    block raises passes through.
    """
    fds = (1, 2) if stdout else (2,)
    flush_standard_streams()
    saved = []
    try:
        for fd in fds:
            saved.append(os.dup(fd))
    except OSError:  # no such file descriptor: nothing to silence
        for copy in saved:
            os.close(copy)
        saved = None
    if saved is None:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(devnull, fd)
        with contextlib.ExitStack() as python_output:
            if stdout:
                python_output.enter_context(contextlib.redirect_stdout(StringIO()))
                python_output.enter_context(contextlib.redirect_stderr(StringIO()))
            yield
    finally:
        flush_standard_streams()
        for fd, copy in zip(fds, saved):
            os.dup2(copy, fd)
        for copy in saved + [devnull]:
            os.close(copy)


JSON_MAX_BYTES = 16 * 2**20  # config.json and manifest.json are a few kB; a 2 GB one took 4 GB of memory to refuse


def read_json(path, when_missing, max_bytes=JSON_MAX_BYTES):
    """The JSON value in path (a UTF-8 byte-order mark at its start is skipped). Raises RefformerError "{path} is
    missing: {when_missing}", "... is not valid JSON" (also for nesting too deep for Python's parser and integers
    of over 4300 digits) or "... is larger than ..." for a file over max_bytes (refused before it is read)."""
    path = Path(path)
    if not path.is_file():
        raise RefformerError(f"{path} is missing: {when_missing}")
    size = path.stat().st_size
    if size > max_bytes:
        raise RefformerError(f"{path} is {size / 2**20:.0f} MiB, larger than the {max_bytes // 2**20} MiB such a file "
                             "can be: not a refformer file")
    try:
        return json.loads(read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RefformerError(f"{path} is not valid JSON: {error}") from None
    except RecursionError:
        raise RefformerError(f"{path} is not valid JSON: nested too deeply") from None
    except ValueError as error:  # an integer of over 4300 digits
        raise RefformerError(f"{path} is not valid JSON: {str(error).split(';')[0]}") from None


def load_config(model_dir):
    """Read and validate config.json of a model directory (finishing an interrupted save first: recover_save).
    Raises RefformerError for a missing folder or file, invalid JSON or config values."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise RefformerError(f"model directory {model_dir} does not exist")
    recover_save(model_dir)
    path = model_dir / CONFIG_FILE
    data = read_json(path, "not a refformer model directory")
    if not isinstance(data, dict):
        raise RefformerError(f"{path} must hold a JSON object")
    try:
        return Config.from_dict(data)
    except (TypeError, RefformerError) as error:  # Config names the field; the message names the file
        raise RefformerError(f"{path}: {error}") from None


def load(model_dir, dtype=np.float32):
    """Read a model directory -> (cfg, params), the parameters cast to dtype (float32 by default, or float64;
    a float16 or bfloat16 file widens exactly).

    Raises RefformerError for a missing folder or file, a pickle where model.safetensors should be, an unreadable
    or truncated safetensors file, or tensors whose names, shapes or dtypes do not match config.json.
    """
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
        import ml_dtypes  # noqa: F401  (onnx's dependency: registers bfloat16 with NumPy, so BF16 tensors load)
    except ImportError:
        pass
    try:
        flat = load_file(path)
    except (SafetensorError, OSError, ValueError, TypeError) as error:  # TypeError: a dtype NumPy does not know
        raise RefformerError(f"{path} is not a readable safetensors file (truncated or corrupt?): {error}") from None
    params = unflatten_checked(cfg, flat, str(path))
    return cfg, tree_cast(params, dtype)


def unflatten_checked(cfg, flat, source):
    """Rebuild the parameter tree of cfg from {dotted name: array} (bfloat16 arrays become float32). Raises
    RefformerError, naming source and the tensors, for missing or unexpected names, other shapes or a
    non-floating dtype."""
    shapes = flatten_shapes(cfg)
    missing = sorted(set(shapes) - set(flat))
    extra = sorted(set(flat) - set(shapes))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {few_names(missing)}")
        if extra:
            parts.append(f"unexpected {few_names(extra)}")
        raise RefformerError(f"{source} does not match its config: {'; '.join(parts)}")
    for name, shape in shapes.items():
        if tuple(flat[name].shape) != shape:
            raise RefformerError(f"{source}: {name} has shape {list(flat[name].shape)}, the config needs {list(shape)}")
        if flat[name].dtype.name == "bfloat16":  # as many checkpoints are saved; float32 holds it exactly
            flat[name] = flat[name].astype(np.float32)
        if flat[name].dtype.kind != "f":
            raise RefformerError(f"{source}: {name} has dtype {flat[name].dtype}, expected floating point")
    return unflatten(flat, param_shapes(cfg))


def check_params(cfg, params):
    """Raise RefformerError unless params has exactly cfg's names and shapes."""
    unflatten_checked(cfg, flatten(params), "params")


def flatten_shapes(cfg):
    """{dotted name: shape tuple} of cfg's parameters, in param_shapes' order. No checks (cfg is a Config)."""
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


def few_names(names, limit=4):
    """The first `limit` of names (strings), sorted and comma-separated, and how many more there are: for messages.

    Raises nothing for an iterable of strings.
    """
    names = sorted(names)
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_tokenizer(cfg, tokenizer_json, source):
    """The tokenizer in tokenizer_json (text), checked: its vocabulary size and special ids must match the config.
    Its padding and truncation sections are switched off, so that they never change what the model sees.
    Raises RefformerError naming source."""
    return check_tokenizer_matches(cfg, parse_tokenizer(tokenizer_json, source), source)


def without_padding_or_truncation(tokenizer):
    """Switch off a tokenizers.Tokenizer's padding and truncation (a tokenizer.json may carry them), so that they
    never change what the model sees; returns tokenizer.

    Raises nothing.
    """
    if tokenizer.padding is not None:
        tokenizer.no_padding()
    if tokenizer.truncation is not None:
        tokenizer.no_truncation()
    return tokenizer


def parse_tokenizer(tokenizer_json, source):
    """The tokenizers.Tokenizer of tokenizer_json (text), padding and truncation off. Raises RefformerError naming
    source when the text is not a valid tokenizer.json."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_str(tokenizer_json)
    except Exception as error:  # tokenizers raises its own exception types
        raise RefformerError(f"{source} is not a valid tokenizer.json: {error}") from None
    return without_padding_or_truncation(tokenizer)


def read_tokenizer(path):
    """The one reader of a tokenizer.json file (an existing file at path): parse_tokenizer of its text, a UTF-8
    byte-order mark dropped. Both loaders build on it: load_tokenizer (a model folder's, checked against its config)
    and refimpl.training.tokenizer.load_tokenizer (any file, checked for the special tokens at ids 0-3).

    Raises RefformerError for a file larger than TOKENIZER_MAX_BYTES, not UTF-8 text, or not a valid tokenizer.json.
    """
    try:
        text = read_text(path, TOKENIZER_MAX_BYTES)
    except UnicodeDecodeError as error:
        raise RefformerError(f"{path} is not UTF-8 text: {error}") from None
    return parse_tokenizer(text, str(path))


def check_tokenizer_matches(cfg, tokenizer, source, whose="the model's"):
    """A loaded tokenizers.Tokenizer must fit cfg: at most vocab_size tokens (fewer is fine: T5's tokenizer has
    32,100 tokens for 32,128 embedding rows, the rest never produced), and each special token (<pad>, <s>, </s>,
    <unk> and their spellings) it has at cfg's id; a special id that is null in cfg checks nothing (GPT-2 has no pad,
    and its tokenizer no <pad>). Returns tokenizer. whose names cfg in messages ("the model's", "config.json's").
    Raises RefformerError naming source."""
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > cfg.vocab_size:
        raise RefformerError(f"{source} has {size} tokens but {whose} vocab_size is {cfg.vocab_size}")
    for field, names in SPECIAL_TOKEN_NAMES.items():
        if getattr(cfg, field) is None:
            continue
        for name in names:
            token_id = tokenizer.token_to_id(name)
            if token_id is not None and token_id != getattr(cfg, field):
                raise RefformerError(f"{source} has {name} at id {token_id} but {whose} {field} is "
                                     f"{getattr(cfg, field)}")
    return tokenizer


def load_tokenizer(model_dir):
    """The model directory's tokenizer.json as a tokenizers.Tokenizer, checked against its config. Raises
    RefformerError for a missing or bad config.json or tokenizer.json, or a tokenizer whose vocabulary size or
    special ids differ from the config's."""
    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    path = model_dir / TOKENIZER_FILE
    if not path.is_file():
        raise RefformerError(f"{path} is missing")
    return check_tokenizer_matches(cfg, read_tokenizer(path), str(path))
