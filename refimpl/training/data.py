"""Corpora: German-English sentence pairs from the trans-de-en dictionary and prose paragraphs from the
Python documentation, split train/valid/test by a stable hash and stored as plain UTF-8 files.

File formats (one item per line, "\\n" line ends, UTF-8; on reading, blank lines are skipped, a byte-order mark at
the start is dropped, and a malformed line is an error naming file:line):
    *.tsv   source<TAB>target        (translation pairs)
    *.txt   one paragraph per line   (language-model text)

Install the corpora with scripts/get-data.sh (Debian/Ubuntu packages trans-de-en and python3-doc).
"""

import glob
import hashlib
import os
import re
import unicodedata
from pathlib import Path

from ..errors import RefformerError, check
from ..io import atomic_write

DE_EN_SOURCE = "/usr/share/trans/de-en"
PYDOC_SOURCE = "/usr/share/doc/python3*/html/_sources"  # a directory or a glob of directories
GET_DATA = "scripts/get-data.sh"
SPLITS = ("train", "valid", "test")
SUFFIX = {"encoder-decoder": ".tsv", "decoder-only": ".txt"}  # a data directory's split files, by model family

# ---------------------------------------------------------------------------------------------------------------
# trans-de-en: "German :: English", sub-entries separated by " | ", alternatives by "; ".
# Most sub-entries are words and phrases; the example sentences are what we keep.
# ---------------------------------------------------------------------------------------------------------------

_DICT_MARKUP = re.compile(r"\{[^{}]*\}|\[[^\[\]]*\]|<[^<>]*>|\([^()]*\)")  # {f} [ugs.] <keyword> (annotation)
_MAY_END_SENTENCE = re.compile(r"[.!?]")
_SENTENCE_END = re.compile(r"[.!?][\"'’”“]?$")
_FIRST_CHAR_OK = re.compile(r"^[\d\"'„“‚‘¡¿]")  # or an upper-case letter
_SLASH_CHOICE = re.compile(r"[^\W\d_]\s?/\s?[^\W\d_]")  # "halten/bestehen", "nur / lediglich": alternatives, not text
_PLACEHOLDER = re.compile(r"\b(?:etw|jd|jdm|jdn|jds|sth|sb)\b\.?|\bsb's\b|\.\.\.|…")  # templates, not sentences


def _check_text(name, value):
    check(isinstance(value, str), f"{name} must be a str, got {type(value).__name__}")


def clean_dictionary_text(text):
    """Drop the dictionary's {grammar}, [labels], <keywords> and (annotations); tidy spaces before punctuation.

    Raises RefformerError unless text is a str (as do is_sentence, simplify_inline, is_prose, rst_paragraphs and
    stable_fraction)."""
    _check_text("text", text)
    previous = None
    while previous != text:  # innermost first, so nested brackets go too
        previous, text = text, _DICT_MARKUP.sub(" ", text)
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r" +([.,!?;:])", r"\1", text)


def is_sentence(text):
    """A whole sentence: capital (or digit/quote) first, . ! ? last, at least 3 words, no templates or choices.

    Raises RefformerError unless text is a str.
    """
    _check_text("text", text)
    return (len(text.split()) >= 3 and bool(_SENTENCE_END.search(text))
            and (text[0].isupper() or bool(_FIRST_CHAR_OK.match(text)))
            and not _SLASH_CHOICE.search(text) and not _PLACEHOLDER.search(text)
            and not any(c in text for c in "()[]{}<>|\t"))


def _alternatives(entry):
    """The "; "-separated alternatives of a sub-entry, markup removed first (an annotation may hold "; ")."""
    return [clean_dictionary_text(text) for text in clean_dictionary_text(entry).split("; ")]


def pair_alternatives(german, english):
    """Pair the i-th alternative of each side; the longer side's extra ones go with the other's first.

    Raises RefformerError unless both sides are non-empty lists."""
    check(isinstance(german, list) and isinstance(english, list) and german and english,
          "pair_alternatives needs two non-empty lists of alternatives")
    count = max(len(german), len(english))
    return [(german[i] if i < len(german) else german[0], english[i] if i < len(english) else english[0])
            for i in range(count)]


def extract_de_en(source=None):
    """Whole-sentence (German, English) pairs from the trans-de-en dictionary file, deduplicated, in file order.

    Rules: skip "#" comments; split "de :: en"; split both sides on " | " into sub-entries and pair them by position
    (a line whose sides have different counts is skipped); strip dictionary markup (clean_dictionary_text); split
    each sub-entry on "; " into alternatives and pair them (pair_alternatives); keep a pair when both sides are
    sentences (is_sentence). Text is NFC-normalised.

    Raises RefformerError for a source that is not a path, a missing dictionary file, or (read_lines) one that is
    unreadable, not UTF-8 (naming file:line) or empty.
    """
    check_path("source", source, allow_none=True)
    path = Path(source or DE_EN_SOURCE)
    if not path.is_file():
        raise RefformerError(f"German-English dictionary not found at {path}: install it with {GET_DATA} (as root)")
    pairs, seen = [], set()
    for line in read_lines(path):
        if line.startswith("#") or " :: " not in line:
            continue
        german, english = line.split(" :: ", 1)
        german_entries, english_entries = german.split(" | "), english.split(" | ")
        if len(german_entries) != len(english_entries):
            continue
        for german_entry, english_entry in zip(german_entries, english_entries):
            if not (_MAY_END_SENTENCE.search(german_entry) and _MAY_END_SENTENCE.search(english_entry)):
                continue  # a cheap test first: most sub-entries are words and phrases
            for pair in pair_alternatives(_alternatives(german_entry), _alternatives(english_entry)):
                pair = tuple(unicodedata.normalize("NFC", side) for side in pair)
                if is_sentence(pair[0]) and is_sentence(pair[1]) and pair not in seen:
                    seen.add(pair)
                    pairs.append(pair)
    return pairs


# ---------------------------------------------------------------------------------------------------------------
# Python documentation: the reST sources Sphinx ships as _sources/**/*.rst.txt. A small line-based reader keeps
# prose paragraphs (also inside function/class/note directives) and drops everything else.
# ---------------------------------------------------------------------------------------------------------------

# Directives whose body is prose; any other directive's body (code, tables, toctrees, includes...) is skipped.
PROSE_DIRECTIVES = {
    "abstractmethod", "admonition", "attention", "attribute", "audit-event", "awaitablefunction", "awaitablemethod",
    "caution", "class", "classmethod", "cmdoption", "coroutinefunction", "coroutinemethod", "danger", "data",
    "decorator", "decoratormethod", "deprecated", "deprecated-removed", "describe", "envvar", "error", "exception",
    "function", "glossary", "hint", "impl-detail", "important", "method", "note", "only", "opcode", "option",
    "pdbcommand", "seealso", "sidebar", "staticmethod", "tip", "topic", "versionadded", "versionchanged", "warning",
}
# Directives whose header (the text after "::" and its continuation lines) is prose, after this many arguments.
PROSE_HEADERS = {
    "attention": 0, "caution": 0, "danger": 0, "error": 0, "hint": 0, "impl-detail": 0, "important": 0, "note": 0,
    "seealso": 0, "tip": 0, "warning": 0,
    "deprecated": 1, "versionadded": 1, "versionchanged": 1, "deprecated-removed": 2,
}
_DIRECTIVE = re.compile(r"^\.\.\s+([\w:.+-]+)::")
_EXPLICIT_MARKUP = re.compile(r"^\.\.(\s|$)")  # comments, targets, footnotes, substitution definitions
_ADORNMENT = re.compile(r"^([!-/:-@\[-`{-~])\1{2,}\s*$")  # heading underline/overline, transition
_TABLE_LINE = re.compile(r"^(\+[-=+]+\+?|=+( +=+)+|[-=]{2,}( +[-=]{2,})+)\s*$|^[|+]")
_BULLET = re.compile(r"^([-*+•]|#\.|\d+\.|\(?[a-zA-Z0-9]\))\s+")
_FIELD = re.compile(r"^:[^:`]+:(\s|$)")


def _indent(line):
    return len(line) - len(line.lstrip(" "))


_ROLE_PREFIX = {"pep": "PEP ", "rfc": "RFC ", "issue": "bpo-", "gh": "gh-"}  # how Sphinx renders these roles


def _simplify_role(match):
    name, body = match.group(1).split(":")[-1], match.group(2)
    titled = re.fullmatch(r"(.*?)\s*<[^<>]*>", body, re.S)
    if titled and titled.group(1):
        return titled.group(1)
    body = body.lstrip("!")
    if body.startswith("~"):
        body = body[1:].rsplit(".", 1)[-1]
    if name in ("func", "meth") and not body.endswith(")"):
        body += "()"
    return _ROLE_PREFIX.get(name, "") + body


def _simplify_outside_literals(text):
    text = re.sub(r":((?:[\w-]+:)*[\w-]+):`([^`]*)`", _simplify_role, text)
    text = re.sub(r"`([^`<]*?)\s*<[^`]*>`__?", r"\1", text)   # `text <target>`_
    text = re.sub(r"`([^`]+)`__?", r"\1", text)                 # `text`_ and `interpreted text`
    text = re.sub(r"\s*\[(#[\w-]*|\d+|\*)\]_", "", text)        # footnote references
    text = re.sub(r"(?<![\w*\\])\*\*(\S|\S.*?\S)\*\*(?![\w*])", r"\1", text)
    text = re.sub(r"(?<![\w*\\])\*(\S|\S.*?\S)\*(?![\w*])", r"\1", text)
    text = re.sub(r"\\ ", "", text)
    return re.sub(r"\\(.)", r"\1", text)


def simplify_inline(text):
    """reST inline markup to plain text: :role:`x` -> x (func/meth get "()"), ``x`` -> x, `t <url>`_ -> t.

    Raises RefformerError unless text is a str.
    """
    _check_text("text", text)
    # ``literals`` keep their content verbatim (backslashes and stars included)
    parts = re.split(r"``(.+?)``", text)
    text = "".join(part if index % 2 else _simplify_outside_literals(part) for index, part in enumerate(parts))
    return re.sub(r"\s+", " ", text).strip()


def _paragraph_text(lines):
    text = " ".join(line.strip() for line in lines)
    if text.endswith("::"):  # "Example::" introduces a literal block and renders as "Example:"
        text = text[:-2].rstrip() + (":" if not text[:-2].endswith(" ") else "")
    return simplify_inline(text)


def is_prose(text):
    """At least 4 words, ends like a sentence, and no reST left that simplify_inline did not understand.

    Raises RefformerError unless text is a str.
    """
    _check_text("text", text)
    return (len(text.split()) >= 4 and bool(re.search(r"[.!?:][\"')]?$", text))
            and not re.search(r"``|:\w+:`|\|\w+\||^\.\.|^>>>", text))


def rst_paragraphs(text):
    """Prose paragraphs of one reST document, markup simplified, one string each.

    Raises RefformerError unless text is a str.
    """
    _check_text("text", text)
    lines = text.expandtabs(8).split("\n")
    paragraphs = []
    block, text_indent = [], 0  # the paragraph being read, and the column its text starts at

    def flush():
        if block and not any(_TABLE_LINE.match(line) for line in block) and not _FIELD.match(block[0]):
            paragraph = _paragraph_text(block)
            if is_prose(paragraph):
                paragraphs.append(paragraph)
        block.clear()

    def skip_body(start, indent):
        """Index of the first line after the block indented deeper than indent."""
        j = start
        while j < len(lines) and (not lines[j].strip() or _indent(lines[j]) > indent):
            j += 1
        return j

    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        indent = _indent(line)
        if not stripped:
            flush()
            i += 1
            continue
        if _EXPLICIT_MARKUP.match(stripped):
            flush()
            directive = _DIRECTIVE.match(stripped)
            name = directive.group(1).split(":")[-1] if directive else None
            # the header runs to the first blank line (continued signatures, :options:)
            j = i + 1
            while j < len(lines) and lines[j].strip() and (_indent(lines[j]) > indent
                                                           or lines[j].strip().startswith(":")):
                j += 1
            if name in PROSE_HEADERS:  # ".. versionchanged:: 3.6 What changed." : the text is a paragraph
                header = [stripped[directive.end():]] + [line.strip() for line in lines[i + 1:j]]
                header = [line for line in header if not _FIELD.match(line)]
                words = " ".join(header).split()[PROSE_HEADERS[name]:]
                if words:
                    block.append(" ".join(words))
                    flush()
            i = j if name in PROSE_DIRECTIVES else skip_body(j, indent)
            continue
        if stripped.startswith(">>>"):  # doctest block: runs to the next blank line
            flush()
            while i < len(lines) and lines[i].strip():
                i += 1
            continue
        if _ADORNMENT.match(stripped):  # heading underline (the lines above are its title) or transition
            block.clear()
            i += 1
            continue
        bullet = _BULLET.match(stripped)
        if block and (bullet or indent != text_indent):
            if indent > text_indent and len(block) == 1:
                block.clear()  # a definition list's term (or a line introducing a quote) is not prose
            flush()
        if bullet:
            stripped = stripped[bullet.end():]
        if not block:
            text_indent = indent + (bullet.end() if bullet else 0)
            paragraph_indent = indent
        block.append(stripped)
        i += 1
        if stripped.endswith("::"):  # a literal block follows: end the paragraph, skip the indented block
            flush()
            i = skip_body(i, paragraph_indent)
    flush()
    return paragraphs


def check_path(name, value, allow_none=False):
    """RefformerError unless value is a str or os.PathLike path (or None where allowed): an integer would be
    opened as a file descriptor."""
    check((value is None and allow_none) or isinstance(value, (str, os.PathLike)),
          f"{name} must be a path, got {type(value).__name__}")


def find_pydoc_sources(source=None):
    """The .rst.txt files under source (a directory or a glob of directories), each real file once, sorted.
    Raises RefformerError for a source that is not a path, or under which there are none (python3-doc missing)."""
    check_path("source", source, allow_none=True)
    pattern = str(source or PYDOC_SOURCE)
    files = {}
    for directory in sorted(glob.glob(pattern)):
        for path in glob.glob(os.path.join(directory, "**", "*.rst.txt"), recursive=True):
            real = os.path.realpath(path)
            files.setdefault(real, os.path.relpath(path, directory))
    if not files:
        raise RefformerError(f"no Python documentation sources (*.rst.txt) under {pattern}: "
                             f"install them with {GET_DATA} (as root)")
    return [real for real, _ in sorted(files.items(), key=lambda item: item[1])]


def extract_pydoc(source=None):
    """Prose paragraphs of the Python documentation, one string each, deduplicated, in document order.

    Raises RefformerError (find_pydoc_sources) for a source that is not a path or holds no *.rst.txt files, and for a
    source file that is unreadable or not UTF-8 (naming file:line).
    """
    paragraphs, seen = [], set()
    for path in find_pydoc_sources(source):
        for paragraph in rst_paragraphs("\n".join(_decoded_lines(path))):
            paragraph = unicodedata.normalize("NFC", paragraph)
            if paragraph not in seen:
                seen.add(paragraph)
                paragraphs.append(paragraph)
    return paragraphs


# ---------------------------------------------------------------------------------------------------------------
# Splits and files
# ---------------------------------------------------------------------------------------------------------------

def stable_fraction(text):
    """A number in [0, 1) fixed by the text alone (sha1), the same on every machine and Python version.

    A float. Raises RefformerError unless text is a str.
    """
    _check_text("text", text)
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_by_hash(items, key, valid=0.01, test=0.01, min_held_out=500):
    """(train, valid, test) lists, each in input order; an item's split depends only on key(item) and the sizes.

    valid and test each get max(fraction, min_held_out / len(items)) of the items (at most a quarter each), so a
    small corpus still has a few hundred held-out items. Equal keys always land in the same split.
    Raises RefformerError for fractions outside [0, 1], a negative min_held_out or a key that gives no str.
    """
    check(isinstance(items, (list, tuple)), f"items must be a list, got {type(items).__name__}")
    check(callable(key), f"key must be a function item -> text, got {type(key).__name__}")
    for name, value in (("valid", valid), ("test", test)):
        check(isinstance(value, (int, float)) and 0.0 <= value <= 1.0, f"{name} must be a fraction in [0, 1], "
                                                                        f"got {value!r}")
    check(isinstance(min_held_out, int) and min_held_out >= 0,
          f"min_held_out must be an integer >= 0, got {min_held_out!r}")
    items = list(items)
    if items:
        valid = min(max(valid, min_held_out / len(items)), 0.25)
        test = min(max(test, min_held_out / len(items)), 0.25)
    splits = ([], [], [])
    for item in items:
        u = stable_fraction(key(item))
        splits[2 if u < test else 1 if u < test + valid else 0].append(item)
    return splits


def write_lines(path, lines):
    """Write one item per line (UTF-8, "\\n"), atomically. Items must be non-empty and contain no line break.

    Raises RefformerError naming the first item that is not such a str."""
    check_path("path", path)
    check(isinstance(lines, (list, tuple)), f"lines must be a list of str, got {type(lines).__name__}")
    lines = list(lines)
    for number, line in enumerate(lines, 1):
        check(isinstance(line, str), f"{path}: item {number} must be a str, got {type(line).__name__}")
        if not line.strip() or re.search(r"[\n\r]", line):
            raise RefformerError(f"{path}: item {number} is empty or contains a line break: {line[:60]!r}")
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_tsv(path, pairs):
    """Write (source, target) pairs as source<TAB>target lines, atomically.

    Raises RefformerError naming the first pair that is not two non-empty str without TAB or line break."""
    check_path("path", path)
    check(isinstance(pairs, (list, tuple)), f"pairs must be a list of (source, target), got {type(pairs).__name__}")
    lines = []
    for number, pair in enumerate(pairs, 1):
        check(isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(side, str) for side in pair),
              f"{path}: pair {number} must be two str (source, target), got {str(pair)[:60]}")
        source, target = pair
        if any(not side.strip() or re.search(r"[\t\n\r]", side) for side in (source, target)):
            raise RefformerError(f"{path}: pair {number} has an empty side or a TAB/line break: {(source, target)!r}")
        lines.append(f"{source}\t{target}")
    write_lines(path, lines)


_BOMS = ((b"\xff\xfe\x00\x00", "utf-32-le"), (b"\x00\x00\xfe\xff", "utf-32-be"), (b"\xff\xfe", "utf-16-le"),
         (b"\xfe\xff", "utf-16-be"))  # UTF-32 LE starts like UTF-16 LE, so it is tried first


def _read_bytes(path):
    """The UTF-8 bytes of a file, without a UTF-8 byte-order mark at its start (a file with a UTF-16 or UTF-32
    byte-order mark is decoded as such, as generate --input does); RefformerError if it cannot be read, or is not a
    regular file (a pipe or device would be read forever)."""
    path = Path(path)
    if not path.exists():
        raise RefformerError(f"{path} does not exist")
    if path.is_dir():
        raise RefformerError(f"{path} is a folder, not a text file")
    if not path.is_file():
        raise RefformerError(f"{path} is not a regular file (a device or pipe): give a text file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise RefformerError(f"cannot read {path}: {error.strerror or error}") from None
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            try:
                return data[len(bom):].decode(encoding).encode("utf-8")
            except UnicodeError as error:
                raise RefformerError(f"{path} starts with a {encoding[:6].upper()} byte-order mark but is not valid "
                                     f"{encoding[:6].upper()} ({error.reason}); re-encode the file as UTF-8") from None
    return data.removeprefix(b"\xef\xbb\xbf")


def _decoded_lines(path):
    """Every line of a file (line ends and a UTF-8 byte-order mark at the start removed); RefformerError naming
    file:line for bytes that are not UTF-8, and for a file that is missing or unreadable."""
    lines = []
    for number, data in enumerate(_read_bytes(path).split(b"\n"), 1):
        try:
            lines.append(data.decode("utf-8").removesuffix("\r"))
        except UnicodeDecodeError as error:
            raise RefformerError(f"{path}:{number}: not valid UTF-8 (byte 0x{data[error.start]:02x} at column "
                                 f"{error.start + 1}); re-encode the file as UTF-8") from None
    return lines


def _numbered_lines(path):
    """(line number, text) for each non-blank line."""
    return [(number, line) for number, line in enumerate(_decoded_lines(path), 1) if line.strip()]


def read_lines(path):
    """The non-blank lines of a UTF-8 text file (a byte-order mark at its start is dropped).

    Raises RefformerError if the file is missing, unreadable, not UTF-8 (naming file:line) or has no such line.
    """
    check_path("path", path)
    numbered = _numbered_lines(path)
    if not numbered:
        raise RefformerError(f"{path} is empty: expected one item per line")
    return [line for _, line in numbered]


def read_tsv(path):
    """(source, target) pairs of a UTF-8 source<TAB>target file (a byte-order mark at its start is dropped).

    Blank lines are skipped. Raises RefformerError naming file:line for a line without exactly one TAB or with an
    empty side, or bytes that are not UTF-8; and for a file that is missing, unreadable or has no pairs.
    """
    check_path("path", path)
    numbered = _numbered_lines(path)
    if not numbered:
        raise RefformerError(f"{path} is empty: expected source<TAB>target lines")
    pairs = []
    for number, line in numbered:
        fields = line.split("\t")
        if len(fields) != 2:
            raise RefformerError(f"{path}:{number}: expected exactly one TAB (source<TAB>target), "
                                 f"found {len(fields) - 1}: {line[:60]!r}")
        if not fields[0].strip() or not fields[1].strip():
            side = "source" if not fields[0].strip() else "target"
            raise RefformerError(f"{path}:{number}: empty {side}: {line[:60]!r}")
        pairs.append((fields[0], fields[1]))
    return pairs


def split_path(data_dir, split, family):
    """DATA_DIR/{split}.tsv for an encoder-decoder model, .txt for a decoder-only one.

    Raises RefformerError for an unknown split or family."""
    check_path("data_dir", data_dir)
    check(isinstance(split, str) and isinstance(family, str),
          f"split and family must be str, got {split!r}, {family!r}")
    check(split in SPLITS, f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    check(family in SUFFIX, f"family must be one of {', '.join(SUFFIX)}, got {family!r}")
    return Path(data_dir) / f"{split}{SUFFIX[family]}"


def not_a_file(path):
    """Why path cannot be read as a split file: 'is missing', 'is a symbolic link to nothing' or 'is not a regular
    file (a folder, device or pipe)'; None for a regular file (a link to one included).

    Raises nothing: it only asks the file system.
    """
    path = Path(path)
    if path.is_file():
        return None
    if not os.path.lexists(path):
        return "is missing"
    if path.is_symlink() and not path.exists():
        return "is a symbolic link to nothing"
    return "is not a regular file (a folder, device or pipe)"


def detect_family(data_dir):
    """encoder-decoder when DATA_DIR has train.tsv, decoder-only when it has train.txt.

    Raises RefformerError when it has neither as a regular file (a pipe or device named train.tsv is named)."""
    check_path("data_dir", data_dir)
    for family in SUFFIX:
        if split_path(data_dir, "train", family).is_file():
            return family
    for family in SUFFIX:
        reason = not_a_file(split_path(data_dir, "train", family))
        if reason != "is missing":
            raise RefformerError(f"{split_path(data_dir, 'train', family)} {reason}: give the training pairs as a "
                                 "regular file")
    raise RefformerError(f"{data_dir} has no train.tsv or train.txt: write one with 'refformer data de-en' "
                         f"or 'refformer data pydoc'")


def check_split_output(out_dir, suffix, overwrite=False):
    """Refuse (RefformerError) an output folder for {train,valid,test}{suffix} before any work: a file, a folder
    that cannot be created or written, a folder that already holds files (unless overwrite, which replaces only
    the three split files), or one holding the split files of the other corpus kind (.tsv / .txt)."""
    check_path("out_dir", out_dir)
    check(isinstance(suffix, str) and suffix in SUFFIX.values(),
          f"suffix must be one of {', '.join(SUFFIX.values())}, got {suffix!r}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise RefformerError(f"--out {out} is a file, not a folder")
    ancestor = out.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise RefformerError(f"cannot create --out {out}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise RefformerError(f"cannot write to --out {out}: {ancestor} is not writable")
    if not out.is_dir():
        return
    targets = [f"{name}{suffix}" for name in SPLITS]
    folders = [name for name in targets if (out / name).is_dir()]
    if folders:
        raise RefformerError(f"--out {out} has folders named {', '.join(folders)}; choose another --out")
    others = [f"{name}{other}" for other in SUFFIX.values() if other != suffix for name in SPLITS
              if (out / f"{name}{other}").exists()]
    if others:
        raise RefformerError(f"--out {out} holds another corpus ({', '.join(others)}); a data folder holds one "
                             f"corpus: choose another --out (--overwrite replaces only {', '.join(targets)})")
    existing = sorted(path.name for path in out.iterdir())
    if existing and not overwrite:
        shown = ", ".join(existing[:4]) + (f" and {len(existing) - 4} more" if len(existing) > 4 else "")
        raise RefformerError(f"--out {out} already holds files ({shown}); pass --overwrite to replace "
                             f"{', '.join(targets)} in it")


def _write_splits(out_dir, splits, suffix, write):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, items in zip(SPLITS, splits):
        write(out_dir / f"{name}{suffix}", items)
        counts[name] = len(items)
    return counts


def prepare_de_en(out_dir, source=None, overwrite=False):
    """Write out_dir/{train,valid,test}.tsv from trans-de-en (split by the German side); returns counts per split.

    Each file is written atomically. Raises RefformerError (before reading the dictionary) for an out_dir
    check_split_output refuses (existing split files are replaced only with overwrite), and for a missing
    dictionary or one without sentence pairs.
    """
    check_split_output(out_dir, SUFFIX["encoder-decoder"], overwrite)
    pairs = extract_de_en(source)
    if not pairs:
        raise RefformerError(f"no sentence pairs found in {source or DE_EN_SOURCE}")
    return _write_splits(out_dir, split_by_hash(pairs, key=lambda pair: pair[0]), SUFFIX["encoder-decoder"], write_tsv)


def prepare_pydoc(out_dir, source=None, overwrite=False):
    """Write out_dir/{train,valid,test}.txt from the Python docs' prose; returns counts per split.

    Each file is written atomically. Raises RefformerError (before reading the sources) for an out_dir
    check_split_output refuses (existing split files are replaced only with overwrite), and for missing
    sources or sources without prose.
    """
    check_split_output(out_dir, SUFFIX["decoder-only"], overwrite)
    paragraphs = extract_pydoc(source)
    if not paragraphs:
        raise RefformerError(f"no prose paragraphs found under {source or PYDOC_SOURCE}")
    return _write_splits(out_dir, split_by_hash(paragraphs, key=lambda text: text), SUFFIX["decoder-only"],
                         write_lines)
