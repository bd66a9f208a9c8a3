"""Corpus extraction, splits and the TSV/lines file formats, on small synthetic files (no Debian packages needed)."""

import os
import unicodedata

import pytest

from refformer.refimpl.errors import RefformerError
from refformer.refimpl.training import data

DICTIONARY = """\
# Version :: devel 2023-01-30
# License :: GPL Version 2 or later; GNU General Public License
Aal {m} [cook.] | Aale {pl} :: eel | eels
blank {adj} | Es war purer Zufall. | Das ist blanker Unsinn. :: sheer | It was pure coincidence. | \
That is sheer nonsense.
Das ist die Höhe!; Das schießt den Vogel ab! [übtr.] :: That takes the cake! [fig.]
Wie heißt du?; Wie heißen Sie? :: What’s your name?; What is your name?
Ich sehe das (Ganze) entspannt. :: I take a relaxed view of this.
Geld regiert die Welt. [Sprw.] | Geld stinkt nicht. :: Money makes the world go round.
Das ist gut. | Mehr nicht. :: That is good.
Ohne Zeugen werden die Anklagepunkte nicht halten/bestehen. :: Without a witness, the charges will not stand.
Es fehlt an etw. :: There is a shortage of sth.
Mach schnell! :: Step lively!
… aber ich will nicht kleinlich sein. :: … but I don’t want to be petty.
das Zurückstellen von Plänen. :: the shelving of plans.
Es war purer Zufall. :: It was pure coincidence.
Die Straße ist sehr lang. :: The street is very long.
"""

KEPT = [
    ("Es war purer Zufall.", "It was pure coincidence."),
    ("Das ist blanker Unsinn.", "That is sheer nonsense."),
    ("Das ist die Höhe!", "That takes the cake!"),
    ("Das schießt den Vogel ab!", "That takes the cake!"),
    ("Wie heißt du?", "What’s your name?"),
    ("Wie heißen Sie?", "What is your name?"),
    ("Ich sehe das entspannt.", "I take a relaxed view of this."),
    ("Die Straße ist sehr lang.", "The street is very long."),
]

RST = """\
:mod:`json` --- JSON encoder and decoder
========================================

.. module:: json
   :synopsis: Encode and decode the JSON format.

.. _json-target:

`JSON <https://json.org>`_ is a *lightweight* data format [#note]_ that
:mod:`json` reads with :func:`loads` and ``json.dumps``.

Encoding basic Python objects::

    >>> import json
    >>> json.dumps([1, 2])

.. code-block:: shell-session

    $ echo '{"json": "obj"}' | python -m json.tool

.. function:: dumps(obj, *, skipkeys=False)
              dumps(obj)

   Serialize *obj* to a JSON formatted :class:`str` using this table.

   .. note::

      Keys are always coerced to strings by :meth:`~json.JSONEncoder.encode`.

   .. versionchanged:: 3.6
      The argument *skipkeys* was added in :issue:`1234` and :pep:`8`.

   .. deprecated-removed:: 3.4 3.6 This function is not useful any more.

+--------+---------+
| Python | JSON    |
+========+=========+
| dict   | object  |
+--------+---------+

=======  ======
Python   JSON
=======  ======
dict     object
=======  ======

>>> print("a doctest block is code, not prose.")

* The first item of a list is a paragraph
  of its own.
* The second item is another one.

term in a definition list
   The definition of the term is prose as well.

.. this is a comment that says nothing useful here.

Short line.
"""

RST_PARAGRAPHS = [
    "JSON is a lightweight data format that json reads with loads() and json.dumps.",
    "Encoding basic Python objects:",
    "Serialize obj to a JSON formatted str using this table.",
    "Keys are always coerced to strings by encode().",
    "The argument skipkeys was added in bpo-1234 and PEP 8.",
    "This function is not useful any more.",
    "The first item of a list is a paragraph of its own.",
    "The second item is another one.",
    "The definition of the term is prose as well.",
]


@pytest.fixture
def dictionary(tmp_path):
    path = tmp_path / "de-en"
    path.write_text(DICTIONARY, encoding="utf-8")
    return path


def test_extract_de_en_keeps_whole_sentence_pairs(dictionary):
    assert data.extract_de_en(dictionary) == KEPT


def test_extract_de_en_normalises_to_nfc(tmp_path):
    path = tmp_path / "de-en"
    path.write_text(unicodedata.normalize("NFD", "Die Straße ist schön. :: The street is nice.\n"), encoding="utf-8")
    assert data.extract_de_en(path) == [("Die Straße ist schön.", "The street is nice.")]


def test_extract_de_en_skips_lines_whose_sub_entries_do_not_pair_up(tmp_path):
    path = tmp_path / "de-en"
    path.write_text("Das ist gut. | Das ist schlecht. :: That is good.\n", encoding="utf-8")
    assert data.extract_de_en(path) == []


def test_missing_dictionary_names_the_install_script(tmp_path):
    with pytest.raises(RefformerError, match="scripts/get-data.sh"):
        data.extract_de_en(tmp_path / "absent")
    with pytest.raises(RefformerError, match="scripts/get-data.sh"):
        data.prepare_de_en(tmp_path / "out", source=tmp_path / "absent")
    with pytest.raises(RefformerError, match="scripts/get-data.sh"):
        data.prepare_pydoc(tmp_path / "out", source=tmp_path / "absent")


def test_rst_paragraphs_keep_prose_only():
    assert data.rst_paragraphs(RST) == RST_PARAGRAPHS


def test_simplify_inline_keeps_literals_verbatim():
    text = r"Use ``'\t'`` or ``*args``, see `the docs <https://x>`_, :func:`os.path.join`, \*star and *emphasis*."
    assert data.simplify_inline(text) == r"Use '\t' or *args, see the docs, os.path.join(), *star and emphasis."


def test_extract_pydoc_reads_each_real_file_once(tmp_path):
    sources = tmp_path / "python3.11" / "html" / "_sources"
    (sources / "library").mkdir(parents=True)
    (sources / "library" / "json.rst.txt").write_text(RST, encoding="utf-8")
    (sources / "about.rst.txt").write_text("This is a paragraph about the documentation.\n", encoding="utf-8")
    (sources / "ignored.txt").write_text("Files that are not reST sources are not read.\n", encoding="utf-8")
    (tmp_path / "python3").mkdir()
    os.symlink(tmp_path / "python3.11" / "html", tmp_path / "python3" / "html")  # as Debian's python3-doc does
    paragraphs = data.extract_pydoc(str(tmp_path / "python3*" / "html" / "_sources"))
    assert paragraphs == ["This is a paragraph about the documentation."] + RST_PARAGRAPHS


def test_split_by_hash_is_deterministic_and_keyed():
    items = [f"sentence number {i}." for i in range(2000)]
    train, valid, test = data.split_by_hash(items, key=lambda item: item, min_held_out=100)
    assert sorted(train + valid + test) == sorted(items)
    assert 60 <= len(valid) <= 140 and 60 <= len(test) <= 140  # 5% each of 2000, by hash
    # the same split on every run and whatever the order of the input
    again = data.split_by_hash(list(reversed(items)), key=lambda item: item, min_held_out=100)
    assert [sorted(split) for split in again] == [sorted(split) for split in (train, valid, test)]
    # equal keys land together: pairs sharing a source never straddle splits
    pairs = [(f"Quelle {i % 300}.", f"target {i}.") for i in range(900)]
    for split in data.split_by_hash(pairs, key=lambda pair: pair[0], min_held_out=50):
        sources = {source for source, _ in split}
        assert all(source in sources for source, _ in pairs if source in sources)


def test_split_by_hash_fractions_without_minimum():
    items = [str(i) for i in range(20000)]
    train, valid, test = data.split_by_hash(items, key=str, valid=0.01, test=0.01, min_held_out=0)
    assert 150 <= len(valid) <= 250 and 150 <= len(test) <= 250


def test_tsv_and_lines_round_trip(tmp_path):
    pairs = [("Guten Tag.", "Good day."), ("Straße  mit Leerzeichen ", "  street")]
    data.write_tsv(tmp_path / "a.tsv", pairs)
    assert data.read_tsv(tmp_path / "a.tsv") == pairs
    lines = ["first paragraph", "zweiter Absatz — mit Unicode ✓"]
    data.write_lines(tmp_path / "a.txt", lines)
    assert data.read_lines(tmp_path / "a.txt") == lines
    assert list(tmp_path.iterdir()) != [] and not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_writers_refuse_what_could_not_be_read_back(tmp_path):
    with pytest.raises(RefformerError, match="pair 2"):
        data.write_tsv(tmp_path / "a.tsv", [("a", "b"), ("with\ttab", "b")])
    with pytest.raises(RefformerError, match="pair 1"):
        data.write_tsv(tmp_path / "a.tsv", [(" ", "b")])
    with pytest.raises(RefformerError, match="item 1"):
        data.write_lines(tmp_path / "a.txt", ["line\nbreak"])
    assert not (tmp_path / "a.tsv").exists() and not (tmp_path / "a.txt").exists()


@pytest.mark.parametrize("body, line, what", [
    (b"a\tb\nc\td\te\n", 2, "exactly one TAB"),
    (b"a\tb\n\nno tab here\n", 3, "exactly one TAB"),
    (b"a\tb\n\tonly target\n", 2, "empty source"),
    (b"a\tb\nonly source\t \n", 2, "empty target"),
    (b"a\tb\nStra\xdfe\tstreet\n", 2, "not valid UTF-8"),
])
def test_read_tsv_reports_file_and_line(tmp_path, body, line, what):
    path = tmp_path / "bad.tsv"
    path.write_bytes(body)
    with pytest.raises(RefformerError, match=what) as error:
        data.read_tsv(path)
    assert f"{path}:{line}:" in str(error.value)


def test_read_lines_reports_non_utf8_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"fine\nalso fine\n\xff\xfe broken\n")
    with pytest.raises(RefformerError, match=rf"{path}:3: not valid UTF-8 \(byte 0xff at column 1\)"):
        data.read_lines(path)


@pytest.mark.parametrize("body", [b"", b"\n \n\r\n"])
def test_empty_corpus_file_is_an_error(tmp_path, body):
    for name, reader in (("empty.tsv", data.read_tsv), ("empty.txt", data.read_lines)):
        path = tmp_path / name
        path.write_bytes(body)
        with pytest.raises(RefformerError, match="is empty"):
            reader(path)


def test_prepare_de_en_writes_three_splits(dictionary, tmp_path):
    counts = data.prepare_de_en(tmp_path / "out", source=dictionary)
    assert sum(counts.values()) == len(KEPT)
    written = []
    for name in data.SPLITS:
        path = tmp_path / "out" / f"{name}.tsv"
        written += data.read_tsv(path) if counts[name] else []
        assert path.stat().st_size > 0 or counts[name] == 0
    assert sorted(written) == sorted(KEPT)


# ---------------------------------------------------------------------------- issue 11: BOM, outputs, bad input


def test_byte_order_mark_is_dropped_and_line_numbers_kept(tmp_path):
    """A UTF-8 BOM at the start of a corpus is not part of the first text; later errors keep their line numbers."""
    tsv, txt = tmp_path / "c.tsv", tmp_path / "c.txt"
    tsv.write_bytes("\ufeffein Haus\ta house\n\nder Hund\tthe dog\n".encode())
    txt.write_bytes("\ufeffFirst line.\nSecond line.\n".encode())
    assert data.read_tsv(tsv) == [("ein Haus", "a house"), ("der Hund", "the dog")]
    assert data.read_lines(txt) == ["First line.", "Second line."]
    tsv.write_bytes("\ufeffein Haus\ta house\n\nkein Tab\n".encode())
    with pytest.raises(RefformerError, match=rf"{tsv}:3: expected exactly one TAB"):
        data.read_tsv(tsv)
    tsv.write_bytes("\ufeff\n".encode())  # nothing but the mark: empty
    with pytest.raises(RefformerError, match="is empty"):
        data.read_tsv(tsv)
    dictionary = tmp_path / "de-en"
    dictionary.write_bytes("\ufeffDie Straße ist schön. :: The street is nice.\n".encode())
    assert data.extract_de_en(dictionary) == [("Die Straße ist schön.", "The street is nice.")]


def test_missing_or_folder_corpus_is_one_error(tmp_path):
    with pytest.raises(RefformerError, match="does not exist"):
        data.read_lines(tmp_path / "absent.txt")
    with pytest.raises(RefformerError, match="is a folder"):
        data.read_tsv(tmp_path)


def test_prepare_refuses_existing_split_files_unless_overwrite(dictionary, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.tsv").write_text("my own\tfile\n")
    with pytest.raises(RefformerError, match=r"already holds files \(train.tsv\); pass --overwrite"):
        data.prepare_de_en(out, source=dictionary)
    with pytest.raises(RefformerError, match=r"holds another corpus \(train.tsv\)"):
        data.prepare_pydoc(out, source=tmp_path, overwrite=True)
    assert (out / "train.tsv").read_text() == "my own\tfile\n" and not (out / "valid.tsv").exists()
    counts = data.prepare_de_en(out, source=dictionary, overwrite=True)
    assert sum(counts.values()) == len(KEPT) and "my own" not in (out / "train.tsv").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["test.tsv", "train.tsv", "valid.tsv"]  # no temporaries left
    # a folder of other files needs --overwrite, which keeps them (only the three split files are written)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    with pytest.raises(RefformerError, match=r"already holds files \(notes.txt\)"):
        data.prepare_de_en(tmp_path / "other", source=dictionary)
    data.prepare_de_en(tmp_path / "other", source=dictionary, overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep"
    (tmp_path / "empty").mkdir()
    data.prepare_de_en(tmp_path / "empty", source=dictionary)  # an empty folder is no one's files
    with pytest.raises(RefformerError, match="is a file"):
        data.prepare_de_en(out / "train.tsv", source=dictionary)
    (tmp_path / "weird" / "valid.txt").mkdir(parents=True)
    with pytest.raises(RefformerError, match="folders named valid.txt"):
        data.prepare_pydoc(tmp_path / "weird", source=tmp_path, overwrite=True)


@pytest.mark.parametrize("call, words", [
    (lambda p: data.write_lines(p / "x.txt", ["fine", 3]), "item 2 must be a str"),
    (lambda p: data.write_tsv(p / "x.tsv", [("a", "b"), ("c",)]), "pair 2 must be two str"),
    (lambda p: data.split_by_hash(["a"], key=str, valid=float("nan")), "valid must be a fraction"),
    (lambda p: data.split_by_hash(["a"], key=str, test=-0.1), "test must be a fraction"),
    (lambda p: data.split_path(p, "train", "encoder-only"), "family must be one of"),
    (lambda p: data.split_path(p, "dev", "encoder-decoder"), "split must be one of"),
    (lambda p: data.stable_fraction(None), "text must be a str"),
    (lambda p: data.rst_paragraphs(b"bytes"), "text must be a str"),
    (lambda p: data.pair_alternatives([], ["x"]), "non-empty lists"),
])
def test_bad_arguments_raise_refformer_error(tmp_path, call, words):
    with pytest.raises(RefformerError, match=words):
        call(tmp_path)
