"""decoder_static_fused.onnx on the CPU drops finished rows, as the reference stepper does
(StaticOrtStepper.drops_finished_rows, keep_rows): the ids are those of the same search keeping every row, and
later decoder calls compute only the rows still generating."""

import pytest

from refformer.refimpl import load
from refformer.refimpl.generate import GenerationOptions, generate
from refformer.runtime.generator import Generator
from refformer.runtime.stepper import StaticOrtStepper

from .test_generator import TEXTS, imported_generator, tokenizer_file, transformers_ids  # noqa: F401  (fixture)
from .test_imported_static_fused import families  # noqa: F401  (fixture)
from .test_static import FAMILIES, STATIC_LENGTH, exported_models  # noqa: F401  (fixture)

SEARCHES = {
    "greedy": dict(max_new_tokens=12),
    "penalties": dict(max_new_tokens=10, repetition_penalty=1.3, no_repeat_ngram_size=2),  # the logits path
    "sampling": dict(max_new_tokens=10, do_sample=True, top_k=20, temperature=1.3, seed=5, num_return_sequences=2),
    "beams": dict(max_new_tokens=8, num_beams=3, num_return_sequences=2),
}


def decoder_rows(monkeypatch):
    """The rows of every one-token decoder call (StaticOrtStepper.run_one), appended as they run."""
    rows, original = [], StaticOrtStepper.run_one

    def counting(self, ids, positions):
        rows.append(ids.shape[0])
        return original(self, ids, positions)

    monkeypatch.setattr(StaticOrtStepper, "run_one", counting)
    return rows


def with_and_without_drops(call, monkeypatch):
    """call() with finished rows dropped (the default) and with every row kept -> (ids, ids, rows per decoder call
    of each)."""
    rows = decoder_rows(monkeypatch)
    dropped = call()
    dropped_rows = rows[:]
    rows.clear()
    with monkeypatch.context() as patch:
        patch.setattr(StaticOrtStepper, "drops_finished_rows", False)
        kept = call()
    return dropped, kept, dropped_rows, rows[:]


def expected_rows(sequences, first_step):
    """The rows still generating at each one-token call: a row of n generated ids (eos included) is computed at
    steps 0 .. n - 1; first_step 1 where the prompt pass is step 0 (a decoder-only prompt of more than one token)."""
    lengths = [len(sequence) for sequence in sequences]
    return [sum(n > t for n in lengths) for t in range(first_step, max(lengths))]


def static_fused(folder, **options):
    generator = Generator(folder, provider="cpu", variant="static_fused", static_length=STATIC_LENGTH, **options)
    assert generator.variant == "static_fused" and generator.stepper.drops_finished_rows
    return generator


@pytest.mark.parametrize("name", sorted(SEARCHES))
@pytest.mark.parametrize("family", FAMILIES)
def test_ids_are_the_same_with_and_without_dropping_finished_rows(exported_models, family, name,  # noqa: F811
                                                                  monkeypatch):
    """Every strategy gives refimpl's ids with finished rows dropped; greedy and sampling compute fewer rows (beam
    search keeps its beams: it never drops)."""
    generator = static_fused(exported_models[family])
    cfg, params = load(generator.model_dir)
    options = GenerationOptions(**SEARCHES[name])
    texts = TEXTS[family] * 2
    dropped, kept, dropped_rows, kept_rows = with_and_without_drops(lambda: generator.generate_ids(texts, options),
                                                                    monkeypatch)
    assert dropped == kept == generate(cfg, params, options=options, **generator.encode_inputs(texts))
    if name == "beams":
        assert dropped_rows == kept_rows
    else:
        assert sum(dropped_rows) < sum(kept_rows) and dropped_rows == sorted(dropped_rows, reverse=True)
    if name == "greedy":
        first_step = 0 if family == "encoder-decoder" else 1
        assert dropped_rows == expected_rows([row[0] for row in dropped], first_step)
        assert set(kept_rows) == {len(texts)}


def test_drops_allocate_no_buffer_set_and_the_next_call_uses_whole_sets(exported_models, monkeypatch):  # noqa: F811
    """keep_rows packs the rows still generating into the leading rows of the buffers in use: the sets stay one per
    batch size and source bucket, and the next call (of any size) starts from a whole set with its ids unchanged."""
    generator = static_fused(exported_models["encoder-decoder"])
    texts = TEXTS["encoder-decoder"] * 2
    first = generator.generate(texts, max_new_tokens=12)
    sets = dict(generator.stepper.sets)
    rows = decoder_rows(monkeypatch)
    assert generator.generate(texts, max_new_tokens=12) == first
    assert min(rows) < len(texts) and len(generator.stepper.shape_key) == 3  # it ended on views of the set
    assert generator.stepper.sets.keys() == sets.keys()
    assert all(generator.stepper.sets[key] is value for key, value in sets.items())
    fresh = static_fused(exported_models["encoder-decoder"])
    for n, beams in ((2, 1), (len(texts), 2), (1, 3)):  # then whole sets again, of any size, beams too
        assert (generator.generate(texts[:n], max_new_tokens=12, num_beams=beams)
                == fresh.generate(texts[:n], max_new_tokens=12, num_beams=beams))


def test_the_device_path_keeps_every_row(exported_models, monkeypatch):  # noqa: F811
    """With the caches on the device (CUDA; host_cache False drives that path on the CPU) and with the masked
    static graphs, the batch keeps its size: a buffer set and captured graph per batch size."""
    generator = static_fused(exported_models["encoder-decoder"])
    generator.stepper.host_cache = False
    assert not generator.stepper.drops_finished_rows
    static = Generator(exported_models["encoder-decoder"], provider="cpu", variant="static",
                       static_length=STATIC_LENGTH)
    assert not static.stepper.drops_finished_rows
    texts = TEXTS["encoder-decoder"] * 2
    rows = decoder_rows(monkeypatch)
    for one in (generator, static):
        one.generate(texts, max_new_tokens=12)
        assert set(rows) == {len(texts)}
        rows.clear()


def test_int8_ids_are_the_same_with_and_without_dropping(exported_models, monkeypatch, tmp_path):  # noqa: F811
    """int8 (dynamically quantized activations, so a row's ids may depend on the rows beside it): on the test
    model the dropped and kept searches agree, greedy and sampling."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for family in FAMILIES:
        generator = static_fused(exported_models[family], dtype="int8")
        texts = TEXTS[family] * 2
        for name in ("greedy", "sampling"):
            options = GenerationOptions(**SEARCHES[name])
            dropped, kept, dropped_rows, kept_rows = with_and_without_drops(
                lambda: generator.generate_ids(texts, options), monkeypatch)
            assert dropped == kept, (family, name)
            assert sum(dropped_rows) < sum(kept_rows)


@pytest.mark.parametrize("settings", [{}, dict(num_beams=2, max_new_tokens=6)], ids=["greedy", "beams"])
def test_an_imported_llama_gives_transformers_ids_while_rows_leave(tmp_path, families, settings,  # noqa: F811
                                                                   monkeypatch):
    """An imported Llama (GroupQueryAttention with rotary) on ragged prompts: rows leave after the prompt pass,
    each row's cache slots are its positions, and the ids are transformers' generate, row by row."""
    model, generator = imported_generator(tmp_path, "llama-16", **settings)
    assert generator.variant == "static_fused" and generator.stepper.drops_finished_rows
    options = generator.check_options(None)
    rows = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15], [7], [9, 10, 11, 12, 13]]

    def call():
        return [sequence for row in generator.search_rows(rows, options) for sequence in row]

    dropped, kept, dropped_rows, kept_rows = with_and_without_drops(call, monkeypatch)
    theirs = [transformers_ids(model, generator, [row], **settings)[0] for row in rows]
    assert dropped == kept == theirs
    if not settings:
        assert dropped_rows == expected_rows(dropped, 1) and sum(dropped_rows) < sum(kept_rows)


def test_the_encoder_runs_on_the_unpadded_source(exported_models):  # noqa: F811
    """On the CPU encoder.onnx sees the source as given (the reference stepper's encoder input: with int8 the same
    quantized activations), its keys/values copied into the first S positions of the bucket-padded cross buffers;
    what an earlier call left in the padded positions is masked out."""
    generator = static_fused(exported_models["encoder-decoder"])
    stepper = generator.stepper
    texts = TEXTS["encoder-decoder"][1:2] * 2
    first = generator.generate(texts, max_new_tokens=12)
    S = generator.encode_inputs(texts)["src_ids"].shape[1]
    assert stepper.cross[0][0].shape()[2] == S < stepper.src_keep.shape[1] == stepper.cross_sets[0][0][0].shape()[2]
    assert stepper.src_keep.shape[1] % 16 == 0
    for pair in stepper.cross_sets[0]:  # poison every position, the padded ones included
        for value in pair:
            value.numpy()[:] = 1e4
    assert generator.generate(texts, max_new_tokens=12) == first


WORDS = " ".join(text for texts in TEXTS.values() for text in texts).split()
HOSTILE = [  # every option that touches which rows finish when: a row (or all) at the first step, penalties, sampling
    dict(max_new_tokens=1),
    dict(max_new_tokens=12, min_new_tokens=5),
    dict(max_new_tokens=9, repetition_penalty=1.3, no_repeat_ngram_size=2, bad_words_ids=[[5], [6, 7]],
         forced_eos_token_id=9),
    dict(max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, temperature=1.3, seed=5, num_return_sequences=3),
    dict(max_new_tokens=8, num_beams=3, num_return_sequences=2, early_stopping=True),
    dict(max_new_tokens=12),
]


def ragged_texts(rng, n, family):
    """n texts of 1 .. 20 words (decoder-only: 1 .. 4, its prompts share the 40 static slots): sources of several
    bucket widths in one batch, the longest cut at max_positions (truncate)."""
    most = 20 if family == "encoder-decoder" else 4
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(1, most + 1)))) for _ in range(n)]


@pytest.mark.parametrize("family", FAMILIES)
def test_one_generator_through_many_ragged_batches_gives_the_reference_graphs_ids(exported_models, family,  # noqa: F811
                                                                                   monkeypatch):
    """One Generator reused for batches of 1 .. 200 rows of very different lengths (more (batch, bucket) shapes than
    the MAX_BUFFER_SETS kept, so sets are evicted between calls that ended on keep_rows' views), every option of
    HOSTILE: the ids are the reference graph's (fp32) and those of the same search keeping every row; a search
    abandoned after rows left (a stream stopped early) leaves nothing behind for the next call."""
    import numpy as np

    from refformer.refimpl.generate import search_iter
    from refformer.runtime.stepper import MAX_BUFFER_SETS

    generator = Generator(exported_models[family], provider="cpu", variant="static_fused",
                          static_length=STATIC_LENGTH, truncate=True)
    reference = Generator(exported_models[family], provider="cpu", variant="reference", truncate=True)
    rng, shapes, views, calls = np.random.default_rng(0), set(), 0, [0, 0]
    for n in (1, 2, 17, 64, 200, 3, 5, 7, 9, 33, 2):
        for number, settings in enumerate(HOSTILE):
            if n > 9 and number in (3, 4):  # sampling and beams at the small sizes only (time)
                continue
            texts, options = ragged_texts(rng, n, family), GenerationOptions(**settings)
            dropped, kept, dropped_rows, kept_rows = with_and_without_drops(
                lambda: generator.generate_ids(texts, options), monkeypatch)
            assert dropped == kept == reference.generate_ids(texts, options), (n, settings)
            shapes.add(generator.stepper.shape_key[:2])
            calls = [calls[0] + sum(dropped_rows), calls[1] + sum(kept_rows)]
        abandoned = search_iter(generator.stepper, generator.cfg, GenerationOptions(max_new_tokens=12),
                                **generator.encode_inputs(ragged_texts(rng, 9, family)))
        for _ in zip(range(4), abandoned):  # rows leave on the way; the search is never finished
            pass
        views += len(generator.stepper.shape_key) == 3  # left on keep_rows' views
    assert len(shapes) > MAX_BUFFER_SETS and views > 0 and calls[0] < calls[1]


def test_int8_drops_rows_as_the_reference_stepper_does(exported_models, monkeypatch, tmp_path):  # noqa: F811
    """int8 scales activations per tensor, so a row's ids may depend on the rows computed beside it, and dropping
    finished rows can change them (as it does for the reference stepper, which drops them too): static_fused's int8
    ids with drops are the reference graph's int8 ids with drops (the same rows each step, the encoder on the same
    unpadded source), on 17 ragged rows of the test model."""
    import numpy as np

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    for family in FAMILIES:
        generator = static_fused(exported_models[family], dtype="int8", truncate=True)
        reference = Generator(exported_models[family], provider="cpu", variant="reference", dtype="int8",
                              truncate=True)
        for settings in (HOSTILE[1], HOSTILE[2]):
            texts, options = ragged_texts(rng, 17, family), GenerationOptions(**settings)
            assert generator.generate_ids(texts, options) == reference.generate_ids(texts, options), family
