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
