"""`refformer train` and `refformer eval`: parse the options, call refimpl/training/setup.py (the run's setup) and
refimpl/training/loop.py (the NumPy training loop), and print. runtime/cli.py registers both commands.

A data directory holds train/valid/test splits: *.tsv (source<TAB>target) for an encoder-decoder model, *.txt (one
text per line) for a decoder-only one.
"""

import json
import math

import click

from refformer.refimpl.config import ACTIVATIONS, FAMILIES
from refformer.runtime.errors import one_line_errors
from refformer.runtime.options import NonEmptyPath, dtype_option, model_option, resolve_model
from refformer.runtime.outputs import refuse_package_folder

# ---------------------------------------------------------------------------- refformer train


# the position encodings a model trained here can also be exported and generate with (config.POSITIONALS holds more:
# the reference computes them for imported models)
TRAINABLE_POSITIONALS = ("sinusoidal", "learned")


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
@click.option("--positional", type=click.Choice(TRAINABLE_POSITIONALS), default="sinusoidal", show_default=True)
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
    from refformer.refimpl.errors import RefformerError
    from refformer.refimpl.training.loop import train as train_loop
    from refformer.refimpl.training.setup import (
        ARCHITECTURE_OPTIONS,
        prepare_training,
        text_decoder,
        train_options_from_flags,
    )

    options = train_options_from_flags(opts)
    given = {name for name in opts if ctx.get_parameter_source(name) != click.core.ParameterSource.DEFAULT}
    refuse_package_folder(out_dir, "--out")
    setup = prepare_training(data_dir, tokenizer_path, out_dir, options,
                             {name: opts[name] for name in (*ARCHITECTURE_OPTIONS, "dropout")},
                             init_dir=opts["init_dir"], given=given, resume=opts["resume"],
                             overwrite=opts["overwrite"])
    cfg, n_params, dropped = setup.cfg, setup.n_params, setup.dropped
    click.echo(f"{cfg.family}: D={cfg.d_model} H={cfg.n_heads} F={cfg.d_ff} layers={cfg.n_encoder_layers}+"
               f"{cfg.n_decoder_layers} V={cfg.vocab_size}" + (f", {n_params:,} parameters" if n_params else ""))
    click.echo(f"data: {setup.n_examples} training examples in {len(setup.batches)} batches"
               + (f" ({dropped} longer than {cfg.max_positions} tokens skipped)" if dropped else "")
               + f", {len(setup.valid)} validation examples"
               + ("" if setup.valid else " (no valid split: no evaluation)"))

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
            result = train_loop(cfg, setup.params, setup.batches, setup.valid, options, out_dir=out_dir,
                                tokenizer=setup.tokenizer, decode=text_decoder(setup.tokenizer),
                                references=setup.references, resume=opts["resume"], overwrite=opts["overwrite"],
                                inputs=(data_dir, tokenizer_path), on_step=on_step)
        except MemoryError:
            raise RefformerError("out of memory while training: lower --max-tokens (or the model's size)") from None
        except KeyboardInterrupt:
            click.echo(f"notice: {_kept(out_dir)}", err=True)
            raise
    _summary(result, out_dir, opts["steps"])


def _kept(out_dir):
    """What an interrupted run leaves to continue from, in words."""
    from refformer.refimpl.training.checkpoint import latest_step

    step = latest_step(out_dir)
    if step is None:
        return "no checkpoint was saved yet; run the command again to start over"
    return f"the checkpoint of step {step} is kept: continue with the same command and --resume"


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
        line += f", valid loss {last_eval['valid_loss']:.4f}, perplexity {format_number(last_eval['valid_ppl'], 2)}"
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
@dtype_option(None, "Run the model's export set of this dtype on ONNX Runtime (exported on first use; the provider "
                    "and decoder generate picks) instead of the NumPy reference (the default).")
@one_line_errors
def evaluate(data_dir, model_dir, split, max_sentences, max_tokens, as_json, dtype):
    """Loss, perplexity and (translation) greedy BLEU/chrF of --model (default: the bundled model) on a split
    of DATA_DIR, computed by the NumPy reference, or with --dtype by the exported graphs on ONNX Runtime.

    \f
    Raises nothing to its caller: one_line_errors prints the RefformerError of check_evaluation (a bad flag or
    folder), evaluate_split or evaluate_on_runtime (a missing or diverged model, an unreadable split, too little
    memory, a failed export, int8 on CUDA) as one line `error: ...` and exits 1.
    """
    from refformer.refimpl.training.setup import check_evaluation, evaluate_split

    check_evaluation(data_dir, model_dir, split, max_sentences, max_tokens)
    if dtype is None:
        cfg, result = evaluate_split(data_dir, resolve_model(model_dir), split, max_sentences=max_sentences,
                                     max_tokens=max_tokens)
        result["decoding"] = "NumPy reference"
    else:
        from refformer.runtime.generator import evaluate_on_runtime

        cfg, result = evaluate_on_runtime(data_dir, resolve_model(model_dir), split, dtype=dtype,
                                          max_sentences=max_sentences, max_tokens=max_tokens)
        del result["hypotheses"]
        result["decoding"] = (f"ONNX Runtime {result.pop('dtype')} ({result.pop('provider')}, "
                              f"{result.pop('variant')} decoder)")
    if as_json:  # strict JSON: a NaN or infinite loss (extreme weights) is null, not NaN/Infinity
        click.echo(json.dumps({key: None if isinstance(value, float) and not math.isfinite(value) else value
                               for key, value in result.items()}, indent=2, allow_nan=False))
        return
    dropped = result["skipped_too_long"]
    rows = [("split", split), ("decoding", result["decoding"]),
            ("examples", f"{result['examples']}" + (f" ({dropped} too long, skipped)" if dropped else "")),
            ("tokens", f"{result['tokens']}"), ("loss", format_number(result["loss"], 4)),
            ("perplexity", format_number(result["perplexity"], 2))]
    if cfg.is_encoder_decoder:
        rows += [("BLEU", format_number(result["bleu"], 2)), ("chrF", format_number(result["chrf"], 2))]
    rows.append(("seconds", f"{result['seconds']:.1f}"))
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")
    for note in result["notes"]:
        click.echo(f"note: {note}")


def format_number(value, digits):
    """value with digits decimals; '-' for none; a huge one (the perplexity of a diverged model) as 1.23e+304.

    Raises nothing for None or a number.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if abs(value) < 1e9 else f"{value:.3g}"
