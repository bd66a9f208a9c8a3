"""`refformer data ...` and `refformer tokenizer ...`: corpus preparation and tokenizer training.

runtime/cli.py registers the two groups.
"""

import time

import click

from refformer.runtime.errors import one_line_errors


def _echo_counts(out_dir, counts, seconds):
    shown = ", ".join(f"{name} {count}" for name, count in counts.items())
    click.echo(f"wrote {out_dir}: {shown} ({sum(counts.values())} in all, {seconds:.1f} s)")


@click.group()
def data():
    """Prepare corpora (installed by scripts/get-data.sh) as train/valid/test files."""


@data.command("de-en")
@click.option("--out", "out_dir", default="data/de-en", show_default=True, type=click.Path(file_okay=False),
              help="Directory for train.tsv, valid.tsv, test.tsv (German<TAB>English).")
@one_line_errors
def de_en_command(out_dir):
    """German-English sentence pairs from the trans-de-en dictionary."""
    from refformer.refimpl.data import prepare_de_en

    start = time.perf_counter()
    counts = prepare_de_en(out_dir)
    _echo_counts(out_dir, counts, time.perf_counter() - start)


@data.command("pydoc")
@click.option("--out", "out_dir", default="data/pydoc", show_default=True, type=click.Path(file_okay=False),
              help="Directory for train.txt, valid.txt, test.txt (one paragraph per line).")
@one_line_errors
def pydoc_command(out_dir):
    """Prose paragraphs of the Python documentation (python3-doc)."""
    from refformer.refimpl.data import prepare_pydoc

    start = time.perf_counter()
    counts = prepare_pydoc(out_dir)
    _echo_counts(out_dir, counts, time.perf_counter() - start)


@click.group()
def tokenizer():
    """Train tokenizers."""


@tokenizer.command("train")
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.option("--vocab-size", required=True, type=int, help="Vocabulary size, special tokens included.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="tokenizer.json to write.")
@click.option("--model", type=click.Choice(["bpe", "unigram"]), default="bpe", show_default=True)
@one_line_errors
def train_command(data_dir, vocab_size, out_path, model):
    """Train a byte-level tokenizer on DATA_DIR's train split (train.tsv, both columns, or train.txt)."""
    from refformer.runtime.tokenizer import save_tokenizer, train_tokenizer

    start = time.perf_counter()
    trained = train_tokenizer(data_dir, vocab_size, model)
    save_tokenizer(trained, out_path)
    size = trained.get_vocab_size(with_added_tokens=True)
    note = "" if size == vocab_size else f" (asked for {vocab_size}; the corpus supports no more)"
    click.echo(f"wrote {out_path}: {model}, {size} tokens{note} ({time.perf_counter() - start:.1f} s)")
