"""`refformer verify`: run the exported graphs on ONNX Runtime and compare with refimpl in float64.

Checks (each a row of the table: check, provider, output, error, bound):
  random     one prompt pass and one cached step on random ids, every output (per layer) against
             refimpl.encode / refimpl.decoder_step;
  real       the same on tokenized sentences when the model directory has a tokenizer;
  incremental  a prompt pass over left-padded rows of different lengths, then step-by-step decoding
             with the present cache fed back, against refimpl.model_forward over the whole sequence;
  static, static_mha, static_fused, fused   the exported decoder variants against decoder.onnx and refimpl.
"""

import contextlib
import functools
import io
import os
import sys
from pathlib import Path

import numpy as np

from refformer.refimpl.errors import RefformerError
from refformer.refimpl.gradcheck import rel_error
from refformer.refimpl.model import decoder_step, empty_cache, encode, left_pad, left_padded_positions, model_forward
from refformer.refimpl.tree import tree_cast

from .contract import ERROR_BOUNDS
from .graph import NUMPY_TYPES

REAL_SENTENCES = {
    "encoder-decoder": ["Ich habe heute keine Zeit.", "Das Wetter ist schön.", "Wo ist der Bahnhof?"],
    "decoder-only": ["The quick brown fox jumps over the lazy dog.", "Python is a programming language.",
                     "Errors should never pass silently."],
}


# ---------------------------------------------------------------------------- sessions


def check_native_path(path):
    """Refuse a path the native libraries (ONNX Runtime, onnx) cannot take: one whose non-ASCII characters Python
    could not decode under an ASCII locale (LC_ALL=C with PYTHONUTF8=0), which it keeps as surrogate escapes."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        raise RefformerError(f"the path {os.fspath(path)!r} has characters this locale ({sys.getfilesystemencoding()}) "
                             "cannot pass to ONNX Runtime; run with a UTF-8 locale (LC_ALL=C.UTF-8, or "
                             "PYTHONUTF8=1)") from None


def session(path, provider="CPUExecutionProvider", threads=None, provider_options=None):
    """An onnxruntime.InferenceSession for one provider; a corrupt or missing graph is a RefformerError."""
    ort = import_onnxruntime()

    check_native_path(path)
    path = Path(path)
    if not path.is_file():
        raise RefformerError(f"{path} is missing: run `refformer export`")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    options_of_provider = {"use_tf32": "0", **(provider_options or {})} if provider == "CUDAExecutionProvider" else {}
    try:
        sess = ort.InferenceSession(str(path), options, providers=[provider],
                                    provider_options=[options_of_provider])
    except Exception as error:  # onnxruntime raises its own exception types for bad files
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RefformerError(f"ONNX Runtime cannot load {path} ({reason[:200]}): run `refformer export` again") from None
    if provider not in sess.get_providers():
        raise RefformerError(f"{provider} could not be used for {path.name}")
    return sess


def import_onnxruntime():
    """The onnxruntime module. Its first import runs with file descriptor 2 pointed at /dev/null: ONNX Runtime 1.31
    prints a colored telemetry warning there on import when it cannot write under XDG_CACHE_HOME or ~/.cache (a
    file, a read-only or foreign folder), a line no refformer command should print. Raises KeyboardInterrupt for a
    Ctrl-C during the import (ONNX Runtime turns it into "ImportError: initialization failed"), RefformerError when
    onnxruntime cannot be imported."""
    if "onnxruntime" in sys.modules:
        return sys.modules["onnxruntime"]
    try:
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        pass
    try:
        saved = os.dup(2)
    except OSError:  # no stderr at all
        saved = None
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        if saved is not None:
            os.dup2(devnull, 2)
        import onnxruntime
    except ImportError as error:  # a Ctrl-C inside the native module's initialization arrives as its cause
        if isinstance(error.__cause__ or error.__context__, KeyboardInterrupt):
            raise KeyboardInterrupt from None
        raise RefformerError(f"onnxruntime cannot be imported ({error}): reinstall refformer") from None
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
        os.close(devnull)
    return onnxruntime


@functools.cache
def cuda_usable():
    """True when onnxruntime's CUDA execution provider can actually be loaded here (probed once per process, silently:
    ONNX Runtime's loader messages go nowhere)."""
    ort = import_onnxruntime()

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        with silenced_native_output():  # a failed probe prints pages of CUDA loader errors from C++
            ort.set_default_logger_severity(4)
            if hasattr(ort, "preload_dlls"):
                ort.preload_dlls()
            return _cuda_probe(ort)
    except Exception:
        return False
    finally:
        ort.set_default_logger_severity(2)


def _cuda_probe(ort):
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    options = ort.SessionOptions()
    options.log_severity_level = 4
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CUDAExecutionProvider"])
    return "CUDAExecutionProvider" in sess.get_providers()


@contextlib.contextmanager
def silenced_native_output():
    """Point file descriptors 1 and 2 at /dev/null for the duration (C++ output), and sys.stdout and sys.stderr at a
    discarded buffer (Python output, also where they are not file descriptors 1 and 2, as under click's test runner)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [devnull]:
            os.close(fd)


def runs_on(graph, dtype, provider):
    """Whether ONNX Runtime has kernels for the graph here: GroupQueryAttention (decoder_static_fused) runs
    on the CPU in fp32 and fp16, on CUDA only in fp16."""
    return not (graph == "decoder_static_fused" and provider == "CUDAExecutionProvider" and dtype == "fp32")


def run_encoder(sess, src, keep):
    outputs = sess.run(None, {"input_ids": src, "attention_mask": keep.astype(np.int64)})
    return dict(zip([o.name for o in sess.get_outputs()], outputs))


def encoder_cross(cfg, sessions, src, src_keep):
    """encoder.onnx on the source -> (its outputs by name, the cross cache [(cross_key_i, cross_value_i)] per
    decoder layer); (None, None) for a decoder-only model."""
    if not cfg.is_encoder_decoder:
        return None, None
    got = run_encoder(sessions["encoder"], src, src_keep)
    return got, [(got[f"cross_key_{i}"], got[f"cross_value_{i}"]) for i in range(cfg.n_decoder_layers)]


def run_decoder(sess, cfg, dtype, ids, positions, keep, past, cross=None, encoder_keep=None):
    """One decoder.onnx call; past and cross are lists of (k, v). Returns logits and the present cache."""
    feeds = {"input_ids": ids, "position_ids": positions, "attention_mask": keep.astype(np.int64)}
    for i, (k, v) in enumerate(past):
        feeds[f"past_key_self_{i}"] = k.astype(NUMPY_TYPES[dtype])
        feeds[f"past_value_self_{i}"] = v.astype(NUMPY_TYPES[dtype])
    if cfg.is_encoder_decoder:
        feeds["encoder_attention_mask"] = encoder_keep.astype(np.int64)
        for i, (k, v) in enumerate(cross):
            feeds[f"cross_key_{i}"] = k.astype(NUMPY_TYPES[dtype])
            feeds[f"cross_value_{i}"] = v.astype(NUMPY_TYPES[dtype])
    outputs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    present = [(outputs[f"present_key_self_{i}"], outputs[f"present_value_self_{i}"]) for i in range(len(past))]
    return outputs["logits"], present


# ---------------------------------------------------------------------------- checks


def compare_pass(cfg, params64, sessions, dtype, check, provider, src, src_keep, tgt, tgt_keep, tgt_positions):
    """Prompt pass (P = 0) then one cached step on every output, against refimpl's twins."""
    rows = []
    cross, cross_ref = None, None
    if cfg.is_encoder_decoder:
        got, cross = encoder_cross(cfg, sessions, src, src_keep)
        memory, cross_ref = encode(cfg, params64, src, src_keep)
        keep3 = src_keep.astype(bool)[:, :, None]
        rows.append((check, provider, "encoder_hidden_states", rel_error(got["encoder_hidden_states"] * keep3, memory * keep3)))
        for i, ((k, v), (k_ref, v_ref)) in enumerate(zip(cross, cross_ref)):
            rows.append((check, provider, f"cross_key_{i}", rel_error(k, k_ref)))
            rows.append((check, provider, f"cross_value_{i}", rel_error(v, v_ref)))
    B = tgt.shape[0]
    past = empty_cache(cfg, B, np.float32)
    past_ref = empty_cache(cfg, B, np.float64)
    prompt, step = tgt[:, :-1], tgt[:, -1:]
    for name, ids, positions, keep in (("prompt", prompt, tgt_positions[:, :-1], tgt_keep[:, :-1]),
                                       ("step", step, tgt_positions[:, -1:], tgt_keep)):
        logits, past = run_decoder(sessions["decoder"], cfg, dtype, ids, positions, keep, past, cross, src_keep)
        logits_ref, past_ref = decoder_step(cfg, params64, ids, positions, keep, past_ref, cross_ref,
                                           src_keep if cfg.is_encoder_decoder else None)
        real = keep[:, -ids.shape[1]:].astype(bool)[:, :, None]  # padding queries are not compared
        rows.append((check, provider, f"logits ({name})", rel_error(logits * real, logits_ref * real)))
        for i, ((k, v), (k_ref, v_ref)) in enumerate(zip(past, past_ref)):
            rows.append((check, provider, f"present_key_self_{i} ({name})", rel_error(k, k_ref)))
            rows.append((check, provider, f"present_value_self_{i} ({name})", rel_error(v, v_ref)))
    return rows


def incremental_check(cfg, params64, sessions, dtype, provider, src, src_keep, cross, prompts, n_steps, rng):
    """Left-padded prompts of different lengths, then n_steps single-token steps through decoder.onnx,
    against refimpl.model_forward over the whole (padded) sequence. cross: encoder_cross's cache for src."""
    ids, keep, positions = left_pad(prompts, cfg.pad_id)
    B = ids.shape[0]
    n_steps = max(0, min(n_steps, cfg.max_positions - ids.shape[1]))  # positions stay below max_positions
    new = random_ids(cfg, rng, (B, n_steps))
    past = empty_cache(cfg, B, np.float32)
    logits, past = run_decoder(sessions["decoder"], cfg, dtype, ids, positions, keep, past, cross, src_keep)
    collected = [logits]
    for t in range(n_steps):
        keep = np.concatenate([keep, np.ones((B, 1), np.int64)], axis=1)
        step_positions = positions[:, -1:] + 1
        positions = np.concatenate([positions, step_positions], axis=1)
        logits, past = run_decoder(sessions["decoder"], cfg, dtype, new[:, t:t + 1], step_positions, keep, past, cross, src_keep)
        collected.append(logits)
    full_ids = np.concatenate([ids, new], axis=1)
    ref, _ = model_forward(cfg, params64, src if cfg.is_encoder_decoder else None, full_ids,
                           src_mask=src_keep if cfg.is_encoder_decoder else None, tgt_mask=keep, tgt_positions=positions)
    got = np.concatenate(collected, axis=1)
    real = keep.astype(bool)[:, :, None]
    return [("incremental", provider, "logits (prompt + steps)", rel_error(got * real, ref * real))]


def random_ids(cfg, rng, size):
    """Random token ids of shape size; from 4 up (past the default special ids) when the vocabulary has room."""
    return rng.integers(4 if cfg.vocab_size > 8 else 0, cfg.vocab_size, size)


def random_prompts(cfg, rng, limit=None):
    """Three random prompts, of lengths 1, 3 and 2 (left-padded by the checks), each cut to limit tokens (default:
    max_positions - 1, so that a model of 2 or 3 positions has room for a step)."""
    limit = max(1, (cfg.max_positions - 1) if limit is None else limit)
    return [list(random_ids(cfg, rng, n))[:limit] for n in (1, 3, 2)]


def random_inputs(cfg, rng, B=3, S=6, T=5):
    S, T = min(S, cfg.max_positions), min(T, cfg.max_positions)
    src = random_ids(cfg, rng, (B, S))
    src_keep = np.ones((B, S), np.int64)
    for b in range(1, B):  # rows of different source lengths, each of one token at least (an empty source
        src_keep[b, max(1, S - b):] = 0  # is no input generate makes; its all-masked cross-attention is a corner case)
    src = np.where(src_keep == 1, src, cfg.pad_id)
    tgt = random_ids(cfg, rng, (B, T))
    tgt_keep = np.ones((B, T), np.int64)
    tgt_keep[-1, :1] = 0  # one left-padded target row
    tgt = np.where(tgt_keep == 1, tgt, cfg.pad_id)
    positions = left_padded_positions(tgt_keep)
    return src, src_keep, tgt, tgt_keep, positions


def load_sessions(cfg, onnx_dir, provider):
    """{"encoder"?, "decoder"}: sessions of the reference graphs in onnx_dir."""
    from .export import graph_files  # export imports this module when it measures

    return {name.removesuffix(".onnx"): session(Path(onnx_dir) / name, provider) for name in graph_files(cfg)}


def as_dicts(rows):
    """(check, provider, output, error) rows -> dicts with those keys."""
    return [{"check": c, "provider": p, "output": o, "error": e} for c, p, o, e in rows]


def export_checks(cfg, params, onnx_dir, dtype, graphs, seed=0):
    """What export records in the manifest: on ONNX Runtime CPU, the random-input rows and variant_checks' rows
    for the graphs, as dicts."""
    provider = "CPUExecutionProvider"
    params64 = tree_cast(params, np.float64)
    with onnx_runtime_errors(onnx_dir):  # one line, never ONNX Runtime's traceback
        sessions = load_sessions(cfg, onnx_dir, provider)
        rows = compare_pass(cfg, params64, sessions, dtype, "random", provider,
                            *random_inputs(cfg, np.random.default_rng(seed)))
        return as_dicts(rows + variant_checks(cfg, params64, sessions, onnx_dir, dtype, provider, graphs, seed))


def verify(model_dir, onnx_dir=None, providers=None, seed=0):
    """All checks on every usable provider -> (rows, dtype). A row: dict(check, provider, output, error, bound, ok).

    onnx_dir defaults to find_export(model_dir) (fp32, or the only export set there is). Raises RefformerError for a
    negative seed, a model_dir or onnx_dir that is not a path, providers that are not a non-empty list of known
    providers, a missing, stale or damaged export (a file whose sha256 is not the manifest's: graphs of another
    model), weights with NaN or inf, or graphs ONNX Runtime cannot load or run."""
    from refformer.refimpl.io import TOKENIZER_FILE, WEIGHTS_FILE, load, load_tokenizer

    from .export import (
        check_external_data,
        check_files,
        check_weights,
        find_export,
        graph_files,
        is_stale,
        read_manifest,
    )

    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise RefformerError(f"--seed must be an integer >= 0, got {seed!r}")
    from .export import check_path

    check_path("model_dir", model_dir)
    if onnx_dir is not None:
        check_path("onnx_dir", onnx_dir)
    known = ("CPUExecutionProvider", "CUDAExecutionProvider")
    if providers is not None and (not isinstance(providers, (list, tuple)) or not providers
                                  or not all(provider in known for provider in providers)):
        raise RefformerError(f"providers must be a non-empty list of {' and '.join(known)}, got {providers!r}")
    if providers is not None and "CUDAExecutionProvider" in providers and not cuda_usable():  # before ONNX Runtime
        # prints its own banner of loader errors for each session
        raise RefformerError("the CUDA execution provider cannot be loaded here (no GPU, or CUDA 13 / cuDNN 9 "
                             "libraries missing); use CPUExecutionProvider")
    model_dir = Path(model_dir)
    onnx_dir = Path(onnx_dir) if onnx_dir is not None else find_export(model_dir)
    cfg, params = load(model_dir)
    check_weights(params, None, model_dir / WEIGHTS_FILE)
    manifest = read_manifest(onnx_dir)
    if is_stale(model_dir, manifest):
        raise RefformerError(f"{onnx_dir} was exported from a different config or weights: run `refformer export` again")
    check_files(onnx_dir, manifest)
    for name in graph_files(cfg):
        check_external_data(onnx_dir / name)
    dtype = manifest.get("dtype")
    if dtype not in ERROR_BOUNDS:
        raise RefformerError(f"{onnx_dir}/manifest.json: dtype {dtype!r} is not fp32 or fp16: run `refformer export` again")
    if providers is None:
        providers = ["CPUExecutionProvider"] + (["CUDAExecutionProvider"] if cuda_usable() else [])
    params64 = tree_cast(params, np.float64)
    rng = np.random.default_rng(seed)
    rows = []
    for provider in providers:
        with onnx_runtime_errors(onnx_dir):
            sessions = load_sessions(cfg, onnx_dir, provider)
            inputs = random_inputs(cfg, np.random.default_rng(seed))
            rows += compare_pass(cfg, params64, sessions, dtype, "random", provider, *inputs)
            if (model_dir / TOKENIZER_FILE).is_file():
                rows += compare_pass(cfg, params64, sessions, dtype, "real", provider,
                                     *real_inputs(cfg, load_tokenizer(model_dir)))
            src, src_keep = inputs[0], inputs[1]
            prompts = random_prompts(cfg, rng)[: src.shape[0]]
            _, cross = encoder_cross(cfg, sessions, src, src_keep)
            rows += incremental_check(cfg, params64, sessions, dtype, provider, src, src_keep, cross, prompts, 3, rng)
            rows += variant_checks(cfg, params64, sessions, onnx_dir, dtype, provider, manifest["graphs"], seed)
    bound = ERROR_BOUNDS[dtype]
    return [{**row, "bound": bound, "ok": bool(row["error"] <= bound)} for row in as_dicts(rows)], dtype


@contextlib.contextmanager
def onnx_runtime_errors(onnx_dir):
    """ONNX Runtime's own exceptions (and a graph whose inputs or outputs are not this model's) while running the
    graphs of onnx_dir -> one RefformerError saying to export again."""
    try:
        yield
    except RefformerError as error:
        if str(error).startswith("rel_error: shapes differ"):  # an output of another model's shape
            raise RefformerError(f"the graphs in {onnx_dir} give outputs of another shape than the model's "
                                 f"({str(error).split(': ', 2)[-1]}); they belong to another model: run `refformer "
                                 "export` again") from None
        raise
    except Exception as error:  # onnxruntime's Fail, InvalidArgument, ...; KeyError for a missing output name
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RefformerError(f"ONNX Runtime could not run the graphs in {onnx_dir} ({type(error).__name__}: "
                             f"{reason[:200]}); they may belong to another model: run `refformer export` again") from None


def real_inputs(cfg, tokenizer):
    """Tokenized sentences (German sources and their bos-prefixed English-like targets, or English text)."""
    texts = REAL_SENTENCES[cfg.family]
    from refformer.runtime.tokenizer import encode  # a tokenizer that panics is one RefformerError, silently

    rows = [row[: cfg.max_positions - 2] for row in encode(tokenizer, list(texts))]
    src_rows = [row + [cfg.eos_id] for row in rows]
    tgt_rows = [[cfg.bos_id] + row for row in rows]
    src, src_keep, _ = left_pad(src_rows, cfg.pad_id)
    # sources are right-padded like the random ones: move the padding to the end
    src = np.array([np.concatenate([r[k == 1], r[k == 0]]) for r, k in zip(src, src_keep)])
    src_keep = np.sort(src_keep, axis=1)[:, ::-1].copy()
    tgt, tgt_keep, tgt_positions = left_pad(tgt_rows, cfg.pad_id)
    return src, src_keep, tgt, tgt_keep, tgt_positions


def static_check(cfg, params64, sessions, onnx_dir, dtype, provider, seed=0, n_steps=4, graph="decoder_static"):
    """A static graph (decoder_static.onnx, or graph="decoder_static_mha" / "decoder_static_fused"), one token per
    call over left-padded prompts, against decoder.onnx (the reference graph) fed the same tokens, and against
    refimpl; next_ids must be the argmax of its logits. The check is named after the graph's variant ("static",
    "static_mha" or "static_fused")."""
    static = session(Path(onnx_dir) / f"{graph}.onnx", provider)
    inputs = {i.name: i for i in static.get_inputs()}
    L = inputs["past_key_self_0"].shape[2]
    rng = np.random.default_rng(seed)
    src, src_keep = random_inputs(cfg, rng)[:2]
    ids, keep, positions = left_pad(random_prompts(cfg, rng, min(L, cfg.max_positions) - 1), cfg.pad_id)
    n_steps = max(0, min(n_steps, L - ids.shape[1]))  # a short static cache (--static-length 2) is checked too
    ids = np.concatenate([ids, random_ids(cfg, rng, (3, n_steps))], axis=1)
    keep = np.concatenate([keep, np.ones((3, n_steps), np.int64)], axis=1)
    positions = left_padded_positions(keep)
    total = ids.shape[1]
    if total > L:
        return []
    _, cross = encoder_cross(cfg, sessions, src, src_keep)
    reference, _ = run_decoder(sessions["decoder"], cfg, dtype, ids, positions, keep, empty_cache(cfg, 3, np.float32),
                               cross, src_keep)
    zeros = np.zeros((3, cfg.n_heads, L, cfg.head_dim), NUMPY_TYPES[dtype])
    caches = [(zeros, zeros) for _ in range(cfg.n_decoder_layers)]
    mask = np.zeros((3, L), np.int64)
    logits, argmax_ok = [], True
    for t in range(total):
        mask[:, t] = keep[:, t]
        feeds = {"input_ids": ids[:, t:t + 1], "position_ids": positions[:, t:t + 1],
                 "write_index": np.array([t], np.int64), "attention_mask": mask}
        for i, (k, v) in enumerate(caches):
            feeds[f"past_key_self_{i}"], feeds[f"past_value_self_{i}"] = k, v
        if cfg.is_encoder_decoder:
            feeds["encoder_attention_mask"] = src_keep.astype(np.int64)
            for i, (k, v) in enumerate(cross):
                feeds[f"cross_key_{i}"], feeds[f"cross_value_{i}"] = k, v
        feeds = {name: value for name, value in feeds.items() if name in inputs}  # the fused graph has no mask inputs
        out = dict(zip([o.name for o in static.get_outputs()], static.run(None, feeds)))
        caches = [(out[f"present_key_self_{i}"], out[f"present_value_self_{i}"]) for i in range(cfg.n_decoder_layers)]
        logits.append(out["logits"])
        argmax_ok &= bool(np.array_equal(out["next_ids"], out["logits"][:, -1].argmax(axis=-1)))
    got = np.concatenate(logits, axis=1)
    ref, _ = model_forward(cfg, params64, src if cfg.is_encoder_decoder else None, ids,
                           src_mask=src_keep if cfg.is_encoder_decoder else None, tgt_mask=keep, tgt_positions=positions)
    real = keep.astype(bool)[:, :, None]
    check = graph.removeprefix("decoder_")
    return [(check, provider, "logits vs decoder.onnx", rel_error(got * real, reference * real)),
            (check, provider, "logits vs refimpl", rel_error(got * real, ref * real)),
            (check, provider, "next_ids = argmax(logits)", 0.0 if argmax_ok else float("inf"))]


def fused_check(cfg, params64, sessions, onnx_dir, dtype, provider, seed=0):
    """decoder_fused.onnx in place of decoder.onnx: the incremental check against refimpl, and its logits
    against decoder.onnx's on the same left-padded prompts and steps."""
    fused = dict(sessions, decoder=session(Path(onnx_dir) / "decoder_fused.onnx", provider))
    rng = np.random.default_rng(seed)
    src, src_keep = random_inputs(cfg, rng)[:2]
    _, cross = encoder_cross(cfg, sessions, src, src_keep)
    prompts = random_prompts(cfg, rng)
    rows = [("fused", provider, "logits vs refimpl (prompt + steps)",
             incremental_check(cfg, params64, fused, dtype, provider, src, src_keep, cross, prompts, 3,
                               np.random.default_rng(seed))[0][3])]
    ids, keep, positions = left_pad(prompts, cfg.pad_id)
    empty = empty_cache(cfg, len(prompts), np.float32)
    reference, _ = run_decoder(sessions["decoder"], cfg, dtype, ids, positions, keep, empty, cross, src_keep)
    got, _ = run_decoder(fused["decoder"], cfg, dtype, ids, positions, keep, empty, cross, src_keep)
    real = keep.astype(bool)[:, :, None]
    rows.append(("fused", provider, "logits vs decoder.onnx (prompt)", rel_error(got * real, reference * real)))
    return rows


def variant_checks(cfg, params64, sessions, onnx_dir, dtype, provider, graphs, seed=0):
    """The rows of the faster decoders among graphs (names without .onnx) that run on the provider: each
    decoder_static* by static_check, decoder_fused by fused_check."""
    rows = []
    for graph in ("decoder_static", "decoder_static_mha", "decoder_static_fused"):
        if graph in graphs and runs_on(graph, dtype, provider):
            rows += static_check(cfg, params64, sessions, onnx_dir, dtype, provider, seed, graph=graph)
    if "decoder_fused" in graphs:
        rows += fused_check(cfg, params64, sessions, onnx_dir, dtype, provider, seed)
    return rows
