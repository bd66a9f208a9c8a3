"""The runtime on ONNX Runtime CPU (IOBinding, the same code path as CUDA) against refimpl.generate,
token for token, for every strategy and both families; export on demand, providers, streaming."""

import os
import re
import stat

import numpy as np
import pytest
from tokenizers import Tokenizer

from refformer.refimpl import Config, RefformerError, init_params, load, save
from refformer.refimpl.generate import GenerationOptions, generate
from refformer.refimpl.training import tokenizer as tok
from refformer.runtime import generator as gen_module
from refformer.runtime.generator import Generator

TEXTS = {
    "encoder-decoder": ["Das Wetter ist heute schön.", "Ich habe Hunger.", "Wo ist der Bahnhof, bitte?"],
    "decoder-only": ["The weather is", "Errors should never pass", "A"],
}
STRATEGIES = [
    dict(max_new_tokens=7),
    dict(max_new_tokens=7, do_sample=True, temperature=0.9, top_k=40, top_p=0.95, seed=11),
    dict(max_new_tokens=6, do_sample=True, num_return_sequences=2, seed=3),
    dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, length_penalty=0.7),
    dict(max_new_tokens=6, num_beams=2, early_stopping=True),
    dict(max_new_tokens=8, min_new_tokens=4, repetition_penalty=1.4, no_repeat_ngram_size=2),
    dict(max_new_tokens=6, forced_bos_token_id=7, forced_eos_token_id=9),  # the in-graph argmax looks again
    dict(max_new_tokens=6, num_beams=3, repetition_penalty=1.4, bad_words_ids=[[5], [6, 7]], forced_eos_token_id=9),
]


def strategy_id(options):
    """A test id for one of STRATEGIES: its options, less the seed."""
    return "-".join(f"{k}={v}" for k, v in options.items() if k != "seed")


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    """A small byte-level BPE tokenizer (specials 0..3 as the project's) trained on a few sentences."""
    tokenizer, trainer = tok.new_tokenizer(300)
    tokenizer.train_from_iterator([t for texts in TEXTS.values() for t in texts] * 3, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save_tokenizer(tokenizer, path)
    return path


def make_model(path, tokenizer_file, family, seed=0, n_heads=2):
    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    cfg = Config(vocab_size=vocab, d_model=16, n_heads=n_heads, d_ff=32, n_encoder_layers=2, n_decoder_layers=2,
                 family=family, max_positions=48, dropout=0.0)
    params = init_params(cfg, np.random.default_rng(seed))
    params["decoder"]["embed_tokens"]["weight"][cfg.eos_id] *= 3  # let some rows end early
    save(path, cfg, params, tokenizer=tokenizer_file)
    return cfg


@pytest.fixture(scope="module", params=["encoder-decoder", "decoder-only"])
def model(request, tmp_path_factory, tokenizer_file):
    path = tmp_path_factory.mktemp(request.param) / "model"
    make_model(path, tokenizer_file, request.param)
    return path, request.param


@pytest.fixture(scope="module")
def runtime(model):
    path, family = model
    return Generator(path, provider="cpu"), family


@pytest.mark.parametrize("options", STRATEGIES, ids=strategy_id)
def test_runtime_matches_refimpl_token_for_token(runtime, options):
    generator, family = runtime
    cfg, params = load(generator.model_dir)
    inputs = generator.encode_inputs(TEXTS[family])
    options = GenerationOptions(**options)
    got = generator.generate_ids(TEXTS[family], options)
    want = generate(cfg, params, options=options, **inputs)
    assert got == want
    assert len(got) == len(TEXTS[family]) and all(len(s) == options.num_return_sequences for s in got)


def test_rows_of_different_lengths_match_single_rows(runtime):
    generator, family = runtime
    together = generator.generate(TEXTS[family], max_new_tokens=6)
    alone = [generator.generate(text, max_new_tokens=6) for text in TEXTS[family]]
    assert together == alone


def test_stream_yields_pieces_that_add_up_to_generate(runtime):
    generator, family = runtime
    pieces = list(generator.stream(TEXTS[family][0], max_new_tokens=8))
    assert len(pieces) >= 1
    assert "".join(pieces) == generator.generate(TEXTS[family][0], max_new_tokens=8)


def test_export_happens_once_and_is_reused(runtime):
    generator, _ = runtime
    manifest = (generator.onnx_dir / "manifest.json").stat().st_mtime_ns
    again = Generator(generator.model_dir, provider="cpu")
    assert again.onnx_dir == generator.onnx_dir
    assert (generator.onnx_dir / "manifest.json").stat().st_mtime_ns == manifest


def test_stale_export_is_redone(tmp_path, tokenizer_file):
    make_model(tmp_path / "m", tokenizer_file, "encoder-decoder", seed=0)
    Generator(tmp_path / "m", provider="cpu")
    make_model(tmp_path / "m", tokenizer_file, "encoder-decoder", seed=1)  # retrained: new weights
    generator = Generator(tmp_path / "m", provider="cpu")
    cfg, params = load(tmp_path / "m")
    options = GenerationOptions(max_new_tokens=5)
    inputs = generator.encode_inputs(["Ich habe Hunger."])
    assert generator.generate_ids(["Ich habe Hunger."], options) == generate(cfg, params, options=options, **inputs)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permission bits")
def test_read_only_model_exports_into_the_user_cache(tmp_path, tokenizer_file, monkeypatch):
    make_model(tmp_path / "m", tokenizer_file, "decoder-only")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    os.chmod(tmp_path / "m", stat.S_IRUSR | stat.S_IXUSR)
    try:
        generator = Generator(tmp_path / "m", provider="cpu")
    finally:
        os.chmod(tmp_path / "m", stat.S_IRWXU)
    assert str(generator.onnx_dir).startswith(str(tmp_path / "cache"))


def test_unwritable_model_dir_goes_to_cache(tmp_path, tokenizer_file, monkeypatch):
    """The same as above, for root too: os.access is what ensure_export asks."""
    make_model(tmp_path / "m", tokenizer_file, "decoder-only")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(gen_module.os, "access", lambda p, mode: False)
    generator = Generator(tmp_path / "m", provider="cpu")
    assert str(generator.onnx_dir).startswith(str(tmp_path / "cache"))
    assert not (tmp_path / "m" / "onnx").exists()


@pytest.mark.parametrize("gpu", [True, False])
def test_auto_falls_back_to_cpu_with_a_notice_only_when_a_gpu_is_there(model, capsys, monkeypatch, gpu):
    monkeypatch.setattr("refformer.export.session.cuda_usable", lambda: False)
    monkeypatch.setattr("refformer.export.session.gpu_present", lambda: gpu)
    generator = Generator(model[0], provider="auto")
    assert generator.provider == "CPUExecutionProvider"
    assert ("running on the CPU" in capsys.readouterr().err) == gpu


def test_cuda_fails_clearly_without_a_gpu(model, monkeypatch):
    monkeypatch.setattr("refformer.export.session.cuda_usable", lambda: False)
    with pytest.raises(RefformerError, match="CUDA execution provider cannot be loaded"):
        Generator(model[0], provider="cuda")


def test_bad_inputs(runtime):
    generator, _ = runtime
    with pytest.raises(RefformerError, match="empty"):
        generator.generate(["ok", "  "])
    with pytest.raises(RefformerError, match="more than the model"):
        generator.generate("word " * 200)
    with pytest.raises(RefformerError, match="top_p"):
        generator.generate("ok", top_p=0)
    generator.truncate = True
    try:
        assert isinstance(generator.generate("word " * 200, max_new_tokens=2), str)
    finally:
        generator.truncate = False


def test_missing_pieces_are_clear(tmp_path, tokenizer_file):
    with pytest.raises(RefformerError, match="does not exist"):
        Generator(tmp_path / "nothing", provider="cpu")
    make_model(tmp_path / "m", tokenizer_file, "decoder-only")
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(RefformerError, match="model.safetensors is missing"):
        Generator(tmp_path / "m", provider="cpu")


def test_verify_finds_an_export_made_into_the_user_cache(tmp_path, tokenizer_file, monkeypatch):
    from click.testing import CliRunner

    from refformer.runtime.cli import main

    make_model(tmp_path / "m", tokenizer_file, "decoder-only")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with monkeypatch.context() as patch:  # a model folder we may not write into
        patch.setattr(gen_module.os, "access", lambda p, mode: False)
        Generator(tmp_path / "m", provider="cpu")
    assert not (tmp_path / "m" / "onnx").exists()
    result = CliRunner().invoke(main, ["verify", "--model", str(tmp_path / "m"), "--provider", "cpu"])
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------- batch independence, seeds, bad input

LONG = {"encoder-decoder": "Das Wetter ist heute schön, und wir gehen.",
        "decoder-only": "The weather is nice today, is it"}
INDEPENDENCE = [dict(), dict(do_sample=True, seed=5, top_k=20), dict(do_sample=True, seed=2, num_return_sequences=2),
                dict(num_beams=3, num_return_sequences=2), dict(repetition_penalty=1.3, no_repeat_ngram_size=2)]


@pytest.mark.parametrize("options", INDEPENDENCE, ids=strategy_id)
def test_a_text_gives_the_same_ids_alone_and_in_a_batch(runtime, options):
    """The default max_new_tokens, the length limit and the seeded draws are per row: "x" runs to its own budget
    (14 tokens from a source of 2, 47 after a prompt of 2) whatever the other rows are."""
    generator, family = runtime
    options = GenerationOptions(**options)
    batch = generator.generate_ids([LONG[family], "x", LONG[family]], options)
    alone = generator.generate_ids(["x"], options)
    assert batch[1] == alone[0]
    assert batch[0] == batch[2] == generator.generate_ids([LONG[family]], options)[0]


def test_seed_none_draws_a_new_seed_every_call(runtime):
    generator, family = runtime
    seeds = {GenerationOptions(do_sample=True).seed for _ in range(5)}
    assert len(seeds) == 5 and all(isinstance(seed, int) and seed >= 0 for seed in seeds)
    options = GenerationOptions(do_sample=True, max_new_tokens=6)
    assert generator.generate_ids(TEXTS[family], options) == generator.generate_ids(TEXTS[family], options)


def test_an_empty_list_gives_an_empty_list(runtime):
    generator, _ = runtime
    assert generator.generate([]) == [] and generator.generate(()) == []
    assert generator.generate_rows([], GenerationOptions()) == []


@pytest.mark.parametrize("call, message", [
    (lambda g: g.generate(None), "texts must be a str or a list"),
    (lambda g: g.generate(5), "texts must be a str or a list"),
    (lambda g: g.generate([["nested"]]), "input 1 must be a str"),
    (lambda g: g.generate(["ok", None]), "input 2 must be a str"),
    (lambda g: g.generate({"a set"}), "texts must be a str or a list"),
    (lambda g: g.generate(b"bytes"), "texts must be a str or a list"),
    (lambda g: g.generate("ok", bogus=1), "unknown generation option 'bogus'"),
    (lambda g: g.generate("ok", seed=-1), "seed must be >= 0"),
    (lambda g: g.generate("ok", seed=1.5), "seed must be an integer"),
    (lambda g: g.generate("ok", temperature="hot"), "temperature"),
    (lambda g: g.generate("ok", temperature=float("nan")), "temperature"),
    (lambda g: g.generate("ok", top_k=True), "top_k"),
    (lambda g: g.generate("ok", num_beams=10**9), "num_beams"),
    (lambda g: g.generate_ids(["ok"], {"max_new_tokens": 2}), "options must be a GenerationOptions"),
    (lambda g: g.generate_rows([[5, 10**6]], GenerationOptions()), "row 0 must be a list of token ids"),
    (lambda g: g.generate_rows(["text"], GenerationOptions()), "row 0 must be a list of token ids"),
    (lambda g: g.encode_rows(["a", "b"], ["only one name"]), "names must be 2 strings"),
    (lambda g: g.pad_inputs([]), "rows must be a non-empty list"),
    (lambda g: g.decode(None), "ids must be a list of integer token ids"),
    (lambda g: g.decode([1.5]), "ids must be a list of integer token ids"),
    (lambda g: g.decode([10**9]), "outside the vocabulary"),
    (lambda g: list(g.stream(None)), "text must be a str"),
    (lambda g: list(g.stream("ok", top_p=2)), "top_p"),
])
def test_bad_library_input_is_a_refformer_error(runtime, call, message):
    generator, _ = runtime
    with pytest.raises(RefformerError, match=re.escape(message)):
        call(generator)


@pytest.mark.parametrize("arguments, message", [
    (dict(threads=0), "threads must be an integer >= 1"), (dict(threads=-1), "threads"), (dict(threads=1.5), "threads"),
    (dict(dtype="fp64"), "dtype must be fp32, fp16 or int8"), (dict(truncate="yes"), "truncate"),
    (dict(static_length=0), "static_length"), (dict(model_dir=5), "model_dir must be a folder path"),
    (dict(provider="tpu"), "provider must be auto, cuda or cpu"), (dict(variant="fast"), "variant must be one of"),
])
def test_bad_generator_arguments_are_refused(model, arguments, message):
    arguments = {"model_dir": model[0], "provider": "cpu", **arguments}
    with pytest.raises(RefformerError, match=re.escape(message)):
        Generator(**arguments)


def test_threads_above_the_cpu_count_are_capped(model):
    generator = Generator(model[0], provider="cpu", threads=(os.cpu_count() or 1) * 100)
    assert generator.threads == os.cpu_count()


def test_padding_and_truncation_in_tokenizer_json_do_not_reach_the_model(tmp_path, tokenizer_file):
    """A Hugging Face tokenizer.json may pad every text to a fixed length (1e9: 4 GB) and cut it silently."""
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.enable_padding(length=10**9, pad_id=0, pad_token="<pad>")
    tokenizer.enable_truncation(max_length=2)
    padded = tmp_path / "tokenizer.json"
    padded.write_text(tokenizer.to_str())
    assert '"padding"' in padded.read_text() and '"truncation"' in padded.read_text()
    make_model(tmp_path / "m", padded, "encoder-decoder")
    generator = Generator(tmp_path / "m", provider="cpu")
    clean = tok.load_tokenizer(tokenizer_file)
    text = TEXTS["encoder-decoder"][0]
    assert generator.encode_rows([text]) == tok.encode(clean, [text])
    assert len(generator.encode_rows([text])[0]) > 2
    assert generator.tokenizer.padding is None and generator.tokenizer.truncation is None


def test_every_public_method_refuses_junk_with_a_refformer_error(runtime):
    """Each public method of Generator, each argument replaced by junk in turn: RefformerError or a result."""
    import inspect

    generator, _ = runtime
    junk = [None, -1, "", [], [[1]], [None], np.zeros(2), np.zeros((2, 3)), {}, 1.5, float("nan"), object(), [[-1]],
            [[10**9]], ["\ud800"], b"x", True]
    good = {"texts": ["Hallo"], "options": GenerationOptions(max_new_tokens=2), "rows": [[5, 6]], "ids": [5, 6],
            "text": "Hallo", "names": None, "variant": "reference", "static_length": None, "cuda_graph": False}
    checked = 0
    for name, method in inspect.getmembers(generator, callable):
        if name.startswith("_") or name in ("probe", "check_arguments", "make_stepper"):  # (make_stepper: below)
            continue
        parameters = [p.name for p in inspect.signature(method).parameters.values()
                      if p.kind == p.POSITIONAL_OR_KEYWORD]
        for parameter in parameters:
            for value in junk:
                try:
                    result = method(**{**{p: good[p] for p in parameters}, parameter: value})
                    if inspect.isgenerator(result):
                        list(result)
                except RefformerError:
                    pass
                checked += 1
    assert checked > 150
    for variant in (None, "auto", "fast", ["reference"]):
        with pytest.raises(RefformerError, match="variant must be one of"):
            generator.make_stepper(variant, None, False)


@pytest.mark.parametrize("normalizer, message", [
    ({"type": "Replace", "pattern": {"Regex": "[\\s\\S]"}, "content": ""}, "input 1 gives no tokens"),
    ({"type": "Replace", "pattern": {"Regex": "(?:)"}, "content": "abcdefghij" * 100},  # tokenizers 0.22 panics
     "input 1: the tokenizer failed inside the tokenizers library"),
])
def test_a_crafted_normalizer_is_one_error_and_prints_nothing(tmp_path, tokenizer_file, normalizer, message, capfd):
    import json

    data = json.loads(tokenizer_file.read_text())
    data["normalizer"] = normalizer
    crafted = tmp_path / "tokenizer.json"
    crafted.write_text(json.dumps(data))
    make_model(tmp_path / "m", crafted, "encoder-decoder")
    generator = gen_module.Generator(tmp_path / "m", provider="cpu")
    capfd.readouterr()
    with pytest.raises(RefformerError, match=message):
        generator.generate("Hallo Welt")
    assert capfd.readouterr().err == ""  # no panic message, no RUST_BACKTRACE backtrace


def test_a_huge_text_is_refused_or_cut_before_it_is_tokenized_whole(tmp_path, tokenizer_file):
    make_model(tmp_path / "m", tokenizer_file, "encoder-decoder")
    generator = gen_module.Generator(tmp_path / "m", provider="cpu")
    text = "Hallo Welt, wie geht es dir heute? " * 20000  # 700k characters: tokenized whole, seconds and GBs per MB
    with pytest.raises(RefformerError, match="has 700000 characters, far more than the model's 47 tokens hold"):
        generator.encode_rows([text])
    generator.truncate, generator.collected_warnings = True, []
    row = generator.encode_rows([text])[0]
    assert row == tok.encode(generator.tokenizer, [text])[0][:47]  # the same tokens as cutting the whole text's
    assert generator.collected_warnings == ["warning: input 1 truncated from its 700000 characters to 47 tokens"]


def test_many_texts_run_in_library_batches_with_the_same_outputs(tmp_path, tokenizer_file, monkeypatch):
    make_model(tmp_path / "m", tokenizer_file, "encoder-decoder")
    generator = gen_module.Generator(tmp_path / "m", provider="cpu")
    texts = ["Hallo Welt.", "Guten Morgen, wie geht es?", "Danke."] * 3
    alone = [generator.generate(text, do_sample=True, seed=3, max_new_tokens=4) for text in texts]
    sizes = []
    search = gen_module.Generator.search_rows
    monkeypatch.setattr(gen_module, "LIBRARY_BATCH", 4)
    monkeypatch.setattr(gen_module.Generator, "search_rows",
                        lambda self, rows, options: sizes.append(len(rows)) or search(self, rows, options))
    assert generator.generate(texts, do_sample=True, seed=3, max_new_tokens=4) == alone
    assert sizes == [4, 4, 1]  # 20,000 texts at once had been refused for their caches' memory


# ---------------------------------------------------------------------------- imported checkpoints (issue 14)


def imported_generator(tmp_path, family, template=None, **settings):
    """A tiny transformers model of the family (its eos row of the head scaled by 3, so that eos comes), with
    settings in its generation config and a word-level tokenizer.json ("w5 w6" -> [5, 6]) with the specials at the
    config's ids and, given a template ("<s> $A </s>"), a post-processor adding them, through import_hf into a model
    folder -> (transformers model, Generator on the CPU)."""
    torch = pytest.importorskip("torch")
    from tokenizers import models, pre_tokenizers, processors

    from refformer.refimpl.convert.hf_folder import import_hf
    from tests import hf_models

    model = hf_models.build(family)
    with torch.no_grad():
        model.get_output_embeddings().weight[model.config.eos_token_id] *= 3.0
    for name, value in settings.items():
        setattr(model.generation_config, name, value)
    model.save_pretrained(tmp_path / "hf")
    config = model.config
    specials = {getattr(config, "pad_token_id", None): "<pad>", getattr(config, "bos_token_id", None): "<s>",
                config.eos_token_id: "</s>"}
    specials.pop(None, None)  # T5 and Marian have no bos, GPT-2 and Qwen2 no pad
    unk = min(set(range(hf_models.V)) - set(specials))
    vocab = {"<unk>" if i == unk else specials.get(i, f"w{i}"): i for i in range(hf_models.V)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if template is not None:
        tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=[
            (token, i) for i, token in specials.items() if token in template])
    tokenizer.save(str(tmp_path / "hf" / "tokenizer.json"))
    import_hf(tmp_path / "hf", tmp_path / "m")
    return model, Generator(tmp_path / "m", provider="cpu")


def transformers_ids(model, generator, rows, **options):
    """transformers' generate on the inputs the Generator builds from rows (an encoder-decoder's sources + eos, a
    decoder-only model's bos + prompt) -> per sequence the generated ids up to and including eos."""
    import torch

    inputs = generator.pad_inputs(rows)
    ids = torch.tensor(inputs.get("src_ids", inputs.get("prompt_ids")))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **options).tolist()
    eos, start = generator.cfg.eos_id, 1 if generator.cfg.is_encoder_decoder else ids.shape[1]
    return [row[start:row.index(eos, start) + 1] if eos in row[start:] else row[start:] for row in out]


@pytest.mark.parametrize("family, settings", [
    ("bart", {}),  # decoder_start_token_id 2 (bos is 0), forced_eos_token_id 2, transformers' 20 new tokens
    ("bart", dict(num_beams=3, no_repeat_ngram_size=2, max_length=12, bad_words_ids=[[24]], length_penalty=0.5)),
    ("llama", {}),
    ("llama", dict(num_beams=2, repetition_penalty=1.5, max_new_tokens=6)),
    ("gpt2", {}), ("qwen2", {}), ("t5", dict(num_beams=3, no_repeat_ngram_size=2, max_new_tokens=7)), ("marian", {}),
], ids=["bart-defaults", "bart-settings", "llama-defaults", "llama-settings", "gpt2-defaults", "qwen2-defaults",
        "t5-settings", "marian-defaults"])
def test_an_imported_checkpoint_generates_transformers_ids_with_its_settings(tmp_path, family, settings):
    """Without options the Generator (ONNX Runtime, fp32) applies the checkpoint's generation settings
    (generation.json) and gives the ids of transformers' model.generate(input_ids), also for models without a pad
    (GPT-2, Qwen2) or a bos id (T5, Marian: their decoder start comes with the settings); an option given overrides
    its setting."""
    model, generator = imported_generator(tmp_path, family, **settings)
    generator.probe()  # the probe of auto's fallback chain runs on an imported model (its own decoder start) too
    rows = [[5, 6, 7, 8], [9, 10, 11, 12]]
    ours = [sequence for row in generator.search_rows(rows, generator.check_options(None)) for sequence in row]
    assert ours == transformers_ids(model, generator, rows)
    given = generator.check_options(GenerationOptions(num_beams=4, max_new_tokens=5))
    assert (given.num_beams, given.max_new_tokens, given.max_length) == (4, 5, None)
    ours = [sequence for row in generator.search_rows(rows, given) for sequence in row]
    assert ours == transformers_ids(model, generator, rows, num_beams=4, max_new_tokens=5)


@pytest.mark.parametrize("family, template", [("bart", "<s> $A </s>"), ("llama", "<s> $A")])
def test_an_imported_checkpoint_generates_from_text_as_transformers_from_its_tokenizers_ids(tmp_path, family,
                                                                                          template):
    """From text: the Generator adds the special tokens the checkpoint's tokenizer adds (no bos/eos of its own), so
    the ids equal transformers' generate on tokenizer(text)'s ids, and the text decodes without the specials."""
    import torch

    model, generator = imported_generator(tmp_path, family, template=template)
    texts = ["w5 w6 w7 w8", "w9 w10 w11"]
    ours = generator.generate_ids(texts)
    for text, sequences in zip(texts, ours):
        ids = torch.tensor([generator.tokenizer.encode(text).ids])
        assert ids[0, 0] == generator.cfg.bos_id
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids))[0].tolist()
        start = 1 if generator.cfg.is_encoder_decoder else ids.shape[1]
        assert sequences == [out[start:out.index(generator.cfg.eos_id, start) + 1]
                             if generator.cfg.eos_id in out[start:] else out[start:]]


def test_checkpoint_options_map_generation_json_as_transformers_reads_it(tmp_path):
    """generation.json's settings -> GenerationOptions fields: a sampling checkpoint gets transformers' top_k of 50
    unless it sets one, a length of 20 new tokens when it sets none; settings the search cannot take are left out;
    a folder without generation.json (refformer's own models) gets nothing."""
    import json

    cfg = Config(vocab_size=30, d_model=16, n_heads=2, d_ff=32, family="decoder-only")
    assert gen_module.checkpoint_options(tmp_path, cfg) == {}
    settings = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "early_stopping": "never",
                "forced_eos_token_id": [2, 3], "decoder_start_token_id": 1, "num_beam_groups": 2, "pad_token_id": None}
    (tmp_path / "generation.json").write_text(json.dumps({"format_version": 1, "settings": settings}))
    assert gen_module.checkpoint_options(tmp_path, cfg) == {"do_sample": True, "temperature": 0.6, "top_p": 0.9,
                                                            "top_k": 50, "max_new_tokens": 20}
    settings = {"max_length": 64, "forced_eos_token_id": [2], "decoder_start_token_id": 1, "top_k": 5}
    (tmp_path / "generation.json").write_text(json.dumps({"format_version": 1, "settings": settings}))
    assert gen_module.checkpoint_options(tmp_path, Config(vocab_size=30, d_model=16, n_heads=2, d_ff=32)) == {
        "max_length": 64, "forced_eos_token_id": 2, "decoder_start_token_id": 1}
    (tmp_path / "generation.json").write_text("[")
    with pytest.raises(RefformerError, match="cannot read"):
        gen_module.checkpoint_options(tmp_path, cfg)
