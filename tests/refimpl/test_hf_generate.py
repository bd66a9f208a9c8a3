"""refimpl.generate against transformers' generate (issue 14): on tiny random models of every family read by from_hf,
the NumPy search (ReferenceStepper, float64) returns the token ids of transformers' model.generate, token for token:
greedy search; beam search with length_penalty, early_stopping and num_return_sequences (and its scores, which are
transformers' sequences_scores); repetition_penalty, no_repeat_ngram_size, min_new_tokens and bad_words_ids, greedy
and under beam search; forced_bos_token_id and forced_eos_token_id. Encoder-decoders start their decoder with the
checkpoint's decoder_start_token_id, and BART's and Marian's forced_eos_token_id applies as in transformers.

Each model's eos row of the LM head is scaled by EOS_BOOST (3, but for GPT-2) before it is saved, so that eos is
likely enough for hypotheses to end early, which is where beam search's length penalty, early stopping and
bookkeeping show.
transformers computes the search in float32 (its logits are cast), refformer in float64: the ids are equal, the
scores within SCORE_BOUND.
"""

import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from refformer.refimpl.convert.hf import from_hf  # noqa: E402
from refformer.refimpl.generate import GenerationOptions, ReferenceStepper, beam_search, generate  # noqa: E402
from tests import hf_models  # noqa: E402

FAMILIES = ["gpt2", "t5", "bart", "marian", "llama", "qwen2"]
EOS_BOOST = {"gpt2": 1.0}  # default 3.0; the tiny GPT-2 says eos at once when its row is scaled by 1.2
MAX_NEW_TOKENS = 8
SCORE_BOUND = 1e-5  # relative: transformers' float32 scores against refformer's float64

OPTIONS = [
    dict(),
    dict(num_beams=4, num_return_sequences=3, length_penalty=0.6),
    dict(num_beams=3, early_stopping=True, length_penalty=2.0),
    dict(repetition_penalty=1.8),
    dict(num_beams=3, repetition_penalty=1.8),
    dict(no_repeat_ngram_size=2),
    dict(num_beams=3, no_repeat_ngram_size=2),
    dict(min_new_tokens=6),
    dict(num_beams=3, min_new_tokens=6),
    dict(bad_words_ids="greedy"),  # banned: words of greedy search's output (words_of)
    dict(num_beams=2, forced_bos_token_id=4, forced_eos_token_id=3),
    dict(max_length=None),  # no options at all: transformers' default (20 new tokens) and the checkpoint's settings
    dict(max_length=11, num_beams=2),  # the decoder's input and the new tokens
]
DEFAULT_NEW_TOKENS = 20  # transformers' generate without max_length or max_new_tokens (_prepare_generated_length)
CHANGED = {}  # option id -> the families whose ids it changed (test_every_option_changes_some_ids reads it)

CHECKPOINT_SETTINGS = ("decoder_start_token_id", "forced_bos_token_id", "forced_eos_token_id", "bad_words_ids")


def option_id(options):
    return ",".join(f"{k}={v}" for k, v in options.items()).replace(" ", "") or "greedy"


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """family -> (transformers model, cfg, params): built once, eos boosted, saved, read by from_hf."""
    models = {}
    for family in FAMILIES:
        model = hf_models.build(family)
        with torch.no_grad():
            model.get_output_embeddings().weight[model.generation_config.eos_token_id] *= EOS_BOOST.get(family, 3.0)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        cfg, params = from_hf(folder)
        models[family] = model, cfg, params
    return models


def checkpoint_options(model, cfg):
    """The checkpoint's generation settings as GenerationOptions fields (what transformers' generate applies)."""
    settings = {name: getattr(model.generation_config, name, None) for name in CHECKPOINT_SETTINGS}
    if not cfg.is_encoder_decoder:
        settings.pop("decoder_start_token_id")
    return {name: value for name, value in settings.items() if value is not None}


def inputs(cfg):
    """Two unpadded rows of five tokens: the sources of an encoder-decoder, the prompts of a decoder-only model."""
    ids = np.random.default_rng(0).integers(3, 90, size=(2, 5))
    return {"src_ids": ids} if cfg.is_encoder_decoder else {"prompt_ids": ids}


def transformers_generate(model, cfg, ids, options):
    """transformers' generate -> (per returned sequence its generated ids up to and including eos, and for beam search
    their sequences_scores, else None)."""
    tensor = torch.tensor(ids)
    beams = options.get("num_beams", 1) > 1
    lengths = {"max_new_tokens": MAX_NEW_TOKENS} if "max_length" not in options else (
        {} if options["max_length"] is None else {"max_length": options["max_length"]})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(tensor, attention_mask=torch.ones_like(tensor), return_dict_in_generate=True,
                             output_scores=beams, **lengths, **{k: v for k, v in options.items() if k != "max_length"})
    start = 1 if cfg.is_encoder_decoder else ids.shape[1]  # the decoder start token, or the prompt
    rows = [row[:row.index(cfg.eos_id) + 1] if cfg.eos_id in row else row for row in out.sequences[:, start:].tolist()]
    return rows, (out.sequences_scores.tolist() if beams else None)


def refformer_search(model, cfg, params, data, **options):
    """refimpl's search with the checkpoint's settings and options -> (flat list of sequences, beam scores or None)."""
    lengths = {"max_new_tokens": MAX_NEW_TOKENS} if "max_length" not in options else (
        {"max_new_tokens": DEFAULT_NEW_TOKENS} if options["max_length"] is None else {})
    options = GenerationOptions(**{**checkpoint_options(model, cfg), **options, **lengths})
    if options.num_beams == 1:
        return [sequence for row in generate(cfg, params, **data, options=options) for sequence in row], None
    sequences, scores = beam_search(ReferenceStepper(cfg, params), cfg, options, **data)
    return [s for row in sequences for s in row], [s for row in scores for s in row]


def words_of(sequences, eos_id):
    """Bad words that change greedy search's output: its last sequence's first token alone, and the first sequence's
    last two tokens before eos as a pair (eos is never banned)."""
    first, last = [[t for t in s if t != eos_id] for s in (sequences[0], sequences[-1])]
    return [first[-2:], last[:1]]


@pytest.mark.parametrize("options", OPTIONS, ids=option_id)
@pytest.mark.parametrize("family", FAMILIES)
def test_ids_equal_transformers_generate(family, options, imported):
    """The ids equal transformers' generate; beam scores its sequences_scores within SCORE_BOUND."""
    model, cfg, params = imported[family]
    data = inputs(cfg)
    greedy, _ = refformer_search(model, cfg, params, data)
    if options.get("bad_words_ids") == "greedy":
        options = {**options, "bad_words_ids": words_of(greedy, cfg.eos_id)}
    theirs, their_scores = transformers_generate(model, cfg, next(iter(data.values())), options)
    ours, scores = refformer_search(model, cfg, params, data, **options)
    assert ours == theirs
    if scores is not None:
        error = np.abs(np.array(scores) - their_scores).max() / np.abs(their_scores).max()
        print(f"{family} {option_id(options)}: beam scores rel. error {error:.1e}")
        assert error <= SCORE_BOUND
    plain = greedy if set(options) <= {"num_beams", "num_return_sequences", "length_penalty", "early_stopping"} \
        else refformer_search(model, cfg, params, data, num_beams=options.get("num_beams", 1))[0]
    if options:
        CHANGED.setdefault(option_id(options), set())
    if options and ours[:len(plain)] != plain[:len(ours)]:
        CHANGED[option_id(options)].add(family)
    CHANGED.setdefault("eos", set()).update(family for s in ours if cfg.eos_id in s)
    CHANGED.setdefault("no eos", set()).update(family for s in ours if cfg.eos_id not in s)


def test_every_option_changes_some_ids():
    """The comparisons above are not vacuous: eos ends some sequences and not others, and each option changes the
    ids of at least one family (beam options against greedy search, the others against plain search of their
    width)."""
    if len(CHANGED) < len(OPTIONS) + 1:
        pytest.skip("runs after every test_ids_equal_transformers_generate case")
    assert all(CHANGED.values()), CHANGED
