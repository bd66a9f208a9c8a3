"""`refformer export`, `verify`, `golden` and `convert-torch`: the commands around the exported graphs and the
reference's own files. runtime/cli.py registers them."""

import sys
from pathlib import Path

import click

from refformer.export.contract import DEFAULT_OPSET
from refformer.export.session import PROVIDER_OPTIONS, resolve_providers
from refformer.refimpl.errors import RefformerError
from refformer.runtime.errors import one_line_errors
from refformer.runtime.options import NonEmptyPath, dtype_option, model_option, resolve_model

MAX_SPECIAL_ID = 2**31 - 1  # token ids are int64 in the graphs; a vocabulary is far smaller than this anyway


def check_seed(seed):
    """--seed: any integer >= 0. Raises RefformerError for a negative one."""
    if seed < 0:
        raise RefformerError(f"--seed must be >= 0, got {seed}")


@click.command("golden")
@model_option
@click.option("--out", "out_path", required=True, type=NonEmptyPath(dir_okay=False), help="The .npz file to write.")
@click.option("--seed", default=0, show_default=True, help="Seed of the fixed random inputs (an integer >= 0).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@one_line_errors
def golden_command(model_dir, out_path, seed, overwrite):
    """Write fixed inputs, every intermediate activation and every gradient of --model, in float64, to an .npz.

    \f
    Raises nothing to its caller: one_line_errors prints RefformerError (a negative --seed, a bad model folder, an
    --out check_output_file refuses or inside an export folder, weights with NaN or inf) as one line `error: ...` and
    exits 1.
    """
    from refformer.export.graph import check_weights
    from refformer.refimpl.convert.golden import write_golden
    from refformer.refimpl.io import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE, load, load_config
    from refformer.runtime.outputs import check_output_file, export_folder_holding

    check_seed(seed)
    model_dir = resolve_model(model_dir)
    load_config(model_dir)  # a missing or bad model folder is named first
    check_output_file(out_path, overwrite, flag="--out",
                      inputs=[Path(model_dir) / name for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE)])
    exports = export_folder_holding(out_path, model_dir)  # the model's, or the cache's
    if exports is not None:
        raise RefformerError(f"--out {out_path} is in the model's export folder {exports}; pick a file elsewhere")
    check_weights(load(model_dir)[1], None, Path(model_dir) / WEIGHTS_FILE)  # NaN in, NaN out: refuse it here
    arrays = write_golden(model_dir, out_path, seed, overwrite=overwrite)
    click.echo(f"wrote {len(arrays)} arrays to {out_path}")


@click.command("convert-torch")
@click.argument("state_dict", type=NonEmptyPath(dir_okay=False))
@click.option("--tokenizer", "tokenizer_path", required=True, type=NonEmptyPath(dir_okay=False),
              help="tokenizer.json whose vocabulary matches the model.")
@click.option("--out", "out_dir", required=True, type=NonEmptyPath(file_okay=False), help="Model directory to write.")
@click.option("--overwrite", is_flag=True, help="Write into --out although it exists and is not empty (its model "
              "files are replaced).")
@click.option("--n-heads", required=True, type=int, help="Attention heads (not recorded in a state_dict).")
@click.option("--norm-first/--post-ln", default=False, show_default=True, help="Pre-LN (norm_first) or post-LN layers.")
@click.option("--activation", type=click.Choice(["relu", "gelu"]), default="relu", show_default=True)
@click.option("--positional", type=click.Choice(["none", "sinusoidal", "learned"]), default=None,
              help="Positional encoding: required when the state_dict has no position table (the textbook "
              "Embedding + nn.Transformer + Linear model: none); default: what its table shows (learned, or "
              "sinusoidal for a sinusoidal table).")
@click.option("--max-positions", type=int, default=None, help="Longest sequence the model takes.")
@click.option("--embed-scale/--no-embed-scale", default=None,
              help="Whether the model multiplies embeddings by sqrt(D) (PyTorch's translation tutorial: --embed-scale; "
                   "the textbook Embedding + nn.Transformer + Linear model: --no-embed-scale). Required: a "
                   "state_dict does not show it.")
@click.option("--pad-id", default="0", show_default=True,
              help="The padding token's id, or none: no token is masked as padding (a model whose forward passes no "
              "key_padding_mask, as the textbook Embedding + nn.Transformer + Linear model).")
@click.option("--bos-id", type=int, default=1, show_default=True)
@click.option("--eos-id", type=int, default=2, show_default=True)
@click.option("--unk-id", type=int, default=3, show_default=True)
@one_line_errors
def convert_torch_command(state_dict, tokenizer_path, out_dir, overwrite, **arch):
    """Convert a saved torch state_dict of an Embedding + nn.Transformer + Linear model to a model directory.

    The file is read with torch.load(weights_only=True): a pickled module is refused.

    \f
    Raises nothing to its caller: one_line_errors prints RefformerError (a bad --n-heads, --max-positions or special
    id, a refused --out, torch missing, or convert_state_dict_file's errors) as one line `error: ...` and exits 1.
    """
    from refformer.runtime.outputs import check_model_output_folder

    if arch["n_heads"] < 1:
        raise RefformerError(f"--n-heads must be >= 1, got {arch['n_heads']}")
    if arch["max_positions"] is not None and arch["max_positions"] < 2:
        raise RefformerError(f"--max-positions must be >= 2, got {arch['max_positions']}")
    if arch["pad_id"].strip().lower() == "none":
        arch["pad_id"] = None  # null: passed on as such (the other options' None means "not given")
    else:
        try:
            arch["pad_id"] = int(arch["pad_id"])
        except ValueError:
            raise RefformerError(f"--pad-id must be a token id >= 0 (below the vocabulary size) or none, "
                                 f"got {arch['pad_id']!r}") from None
    for name in ("pad_id", "bos_id", "eos_id", "unk_id"):
        if arch[name] is not None and not 0 <= arch[name] <= MAX_SPECIAL_ID:
            raise RefformerError(f"--{name.replace('_', '-')} must be a token id >= 0 (below the vocabulary size), "
                                 f"got {arch[name]}")
    check_model_output_folder(out_dir, overwrite)
    try:
        import torch  # noqa: F401
    except ImportError:
        raise RefformerError("convert-torch needs torch: pip install 'refformer[torch]'") from None
    from refformer.refimpl.convert.torch import convert_state_dict_file

    arch = {key: value for key, value in arch.items() if value is not None or key == "pad_id"}
    cfg = convert_state_dict_file(state_dict, tokenizer_path, out_dir, **arch)
    click.echo(f"wrote {out_dir}"
               + (f" ({cfg.family}, D={cfg.d_model}, V={cfg.vocab_size})" if cfg is not None else ""))


EXPORT_VARIANT_HELP = {
    "fused": "Also write decoder_fused.onnx (ONNX Runtime's com.microsoft MultiHeadAttention); with --static-length "
             "also decoder_static_mha.onnx and decoder_static_fused.onnx (contrib ops, fused norms).",
    "static": "Also write decoder_static.onnx (fixed-size cache of this many slots, in-graph argmax).",
}
VERIFY_VARIANT_HELP = {
    "fused": "Check the export set with the fused-attention graphs (written by export --fused-attention).",
    "static": "Check the export set with static graphs of this many slots (written by export --static-length).",
}


def variant_options(helps):
    """--static-length and --fused-attention: which export set export writes and verify checks (helps: their help).

    Raises nothing: the options' values are checked by the commands.
    """
    def decorate(function):
        function = click.option("--fused-attention", is_flag=True, help=helps["fused"])(function)
        return click.option("--static-length", type=int, default=None, help=helps["static"])(function)
    return decorate


@click.command("export")
@model_option
@dtype_option("fp32", "Graph precision. int8: the fp32 decoders with int8 weights (ONNX Runtime's quantization; "
              "float32 inputs and outputs, the encoder fp32, CPU only).")
@click.option("--opset", type=int, default=DEFAULT_OPSET, show_default=True,
              help="ONNX opset (>= 17 for LayerNormalization).")
@click.option("--out", "out_dir", type=NonEmptyPath(file_okay=False), default=None,
              help="Folder to write (default: the model folder's onnx/DTYPE[-staticL][-fused]; the per-user cache for "
                   "the bundled model). An existing folder is replaced only if it is a refformer export.")
@click.option("--external-data", is_flag=True, default=None,
              help="Keep weights in .data files beside the graphs (automatic above 2 GB).")
@variant_options(EXPORT_VARIANT_HELP)
@one_line_errors
def export_command(model_dir, dtype, opset, out_dir, external_data, static_length, fused_attention):
    """Export --model (default: the bundled model) to ONNX graphs (encoder.onnx, decoder.onnx, manifest.json).

    \f
    Raises nothing to its caller: one_line_errors prints RefformerError (a bad --static-length or empty --out, or
    export_model's errors) as one line `error: ...` and exits 1.
    """
    from refformer.export.export import export_model
    from refformer.export.folder import default_export_dir

    model_dir = resolve_model(model_dir)
    if static_length is not None and static_length < 1:
        raise RefformerError(f"--static-length must be >= 1, got {static_length}")
    if out_dir is not None and not out_dir.strip():
        raise RefformerError("--out is empty; give a folder (or leave --out out for the default place)")
    manifest = export_model(model_dir, out_dir, dtype=dtype, opset=opset, external_data=external_data,
                            static_length=static_length, fused_attention=fused_attention)
    out = out_dir or default_export_dir(model_dir, dtype, static_length, fused_attention)
    error = manifest.get("error", {})
    click.echo(f"wrote {out} ({manifest['family']}, {dtype}, opset {opset}); "
               f"max error vs refimpl on ONNX Runtime CPU: {error.get('max', float('nan')):.2e}")


def manifest_set_name(manifest):
    """The export set name (export/folder.py export_name: `<dtype>[-static<L>][-fused]`) that a manifest's graphs
    make: its dtype, decoder_static's max_length L, and -fused when it holds a com.microsoft decoder (decoder_fused,
    decoder_static_mha or decoder_static_fused). Raises nothing (read_manifest has checked the graphs' shape)."""
    from refformer.export.contract import FUSED, STATIC, STATIC_FUSED, STATIC_MHA, decoder_graph
    from refformer.export.folder import export_name

    graphs = manifest.get("graphs") or {}
    static = graphs.get(decoder_graph(STATIC))
    fused = any(decoder_graph(variant) in graphs for variant in (FUSED, STATIC_MHA, STATIC_FUSED))
    return export_name(str(manifest.get("dtype")), static.get("max_length") if isinstance(static, dict) else None,
                       fused)


def check_set_named(onnx_dir, manifest, asked):
    """verify --dtype/--static-length/--fused-attention find the set by its folder's name (find_export); `export
    --out MODEL/onnx/int8-static128` (no --static-length) can put another set's graphs there, and verify then checked
    no static graph while the table said all was well. Refuse a folder named asked whose manifest makes another set.
    A folder with another name (the only set there is, found with no options) is what it is. Raises
    RefformerError."""
    made = manifest_set_name(manifest)
    if Path(onnx_dir).name == asked and made != asked:
        raise RefformerError(f"{onnx_dir} holds the {made} export set, not the {asked} set its name says (written "
                             f"there with `export --out`?): run `refformer export` with the options that name {asked} "
                             f"again, or check what it holds with --onnx-dir {onnx_dir}")


@click.command("verify")
@model_option
@click.option("--onnx-dir", type=NonEmptyPath(file_okay=False), default=None,
              help="Export folder (default: the export set of --model named by --dtype, --static-length and "
                   "--fused-attention; without them fp32, or the only one there is).")
@dtype_option(None, "Which export set (default fp32).")
@variant_options(VERIFY_VARIANT_HELP)
@click.option("--provider", type=click.Choice(sorted(PROVIDER_OPTIONS)), default="auto", show_default=True,
              help="auto: CPU, plus CUDA when it can be loaded.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random inputs (an integer >= 0).")
@one_line_errors
def verify_command(model_dir, onnx_dir, dtype, static_length, fused_attention, provider, seed):
    """Compare the exported graphs with refimpl (float64) and print the error table; exit 1 when a bound fails.

    \f
    Raises nothing to its caller: one_line_errors prints RefformerError (a negative --seed or --static-length, an
    empty --onnx-dir or one given with the set options, CUDA asked for but missing, or find_export's and verify's
    errors) as one line `error: ...` and exits 1.
    """
    from refformer.export.contract import check_exportable
    from refformer.export.folder import export_name, find_export, read_manifest
    from refformer.export.verify import providers_for, verify
    from refformer.refimpl.io import load_config

    check_seed(seed)
    if static_length is not None and static_length < 1:
        raise RefformerError(f"--static-length must be >= 1, got {static_length}")
    model_dir = resolve_model(model_dir)
    if onnx_dir is not None and not onnx_dir.strip():
        raise RefformerError("--onnx-dir is empty; give an export folder (or leave it out)")
    if onnx_dir is None:
        check_exportable(load_config(model_dir), ids=False)  # not "run refformer export", which would refuse
        onnx_dir = find_export(model_dir, dtype, static_length, fused_attention)
        check_set_named(onnx_dir, read_manifest(onnx_dir), export_name(dtype or "fp32", static_length,
                                                                       fused_attention))
    elif dtype is not None or static_length is not None or fused_attention:
        raise RefformerError("--onnx-dir names the export folder: leave out --dtype, --static-length and "
                             "--fused-attention")
    providers = providers_for(read_manifest(onnx_dir).get("dtype"), resolve_providers(provider, checking=True))
    click.echo(f"verifying {onnx_dir} on {', '.join(providers)}")
    rows, dtype = verify(model_dir, onnx_dir, providers, seed)
    width = max(len(row["output"]) for row in rows)
    click.echo(f"{'check':<12} {'provider':<22} {'output':<{width}} {'error':>9}  bound")
    for row in rows:
        mark = "ok" if row["ok"] else "FAIL"
        click.echo(f"{row['check']:<12} {row['provider']:<22} {row['output']:<{width}} {row['error']:9.2e}  "
                   f"{row['bound']:.0e} {mark}")
    failed = [row for row in rows if not row["ok"]]
    if failed:
        click.echo(f"error: {len(failed)} of {len(rows)} outputs exceed the {dtype} bound", err=True)
        sys.exit(1)
    click.echo(f"all {len(rows)} outputs within the {dtype} bound {rows[0]['bound']:.0e}")
