"""ONNX twin of refimpl/model.py: the embeddings, the LM head and the whole graphs of the graph contract
(export/contract.py, docs/DESIGN.md "Graph contract"): encoder.onnx and the decoder variants.

Every decoder graph is the same stack, embed ─ layers.decoder_layers ─ final norm ─ lm_head; the variants differ
only in the attention and cache pieces they give layers.decoder_layer (and, for the static fused graphs, in the
fused residual and feed-forward of export/fused.py):

  variant       self-attention                   cross-attention                     cache
  reference     attention.cached_self_attention  attention.mha_cached                growing (Concat)
  fused         fused.mha_self_attention         fused.mha_cross_attention           growing (MultiHeadAttention)
  static        attention.cached_self_attention  attention.mha_cached                L slots (Where at write_index)
  static_mha    fused.mha_static_self_attention  fused.mha_cross_attention_unbiased  L slots (Where at write_index)
  static_fused  fused.gqa_self_attention         fused.mha_cross_attention_unbiased  L slots (in place at position)

The inputs and outputs of every graph, their order, shapes and element types come from contract.encoder_signature
and contract.decoder_signature.
"""

import math
from functools import partial

import numpy as np
from onnx import TensorProto

from refformer.refimpl.model import lm_head_params, source_embedding
from refformer.refimpl.ops import sinusoidal_table

from . import contract
from .attention import (
    cached_self_attention,
    causal_padding_mask,
    mha_cached,
    padding_mask,
    project_kv,
    relative_position_bias,
    rotary_tables,
    sequence_indices,
    write_cache,
    write_slot_mask,
)
from .contract import (
    ATTENTION_MASK,
    DECODER,
    DEFAULT_OPSET,
    ENCODER,
    ENCODER_ATTENTION_MASK,
    ENCODER_HIDDEN_STATES,
    FP16,
    FP32,
    FUSED,
    GRAPH_NAME_PREFIX,
    INPUT_IDS,
    LOGITS,
    NEXT_IDS,
    POSITION_IDS,
    REFERENCE,
    STATIC,
    STATIC_FUSED,
    STATIC_MHA,
    VARIANTS,
    WRITE_INDEX,
    cross_key,
    cross_value,
    decoder_graph,
    decoder_signature,
    encoder_signature,
    past_key,
    past_value,
    present_key,
    present_value,
)
from .fused import (
    ResidualStream,
    feed_forward_unbiased,
    gqa_rotary_caches,
    gqa_self_attention,
    mha_cross_attention,
    mha_cross_attention_unbiased,
    mha_self_attention,
    mha_static_self_attention,
    stream_residual,
)
from .graph import Graph, node_path
from .layers import decoder_layers, encoder_layer
from .ops import embedding, linear, norm, scalar

ELEM_TYPES = {contract.INT64: TensorProto.INT64, contract.FLOAT32: TensorProto.FLOAT}  # else: the graph's float

# ---------------------------------------------------------------------------- embeddings and head


def embed(g, cfg, prefix, p_tokens_name, p_tokens, p_stack, ids, positions):
    """Twin of refimpl.model.embed_forward (inference): x = norm?(E[ids] * sqrt(D)? + pos[positions]?).
    ids, positions [B, T] int64 -> x [B, T, D]. p_tokens_name: the token table's checkpoint name (the encoder reads
    the decoder's when share_embeddings); p_stack: the stack's parameters (its learned position table, its
    embed_norm). The position term: the sinusoidal table, the learned table at row position + position_offset, or
    none (positional "none", and "relative" / "rotary", whose positions act inside attention).

    ids ──Gather(E)──Mul(sqrt D)──┐
    positions ─Add(offset)─Gather(pos)─Add──norm(embed_norm)──▶ x

    x in g's float type. No checks: reached only through export_model, which loads a checked cfg and params.
    """
    at = node_path(prefix) + "/embed"
    x = embedding(g, f"{p_tokens_name}.weight", p_tokens["weight"], ids, at, "GatherTokens")
    if cfg.embed_scale:
        x = g.op("Mul", [x, scalar(g, math.sqrt(cfg.d_model), "embed_scale")], at)
    if cfg.positional == "learned":
        name, table = f"{prefix}.embed_positions.weight", p_stack["embed_positions"]["weight"]
        if cfg.position_offset:
            positions = g.op("Add", [positions, g.const(cfg.position_offset, "position_offset")], at)
    elif cfg.positional == "sinusoidal":
        name, table = f"{prefix}.sinusoidal_positions", sinusoidal_table(cfg.max_positions, cfg.d_model)
    if cfg.positional in ("learned", "sinusoidal"):
        x = g.op("Add", [x, embedding(g, name, table, positions, at, "GatherPositions")], at)
    if cfg.embed_norm:
        x = norm(g, cfg, f"{prefix}.embed_norm", p_stack["embed_norm"], x)
    return x


def lm_head(g, cfg, params, x):
    """Twin of refimpl.model.head_forward, linear_forward(lm_head_params(cfg, params), hidden * head_scale): x
    [B, T, D] -> logits [B, T, V] in float32 even in fp16 graphs (the hidden state is cast up and the head kept in
    float32; the Mul by head_scale, in float32, only when it is not 1).

    A tied head reads the decoder's token table (Transpose of the [V, D] initializer).

    No checks: reached only through export_model, which loads a checked cfg and params.
    """
    head = lm_head_params(cfg, params)
    x32 = g.to_float32(x, "/lm_head", "CastHidden")
    if cfg.head_scale != 1.0:
        x32 = g.op("Mul", [x32, g.const(cfg.head_scale, "head_scale", np.float32)], "/lm_head", name="HeadScale")
    if cfg.tie_embeddings:
        table = params["decoder"]["embed_tokens"]["weight"]
        if g.dtype == FP32:
            weight = g.op("Transpose", [g.weight("decoder.embed_tokens.weight", table)], "/lm_head", perm=[1, 0])
        else:  # the fp16 graph holds the table in fp16 for the Gather; the head needs it in fp32
            weight = g.weight("lm_head.weight_from_embed_tokens", table.T, dtype=np.float32)
        logits = g.op("MatMul", [x32, weight], "/lm_head")
        if "bias" in head:
            logits = g.op("Add", [logits, g.weight("lm_head.bias", head["bias"], dtype=np.float32)], "/lm_head")
        return logits
    fp32_head = {name: value.astype(np.float32) for name, value in head.items()}
    for name, value in fp32_head.items():  # registered in float32 first: linear's g.weight then reuses them
        g.weight(f"lm_head.{name}", value, dtype=np.float32)
    return linear(g, "lm_head", fp32_head, x32)


def stack_positions(g, cfg, prefix, p_stack, positions, query_index, key_index, *, bidirectional):
    """Twin of refimpl.model's _self_attention_positions: the position inputs every self-attention layer of a stack
    shares, computed once: {"rotary": (cos, sin) [B, 1, T, Dh] of positions [B, T] (positional "rotary") or None,
    "position_bias": float32 [1, H, T, S] from the stack's relative_attention_bias table at the query and key
    indices [T], [S] (positional "relative"; bidirectional in the encoder, causal in the decoder) or None}.

    No checks: reached only through export_model, which loads a checked cfg and params.
    """
    at = node_path(prefix) + "/positions"
    rotary = rotary_tables(g, cfg, positions, at + "/rotary") if cfg.positional == "rotary" else None
    bias = None
    if cfg.positional == "relative":
        bias = relative_position_bias(g, cfg, f"{prefix}.relative_attention_bias.weight",
                                      p_stack["relative_attention_bias"]["weight"], query_index, key_index,
                                      bidirectional=bidirectional, at=at + "/relative")
    return {"rotary": rotary, "position_bias": bias}


# ---------------------------------------------------------------------------- encoder.onnx


def build_encoder(cfg, params, dtype=FP32, opset=DEFAULT_OPSET):
    """encoder.onnx, twin of refimpl.model.encode: input_ids, attention_mask [B, S] int64 -> encoder_hidden_states
    [B, S, D] and, for every decoder layer i, cross_key_{i}, cross_value_{i} [B, H, S, Dh] (computed once per input).
    dtype "fp32" or "fp16" (the float type of weights and outputs). Returns the onnx.ModelProto.

    input_ids ─embed─[encoder_layer × N]─final_norm─▶ encoder_hidden_states
        ─k_proj/v_proj of each decoder layer─▶ cross_*

    Raises KeyError for a dtype other than fp32/fp16 and onnx's InferenceError (Graph.model) for a graph whose shapes do
    not check; no other checks: export_model loads a checked cfg and params.
    """
    g = Graph(GRAPH_NAME_PREFIX + ENCODER, dtype, opset)
    inputs, outputs = encoder_signature(cfg)
    declare_inputs(g, inputs)
    ids, keep = INPUT_IDS, ATTENTION_MASK
    p = params["encoder"]
    table_name = "decoder.embed_tokens" if cfg.share_embeddings else "encoder.embed_tokens"
    table = source_embedding(cfg, params)
    # positions 0 .. S-1 for every row, as refimpl.encode
    at = "/encoder/positions"
    length = g.op("Gather", [g.op("Shape", [ids], at), g.const(1, "one_index")], at)
    positions = g.op("Range", [g.const(0, "zero"), length, g.const(1, "one")], at)
    index = positions
    positions = g.op("Expand", [positions, g.op("Shape", [ids], at, name="ShapeIds")], at)
    x = embed(g, cfg, "encoder", table_name, table, p, ids, positions)
    mask = padding_mask(g, keep, "/encoder/mask")  # [B, 1, 1, S]
    stack = stack_positions(g, cfg, "encoder", p, positions, index, index, bidirectional=True)
    for i, p_layer in enumerate(p["layers"]):
        x = encoder_layer(g, cfg, f"encoder.layers.{i}", p_layer, x, mask, **stack)
    if cfg.final_norm:
        x = norm(g, cfg, "encoder.final_norm", p["final_norm"], x)
    sources = {ENCODER_HIDDEN_STATES: x}
    for i, p_layer in enumerate(params["decoder"]["layers"]):
        sources[cross_key(i)], sources[cross_value(i)] = project_kv(g, cfg, f"decoder.layers.{i}.cross_attn",
                                                                    p_layer["cross_attn"], x)
    declare_outputs(g, outputs, sources)
    return g.model()


# ---------------------------------------------------------------------------- the decoders


def declare_inputs(g, inputs):
    """The graph inputs of a contract signature (contract.encoder_signature / decoder_signature), in its order.

    Float inputs take g's float type. No checks: reached only through export_model, which loads a checked cfg and
    params.
    """
    for name, elem_type, shape in inputs:
        g.input(name, ELEM_TYPES.get(elem_type, g.float_type), shape)


def declare_outputs(g, outputs, sources):
    """The graph outputs of a contract signature, in its order; sources: {contract name: node output}.

    Float outputs take g's float type. No checks: reached only through export_model, which loads a checked cfg and
    params. (KeyError for a name missing from sources)
    """
    for name, elem_type, shape in outputs:
        g.output(sources[name], name, ELEM_TYPES.get(elem_type, g.float_type), shape)


def cache_inputs(g, cfg, bool_mask=True):
    """The decoder's cache inputs (declared by declare_inputs): past_key/value_self_{i}, and for encoder-decoder
    cross_key/value_{i} [B, H, S, Dh] and encoder_attention_mask [B, S], made a bool [B, 1, 1, S] mask (or int32
    [B, S] for the contrib ops when bool_mask is False).
    Returns (past [(k, v)], cross [(k, v)] or [(None, None)], the source mask or None), one pair per layer.

    Caches in g's float type. No checks: reached only through export_model, which loads a checked cfg and params.
    """
    past = [(past_key(i), past_value(i)) for i in range(cfg.n_decoder_layers)]
    cross, memory_mask = [(None, None)] * cfg.n_decoder_layers, None
    if cfg.is_encoder_decoder:
        cross = [(cross_key(i), cross_value(i)) for i in range(cfg.n_decoder_layers)]
        memory_mask = padding_mask(g, ENCODER_ATTENTION_MASK, "/decoder/memory_mask") if bool_mask \
            else g.cast(ENCODER_ATTENTION_MASK, TensorProto.INT32, "/decoder/memory_mask")
    return past, cross, memory_mask


def present_sources(presents):
    """{present_key/value_self_{i}: node output} of the layers' present caches [(k, v)].

    Raises nothing: it only names node outputs.
    """
    return {name(i): value for i, pair in enumerate(presents)
            for name, value in zip((present_key, present_value), pair)}


def build_decoder(cfg, params, dtype=FP32, opset=DEFAULT_OPSET, fused=False):
    """decoder.onnx (the reference graph), twin of refimpl.model.decoder_step: one graph for the prompt pass and
    each step, over a growing cache; fused=True: decoder_fused.onnx, the same contract with both attentions as
    ONNX Runtime's MultiHeadAttention.

    input_ids, position_ids [B, T] int64, attention_mask [B, P + T] int64, past_key/value_self_{i} [B, H, P, Dh]
    (+ encoder_attention_mask [B, S] int64, cross_key/value_{i} [B, H, S, Dh] for encoder-decoder)
    -> logits [B, T, V] float32, present_key/value_self_{i} [B, H, P + T, Dh]. Returns the onnx.ModelProto.

    input_ids ─embed─[decoder_layer × N (Concat past, new)]─final_norm─Cast(fp32)─lm_head─▶ logits

    Caches in the dtype's float type. Raises KeyError for a dtype other than fp32/fp16 and onnx's InferenceError
    (Graph.model) for a graph whose shapes do not check; nothing else: export_model loads a checked config and
    parameters first.
    """
    variant = FUSED if fused else REFERENCE
    g = Graph(GRAPH_NAME_PREFIX + decoder_graph(variant), dtype, opset)
    inputs, outputs = decoder_signature(cfg, variant)
    declare_inputs(g, inputs)
    ids, positions, keep = INPUT_IDS, POSITION_IDS, ATTENTION_MASK
    past, cross, memory_mask = cache_inputs(g, cfg, bool_mask=not fused)
    p = params["decoder"]
    x = embed(g, cfg, "decoder", "decoder.embed_tokens", p["embed_tokens"], p, ids, positions)
    if fused:  # ONNX Runtime's MultiHeadAttention nodes take int32 key masks
        keep32 = g.cast(keep, TensorProto.INT32, "/decoder/self_mask")
        self_attention = partial(mha_self_attention, keep32=keep32)
        cross_attention = partial(mha_cross_attention, keep32=memory_mask)
    else:
        self_mask = causal_padding_mask(g, ids, keep, "/decoder/self_mask")  # [B, 1, T, P + T]
        indices = sequence_indices(g, ids, keep, "/decoder/indices") if cfg.positional == "relative" else (None, None)
        stack = stack_positions(g, cfg, "decoder", p, positions, *indices, bidirectional=False)
        self_attention = partial(cached_self_attention, mask=self_mask, **stack)
        cross_attention = partial(mha_cached, mask=memory_mask)
    x, presents = decoder_layers(g, cfg, p, x, past, cross, self_attention, cross_attention)
    if cfg.final_norm:
        x = norm(g, cfg, "decoder.final_norm", p["final_norm"], x)
    declare_outputs(g, outputs, {LOGITS: lm_head(g, cfg, params, x), **present_sources(presents)})
    return g.model()


def build_decoder_static(cfg, params, dtype=FP32, opset=DEFAULT_OPSET, max_length=256):
    """decoder_static.onnx, refimpl.model.decoder_step for one token per row per call over a fixed-size cache of
    max_length = L slots (for IOBinding with fixed buffers and CUDA-graph replay), with the argmax in the graph.

    input_ids, position_ids [B, 1] int64; write_index [1] int64 (the cache slot of this token, the same for every
    row); attention_mask [B, L] int64 (1 = a written slot of a real token, this one included);
    past_key/value_self_{i} [B, H, L, Dh] (+ encoder_attention_mask, cross_key/value_{i})
    -> logits [B, 1, V] float32, next_ids [B] int64 (argmax), present_key/value_self_{i} [B, H, L, Dh].

    write_index ─Equal(0..L-1)─▶ slot_mask;  per layer: Where(slot_mask, new k/v, cache) ─ attention over all L slots

    It computes every option the reference graph does (the same builders): rotary from position_ids, T5's relative
    bias with the query at index write_index and key j at slot j (as decoder.onnx: query P + i, key j).

    Caches in the dtype's float type. Raises as build_decoder; export_model checks 1 <= max_length <= cfg.max_positions
    first.
    """
    g = Graph(GRAPH_NAME_PREFIX + decoder_graph(STATIC), dtype, opset)
    inputs, outputs = decoder_signature(cfg, STATIC, max_length)
    declare_inputs(g, inputs)
    ids, positions, keep = INPUT_IDS, POSITION_IDS, ATTENTION_MASK
    past, cross, memory_mask = cache_inputs(g, cfg)
    slot_mask = write_slot_mask(g, WRITE_INDEX, max_length)
    self_mask = padding_mask(g, keep, "/decoder/self_mask")  # [B, 1, 1, L]: unwritten slots are 0 in attention_mask
    p = params["decoder"]
    x = embed(g, cfg, "decoder", "decoder.embed_tokens", p["embed_tokens"], p, ids, positions)
    # the token's place in the sequence is its slot write_index; key j sits in slot j (T5's relative bias)
    stack = stack_positions(g, cfg, "decoder", p, positions, WRITE_INDEX, g.const(np.arange(max_length), "slots"),
                            bidirectional=False)
    self_attention = partial(cached_self_attention, mask=self_mask, update_cache=write_cache(slot_mask), **stack)
    x, presents = decoder_layers(g, cfg, p, x, past, cross, self_attention, partial(mha_cached, mask=memory_mask))
    if cfg.final_norm:
        x = norm(g, cfg, "decoder.final_norm", p["final_norm"], x)
    return static_step_outputs(g, cfg, params, x, presents, outputs)


def build_decoder_static_fused(cfg, params, dtype=FP16, opset=DEFAULT_OPSET, max_length=256, in_place=True):
    """decoder_static_fused.onnx (in_place=True) or decoder_static_mha.onnx (in_place=False): the static step
    (refimpl.model.decoder_step for one token per row) with ONNX Runtime's contrib ops (export/fused.py), for
    CUDA-graph replay. Both project q/k/v with one MatMul, fold each residual sum and bias into the next norm
    (SkipLayerNormalization), the first FFN bias into the activation (BiasGelu, ...), and run cross-attention as
    MultiHeadAttention.

    in_place=True, GroupQueryAttention (fp16 on CUDA; a head size that is a multiple of 8):
      input_ids, position_ids [B, 1] int64; past_key/value_self_{i} [B, H, L, Dh] (+ encoder_attention_mask,
      cross_key/value_{i}) -> logits [B, 1, V] float32, next_ids [B] int64, present_key/value_self_{i} [B, H, L, Dh].
      A row's token is written at cache slot position_ids[b] and attends to slots 0 .. position_ids[b]: bind
      present to the same buffer as past and the cache is updated in place. Slots hold a row's real tokens in
      order, so a left-padded prompt's pad tokens (position 0) are overwritten by its first real token and no
      self-attention mask is needed.
    in_place=False, MultiHeadAttention over all L slots (fp32 and fp16): decoder_static.onnx's inputs and outputs
      (write_index, attention_mask [B, L]); the new key/value is written with Where into a present buffer.

    input_ids ─embed─[qkv_proj─self-attention─SkipLayerNorm─(MultiHeadAttention─SkipLayerNorm)─FFN─SkipLayerNorm]×N
              ─lm_head─ArgMax

    Caches in the dtype's float type. Raises as build_decoder; export_model checks max_length first and builds
    in_place=True only for a head size that is a multiple of 8.
    """
    variant = STATIC_FUSED if in_place else STATIC_MHA
    g = Graph(GRAPH_NAME_PREFIX + decoder_graph(variant), dtype, opset)
    inputs, outputs = decoder_signature(cfg, variant, max_length)
    declare_inputs(g, inputs)
    ids, positions = INPUT_IDS, POSITION_IDS
    past, cross, memory_keep32 = cache_inputs(g, cfg, bool_mask=False)
    if in_place:
        at = "/decoder/slots"
        seqlens32 = g.cast(g.op("Squeeze", [positions, g.const([1], "axes_1")], at), TensorProto.INT32, at)  # slot
        total32 = g.const(max_length, "cache_length", np.int32)  # a constant: GroupQueryAttention reads it on the host
        rotary_caches = gqa_rotary_caches(g, cfg, max_length) if cfg.positional == "rotary" else None
        self_attention = partial(gqa_self_attention, seqlens32=seqlens32, total32=total32, rotary_caches=rotary_caches)
    else:
        slot_mask = write_slot_mask(g, WRITE_INDEX, max_length)
        keep32 = g.cast(ATTENTION_MASK, TensorProto.INT32, "/decoder/self_mask")
        self_attention = partial(mha_static_self_attention, slot_mask=slot_mask, keep32=keep32)
    p = params["decoder"]
    stream = ResidualStream(g, cfg, embed(g, cfg, "decoder", "decoder.embed_tokens", p["embed_tokens"], p, ids,
                                          positions))
    stream, presents = decoder_layers(g, cfg, p, stream, past, cross, self_attention,
                                      partial(mha_cross_attention_unbiased, keep32=memory_keep32),
                                      residual=stream_residual, feed_forward=feed_forward_unbiased)
    x = stream.normed("decoder.final_norm", p["final_norm"]) if cfg.final_norm else stream.value("/decoder/residual")
    return static_step_outputs(g, cfg, params, x, presents, outputs)


def static_step_outputs(g, cfg, params, x, presents, outputs):
    """The static steps' outputs (outputs: their contract signature) from the last hidden state x [B, 1, D]:
    logits [B, 1, V] float32, next_ids [B] int64 (the in-graph argmax) and the present caches [(k, v)] per layer;
    returns the onnx.ModelProto.

    Raises onnx's InferenceError (Graph.model) for a graph whose shapes do not check.
    """
    logits = lm_head(g, cfg, params, x)
    last = g.op("Squeeze", [logits, g.const([1], "axes_1")], "/argmax")
    next_ids = g.op("ArgMax", [last], "/argmax", axis=-1, keepdims=0)
    declare_outputs(g, outputs, {LOGITS: logits, NEXT_IDS: next_ids, **present_sources(presents)})
    return g.model()


# ---------------------------------------------------------------------------- by contract name


def build_reference_graph(cfg, params, graph, dtype=FP32, opset=DEFAULT_OPSET):
    """The graph every export holds, by contract name: "encoder" (build_encoder) or "decoder" (build_decoder).
    Raises ValueError for another name."""
    if graph == ENCODER:
        return build_encoder(cfg, params, dtype, opset)
    if graph == DECODER:
        return build_decoder(cfg, params, dtype, opset)
    raise ValueError(f"graph must be {ENCODER!r} or {DECODER!r}, got {graph!r}")


def build_decoder_variant(cfg, params, variant, dtype=FP32, opset=DEFAULT_OPSET, static_length=None):
    """The decoder graph of a variant (contract.VARIANTS): reference -> build_decoder; fused -> build_decoder(fused);
    static -> build_decoder_static; static_mha and static_fused -> build_decoder_static_fused (in_place False/True).
    The static variants need static_length (their cache slots L). Raises ValueError for an unknown variant."""
    if variant in (REFERENCE, FUSED):
        return build_decoder(cfg, params, dtype, opset, fused=variant == FUSED)
    if variant == STATIC:
        return build_decoder_static(cfg, params, dtype, opset, static_length)
    if variant in (STATIC_MHA, STATIC_FUSED):
        return build_decoder_static_fused(cfg, params, dtype, opset, static_length, in_place=variant == STATIC_FUSED)
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
