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
from pathlib import Path

import numpy as np

from refformer.refimpl.errors import RefformerError, is_integer
from refformer.refimpl.gradcheck import rel_error
from refformer.refimpl.model import decoder_step, empty_cache, encode, left_pad, left_padded_positions, model_forward
from refformer.refimpl.tree import tree_cast

from .contract import (
    ATTENTION_MASK,
    CPU_PROVIDER,
    CUDA_PROVIDER,
    DECODER,
    DECODER_FILE,
    ENCODER,
    ENCODER_ATTENTION_MASK,
    ENCODER_HIDDEN_STATES,
    ERROR_BOUNDS,
    FUSED,
    GRAPH_SUFFIX,
    INPUT_IDS,
    LOGITS,
    NEXT_IDS,
    POSITION_IDS,
    PROVIDERS,
    QUANTIZED_DTYPES,
    QUANTIZED_PROVIDERS,
    STATIC,
    STATIC_VARIANTS,
    WRITE_INDEX,
    check_exportable,
    cross_key,
    cross_value,
    decoder_graph,
    graph_dtype,
    graph_file,
    graph_variant,
    past_key,
    past_value,
    present_key,
    present_value,
    reference_graphs,
    runs_on,
)
from .folder import check_external_data, check_files, check_path, find_export, graph_files, is_stale, read_manifest
from .graph import NUMPY_TYPES, check_weights
from .quantize import QUANTIZED_OPS, graph_types, signature_ops
from .session import CUDA_MISSING, cuda_usable, make_session, usable_providers

REAL_SENTENCES = {
    "encoder-decoder": ["Ich habe heute keine Zeit.", "Das Wetter ist schön.", "Wo ist der Bahnhof?"],
    "decoder-only": ["The quick brown fox jumps over the lazy dog.", "Python is a programming language.",
                     "Errors should never pass silently."],
}


# ---------------------------------------------------------------------------- running the graphs


def run_encoder(sess, src, keep):
    """One encoder.onnx call on source ids src [B, S] int64 and keep [B, S] (1 = real token) -> {output name: array}:
    encoder_hidden_states [B, S, D] and cross_key/value_{i} [B, H, S, Dh].

    Outputs in the graph's float type. Raises what sess.run raises (onnxruntime's errors) for feeds the graph refuses;
    the callers build them to the contract.
    """
    outputs = sess.run(None, {INPUT_IDS: src, ATTENTION_MASK: keep.astype(np.int64)})
    return dict(zip([o.name for o in sess.get_outputs()], outputs))


def encoder_cross(cfg, sessions, src, src_keep):
    """encoder.onnx on the source -> (its outputs by name, the cross cache [(cross_key_i, cross_value_i)] per
    decoder layer); (None, None) for a decoder-only model.

    Outputs in the graph's float type. Raises what sess.run raises (onnxruntime's errors) for feeds the graph refuses;
    the callers build them to the contract.
    """
    if not cfg.is_encoder_decoder:
        return None, None
    got = run_encoder(sessions[ENCODER], src, src_keep)
    return got, [(got[cross_key(i)], got[cross_value(i)]) for i in range(cfg.n_decoder_layers)]


def run_decoder(sess, cfg, dtype, ids, positions, keep, past, cross=None, encoder_keep=None):
    """One call of a growing-cache decoder graph (decoder.onnx, decoder_fused.onnx): ids, positions [B, T] int64,
    keep [B, P + T], past a list of (k, v) [B, H, P, Dh] per layer (cast to the graph's dtype), cross a list of
    (k, v) [B, H, S, Dh] and encoder_keep [B, S] for encoder-decoder. Returns logits [B, T, V] float32 and the
    present cache [(k, v) [B, H, P + T, Dh]].

    present in the graph's float type. Raises what sess.run raises (onnxruntime's errors) for feeds the graph refuses;
    the callers build them to the contract.
    """
    float_type = NUMPY_TYPES[graph_dtype(dtype)]  # an int8 set's graphs take float32
    feeds = {INPUT_IDS: ids, POSITION_IDS: positions, ATTENTION_MASK: keep.astype(np.int64)}
    for i, (k, v) in enumerate(past):
        feeds[past_key(i)] = k.astype(float_type)
        feeds[past_value(i)] = v.astype(float_type)
    if cfg.is_encoder_decoder:
        feeds[ENCODER_ATTENTION_MASK] = encoder_keep.astype(np.int64)
        for i, (k, v) in enumerate(cross):
            feeds[cross_key(i)] = k.astype(float_type)
            feeds[cross_value(i)] = v.astype(float_type)
    outputs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    present = [(outputs[present_key(i)], outputs[present_value(i)]) for i in range(len(past))]
    return outputs[LOGITS], present


# ---------------------------------------------------------------------------- checks


def compare_pass(cfg, params64, sessions, dtype, check, provider, src, src_keep, tgt, tgt_keep, tgt_positions):
    """The "random" or "real" check (named by check) of the reference graphs on one provider: the prompt pass
    (P = 0, tgt[:, :-1]) then one cached step (tgt[:, -1:]) through decoder.onnx, and encoder.onnx for
    encoder-decoder, every output (per layer) against refimpl.encode / refimpl.decoder_step in float64 (params64).
    src, src_keep [B, S] int64; tgt, tgt_keep, tgt_positions [B, T] int64 (left-padded rows allowed: padding
    queries are not compared). Returns rows (check, provider, output name, rel_error).

    Raises onnxruntime's own errors, and RefformerError (rel_error) for outputs of another shape; verify and
    export_checks run it inside onnx_runtime_errors, which makes each one RefformerError.
    """
    rows = []
    cross, cross_ref = None, None
    if cfg.is_encoder_decoder:
        got, cross = encoder_cross(cfg, sessions, src, src_keep)
        memory, cross_ref = encode(cfg, params64, src, src_keep)
        keep3 = src_keep.astype(bool)[:, :, None]
        rows.append((check, provider, ENCODER_HIDDEN_STATES,
                     rel_error(got[ENCODER_HIDDEN_STATES] * keep3, memory * keep3)))
        for i, ((k, v), (k_ref, v_ref)) in enumerate(zip(cross, cross_ref)):
            rows.append((check, provider, cross_key(i), rel_error(k, k_ref)))
            rows.append((check, provider, cross_value(i), rel_error(v, v_ref)))
    B = tgt.shape[0]
    past = empty_cache(cfg, B, np.float32)
    past_ref = empty_cache(cfg, B, np.float64)
    prompt, step = tgt[:, :-1], tgt[:, -1:]
    for name, ids, positions, keep in (("prompt", prompt, tgt_positions[:, :-1], tgt_keep[:, :-1]),
                                       ("step", step, tgt_positions[:, -1:], tgt_keep)):
        logits, past = run_decoder(sessions[DECODER], cfg, dtype, ids, positions, keep, past, cross, src_keep)
        logits_ref, past_ref = decoder_step(cfg, params64, ids, positions, keep, past_ref, cross_ref,
                                           src_keep if cfg.is_encoder_decoder else None)
        real = keep[:, -ids.shape[1]:].astype(bool)[:, :, None]  # padding queries are not compared
        rows.append((check, provider, f"{LOGITS} ({name})", rel_error(logits * real, logits_ref * real)))
        for i, ((k, v), (k_ref, v_ref)) in enumerate(zip(past, past_ref)):
            rows.append((check, provider, f"{present_key(i)} ({name})", rel_error(k, k_ref)))
            rows.append((check, provider, f"{present_value(i)} ({name})", rel_error(v, v_ref)))
    return rows


def incremental_check(cfg, params64, sessions, dtype, provider, src, src_keep, cross, prompts, n_steps, rng):
    """Left-padded prompts (lists of token ids) of different lengths, then n_steps single-token steps of random ids
    (rng) through sessions["decoder"], its present cache fed back, against refimpl.model_forward over the whole
    (padded) sequence in float64. cross: encoder_cross's cache for src [B, S] (None for decoder-only). Returns one
    row ("incremental", provider, "logits (prompt + steps)", rel_error).

    Raises onnxruntime's own errors, and RefformerError (rel_error) for outputs of another shape; verify and
    export_checks run it inside onnx_runtime_errors, which makes each one RefformerError.
    """
    ids, keep, positions = left_pad(prompts, cfg.pad_id)
    B = ids.shape[0]
    n_steps = max(0, min(n_steps, cfg.max_positions - ids.shape[1]))  # positions stay below max_positions
    new = random_ids(cfg, rng, (B, n_steps))
    past = empty_cache(cfg, B, np.float32)
    logits, past = run_decoder(sessions[DECODER], cfg, dtype, ids, positions, keep, past, cross, src_keep)
    collected = [logits]
    for t in range(n_steps):
        keep = np.concatenate([keep, np.ones((B, 1), np.int64)], axis=1)
        step_positions = positions[:, -1:] + 1
        positions = np.concatenate([positions, step_positions], axis=1)
        logits, past = run_decoder(sessions[DECODER], cfg, dtype, new[:, t:t + 1], step_positions, keep, past, cross,
                                   src_keep)
        collected.append(logits)
    full_ids = np.concatenate([ids, new], axis=1)
    ref, _ = model_forward(cfg, params64, src if cfg.is_encoder_decoder else None, full_ids,
                           src_mask=src_keep if cfg.is_encoder_decoder else None, tgt_mask=keep,
                           tgt_positions=positions)
    got = np.concatenate(collected, axis=1)
    real = keep.astype(bool)[:, :, None]
    return [("incremental", provider, f"{LOGITS} (prompt + steps)", rel_error(got * real, ref * real))]


def random_ids(cfg, rng, size):
    """Random token ids (int64) of shape size; from 4 up (past the default special ids) when the vocabulary has
    room.

    Raises nothing: cfg is a checked Config (vocab_size >= 1).
    """
    return rng.integers(4 if cfg.vocab_size > 8 else 0, cfg.vocab_size, size)


def random_prompts(cfg, rng, limit=None):
    """Three random prompts, of lengths 1, 3 and 2 (left-padded by the checks), each cut to limit tokens (default:
    max_positions - 1, so that a model of 2 or 3 positions has room for a step).

    Raises nothing: cfg is a checked Config.
    """
    limit = max(1, (cfg.max_positions - 1) if limit is None else limit)
    return [list(random_ids(cfg, rng, n))[:limit] for n in (1, 3, 2)]


def random_inputs(cfg, rng, B=3, S=6, T=5):
    """Random inputs of compare_pass, all int64: src, src_keep [B, S] (rows of different source lengths, right-padded,
    each with one real token at least), tgt, tgt_keep, tgt_positions [B, T] (the last row left-padded by one); S and
    T cut to max_positions.

    Raises nothing: cfg is a checked Config.
    """
    S, T = min(S, cfg.max_positions), min(T, cfg.max_positions)
    src = random_ids(cfg, rng, (B, S))
    src_keep = np.ones((B, S), np.int64)
    for b in range(1, B):  # rows of different source lengths, each of one token at least (an empty source
        src_keep[b, max(1, S - b):] = 0  # is no input generate makes; its all-masked cross-attention is a corner case)
    src = np.where(src_keep == 1, src, cfg.fill_id)  # pad_id (else eos_id, else 0: the masks mark the padding)
    tgt = random_ids(cfg, rng, (B, T))
    tgt_keep = np.ones((B, T), np.int64)
    tgt_keep[-1, :1] = 0  # one left-padded target row
    tgt = np.where(tgt_keep == 1, tgt, cfg.fill_id)
    positions = left_padded_positions(tgt_keep)
    return src, src_keep, tgt, tgt_keep, positions


def load_sessions(cfg, onnx_dir, provider):
    """{"encoder"?, "decoder"}: sessions of the reference graphs in onnx_dir on the provider (make_session's
    errors).

    Raises RefformerError (make_session) for a graph that is missing or cannot be loaded.
    """
    return {name: make_session(Path(onnx_dir) / graph_file(name), provider)
            for name in reference_graphs(cfg.is_encoder_decoder)}


def as_dicts(rows):
    """(check, provider, output, error) rows -> dicts with those keys (error: rel_error, a float).

    Raises nothing.
    """
    return [{"check": c, "provider": p, "output": o, "error": e} for c, p, o, e in rows]


def export_checks(cfg, params, onnx_dir, dtype, graphs, seed=0):
    """What export records in the manifest: on ONNX Runtime CPU, the random-input rows and variant_checks' rows
    for the graphs (names without .onnx) of onnx_dir, as dicts (check, provider, output, error). Raises
    RefformerError (onnx_runtime_errors) for graphs ONNX Runtime cannot load or run."""
    provider = CPU_PROVIDER
    params64 = tree_cast(params, np.float64)
    with onnx_runtime_errors(onnx_dir):  # one line, never ONNX Runtime's traceback
        sessions = load_sessions(cfg, onnx_dir, provider)
        rows = compare_pass(cfg, params64, sessions, dtype, "random", provider,
                            *random_inputs(cfg, np.random.default_rng(seed)))
        return as_dicts(rows + variant_checks(cfg, params64, sessions, onnx_dir, dtype, provider, graphs, seed))


def verify(model_dir, onnx_dir=None, providers=None, seed=0):
    """All checks on every usable provider -> (rows, dtype). A row: dict(check, provider, output, error, bound, ok).

    onnx_dir defaults to find_export(model_dir) (fp32, or the only export set there is). The bound is the export
    set's dtype's (contract.ERROR_BOUNDS: fp32, fp16, int8); an int8 set runs on the CPU only (providers_for, which
    drops CUDA from providers, and refuses CUDA alone). Raises RefformerError for a
    negative seed, a model_dir or onnx_dir that is not a path, providers that are not a non-empty list of known
    providers, a model using options the graphs do not compute yet (contract.check_exportable), a missing, stale or
    damaged export (a file whose sha256 is not the manifest's: graphs of another
    model), graphs not quantized as the manifest says (check_quantization: an fp32 set relabelled int8, or the
    converse), weights with NaN or inf, or graphs ONNX Runtime cannot load or run."""
    from refformer.refimpl.io import TOKENIZER_FILE, WEIGHTS_FILE, load, load_config, load_tokenizer

    if not is_integer(seed) or seed < 0:
        raise RefformerError(f"seed must be an integer >= 0, got {seed!r}")  # (`refformer verify` checks --seed)
    check_path("model_dir", model_dir)
    if onnx_dir is not None:
        check_path("onnx_dir", onnx_dir)
    if providers is not None and (not isinstance(providers, (list, tuple)) or not providers
                                  or not all(provider in PROVIDERS for provider in providers)):
        raise RefformerError(f"providers must be a non-empty list of {' and '.join(PROVIDERS)}, got {providers!r}")
    if providers is not None and CUDA_PROVIDER in providers and not cuda_usable():  # before ONNX Runtime
        # prints its own banner of loader errors for each session
        raise RefformerError(f"{CUDA_MISSING}; use {CPU_PROVIDER}")
    model_dir = Path(model_dir)
    check_exportable(load_config(model_dir), ids=False)  # a model no graph computes yet is named, not sent to
    # `refformer export`
    onnx_dir = Path(onnx_dir) if onnx_dir is not None else find_export(model_dir)
    cfg, params = load(model_dir)
    check_weights(params, None, model_dir / WEIGHTS_FILE)
    manifest = read_manifest(onnx_dir)
    if is_stale(model_dir, manifest):
        raise RefformerError(f"{onnx_dir} was exported from a different config or weights: run `refformer export` "
                             "again")
    check_files(onnx_dir, manifest)
    for name in graph_files(cfg):
        check_external_data(onnx_dir / name)
    dtype = manifest["dtype"]  # one of contract.EXPORT_DTYPES, ERROR_BOUNDS' keys (read_manifest refuses others)
    check_quantization(onnx_dir, manifest)
    providers = providers_for(dtype, usable_providers() if providers is None else providers)
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


def check_quantization(onnx_dir, manifest):
    """The graphs of the export set in onnx_dir are quantized as its manifest says: for a quantized dtype
    (contract.QUANTIZED_DTYPES) a "quantization" entry whose method is the dtype and whose "graphs" are graphs of the
    set, every decoder among them (export.quantized_graph), each holding the method's quantized ops
    (quantize.signature_ops) and together the "ops_added" it records, and the other graphs none
    (quantize.QUANTIZED_OPS); for fp32 and fp16 no such entry and no graph holding a quantized op. The graphs are
    those the manifest's "graphs" names and every other .onnx file its "files" lists. Catches an fp32 set relabelled
    int8, whose graphs pass the int8 bound, and the converse. And every graph's float inputs and outputs (but
    logits, float32 in every set) are of the set's float type (contract.graph_dtype: float16 for fp16, float32 for
    fp32 and int8; quantize.graph_types): an fp32 set relabelled fp16, or the converse, was named only by ONNX
    Runtime's "Unexpected input data type" on the first run.
    manifest: read_manifest's, with a dtype in contract.ERROR_BOUNDS and files check_files has checked.

    Raises RefformerError (one line naming the file and what it holds) for a mismatch, and for a graph onnx cannot
    load.
    """
    dtype, quantization = manifest["dtype"], manifest.get("quantization")
    again = f"export the set again (`refformer export --dtype {dtype}`)"
    files = {name: Path(onnx_dir) / graph["file"] for name, graph in manifest["graphs"].items()}
    for name in manifest["files"]:  # a graph the "graphs" entry leaves out is checked too (as not quantized)
        if name.endswith(GRAPH_SUFFIX) and Path(onnx_dir) / name not in files.values():
            files.setdefault(name[:-len(GRAPH_SUFFIX)], Path(onnx_dir) / name)
    if dtype not in QUANTIZED_DTYPES:
        if quantization is not None:
            raise RefformerError(f"{onnx_dir}/manifest.json says dtype {dtype} but has a \"quantization\" entry: "
                                 f"{again}")
        quantized = {}
    else:
        listed = quantization.get("graphs") if isinstance(quantization, dict) else None
        if (not isinstance(listed, list) or not listed or not all(isinstance(name, str) for name in listed)
                or not isinstance(quantization.get("ops_added", []), list)
                or not all(isinstance(op, str) for op in quantization.get("ops_added", []))):
            raise RefformerError(f"{onnx_dir}/manifest.json says dtype {dtype} but has no \"quantization\" entry "
                                 f"naming its quantized graphs: {again}")
        if quantization.get("method") != dtype or not signature_ops(dtype):
            raise RefformerError(f"{onnx_dir}/manifest.json says dtype {dtype} but its quantization method is "
                                 f"{quantization.get('method')!r}: {again}")
        unknown = [name for name in listed if name not in files]
        if unknown:
            raise RefformerError(f"{onnx_dir}/manifest.json lists {', '.join(unknown)} as quantized, a graph the set "
                                 f"does not hold: {again}")
        quantized = dict.fromkeys(listed)
    ops_seen, float_types = set(), {}
    for name, path in files.items():
        ops, float_types[path] = graph_types(path)
        found = sorted(ops & QUANTIZED_OPS)
        if name not in quantized:
            if found:
                said = f"dtype {dtype}" if dtype not in QUANTIZED_DTYPES else f"{name} is not quantized"
                raise RefformerError(f"{path} holds quantized ops ({', '.join(found)}) but {onnx_dir}/manifest.json "
                                     f"says {said}: {again}")
            continue
        if not any(signature <= ops for signature in signature_ops(dtype)):
            wanted = " or ".join(" + ".join(sorted(signature)) for signature in signature_ops(dtype))
            raise RefformerError(f"{path} holds no {dtype} ops ({wanted}) but {onnx_dir}/manifest.json says it is "
                                 f"quantized ({dtype}): these are not {dtype} graphs; {again}")
        ops_seen |= ops
    unlisted = [name for name in files if quantized and graph_variant(name) is not None and name not in quantized]
    if unlisted:  # export quantizes every decoder (export.quantized_graph): one left out was swapped or edited
        raise RefformerError(f"{files[unlisted[0]]} holds no {dtype} ops and {onnx_dir}/manifest.json does not list "
                             f"{unlisted[0]} as quantized, but {dtype} sets quantize every decoder graph: {again}")
    missing = sorted(set(quantization.get("ops_added", [])) - ops_seen) if quantized else []
    if missing:
        raise RefformerError(f"the quantized graphs in {onnx_dir} hold none of {', '.join(missing)}, which "
                             f"manifest.json records as added by the {dtype} method: {again}")
    float_type = np.dtype(NUMPY_TYPES[graph_dtype(dtype)]).name  # after the ops: they name an int8 set better
    for path, floats in float_types.items():
        if floats - {float_type}:
            raise RefformerError(f"{path} takes or gives {' and '.join(sorted(floats))} tensors but {onnx_dir}/"
                                 f"manifest.json says dtype {dtype} ({float_type}): {again}")


def providers_for(dtype, providers):
    """The providers verify runs an export set of dtype (a manifest's) on: providers, less those a quantized set
    does not run on (contract.QUANTIZED_PROVIDERS: the CPU), as a list. Raises RefformerError when none is left (a
    quantized set asked to run on CUDA only)."""
    if dtype not in QUANTIZED_DTYPES:
        return list(providers)
    kept = [provider for provider in providers if provider in QUANTIZED_PROVIDERS]
    if not kept:
        raise RefformerError(f"{dtype} export sets run on {' and '.join(QUANTIZED_PROVIDERS)} only (they are not "
                             "checked on CUDA yet): verify them with --provider cpu")
    return kept


@contextlib.contextmanager
def onnx_runtime_errors(onnx_dir):
    """A context that turns ONNX Runtime's own exceptions (and a graph whose inputs or outputs are not this model's)
    while running the graphs of onnx_dir into one RefformerError saying to export again; raises it."""
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
                             f"{reason[:200]}); they may belong to another model: run `refformer export` "
                             "again") from None


def real_inputs(cfg, tokenizer):
    """compare_pass's inputs from REAL_SENTENCES tokenized by the model's tokenizer (German sources, eos-ended, and
    their bos-prefixed targets, or English text; no eos or bos where the model's id is null): src, src_keep [B, S]
    (right-padded), tgt, tgt_keep, tgt_positions [B, T] (left-padded), all int64. Raises RefformerError for a
    tokenizer that fails (refimpl's encode)."""
    texts = REAL_SENTENCES[cfg.family]
    from refformer.refimpl.training.tokenizer import encode  # a tokenizer that panics is one RefformerError, silently

    rows = [row[: cfg.max_positions - 2] for row in encode(tokenizer, list(texts))]
    eos, bos = [cfg.eos_id] if cfg.eos_id is not None else [], [cfg.bos_id] if cfg.bos_id is not None else []
    src_rows = [row + eos for row in rows]  # a model without eos or bos ids (null) gets the rows without them
    tgt_rows = [bos + row for row in rows]
    src, src_keep, _ = left_pad(src_rows, cfg.pad_id)
    # sources are right-padded like the random ones: move the padding to the end
    src = np.array([np.concatenate([r[k == 1], r[k == 0]]) for r, k in zip(src, src_keep)])
    src_keep = np.sort(src_keep, axis=1)[:, ::-1].copy()
    tgt, tgt_keep, tgt_positions = left_pad(tgt_rows, cfg.pad_id)
    return src, src_keep, tgt, tgt_keep, tgt_positions


def static_check(cfg, params64, sessions, onnx_dir, dtype, provider, seed=0, n_steps=4, graph=decoder_graph(STATIC)):
    """A static graph (decoder_static.onnx, or graph="decoder_static_mha" / "decoder_static_fused"), one token per
    call over left-padded prompts, against decoder.onnx (the reference graph) fed the same tokens, and against
    refimpl; next_ids must be the argmax of its logits. The check is named after the graph's variant ("static",
    "static_mha" or "static_fused"). Returns rows (check, provider, output, error); none when the prompts and
    steps do not fit the graph's L slots.

    Also RefformerError (make_session) when the graph cannot be loaded. Raises onnxruntime's own errors, and
    RefformerError (rel_error) for outputs of another shape; verify and export_checks run it inside onnx_runtime_errors,
    which makes each one RefformerError.
    """
    static = make_session(Path(onnx_dir) / graph_file(graph), provider)
    inputs = {i.name: i for i in static.get_inputs()}
    L = inputs[past_key(0)].shape[2]
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
    reference, _ = run_decoder(sessions[DECODER], cfg, dtype, ids, positions, keep, empty_cache(cfg, 3, np.float32),
                               cross, src_keep)
    zeros = np.zeros((3, cfg.n_kv_heads, L, cfg.head_dim), NUMPY_TYPES[graph_dtype(dtype)])
    caches = [(zeros, zeros) for _ in range(cfg.n_decoder_layers)]
    mask = np.zeros((3, L), np.int64)
    logits, argmax_ok = [], True
    for t in range(total):
        mask[:, t] = keep[:, t]
        feeds = {INPUT_IDS: ids[:, t:t + 1], POSITION_IDS: positions[:, t:t + 1],
                 WRITE_INDEX: np.array([t], np.int64), ATTENTION_MASK: mask}
        for i, (k, v) in enumerate(caches):
            feeds[past_key(i)], feeds[past_value(i)] = k, v
        if cfg.is_encoder_decoder:
            feeds[ENCODER_ATTENTION_MASK] = src_keep.astype(np.int64)
            for i, (k, v) in enumerate(cross):
                feeds[cross_key(i)], feeds[cross_value(i)] = k, v
        feeds = {name: value for name, value in feeds.items() if name in inputs}  # the fused graph has no mask inputs
        out = dict(zip([o.name for o in static.get_outputs()], static.run(None, feeds)))
        caches = [(out[present_key(i)], out[present_value(i)]) for i in range(cfg.n_decoder_layers)]
        logits.append(out[LOGITS])
        argmax_ok &= bool(np.array_equal(out[NEXT_IDS], out[LOGITS][:, -1].argmax(axis=-1)))
    got = np.concatenate(logits, axis=1)
    ref, _ = model_forward(cfg, params64, src if cfg.is_encoder_decoder else None, ids,
                           src_mask=src_keep if cfg.is_encoder_decoder else None, tgt_mask=keep,
                           tgt_positions=positions)
    real = keep.astype(bool)[:, :, None]
    check = graph_variant(graph)
    return [(check, provider, f"{LOGITS} vs {DECODER_FILE}", rel_error(got * real, reference * real)),
            (check, provider, f"{LOGITS} vs refimpl", rel_error(got * real, ref * real)),
            (check, provider, f"{NEXT_IDS} = argmax({LOGITS})", 0.0 if argmax_ok else float("inf"))]


def fused_check(cfg, params64, sessions, onnx_dir, dtype, provider, seed=0):
    """decoder_fused.onnx in place of decoder.onnx: the incremental check against refimpl, and its logits
    against decoder.onnx's on the same left-padded prompts and steps. Returns rows (check, provider, output,
    error).

    Also RefformerError (make_session) when decoder_fused.onnx cannot be loaded. Raises onnxruntime's own errors, and
    RefformerError (rel_error) for outputs of another shape; verify and export_checks run it inside onnx_runtime_errors,
    which makes each one RefformerError.
    """
    fused = dict(sessions, **{DECODER: make_session(Path(onnx_dir) / graph_file(decoder_graph(FUSED)), provider)})
    rng = np.random.default_rng(seed)
    src, src_keep = random_inputs(cfg, rng)[:2]
    _, cross = encoder_cross(cfg, sessions, src, src_keep)
    prompts = random_prompts(cfg, rng)
    rows = [(FUSED, provider, f"{LOGITS} vs refimpl (prompt + steps)",
             incremental_check(cfg, params64, fused, dtype, provider, src, src_keep, cross, prompts, 3,
                               np.random.default_rng(seed))[0][3])]
    ids, keep, positions = left_pad(prompts, cfg.pad_id)
    empty = empty_cache(cfg, len(prompts), np.float32)
    reference, _ = run_decoder(sessions[DECODER], cfg, dtype, ids, positions, keep, empty, cross, src_keep)
    got, _ = run_decoder(fused[DECODER], cfg, dtype, ids, positions, keep, empty, cross, src_keep)
    real = keep.astype(bool)[:, :, None]
    rows.append((FUSED, provider, f"{LOGITS} vs {DECODER_FILE} (prompt)", rel_error(got * real, reference * real)))
    return rows


def variant_checks(cfg, params64, sessions, onnx_dir, dtype, provider, graphs, seed=0):
    """The rows of the faster decoders among graphs (names without .onnx) that run on the provider: each
    decoder_static* by static_check, decoder_fused by fused_check (contract.runs_on decides what runs).

    Raises RefformerError (make_session) when a variant's graph is missing or cannot be loaded.
    """
    rows = []
    for graph in map(decoder_graph, STATIC_VARIANTS):
        if graph in graphs and runs_on(graph, dtype, provider):
            rows += static_check(cfg, params64, sessions, onnx_dir, dtype, provider, seed, graph=graph)
    if decoder_graph(FUSED) in graphs:
        rows += fused_check(cfg, params64, sessions, onnx_dir, dtype, provider, seed)
    return rows
