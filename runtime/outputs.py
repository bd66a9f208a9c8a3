"""Checks of a file a command is about to write (generate's --output, golden's --out, tokenizer train's --out),
made before any model is loaded: one checker for all, so that a folder, a dangling link, a pipe, a missing or
read-only folder, one of the command's inputs and an existing file are refused alike. Also the command-specific
rules built on it (check_tokenizer_output, check_generate_output with check_not_in_model) and convert-torch's
--out model folder (check_model_output_folder)."""

import os
from pathlib import Path

from refformer.refimpl.errors import RefformerError
from refformer.refimpl.io import CONFIG_FILE, MODEL_FILES, TOKENIZER_FILE, WEIGHTS_FILE, leads_nowhere


def refuse_package_folder(path, flag):
    """Refuse an output path inside refformer's own package folders (where the bundled model lives, installed or
    editable): their files are refformer's, not the user's, so no command writes there, --overwrite or not.
    Raises RefformerError naming flag; a path that cannot be resolved (a loop of links) is left to the other checks.
    """
    from refformer.export.folder import packaged

    try:
        inside = packaged(Path(os.path.realpath(path)))
    except (OSError, RuntimeError):
        return
    if inside:
        raise RefformerError(f"{flag} {path} is inside refformer's own package folder (where the bundled model "
                             "lives); write elsewhere")


def check_output_file(path, overwrite, *, flag, inputs=(), same_as_input="is one of the command's inputs; pick "
                      "another file", not_regular_hint="give a file name", model_check=None):
    """Refuse a file path the command cannot or must not write. Raises RefformerError, naming flag ("--output",
    "--out"), when path is empty, is a folder or a symbolic link that leads nowhere, lies in a folder that is a file,
    is missing or is not writable, is one of inputs (then the message ends with same_as_input), is not a regular
    file (a device or a pipe; the message ends with not_regular_hint), or exists while overwrite is False.
    model_check(path), when given, runs after the folder checks (generate refuses the model folder's own files)."""
    path_text = path
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not str(path_text).strip():
        raise RefformerError(f"{flag} is empty; give a file name")
    if path.is_dir():
        raise RefformerError(f"{flag} {path_text} is a folder; give a file name")
    if leads_nowhere(path):
        raise RefformerError(f"{flag} {path_text} is a symbolic link that leads nowhere (a loop, or a missing "
                             "target); remove the link or give another file name")
    if parent.exists() and not parent.is_dir():
        raise RefformerError(f"{flag} {path_text}: {parent} is a file, not a folder")
    if not parent.is_dir():
        raise RefformerError(f"{flag} {path_text}: folder {parent} does not exist; create it first")
    refuse_package_folder(path_text, flag)
    if model_check is not None:
        model_check(path_text)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RefformerError(f"{flag} {path_text}: folder {parent} is not writable")
    if path.exists() and any(given is not None and Path(given).exists() and os.path.samefile(given, path)
                             for given in inputs):
        raise RefformerError(f"{flag} {path_text} {same_as_input}")
    if path.exists() and not path.is_file():  # a device or a pipe: --overwrite would not help
        raise RefformerError(f"{flag} {path_text} is not a regular file (a device or a pipe); {not_regular_hint}")
    if path.is_symlink() and not path.exists() and not overwrite:  # (with --overwrite it is written through)
        raise RefformerError(f"{flag} {path_text} is a symbolic link to a file still to be made; pass --overwrite to "
                             "write through it")
    if path.exists() and not overwrite:
        raise RefformerError(f"{flag} {path_text} exists; pass --overwrite to replace it")


def check_tokenizer_output(out, data_dir, overwrite):
    """Refuse tokenizer train's --out before training (check_output_file): a folder, a missing or read-only parent,
    a pipe or device, a split file of data_dir, one of the own files of a model folder, a checkpoint or a
    checkpoints folder (--overwrite or not), or an existing file without --overwrite. out, data_dir: Paths.
    Raises RefformerError."""
    from refformer.refimpl.training.checkpoint import LATEST_FILE, OPTIMIZER_FILE, STATE_FILE
    from refformer.refimpl.training.data import SPLITS, SUFFIX
    from refformer.refimpl.training.log import LOG_FILE

    def not_a_model_file(path):
        parent = Path(path).absolute().parent
        own = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, OPTIMIZER_FILE, STATE_FILE, LATEST_FILE,
               LOG_FILE)  # the files of a model folder, a checkpoint and a checkpoints folder
        holder = next((name for name in (CONFIG_FILE, WEIGHTS_FILE, LATEST_FILE)
                       if (parent / name).exists()), None) if Path(path).name in own else None
        if holder:  # --overwrite or not: replacing one of a model's (or a checkpoint's) own files breaks it
            what = "training run's checkpoints" if holder == LATEST_FILE else "model"
            raise RefformerError(f"--out {out} is one of the files of the {what} in {parent} (--overwrite or not): "
                                 "replacing it would break that; write the tokenizer elsewhere")

    check_output_file(out, overwrite, flag="--out",
                      inputs=[data_dir / f"{split}{suffix}" for split in SPLITS for suffix in SUFFIX.values()],
                      same_as_input=f"is a split file of {data_dir}: write the tokenizer elsewhere",
                      model_check=not_a_model_file)


def check_model_output_folder(out_dir, overwrite):
    """Refuse convert-torch's --out model folder before torch is loaded. Raises RefformerError when out_dir lies in
    refformer's own package folder (the bundled model's), is a file, has no parent folder, or holds anything
    (the message names its model files, if any) while overwrite is False."""
    from refformer.export.folder import packaged

    out = Path(out_dir)
    if out.exists() and packaged(out):
        raise RefformerError(f"--out {out} is inside refformer's own package folder (where the bundled model lives); "
                             "pick another folder")
    if out.exists() and not out.is_dir():
        raise RefformerError(f"--out {out} exists and is not a folder")
    if not out.parent.is_dir():
        raise RefformerError(f"--out {out}: folder {out.parent} does not exist")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        existing = [name for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE) if (out / name).exists()]
        held = f"already holds {', '.join(existing)}" if existing else "exists and is not empty"
        raise RefformerError(f"--out {out} {held}; pass --overwrite to write the model files into it")


def export_folders(model_dir):
    """The folders that hold model_dir's exports: MODEL_DIR/onnx and the model's folder in the per-user cache (paths as
    they are spelled, not resolved). A command's output must not go there: export replaces those folders.

    Raises RefformerError (export_locations) when model_dir's config.json or model.safetensors is missing.
    """
    from refformer.export.folder import EXPORTS_FOLDER, export_locations

    return [Path(model_dir) / EXPORTS_FOLDER, export_locations(model_dir, "-")[1].parent]


def export_folder_holding(path, model_dir):
    """The folder of export_folders(model_dir) that path (resolved, links followed) lies in, or None.

    Raises RefformerError as export_folders.
    """
    target = Path(os.path.realpath(path))
    for folder in export_folders(model_dir):
        if Path(os.path.realpath(folder)) in target.parents:
            return folder
    return None


def check_generate_output(output_path, input_path, overwrite, model_dir=None):
    """Refuse an --output that cannot be written, or would replace the input, a file of the model folder (even with
    --overwrite) or an existing file without --overwrite (before any model is loaded). Raises RefformerError."""
    check_output_file(output_path, overwrite, flag="--output",
                      inputs=() if input_path in (None, "-") else (input_path,),
                      same_as_input="is the --input file; write the results to another file",
                      not_regular_hint="give a file name, or --output - for stdout",
                      model_check=lambda path: check_not_in_model(path, model_dir))


def check_not_in_model(output_path, model_dir):
    """Refuse an --output that is one of the model folder's files (config.json, model.safetensors, tokenizer.json) or
    lies in its export folders (onnx/, the per-user cache), spelled any way (a symbolic link, ./, ../): generate
    reads them. Raises RefformerError."""
    from refformer.export.folder import EXPORTS_FOLDER
    from refformer.runtime.options import resolve_model

    try:
        model = Path(os.path.realpath(resolve_model(model_dir)))
    except RefformerError:  # no bundled model: the model folder is named as missing later
        return
    target = Path(os.path.realpath(output_path))
    if target in {model / name for name in MODEL_FILES} or model / EXPORTS_FOLDER in target.parents:
        raise RefformerError(f"--output {output_path} is a file of the model folder {model_dir or model}; write the "
                             "results to another file")
    if (model / CONFIG_FILE).is_file() and (model / WEIGHTS_FILE).is_file():
        cached = export_folder_holding(output_path, model)  # the model's exports in the cache
        if cached is not None:
            raise RefformerError(f"--output {output_path} is in the model's export folder "
                                 f"{Path(os.path.realpath(cached))}; write the results to another file")
