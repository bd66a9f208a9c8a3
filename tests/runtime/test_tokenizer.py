"""Tokenizer training and glue, and the `data` / `tokenizer` commands, on tiny corpora in tmp directories."""

import unicodedata

import pytest
from click.testing import CliRunner
from hypothesis import example, given
from hypothesis import strategies as st
from tokenizers import Tokenizer

from refformer.refimpl.errors import RefformerError
from refformer.refimpl.training import data
from refformer.refimpl.training import tokenizer as tok
from refformer.runtime.cli import main

PAIRS = [
    ("Der Hund schläft im Garten.", "The dog sleeps in the garden."),
    ("Die Katze trinkt Milch.", "The cat drinks milk."),
    ("Wir gehen heute ins Kino.", "We are going to the cinema today."),
    ("Das Wetter ist schön.", "The weather is nice."),
    ("Ich lerne jeden Tag Deutsch.", "I learn German every day."),
] * 4


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("corpus")
    data.write_tsv(directory / "train.tsv", PAIRS)
    return directory


@pytest.fixture(scope="module", params=tok.MODELS)
def trained(request, corpus):
    return tok.train_tokenizer(corpus, vocab_size=300, model=request.param)


def test_special_ids_are_fixed(trained):
    assert tok.special_ids(trained) == {"pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3}
    assert [trained.id_to_token(i) for i in range(4)] == list(tok.SPECIAL_TOKENS)


def test_vocabulary_learned_from_both_columns(corpus):
    trained = tok.train_tokenizer(corpus, vocab_size=400, model="bpe")
    assert tok.MIN_VOCAB_SIZE < trained.get_vocab_size() <= 400
    german, english = tok.encode(trained, ["Garten", "garden"])
    assert len(german) <= 2 and len(english) <= 2  # words of both columns became tokens


def test_encode_adds_no_special_tokens_and_decode_skips_them(trained):
    text = "Der Hund trinkt Milch."
    (ids,) = tok.encode(trained, [text])
    assert not set(ids) & {0, 1, 2, 3}
    assert tok.decode(trained, [1] + ids + [2, 0, 0]) == text


@given(st.text(max_size=60))
@example("Die Straße — 😀 <s> </s> <pad> <unk>\n\t\r\x00 e\u0301")
def test_round_trip_any_unicode(trained, text):
    (ids,) = tok.encode(trained, [text])
    assert 3 not in ids  # byte-level: nothing is unknown
    assert tok.decode(trained, ids) == unicodedata.normalize("NFC", text) == tok.normalize(text)


def test_bad_input_is_a_refformer_error(trained, corpus):
    with pytest.raises(RefformerError, match="lone surrogate"):
        tok.encode(trained, ["bad \ud800"])
    with pytest.raises(RefformerError, match="outside the vocabulary"):
        tok.decode(trained, [5, 10**6])
    with pytest.raises(RefformerError, match="260"):
        tok.train_tokenizer(corpus, vocab_size=100)
    with pytest.raises(RefformerError, match="bpe, unigram"):
        tok.train_tokenizer(corpus, vocab_size=300, model="wordpiece")
    with pytest.raises(RefformerError, match="no train.tsv or train.txt"):
        tok.train_tokenizer(corpus / "absent", vocab_size=300)


def test_save_and_load(trained, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save_tokenizer(trained, path)
    loaded = tok.load_tokenizer(path)
    assert loaded.get_vocab() == trained.get_vocab()
    assert tok.encode(loaded, ["Das Wetter <s>."]) == tok.encode(trained, ["Das Wetter <s>."])
    path.write_text("{not json")
    with pytest.raises(RefformerError, match="not a valid tokenizer.json"):
        tok.load_tokenizer(path)


def test_trains_on_train_txt(tmp_path):
    data.write_lines(tmp_path / "train.txt", ["Return the running event loop in the current OS thread."] * 5)
    trained = tok.train_tokenizer(tmp_path, vocab_size=280)
    assert tok.decode(trained, tok.encode(trained, ["event loop"])[0]) == "event loop"


def test_cli_data_de_en_without_corpus_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DE_EN_SOURCE", str(tmp_path / "absent"))
    result = CliRunner().invoke(main, ["data", "de-en", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and result.output.startswith("error: ")
    assert "scripts/get-data.sh" in result.output and "Traceback" not in result.output


def test_cli_data_and_tokenizer_train(tmp_path, monkeypatch):
    dictionary = tmp_path / "de-en"
    dictionary.write_text("".join(f"{de} :: {en}\n" for de, en in PAIRS[:5]), encoding="utf-8")
    monkeypatch.setattr(data, "DE_EN_SOURCE", str(dictionary))
    runner = CliRunner()
    result = runner.invoke(main, ["data", "de-en", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "5 in all" in result.output and "train" in result.output

    out = tmp_path / "tokenizer.json"
    result = runner.invoke(main, ["tokenizer", "train", str(tmp_path / "out"), "--vocab-size", "300",
                                  "--out", str(out), "--model", "unigram"])
    assert result.exit_code == 0, result.output
    assert tok.special_ids(tok.load_tokenizer(out))["eos_id"] == 2

    result = runner.invoke(main, ["tokenizer", "train", str(tmp_path / "out"), "--vocab-size", "10", "--out", str(out),
                                  "--overwrite"])
    assert result.exit_code == 1 and result.output.startswith("error: ") and "260" in result.output


def test_padding_and_truncation_sections_are_switched_off(trained, tmp_path):
    """Hugging Face tokenizer.json files often carry padding (here a fixed 1e9: 4 GB per text) and truncation."""
    text = "Der Hund schläft im Garten, und die Katze trinkt Milch."
    want = tok.encode(trained, [text])[0]
    configured = Tokenizer.from_str(trained.to_str())
    configured.enable_padding(length=10**9, pad_id=0, pad_token="<pad>")
    configured.enable_truncation(max_length=3)
    path = tmp_path / "tokenizer.json"
    path.write_text(configured.to_str())
    loaded = tok.load_tokenizer(path)
    assert loaded.padding is None and loaded.truncation is None
    assert tok.encode(loaded, [text])[0] == want and len(want) > 3
    configured.enable_padding(length=64, pad_id=0, pad_token="<pad>")  # one set up in memory: encode switches it off
    assert tok.encode(configured, [text])[0] == want


@pytest.mark.parametrize("texts", ["a str", None, 5, [["nested"]], [b"bytes"]])
def test_encode_refuses_what_is_not_a_list_of_str(trained, texts):
    with pytest.raises(RefformerError, match="must be a"):
        tok.encode(trained, texts)
