"""Hostile checks of imported checkpoints' generation against transformers' generate (issue 14)."""

import pytest

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
