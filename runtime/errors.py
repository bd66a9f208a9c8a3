"""The runtime raises the same exception type as refimpl; its commands print it as one line."""

import functools
import sys

import click

from refformer.refimpl.errors import RefformerError

__all__ = ["RefformerError", "one_line_errors"]


def one_line_errors(command):
    """Print RefformerError (and unreadable files) as one line 'error: ...' and exit 1, never a traceback; Ctrl-C is
    'error: interrupted' and exit 130; a closed pipe on stdout ends the command quietly with exit 1."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except RefformerError as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(1)
        except BrokenPipeError:  # stdout's reader went away (`refformer generate --input f | head -1`): no message
            quiet_stdout()
            sys.exit(1)
        except OSError as error:
            click.echo(f"error: {error.strerror or error}: {error.filename or ''}".rstrip(": "), err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
    return wrapper


def quiet_stdout():
    """Point stdout at /dev/null, so that Python's flush at exit does not print a BrokenPipeError of its own."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, AttributeError, ValueError):
        pass
