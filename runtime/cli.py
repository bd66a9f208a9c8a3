"""The `refformer` command line. Each command's work lives in a module; this file only assembles the group."""

import click

from refformer import __version__
from refformer.runtime.batch_cli import batch
from refformer.runtime.data_cli import data, tokenizer
from refformer.runtime.export_cli import convert_torch_command, export_command, golden_command, verify_command
from refformer.runtime.generate_cli import generate
from refformer.runtime.import_cli import import_hf_command
from refformer.runtime.options import Group
from refformer.runtime.serve_cli import serve_command
from refformer.runtime.train_cli import evaluate, train


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="refformer")
def main():
    """refformer: a verified NumPy Transformer, exported to ONNX for fast generation.

    Bad input prints one line, 'error: ...', on stderr: exit status 2 for a usage error (an unknown option, a missing
    or malformed value), 1 for anything else.
    """


for command in (generate, export_command, verify_command, golden_command, convert_torch_command, data, tokenizer,
                train, evaluate, import_hf_command, serve_command, batch):
    main.add_command(command)
