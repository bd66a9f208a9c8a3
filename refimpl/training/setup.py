"""A training or evaluation run set up from a data folder: the options, the config, the examples of each split and
the checks made before any work. `refformer train` and `refformer eval` (runtime/train_cli.py) call these and only
print; messages name the command's flags (--lr, --d-model), as the library's callers are its users.

A data folder holds train/valid/test splits: SPLIT.tsv (source<TAB>target) for an encoder-decoder model, SPLIT.txt
(one text per line) for a decoder-only one (training/data.py).
"""

import dataclasses
import math
import time
from pathlib import Path

import numpy as np

from ..config import Config
from ..errors import RefformerError
from ..io import check_tokenizer, load, load_tokenizer
from ..model import init_params
from ..tree import flatten
from . import tokenizer as text
from .batching import lm_examples, make_batches, seq2seq_examples
from .checks import check_fits, check_output_dir
from .data import SUFFIX, detect_family, not_a_file, read_lines, read_tsv, split_path
from .evaluate import evaluate
from .options import TrainOptions

ARCHITECTURE_OPTIONS = ("family", "d_model", "n_heads", "d_ff", "layers", "encoder_layers", "decoder_layers",
                        "norm_first", "activation", "positional", "max_positions")


def flag(name):
    """The command-line flag of an option name: "max_tokens" -> "--max-tokens".

    Raises nothing.
    """
    return "--" + name.replace("_", "-")


# The command-line flag of each TrainOptions field, so the library's "lr must be ..." reads "--lr must be ...".
OPTION_FLAGS = {name: flag(name) for name in ("steps", "max_tokens", "lr", "warmup", "weight_decay", "clip",
                                              "label_smoothing", "eval_every", "eval_sentences", "save_every", "seed")}


def train_options_from_flags(values):
    """TrainOptions from the train command's values: the fields of OPTION_FLAGS and time_limit (in minutes, or
    None). Raises RefformerError naming the flag of a bad value (--lr, not lr)."""
    minutes = values["time_limit"]
    if minutes is not None and not (math.isfinite(minutes * 60.0) and minutes > 0):
        raise RefformerError(f"--time-limit must be a positive number of minutes, got {minutes}")
    fields = {name: values[name] for name in OPTION_FLAGS}
    try:
        return TrainOptions(**fields, time_limit=None if minutes is None else minutes * 60.0)
    except RefformerError as error:
        message = str(error)
        field = message.split(" ", 1)[0]
        if field in OPTION_FLAGS:
            message = OPTION_FLAGS[field] + message[len(field):]
        raise RefformerError(message) from None


def check_finite_weights(model_dir, params):
    """Refuse a diverged model: RefformerError unless every weight of params (loaded from model_dir) is finite."""
    bad = [name for name, value in flatten(params).items() if not np.isfinite(value).all()]
    if bad:
        raise RefformerError(f"{Path(model_dir) / 'model.safetensors'} holds weights that are not finite (NaN or "
                             f"inf) in {bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
                             + ": the model diverged; train it again")


def check_architecture(architecture):
    """Refuse architecture values out of range before anything is built: architecture maps d_model, n_heads, d_ff,
    max_positions (integers >= 1), layers, encoder_layers, decoder_layers (integers >= 0 or None) and dropout (in
    [0, 1)). Raises RefformerError naming the flag."""
    for name in ("d_model", "n_heads", "d_ff", "max_positions"):
        if architecture[name] < 1:
            raise RefformerError(f"{flag(name)} must be a positive integer, got {architecture[name]}")
    for name in ("layers", "encoder_layers", "decoder_layers"):
        if architecture[name] is not None and architecture[name] < 0:
            raise RefformerError(f"{flag(name)} must be an integer >= 0, got {architecture[name]}")
    if not (math.isfinite(architecture["dropout"]) and 0.0 <= architecture["dropout"] < 1.0):
        raise RefformerError(f"--dropout must be a number in [0, 1), got {architecture['dropout']}")
    if architecture["d_model"] % architecture["n_heads"]:
        raise RefformerError(f"--n-heads {architecture['n_heads']} must divide --d-model {architecture['d_model']}")


def load_examples(data_dir, split, family, tokenizer, cfg, max_sentences=None):
    """Training triples of one split -> (examples, reference texts or None, number dropped as too long).

    examples are (src_ids, tgt_ids, labels) lists of token ids (training/batching.py); the references (NFC texts of
    the targets) are given for encoder-decoder splits. Raises RefformerError for a split file that is missing,
    empty, malformed (naming file:line) or whose every example is longer than cfg.max_positions, and for a model
    without pad_id, bos_id or eos_id (null in config.json: examples start with bos, end with eos, pad with pad).
    """
    missing = [name for name in ("pad_id", "bos_id", "eos_id") if getattr(cfg, name) is None]
    if missing:
        raise RefformerError(f"training and evaluation need {', '.join(missing)}, which this model does not have "
                             f"(null in its config.json): its examples are bos + tokens + eos, padded with pad")
    path = split_path(data_dir, split, family)
    if family == "encoder-decoder":
        pairs = read_tsv(path)[:max_sentences]
        # A side with more characters than `limit` has more tokens than max_positions whatever the tokenizer does:
        # such pairs are skipped unencoded (one 50 MB line took 70 s and 9 GB to encode, to be skipped anyway).
        limit = text.most_characters(tokenizer, cfg.max_positions)
        short = [i for i, (source, target) in enumerate(pairs) if max(len(source), len(target)) <= limit]
        sources = dict(zip(short, text.encode(tokenizer, [pairs[i][0] for i in short])))
        targets = dict(zip(short, text.encode(tokenizer, [pairs[i][1] for i in short])))
        kept = [i for i in short if max(len(sources[i]), len(targets[i])) + 1 <= cfg.max_positions]
        if not kept:
            raise RefformerError(f"all {len(pairs)} pairs of {path} are longer than the model's {cfg.max_positions} "
                                 f"positions: use shorter pairs, or a model trained with a larger --max-positions")
        examples, _ = seq2seq_examples([(sources[i], targets[i]) for i in kept], bos_id=cfg.bos_id,
                                       eos_id=cfg.eos_id, max_len=cfg.max_positions)
        return examples, [text.normalize(pairs[i][1]) for i in kept], len(pairs) - len(kept)
    texts = text.encode(tokenizer, read_lines(path)[:max_sentences])
    return lm_examples(texts, bos_id=cfg.bos_id, eos_id=cfg.eos_id, max_len=cfg.max_positions), None, 0


def text_decoder(tokenizer):
    """ids -> text with tokenizer (special tokens skipped): what evaluate and train take as decode.

    The returned function raises RefformerError (tokenizer.decode) for an id outside the vocabulary.
    """
    return lambda ids: text.decode(tokenizer, ids)


@dataclasses.dataclass
class TrainingSetup:
    """What prepare_training returns: everything training/loop.train takes, and the counts the command prints.

    params is None for a resumed run (the checkpoint holds them); n_examples counts the training examples in the
    batches; valid is [] and references None without a valid split; dropped counts training pairs skipped as longer
    than cfg.max_positions; n_params is None on resume.

    A plain dataclass: no checks (prepare_training checks what it holds).
    """

    cfg: Config
    params: dict | None
    tokenizer: object
    n_examples: int
    batches: list
    valid: list
    references: list | None
    dropped: int
    n_params: int | None


def prepare_training(data_dir, tokenizer_path, out_dir, options, architecture, *, init_dir=None, given=(),
                     resume=False, overwrite=False):
    """Check a training request and load what it trains on -> TrainingSetup.

    options: TrainOptions (train_options_from_flags). architecture: the values of ARCHITECTURE_OPTIONS and
    "dropout" (check_architecture). init_dir: a model folder to start from (its config and weights; dropout
    changes only when "dropout" is in given, the names the user gave). given: option names given explicitly,
    for refusing architecture options with --init. A new model's parameters are drawn with options.seed; a resumed
    run gets params None. Raises RefformerError for bad values, an out_dir that check_output_dir refuses, a
    tokenizer that does not fit --init's model, a missing or unreadable split, and a model or batch that cannot
    fit in memory (checked before anything of the model's size is allocated).
    """
    check_architecture(architecture)
    check_output_dir(out_dir, resume=resume, overwrite=overwrite, inputs=(data_dir, tokenizer_path))
    tokenizer = text.load_tokenizer(tokenizer_path)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    if init_dir is not None:
        fixed = sorted(set(given) & set(ARCHITECTURE_OPTIONS))
        if fixed:
            raise RefformerError(f"--init takes the architecture from {init_dir}; drop "
                                 f"{', '.join(flag(name) for name in fixed)}")
        cfg, params = load(init_dir)
        check_finite_weights(init_dir, params)
        if "dropout" in given:
            cfg = cfg.replace(dropout=architecture["dropout"])
        if cfg.vocab_size != vocab_size:
            raise RefformerError(f"{tokenizer_path} has {vocab_size} tokens but {init_dir} was trained "
                                 f"with {cfg.vocab_size}: use that model's tokenizer.json")
        check_tokenizer(cfg, tokenizer.to_str(), tokenizer_path)  # and its special ids, before any training
        if architecture["family"] is not None and architecture["family"] != cfg.family:
            raise RefformerError(f"{init_dir} is {cfg.family}, not {architecture['family']}")
    else:
        cfg = new_config(architecture, architecture["family"] or detect_family(data_dir), vocab_size,
                         text.special_ids(tokenizer))
        check_fits(cfg)  # before anything of the model's size is allocated
        params = None if resume else init_params(cfg, np.random.default_rng(options.seed))
    train_path = split_path(data_dir, "train", cfg.family)
    if not_a_file(train_path):
        raise RefformerError(f"{train_path} {not_a_file(train_path)}: {cfg.family} models "
                             f"train on train{SUFFIX[cfg.family]}, a regular file")
    examples, _, dropped = load_examples(data_dir, "train", cfg.family, tokenizer, cfg)
    batches = make_batches(examples, max_tokens=options.max_tokens, pad_id=cfg.pad_id, seed=options.seed)
    check_fits(cfg, batches)
    valid, references = [], None
    valid_path = split_path(data_dir, "valid", cfg.family)
    reason = not_a_file(valid_path)
    if reason not in (None, "is missing"):  # given but unreadable: not silently trained without evaluation
        raise RefformerError(f"{valid_path} {reason}: make it a regular file, or remove it to train without "
                             "evaluation")
    if reason is None:
        valid, references, _ = load_examples(data_dir, "valid", cfg.family, tokenizer, cfg)
    n_params = sum(value.size for value in flatten(params).values()) if params is not None else None
    return TrainingSetup(cfg, params, tokenizer, len(examples), batches, valid, references, dropped, n_params)


def new_config(architecture, family, vocab_size, special_ids):
    """The Config of a new model from the architecture values (check_architecture), its family, the tokenizer's
    vocabulary size and special ids. Raises RefformerError for an encoder-decoder model without decoder layers
    (nothing would read the source), and whatever Config refuses."""
    layers = architecture["layers"]
    encoder_layers = architecture["encoder_layers"] if architecture["encoder_layers"] is not None else layers
    decoder_layers = architecture["decoder_layers"] if architecture["decoder_layers"] is not None else layers
    if family == "encoder-decoder" and decoder_layers == 0:  # no layer would read the source: it is ignored
        raise RefformerError(f"{'--decoder-layers' if architecture['decoder_layers'] is not None else '--layers'} 0 "
                             "leaves an encoder-decoder model no decoder layer to read the source (its "
                             "translations would ignore it): give at least 1")
    return Config(vocab_size=vocab_size, d_model=architecture["d_model"], n_heads=architecture["n_heads"],
                  d_ff=architecture["d_ff"], n_encoder_layers=encoder_layers if family == "encoder-decoder" else 0,
                  n_decoder_layers=decoder_layers, family=family, norm_first=architecture["norm_first"],
                  activation=architecture["activation"], positional=architecture["positional"],
                  max_positions=architecture["max_positions"], dropout=architecture["dropout"], **special_ids)


# ---------------------------------------------------------------------------- evaluation of a model folder


def check_evaluation(data_dir, model_dir, split, max_sentences, max_tokens):
    """Refuse an evaluation request before any model is read: max_sentences (None or >= 1) and max_tokens (>= 1),
    a data_dir that is not a folder or is a model folder, and a model_dir (None: the bundled model) that is a
    training run's checkpoint or checkpoints folder. Raises RefformerError naming the flag."""
    if max_sentences is not None and max_sentences < 1:
        raise RefformerError(f"--max-sentences must be a positive integer, got {max_sentences}")
    if max_tokens < 1:
        raise RefformerError(f"--max-tokens must be a positive integer, got {max_tokens}")
    if not Path(data_dir).is_dir():
        raise RefformerError(f"DATA_DIR {data_dir} is not a folder: give the folder that holds the {split} split")
    if (Path(data_dir) / "config.json").is_file() and not any(Path(data_dir).glob(f"{split}.*")):
        raise RefformerError(f"{data_dir} is a model folder, not a data folder: refformer eval DATA_DIR --model "
                             f"{data_dir}")
    for marker, run in (("trainer_state.json", 2), ("latest.json", 1)):  # a checkpoint, or the checkpoints folder
        if model_dir is not None and (Path(model_dir) / marker).is_file():
            out = Path(model_dir).absolute().parents[run - 1]
            raise RefformerError(f"--model {model_dir} is a training run's checkpoint{'s' if run == 1 else ''}, not a "
                                 f"model folder: evaluate the model the run wrote, --model {out}")


def evaluate_split(data_dir, model_dir, split, *, max_sentences=None, max_tokens=4096):
    """Evaluate the model folder model_dir on data_dir's split ("valid" or "test") -> (cfg, result).

    result: split, examples, skipped_too_long, tokens (target tokens scored), loss (mean cross-entropy, nats per
    token), perplexity, bleu and chrf (0-100; None for decoder-only models), seconds (wall time of the
    evaluation) and notes (a list of lines). Raises RefformerError for a missing or diverged model, a missing or
    unreadable split, a batch that cannot fit in memory, and running out of memory."""
    cfg, params = load(model_dir)
    check_finite_weights(model_dir, params)
    tokenizer = load_tokenizer(model_dir)
    path = split_path(data_dir, split, cfg.family)
    if not_a_file(path):
        raise RefformerError(f"{path} {not_a_file(path)}: {cfg.family} models are evaluated on "
                             f"{split}{SUFFIX[cfg.family]}, a regular file")
    examples, references, dropped = load_examples(data_dir, split, cfg.family, tokenizer, cfg, max_sentences)
    check_fits(cfg, make_batches(examples, max_tokens=max_tokens, pad_id=cfg.pad_id, shuffle_ties=False),
               training=False)
    start = time.perf_counter()
    try:
        result = evaluate(cfg, params, examples, max_tokens=max_tokens, decode=text_decoder(tokenizer),
                          references=references)
    except MemoryError:
        raise RefformerError("out of memory while evaluating: lower --max-tokens") from None
    if result["loss"] is not None and not math.isfinite(result["loss"]):
        result["notes"].append(f"the loss is {result['loss']}: the model's outputs overflow (its weights are too "
                               f"large); retrain it")
    return cfg, {"split": split, "examples": len(examples), "skipped_too_long": dropped, "tokens": result["tokens"],
                 "loss": result["loss"], "perplexity": result["ppl"], "bleu": result["bleu"], "chrf": result["chrf"],
                 "seconds": round(time.perf_counter() - start, 2), "notes": result["notes"]}
