"""Training throughput (target tokens/s) on the bundled model's config: refimpl (NumPy) against the same
model and optimizer in torch, on the CPU, side by side in one run. Issue 3.

One step on both sides: forward, label-smoothed cross-entropy (padding ignored), backward, clipping by
global norm 1.0, AdamW (betas 0.9/0.98, weight decay 0.01 on matrices), dropout 0.1. The batches are the
de-en training data's (refformer data de-en; --data DIR) bucketed like `refformer train` (--max-tokens 4096),
or, without the data, random ids of the same lengths. Steps alternate between the two implementations;
tokens/s is the non-padding target tokens of the timed steps over their summed time.

    .venv/bin/python benchmarks/train_throughput.py [--data /path/to/data/de-en] [--steps 12]
"""

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import train_step  # benchmarks/train_step.py (scripts run from their folder on sys.path): the model, the step, ...
from machine import cpu_model

from refformer.refimpl import init_params
from refformer.refimpl.io import load_config
from refformer.refimpl.optim import adamw_init, adamw_update, clip_by_global_norm

HERE = Path(__file__).resolve().parent
CFG = load_config(HERE.parent / "runtime" / "models" / "de-en")
CLIP, LR, WEIGHT_DECAY = 1.0, 5e-4, 0.01  # label smoothing: train_step.LABEL_SMOOTHING


def batches(data_dir, rng, n):
    """n batches (src, tgt_in, tgt_out): the real bucketed de-en batches, or random ids of those shapes."""
    if data_dir:
        from refformer.refimpl.training.batching import make_batches, seq2seq_examples
        from refformer.refimpl.training.data import read_tsv
        from refformer.refimpl.training.tokenizer import encode, load_tokenizer

        tokenizer = load_tokenizer(Path(data_dir) / "tokenizer.json")
        pairs = read_tsv(Path(data_dir) / "train.tsv")
        ids = list(zip(encode(tokenizer, [s for s, _ in pairs]), encode(tokenizer, [t for _, t in pairs])))
        examples, _ = seq2seq_examples(ids, bos_id=CFG.bos_id, eos_id=CFG.eos_id, max_len=CFG.max_positions)
        made = make_batches(examples, max_tokens=4096, pad_id=CFG.pad_id, seed=0)
        picked = np.random.default_rng(0).choice(len(made), n, replace=False)  # all lengths, not just the shortest
        return [(made[i].src_ids, made[i].tgt_ids, made[i].labels) for i in picked]
    B, S, T = 160, 14, 14
    out = []
    for _ in range(n):
        tgt = train_step.padded_ids(rng, CFG, B, T + 1)
        tgt[:, 0] = CFG.bos_id
        out.append((train_step.padded_ids(rng, CFG, B, S), tgt[:, :-1], tgt[:, 1:]))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="de-en data folder (train.tsv + tokenizer.json)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps of each implementation")
    parser.add_argument("--json", default=str(HERE / "results" / "train_throughput.json"))
    args = parser.parse_args()
    threads, blas = train_step.blas_info()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    params = init_params(CFG, rng)
    state = adamw_init(params)
    model = train_step.TorchModel(CFG)
    train_step.load_refimpl_params(model, params)
    model.train()
    decay = [p for name, p in model.named_parameters() if p.ndim == 2]
    no_decay = [p for name, p in model.named_parameters() if p.ndim != 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=LR, betas=(0.9, 0.98), eps=1e-9)
    work = batches(args.data, rng, args.steps + 2)
    dropout_rng = np.random.default_rng(1)

    def refimpl(batch):
        nonlocal params, state
        loss, grads = train_step.refimpl_step(params, *batch, dropout_rng, CFG)
        grads, _ = clip_by_global_norm(grads, CLIP)
        params, state = adamw_update(params, grads, state, lr=LR, weight_decay=WEIGHT_DECAY)
        return float(loss)

    def torch_(batch):
        loss = train_step.torch_step(model, *(torch.from_numpy(np.ascontiguousarray(a)) for a in batch), CFG)
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        return loss.item()

    runs = {"refimpl": refimpl, "torch": torch_}
    seconds = {name: 0.0 for name in runs}
    tokens = {name: 0 for name in runs}
    for batch in work[:2]:  # warm-up
        for run in runs.values():
            run(batch)
    load_before = os.getloadavg()
    for i, batch in enumerate(work[2:]):
        order = list(runs) if i % 2 == 0 else list(runs)[::-1]
        for name in order:
            start = time.perf_counter()
            runs[name](batch)
            seconds[name] += time.perf_counter() - start
            tokens[name] += int((batch[2] != CFG.pad_id).sum())
    load_after = os.getloadavg()
    tok_s = {name: tokens[name] / seconds[name] for name in runs}
    ratio = tok_s["refimpl"] / tok_s["torch"]
    print(f"training throughput, bundled config: D={CFG.d_model} H={CFG.n_heads} layers={CFG.n_encoder_layers}+"
          f"{CFG.n_decoder_layers} F={CFG.d_ff} V={CFG.vocab_size} norm_first={CFG.norm_first}; "
          f"{'de-en batches' if args.data else 'random batches'}, {args.steps} timed steps each")
    print(f"threads: numpy BLAS {threads}, torch {torch.get_num_threads()}; load {load_before[0]:.2f} -> "
          f"{load_after[0]:.2f}")
    print()
    print("| impl    | target tokens/s | seconds |")
    print("|---------|-----------------|---------|")
    for name in runs:
        print(f"| {name:<7} | {tok_s[name]:15.0f} | {seconds[name]:7.2f} |")
    print()
    print(f"ratio refimpl / torch tokens/s: {ratio:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "refimpl_tok_s": tok_s["refimpl"], "torch_tok_s": tok_s["torch"], "ratio": ratio,
            "steps": args.steps, "data": "de-en" if args.data else "random", "tokens": tokens, "seconds": seconds,
            "threads": {"numpy_blas": threads, "torch": torch.get_num_threads(), "blas": blas},
            "config": CFG.to_dict(), "cpu": cpu_model(), "load_average_1min": [load_before[0], load_after[0]],
            "versions": {"numpy": np.__version__, "torch": torch.__version__},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
