"""The batch loop of `refformer generate`: inputs read from a file or stdin (plain lines or JSON lines), run through
a Generator in batches, and each batch's records written as it finishes (RecordWriter: JSON lines to --output, plain
or JSON lines to stdout). runtime/generate_cli.py parses the options, calls write_batches and prints the summary.

A record is {"line": N, ["id": ...,] "input": text, "output": text (or K texts), "ids": token ids (or K lists, in the
order of the texts), ["seed": S]} or {"line": N, ["id": ...,] "error": message}; N counts input lines (or TEXT
arguments) from 1. "ids" are the generated ids, eos kept when generated, without the decoder start token or the
prompt (Generator.generate_rows_and_ids), as transformers' generate returns them after the input.
"""

import codecs
import contextlib
import dataclasses
import errno
import json
import os
import re
import stat
import sys
from pathlib import Path

import click

from refformer.refimpl.errors import RefformerError
from refformer.refimpl.training.interrupts import interrupts_deferred
from refformer.runtime.errors import InputTooLong, shown


def read_inputs(raw):
    """(line number, text or None, error or None, extra fields) for each line of an input file's bytes.

    A line is plain text, or a JSON object with a "text" field (JSONL; its "id", if any, is passed through). A
    UTF-8 byte-order mark at the start is dropped (at the start of any line too: files joined with cat), and a
    file with a UTF-16 or UTF-32 byte-order mark is decoded as such (utf8_bytes). Each line is decoded on its own,
    so one non-UTF-8 line is reported without losing the others; a blank line is reported as empty, and a line with
    a raw NUL byte as a bad line (a JSON "\\u0000" is text). Raises RefformerError for a file whose byte-order mark
    does not match its contents.
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
                                     f"{encoding.upper()[:6]} (byte {error.start + len(bom) + 1}); save it as UTF-8"
                                     ) from None
    return raw


def not_json(constant):
    """json.loads's parse_constant: NaN, Infinity and -Infinity are Python's extension, not JSON; refused (a record
    carrying them in its "id" would not be JSON either). Raises ValueError, which read_inputs reports."""
    raise ValueError(f"{constant} is not a JSON value")


def finite_float(literal):
    """json.loads's parse_float: a number too large for a float (1e999) is refused (ValueError, which read_inputs
    reports), not read as inf."""
    value = float(literal)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{literal[:20]} is too large a number")
    return value


def read_input_bytes(input_path):
    """The bytes of --input (- for stdin), checked to be a readable file. Raises RefformerError for a closed stdin,
    a missing file, a folder, a device or a file that cannot be read."""
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


def stale_temporaries(path):
    """NAME.tmp-PID files beside path left by generate runs that were killed (their process is gone).

    path: a pathlib.Path. Raises nothing: an unreadable folder gives [].
    """
    from refformer.refimpl.io import process_alive

    pattern = re.compile(re.escape(path.name) + r"\.tmp-(\d+)")
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    return [entry for entry in entries if (match := pattern.fullmatch(entry.name)) and entry.is_file()
            and not entry.is_symlink() and int(match[1]) != os.getpid() and not process_alive(int(match[1]))]


TRUNCATE_ADVICE = "shorten it or pass --truncate"  # InputTooLong's remedy in generate's and batch's terms
CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 and C1 control characters but tab and newline


def printable(text):
    """text with its control characters but tab and newline (an escape sequence a byte-level tokenizer can produce,
    which a terminal would obey and click would strip from a pipe only) as spaces: plain output only.

    Raises nothing.
    """
    return CONTROLS.sub(" ", text)


def one_line(text):
    """text with its line breaks (all that str.splitlines splits at: \\n, \\r, \\x0b, \\x0c, \\x1c-\\x1e, \\x85,
    U+2028, U+2029) and other control characters as spaces, so that plain output keeps one line per input, the same
    on a terminal and in a pipe (--json and --output keep the text as it is).

    Raises nothing.
    """
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

    RecordWriter(output_path, as_json, overwrite) raises RefformerError when output_path appeared since the run's checks
    and overwrite is False, and OSError when the file cannot be opened.
    """

    def __init__(self, output_path, as_json, overwrite=True):
        """overwrite=False: an --output that appeared since check_generate_output (another run writing the same file)
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
        """One record as its output line(s): JSON (--json, --output) with line breaks inside strings escaped, or
        plain text ("error: ..." for a failed input; "N.k<TAB>text" lines for K > 1 outputs).

        Raises nothing: records hold JSON values only (an id read from a JSON line).
        """
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
        new file is cut back to its last whole batch if a write failed.

        Raises OSError when the temporary cannot replace the old file; a failed close or cut is ignored.
        """
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
        """Where records go, for messages: "stdout" or the --output path as given.

        Raises nothing.
        """
        return "stdout" if self.output_path is None else str(self.output_path)


def truncation_warning(warnings):
    """One line for the truncation warnings of a run: the warning itself for one input, else how many and which.

    warnings: a non-empty list of truncation warning lines. No checks: its one caller, generate_cli.run, calls it only
    when a run has warnings.
    """
    if len(warnings) == 1:
        return warnings[0]
    names = [re.sub(r"^warning: (.*) truncated from .*$", r"\1", warning) for warning in warnings]
    limit = warnings[0].rsplit(" to ", 1)[-1]
    listed = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    return f"warning: {len(warnings)} inputs truncated to {limit}: {listed}"


class BatchesInterrupted(KeyboardInterrupt):
    """Ctrl-C during write_batches: the records of the finished batches are kept (written counts them, where names
    the output).

    Raised by write_batches, never caught there: generate_cli.run prints the counts and exits 130.
    """

    def __init__(self, written, where):
        super().__init__(written, where)
        self.written, self.where = written, where


@dataclasses.dataclass
class BatchesWritten:
    """What write_batches returns: records written, lines that failed (reported in their records), and the
    truncation warnings of the run (one per input cut to the model's positions).

    A plain dataclass: no checks.
    """

    written: int
    failures: int
    truncated: list


def write_batches(generator, generation, lines, *, output_path=None, as_json=False, overwrite=False, input_path=None,
                  batch_size=16):
    """Run lines (from input_lines) through generator in batches of batch_size and write each batch's records as it
    finishes: to output_path (JSON lines), else to stdout (plain lines, or JSON lines with as_json). generator may
    be None when every line is bad (their records need no model); generation is a GenerationOptions.

    Returns BatchesWritten. Raises BatchesInterrupted (a KeyboardInterrupt) on Ctrl-C, the finished records kept;
    RefformerError when the output cannot be written (a full disk) or appeared meanwhile without overwrite. On any
    other failure the output is left as it was (an existing file) or holds the finished batches (a new one).
    """
    writer = RecordWriter(output_path, as_json, overwrite)
    truncated = []
    if generator is not None:
        generator.collected_warnings = truncated
    try:
        failures = generate_records(generator, generation, lines, writer, input_path, batch_size)
    except KeyboardInterrupt:
        writer.close(keep=True)
        raise BatchesInterrupted(writer.count, writer.where) from None
    except BaseException:
        writer.close(keep=False)
        raise
    writer.close(keep=True)
    return BatchesWritten(writer.count, failures, truncated)


def input_lines(texts, input_path):
    """(line number, text or None, error or None, extra fields) for each input: the lines of --input FILE (- for
    stdin; read_inputs), else the TEXT arguments numbered from 1. Raises RefformerError for an unreadable file."""
    if input_path is not None:
        return list(read_inputs(read_input_bytes(input_path)))
    return [(number, text, None, {}) for number, text in enumerate(texts, start=1)]


def generated_record(number, text, result, generation, extra=None):
    """The record generate --json writes for an input that generated (serve answers with the same): {"line": number,
    **extra (pass-through fields such as "id"), "input": text, "output": output, "ids": ids, "seed": generation.seed
    when it samples}. result: one (output, ids) of Generator.generate_rows_and_ids (a string and a list of ints, or
    lists of them for num_return_sequences > 1); generation: its GenerationOptions.

    Raises nothing.
    """
    seed = {"seed": generation.seed} if generation.do_sample else {}
    output, ids = result
    return {"line": number, **(extra or {}), "input": text, "output": output, "ids": ids, **seed}


def generate_records(generator, generation, lines, writer, input_path, batch_size):
    """Run the lines in batches, writing each batch's records (in line order) as it finishes; returns the number of
    failed lines.

    A line that cannot be encoded (empty, too long) becomes an error record, not an exception. Raises what writer.write
    raises (RefformerError for a full disk) and what generator.generate_rows_and_ids raises.
    """
    failures = 0
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
                    except InputTooLong as problem:  # in the terms of the commands that run this: --truncate
                        error = str(problem.with_advice(TRUNCATE_ADVICE))
                    except RefformerError as problem:
                        error = str(problem)
                records[number] = {"line": number, **extra, "error": error}
                failures += 1
            if good:
                outputs = generator.generate_rows_and_ids([row for *_, row in good], generation)
                for (number, text, extra, _), result in zip(good, outputs):
                    records[number] = generated_record(number, text, result, generation, extra)
            writer.write([records[number] for number in sorted(records)])
            bar.update(len(chunk))
    return failures
