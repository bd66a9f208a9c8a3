"""`refformer generate`: translate / continue texts with a model directory (default: the bundled model).

Output: stdout gets plain lines (one per input; with --num-return-sequences K > 1, K lines per input, each
"N.k<TAB>text", N the input's line number or TEXT position and k = 1..K; a line break inside an output is printed
as a space), or JSON lines with --json. --output FILE always gets JSON lines. Records are written as each batch
finishes (flushed), in input order; on Ctrl-C the finished ones stay, one line on stderr says how many, and the
exit status is 130.
"""

import codecs
import contextlib
import errno
import json
import os
import re
import stat
import sys
from pathlib import Path

import click

from refformer.refimpl.errors import RefformerError
from refformer.refimpl.io import leads_nowhere
from refformer.refimpl.training.interrupts import interrupts_deferred
from refformer.runtime.errors import one_line_errors
from refformer.runtime.options import NonEmptyPath, model_option

OPTION_NAMES = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed", "num_beams",
                "length_penalty", "early_stopping", "num_return_sequences", "repetition_penalty", "no_repeat_ngram_size")


def option_flags(function):
    """The decoding options, named as in Hugging Face's generate."""
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
                     help="Seed of the sampling draws (>= 0). Default: a new one every run, given in the JSON records."),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def flag_names(error):
    """A RefformerError whose message names the command's flags (--top-p, --batch-size) instead of the fields."""
    message = re.sub(r"\b(" + "|".join(OPTION_NAMES) + r")\b", lambda m: "--" + m.group(1).replace("_", "-"), str(error))
    return RefformerError(message.replace("the batch size", "--batch-size"))


def generation_options(options):
    """GenerationOptions from the command's flags; a bad value is refused naming its flag (--top-p, not top_p)."""
    from refformer.refimpl.generate import GenerationOptions

    try:
        return GenerationOptions(**options)
    except RefformerError as error:
        raise flag_names(error) from None


def check_fits_memory(model_dir, generation, batch_size):
    """Refuse beams x batch that cannot fit in memory, from the model's config.json alone (before loading it)."""
    from refformer.refimpl.generate import check_search_fits_memory
    from refformer.refimpl.io import load_config
    from refformer.runtime.options import resolve_model

    cfg = load_config(resolve_model(model_dir))
    try:
        check_search_fits_memory(cfg, generation, batch_size)
    except RefformerError as error:
        raise flag_names(error) from None


def read_inputs(raw):
    """(line number, text or None, error or None, extra fields) for each line of an input file's bytes.

    A line is plain text, or a JSON object with a "text" field (JSONL; its "id", if any, is passed through). A
    UTF-8 byte-order mark at the start is dropped (at the start of any line too: files joined with cat), and a
    file with a UTF-16 or UTF-32 byte-order mark is decoded as such (utf8_bytes). Each line is decoded on its own, so one non-UTF-8 line is reported without losing the others;
    a blank line is reported as empty, and a line with a raw NUL byte as a bad line (a JSON "\\u0000" is text).
    """
    raw = utf8_bytes(raw)
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8").removeprefix("\ufeff")  # also a mark inside: `cat a.jsonl b.jsonl` files
        except UnicodeDecodeError as error:
            yield number, None, f"line {number} is not valid UTF-8 (byte {error.start + 1})", {}
            continue
        if "\0" in text:  # text has no NUL bytes; a UTF-16 file without a byte-order mark has one in every character
            yield number, None, f"line {number} has a NUL byte (a binary or UTF-16 file? save it as UTF-8)", {}
            continue
        if not text.strip():
            yield number, None, f"line {number} is empty", {}
            continue
        extra = {}
        if text.lstrip().startswith("{"):
            try:
                record = json.loads(text, parse_constant=not_json, parse_float=finite_float)
            except json.JSONDecodeError as error:
                yield number, None, f"line {number} is not valid JSON: {error.msg}", {}
                continue
            except (ValueError, RecursionError) as error:  # an integer of over 4300 digits, nesting too deep, NaN
                reason = "nested too deeply" if isinstance(error, RecursionError) else str(error).split(";")[0]
                yield number, None, f"line {number} is not valid JSON: {reason}", {}
                continue
            if isinstance(record, dict) and "id" in record:
                extra["id"] = record["id"]
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                yield number, None, f'line {number}: a JSON line needs a "text" string', extra
                continue
            text = record["text"]
        yield number, text, None, extra


BOMS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"), (codecs.BOM_UTF8, "utf-8"),
        (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))  # UTF-32 LE starts like UTF-16 LE


def utf8_bytes(raw):
    """An input file's bytes as UTF-8 without a byte-order mark: a UTF-8 mark is dropped, a file with a UTF-16 or
    UTF-32 mark (Windows editors save "Unicode" text so) is decoded by it. Raises RefformerError for a file whose
    mark does not match its contents."""
    for bom, encoding in BOMS:
        if raw.startswith(bom):
            if encoding == "utf-8":
                return raw[len(bom):]
            try:
                return raw[len(bom):].decode(encoding).encode("utf-8")
            except UnicodeDecodeError as error:
                raise RefformerError(f"--input starts with a {encoding.upper()[:6]} byte-order mark but is not valid "
                                     f"{encoding.upper()[:6]} (byte {error.start + len(bom) + 1}); save it as UTF-8") from None
    return raw


def not_json(constant):
    """json.loads's parse_constant: NaN, Infinity and -Infinity are Python's extension, not JSON; refused (a record
    carrying them in its "id" would not be JSON either)."""
    raise ValueError(f"{constant} is not a JSON value")


def finite_float(literal):
    """json.loads's parse_float: a number too large for a float (1e999) is refused, not read as inf."""
    value = float(literal)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{literal[:20]} is too large a number")
    return value


def read_input_bytes(input_path):
    """The bytes of --input (- for stdin), checked to be a readable file."""
    if input_path == "-":
        if sys.stdin is None:
            raise RefformerError("--input -: stdin is closed; give the texts on stdin or as --input FILE")
        return sys.stdin.buffer.read()
    path = Path(input_path)
    if not path.exists():
        raise RefformerError(f"input file {input_path} does not exist")
    if path.is_dir():
        raise RefformerError(f"--input {input_path} is a folder; give a file of texts, one per line")
    kind = path.stat().st_mode
    if stat.S_ISCHR(kind) or stat.S_ISBLK(kind):  # /dev/zero would be read forever; use - for the terminal
        raise RefformerError(f"--input {input_path} is a device, not a file of texts (use - for stdin)")
    try:
        return path.read_bytes()
    except OSError as error:
        raise RefformerError(f"cannot read --input {input_path}: {error.strerror or error}") from None


def check_output_path(output_path, input_path, overwrite, model_dir=None):
    """Refuse an --output that cannot be written, or would replace the input, a file of the model folder (even with
    --overwrite) or an existing file without --overwrite (before any model is loaded). Raises RefformerError."""
    path = Path(output_path)
    parent = path.parent if str(path.parent) else Path(".")
    if not str(output_path).strip():
        raise RefformerError("--output is empty; give a file name")
    if path.is_dir():
        raise RefformerError(f"--output {output_path} is a folder; give a file name")
    if leads_nowhere(path):
        raise RefformerError(f"--output {output_path} is a symbolic link that leads nowhere (a loop, or a missing "
                             "target); remove the link or give another file name")
    if parent.exists() and not parent.is_dir():
        raise RefformerError(f"--output {output_path}: {parent} is a file, not a folder")
    if not parent.is_dir():
        raise RefformerError(f"--output {output_path}: folder {parent} does not exist; create it first")
    check_not_in_model(output_path, model_dir)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RefformerError(f"--output {output_path}: folder {parent} is not writable")
    if input_path not in (None, "-") and Path(input_path).exists() and path.exists() and os.path.samefile(input_path, path):
        raise RefformerError(f"--output {output_path} is the --input file; write the results to another file")
    if path.exists() and not path.is_file():  # a device or a pipe: --overwrite would not help (it said to pass it)
        raise RefformerError(f"--output {output_path} is not a regular file (a device or a pipe); give a file name, "
                             "or --output - for stdout")
    if (path.exists() or path.is_symlink()) and not overwrite:  # (a link whose target is still to be made is
        raise RefformerError(f"--output {output_path} exists; pass --overwrite to replace it")  # written through)


def check_not_in_model(output_path, model_dir):
    """Refuse an --output that is one of the model folder's files (config.json, model.safetensors, tokenizer.json) or
    lies in its export folder (onnx/), spelled any way (a symbolic link, ./, ../): generate reads them."""
    from refformer.refimpl.io import MODEL_FILES
    from refformer.runtime.options import resolve_model

    try:
        model = Path(os.path.realpath(resolve_model(model_dir)))
    except RefformerError:  # no bundled model: the model folder is named as missing later
        return
    target = Path(os.path.realpath(output_path))
    if target in {model / name for name in MODEL_FILES} or model / "onnx" in target.parents:
        raise RefformerError(f"--output {output_path} is a file of the model folder {model_dir or model}; write the "
                             "results to another file")
    if (model / "config.json").is_file() and (model / "model.safetensors").is_file():
        from refformer.export.export import export_locations

        cached = Path(os.path.realpath(export_locations(model, "-")[1].parent))  # the model's exports in the cache
        if cached in target.parents:
            raise RefformerError(f"--output {output_path} is in the model's export folder {cached}; write the "
                                 "results to another file")


def stale_temporaries(path):
    """NAME.tmp-PID files beside path left by generate runs that were killed (their process is gone)."""
    from refformer.refimpl.io import process_alive

    pattern = re.compile(re.escape(path.name) + r"\.tmp-(\d+)")
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    return [entry for entry in entries if (match := pattern.fullmatch(entry.name)) and entry.is_file()
            and not entry.is_symlink() and int(match[1]) != os.getpid() and not process_alive(int(match[1]))]


CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 and C1 control characters but tab and newline


def printable(text):
    """text with its control characters but tab and newline (an escape sequence a byte-level tokenizer can produce,
    which a terminal would obey and click would strip from a pipe only) as spaces: plain output only."""
    return CONTROLS.sub(" ", text)


def shown(path):
    """A path for a message line: as it is, or quoted with escapes when it holds a line break or another control
    character (a file named "new\\nline.jsonl" split the 'wrote ...' line in two)."""
    path = str(path)
    return path if path.isprintable() else repr(path)


def one_line(text):
    """text with its line breaks (all that str.splitlines splits at: \\n, \\r, \\x0b, \\x0c, \\x1c-\\x1e, \\x85,
    U+2028, U+2029) and other control characters as spaces, so that plain output keeps one line per input, the same
    on a terminal and in a pipe (--json and --output keep the text as it is)."""
    return printable(" ".join(text.splitlines())) if text else text


# JSON allows these raw inside strings, but str.splitlines (and JavaScript before ES2019) breaks a record there:
# written as escapes, each record stays one line for every line splitter (json.dumps escapes the others below U+0020)
JSON_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


class RecordWriter:
    """Writes each batch's records as it finishes: JSON lines to --output, or plain / JSON lines to stdout.

    A new --output file is written in place, flushed per batch (a killed run leaves its finished batches). An
    existing one (with --overwrite) is left untouched until the run ends: the records go to NAME.tmp-PID beside it,
    which replaces it at the end or on Ctrl-C (a killed run leaves the old file and the .tmp-PID file, which the
    next run writing NAME removes). A symbolic link is written through: the file it points to is replaced.
    """

    def __init__(self, output_path, as_json, overwrite=True):
        """overwrite=False: an --output that appeared since check_output_path (another run writing the same file)
        is refused, not replaced."""
        self.output_path, self.as_json = output_path, as_json
        self.count, self.file, self.temp, self.failed, self.good_size = 0, None, None, False, 0
        if output_path is not None:
            path = Path(os.path.realpath(output_path))
            for stale in stale_temporaries(path):
                stale.unlink(missing_ok=True)
            if path.exists() and not overwrite:
                raise RefformerError(f"--output {shown(output_path)} was created while this run started (another "
                                     "run writing it?); pass --overwrite to replace it")
            if path.exists():
                self.target = path
                self.temp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
                self.file = open(self.temp, "w", encoding="utf-8")
                os.chmod(self.temp, stat.S_IMODE(path.stat().st_mode))  # the replaced file's permissions stay
            else:
                try:
                    self.file = open(path, "x", encoding="utf-8")
                except FileExistsError:  # created between the check above and here
                    raise RefformerError(f"--output {shown(output_path)} was created while this run started "
                                         "(another run writing it?); pass --overwrite to replace it") from None

    def render(self, record):
        if self.as_json or self.file is not None:
            line = json.dumps(record, ensure_ascii=False)
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:  # a JSONL "id" with a lone surrogate ("\ud800"): kept as its escape
                line = json.dumps(record)
            return line.translate(JSON_LINE_BREAKS)
        if "error" in record:
            return f"error: {one_line(record['error'])}"
        output = record["output"]
        if isinstance(output, str):
            return one_line(output)
        return "\n".join(f"{record['line']}.{k}\t{one_line(text)}" for k, text in enumerate(output, start=1))

    def write(self, records):
        """Write and flush one batch's records. A full disk is a RefformerError saying how many records were
        written; a file is cut back to its last whole batch (no half record at its end)."""
        text = "".join(self.render(record) + "\n" for record in records)
        with interrupts_deferred():  # Ctrl-C lands after the batch is written and counted, never between the two
            try:
                if self.file is not None:
                    self.file.write(text)
                    self.file.flush()
                else:
                    click.echo(text, nl=False)
                    sys.stdout.flush()
            except OSError as error:
                if error.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    raise
                self.failed = True
                kept = ("it was left as it was" if self.temp is not None else
                        f"{self.count} records were written before it")
                raise RefformerError(f"cannot write to {shown(self.where)} ({error.strerror}); {kept}: free some "
                                     "space or write elsewhere") from None
            self.count += len(records)
            if self.file is not None:
                self.good_size = self.file.tell()

    def close(self, keep):
        """Close the file; an --overwrite run's temporary replaces the old file when keep, else it is removed. A
        new file is cut back to its last whole batch if a write failed."""
        if self.file is None:
            return
        try:
            self.file.close()
        except OSError:  # the buffered rest of a batch that failed to be written (a full disk)
            pass
        if self.failed and self.temp is None:
            with contextlib.suppress(OSError):
                os.truncate(self.file.name, self.good_size)
        if self.temp is not None:
            if keep and not self.failed:
                os.replace(self.temp, self.target)
            else:
                self.temp.unlink(missing_ok=True)

    @property
    def where(self):
        return "stdout" if self.output_path is None else str(self.output_path)


@click.command("generate")
@click.argument("texts", nargs=-1)
@model_option
@click.option("--input", "input_path", type=NonEmptyPath(allow_dash=True), default=None, metavar="FILE", help="File of inputs, one per line or JSONL; - for stdin.")
@click.option("--output", "output_path", type=NonEmptyPath(), default=None,
              help="Write JSON lines here (as each batch finishes); - for stdout.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file (at the end of the run).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of plain text.")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Graph precision (exported on first use).")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (capped to the CPU count).")
@click.option("--variant", type=click.Choice(["auto", "reference", "fused", "static", "static_mha", "static_fused"]),
              default="auto", show_default=True, help="Decoder graph. auto: on CUDA static_fused (fp16), then static_mha, "
              "then static, each replayed as CUDA graphs, moving on with a notice when one fails a probe; the reference "
              "graph on the CPU.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Inputs per batch with --input.")
@click.option("--truncate", is_flag=True, help="Cut inputs longer than the model's positions (with a warning).")
@option_flags
def generate(texts, model_dir, input_path, output_path, overwrite, as_json, provider, dtype, threads, variant, batch_size,
             truncate, **options):
    """Generate from TEXT (streamed to the terminal) or from --input FILE (batched).

    stdout: plain lines, or JSON lines with --json; --output FILE: JSON lines. Exit 1 when an input failed
    (reported in its record), 130 on Ctrl-C (the finished records kept).
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
            raise RefformerError(f"generation failed: {type(error).__name__}{': ' + reason if reason else ''}") from None
    return wrapper


def refuse_model_folder_as_text(texts):
    """`refformer generate m "text"` with m a model folder: a usage error pointing to --model, not a translation of m."""
    for text in texts:
        try:
            is_model = (Path(text) / "config.json").is_file()
        except (OSError, ValueError):  # a text too long or odd to be a path
            is_model = False
        if is_model:
            raise click.UsageError(f"refformer generate takes the model folder as --model DIR, not as an argument "
                                   f"(got the folder {text!r}); use --model {text}")


def check_threads(threads):
    """--threads: >= 1, and at most the CPU count (capped with a notice)."""
    if threads is None:
        return None
    if threads < 1:
        raise RefformerError(f"--threads must be >= 1, got {threads}")
    cpus = os.cpu_count() or 1
    if threads > cpus:
        click.echo(f"notice: --threads {threads} is more than the {cpus} CPUs here; using {cpus}", err=True)
        return cpus
    return threads


def run(texts, model_dir, input_path, output_path, as_json, provider, dtype, threads, batch_size, truncate, options,
        variant="auto", overwrite=False):
    from refformer.runtime.generator import Generator

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
        check_output_path(output_path, input_path, overwrite, model_dir)
    elif sys.stdout is None:
        raise RefformerError("stdout is closed; pass --output FILE")
    if input_path is not None:
        lines = list(read_inputs(read_input_bytes(input_path)))
    else:
        lines = [(number, text, None, {}) for number, text in enumerate(texts, start=1)]
    threads = check_threads(threads)
    check_fits_memory(model_dir, generation, min(batch_size, max(1, len(lines))))
    if not any(error is None for _, _, error, _ in lines):  # only bad lines (or none): their records need no model
        generator = None
    else:
        generator = Generator(model_dir, provider=provider, dtype=dtype, threads=threads, truncate=truncate,
                              variant=variant)

    if len(texts) == 1 and output_path is None and not as_json and generation.num_return_sequences == 1:
        for piece in generator.stream(texts[0], **vars(generation)):
            click.echo(printable(piece), nl=False)
            sys.stdout.flush()
        click.echo()
        return
    writer = RecordWriter(output_path, as_json, overwrite)
    truncated = []
    if generator is not None:
        generator.collected_warnings = truncated
    try:
        failures = generate_records(generator, generation, lines, writer, input_path, batch_size)
    except KeyboardInterrupt:
        writer.close(keep=True)
        click.echo(f"error: interrupted: {writer.count} of {len(lines)} inputs written to {shown(writer.where)}", err=True)
        sys.exit(130)
    except BaseException:
        writer.close(keep=False)
        raise
    writer.close(keep=True)
    if truncated:
        click.echo(truncation_warning(truncated), err=True)
    if failures:
        where = shown(output_path) if output_path else "the output"
        click.echo(f"error: {failures} of {len(lines)} inputs failed (reported in {where})", err=True)
        sys.exit(1)
    if output_path is not None:
        click.echo(f"wrote {writer.count} records to {shown(output_path)}", err=True)


def truncation_warning(warnings):
    """One line for the truncation warnings of a run: the warning itself for one input, else how many and which."""
    if len(warnings) == 1:
        return warnings[0]
    names = [re.sub(r"^warning: (.*) truncated from .*$", r"\1", warning) for warning in warnings]
    limit = warnings[0].rsplit(" to ", 1)[-1]
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    return f"warning: {len(warnings)} inputs truncated to {limit}: {shown}"


def generate_records(generator, generation, lines, writer, input_path, batch_size):
    """Run the lines in batches, writing each batch's records (in line order) as it finishes; returns the number of
    failed lines."""
    failures = 0
    seed = {"seed": generation.seed} if generation.do_sample else {}
    show_bar = (sys.stderr is not None and sys.stderr.isatty()
                and (writer.file is not None or sys.stdout is None or not sys.stdout.isatty()))
    with click.progressbar(length=len(lines), label="generating", file=sys.stderr, hidden=not show_bar) as bar:
        for start in range(0, len(lines), batch_size):
            chunk = lines[start:start + batch_size]
            good, records = [], {}
            for number, text, error, extra in chunk:
                if error is None:
                    try:  # empty or too long: reported for this line only; each line is tokenized once
                        name = f"line {number}" if input_path else f"input {number}"
                        good.append((number, text, extra, generator.encode_rows([text], [name])[0]))
                        continue
                    except RefformerError as problem:
                        error = str(problem)
                records[number] = {"line": number, **extra, "error": error}
                failures += 1
            if good:
                outputs = generator.generate_rows([row for *_, row in good], generation)
                for (number, text, extra, _), output in zip(good, outputs):
                    records[number] = {"line": number, **extra, "input": text, "output": output, **seed}
            writer.write([records[number] for number in sorted(records)])
            bar.update(len(chunk))
    return failures
