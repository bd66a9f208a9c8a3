"""Hostile checks of imported checkpoints' generation against transformers' generate (issue 14)."""

import pytest

from refformer.refimpl.generate import GenerationOptions
from refformer.runtime.generator import Generator
from tests.runtime.test_generator import imported_generator, transformers_ids


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_the_static_decoder_of_a_grouped_query_model_gives_transformers_ids(tmp_path, family):
    """The static stepper's caches hold n_kv_heads heads, as the exported graphs do (they held n_heads: every
    generate --variant static of Llama or Qwen2 failed in ONNX Runtime's Concat)."""
    model, reference = imported_generator(tmp_path, family)
    generator = Generator(tmp_path / "m", provider="cpu", variant="static")
    rows = [[5, 6, 7, 8], [9, 10, 11, 12]]
    ours = [sequence for row in generator.search_rows(rows, generator.check_options(None)) for sequence in row]
    assert ours == transformers_ids(model, generator, rows)
    ragged = [[5, 6, 7, 8], [9, 10]]  # prompts of different lengths: as the reference decoder, row for row
    assert generator.search_rows(ragged, generator.check_options(None)) == reference.search_rows(
        ragged, reference.check_options(None))


@pytest.mark.parametrize("family, max_length", [("gpt2", 4), ("bart", 1)])
def test_a_checkpoint_max_length_that_leaves_no_room_is_refused_as_transformers_refuses_it(tmp_path, family,
                                                                                          max_length):
    """max_length at or below the decoder's input (the prompt; an encoder-decoder's start token) is refused in one
    error naming max_new_tokens, as transformers' generate raises; it gave empty outputs silently. A given
    max_new_tokens overrides the setting."""
    from refformer.refimpl.errors import RefformerError
    from refformer.refimpl.generate import GenerationOptions

    model, generator = imported_generator(tmp_path, family, max_length=max_length)
    rows = [[5, 6, 7, 8], [9, 10, 11, 12]]
    with pytest.raises(RefformerError, match="max_length .* leaves no room .* give max_new_tokens instead"):
        generator.search_rows(rows, generator.check_options(None))
    given = generator.check_options(GenerationOptions(max_new_tokens=3))
    ours = [sequence for row in generator.search_rows(rows, given) for sequence in row]
    assert ours == transformers_ids(model, generator, rows, max_new_tokens=3)


def test_stream_of_a_checkpoint_with_several_return_sequences_yields_the_best_text(tmp_path):
    """stream() yields text: with a checkpoint's num_return_sequences of 2 (beam search) it yields the best
    sequence's text, as generate's first; it yielded a list (generate --model DIR TEXT failed with a TypeError)."""
    _, generator = imported_generator(tmp_path, "llama", num_beams=3, num_return_sequences=2, max_new_tokens=5)
    assert list(generator.stream("w5 w6")) == [generator.generate("w5 w6")[0]]


def test_a_bad_checkpoint_setting_is_one_error_naming_generation_json(tmp_path):
    """A generation.json setting the options refuse names the file (the user never typed it); an option given in
    its place runs."""
    import json

    from refformer.refimpl.errors import RefformerError
    from refformer.refimpl.generate import GenerationOptions

    _, generator = imported_generator(tmp_path, "t5")
    path = tmp_path / "m" / "generation.json"
    data = json.loads(path.read_text())
    data["settings"]["num_beams"] = "3"
    path.write_text(json.dumps(data))
    generator = Generator(tmp_path / "m", provider="cpu")
    with pytest.raises(RefformerError, match=r"generation\.json, the checkpoint's generation settings: num_beams"):
        generator.check_options(None)
    assert generator.check_options(GenerationOptions(num_beams=2)).num_beams == 2


@pytest.mark.parametrize("family", ["bart", "gpt2"])
def test_beams_under_forced_tokens_fill_as_transformers_fills_them(tmp_path, family):
    """A forced bos then the budget (or a forced eos) leave beam 0 one candidate a step: transformers' other beams
    start at -1e9, not -inf, so their copies fill the beams and the hypotheses (num_return_sequences of 3 gave one
    sequence and two empty ones)."""
    model, generator = imported_generator(tmp_path, family)
    rows = [[5, 6, 7, 8], [9, 10, 11, 12]]
    options = dict(num_beams=3, num_return_sequences=3, forced_bos_token_id=9, max_new_tokens=2)
    given = generator.check_options(GenerationOptions(**options))
    ours = [sequence for row in generator.search_rows(rows, given) for sequence in row]
    assert ours == transformers_ids(model, generator, rows, **options)
