"""Evaluation of a model on examples: loss and perplexity, and for encoder-decoder models greedy BLEU/chrF."""

import math

import numpy as np

from ..config import Config
from ..errors import RefformerError, check, is_integer
from ..generate import greedy, strip
from ..loss import cross_entropy_forward
from ..model import model_forward
from .batching import collate, make_batches


def evaluate(cfg, params, examples, *, max_tokens=4096, decode=None, references=None, max_sentences=None,
             max_translations=None):
    """Loss and perplexity on examples ((src_ids, tgt_ids, labels) triples from refimpl.training.batching), and for
    an encoder-decoder model greedy BLEU/chrF.

    decode(ids) -> text turns ids into text for BLEU/chrF (skipped without it); references are
    the reference texts aligned with examples (default: decode of each example's labels).
    max_sentences limits everything to the first N examples, max_translations only the decoded
    ones. Returns a dict: loss, ppl, tokens, sentences, bleu, chrf (None when skipped), notes.
    Raises RefformerError for a cfg that is not a Config, a count that is not an integer >= 0 (max_sentences,
    max_translations; max_tokens >= 1), a decode that is not callable, and malformed examples or references.
    """
    check(decode is None or callable(decode), f"decode must be a function ids -> text, got {type(decode).__name__}")
    check(isinstance(cfg, Config), f"cfg must be a Config, got {type(cfg).__name__}")
    for name, value in (("max_sentences", max_sentences), ("max_translations", max_translations)):
        check(value is None or (is_integer(value) and value >= 0), f"{name} must be an integer >= 0 or None, "
                                                                   f"got {value!r}")
    check(is_integer(max_tokens) and max_tokens >= 1, f"max_tokens must be a positive integer, got {max_tokens!r}")
    check(references is None or (isinstance(references, (list, tuple))
                                 and all(isinstance(text, str) for text in references)),
          "references must be a list of texts, one per example")
    try:
        examples = list(examples)[:max_sentences]
    except TypeError:
        raise RefformerError(f"examples must be a list of (src_ids, tgt_ids, labels) triples, "
                             f"got {type(examples).__name__}") from None
    result = {"loss": None, "ppl": None, "bleu": None, "chrf": None, "tokens": 0, "sentences": len(examples),
              "notes": []}
    if not examples:
        result["notes"].append("no evaluation examples")
        return result
    with np.errstate(all="ignore"):  # extreme weights give an inf/NaN loss in the result, not NumPy warnings
        return _evaluate(cfg, params, examples, result, max_tokens, decode, references, max_translations)


def _evaluate(cfg, params, examples, result, max_tokens, decode, references, max_translations):
    total, n_tokens = 0.0, 0
    for batch in make_batches(examples, max_tokens=max_tokens, pad_id=cfg.pad_id, shuffle_ties=False):
        logits, _ = model_forward(cfg, params, batch.src_ids, batch.tgt_ids, src_mask=batch.src_mask,
                                  tgt_mask=batch.tgt_mask)
        loss, _ = cross_entropy_forward(logits, batch.labels, ignore_id=cfg.pad_id)
        total += float(loss) * batch.n_tokens
        n_tokens += batch.n_tokens
    result["loss"] = total / max(n_tokens, 1)
    result["ppl"] = math.exp(min(result["loss"], 700.0)) if not math.isnan(result["loss"]) else math.nan
    result["tokens"] = n_tokens
    n = len(examples) if max_translations is None else min(max_translations, len(examples))
    if cfg.is_encoder_decoder and n > 0:  # max_translations=0: loss only
        refs = None if references is None else list(references)[:n]
        scores, note = translation_scores(cfg, params, examples[:n], decode, refs, max_tokens)
        result.update(scores)
        if note:
            result["notes"].append(note)
    return result


def translation_scores(cfg, params, examples, decode, references, max_tokens):
    """Greedy-decode the sources and score them with sacrebleu -> ({"bleu", "chrf"}, note or None).

    Raises RefformerError when references are given but fewer than the examples."""
    check(references is None or len(references) >= len(examples),
          f"references must have one text per example: {len(examples)} examples, "
          f"{len(references) if references is not None else 0} references")
    if decode is None:
        return {}, "BLEU/chrF skipped: no tokenizer to turn ids into text"
    try:
        import sacrebleu
    except ImportError:
        return {}, "BLEU/chrF skipped: sacrebleu is not installed (pip install 'refformer[train]')"
    hypotheses = translate_examples(cfg, params, examples, decode, max_tokens)
    if references is None:
        references = [decode(labels[:-1]) for _, _, labels in examples]
    references = list(references)[:len(examples)]
    bleu = sacrebleu.corpus_bleu(hypotheses, [references]).score
    chrf = sacrebleu.corpus_chrf(hypotheses, [references]).score
    return {"bleu": bleu, "chrf": chrf}, None


def translate_examples(cfg, params, examples, decode, max_tokens=4096, stepper=None):
    """Greedy translations (texts) of the examples' sources, in the examples' order, batched by length. stepper:
    the model behind the search (greedy's; `refformer eval --dtype` passes the runtime's ONNX Runtime stepper).

    Raises RefformerError for a decode that is not callable and for decoder-only examples."""
    check(callable(decode), f"decode must be a function ids -> text, got {type(decode).__name__}")
    check(all(isinstance(e, (tuple, list)) and len(e) == 3 and e[0] is not None for e in examples),
          "translate_examples needs (src_ids, tgt_ids, labels) examples of an encoder-decoder model")
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    hypotheses = [None] * len(examples)
    start = 0
    while start < len(order):
        longest = len(examples[order[min(start + 63, len(order) - 1)]][0])
        rows = max(1, min(64, max_tokens // (3 * longest)))  # source + roughly twice as many generated
        chunk = order[start:start + rows]
        batch = collate([(examples[i][0], [cfg.bos_id], [cfg.eos_id]) for i in chunk], pad_id=cfg.pad_id)
        for i, ids in zip(chunk, strip(greedy(cfg, params, batch.src_ids, batch.src_mask, stepper=stepper), cfg)):
            hypotheses[i] = decode(ids)
        start += len(chunk)
    return hypotheses
