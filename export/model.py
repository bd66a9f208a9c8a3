"""Whole-model graphs following DESIGN.md's graph contract: encoder.onnx and decoder.onnx (the reference graph)."""

import numpy as np
from onnx import TensorProto

from refformer.refimpl.model import lm_head_params, source_embedding

from .contract import DECODER, ENCODER, VARIANTS
from .graph import Graph
from .layers import (
    ResidualStream,
    causal_padding_mask,
    decoder_layer_step,
    decoder_layer_step_fused,
    decoder_layer_step_static_fused,
    embed,
    encoder_layer,
    gqa_self_attention,
    linear,
    mha_static_self_attention,
    norm,
    padding_mask,
    project_kv,
    write_cache,
)

INT64 = TensorProto.INT64


def build_encoder(cfg, params, dtype="fp32", opset=17):
    """encoder.onnx: input_ids, attention_mask [B, S] -> encoder_hidden_states [B, S, D] and, for every
    decoder layer i, cross_key_{i}, cross_value_{i} [B, H, S, Dh] (computed once per input).

    input_ids ─embed─[encoder_layer × N]─final_norm─▶ encoder_hidden_states ─k_proj/v_proj of each decoder layer─▶ cross_*
    """
    g = Graph("refformer_encoder", dtype, opset)
    ids = g.input("input_ids", INT64, ["batch", "source_length"])
    keep = g.input("attention_mask", INT64, ["batch", "source_length"])
    p = params["encoder"]
    table_name = "decoder.embed_tokens" if cfg.share_embeddings else "encoder.embed_tokens"
    table = source_embedding(cfg, params)
    # positions 0 .. S-1 for every row, as refimpl.encode
    at = "/encoder/positions"
    length = g.op("Gather", [g.op("Shape", [ids], at), g.const(1, "one_index")], at)
    positions = g.op("Range", [g.const(0, "zero"), length, g.const(1, "one")], at)
    positions = g.op("Expand", [positions, g.op("Shape", [ids], at, name="ShapeIds")], at)
    x = embed(g, cfg, "encoder", table_name, table, p, ids, positions)
    mask = padding_mask(g, keep, "/encoder/mask")  # [B, 1, 1, S]
    for i, p_layer in enumerate(p["layers"]):
        x = encoder_layer(g, cfg, f"encoder.layers.{i}", p_layer, x, mask)
    if cfg.final_norm:
        x = norm(g, cfg, "encoder.final_norm", p["final_norm"], x)
    g.output(x, "encoder_hidden_states", g.float_type, ["batch", "source_length", cfg.d_model])
    kv_shape = ["batch", cfg.n_heads, "source_length", cfg.head_dim]
    for i, p_layer in enumerate(params["decoder"]["layers"]):
        k, v = project_kv(g, cfg, f"decoder.layers.{i}.cross_attn", p_layer["cross_attn"], x)
        g.output(k, f"cross_key_{i}", g.float_type, kv_shape)
        g.output(v, f"cross_value_{i}", g.float_type, kv_shape)
    return g.model()


def cache_inputs(g, cfg, past_shape, bool_mask=True):
    """The decoder's cache inputs: past_key/value_self_{i} of past_shape, and for encoder-decoder
    encoder_attention_mask [B, S] (as a bool [B, 1, 1, S] mask, or int32 [B, S] for the contrib ops when
    bool_mask is False) and cross_key/value_{i} [B, H, S, Dh]."""
    past = [(g.input(f"past_key_self_{i}", g.float_type, past_shape), g.input(f"past_value_self_{i}", g.float_type, past_shape))
            for i in range(cfg.n_decoder_layers)]
    cross, memory_mask = [(None, None)] * cfg.n_decoder_layers, None
    if cfg.is_encoder_decoder:
        source_keep = g.input("encoder_attention_mask", INT64, ["batch", "source_length"])
        cross_shape = ["batch", cfg.n_heads, "source_length", cfg.head_dim]
        cross = [(g.input(f"cross_key_{i}", g.float_type, cross_shape), g.input(f"cross_value_{i}", g.float_type, cross_shape))
                 for i in range(cfg.n_decoder_layers)]
        memory_mask = padding_mask(g, source_keep, "/decoder/memory_mask") if bool_mask \
            else g.cast(source_keep, TensorProto.INT32, "/decoder/memory_mask")
    return past, cross, memory_mask


def build_decoder(cfg, params, dtype="fp32", opset=17, fused=False):
    """decoder.onnx (reference graph, growing cache): one graph for the prompt pass and each step.

    input_ids, position_ids [B, T], attention_mask [B, P + T], past_key/value_self_{i} [B, H, P, Dh]
    (+ encoder_attention_mask [B, S], cross_key/value_{i} [B, H, S, Dh] for encoder-decoder)
    -> logits [B, T, V] (float32), present_key/value_self_{i} [B, H, P + T, Dh].

    input_ids ─embed─[decoder_layer_step × N (Concat past, new)]─final_norm─Cast(fp32)─lm_head─▶ logits
    """
    g = Graph("refformer_decoder_fused" if fused else "refformer_decoder", dtype, opset)
    ids = g.input("input_ids", INT64, ["batch", "new_length"])
    positions = g.input("position_ids", INT64, ["batch", "new_length"])
    keep = g.input("attention_mask", INT64, ["batch", "total_length"])
    past, cross, memory_mask = cache_inputs(g, cfg, ["batch", cfg.n_heads, "past_length", cfg.head_dim], bool_mask=not fused)
    p = params["decoder"]
    x = embed(g, cfg, "decoder", "decoder.embed_tokens", p["embed_tokens"], p, ids, positions)
    if fused:  # fused=True: ONNX Runtime's MultiHeadAttention nodes (decoder_fused.onnx), int32 key masks
        layer_step, self_mask = decoder_layer_step_fused, g.cast(keep, TensorProto.INT32, "/decoder/self_mask")
    else:
        layer_step, self_mask = decoder_layer_step, causal_padding_mask(g, ids, keep, "/decoder/self_mask")  # [B, 1, T, P + T]
    presents = []
    for i, p_layer in enumerate(p["layers"]):
        x, k, v = layer_step(g, cfg, f"decoder.layers.{i}", p_layer, x, self_mask, *past[i], *cross[i], memory_mask)
        presents.append((k, v))
    if cfg.final_norm:
        x = norm(g, cfg, "decoder.final_norm", p["final_norm"], x)
    logits = lm_head(g, cfg, params, x)
    g.output(logits, "logits", TensorProto.FLOAT, ["batch", "new_length", cfg.vocab_size])
    present_shape = ["batch", cfg.n_heads, "total_length", cfg.head_dim]
    for i, (k, v) in enumerate(presents):
        g.output(k, f"present_key_self_{i}", g.float_type, present_shape)
        g.output(v, f"present_value_self_{i}", g.float_type, present_shape)
    return g.model()


def build_decoder_static(cfg, params, dtype="fp32", opset=17, max_length=256):
    """decoder_static.onnx: one token per row per call over a fixed-size cache (for IOBinding with fixed
    buffers and CUDA-graph replay), with the argmax in the graph.

    input_ids, position_ids [B, 1]; write_index [1] (the cache slot of this token, the same for every
    row); attention_mask [B, L] (1 = a written slot of a real token, this one included);
    past_key/value_self_{i} [B, H, L, Dh] (+ encoder_attention_mask, cross_key/value_{i})
    -> logits [B, 1, V] (float32), next_ids [B] (argmax), present_key/value_self_{i} [B, H, L, Dh].

    write_index ─Equal(0..L-1)─▶ slot_mask;  per layer: Where(slot_mask, new k/v, cache) ─ attention over all L slots
    """
    g = Graph("refformer_decoder_static", dtype, opset)
    L = max_length
    ids = g.input("input_ids", INT64, ["batch", 1])
    positions = g.input("position_ids", INT64, ["batch", 1])
    write_index = g.input("write_index", INT64, [1])
    keep = g.input("attention_mask", INT64, ["batch", L])
    cache_shape = ["batch", cfg.n_heads, L, cfg.head_dim]
    past, cross, memory_mask = cache_inputs(g, cfg, cache_shape)
    slot_mask = write_slot_mask(g, write_index, L)
    self_mask = padding_mask(g, keep, "/decoder/self_mask")  # [B, 1, 1, L]: unwritten slots are 0 in attention_mask
    p = params["decoder"]
    x = embed(g, cfg, "decoder", "decoder.embed_tokens", p["embed_tokens"], p, ids, positions)
    presents = []
    for i, p_layer in enumerate(p["layers"]):
        x, k, v = decoder_layer_step(g, cfg, f"decoder.layers.{i}", p_layer, x, self_mask, *past[i], *cross[i],
                                     memory_mask, update_cache=write_cache(slot_mask))
        presents.append((k, v))
    if cfg.final_norm:
        x = norm(g, cfg, "decoder.final_norm", p["final_norm"], x)
    return static_step_outputs(g, cfg, params, x, presents, cache_shape)


def build_decoder_static_fused(cfg, params, dtype="fp16", opset=17, max_length=256, in_place=True):
    """decoder_static_fused.onnx (in_place=True) or decoder_static_mha.onnx (in_place=False): the static step with
    ONNX Runtime's contrib ops, for CUDA-graph replay. Both project q/k/v with one MatMul, fold each residual sum
    and bias into the next norm (SkipLayerNormalization), the first FFN bias into the activation (BiasGelu, ...),
    and run cross-attention as MultiHeadAttention.

    in_place=True, GroupQueryAttention (fp16 on CUDA; a head size that is a multiple of 8):
      input_ids, position_ids [B, 1]; past_key/value_self_{i} [B, H, L, Dh] (+ encoder_attention_mask,
      cross_key/value_{i}) -> logits [B, 1, V] (float32), next_ids [B], present_key/value_self_{i} [B, H, L, Dh].
      A row's token is written at cache slot position_ids[b] and attends to slots 0 .. position_ids[b]: bind
      present to the same buffer as past and the cache is updated in place. Slots hold a row's real tokens in
      order, so a left-padded prompt's pad tokens (position 0) are overwritten by its first real token and no
      self-attention mask is needed.
    in_place=False, MultiHeadAttention over all L slots (fp32 and fp16): decoder_static.onnx's inputs and outputs
      (write_index, attention_mask [B, L]); the new key/value is written with Where into a present buffer.

    input_ids ─embed─[qkv_proj─self-attention─SkipLayerNorm─(MultiHeadAttention─SkipLayerNorm)─FFN─SkipLayerNorm]×N─lm_head─ArgMax
    """
    g = Graph("refformer_decoder_static_fused" if in_place else "refformer_decoder_static_mha", dtype, opset)
    L = max_length
    ids = g.input("input_ids", INT64, ["batch", 1])
    positions = g.input("position_ids", INT64, ["batch", 1])
    if not in_place:
        write_index = g.input("write_index", INT64, [1])
        keep = g.input("attention_mask", INT64, ["batch", L])
    cache_shape = ["batch", cfg.n_heads, L, cfg.head_dim]
    past, cross, memory_keep32 = cache_inputs(g, cfg, cache_shape, bool_mask=False)
    if in_place:
        at = "/decoder/slots"
        seqlens32 = g.cast(g.op("Squeeze", [positions, g.const([1], "axes_1")], at), TensorProto.INT32, at)  # slot = position
        total32 = g.const(L, "cache_length", np.int32)  # a constant: GroupQueryAttention reads it on the host

        def self_attention(prefix, p, h, past_k, past_v):
            return gqa_self_attention(g, cfg, prefix, p, h, past_k, past_v, seqlens32, total32)
    else:
        slot_mask = write_slot_mask(g, write_index, L)
        keep32 = g.cast(keep, TensorProto.INT32, "/decoder/self_mask")

        def self_attention(prefix, p, h, past_k, past_v):
            return mha_static_self_attention(g, cfg, prefix, p, h, past_k, past_v, slot_mask, keep32)
    p = params["decoder"]
    stream = ResidualStream(g, cfg, embed(g, cfg, "decoder", "decoder.embed_tokens", p["embed_tokens"], p, ids, positions))
    presents = [decoder_layer_step_static_fused(g, cfg, f"decoder.layers.{i}", p_layer, stream, self_attention, *past[i],
                                                *cross[i], memory_keep32)
                for i, p_layer in enumerate(p["layers"])]
    x = stream.normed("decoder.final_norm", p["final_norm"]) if cfg.final_norm else stream.value("/decoder/residual")
    return static_step_outputs(g, cfg, params, x, presents, cache_shape)


def write_slot_mask(g, write_index, L):
    """write_index [1] -> bool [1, 1, L, 1], true at the cache slot this call writes."""
    at = "/decoder/slot"
    return g.op("Reshape", [g.op("Equal", [g.const(np.arange(L), "slots"), write_index], at),
                            g.const([1, 1, L, 1], "slot_mask_shape")], at)


def static_step_outputs(g, cfg, params, x, presents, cache_shape):
    """The static steps' outputs from the last hidden state x: logits [B, 1, V] (float32), next_ids [B] (the
    in-graph argmax) and present_key/value_self_{i} of cache_shape; returns the model."""
    logits = lm_head(g, cfg, params, x)
    g.output(logits, "logits", TensorProto.FLOAT, ["batch", 1, cfg.vocab_size])
    last = g.op("Squeeze", [logits, g.const([1], "axes_1")], "/argmax")
    g.output(g.op("ArgMax", [last], "/argmax", axis=-1, keepdims=0), "next_ids", INT64, ["batch"])
    for i, (k, v) in enumerate(presents):
        g.output(k, f"present_key_self_{i}", g.float_type, cache_shape)
        g.output(v, f"present_value_self_{i}", g.float_type, cache_shape)
    return g.model()


def lm_head(g, cfg, params, x):
    """Logits in float32 even in fp16 graphs: the hidden state is cast up and the head kept in float32.

    A tied head reads the decoder's token table (Transpose of the [V, D] initializer).
    """
    head = lm_head_params(cfg, params)
    x32 = g.to_float32(x, "/lm_head", "CastHidden")
    if cfg.tie_embeddings:
        table = params["decoder"]["embed_tokens"]["weight"]
        if g.dtype == "fp32":
            weight = g.op("Transpose", [g.weight("decoder.embed_tokens.weight", table)], "/lm_head", perm=[1, 0])
        else:  # the fp16 graph holds the table in fp16 for the Gather; the head needs it in fp32
            weight = g.weight("lm_head.weight_from_embed_tokens", table.T, dtype=np.float32)
        logits = g.op("MatMul", [x32, weight], "/lm_head")
        if "bias" in head:
            logits = g.op("Add", [logits, g.weight("lm_head.bias", head["bias"], dtype=np.float32)], "/lm_head")
        return logits
    fp32_head = {name: value.astype(np.float32) for name, value in head.items()}
    for name, value in fp32_head.items():  # registered in float32 first: linear's g.weight then reuses them in fp16 graphs
        g.weight(f"lm_head.{name}", value, dtype=np.float32)
    return linear(g, "lm_head", fp32_head, x32)


def build_reference_graph(cfg, params, graph, dtype="fp32", opset=17):
    """The graph every export holds, by contract name: "encoder" (build_encoder) or "decoder" (build_decoder).
    Raises ValueError for another name."""
    if graph == ENCODER:
        return build_encoder(cfg, params, dtype, opset)
    if graph == DECODER:
        return build_decoder(cfg, params, dtype, opset)
    raise ValueError(f"graph must be {ENCODER!r} or {DECODER!r}, got {graph!r}")


def build_decoder_variant(cfg, params, variant, dtype="fp32", opset=17, static_length=None):
    """The decoder graph of a variant (contract.VARIANTS): reference -> build_decoder; fused -> build_decoder(fused);
    static -> build_decoder_static; static_mha and static_fused -> build_decoder_static_fused (in_place False/True).
    The static variants need static_length (their cache slots L). Raises ValueError for an unknown variant."""
    if variant == "reference":
        return build_decoder(cfg, params, dtype, opset)
    if variant == "fused":
        return build_decoder(cfg, params, dtype, opset, fused=True)
    if variant == "static":
        return build_decoder_static(cfg, params, dtype, opset, static_length)
    if variant in ("static_mha", "static_fused"):
        return build_decoder_static_fused(cfg, params, dtype, opset, static_length, in_place=variant == "static_fused")
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
