"""`refformer data ...` and `refformer tokenizer ...`: corpus preparation and tokenizer training.

runtime/cli.py registers the two groups.
"""

import time
from pathlib import Path

import click

from refformer.runtime.errors import one_line_errors
from refformer.runtime.options import NonEmptyPath
from refformer.runtime.outputs import refuse_package_folder


def _echo_counts(out_dir, counts, seconds):
    shown = ", ".join(f"{name} {count}" for name, count in counts.items())
    click.echo(f"wrote {out_dir}: {shown} ({sum(counts.values())} in all, {seconds:.1f} s)")


@click.group()
def data():
    """Prepare corpora (installed by scripts/get-data.sh) as train/valid/test files.

    \f
    Raises nothing: a click group; its commands check their options.
    """


OVERWRITE_HELP = "Write into an --out folder that already holds files (only the three split files are replaced)."


@data.command("de-en")
@click.option("--out", "out_dir", default="data/de-en", show_default=True, type=NonEmptyPath(file_okay=False),
              help="Directory for train.tsv, valid.tsv, test.tsv (German<TAB>English).")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@one_line_errors
def de_en_command(out_dir, overwrite):
    """German-English sentence pairs from the trans-de-en dictionary.

    \f
    Raises nothing to its caller: one_line_errors prints prepare_de_en's RefformerError (an --out folder
    check_split_output refuses, a missing dictionary, no sentence pairs) as one line `error: ...` and exits 1.
    """
    from refformer.refimpl.training.data import prepare_de_en

    start = time.perf_counter()
    refuse_package_folder(out_dir, "--out")
    counts = prepare_de_en(out_dir, overwrite=overwrite)
    _echo_counts(out_dir, counts, time.perf_counter() - start)


@data.command("pydoc")
@click.option("--out", "out_dir", default="data/pydoc", show_default=True, type=NonEmptyPath(file_okay=False),
              help="Directory for train.txt, valid.txt, test.txt (one paragraph per line).")
@click.option("--overwrite", is_flag=True, help=OVERWRITE_HELP)
@one_line_errors
def pydoc_command(out_dir, overwrite):
    """Prose paragraphs of the Python documentation (python3-doc).

    \f
    Raises nothing to its caller: one_line_errors prints prepare_pydoc's RefformerError (an --out folder
    check_split_output refuses, no documentation sources) as one line `error: ...` and exits 1.
    """
    from refformer.refimpl.training.data import prepare_pydoc

    start = time.perf_counter()
    refuse_package_folder(out_dir, "--out")
    counts = prepare_pydoc(out_dir, overwrite=overwrite)
    _echo_counts(out_dir, counts, time.perf_counter() - start)


@click.group()
def tokenizer():
    """Train tokenizers.

    \f
    Raises nothing: a click group; its commands check their options.
    """


@tokenizer.command("train")
@click.argument("data_dir", type=NonEmptyPath(file_okay=False))
@click.option("--vocab-size", required=True, type=int,
              help="Vocabulary size, special tokens included (260 to 1,000,000).")
@click.option("--out", "out_path", required=True, type=NonEmptyPath(dir_okay=False), help="tokenizer.json to write.")
@click.option("--model", type=click.Choice(["bpe", "unigram"]), default="bpe", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@one_line_errors
def train_command(data_dir, vocab_size, out_path, model, overwrite):
    """Train a byte-level tokenizer on DATA_DIR's train split (train.tsv, both columns, or train.txt).

    \f
    Raises nothing to its caller: one_line_errors prints the RefformerError of check_tokenizer_output (a refused
    --out), train_tokenizer (a bad --vocab-size, no train split) or save_tokenizer as one line `error: ...` and exits 1.
    """
    from refformer.refimpl.training.tokenizer import save_tokenizer, train_tokenizer
    from refformer.runtime.outputs import check_tokenizer_output

    check_tokenizer_output(Path(out_path), Path(data_dir), overwrite)
    start = time.perf_counter()
    trained = train_tokenizer(data_dir, vocab_size, model)
    save_tokenizer(trained, out_path)
    size = trained.get_vocab_size(with_added_tokens=True)
    note = "" if size == vocab_size else f" (asked for {vocab_size}; " + (
        "the corpus supports no more)" if size < vocab_size else f"the {model} trainer needs {size} for this corpus)")
    click.echo(f"wrote {out_path}: {model}, {size} tokens{note} ({time.perf_counter() - start:.1f} s)")
