"""`refformer generate`: translate / continue texts with a model directory (default: the bundled model). This module
parses the options and prints; the batch loop and the record writer live in runtime/batch.py.

Output: stdout gets plain lines (one per input; with --num-return-sequences K > 1, K lines per input, each
"N.k<TAB>text", N the input's line number or TEXT position and k = 1..K; a line break inside an output is printed
as a space), or JSON lines with --json. --output FILE always gets JSON lines. Records are written as each batch
finishes (flushed), in input order; on Ctrl-C the finished ones stay, one line on stderr says how many, and the
exit status is 130.
"""

import re
import sys
from pathlib import Path

import click

from refformer.export.contract import VARIANT_OPTIONS
from refformer.refimpl.errors import RefformerError
from refformer.runtime.errors import one_line_errors
from refformer.runtime.options import NonEmptyPath, dtype_option, model_option, provider_option

OPTION_NAMES = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed", "num_beams",
                "length_penalty", "early_stopping", "num_return_sequences", "repetition_penalty",
                "no_repeat_ngram_size")


def option_flags(function):
    """The decoding options, named as in Hugging Face's generate.

    Raises nothing: GenerationOptions checks the values (generation_options).
    """
    decorators = [
        click.option("--max-new-tokens", type=int, default=None,
                     help="Default: 2 x source length + 10 (translation); capped to the model's positions."),
        click.option("--min-new-tokens", type=int, default=0, show_default=True),
        click.option("--do-sample/--greedy", default=False, show_default=True, help="Sample instead of argmax."),
        click.option("--temperature", type=float, default=1.0, show_default=True),
        click.option("--top-k", type=int, default=0, show_default=True, help="0: off."),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--num-beams", type=int, default=1, show_default=True),
        click.option("--length-penalty", type=float, default=1.0, show_default=True),
        click.option("--early-stopping", is_flag=True, default=False),
        click.option("--num-return-sequences", type=int, default=1, show_default=True),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True),
        click.option("--no-repeat-ngram-size", type=int, default=0, show_default=True),
        click.option("--seed", type=int, default=None,
                     help="Seed of the sampling draws (>= 0). Default: a new one every run, given in the JSON "
                          "records."),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def flag_names(error):
    """A RefformerError whose message names the command's flags (--top-p, --batch-size) instead of the fields."""
    message = re.sub(r"\b(" + "|".join(OPTION_NAMES) + r")\b", lambda m: "--" + m.group(1).replace("_", "-"),
                     str(error))
    return RefformerError(message.replace("the batch size", "--batch-size"))


def generation_options(options):
    """GenerationOptions from the command's flags. Raises RefformerError for a bad value, naming its flag (--top-p,
    not top_p)."""
    from refformer.refimpl.generate import GenerationOptions

    try:
        return GenerationOptions(**options)
    except RefformerError as error:
        raise flag_names(error) from None


def check_fits_memory(model_dir, generation, batch_size):
    """Refuse beams x batch that cannot fit in memory, from the model's config.json alone (before loading it).
    Raises RefformerError naming the flags to lower, or for a missing or broken config.json."""
    from refformer.refimpl.generate import check_search_fits_memory
    from refformer.refimpl.io import load_config
    from refformer.runtime.options import resolve_model

    cfg = load_config(resolve_model(model_dir))
    try:
        check_search_fits_memory(cfg, generation, batch_size)
    except RefformerError as error:
        raise flag_names(error) from None


@click.command("generate")
@click.argument("texts", nargs=-1)
@model_option
@click.option("--input", "input_path", type=NonEmptyPath(allow_dash=True), default=None, metavar="FILE",
              help="File of inputs, one per line or JSONL; - for stdin.")
@click.option("--output", "output_path", type=NonEmptyPath(), default=None,
              help="Write JSON lines here (as each batch finishes); - for stdout.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file (at the end of the run).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of plain text.")
@provider_option
@dtype_option("fp32", "Graph precision (exported on first use). int8: int8 weights, on the CPU (auto picks it).")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (capped to the CPU count).")
@click.option("--variant", type=click.Choice(list(VARIANT_OPTIONS)),
              default="auto", show_default=True,
              help="Decoder graph. auto: on CUDA static_fused (fp16), then static_mha, then static, those that compute "
                   "the model, each replayed as CUDA graphs, moving on with a notice when one fails a probe; on the "
                   "CPU the reference graph (static_fused first for int8 encoder-decoders and imported rotary "
                   "decoder-only models in fp32).")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Inputs per batch with --input.")
@click.option("--truncate", is_flag=True, help="Cut inputs longer than the model's positions (with a warning).")
@option_flags
def generate(texts, model_dir, input_path, output_path, overwrite, as_json, provider, dtype, threads, variant,
             batch_size, truncate, **options):
    """Generate from TEXT (streamed to the terminal) or from --input FILE (batched).

    stdout: plain lines, or JSON lines with --json; --output FILE: JSON lines. Exit 1 when an input failed
    (reported in its record), 130 on Ctrl-C (the finished records kept).

    \f
    Raises nothing to its caller: one_line_errors prints run's RefformerError (a bad option, input or output) and any
    unexpected error (without_tracebacks) as one line `error: ...` and exits 1.
    """
    one_line_errors(without_tracebacks(run))(texts, model_dir, input_path, output_path, as_json, provider, dtype,
                                             threads, batch_size, truncate, options, variant, overwrite)


def without_tracebacks(function):
    """An unexpected exception (out of memory, an ONNX Runtime failure) becomes a RefformerError of one line."""
    def wrapper(*args):
        try:
            return function(*args)
        except (RefformerError, OSError, click.ClickException):
            raise
        except MemoryError:
            raise RefformerError("out of memory: lower --batch-size, --num-beams or --num-return-sequences") from None
        except BaseException as error:  # noqa: BLE001  (a user gets one line, not a traceback)
            if not isinstance(error, Exception) and type(error).__name__ != "PanicException":
                raise  # Ctrl-C, sys.exit; a Rust panic in tokenizers (pyo3's PanicException) is a BaseException too
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise RefformerError(f"generation failed: {type(error).__name__}{': ' + reason if reason else ''}"
                                 ) from None
    return wrapper


def refuse_model_folder_as_text(texts):
    """`refformer generate m "text"` with m a model folder: a usage error pointing to --model, not a translation of
    m. Raises click.UsageError."""
    from refformer.refimpl.io import CONFIG_FILE

    for text in texts:
        try:
            is_model = (Path(text) / CONFIG_FILE).is_file()
        except (OSError, ValueError):  # a text too long or odd to be a path
            is_model = False
        if is_model:
            raise click.UsageError(f"refformer generate takes the model folder as --model DIR, not as an argument "
                                   f"(got the folder {text!r}); use --model {text}")


def check_threads(threads):
    """--threads: >= 1, and at most the CPU count (capped with a notice); None stays None. Raises RefformerError
    for a value below 1."""
    if threads is None:
        return None
    if threads < 1:
        raise RefformerError(f"--threads must be >= 1, got {threads}")
    from refformer.runtime.generator import capped_threads

    capped = capped_threads(threads)
    if capped < threads:
        click.echo(f"notice: --threads {threads} is more than the {capped} CPUs here; using {capped}", err=True)
    return capped


def run(texts, model_dir, input_path, output_path, as_json, provider, dtype, threads, batch_size, truncate, options,
        variant="auto", overwrite=False):
    """The generate command's work, after click parsed the options: checks every option and the output before any
    model is loaded, then streams one TEXT to the terminal or runs the inputs through runtime/batch.write_batches.
    Exits 1 when an input failed, 130 on Ctrl-C. Raises RefformerError (printed as one line by the caller) for a bad
    option value, input or output, and click.UsageError for a model folder given as TEXT."""
    from refformer.runtime.batch import (
        TRUNCATE_ADVICE,
        BatchesInterrupted,
        input_lines,
        printable,
        truncation_warning,
        write_batches,
    )
    from refformer.runtime.errors import InputTooLong, shown
    from refformer.runtime.generator import Generator
    from refformer.runtime.outputs import check_generate_output

    refuse_model_folder_as_text(texts)
    generation = generation_options(options)  # bad option values fail before any model is loaded
    if not texts and input_path is None:
        raise RefformerError("give a TEXT to translate, or --input FILE (- for stdin)")
    if texts and input_path is not None:
        raise RefformerError("give TEXT arguments or --input, not both")
    if batch_size < 1:
        raise RefformerError(f"--batch-size must be >= 1, got {batch_size}")
    if output_path == "-":  # as for --input: stdout, in --output's format (JSON lines), not a file named "-"
        output_path, as_json = None, True
    if output_path is not None:
        check_generate_output(output_path, input_path, overwrite, model_dir)
    elif sys.stdout is None:
        raise RefformerError("stdout is closed; pass --output FILE")
    lines = input_lines(texts, input_path)
    threads = check_threads(threads)
    check_fits_memory(model_dir, generation, min(batch_size, max(1, len(lines))))
    if not any(error is None for _, _, error, _ in lines):  # only bad lines (or none): their records need no model
        generator = None
    else:
        generator = Generator(model_dir, provider=provider, dtype=dtype, threads=threads, truncate=truncate,
                              variant=variant)

    if len(texts) == 1 and output_path is None and not as_json and generation.num_return_sequences == 1:
        try:
            for piece in generator.stream(texts[0], **vars(generation)):
                click.echo(printable(piece), nl=False)
                sys.stdout.flush()
        except InputTooLong as error:
            raise error.with_advice(TRUNCATE_ADVICE) from None
        click.echo()
        return
    try:
        done = write_batches(generator, generation, lines, output_path=output_path, as_json=as_json,
                             overwrite=overwrite, input_path=input_path, batch_size=batch_size)
    except BatchesInterrupted as interrupted:
        click.echo(f"error: interrupted: {interrupted.written} of {len(lines)} inputs written to "
                   f"{shown(interrupted.where)}", err=True)
        sys.exit(130)
    if done.truncated:
        click.echo(truncation_warning(done.truncated), err=True)
    if done.failures:
        where = shown(output_path) if output_path else "the output"
        click.echo(f"error: {done.failures} of {len(lines)} inputs failed (reported in {where})", err=True)
        sys.exit(1)
    if output_path is not None:
        click.echo(f"wrote {done.written} records to {shown(output_path)}", err=True)
