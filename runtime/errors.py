"""The runtime raises the same exception type as refimpl; its commands print it as one line."""

import functools
import sys

import click

from refformer.refimpl.errors import RefformerError

__all__ = ["RefformerError", "one_line_errors"]


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
