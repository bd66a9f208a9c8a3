"""One training step (forward + loss + backward) of refimpl float32 against the same model in torch, on the CPU.

Issue 2. Both implementations get the same weights, the same batch and the same thread count,
and run interleaved (warm-up, then alternating refimpl / torch repetitions) so that machine
noise falls on both alike; the table reports the median and the minimum of each.

    .venv/bin/python benchmarks/train_step.py [--reps 9] [--warmup 2] [--json benchmarks/results/train_step.json]

Model: D = 256, H = 4, 3 + 3 post-LN layers, F = 1024, V = 8000, shared and tied embeddings,
sinusoidal positions, dropout 0.1; batch B = 32, S = T = 32 with padded rows; loss: token
cross-entropy, label smoothing 0.1, padding ignored.
"""

import argparse
import ctypes
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from machine import cpu_model  # benchmarks/machine.py (scripts run from their folder on sys.path)
from torch import nn

from refformer.refimpl import (
    Config,
    cross_entropy_backward,
    cross_entropy_forward,
    init_params,
    model_backward,
    model_forward,
    rel_error,
    sinusoidal_table,
)
from refformer.refimpl.tree import tree_map

B, S, T = 32, 32, 32
LABEL_SMOOTHING = 0.1
CFG = Config(vocab_size=8000, d_model=256, n_heads=4, d_ff=1024, n_encoder_layers=3, n_decoder_layers=3,
             dropout=0.1)


# ---------------------------------------------------------------------------- threads


def blas_info():
    """NumPy's BLAS: (threads, description), from threadpoolctl if installed, else from the loaded OpenBLAS."""
    try:
        import threadpoolctl
    except ImportError:
        threadpoolctl = None
    if threadpoolctl is not None:
        pools = [pool for pool in threadpoolctl.threadpool_info() if pool["user_api"] == "blas"]
        if pools:
            pool = pools[0]
            return pool["num_threads"], f"threadpoolctl: {pool['internal_api']} {pool.get('version')} " \
                                        f"({pool.get('architecture')}) {pool['filepath']}"
    # No threadpoolctl: ask the OpenBLAS that numpy loaded (the scipy-openblas symbols numpy's wheels ship).
    with open("/proc/self/maps") as maps:
        paths = sorted({line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line})
    for path in paths:
        lib = ctypes.CDLL(path)
        for prefix, suffix in (("scipy_openblas_", "64_"), ("scipy_openblas_", ""), ("openblas_", "")):
            try:
                get_threads = getattr(lib, f"{prefix}get_num_threads{suffix}")
                get_corename = getattr(lib, f"{prefix}get_corename{suffix}")
                get_config = getattr(lib, f"{prefix}get_config{suffix}")
            except AttributeError:
                continue
            get_corename.restype = get_config.restype = ctypes.c_char_p
            return get_threads(), (f"OpenBLAS via ctypes: {get_config().decode()}, core {get_corename().decode()}, "
                                   f"{path}")
    return None, "unknown (no threadpoolctl, no OpenBLAS found)"


def blas_env():
    """The environment variables that steer BLAS / OpenMP threading and OpenBLAS's kernel choice."""
    names = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
             "OPENBLAS_VERBOSE")
    return {name: os.environ.get(name) for name in names}


# ---------------------------------------------------------------------------- the batch


def padded_ids(rng, cfg, n_rows, length):
    """Random ids [n_rows, length], each row a random length (length // 2 .. length) padded with pad_id."""
    ids = rng.integers(4, cfg.vocab_size, size=(n_rows, length))
    lengths = rng.integers(length // 2, length + 1, size=n_rows)
    ids[np.arange(length)[None, :] >= lengths[:, None]] = cfg.pad_id
    return ids


def make_batch(rng):
    """src [B, S], decoder input and targets [B, T], each row a random length padded with pad_id."""
    src = padded_ids(rng, CFG, B, S)
    tgt = padded_ids(rng, CFG, B, T + 1)
    tgt[:, 0] = CFG.bos_id
    return src, tgt[:, :-1], tgt[:, 1:]


# ---------------------------------------------------------------------------- refimpl


def refimpl_step(params, src, tgt_in, tgt_out, rng=None, cfg=CFG):
    """Forward (dropout from rng; None: off), loss, backward; returns (loss, grads)."""
    logits, cache = model_forward(cfg, params, src, tgt_in, rng=rng)
    loss, loss_cache = cross_entropy_forward(logits, tgt_out, ignore_id=cfg.pad_id, label_smoothing=LABEL_SMOOTHING)
    grads = model_backward(cfg, params, cache, cross_entropy_backward(loss_cache))
    return loss, grads


# ---------------------------------------------------------------------------- torch


class TorchModel(nn.Module):
    """nn.Embedding (shared by source and target) * sqrt(D) + sinusoidal positions, nn.Transformer, tied head."""

    def __init__(self, cfg):
        super().__init__()
        self.d_model = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.register_buffer("positions", torch.from_numpy(sinusoidal_table(cfg.max_positions, cfg.d_model,
                                                                            np.float32)))
        self.dropout = nn.Dropout(cfg.dropout)
        self.transformer = nn.Transformer(d_model=cfg.d_model, nhead=cfg.n_heads,
                                          num_encoder_layers=cfg.n_encoder_layers,
                                          num_decoder_layers=cfg.n_decoder_layers, dim_feedforward=cfg.d_ff,
                                          dropout=cfg.dropout, batch_first=True, norm_first=cfg.norm_first)
        self.pad_id = cfg.pad_id

    def embed_ids(self, ids):
        return self.dropout(self.embed(ids) * math.sqrt(self.d_model) + self.positions[: ids.shape[1]])

    def forward(self, src, tgt):
        causal = torch.ones(tgt.shape[1], tgt.shape[1], dtype=torch.bool).triu(1)  # True = may not attend
        hidden = self.transformer(self.embed_ids(src), self.embed_ids(tgt), tgt_mask=causal,
                                  src_key_padding_mask=src == self.pad_id, tgt_key_padding_mask=tgt == self.pad_id,
                                  memory_key_padding_mask=src == self.pad_id)
        return hidden @ self.embed.weight.T  # tied head: logits [B, T, V]


def load_refimpl_params(model, params):
    """Copy refimpl's parameters into the torch model (refimpl W is [in, out]; torch's Linear weight is [out, in])."""
    def attention(module, p):
        module.in_proj_weight.copy_(torch.from_numpy(np.concatenate(
            [p["q_proj"]["weight"].T, p["k_proj"]["weight"].T, p["v_proj"]["weight"].T])))
        module.in_proj_bias.copy_(torch.from_numpy(np.concatenate(
            [p["q_proj"]["bias"], p["k_proj"]["bias"], p["v_proj"]["bias"]])))
        linear(module.out_proj, p["out_proj"])

    def linear(module, p):
        module.weight.copy_(torch.from_numpy(p["weight"].T))
        module.bias.copy_(torch.from_numpy(p["bias"]))

    def norm(module, p):
        module.weight.copy_(torch.from_numpy(p["weight"]))
        module.bias.copy_(torch.from_numpy(p["bias"]))

    def ffn_and_norms(layer, p, norms):
        linear(layer.linear1, p["ffn"]["fc1"])
        linear(layer.linear2, p["ffn"]["fc2"])
        for name, torch_norm in norms.items():
            norm(torch_norm, p[name])

    with torch.no_grad():
        model.embed.weight.copy_(torch.from_numpy(params["decoder"]["embed_tokens"]["weight"]))
        for layer, p in zip(model.transformer.encoder.layers, params["encoder"]["layers"]):
            attention(layer.self_attn, p["self_attn"])
            ffn_and_norms(layer, p, {"self_attn_norm": layer.norm1, "ffn_norm": layer.norm2})
        for layer, p in zip(model.transformer.decoder.layers, params["decoder"]["layers"]):
            attention(layer.self_attn, p["self_attn"])
            attention(layer.multihead_attn, p["cross_attn"])
            ffn_and_norms(layer, p, {"self_attn_norm": layer.norm1, "cross_attn_norm": layer.norm2,
                                     "ffn_norm": layer.norm3})
        norm(model.transformer.encoder.norm, params["encoder"]["final_norm"])
        norm(model.transformer.decoder.norm, params["decoder"]["final_norm"])


def torch_step(model, src, tgt_in, tgt_out, cfg=CFG):
    """Zero the grads, forward, loss, backward; returns the loss."""
    model.zero_grad(set_to_none=True)
    logits = model(src, tgt_in)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1), ignore_index=cfg.pad_id,
                           label_smoothing=LABEL_SMOOTHING)
    loss.backward()
    return loss


def check_same_model(params, src, tgt_in, tgt_out):
    """Both models in float64 without dropout: relative error of the torch loss and token-table gradient against
    refimpl.

    The token table's gradient collects every path (tied head, decoder and encoder inputs), so it
    checks the whole backward. float64 because in float32 a single ReLU that flips sign between
    two roundings moves some weight gradients by ~1e-2 (in either implementation).
    """
    params64 = tree_map(lambda a: a.astype(np.float64), params)
    loss, grads = refimpl_step(params64, src, tgt_in, tgt_out, cfg=CFG.replace(dropout=0.0))
    model = TorchModel(CFG).double()
    load_refimpl_params(model, params64)
    model.eval()  # dropout off; with grad enabled torch still takes its standard (training) path
    torch_loss = torch_step(model, *(torch.from_numpy(a) for a in (src, tgt_in, tgt_out))).item()
    loss_error = abs(float(loss) - torch_loss) / abs(float(loss))
    grad_error = rel_error(model.embed.weight.grad.numpy(), grads["decoder"]["embed_tokens"]["weight"])
    return loss_error, grad_error


# ---------------------------------------------------------------------------- main


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--reps", type=int, default=9, help="timed repetitions of each implementation")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repetitions of each first")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "train_step.json"),
                        help="where to write the results ('' for nowhere)")
    args = parser.parse_args(argv)

    threads, blas = blas_info()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    params = init_params(CFG, rng)
    src, tgt_in, tgt_out = make_batch(rng)
    loss_error, grad_error = check_same_model(params, src, tgt_in, tgt_out)
    model = TorchModel(CFG)
    load_refimpl_params(model, params)
    model.train()
    torch_batch = [torch.from_numpy(a) for a in (src, tgt_in, tgt_out)]
    dropout_rng = np.random.default_rng(1)

    def run_refimpl():
        loss, grads = refimpl_step(params, src, tgt_in, tgt_out, dropout_rng)
        assert grads["decoder"]["embed_tokens"]["weight"].dtype == np.float32
        return float(loss)

    def run_torch():
        return torch_step(model, *torch_batch).item()

    runs = {"refimpl": run_refimpl, "torch": run_torch}
    times = {name: [] for name in runs}
    losses = {name: [] for name in runs}
    load_before = os.getloadavg()
    for _ in range(args.warmup):
        for run in runs.values():
            run()
    for rep in range(args.reps):
        order = list(runs) if rep % 2 == 0 else list(runs)[::-1]  # alternate who goes first
        for name in order:
            start = time.perf_counter()
            losses[name].append(runs[name]())
            times[name].append(time.perf_counter() - start)
    load_after = os.getloadavg()

    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = median["refimpl"] / median["torch"]
    print(f"train step, D={CFG.d_model} H={CFG.n_heads} layers={CFG.n_encoder_layers}+{CFG.n_decoder_layers} "
          f"F={CFG.d_ff} V={CFG.vocab_size} B={B} S={S} T={T}, dropout {CFG.dropout}, "
          f"label smoothing {LABEL_SMOOTHING}")
    print(f"threads: numpy BLAS {threads}, torch {torch.get_num_threads()}; {blas}")
    print(f"environment: "
          f"{', '.join(f'{k}={v}' for k, v in blas_env().items() if v is not None) or 'no BLAS/OpenMP variables set'}")
    print(f"same model (float64, dropout off): loss rel. error {loss_error:.1e}, token-table gradient rel. error "
          f"{grad_error:.1e}")
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}; {args.reps} interleaved reps "
          f"after {args.warmup} warm-up")
    print()
    print("| impl    | median s | min s  | max s  |")
    print("|---------|----------|--------|--------|")
    for name, t in times.items():
        print(f"| {name:<7} | {median[name]:8.4f} | {min(t):6.4f} | {max(t):6.4f} |")
    print()
    print(f"ratio refimpl / torch (medians): {ratio:.2f}")

    if args.json:
        result = {
            "refimpl_s": median["refimpl"], "torch_s": median["torch"], "ratio": ratio,
            "refimpl_min_s": min(times["refimpl"]), "torch_min_s": min(times["torch"]),
            "refimpl_times_s": times["refimpl"], "torch_times_s": times["torch"],
            "losses": losses, "same_model_loss_rel_error": loss_error, "same_model_grad_rel_error": grad_error,
            "reps": args.reps, "warmup": args.warmup,
            "threads": {"numpy_blas": threads, "torch": torch.get_num_threads(), "blas": blas, "env": blas_env()},
            "versions": {"python": platform.python_version(), "numpy": np.__version__, "torch": torch.__version__},
            "shapes": {"B": B, "S": S, "T": T, "D": CFG.d_model, "H": CFG.n_heads, "F": CFG.d_ff,
                       "V": CFG.vocab_size, "encoder_layers": CFG.n_encoder_layers,
                       "decoder_layers": CFG.n_decoder_layers, "dropout": CFG.dropout,
                       "label_smoothing": LABEL_SMOOTHING, "dtype": "float32"},
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "load_average_1min": [load_before[0], load_after[0]],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
