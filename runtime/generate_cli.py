"""`refformer generate`: translate / continue texts with a model directory (default: the bundled model)."""

import json
import sys
from pathlib import Path

import click

from refformer.refimpl.errors import RefformerError
from refformer.runtime.errors import one_line_errors
from refformer.runtime.options import model_option


def option_flags(function):
    """The decoding options, named as in Hugging Face's generate."""
    decorators = [
        click.option("--max-new-tokens", type=int, default=None, help="Default: 2 x source length + 10 (translation)."),
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
        click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling draws."),
    ]
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def read_inputs(path):
    """(line number, text or None, error or None) for each non-blank line of a file (or - for stdin).

    A line is plain text, or a JSON object with a "text" field (JSONL). Each line is decoded on its
    own, so one non-UTF-8 line is reported without losing the others.
    """
    raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            yield number, None, f"line {number} is not valid UTF-8 (byte {error.start + 1})"
            continue
        if not text.strip():
            continue
        if text.lstrip().startswith("{"):
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                yield number, None, f"line {number} is not valid JSON: {error.msg}"
                continue
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                yield number, None, f'line {number}: a JSON line needs a "text" string'
                continue
            text = record["text"]
        yield number, text, None


def one_record(text, outputs, **extra):
    record = {"input": text, "output": outputs}
    record.update(extra)
    return record


@click.command("generate")
@click.argument("texts", nargs=-1)
@model_option
@click.option("--input", "input_path", type=str, default=None, help="File of inputs, one per line or JSONL; - for stdin.")
@click.option("--output", "output_path", type=click.Path(dir_okay=False), default=None, help="Write JSONL here.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines instead of plain text.")
@click.option("--provider", type=click.Choice(["auto", "cuda", "cpu"]), default="auto", show_default=True)
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Graph precision (exported on first use).")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads.")
@click.option("--variant", type=click.Choice(["auto", "reference", "fused", "static", "static_mha", "static_fused"]),
              default="auto", show_default=True, help="Decoder graph: auto = static_fused in fp16 and static_mha in fp32 "
              "on CUDA (replayed as CUDA graphs), reference on the CPU.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Inputs per batch with --input.")
@click.option("--truncate", is_flag=True, help="Cut inputs longer than the model's positions (with a warning).")
@option_flags
def generate(texts, model_dir, input_path, output_path, as_json, provider, dtype, threads, variant, batch_size, truncate,
             **options):
    """Generate from TEXT (streamed to the terminal) or from --input FILE (batched, JSONL out)."""
    one_line_errors(run)(texts, model_dir, input_path, output_path, as_json, provider, dtype, threads, batch_size,
                         truncate, options, variant)


def run(texts, model_dir, input_path, output_path, as_json, provider, dtype, threads, batch_size, truncate, options,
        variant="auto"):
    from refformer.refimpl.generate import GenerationOptions
    from refformer.runtime.generator import Generator

    generation = GenerationOptions(**options)  # bad option values fail before any model is loaded
    if not texts and input_path is None:
        raise RefformerError("give a TEXT to translate, or --input FILE (- for stdin)")
    if texts and input_path is not None:
        raise RefformerError("give TEXT arguments or --input, not both")
    if batch_size < 1:
        raise RefformerError(f"--batch-size must be >= 1, got {batch_size}")
    if threads is not None and threads < 1:
        raise RefformerError(f"--threads must be >= 1, got {threads}")
    if input_path is not None and input_path != "-" and not Path(input_path).is_file():
        raise RefformerError(f"input file {input_path} does not exist")
    generator = Generator(model_dir, provider=provider, dtype=dtype, threads=threads, truncate=truncate, variant=variant)

    if len(texts) == 1 and output_path is None and not as_json and options["num_return_sequences"] == 1:
        for piece in generator.stream(texts[0], **options):
            click.echo(piece, nl=False)
            sys.stdout.flush()
        click.echo()
        return
    if texts:
        lines = [(number, text, None) for number, text in enumerate(texts, start=1)]
    else:
        lines = list(read_inputs(input_path))
    records, failures = [], 0
    show_bar = input_path is not None
    with click.progressbar(length=len(lines), label="generating", file=sys.stderr, hidden=not show_bar) as bar:
        for start in range(0, len(lines), batch_size):
            chunk = lines[start:start + batch_size]
            good = []
            for number, text, error in chunk:
                if error is None:
                    try:  # empty or too long: reported for this line only; each line is tokenized once
                        name = f"line {number}" if input_path else f"input {number}"
                        good.append((number, text, generator.encode_rows([text], [name])[0]))
                        continue
                    except RefformerError as problem:
                        error = str(problem)
                records.append({"line": number, "error": error})
                failures += 1
            if good:
                outputs = generator.generate_rows([row for _, _, row in good], generation)
                for (number, text, _), output in zip(good, outputs):
                    records.append(one_record(text, output, line=number))
            bar.update(len(chunk))
    records.sort(key=lambda record: record["line"])
    emit(records, output_path, as_json or input_path is not None)
    if failures:
        click.echo(f"error: {failures} of {len(lines)} inputs failed (reported in the output)", err=True)
        sys.exit(1)


def emit(records, output_path, as_json):
    """JSONL to output_path (written atomically) or stdout; plain text lines without --json."""
    from refformer.refimpl.io import atomic_write

    def render(record):
        if as_json:
            return json.dumps(record, ensure_ascii=False)
        if "error" in record:
            return f"error: {record['error']}"
        output = record["output"]
        return output if isinstance(output, str) else "\n".join(output)

    text = "".join(render(record) + "\n" for record in records)
    if output_path is None:
        click.echo(text, nl=False)
        return
    try:
        atomic_write(output_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    except FileNotFoundError:
        raise RefformerError(f"cannot write {output_path}: its folder does not exist") from None
    click.echo(f"wrote {len(records)} records to {output_path}", err=True)
