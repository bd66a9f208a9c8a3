"""Click pieces every `refformer` command shares: the --model option and the one-line usage errors."""

import re
import sys

import click

MODEL_HELP = "Model directory (default: the bundled German->English model)."


class NonEmptyPath(click.Path):
    """click.Path that refuses an empty string (`--out ''` trained into the current folder, `DATA_DIR ''` read it).

    Its convert raises click's BadParameter (exit 2, one line through Group.main) for an empty string, else what
    click.Path raises.
    """

    def convert(self, value, param, ctx):
        """click.Path.convert that refuses "": raises click's BadParameter for it."""
        if isinstance(value, str) and value == "":
            kind = "folder" if not self.file_okay else "file"
            self.fail(f"{value!r} is an empty path: give a {kind} name", param, ctx)
        return super().convert(value, param, ctx)


def model_option(function):
    """--model DIR, the model folder of every command that reads one; None means the bundled model.

    Raises nothing: the folder is checked where it is read (load_config).
    """
    return click.option("--model", "model_dir", type=NonEmptyPath(file_okay=False), default=None,
                        help=MODEL_HELP)(function)


def dtype_option(default, help):
    """--dtype: one of contract.EXPORT_DTYPES (fp32, fp16, int8), the export set a command writes or runs; default
    None where the option may be left out. help: the command's help text.

    Raises nothing: click checks the choice (a usage error, exit 2).
    """
    from refformer.export.contract import EXPORT_DTYPES

    return click.option("--dtype", type=click.Choice(EXPORT_DTYPES), default=default,
                        show_default=default is not None, help=help)


def provider_option(function):
    """--provider auto|cpu|cuda (export.session.PROVIDER_OPTIONS, default auto) for the commands that generate
    (generate, serve, batch). Raises nothing: click checks the choice (a usage error, exit 2)."""
    from refformer.export.session import PROVIDER_OPTIONS

    return click.option("--provider", type=click.Choice(list(PROVIDER_OPTIONS)), default="auto",
                        show_default=True)(function)


def resolve_model(model_dir):
    """model_dir, or the bundled model's folder when it is None.

    Raises RefformerError (default_model_dir) when model_dir is None and the bundled model is missing.
    """
    if model_dir is not None:
        return model_dir
    from refformer.runtime.generator import default_model_dir

    return default_model_dir()


def usage_message(error):
    """One line for a click usage error; a stray positional model folder gets a hint to use --model.

    Raises nothing.
    """
    message = " ".join(error.format_message().split())
    message = re.sub(r"'([^']{60})[^']{20,}'", r"'\1...'", message)  # a 5000-digit --seed is not echoed whole
    ctx = getattr(error, "ctx", None)
    command = ctx.command if ctx is not None else None
    takes_model = command is not None and any(param.name == "model_dir" for param in command.params)
    if takes_model and message.startswith("Got unexpected extra argument"):
        stray = message.split("(", 1)[-1].rstrip(")").split()[0] if "(" in message else "?"
        return (f"refformer {command.name} takes the model folder as --model DIR, not as an argument "
                f"(extra argument {stray!r})")
    return message


class Group(click.Group):
    """A click group whose usage errors are one 'error: ...' line on stderr (exit 2), as the README says."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """click.Group.main with usage errors, click exceptions, Abort, Ctrl-C and write failures turned into one
        `error: ...` line (none for a closed pipe) and SystemExit: 2 for usage errors, 130 for Ctrl-C, 1 otherwise.
        Other exceptions pass through (the commands print theirs with one_line_errors). standalone_mode=False:
        click's main as it is."""
        import signal

        if getattr(signal.getsignal(signal.SIGINT), "__name__", "") == "_interrupted_while_starting":
            signal.signal(signal.SIGINT, signal.default_int_handler)  # from here on, Ctrl-C is KeyboardInterrupt
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.NoArgsIsHelpError as error:  # `refformer`, `refformer data`: no command given
            ctx = error.ctx
            click.echo(ctx.get_help() if ctx is not None else "")
            where = f"{ctx.command_path} " if ctx is not None else ""
            click.echo(f"error: no command given: run `{where}COMMAND` with one of the commands above", err=True)
            sys.exit(error.exit_code)
        except click.UsageError as error:
            click.echo(f"error: {usage_message(error)}", err=True)
            sys.exit(error.exit_code)
        except click.ClickException as error:  # FileError and friends
            click.echo(f"error: {' '.join(error.format_message().split())}", err=True)
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        except BrokenPipeError:  # `refformer --help | head -1`
            from refformer.runtime.errors import quiet_stdout

            quiet_stdout()
            sys.exit(1)
        except OSError as error:  # --help or --version into a full disk (> /dev/full)
            click.echo(f"error: {error.strerror or error}: cannot write the output", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)
        try:
            if sys.stdout is not None:
                sys.stdout.flush()  # here, not at exit, where a closed pipe prints a message of Python's own
        except BrokenPipeError:
            from refformer.runtime.errors import quiet_stdout

            quiet_stdout()
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)
