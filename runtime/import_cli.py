"""`refformer import-hf`: a local Hugging Face folder (T5, BART, Marian, GPT-2, Llama, Qwen2) -> a refformer model
folder. runtime/cli.py registers it; the work is refimpl.convert.hf_folder.import_hf."""

import os
from pathlib import Path

import click

from refformer.refimpl.errors import RefformerError
from refformer.runtime.errors import one_line_errors, shown
from refformer.runtime.options import NonEmptyPath


def check_import_output(hf_dir, out_dir, overwrite):
    """Refuse --out before any work: the Hugging Face folder itself (--overwrite or not: its config.json would be
    replaced), a folder inside refformer's package folder, a file, a missing parent, or a non-empty folder without
    overwrite (outputs.check_model_output_folder). Raises RefformerError."""
    from refformer.runtime.outputs import check_model_output_folder, refuse_package_folder

    if Path(os.path.realpath(out_dir)) == Path(os.path.realpath(hf_dir)):
        raise RefformerError(f"--out {out_dir} is the Hugging Face folder itself; write the model folder elsewhere")
    refuse_package_folder(out_dir, "--out")
    check_model_output_folder(out_dir, overwrite)


@click.command("import-hf")
@click.argument("hf_dir", type=NonEmptyPath(file_okay=False))
@click.option("--out", "out_dir", required=True, type=NonEmptyPath(file_okay=False), help="Model folder to write.")
@click.option("--overwrite", is_flag=True, help="Write into --out although it is not empty (its model files are "
              "replaced).")
@one_line_errors
def import_hf_command(hf_dir, out_dir, overwrite):
    """Import a local Hugging Face folder (T5, BART, Marian, GPT-2, Llama, Qwen2) as a refformer model folder.

    Writes config.json, model.safetensors, tokenizer.json (tokenizer_target.json for Marian's target side) and
    generation.json; prints a 'notice:' line for each thing the runtime does not apply yet.

    \f
    Raises nothing to its caller: one_line_errors prints RefformerError (a folder without config.json, an unknown
    model_type or an option refformer cannot represent, a refused --out, a tokenizer that needs transformers) as one
    line `error: ...` and exits 1.
    """
    from refformer.refimpl.convert.hf import family_of, read_hf_config
    from refformer.refimpl.convert.hf_folder import import_hf

    family_of(read_hf_config(hf_dir))  # a folder that is not a supported Hugging Face model is named first
    check_import_output(hf_dir, out_dir, overwrite)
    cfg, notices = import_hf(hf_dir, out_dir)
    for notice in notices:
        click.echo(f"notice: {notice}", err=True)
    click.echo(f"wrote {shown(out_dir)} ({cfg.family}, D={cfg.d_model}, V={cfg.vocab_size}, "
               f"{cfg.n_encoder_layers}+{cfg.n_decoder_layers} layers)")
