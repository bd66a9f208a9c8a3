"""The graph contract: every name the exported graphs, verify and the runtime agree on (docs/DESIGN.md, Graph contract).

One place for the graph files, the decoder variants, each graph input and output name, the dimension names of
their shapes, the dtypes, verify's error bounds, and the Config options the graphs compute (check_exportable,
which export and verify call first: issue 13's reference-only options are refused by name). The builders
(export/model.py, export/fused.py), verify and the runtime read these names; none of them spells a contract name
as a string literal.

Graphs and their inputs/outputs (B batch, S source length, T new tokens, P past length, L static cache length,
H heads (the caches' H is the key/value heads Hkv = n_kv_heads: grouped-query attention), Dh head size (head_dim),
D model width, V vocabulary; float = the export's dtype, float32 or float16):

  encoder.onnx (encoder-decoder only)
    in   input_ids [B, S] int64, attention_mask [B, S] int64 (1 = real token)
    out  encoder_hidden_states [B, S, D] float, cross_key_{i}, cross_value_{i} [B, H, S, Dh] float per decoder layer
  decoder.onnx (variant "reference"), decoder_fused.onnx ("fused"): the growing cache
    in   input_ids, position_ids [B, T] int64, attention_mask [B, P + T] int64,
         past_key_self_{i}, past_value_self_{i} [B, H, P, Dh] float
         (+ encoder_attention_mask [B, S] int64, cross_key_{i}, cross_value_{i} [B, H, S, Dh] float)
    out  logits [B, T, V] float32, present_key_self_{i}, present_value_self_{i} [B, H, P + T, Dh] float
  decoder_static.onnx ("static"), decoder_static_mha.onnx ("static_mha"): one token per row over L slots
    in   input_ids, position_ids [B, 1] int64, write_index [1] int64, attention_mask [B, L] int64,
         past_key_self_{i}, past_value_self_{i} [B, H, L, Dh] float (+ the encoder-decoder inputs above)
    out  logits [B, 1, V] float32, next_ids [B] int64, present_key_self_{i}, present_value_self_{i} [B, H, L, Dh]
  decoder_static_fused.onnx ("static_fused"): decoder_static.onnx without write_index and attention_mask (the
    slot of a row's token is its position_ids)
"""

import json

from refformer.refimpl.errors import RefformerError

# ---------------------------------------------------------------------------- graphs and variants

ENCODER = "encoder"  # graph names: the file is NAME.onnx, the manifest's "graphs" key is NAME
DECODER = "decoder"
GRAPH_SUFFIX = ".onnx"
GRAPH_NAME_PREFIX = "refformer_"  # the ONNX GraphProto's name: refformer_encoder, refformer_decoder_static, ...

REFERENCE, FUSED, STATIC, STATIC_MHA, STATIC_FUSED = "reference", "fused", "static", "static_mha", "static_fused"
VARIANTS = (REFERENCE, FUSED, STATIC, STATIC_MHA, STATIC_FUSED)  # the decoder graphs an export may hold
STATIC_VARIANTS = (STATIC, STATIC_MHA, STATIC_FUSED)  # one token per call over a fixed-size cache
VARIANT_OPTIONS = ("auto", *VARIANTS)  # Generator(variant=) and generate --variant: a variant, or auto (auto_variant)


def decoder_graph(variant):
    """The graph name of a decoder variant: "reference" -> "decoder", "static_mha" -> "decoder_static_mha".

    Raises ValueError for a name not in VARIANTS (a programming error: callers check user input first)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    return DECODER if variant == REFERENCE else f"{DECODER}_{variant}"


def graph_variant(graph):
    """The variant of a decoder graph name: "decoder" -> "reference", "decoder_static" -> "static"; the encoder
    and unknown names -> None.

    Raises nothing: a string comparison (an unknown name gives None).
    """
    for variant in VARIANTS:
        if decoder_graph(variant) == graph:
            return variant
    return None


def graph_file(graph):
    """The file of a graph name: "decoder_fused" -> "decoder_fused.onnx".

    Raises nothing: string concatenation.
    """
    return graph + GRAPH_SUFFIX


ENCODER_FILE = graph_file(ENCODER)
DECODER_FILE = graph_file(DECODER)


def reference_graphs(is_encoder_decoder):
    """The graph names every export holds: ["encoder", "decoder"] (encoder-decoder) or ["decoder"].

    Raises nothing: it reads one flag.
    """
    return [ENCODER, DECODER] if is_encoder_decoder else [DECODER]


def gqa_supported(head_dim):
    """Whether ONNX Runtime's GroupQueryAttention (decoder_static_fused) takes this head size Dh, an int: its
    kernels need a multiple of 8.

    Raises nothing: a remainder.
    """
    return head_dim % 8 == 0


def exported_variants(cfg, static_length=None, fused_attention=False):
    """The variants beyond "reference" that an export of the checked Config cfg with these options writes, in the
    order export builds them: static with static_length; with fused_attention, each contrib-op variant asked for
    that computes cfg's model (variant_unsupported_features(cfg, variant) empty): fused; static_mha and
    static_fused with static_length too, static_fused when the head size is one GroupQueryAttention takes
    (gqa_supported).

    Raises nothing: export_model checked the options first (check_variants_exportable).
    """
    static, both = static_length is not None, static_length is not None and fused_attention
    wanted = ((STATIC, static), (FUSED, fused_attention), (STATIC_MHA, both),
              (STATIC_FUSED, both and gqa_supported(cfg.head_dim)))
    return [variant for variant, asked in wanted
            if asked and (variant == STATIC or not variant_unsupported_features(cfg, variant))]


def runs_on(graph, dtype, provider):
    """Whether ONNX Runtime has kernels for the graph name here: GroupQueryAttention (decoder_static_fused) runs on
    the CPU in fp32 and fp16, on CUDA only in fp16.

    Raises nothing: a comparison.
    """
    return not (graph == decoder_graph(STATIC_FUSED) and provider == CUDA_PROVIDER and dtype == "fp32")


def check_runs_on(graph, dtype, provider):
    """Raises RefformerError, one line, when runs_on(graph, dtype, provider) is false (decoder_static_fused in fp32
    on CUDA, where ONNX Runtime would run its GroupQueryAttention nodes on the CPU, copying every step, and refuse
    CUDA-graph capture): checked before any export or session (Generator.make_stepper, OrtStepper).
    """
    if not runs_on(graph, dtype, provider):
        raise RefformerError(no_kernels_message(graph, dtype, provider))


def no_kernels_message(graph, dtype, provider):
    """check_runs_on's and variant_refusal's one line for a graph runs_on refuses. Raises nothing."""
    return (f"{graph_file(graph)} has no {dtype} kernels on {provider} (GroupQueryAttention runs in fp16 only on "
            "CUDA): use fp16, or the static variant (it computes every model)")


def variant_refusal(cfg, variant, dtype, provider):
    """Why the decoder variant (one of VARIANTS) cannot run the checked Config cfg's model in dtype ("fp32", "fp16";
    a quantized dtype is its graph_dtype) on provider (CPU_PROVIDER or CUDA_PROVIDER), as one line naming what to use
    instead, or None when it can: static_fused needs a head size GroupQueryAttention takes (gqa_supported), the
    variant must compute every feature of the model (variant_unsupported_features) and have kernels there (runs_on).
    Generator.make_stepper raises it before any export.

    Raises nothing: comparisons.
    """
    if variant == STATIC_FUSED and not gqa_supported(cfg.head_dim):
        return (f"the static_fused variant needs a head size that is a multiple of 8 (ONNX Runtime's "
                f"GroupQueryAttention); this model's is {cfg.head_dim}: use the static variant (it computes every "
                "model)")
    missing = variant_unsupported_features(cfg, variant)
    if missing:
        return (f"the {variant} decoder does not support yet: {', '.join(missing)}; use the reference or static "
                "variant (they compute every option)")
    if not runs_on(decoder_graph(variant), graph_dtype(dtype), provider):
        return no_kernels_message(decoder_graph(variant), graph_dtype(dtype), provider)
    return None


def variant_runs(cfg, variant, dtype, provider):
    """Whether the decoder variant computes cfg's model with kernels for dtype on provider (variant_refusal is None):
    what Generator(variant="auto") may try (runtime/generator.py auto_variant); a variant that fails this never loads.

    Raises nothing: comparisons.
    """
    return variant_refusal(cfg, variant, dtype, provider) is None


# ---------------------------------------------------------------------------- inputs and outputs

INPUT_IDS = "input_ids"  # int64 token ids
ATTENTION_MASK = "attention_mask"  # int64, 1 = a real token (encoder: [B, S]; decoder: [B, P + T] or [B, L])
POSITION_IDS = "position_ids"  # int64 [B, T]: left-padded rows count from their first real token
WRITE_INDEX = "write_index"  # int64 [1]: the static cache slot this call writes
ENCODER_ATTENTION_MASK = "encoder_attention_mask"  # int64 [B, S]: the decoder's view of the source padding
ENCODER_HIDDEN_STATES = "encoder_hidden_states"  # float [B, S, D]
LOGITS = "logits"  # float32 [B, T, V] (float32 in fp16 graphs too)
NEXT_IDS = "next_ids"  # int64 [B]: the static graphs' in-graph argmax of the last logits

PAST_KEY = "past_key_self_{}"  # name patterns of layer i: PAST_KEY.format(i), or the functions below
PAST_VALUE = "past_value_self_{}"
PRESENT_KEY = "present_key_self_{}"
PRESENT_VALUE = "present_value_self_{}"
CROSS_KEY = "cross_key_{}"
CROSS_VALUE = "cross_value_{}"


def past_key(i):
    """Input: the self-attention keys of decoder layer i before this call, float [B, H, P (or L), Dh].

    i: the layer index, an int. Raises nothing: string formatting.
    """
    return PAST_KEY.format(i)


def past_value(i):
    """Input: the self-attention values of decoder layer i before this call, float [B, H, P (or L), Dh].

    i: the layer index, an int. Raises nothing: string formatting.
    """
    return PAST_VALUE.format(i)


def present_key(i):
    """Output: the self-attention keys of decoder layer i after this call, float [B, H, P + T (or L), Dh].

    i: the layer index, an int. Raises nothing: string formatting.
    """
    return PRESENT_KEY.format(i)


def present_value(i):
    """Output: the self-attention values of decoder layer i after this call, float [B, H, P + T (or L), Dh].

    i: the layer index, an int. Raises nothing: string formatting.
    """
    return PRESENT_VALUE.format(i)


def cross_key(i):
    """Encoder output and decoder input: decoder layer i's cross-attention keys, float [B, H, S, Dh].

    i: the layer index, an int. Raises nothing: string formatting.
    """
    return CROSS_KEY.format(i)


def cross_value(i):
    """Encoder output and decoder input: decoder layer i's cross-attention values, float [B, H, S, Dh].

    i: the layer index, an int. Raises nothing: string formatting.
    """
    return CROSS_VALUE.format(i)


# dimension names of the graphs' symbolic axes
BATCH = "batch"
SOURCE_LENGTH = "source_length"
NEW_LENGTH = "new_length"
PAST_LENGTH = "past_length"
TOTAL_LENGTH = "total_length"

# ---------------------------------------------------------------------------- the graphs' signatures

FLOAT = "float"  # element types in signatures: FLOAT is the export's dtype (float32 for fp32, float16 for fp16)
FLOAT32 = "float32"
INT64 = "int64"


def encoder_signature(cfg):
    """(inputs, outputs) of encoder.onnx, each a list of (name, element type, shape) in the graph's order; shapes
    hold ints and the axis names above. cfg: the model's Config (n_kv_heads, head_dim, d_model, n_decoder_layers).

    Raises nothing: cfg is a checked Config.
    """
    cross_shape = [BATCH, cfg.n_kv_heads, SOURCE_LENGTH, cfg.head_dim]
    inputs = [(INPUT_IDS, INT64, [BATCH, SOURCE_LENGTH]), (ATTENTION_MASK, INT64, [BATCH, SOURCE_LENGTH])]
    outputs = [(ENCODER_HIDDEN_STATES, FLOAT, [BATCH, SOURCE_LENGTH, cfg.d_model])]
    for i in range(cfg.n_decoder_layers):
        outputs += [(cross_key(i), FLOAT, cross_shape), (cross_value(i), FLOAT, cross_shape)]
    return inputs, outputs


def decoder_signature(cfg, variant=REFERENCE, max_length=None):
    """(inputs, outputs) of the decoder graph of a variant, each a list of (name, element type, shape) in the
    graph's order. The static variants take one token per row over max_length = L cache slots (required for them)
    and output next_ids; static_fused has no write_index or attention_mask (a token's slot is its position).
    Raises ValueError for an unknown variant, or a static one without max_length."""
    decoder_graph(variant)  # the variant is known
    static = variant in STATIC_VARIANTS
    if static and max_length is None:
        raise ValueError(f"the {variant} decoder needs max_length (its cache slots)")
    new, cache = (1, max_length) if static else (NEW_LENGTH, PAST_LENGTH)
    inputs = [(INPUT_IDS, INT64, [BATCH, new]), (POSITION_IDS, INT64, [BATCH, new])]
    if not static:
        inputs.append((ATTENTION_MASK, INT64, [BATCH, TOTAL_LENGTH]))
    elif variant != STATIC_FUSED:
        inputs += [(WRITE_INDEX, INT64, [1]), (ATTENTION_MASK, INT64, [BATCH, max_length])]
    past_shape = [BATCH, cfg.n_kv_heads, cache, cfg.head_dim]
    for i in range(cfg.n_decoder_layers):
        inputs += [(past_key(i), FLOAT, past_shape), (past_value(i), FLOAT, past_shape)]
    if cfg.is_encoder_decoder:
        inputs.append((ENCODER_ATTENTION_MASK, INT64, [BATCH, SOURCE_LENGTH]))
        cross_shape = [BATCH, cfg.n_kv_heads, SOURCE_LENGTH, cfg.head_dim]
        for i in range(cfg.n_decoder_layers):
            inputs += [(cross_key(i), FLOAT, cross_shape), (cross_value(i), FLOAT, cross_shape)]
    outputs = [(LOGITS, FLOAT32, [BATCH, new, cfg.vocab_size])] + ([(NEXT_IDS, INT64, [BATCH])] if static else [])
    present_shape = [BATCH, cfg.n_kv_heads, max_length if static else TOTAL_LENGTH, cfg.head_dim]
    for i in range(cfg.n_decoder_layers):
        outputs += [(present_key(i), FLOAT, present_shape), (present_value(i), FLOAT, present_shape)]
    return inputs, outputs


# ---------------------------------------------------------------------------- dtypes, opset, bounds, providers

DTYPES = ("fp32", "fp16")  # the float type of a graph's weights, activations and caches (logits stay float32)
FP32, FP16 = DTYPES
INT8 = "int8"
QUANTIZED_DTYPES = {INT8: FP32}  # a quantized export set's dtype -> the float type of its graphs' inputs, outputs and
# caches: the graphs of that type it is quantized from (export/quantize.py's method of the same name)
EXPORT_DTYPES = (*DTYPES, *QUANTIZED_DTYPES)  # what export, verify, generate and eval --dtype take
MIN_OPSET = 17  # LayerNormalization
DEFAULT_OPSET = 17
ERROR_BOUNDS = {"fp32": 1e-5, "fp16": 1e-2,  # verify: largest rel_error of a graph output against refimpl in float64
                "int8": 1e-1}  # measured (issue 15: quantize's int8 as of 69d8835, ONNX Runtime's dynamic int8
# MatMul, in the decoders; the encoder fp32): worst verify row 2.0e-2 on the bundled model (every variant), 2.8e-2 on
# 24 tiny init_params models (test_export's four kinds, D 16 and 32, seeds 0-2) and 2.2e-2 on the Marian-base shape of
# benchmarks/generate_cpu.py (MatMulNBits 8-bit blocks of 32: 1.5e-2, 2.2e-2, 1.5e-2); models whose every weight carries
# +0.3 noise (test_features' save_random_model) reach 0.20, and their int8 export is refused

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
PROVIDERS = (CPU_PROVIDER, CUDA_PROVIDER)  # the ONNX Runtime execution providers refformer runs on
QUANTIZED_PROVIDERS = (CPU_PROVIDER,)  # where quantized sets run: the CPU, the only provider they were checked on;
# ONNX Runtime 1.31's CUDA library has no DynamicQuantizeLinear kernel and MatMulInteger for int8 x int8 only (its
# kernel names), where quantize's dynamic int8 graphs take uint8 activations (its MatMulNBits alternative has kernels)


def graph_dtype(dtype):
    """The float type ("fp32" or "fp16") of the inputs, outputs and caches of an export set of dtype (one of
    EXPORT_DTYPES): fp32 and fp16 are their own, a quantized set's is its source graphs' (QUANTIZED_DTYPES).

    Raises nothing: a name not in QUANTIZED_DTYPES is returned as it is.
    """
    return QUANTIZED_DTYPES.get(dtype, dtype)


# ---------------------------------------------------------------------------- what the graphs compute

EXPORTED_POSITIONALS = ("sinusoidal", "learned", "none", "relative", "rotary")  # what the reference graphs compute
MAX_RELATIVE_DISTANCE = 1 << 16  # the relative bias's bucket table: 2 M + 1 entries (relative_bucket_table)
NEEDED_IDS = ("pad_id", "bos_id", "eos_id")  # the runtime's prompts, padding and stop token (export and verify use
# cfg.fill_id and leave a null bos or eos out)


def show_option(name, value):
    """An option as config.json spells it: show_option("positional", "rotary") -> 'positional="rotary"'.

    Raises nothing: value is a Config field (JSON-serializable).
    """
    return f"{name}={json.dumps(value)}"


def unsupported_features(cfg, ids=True):
    """The Config options of cfg that refformer's graphs cannot serve (empty when they can), each spelled as
    config.json has it: ['pad_id=null']. The reference graphs compute every option of issue 13 (positions
    sinusoidal, learned with any offset, none, relative or rotary; grouped-query attention, any head_dim and
    attention_scale; biases on or off; gated or ungated feed-forward; the embedding norm; any head_scale), and export
    and verify take null special ids; with ids=True (the runtime's generate) a null pad, bos or eos id is listed too,
    as the runtime's prompts, padding and stop test read them. A relative_max_distance above MAX_RELATIVE_DISTANCE
    (T5's is 128) is listed: the graphs hold T5's bucket of every distance up to it. Raises nothing (cfg is a checked
    Config).
    """
    found = [show_option("positional", cfg.positional)] if cfg.positional not in EXPORTED_POSITIONALS else []
    if cfg.positional == "relative" and cfg.relative_max_distance > MAX_RELATIVE_DISTANCE:
        found.append(show_option("relative_max_distance", cfg.relative_max_distance))
    return found + [show_option(name, None) for name in NEEDED_IDS if ids and getattr(cfg, name) is None]


def check_exportable(cfg, ids=True):
    """Raises RefformerError, one line naming them, when cfg uses options refformer's graphs do not serve yet
    (unsupported_features(cfg, ids)): no graph of another function is ever built. export_model and verify call it
    first with ids=False (they take null special ids); the runtime calls it with ids=True. Raises nothing
    otherwise."""
    found = unsupported_features(cfg, ids)
    if found:
        raise RefformerError(f"export does not support yet: {', '.join(found)} (refformer's ONNX graphs compute "
                             "every model option, and generate needs a pad, bos and eos id); the reference "
                             "(model_forward, golden) does")


def reference_only_features(cfg):
    """The Config options of cfg that the standard-op graphs (decoder.onnx, decoder_static.onnx: the same builders)
    compute but the MultiHeadAttention variants (fused, static_mha: export's --fused-attention) do not yet, spelled as
    unsupported_features spells them; empty when they compute cfg's model. Those variants share the reference's
    embedding and head builders (positions none or with an offset, the embedding norm, head_scale); their attention
    (MultiHeadAttention: as many key/value heads as query heads, positions outside attention) has n_kv_heads =
    n_heads and no rotary or relative positions. Raises nothing (cfg is a checked Config).
    """
    found = []
    if cfg.n_kv_heads != cfg.n_heads:
        found.append(show_option("n_kv_heads", cfg.n_kv_heads))
    if cfg.positional in ("relative", "rotary"):
        found.append(show_option("positional", cfg.positional))
    return found


def variant_unsupported_features(cfg, variant):
    """The Config options of cfg that the contrib-op variant (FUSED, STATIC_MHA or STATIC_FUSED) does not compute
    yet, spelled as unsupported_features spells them; empty when it computes cfg's model (the standard-op variants,
    reference and static, compute every option: empty).

    fused, static_mha: reference_only_features (MultiHeadAttention). static_fused: GroupQueryAttention takes
    kv_num_heads < num_heads, rotary (do_rotary over cos/sin caches, rotate-half layout), any head_dim and the
    scale; it cannot add T5's relative bias (positional="relative"), and an encoder-decoder's cross-attention
    (MultiHeadAttention) needs n_kv_heads = n_heads. Its head size must be a multiple of 8 (gqa_supported, checked
    apart), and of 16 with rotary (ONNX Runtime 1.31's CPU kernel refuses others: "head_size shall be a multiple of
    16"). Raises nothing (cfg is a checked Config).
    """
    if variant in (REFERENCE, STATIC):
        return []
    if variant != STATIC_FUSED:
        return reference_only_features(cfg)
    found = []
    if cfg.is_encoder_decoder and cfg.n_kv_heads != cfg.n_heads:
        found.append(show_option("n_kv_heads", cfg.n_kv_heads))
    if cfg.positional == "relative":
        found.append(show_option("positional", cfg.positional))
    if cfg.positional == "rotary" and cfg.head_dim % 16:
        found.append(show_option("head_dim", cfg.head_dim))
    return found


def check_variants_exportable(cfg, static_length=None, fused_attention=False):
    """Raises RefformerError, one line naming them, when an export asks for the contrib-op variants
    (fused_attention) of a model that none of the asked ones computes (exported_variants writes those that do;
    variant_unsupported_features); export_model calls it before any work. decoder_static.onnx (static_length alone)
    computes every option. Raises nothing otherwise."""
    if not fused_attention or set(exported_variants(cfg, static_length, True)) - {STATIC}:
        return
    found = reference_only_features(cfg)
    gqa = "" if static_length is None else (
        f" (decoder_static_fused.onnx does not either: "
        f"{', '.join(variant_unsupported_features(cfg, STATIC_FUSED)) or 'head_dim=' + str(cfg.head_dim)}"
        f"{'' if gqa_supported(cfg.head_dim) else ', GroupQueryAttention needs a head size that is a multiple of 8'})")
    raise RefformerError(f"the fused decoders (--fused-attention) do not support yet: {', '.join(found)}; export "
                         "without --fused-attention (the reference graphs and --static-length's "
                         f"decoder_static.onnx compute them){gqa}")
