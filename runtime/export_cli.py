"""`refformer export`, `verify`, `golden` and `convert-torch`: the commands around the exported graphs and the
reference's own files. runtime/cli.py registers them."""

import sys

import click

from refformer.refimpl.errors import RefformerError
from refformer.runtime.errors import one_line_errors
from refformer.runtime.options import model_option, resolve_model


@click.command("golden")
@model_option
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="The .npz file to write.")
@click.option("--seed", default=0, show_default=True, help="Seed of the fixed random inputs.")
@one_line_errors
def golden_command(model_dir, out_path, seed):
    """Write fixed inputs, every intermediate activation and every gradient of MODEL_DIR, in float64, to an .npz."""
    from refformer.refimpl.golden import write_golden

    model_dir = resolve_model(model_dir)
    arrays = write_golden(model_dir, out_path, seed)
    click.echo(f"wrote {len(arrays)} arrays to {out_path}")


@click.command("convert-torch")
@click.argument("state_dict", type=click.Path(dir_okay=False))
@click.option("--tokenizer", "tokenizer_path", required=True, type=click.Path(dir_okay=False),
              help="tokenizer.json whose vocabulary matches the model.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Model directory to write.")
@click.option("--n-heads", required=True, type=int, help="Attention heads (not recorded in a state_dict).")
@click.option("--norm-first/--post-ln", default=False, show_default=True, help="Pre-LN (norm_first) or post-LN layers.")
@click.option("--activation", type=click.Choice(["relu", "gelu"]), default="relu", show_default=True)
@click.option("--positional", type=click.Choice(["sinusoidal", "learned"]), default=None,
              help="Positional encoding (default: learned if the state_dict has a position table, else sinusoidal).")
@click.option("--max-positions", type=int, default=None, help="Longest sequence the model takes.")
@click.option("--embed-scale/--no-embed-scale", default=True, show_default=True,
              help="Whether the model multiplies embeddings by sqrt(D).")
@click.option("--pad-id", type=int, default=0, show_default=True)
@click.option("--bos-id", type=int, default=1, show_default=True)
@click.option("--eos-id", type=int, default=2, show_default=True)
@click.option("--unk-id", type=int, default=3, show_default=True)
@one_line_errors
def convert_torch_command(state_dict, tokenizer_path, out_dir, **arch):
    """Convert a saved torch state_dict of an Embedding + nn.Transformer + Linear model to a model directory.

    The file is read with torch.load(weights_only=True): a pickled module is refused.
    """
    try:
        import torch  # noqa: F401
    except ImportError:
        raise RefformerError("convert-torch needs torch: pip install 'refformer[torch]'") from None
    from refformer.refimpl.torch_convert import convert_state_dict_file

    arch = {key: value for key, value in arch.items() if value is not None}
    cfg = convert_state_dict_file(state_dict, tokenizer_path, out_dir, **arch)
    click.echo(f"wrote {out_dir}" + (f" ({cfg.family}, D={cfg.d_model}, V={cfg.vocab_size})" if cfg is not None else ""))

@click.command("export")
@model_option
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True)
@click.option("--opset", type=int, default=17, show_default=True, help="ONNX opset (>= 17 for LayerNormalization).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Folder to write (default MODEL_DIR/onnx).")
@click.option("--external-data", is_flag=True, default=None,
              help="Keep weights in .data files beside the graphs (automatic above 2 GB).")
@click.option("--static-length", type=int, default=None,
              help="Also write decoder_static.onnx (fixed-size cache of this many slots, in-graph argmax).")
@click.option("--fused-attention", is_flag=True,
              help="Also write decoder_fused.onnx (ONNX Runtime's com.microsoft MultiHeadAttention); with "
                   "--static-length also decoder_static_mha.onnx and decoder_static_fused.onnx (contrib ops, fused norms).")
@one_line_errors
def export_command(model_dir, dtype, opset, out_dir, external_data, static_length, fused_attention):
    """Export MODEL_DIR to ONNX graphs (encoder.onnx, decoder.onnx, manifest.json)."""
    from refformer.export.export import export_model

    model_dir = resolve_model(model_dir)
    out = out_dir or f"{model_dir}/onnx"
    manifest = export_model(model_dir, out_dir, dtype=dtype, opset=opset, external_data=external_data,
                            static_length=static_length, fused_attention=fused_attention)
    error = manifest.get("error", {})
    click.echo(f"wrote {out} ({manifest['family']}, {dtype}, opset {opset}); "
               f"max error vs refimpl on ONNX Runtime CPU: {error.get('max', float('nan')):.2e}")


@click.command("verify")
@model_option
@click.option("--onnx-dir", type=click.Path(file_okay=False), default=None, help="Export folder (default MODEL_DIR/onnx).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: CPU, plus CUDA when it can be loaded.")
@click.option("--seed", default=0, show_default=True)
@one_line_errors
def verify_command(model_dir, onnx_dir, provider, seed):
    """Compare the exported graphs with refimpl (float64) and print the error table; exit 1 when a bound fails."""
    from refformer.export.verify import cuda_usable, verify

    model_dir = resolve_model(model_dir)
    if onnx_dir is None:  # MODEL_DIR/onnx, or where `refformer generate` exported a read-only model
        from refformer.runtime.generator import export_locations

        local, cached = export_locations(model_dir)
        onnx_dir = cached if not (local / "manifest.json").is_file() and (cached / "manifest.json").is_file() else local
    providers = None
    if provider == "cpu":
        providers = ["CPUExecutionProvider"]
    elif provider == "cuda":
        if not cuda_usable():
            raise RefformerError("the CUDA execution provider cannot be loaded here (no GPU, or CUDA libraries missing)")
        providers = ["CUDAExecutionProvider"]
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
