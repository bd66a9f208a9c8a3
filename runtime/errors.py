"""The runtime raises the same exception type as refimpl; its commands print it as one line."""

import _thread
import errno
import functools
import os
import re
import sys
import threading

import click

from refformer.refimpl.errors import RefformerError

__all__ = ["InputTooLong", "RefformerError", "one_line_errors"]


class InputTooLong(RefformerError):
    """A text longer than the model's positions, refused by Generator.encode_rows (truncate off).

    str(): the problem and the library's remedy, "shorten it or create the Generator with truncate=True"; a front
    end words the remedy in its own terms with with_advice ("shorten it or pass --truncate" for generate and batch,
    "shorten it" for serve, which does not cut texts). problem: the text's name and length against the model's.
    """

    ADVICE = "shorten it or create the Generator with truncate=True"

    def __init__(self, problem, advice=ADVICE):
        super().__init__(f"{problem}; {advice}")
        self.problem, self.advice = problem, advice

    def __reduce__(self):
        """pickle and copy rebuild it from (problem, advice): from args alone (the whole message taken as the
        problem) the remedy was said twice once it crossed a process (a ProcessPoolExecutor, a Ray task)."""
        return type(self), (self.problem, self.advice)

    def with_advice(self, advice):
        """The same refusal with another remedy (an InputTooLong). Raises nothing."""
        return InputTooLong(self.problem, advice)


def one_line_errors(command):
    """Print RefformerError (and unreadable files) as one line 'error: ...' and exit 1, never a traceback; Ctrl-C is
    'error: interrupted' and exit 130; a closed pipe on stdout ends the command quietly with exit 1."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        hook, sys.unraisablehook = sys.unraisablehook, reraise_interrupts
        try:
            result = command(*args, **kwargs)
            if REPLAYED_INTERRUPTS:  # the command ended before the replayed Ctrl-C reached it
                raise KeyboardInterrupt
            return result
        except RefformerError as error:
            click.echo(f"error: {shorten(str(error))}", err=True)
            sys.exit(1)
        except BrokenPipeError:  # stdout's reader went away (`refformer generate --input f | head -1`): no message
            quiet_stdout()
            sys.exit(1)
        except OSError as error:
            click.echo(f"error: {shorten(os_error_message(error))}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except ImportError as error:  # pybind11 modules (onnx, onnxruntime) turn a Ctrl-C in their import into this
            if not isinstance(error.__cause__ or error.__context__, KeyboardInterrupt):
                raise
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        finally:
            sys.unraisablehook = hook
            while REPLAYED_INTERRUPTS:
                REPLAYED_INTERRUPTS.pop().cancel()
    return wrapper


REPLAYED_INTERRUPTS = []  # reraise_interrupts' timers, cancelled when the command ends


def reraise_interrupts(unraisable):
    """sys.unraisablehook while a command runs: a Ctrl-C that lands in code Python cannot raise from (a weakref or
    __del__ callback, where it only prints 'Exception ignored in ...' and a traceback, and the command went on to
    exit 0) is raised again in the main thread, so the command still ends 'error: interrupted' (exit 130). Other
    unraisable exceptions go to Python's default hook.

    Raises nothing itself.
    """
    if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
        # from another thread, once the hook has returned: raised in the hook it would be reported once more
        timer = threading.Timer(0.01, _thread.interrupt_main)
        timer.daemon = True
        REPLAYED_INTERRUPTS.append(timer)
        timer.start()
        return
    sys.__unraisablehook__(unraisable)


LONG_WORD = re.compile(r"\S{161,}")


def shorten(message):
    """message with each word (a path, a value) over 160 characters cut to its first and last 70: a 5000-character
    path is not echoed whole (as usage errors do it, runtime/options.py).

    Raises nothing.
    """
    return LONG_WORD.sub(lambda match: f"{match[0][:70]}...{match[0][-70:]}", " ".join(message.split()))


def shown(path):
    """A path for a message line: as it is, or quoted with escapes when it holds a line break or another control
    character (a file named "new\\nline.jsonl" split the 'wrote ...' line in two).

    Raises nothing.
    """
    path = str(path)
    return path if path.isprintable() else repr(path)


def os_error_message(error):
    """One line for an OSError: its reason and file; a relative path's ENOENT in a current folder that was deleted
    says so (os.getcwd fails: 'No such file or directory' with no file name was all there was).

    Raises nothing: a deleted current folder is caught.
    """
    if error.filename is None and error.errno == errno.ENOENT:
        try:
            os.getcwd()
        except OSError:
            return "the current folder no longer exists: cd to an existing folder, or pass absolute paths"
    return f"{error.strerror or error}: {error.filename or ''}".rstrip(": ")


def quiet_stdout():
    """Point stdout at /dev/null, so that Python's flush at exit does not print a BrokenPipeError of its own.

    Raises nothing: a stdout without a file descriptor is left as it is.
    """
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, AttributeError, ValueError):
        pass
