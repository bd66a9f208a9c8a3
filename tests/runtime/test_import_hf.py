"""`refformer import-hf` (runtime/import_cli.py, refimpl/convert/hf_folder.py): tiny random transformers models
(tests/hf_models.py) saved with save_pretrained, plus tokenizer files built here with the sentencepiece trainer (no
hub). Each family's folder imports and the written folder loads and computes transformers' logits; golden runs on
it; Marian's two tokenizers give MarianTokenizer's ids; a folder with only spiece.model converts; generation.json
holds the settings; bad inputs are one `error:` line each."""

import io
import json
import re
import shutil
import sys
import warnings

import numpy as np
import pytest
from click.testing import CliRunner

from refformer.refimpl import load, model_forward
from refformer.refimpl.convert.hf_folder import GENERATION_FILE, TARGET_TOKENIZER_FILE
from refformer.refimpl.io import load_tokenizer, read_tokenizer
from refformer.runtime.cli import main

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")
from tests import hf_models  # noqa: E402  (needs torch and transformers)

LOGITS_TOL = 1e-10
DECODER_ONLY = ("gpt2", "llama", "qwen2")
SOURCE_TEXTS = ["Das Haus ist klein und alt.", "Der Hund läuft schnell über die Straße.",
                "Ich bin ein kleiner Frosch.", "Wir gehen heute in die Stadt.", "Guten Morgen, wie geht es dir?"]
TARGET_TEXTS = ["The house is small and old.", "The dog runs quickly across the street.", "I am a small frog.",
                "We are going to town today.", "Good morning, how are you?"]
# every character of these is in both sentencepiece models (see marian_tokenizer's docstring for the others)
CHARACTERS = sorted(set("".join(SOURCE_TEXTS + TARGET_TEXTS)))


def run(*args):
    """The CLI's result for the arguments (strings)."""
    return CliRunner().invoke(main, [str(arg) for arg in args])


def one_error_line(result):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def train_spm(texts, path, size, **ids):
    """A tiny unigram sentencepiece model trained on texts (every character kept), written to path."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts * 20 + ["".join(CHARACTERS)]), model_writer=model,
                                   vocab_size=size, model_type="unigram", character_coverage=1.0,
                                   hard_vocab_limit=False, minloglevel=2, bos_id=-1, **ids)
    path.write_bytes(model.getvalue())
    return spm.SentencePieceProcessor(model_file=str(path))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (transformers model, its save_pretrained folder), built once."""
    return hf_models.saved_models(tmp_path_factory)


def logits_error(model, family, cfg, params):
    """max |refformer - transformers| / max(1, max |transformers|) on a small padded batch."""
    rng = np.random.default_rng(0)
    if family in DECODER_ONLY:
        ids = rng.integers(3, cfg.vocab_size - 1, size=(2, 6))
        ours, _ = model_forward(cfg, params, None, ids)
        with torch.no_grad(), hf_models.float64_exact():
            theirs = model(input_ids=torch.as_tensor(ids), use_cache=False).logits.numpy()
    else:
        src, tgt = rng.integers(3, cfg.vocab_size - 1, size=(2, 5)), rng.integers(3, cfg.vocab_size - 1, size=(2, 4))
        ours, _ = model_forward(cfg, params, src, tgt)
        with torch.no_grad(), hf_models.float64_exact():
            theirs = model(input_ids=torch.as_tensor(src), decoder_input_ids=torch.as_tensor(tgt),
                           use_cache=False).logits.numpy()
    return float(np.max(np.abs(ours - theirs)) / max(1.0, float(np.max(np.abs(theirs)))))


@pytest.mark.parametrize("family", list(hf_models.FAMILIES))
def test_each_family_imports_and_computes_transformers_logits(family, saved, tmp_path):
    model, folder = saved(family)
    result = run("import-hf", folder, "--out", tmp_path / "m")
    assert result.exit_code == 0, result.output
    cfg, params = load(tmp_path / "m", dtype=np.float64)
    assert next(iter(params["decoder"]["layers"][0]["ffn"]["fc1"].values())).dtype == np.float64
    worst = logits_error(model, family, cfg, params)
    print(f"{family}: imported folder's logits vs transformers, max error {worst:.2e}")
    assert worst <= LOGITS_TOL
    assert json.loads((tmp_path / "m" / GENERATION_FILE).read_text())["format_version"] == 1


def test_golden_runs_on_an_imported_model(saved, tmp_path):
    _, folder = saved("t5")
    assert run("import-hf", folder, "--out", tmp_path / "m").exit_code == 0
    result = run("golden", "--model", tmp_path / "m", "--out", tmp_path / "g.npz")
    assert result.exit_code == 0, result.output
    arrays = np.load(tmp_path / "g.npz")
    assert any(name.startswith("grads.decoder.relative_attention_bias") for name in arrays.files)


def test_generation_json_holds_the_settings_and_a_notice_lists_what_the_runtime_does_not_apply(saved, tmp_path):
    _, folder = saved("marian")
    hf = tmp_path / "hf"
    shutil.copytree(folder, hf)
    settings = json.loads((hf / "generation_config.json").read_text())
    settings.update(num_beams=4, max_length=64, bad_words_ids=[[95]], length_penalty=1.0, do_sample=False,
                    top_k=50, no_repeat_ngram_size=3, num_beam_groups=2, suppress_tokens=[5], min_length=3)
    (hf / "generation_config.json").write_text(json.dumps(settings))
    result = run("import-hf", hf, "--out", tmp_path / "m")
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "m" / GENERATION_FILE).read_text())
    assert written["source"] == "generation_config.json"
    for key in ("decoder_start_token_id", "eos_token_id", "pad_token_id", "forced_eos_token_id", "num_beams",
                "max_length", "bad_words_ids", "length_penalty", "no_repeat_ngram_size", "top_k"):
        assert written["settings"][key] == settings[key], key
    assert "transformers_version" not in written["settings"]
    notices = [line for line in result.output.splitlines() if line.startswith("notice:")]
    assert len(notices) == 2, result.output  # no tokenizer in the folder; the settings
    listed = notices[1]
    names = set(re.findall(r"(?:: |, )(\w+)=", listed))
    assert names == {"num_beam_groups", "suppress_tokens", "min_length"}  # generate applies the others


def test_settings_in_config_json_are_read_when_there_is_no_generation_config(saved, tmp_path):
    _, folder = saved("bart")
    hf = tmp_path / "hf"
    shutil.copytree(folder, hf)
    (hf / "generation_config.json").unlink()
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "num_beams": 5, "forced_bos_token_id": 0}))
    result = run("import-hf", hf, "--out", tmp_path / "m")
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "m" / GENERATION_FILE).read_text())
    assert written["source"] == "config.json"
    assert written["settings"]["num_beams"] == 5 and written["settings"]["forced_bos_token_id"] == 0
    assert "generation settings" not in result.output  # generate applies both: no notice names them


def marian_folder(saved, tmp_path):
    """A Marian folder: the tiny model plus source.spm (German), target.spm (English) and their shared vocab.json
    (</s> 0, <unk> 1, the pieces of both, <pad> last), with the model's vocabulary cut to fit."""
    _, folder = saved("marian")
    hf = tmp_path / "hf"
    shutil.copytree(folder, hf)
    source = train_spm(SOURCE_TEXTS, hf / "source.spm", 60, eos_id=1, unk_id=0, pad_id=-1)
    target = train_spm(TARGET_TEXTS, hf / "target.spm", 50, eos_id=1, unk_id=0, pad_id=-1)
    pieces = {model.id_to_piece(i) for model in (source, target) for i in range(2, model.get_piece_size())}
    vocab = {piece: i for i, piece in enumerate(["</s>", "<unk>", ">>en<<", *sorted(pieces)])}
    assert len(vocab) < hf_models.V
    vocab["<pad>"] = hf_models.V - 1  # the tiny model's pad id; ids in between stay unused
    (hf / "vocab.json").write_text(json.dumps(vocab))
    return hf


def test_a_marian_vocab_id_outside_the_model_is_refused_before_any_table_is_built(saved, tmp_path):
    """vocab.json's <pad> at 10**9: the Unigram table was built first (minutes, gigabytes), the size check after."""
    hf = marian_folder(saved, tmp_path)
    vocab = json.loads((hf / "vocab.json").read_text())
    (hf / "vocab.json").write_text(json.dumps({**vocab, "<pad>": 10**9}))
    line = one_error_line(run("import-hf", hf, "--out", tmp_path / "m"))
    assert "vocab.json gives '<pad>' the id 1000000000, outside the model's vocab_size 96" in line
    assert not (tmp_path / "m").exists()


def test_marian_tokenizers_give_marian_tokenizers_ids(saved, tmp_path):
    from transformers import MarianTokenizer

    hf = marian_folder(saved, tmp_path)
    result = run("import-hf", hf, "--out", tmp_path / "m")
    assert result.exit_code == 0, result.output
    source = load_tokenizer(tmp_path / "m")
    target = read_tokenizer(tmp_path / "m" / TARGET_TOKENIZER_FILE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Recommended: pip install sacremoses"
        reference = MarianTokenizer(str(hf / "source.spm"), str(hf / "target.spm"), str(hf / "vocab.json"))
    texts = SOURCE_TEXTS + TARGET_TEXTS + ["  Das   Haus  ", "Hallo </s> Welt", ">>en<< Guten Morgen", "", "wir.Die"]
    for text in texts:
        assert source.encode(text).ids == reference(text).input_ids, text
        assert target.encode(text).ids == reference(text_target=text).input_ids, text
    assert source.encode(SOURCE_TEXTS[0]).ids != target.encode(SOURCE_TEXTS[0]).ids  # two different sides
    rng = np.random.default_rng(0)
    random_ids = list(rng.choice(sorted(reference.encoder.values()), 12))
    for ids in [reference(text_target=text).input_ids for text in texts] + [random_ids]:
        assert target.decode(ids).rstrip(" ") == reference.decode(ids, skip_special_tokens=True), ids


def test_a_folder_with_only_spiece_model_converts(saved, tmp_path):
    _, folder = saved("t5")
    hf = tmp_path / "hf"
    shutil.copytree(folder, hf)
    reference = train_spm(SOURCE_TEXTS, hf / "spiece.model", 40, pad_id=0, eos_id=1, unk_id=2)
    (hf / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 4}))
    result = run("import-hf", hf, "--out", tmp_path / "m")
    assert result.exit_code == 0, result.output
    tokenizer = load_tokenizer(tmp_path / "m")
    assert tokenizer.get_vocab_size() == reference.get_piece_size() + 4 < hf_models.V  # smaller than vocab_size
    for text in SOURCE_TEXTS:
        assert tokenizer.encode(text).ids == reference.encode(text) + [1], text  # </s> appended, as T5's


def test_a_folder_with_its_own_tokenizer_json_keeps_it(saved, tmp_path):
    from tokenizers import Tokenizer, models

    _, folder = saved("gpt2")
    hf = tmp_path / "hf"
    shutil.copytree(folder, hf)
    words = models.WordLevel({f"w{i}": i for i in range(hf_models.V)}, unk_token="w0")
    Tokenizer(words).save(str(hf / "tokenizer.json"))
    assert run("import-hf", hf, "--out", tmp_path / "m").exit_code == 0
    assert load_tokenizer(tmp_path / "m").get_vocab() == Tokenizer.from_file(str(hf / "tokenizer.json")).get_vocab()


def test_bad_inputs_are_one_error_line(saved, tmp_path):
    _, folder = saved("gpt2")
    assert "is not a folder" in one_error_line(run("import-hf", tmp_path / "none", "--out", tmp_path / "m"))
    (tmp_path / "empty").mkdir()
    assert "no config.json" in one_error_line(run("import-hf", tmp_path / "empty", "--out", tmp_path / "m"))
    unknown = tmp_path / "unknown"
    shutil.copytree(folder, unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "mystery"}))
    assert "'mystery' is not supported" in one_error_line(run("import-hf", unknown, "--out", tmp_path / "m"))
    scaled = tmp_path / "scaled"
    shutil.copytree(saved("llama")[1], scaled)
    config = json.loads((scaled / "config.json").read_text())
    (scaled / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "linear", "factor": 2}}))
    assert "rope_scaling" in one_error_line(run("import-hf", scaled, "--out", tmp_path / "m"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    line = one_error_line(run("import-hf", folder, "--out", tmp_path / "full"))
    assert "--overwrite" in line and not (tmp_path / "full" / "config.json").exists()
    assert "Hugging Face folder itself" in one_error_line(run("import-hf", folder, "--out", folder, "--overwrite"))
    assert run("import-hf", folder, "--out", tmp_path / "full", "--overwrite").exit_code == 0


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer.json"])
def test_a_looping_link_is_named_not_taken_for_a_missing_file(name, saved, tmp_path):
    """A file there as a broken or looping link is one error naming it (a looping tokenizer.json imported without
    a tokenizer, exit 0; a looping config.json read as 'no config.json')."""
    hf = tmp_path / "hf"
    shutil.copytree(saved("gpt2")[1], hf)
    (hf / "tokenizer.json").write_text("{}")
    (hf / name).unlink()
    (hf / name).symlink_to(hf / name)
    line = one_error_line(run("import-hf", hf, "--out", tmp_path / "m"))
    assert f"{name} is not a readable file" in line and not (tmp_path / "m").exists()


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_json_nested_too_deeply_is_one_error_line(name, saved, tmp_path):
    """json raises RecursionError (not ValueError) for deep nesting: it was a traceback."""
    hf = tmp_path / "hf"
    shutil.copytree(saved("gpt2")[1], hf)
    if name != "config.json":
        (hf / "model.safetensors").unlink()
    (hf / name).write_text("[" * 100000 + "]" * 100000)
    line = one_error_line(run("import-hf", hf, "--out", tmp_path / "m"))
    assert f"{name} is not" in line and "nested too deeply" in line and not (tmp_path / "m").exists()



@pytest.mark.parametrize("files", ["spiece.model", "marian"])
def test_sentencepiece_files_without_transformers_are_one_line_naming_what_to_install(files, saved, tmp_path,
                                                                                       monkeypatch):
    if files == "marian":
        hf = marian_folder(saved, tmp_path)
    else:
        hf = tmp_path / "hf"
        shutil.copytree(saved("t5")[1], hf)
        train_spm(SOURCE_TEXTS, hf / "spiece.model", 40, pad_id=0, eos_id=1, unk_id=2)
    for name in [name for name in sys.modules if name == "transformers" or name.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    line = one_error_line(run("import-hf", hf, "--out", tmp_path / "m"))
    assert "needs transformers, sentencepiece and protobuf: pip install transformers sentencepiece protobuf" in line
    assert not (tmp_path / "m").exists()  # nothing written


@pytest.mark.parametrize("inside", ["bundled", "new"])
def test_out_inside_refformer_package_folder_is_refused(inside, saved, tmp_path):
    from refformer.runtime.generator import default_model_dir

    bundled = default_model_dir()
    out = bundled if inside == "bundled" else bundled.parent / "imported-here"
    before = sorted(p.name for p in bundled.iterdir())
    line = one_error_line(run("import-hf", saved("gpt2")[1], "--out", out, "--overwrite"))
    assert "refformer's own package folder" in line
    assert sorted(p.name for p in bundled.iterdir()) == before and not (bundled.parent / "imported-here").exists()
