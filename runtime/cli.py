"""The `refformer` command line. Each command's work lives in a module; this file only parses options."""

import functools
import sys
from importlib.metadata import PackageNotFoundError, version

import click

from refformer.refimpl.errors import RefformerError


def _version():
    try:
        return version("refformer")
    except PackageNotFoundError:
        return "unknown"


def one_line_errors(command):
    """Print RefformerError (and unreadable files) as one line 'error: ...' and exit 1, never a traceback."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except RefformerError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(1)
        except OSError as error:
            click.echo(f"error: {error.strerror or error}: {error.filename or ''}".rstrip(": "), err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(_version(), "--version", prog_name="refformer")
def main():
    """refformer: a verified NumPy Transformer, exported to ONNX for fast generation."""


@main.command("golden")
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="The .npz file to write.")
@click.option("--seed", default=0, show_default=True, help="Seed of the fixed random inputs.")
@one_line_errors
def golden_command(model_dir, out_path, seed):
    """Write fixed inputs, every intermediate activation and every gradient of MODEL_DIR, in float64, to an .npz."""
    from refformer.refimpl.golden import write_golden

    arrays = write_golden(model_dir, out_path, seed)
    click.echo(f"wrote {len(arrays)} arrays to {out_path}")


@main.command("convert-torch")
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


from refformer.runtime.data_cli import data, tokenizer  # noqa: E402
main.add_command(data); main.add_command(tokenizer)
