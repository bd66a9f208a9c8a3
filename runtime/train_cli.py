"""`refformer train` and `refformer eval`: the NumPy training loop (refimpl.training.train) on a data directory.

A data directory holds train/valid/test splits: *.tsv (source<TAB>target) for an
encoder-decoder model, *.txt (one text per line) for a decoder-only one.
runtime/cli.py registers both commands.
"""

import json
import math
import time
from pathlib import Path

import click

from refformer.refimpl.config import ACTIVATIONS, FAMILIES, POSITIONALS
from refformer.refimpl.training.data import SUFFIX, detect_family, not_a_file, read_lines, read_tsv, split_path
from refformer.runtime.errors import one_line_errors
from refformer.runtime.options import NonEmptyPath, model_option, resolve_model

ARCHITECTURE_OPTIONS = ("family", "d_model", "n_heads", "d_ff", "layers", "encoder_layers", "decoder_layers",
                        "norm_first", "activation", "positional", "max_positions")


def _flag(name):
    return "--" + name.replace("_", "-")


# The command-line flag of each TrainOptions field, so the library's "lr must be ..." reads "--lr must be ...".
OPTION_FLAGS = {name: _flag(name) for name in ("steps", "max_tokens", "lr", "warmup", "weight_decay", "clip",
                                               "label_smoothing", "eval_every", "eval_sentences", "save_every", "seed")}


def train_options(opts):
    """TrainOptions from the command's options; RefformerError naming the flag of a bad value."""
    from refformer.refimpl.errors import RefformerError
    from refformer.refimpl.training.train import TrainOptions

    minutes = opts["time_limit"]
    if minutes is not None and not (math.isfinite(minutes * 60.0) and minutes > 0):
        raise RefformerError(f"--time-limit must be a positive number of minutes, got {minutes}")
    values = {name: opts[name] for name in OPTION_FLAGS}
    try:
        return TrainOptions(**values, time_limit=None if minutes is None else minutes * 60.0)
    except RefformerError as error:
        message = str(error)
        field = message.split(" ", 1)[0]
        if field in OPTION_FLAGS:
            message = OPTION_FLAGS[field] + message[len(field):]
        raise RefformerError(message) from None


def check_finite_weights(model_dir, params):
    """RefformerError unless every weight of the model in model_dir is finite (a diverged model is refused)."""
    import numpy as np

    from refformer.refimpl.errors import RefformerError
    from refformer.refimpl.tree import flatten

    bad = [name for name, value in flatten(params).items() if not np.isfinite(value).all()]
    if bad:
        raise RefformerError(f"{Path(model_dir) / 'model.safetensors'} holds weights that are not finite (NaN or "
                             f"inf) in {bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
                             + ": the model diverged; train it again")


def check_architecture(opts):
    """Refuse architecture options out of range (RefformerError naming the flag), before anything is built."""
    from refformer.refimpl.errors import RefformerError

    for name in ("d_model", "n_heads", "d_ff", "max_positions"):
        if opts[name] < 1:
            raise RefformerError(f"{_flag(name)} must be a positive integer, got {opts[name]}")
    for name in ("layers", "encoder_layers", "decoder_layers"):
        if opts[name] is not None and opts[name] < 0:
            raise RefformerError(f"{_flag(name)} must be an integer >= 0, got {opts[name]}")
    if not (math.isfinite(opts["dropout"]) and 0.0 <= opts["dropout"] < 1.0):
        raise RefformerError(f"--dropout must be a number in [0, 1), got {opts['dropout']}")
    if opts["d_model"] % opts["n_heads"]:
        raise RefformerError(f"--n-heads {opts['n_heads']} must divide --d-model {opts['d_model']}")


# ---------------------------------------------------------------------------- data


def load_examples(data_dir, split, family, tokenizer, cfg, max_sentences=None):
    """Training triples of one split -> (examples, reference texts or None, number dropped as too long).

    Raises RefformerError for a split file that is missing, empty, malformed (naming file:line) or whose every
    example is longer than cfg.max_positions.
    """
    from refformer.refimpl.training.batching import lm_examples, seq2seq_examples
    from refformer.refimpl.errors import RefformerError
    from refformer.runtime.tokenizer import encode, normalize

    path = split_path(data_dir, split, family)
    if family == "encoder-decoder":
        pairs = read_tsv(path)[:max_sentences]
        # A side with more characters than `limit` has more tokens than max_positions whatever the tokenizer does
        # (NFC shrinks a text at most 3 times, a token is at most the longest vocabulary entry): such pairs are
        # skipped unencoded (one 50 MB line took 70 s and 9 GB to encode, to be skipped anyway).
        limit = 4 * cfg.max_positions * max([len(token) for token in tokenizer.get_vocab()] + [1])
        short = [i for i, (source, target) in enumerate(pairs) if max(len(source), len(target)) <= limit]
        sources = dict(zip(short, encode(tokenizer, [pairs[i][0] for i in short])))
        targets = dict(zip(short, encode(tokenizer, [pairs[i][1] for i in short])))
        kept = [i for i in short if max(len(sources[i]), len(targets[i])) + 1 <= cfg.max_positions]
        if not kept:
            raise RefformerError(f"all {len(pairs)} pairs of {path} are longer than the model's {cfg.max_positions} "
                                 f"positions: use shorter pairs, or a model trained with a larger --max-positions")
        examples, _ = seq2seq_examples([(sources[i], targets[i]) for i in kept], bos_id=cfg.bos_id,
                                       eos_id=cfg.eos_id, max_len=cfg.max_positions)
        return examples, [normalize(pairs[i][1]) for i in kept], len(pairs) - len(kept)
    texts = encode(tokenizer, read_lines(path)[:max_sentences])
    return lm_examples(texts, bos_id=cfg.bos_id, eos_id=cfg.eos_id, max_len=cfg.max_positions), None, 0


def _decoder(tokenizer):
    from refformer.runtime.tokenizer import decode

    return lambda ids: decode(tokenizer, ids)


# ---------------------------------------------------------------------------- refformer train


@click.command("train")
@click.argument("data_dir", type=NonEmptyPath(file_okay=False))
@click.option("--tokenizer", "tokenizer_path", required=True, type=NonEmptyPath(dir_okay=False),
              help="tokenizer.json (from 'refformer tokenizer train'); copied into the model directory.")
@click.option("--out", "out_dir", required=True, type=NonEmptyPath(file_okay=False),
              help="Model directory to write (checkpoints go to OUT/checkpoints).")
@click.option("--family", type=click.Choice(FAMILIES), default=None,
              help="Default: encoder-decoder if DATA_DIR has train.tsv, decoder-only if train.txt.")
@click.option("--d-model", type=int, default=256, show_default=True)
@click.option("--n-heads", type=int, default=4, show_default=True)
@click.option("--d-ff", type=int, default=1024, show_default=True)
@click.option("--layers", type=int, default=3, show_default=True, help="Layers of each stack.")
@click.option("--encoder-layers", type=int, default=None, help="Override --layers for the encoder.")
@click.option("--decoder-layers", type=int, default=None, help="Override --layers for the decoder.")
@click.option("--norm-first/--post-ln", default=False, show_default=True, help="Pre-LN or post-LN layers.")
@click.option("--activation", type=click.Choice(ACTIVATIONS), default="relu",
              show_default=True)
@click.option("--positional", type=click.Choice(POSITIONALS), default="sinusoidal", show_default=True)
@click.option("--max-positions", type=int, default=256, show_default=True,
              help="Longest sequence; longer training pairs are skipped, texts are cut into windows this long.")
@click.option("--steps", type=int, default=1000, show_default=True, help="Optimizer steps in all (resume included).")
@click.option("--max-tokens", type=int, default=4096, show_default=True, help="Padded tokens per batch.")
@click.option("--lr", type=float, default=7e-4, show_default=True, help="Peak learning rate.")
@click.option("--warmup", type=int, default=400, show_default=True, help="Warmup steps (then lr ~ 1/sqrt(step)).")
@click.option("--weight-decay", type=float, default=0.01, show_default=True, help="AdamW decay of matrices.")
@click.option("--clip", type=float, default=1.0, show_default=True, help="Global gradient-norm clip (0: off).")
@click.option("--label-smoothing", type=float, default=0.1, show_default=True)
@click.option("--dropout", type=float, default=0.1, show_default=True)
@click.option("--eval-every", type=int, default=500, show_default=True, help="Steps between evaluations (0: end only).")
@click.option("--eval-sentences", type=int, default=100, show_default=True,
              help="Validation sentences translated for BLEU/chrF (the loss uses the whole split).")
@click.option("--save-every", type=int, default=500, show_default=True, help="Steps between checkpoints (0: end only).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--resume", is_flag=True, help="Continue from OUT's checkpoint (same data, config and options).")
@click.option("--overwrite", is_flag=True,
              help="Train anew into an OUT that holds a model or checkpoints; they are replaced only as this run "
                   "saves its own, and never by a diverged model.")
@click.option("--init", "init_dir", type=NonEmptyPath(file_okay=False), default=None,
              help="Start from this model directory's weights and config (fine-tuning).")
@click.option("--time-limit", type=float, default=None,
              help="Stop cleanly (checkpoint and model) after this many minutes.")
@click.pass_context
@one_line_errors
def train(ctx, data_dir, tokenizer_path, out_dir, **opts):
    """Train a model on DATA_DIR with the NumPy reference implementation and write it to OUT.

    An OUT that already holds a model or checkpoints is refused unless --resume or --overwrite is given. A run
    whose loss turns NaN or infinite stops with an error and writes nothing from that state (exit 1).
    """
    import numpy as np

    from refformer.refimpl import Config, init_params, load
    from refformer.refimpl.training.batching import make_batches
    from refformer.refimpl.errors import RefformerError
    from refformer.refimpl.io import check_tokenizer
    from refformer.refimpl.training.train import check_fits, check_output_dir, train as train_loop
    from refformer.runtime.tokenizer import load_tokenizer, special_ids

    options = train_options(opts)
    check_architecture(opts)
    check_output_dir(out_dir, resume=opts["resume"], overwrite=opts["overwrite"], inputs=(data_dir, tokenizer_path))
    tokenizer = load_tokenizer(tokenizer_path)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    given = {name for name in opts if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}
    if opts["init_dir"] is not None:
        fixed = sorted(given & set(ARCHITECTURE_OPTIONS))
        if fixed:
            raise RefformerError(f"--init takes the architecture from {opts['init_dir']}; drop "
                                 f"{', '.join(_flag(name) for name in fixed)}")
        cfg, params = load(opts["init_dir"])
        check_finite_weights(opts["init_dir"], params)
        if "dropout" in given:
            cfg = cfg.replace(dropout=opts["dropout"])
        if cfg.vocab_size != vocab_size:
            raise RefformerError(f"{tokenizer_path} has {vocab_size} tokens but {opts['init_dir']} was trained "
                                 f"with {cfg.vocab_size}: use that model's tokenizer.json")
        check_tokenizer(cfg, tokenizer.to_str(), tokenizer_path)  # and its special ids, before any training
        if opts["family"] is not None and opts["family"] != cfg.family:
            raise RefformerError(f"{opts['init_dir']} is {cfg.family}, not {opts['family']}")
    else:
        family = opts["family"] or detect_family(data_dir)
        layers = opts["layers"]
        decoder_layers = opts["decoder_layers"] if opts["decoder_layers"] is not None else layers
        if family == "encoder-decoder" and decoder_layers == 0:  # no layer would read the source: it is ignored
            raise RefformerError(f"{'--decoder-layers' if opts['decoder_layers'] is not None else '--layers'} 0 "
                                 "leaves an encoder-decoder model no decoder layer to read the source (its "
                                 "translations would ignore it): give at least 1")
        cfg = Config(vocab_size=vocab_size, d_model=opts["d_model"], n_heads=opts["n_heads"], d_ff=opts["d_ff"],
                     n_encoder_layers=(opts["encoder_layers"] if opts["encoder_layers"] is not None else layers)
                     if family == "encoder-decoder" else 0,
                     n_decoder_layers=opts["decoder_layers"] if opts["decoder_layers"] is not None else layers,
                     family=family, norm_first=opts["norm_first"], activation=opts["activation"],
                     positional=opts["positional"], max_positions=opts["max_positions"], dropout=opts["dropout"],
                     **special_ids(tokenizer))
        check_fits(cfg)  # before anything of the model's size is allocated
        params = None if opts["resume"] else init_params(cfg, np.random.default_rng(opts["seed"]))
    if not_a_file(split_path(data_dir, "train", cfg.family)):
        raise RefformerError(f"{split_path(data_dir, 'train', cfg.family)} "
                             f"{not_a_file(split_path(data_dir, 'train', cfg.family))}: {cfg.family} models "
                             f"train on train{SUFFIX[cfg.family]}, a regular file")

    examples, _, dropped = load_examples(data_dir, "train", cfg.family, tokenizer, cfg)
    batches = make_batches(examples, max_tokens=options.max_tokens, pad_id=cfg.pad_id, seed=options.seed)
    check_fits(cfg, batches)
    valid, references = [], None
    reason = not_a_file(split_path(data_dir, "valid", cfg.family))
    if reason not in (None, "is missing"):  # given but unreadable: not silently trained without evaluation
        raise RefformerError(f"{split_path(data_dir, 'valid', cfg.family)} {reason}: make it a regular file, or "
                             "remove it to train without evaluation")
    if reason is None:
        valid, references, _ = load_examples(data_dir, "valid", cfg.family, tokenizer, cfg)
    n_params = sum(value.size for value in _leaves(params)) if params is not None else None
    click.echo(f"{cfg.family}: D={cfg.d_model} H={cfg.n_heads} F={cfg.d_ff} layers={cfg.n_encoder_layers}+"
               f"{cfg.n_decoder_layers} V={cfg.vocab_size}" + (f", {n_params:,} parameters" if n_params else ""))
    click.echo(f"data: {len(examples)} training examples in {len(batches)} batches"
               + (f" ({dropped} longer than {cfg.max_positions} tokens skipped)" if dropped else "")
               + f", {len(valid)} validation examples" + ("" if valid else " (no valid split: no evaluation)"))

    recent = []  # tokens/s of the last steps, for a steady figure on the bar

    def show(row):
        if row is None:
            return ""
        text = f"step {int(row['step'])}  loss {row['loss']:.3f}  {sum(recent) / len(recent):,.0f} tok/s"
        if row.get("valid_loss") is not None:
            text += f"  valid {row['valid_loss']:.3f}"
        return text

    with click.progressbar(length=options.steps, label="training", show_eta=True, show_pos=True,
                           item_show_func=show) as bar:
        done = [0]  # steps shown so far (a resumed run jumps to its checkpoint's step at once)

        def on_step(row):
            recent.append(row["tokens_per_s"])
            del recent[:-20]
            bar.update(row["step"] - done[0], current_item=row)
            done[0] = row["step"]

        try:
            result = train_loop(cfg, params, batches, valid, options, out_dir=out_dir, tokenizer=tokenizer,
                                decode=_decoder(tokenizer), references=references, resume=opts["resume"],
                                overwrite=opts["overwrite"], inputs=(data_dir, tokenizer_path), on_step=on_step)
        except MemoryError:
            raise RefformerError("out of memory while training: lower --max-tokens (or the model's size)") from None
        except KeyboardInterrupt:
            click.echo(f"notice: {_kept(out_dir)}", err=True)
            raise
    _summary(result, out_dir, opts["steps"])


def _kept(out_dir):
    """What an interrupted run leaves to continue from, in words."""
    try:
        step = json.loads((Path(out_dir) / "checkpoints" / "latest.json").read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return "no checkpoint was saved yet; run the command again to start over"
    return f"the checkpoint of step {step} is kept: continue with the same command and --resume"


def _leaves(tree):
    from refformer.refimpl.tree import flatten

    return flatten(tree).values()


def _summary(result, out_dir, steps=None):
    log = result.log
    if not log:
        click.echo(f"nothing to do: the checkpoint is already at step {result.step}")
        return
    if steps is not None and result.step > steps:  # --resume with fewer --steps than the checkpoint has
        click.echo(f"nothing trained: the checkpoint is already at step {result.step}, past --steps {steps}")
    steps_here = [row["tokens_per_s"] for row in log if row["tokens_per_s"]]
    last_eval = next((row for row in reversed(log) if row["valid_loss"] is not None), None)
    line = f"step {result.step}: train loss {log[-1]['loss']:.4f}"
    if last_eval is not None:
        line += f", valid loss {last_eval['valid_loss']:.4f}, perplexity {_number(last_eval['valid_ppl'], 2)}"
        if last_eval.get("bleu") is not None:
            line += f", BLEU {last_eval['bleu']:.2f}, chrF {last_eval['chrf']:.2f}"
    click.echo(line)
    median = sorted(steps_here)[len(steps_here) // 2] if steps_here else float("nan")
    click.echo(f"throughput: median {median:,.0f} target tokens/s; {log[-1]['elapsed']:.0f} s in all")
    if result.stopped != "steps":
        click.echo(f"stopped on the {result.stopped}; continue with the same command and --resume")
    for note in result.notes:
        click.echo(f"note: {note}")
    click.echo(f"wrote {out_dir}")


# ---------------------------------------------------------------------------- refformer eval


@click.command("eval")
@click.argument("data_dir", type=NonEmptyPath(file_okay=False))
@model_option
@click.option("--split", type=click.Choice(["valid", "test"]), default="valid", show_default=True)
@click.option("--max-sentences", type=int, default=None, help="Evaluate only the first N examples of the split.")
@click.option("--max-tokens", type=int, default=4096, show_default=True, help="Padded tokens per batch.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@one_line_errors
def evaluate(data_dir, model_dir, split, max_sentences, max_tokens, as_json):
    """Loss, perplexity and (translation) greedy BLEU/chrF of --model (default: the bundled model) on a split
    of DATA_DIR."""
    from refformer.refimpl import load, load_tokenizer
    from refformer.refimpl.training.batching import make_batches
    from refformer.refimpl.errors import RefformerError
    from refformer.refimpl.training.train import check_fits, evaluate as evaluate_model

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
    model_dir = resolve_model(model_dir)
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
        result = evaluate_model(cfg, params, examples, max_tokens=max_tokens, decode=_decoder(tokenizer),
                                references=references)
    except MemoryError:
        raise RefformerError("out of memory while evaluating: lower --max-tokens") from None
    if result["loss"] is not None and not math.isfinite(result["loss"]):
        result["notes"].append(f"the loss is {result['loss']}: the model's outputs overflow (its weights are too "
                               f"large); retrain it")
    result = {"split": split, "examples": len(examples), "skipped_too_long": dropped, "tokens": result["tokens"],
              "loss": result["loss"], "perplexity": result["ppl"], "bleu": result["bleu"], "chrf": result["chrf"],
              "seconds": round(time.perf_counter() - start, 2), "notes": result["notes"]}
    if as_json:  # strict JSON: a NaN or infinite loss (extreme weights) is null, not NaN/Infinity
        click.echo(json.dumps({key: None if isinstance(value, float) and not math.isfinite(value) else value
                               for key, value in result.items()}, indent=2, allow_nan=False))
        return
    rows = [("split", split), ("examples", f"{len(examples)}" + (f" ({dropped} too long, skipped)" if dropped else "")),
            ("tokens", f"{result['tokens']}"), ("loss", _number(result["loss"], 4)),
            ("perplexity", _number(result["perplexity"], 2))]
    if cfg.is_encoder_decoder:
        rows += [("BLEU", _number(result["bleu"], 2)), ("chrF", _number(result["chrf"], 2))]
    rows.append(("seconds", f"{result['seconds']:.1f}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")
    for note in result["notes"]:
        click.echo(f"note: {note}")


def _number(value, digits):
    """value with digits decimals; '-' for none; a huge one (the perplexity of a diverged model) as 1.23e+304."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if abs(value) < 1e9 else f"{value:.3g}"
