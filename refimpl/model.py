"""The full models: parameters, embeddings, the encoder and decoder stacks, the LM head, forward and backward for
both families, and incremental decoding with a KV cache (encode, decoder_step: the same decoder stack, fed past
keys and values). The ONNX twin is export/model.py; docs/DESIGN.md, "Function map", pairs each function with its
graph builder and tests.

Parameter tree (dotted names are the checkpoint keys; W is [in, out], so y = x @ W + b):

    encoder.embed_tokens.weight [V, D]        (absent when share_embeddings: the decoder's is used)
    encoder.embed_positions.weight [N + O, D] (positional="learned" only; O = position_offset)
    encoder.embed_norm                        (embed_norm only: the encoder's own even when the table is shared)
    encoder.relative_attention_bias.weight [relative_num_buckets, H]  (positional="relative" only)
    encoder.layers.i.{self_attn, self_attn_norm, ffn, ffn_norm}
    encoder.final_norm                        (final_norm only)
    decoder.embed_tokens.weight [V, D]
    decoder.embed_positions.weight [N + O, D] (positional="learned" only)
    decoder.embed_norm                        (embed_norm only)
    decoder.relative_attention_bias.weight [relative_num_buckets, H]  (positional="relative" only)
    decoder.layers.i.{self_attn, self_attn_norm, cross_attn, cross_attn_norm, ffn, ffn_norm}
    decoder.final_norm                        (final_norm only)
    lm_head.weight [D, V]                     (absent when tie_embeddings: decoder.embed_tokens.weight.T is used)
    lm_head.bias [V]                          (lm_head_bias only)

Attention blocks hold q_proj [D, H Dh], k_proj and v_proj [D, Hkv Dh], out_proj [H Dh, D] (biases by
attention_qkv_bias / attention_out_bias); feed-forwards fc1, fc_up (ffn_gated only) and fc2 (biases by ffn_bias).

A decoder-only model has just decoder.* (layers without cross_attn) and lm_head.
"""

import math

import numpy as np

from .attention import (
    causal_mask,
    check_keep_mask,
    padding_mask,
    project_kv,
    relative_position_bias_backward,
    relative_position_bias_forward,
    rotary_tables,
)
from .config import check_config, check_fits_memory
from .errors import (
    RefformerError,
    check,
    check_array,
    check_number,
    check_rng,
    check_tree,
    check_upstream,
    is_integer,
    physical_memory_bytes,
    reading_cache,
)
from .layers import (
    decoder_layer_backward,
    decoder_layer_forward,
    encoder_layer_backward,
    encoder_layer_forward,
    layer_shapes,
    norm_shapes,
)
from .ops import (
    dropout_backward,
    dropout_forward,
    embedding_backward,
    embedding_forward,
    linear_backward,
    linear_forward,
    norm_backward,
    norm_forward,
    sinusoidal_table,
)
from .tree import tree_map

# ---------------------------------------------------------------------------- parameters


def param_shapes(cfg):
    """The parameter tree of cfg with shape tuples as leaves (the one place that defines it; a layer's own
    shapes are layers.layer_shapes). config.parameter_count counts the same numbers without building the tree.
    Raises RefformerError unless cfg is a Config.
    """
    check_config(cfg)
    D, V, N = cfg.d_model, cfg.vocab_size, cfg.max_positions

    def norm():
        return norm_shapes(cfg)

    def layer(cross):
        return layer_shapes(cfg, cross)

    def stack(n_layers, cross, own_embedding):
        s = {"embed_tokens": {"weight": (V, D)}} if own_embedding else {}
        if cfg.positional == "learned":
            s["embed_positions"] = {"weight": (N + cfg.position_offset, D)}
        if cfg.embed_norm:
            s["embed_norm"] = norm()
        if cfg.positional == "relative":
            s["relative_attention_bias"] = {"weight": (cfg.relative_num_buckets, cfg.n_heads)}
        s["layers"] = [layer(cross) for _ in range(n_layers)]
        if cfg.final_norm:
            s["final_norm"] = norm()
        return s

    shapes = {}
    if cfg.is_encoder_decoder:
        shapes["encoder"] = stack(cfg.n_encoder_layers, False, not cfg.share_embeddings)
    shapes["decoder"] = stack(cfg.n_decoder_layers, cfg.is_encoder_decoder, True)
    head = {} if cfg.tie_embeddings else {"weight": (D, V)}
    if cfg.lm_head_bias:
        head["bias"] = (V,)
    if head:
        shapes["lm_head"] = head
    return shapes


def init_params(cfg, rng, dtype=np.float32):
    """Random parameters, the tree of param_shapes(cfg) in dtype: Xavier-uniform matrices (Glorot & Bengio 2010,
    as torch's nn.Transformer), N(0, D^-1/2) token embeddings, N(0, 0.02) learned positions, zero biases, unit norm
    weights.

    rng is a numpy.random.Generator; dtype float32 or float64. Raises RefformerError for other arguments, and
    (config.check_fits_memory) for a model that cannot fit in this machine's memory, before allocating anything.
    """
    check_config(cfg)
    check_rng("rng", rng, allow_none=False)
    check(dtype in (np.float32, np.float64, np.dtype(np.float32), np.dtype(np.float64)),
          f"dtype must be float32 or float64, got {dtype!r}")
    check_fits_memory(cfg, dtype)
    def init(path_shape):
        path, shape = path_shape
        if path.endswith("embed_tokens.weight"):
            return rng.normal(0.0, cfg.d_model ** -0.5, shape)
        if path.endswith("embed_positions.weight"):
            return rng.normal(0.0, 0.02, shape)
        if len(shape) == 2:
            bound = math.sqrt(6.0 / (shape[0] + shape[1]))
            return rng.uniform(-bound, bound, shape)
        if "norm" in path.rsplit(".", 2)[-2] and path.endswith("weight"):
            return np.ones(shape)
        return np.zeros(shape)

    named = _with_paths(param_shapes(cfg))
    return tree_map(lambda ps: init(ps).astype(dtype), named)


def _with_paths(tree, prefix=""):
    """Replace each leaf by (dotted path, leaf)."""
    if isinstance(tree, dict):
        return {k: _with_paths(v, f"{prefix}{k}.") for k, v in tree.items()}
    if isinstance(tree, list):
        return [_with_paths(v, f"{prefix}{i}.") for i, v in enumerate(tree)]
    return (prefix[:-1], tree)


def source_embedding(cfg, params):
    """The token table {"weight" [V, D]} the encoder reads (the decoder's when share_embeddings). No checks (params
    were checked by check_model)."""
    return params["decoder" if cfg.share_embeddings else "encoder"]["embed_tokens"]


def head_forward(cfg, params, hidden):
    """logits = (hidden * head_scale) @ W + b: hidden [B, T, D] -> logits [B, T, V], cache. head_scale (T5 v1.0's
    tied head: d_model ** -0.5, transformers' T5ForConditionalGeneration) is skipped when 1.0, as every other model
    has it. W, b from lm_head_params. No checks of its own (model_forward and decoder_step check first)."""
    scaled = hidden * cfg.head_scale if cfg.head_scale != 1.0 else hidden
    return linear_forward(lm_head_params(cfg, params), scaled)


def head_backward(cfg, params, cache, dlogits):
    """dlogits [B, T, V] -> dhidden [B, T, D] and the head's {"weight" [D, V], "bias" [V]} gradients (the weight's
    is the transposed table's when tied). No checks of its own (reached through model_backward)."""
    dscaled, dhead = linear_backward(lm_head_params(cfg, params), cache, dlogits)
    return (dscaled * cfg.head_scale if cfg.head_scale != 1.0 else dscaled), dhead


def lm_head_params(cfg, params):
    """{"weight" [D, V], "bias" [V] (lm_head_bias only)} of the output projection logits = h @ W + b; the weight
    is the transposed decoder table when tie_embeddings (Press & Wolf 2017). No checks (see check_model)."""
    head = dict(params.get("lm_head", {}))
    if cfg.tie_embeddings:
        head["weight"] = params["decoder"]["embed_tokens"]["weight"].T
    return head


# ---------------------------------------------------------------------------- embeddings


def embed_forward(cfg, p_tokens, p_stack, ids, positions, rng=None):
    """x = dropout(norm(E[ids] * sqrt(D) + pos[positions])) (Vaswani et al. 2017, sec. 3.4 and 3.5). ids, positions
    [B, T] int -> x [B, T, D] in the table's dtype, cache.

    The sqrt(D) scale only with cfg.embed_scale (Marian's too). pos by cfg.positional: sinusoidal_table, the
    learned table at row position + position_offset (transformers' BartLearnedPositionalEmbedding, offset 2), or
    nothing for "none" (nn.Transformer's textbook model) and for "relative" / "rotary", whose positions act inside
    attention. norm (p_stack["embed_norm"], cfg.norm) only with cfg.embed_norm (BART's layernorm_embedding, before
    the dropout as there). No checks of its own (model_forward, encode and decoder_step check first)."""
    tokens, token_cache = embedding_forward(p_tokens, ids)
    scale = math.sqrt(cfg.d_model) if cfg.embed_scale else 1.0
    x, pos_cache = tokens * scale, None
    if cfg.positional == "learned":
        pos, pos_cache = embedding_forward(p_stack["embed_positions"], positions + cfg.position_offset)
        x = x + pos
    elif cfg.positional == "sinusoidal":
        used = int(positions.max()) + 1 if positions.size else 0  # only the rows used, not all max_positions
        x = x + sinusoidal_table(used, cfg.d_model, tokens.dtype)[positions]
    norm_cache = None
    if cfg.embed_norm:
        x, norm_cache = norm_forward(p_stack["embed_norm"], x, cfg.norm, cfg.norm_eps)
    x, dropout_cache = dropout_forward(x, cfg.dropout, rng)
    cache = {"tokens": token_cache, "positions": pos_cache, "scale": scale, "embed_norm": norm_cache,
             "dropout": dropout_cache, "output": x}
    return x, cache


def embed_backward(cfg, p_tokens, p_stack, cache, dx):
    """dx [B, T, D] -> the token-table gradient {"weight" [V, D]} and the gradients of the stack's own embedding
    parameters: {"embed_positions": {"weight" [N + O, D]}} for learned positions, {"embed_norm": ...} with
    embed_norm (an empty dict when it has neither). No checks of its own (reached through model_backward)."""
    dsum = dropout_backward(cache["dropout"], dx)
    own = {}
    if cfg.embed_norm:
        dsum, own["embed_norm"] = norm_backward(p_stack["embed_norm"], cache["embed_norm"], dsum, cfg.norm)
    dtokens = embedding_backward(p_tokens, cache["tokens"], dsum * cache["scale"])
    if cfg.positional == "learned":
        own["embed_positions"] = embedding_backward(p_stack["embed_positions"], cache["positions"], dsum)
    return dtokens, own


# ---------------------------------------------------------------------------- input checks


def check_ids(name, ids, cfg):
    """ids must be a [B, L] integer array of token ids in [0, V). Raises RefformerError naming the argument if not."""
    check_array(name, ids, ndim=2, kind="i")
    check(ids.size == 0 or (ids.min() >= 0 and ids.max() < cfg.vocab_size),
          f"{name} must hold token ids in [0, {cfg.vocab_size})")


def token_keep_mask(name, mask, ids, cfg):
    """The boolean [B, L] keep mask of ids [B, L] (True = real token): mask (boolean or 0/1 integers, [B, L]) when
    given, else ids != pad_id (every token real when the model has no pad_id: pass the mask of padded rows).

    Raises RefformerError for a mask of another shape, with values other than 0/1, or floating
    (attention.check_keep_mask: an additive 0 / -inf mask would read inverted), or for bad ids or cfg.
    """
    check_config(cfg)
    check_array("ids", ids, ndim=2, kind="i")
    if mask is None:
        return ids != cfg.pad_id if cfg.pad_id is not None else np.ones(ids.shape, bool)
    if isinstance(mask, np.ndarray) and mask.shape != ids.shape:
        raise RefformerError(f"{name} must have the shape of its ids {list(ids.shape)}, got {list(mask.shape)}")
    return check_keep_mask(name, mask, shape=ids.shape)


def _positions(name, positions, ids, cfg):
    """[B, T] positions: given, or 0 .. T-1 in every row; RefformerError for positions outside [0, max_positions)."""
    if positions is None:
        positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    check_array(name, positions, shape=ids.shape, kind="i")
    if positions.size and positions.min() < 0:
        raise RefformerError(f"{name} must lie in [0, max_positions={cfg.max_positions}); it holds {positions.min()}")
    check(positions.size == 0 or positions.max() < cfg.max_positions,
          f"{name} must lie in [0, max_positions={cfg.max_positions}); the input is too long for this model")
    return positions


def left_padded_positions(keep):
    """Positions of left-padded rows: 0, 1, ... along each row's real tokens, 0 on the padding before them.

    keep [B, L] (boolean or 0/1 integers, 1 = real token) -> positions [B, L] int64, max(cumsum(keep) - 1, 0). This is
    the one place the formula lives: a left-padded prompt's first real token gets position 0, as Hugging Face computes
    `attention_mask.cumsum(-1) - 1` for decoder-only generation (padding positions are never attended).
    Raises RefformerError for a keep that is not a [B, L] mask of booleans or 0/1 integers.
    """
    keep = check_keep_mask("keep", keep, ndim=2)
    return np.maximum(np.cumsum(keep.astype(np.int64), axis=1) - 1, 0)


def left_pad(rows, pad_id):
    """Token-id lists -> (ids [B, L] int64 padded on the left with pad_id, keep [B, L] int64, positions [B, L] int64
    from left_padded_positions), L the longest row. pad_id None (a model without a pad token) pads with 0: keep,
    not the id, marks the padding.

    Raises RefformerError for no rows, a row that is not a list of integer token ids >= 0, or a bad pad_id.
    """
    check(isinstance(rows, (list, tuple)), f"rows must be a list of token-id lists, got {type(rows).__name__}")
    if not rows:
        raise RefformerError("left_pad needs at least one row of ids")
    if pad_id is None:
        pad_id = 0
    check_number("pad_id", pad_id, 0, integer=True)
    for b, row in enumerate(rows):
        row = row.tolist() if isinstance(row, np.ndarray) and row.ndim == 1 else row
        check(isinstance(row, (list, tuple)) and all(is_integer(t) and t >= 0 for t in row),
              f"rows[{b}] must be a list of token ids (integers >= 0)")
    length = max(len(row) for row in rows)
    ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    keep = np.zeros((len(rows), length), dtype=np.int64)
    for b, row in enumerate(rows):
        ids[b, length - len(row):] = row
        keep[b, length - len(row):] = 1
    return ids, keep, left_padded_positions(keep)


def _check_dtype(params):
    """The parameters' one dtype, float32 or float64."""
    dtype = params["decoder"]["embed_tokens"]["weight"].dtype  # the tree was checked first (check_model)
    check(dtype in (np.float32, np.float64), f"parameters must be float32 or float64, got {dtype}")
    return dtype


def check_model(cfg, params, rng=None):
    """Returns the parameters' dtype (float32 or float64). Raises RefformerError unless cfg is a Config, params is
    exactly param_shapes(cfg) in one of those dtypes, and rng is None or a numpy.random.Generator."""
    check_config(cfg, rng)
    check_tree("params", params, param_shapes(cfg))
    dtype = _check_dtype(params)
    other = {value.dtype for value in _leaves(params)} - {dtype}
    check(not other, f"every parameter must be {dtype}, found {sorted(map(str, other))}")
    return dtype


def _leaves(tree):
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    if isinstance(tree, list):
        return [leaf for value in tree for leaf in _leaves(value)]
    return [tree]


def check_activations_fit(cfg, B, S, T, dtype, past=0):
    """Raises RefformerError for inputs whose activations cannot fit in memory, before the forward allocates them:
    B rows, S source and T target positions (P = past cached positions), in dtype.

    A generous estimate of what model_forward keeps for the backward: per encoder layer ~12 [B, S, D],
    3 [B, S, F] and 3 [B, H, S, S]; per decoder layer ~20 [B, T, D], 3 [B, T, F], 3 [B, H, T, past + T] and
    3 [B, H, T, S]; 3 [B, T, V] logits. Only sizes beyond the machine's physical memory are refused.
    """
    D, F, H, V = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.vocab_size
    encoder = cfg.n_encoder_layers * (12 * B * S * D + 3 * B * S * F + 3 * B * H * S * S) if S else 0
    decoder = cfg.n_decoder_layers * (20 * B * T * D + 3 * B * T * F + 3 * B * H * T * (past + T) + 3 * B * H * T * S
                                      + 2 * B * S * D)
    needed = (encoder + decoder + 3 * B * T * V) * np.dtype(dtype).itemsize
    available = physical_memory_bytes()
    check(needed <= available,
          f"a batch of {B} rows ({f'source length {S}, ' if S else ''}target length {T}) needs about "
          f"{needed / (1 << 30):.3g} GiB for its activations, more than this machine's "
          f"{available / (1 << 30):.3g} GiB: pass fewer or shorter rows")


# ---------------------------------------------------------------------------- stacks


def _self_attention_positions(cfg, p_stack, positions, past_length, dtype, *, bidirectional):
    """The position inputs every self-attention layer of a stack shares, computed once per stack: ({"rotary": (cos,
    sin) [B, T, Dh] or None, "position_bias": [1, H, T, P + T] or None}, the bias's cache or None).

    rotary (positional "rotary"): attention.rotary_tables of positions [B, T] with cfg.rope_theta, in dtype
    (transformers' LlamaRotaryEmbedding takes the position_ids likewise). position_bias (positional "relative"):
    attention.relative_position_bias_forward of the stack's table, bidirectional in the encoder, causal in the decoder.
    As transformers' T5Attention.compute_bias, it reads places in the sequence, not the positions argument: query i of
    the T new tokens sits at P + i (P = past_length cached ones), key j at j. Left padding shifts queries and keys
    alike, so the distances between real tokens, and the bias, are those of the unpadded row.
    """
    T = positions.shape[1]
    rotary = rotary_tables(positions, cfg.head_dim, cfg.rope_theta, dtype) if cfg.positional == "rotary" else None
    bias, bias_cache = None, None
    if cfg.positional == "relative":
        bias, bias_cache = relative_position_bias_forward(
            p_stack["relative_attention_bias"]["weight"], past_length + np.arange(T)[None],  # queries [1, T]
            np.arange(past_length + T)[None], bidirectional=bidirectional,  # keys [1, P + T]
            max_distance=cfg.relative_max_distance)
    return {"rotary": rotary, "position_bias": bias}, bias_cache


def _relative_bias_grads(p_stack, bias_cache, dbias):
    """{"relative_attention_bias": {"weight" [num_buckets, H]}} from the sum over the stack's layers of their bias
    gradients (dbias; None when the stack has no layer), or {} when the stack has no relative bias."""
    if bias_cache is None:
        return {}
    table = p_stack["relative_attention_bias"]["weight"]
    dtable = np.zeros_like(table) if dbias is None else relative_position_bias_backward(bias_cache, dbias)
    return {"relative_attention_bias": {"weight": dtable}}


def _add(total, gradients):
    """total + the one gradient in gradients ([] or [g]; a layer's position-bias gradient), None + g = g."""
    for gradient in gradients:
        total = gradient if total is None else total + gradient
    return total


def encoder_forward(cfg, params, src_ids, src_keep, src_positions, rng=None):
    """Embed and encode the source: src_ids [B, S] int, src_keep [B, S] bool, src_positions [B, S] int -> memory
    [B, S, D] in the parameters' dtype, cache. Every layer is layers.encoder_layer_forward. No checks of its own
    (model_forward and encode check first)."""
    p = params["encoder"]
    x, embed_cache = embed_forward(cfg, source_embedding(cfg, params), p, src_ids, src_positions, rng)
    mask = padding_mask(src_keep)  # [B, 1, 1, S]
    positions, bias_cache = _self_attention_positions(cfg, p, src_positions, 0, x.dtype, bidirectional=True)
    layer_caches = []
    for p_layer in p["layers"]:
        x, layer_cache = encoder_layer_forward(p_layer, x, mask, cfg, rng, **positions)
        layer_caches.append(layer_cache)
    norm_cache = None
    if cfg.final_norm:
        x, norm_cache = norm_forward(p["final_norm"], x, cfg.norm, cfg.norm_eps)
    return x, {"embed": embed_cache, "relative_attention_bias": bias_cache, "layers": layer_caches,
               "final_norm": norm_cache, "output": x}


def encoder_backward(cfg, params, cache, dmemory):
    """dmemory [B, S, D] -> (grads of encoder.*, the source token table's gradient {"weight" [V, D]}). No checks
    of its own (reached through model_backward)."""
    p = params["encoder"]
    grads = {}
    dx = dmemory
    if cfg.final_norm:
        dx, grads["final_norm"] = norm_backward(p["final_norm"], cache["final_norm"], dx, cfg.norm)
    layer_grads = []
    dbias = None  # the layers share one relative position bias: their gradients add up
    for p_layer, layer_cache in zip(reversed(p["layers"]), reversed(cache["layers"])):
        dx, dp_layer, *dbias_layer = encoder_layer_backward(p_layer, layer_cache, dx, cfg)
        layer_grads.append(dp_layer)
        dbias = _add(dbias, dbias_layer)
    grads["layers"] = layer_grads[::-1]
    grads.update(_relative_bias_grads(p, cache["relative_attention_bias"], dbias))
    dtokens, own = embed_backward(cfg, source_embedding(cfg, params), p, cache["embed"], dx)
    grads.update(own)
    return grads, dtokens


def decoder_forward(cfg, params, tgt_ids, tgt_keep, tgt_positions, memory, src_keep, rng=None, past=None,
                    cross_kv=None):
    """Embed and decode T target tokens causally, attending to the source -> hidden [B, T, D], cache.

    Training and scoring: tgt_keep [B, T]; memory [B, S, D] with src_keep [B, S] (encoder-decoder) or None.
    Incremental decoding (decoder_step): past holds each layer's self-attention (k, v) [B, Hkv, P, Dh], tgt_keep
    [B, P + T] covers the past and the new positions, cross_kv each layer's (k, v) [B, Hkv, S, Dh] replaces memory,
    and cache["present"] holds each layer's (k, v) [B, Hkv, P + T, Dh]. Every layer is layers.decoder_layer_forward,
    with the stack's rotary tables or relative bias (_self_attention_positions).
    No checks of its own (model_forward and decoder_step check first).
    """
    p = params["decoder"]
    x, embed_cache = embed_forward(cfg, p["embed_tokens"], p, tgt_ids, tgt_positions, rng)
    T = tgt_ids.shape[1]
    P = tgt_keep.shape[1] - T  # positions already in the cache (0 without past)
    self_mask = causal_mask(T, P + T, past=P)[None, None] & padding_mask(tgt_keep)  # [B, 1, T, P + T]
    memory_mask = None if src_keep is None else padding_mask(src_keep)  # [B, 1, 1, S]
    positions, bias_cache = _self_attention_positions(cfg, p, tgt_positions, P, x.dtype, bidirectional=False)
    layer_caches = []
    for i, p_layer in enumerate(p["layers"]):
        x, layer_cache = decoder_layer_forward(p_layer, x, self_mask, memory, memory_mask, cfg, rng,
                                               past=None if past is None else past[i],
                                               cross_kv=None if cross_kv is None else cross_kv[i], **positions)
        layer_caches.append(layer_cache)
    norm_cache = None
    if cfg.final_norm:
        x, norm_cache = norm_forward(p["final_norm"], x, cfg.norm, cfg.norm_eps)
    cache = {"embed": embed_cache, "relative_attention_bias": bias_cache, "layers": layer_caches,
             "final_norm": norm_cache, "output": x}
    if past is not None:
        cache["present"] = [layer_cache["present"] for layer_cache in layer_caches]
    return x, cache


def decoder_backward(cfg, params, cache, dhidden):
    """dhidden [B, T, D] -> (grads of decoder.*, dmemory [B, S, D] or None when no layer reads a memory). No checks
    of its own (reached through model_backward)."""
    p = params["decoder"]
    grads = {}
    dx = dhidden
    if cfg.final_norm:
        dx, grads["final_norm"] = norm_backward(p["final_norm"], cache["final_norm"], dx, cfg.norm)
    layer_grads = []
    dmemory = None
    dbias = None  # the layers share one relative position bias: their gradients add up
    for p_layer, layer_cache in zip(reversed(p["layers"]), reversed(cache["layers"])):
        dx, dmem_layer, dp_layer, *dbias_layer = decoder_layer_backward(p_layer, layer_cache, dx, cfg)
        layer_grads.append(dp_layer)
        if dmem_layer is not None:
            dmemory = dmem_layer if dmemory is None else dmemory + dmem_layer
        dbias = _add(dbias, dbias_layer)
    grads["layers"] = layer_grads[::-1]
    grads.update(_relative_bias_grads(p, cache["relative_attention_bias"], dbias))
    grads["embed_tokens"], own = embed_backward(cfg, p["embed_tokens"], p, cache["embed"], dx)
    grads.update(own)
    return grads, dmemory


# ---------------------------------------------------------------------------- the model


def model_forward(cfg, params, src_ids, tgt_ids, *, src_mask=None, tgt_mask=None, src_positions=None,
                  tgt_positions=None, rng=None):
    """Logits of every target position. src_ids [B, S] (None for decoder-only), tgt_ids [B, T] int -> logits
    [B, T, V] in the parameters' dtype (float32 or float64), and the cache model_backward reads.

    Masks are keep masks [B, S] / [B, T], boolean or integer 0/1, with 1 (True) = real token, by default
    ids != pad_id (all ones when pad_id is null), except that an encoder-decoder's first target token, the decoder
    start, is always real: T5 and Marian start their decoder with the pad id (transformers' decoder_start_token_id)
    and attend to it. A floating mask is refused (for an additive 0 / -inf mask pass mask == 0). Positions default
    to 0 .. length-1 (pass tgt_positions for left-padded decoder-only prompts).
    rng (numpy.random.Generator) turns dropout on; None is eval mode. Raises RefformerError for bad input.
    """
    dtype = check_model(cfg, params, rng)
    check_ids("tgt_ids", tgt_ids, cfg)
    tgt_keep = token_keep_mask("tgt_mask", tgt_mask, tgt_ids, cfg)
    if tgt_mask is None and cfg.is_encoder_decoder:
        tgt_keep[:, :1] = True  # the decoder start token, real even where it is the pad id
    tgt_positions = _positions("tgt_positions", tgt_positions, tgt_ids, cfg)
    memory, src_keep, encoder_cache = None, None, None
    if cfg.is_encoder_decoder:
        check(src_ids is not None, "src_ids is required for an encoder-decoder model")
        check_ids("src_ids", src_ids, cfg)
        check(src_ids.shape[0] == tgt_ids.shape[0],
              f"src_ids and tgt_ids must have the same batch size, got {src_ids.shape[0]} and {tgt_ids.shape[0]}")
        src_keep = token_keep_mask("src_mask", src_mask, src_ids, cfg)
        src_positions = _positions("src_positions", src_positions, src_ids, cfg)
    else:
        check(src_ids is None, "a decoder-only model takes src_ids=None")
    check_activations_fit(cfg, tgt_ids.shape[0], 0 if src_ids is None else src_ids.shape[1], tgt_ids.shape[1], dtype)
    if cfg.is_encoder_decoder:
        memory, encoder_cache = encoder_forward(cfg, params, src_ids, src_keep, src_positions, rng)
    hidden, decoder_cache = decoder_forward(cfg, params, tgt_ids, tgt_keep, tgt_positions, memory, src_keep, rng)
    logits, head_cache = head_forward(cfg, params, hidden)
    assert logits.dtype == dtype
    cache = {"encoder": encoder_cache, "decoder": decoder_cache, "lm_head": head_cache, "logits": logits,
             "cfg": cfg}  # model_backward refuses a cache of another config (its activations would not match)
    return logits, cache


def model_backward(cfg, params, cache, dlogits):
    """Gradients of every parameter (a tree with exactly params' keys and shapes, in their dtype) given dlogits
    [B, T, V]: model_forward read bottom-up; a tied or shared table sums the gradients of its uses.

    Raises RefformerError for params, cache or dlogits that do not match the forward: a cache that model_forward
    returned for another config or for parameters of another dtype, a dlogits of another shape or dtype.
    """
    dtype = check_model(cfg, params)
    check(isinstance(cache, dict) and isinstance(cache.get("logits"), np.ndarray) and "decoder" in cache,
          "cache must be the cache model_forward returned")
    check(cache.get("cfg") == cfg, "cache is from model_forward with another config; pass the cfg of that call")
    check(cache["logits"].dtype == dtype, f"cache is from model_forward with {cache['logits'].dtype} parameters, "
                                          f"but these are {dtype}; pass the parameters of that call")
    check_upstream("dlogits", dlogits, cache["logits"].shape)
    check(dlogits.dtype == dtype, f"dlogits has dtype {dlogits.dtype} but the parameters are {dtype}; "
                                  f"pass dlogits.astype(np.{dtype})")
    with reading_cache("model_forward"):
        return _model_backward(cfg, params, cache, dlogits)


def _model_backward(cfg, params, cache, dlogits):
    dhidden, dhead = head_backward(cfg, params, cache["lm_head"], dlogits)
    grads = {}
    grads["decoder"], dmemory = decoder_backward(cfg, params, cache["decoder"], dhidden)
    table = grads["decoder"]["embed_tokens"]
    if cfg.tie_embeddings:
        table["weight"] = table["weight"] + dhead.pop("weight").T  # logits = h @ E^T
    if dhead:
        grads["lm_head"] = dhead
    if cfg.is_encoder_decoder:
        if dmemory is None:  # no decoder layer reads the memory
            dmemory = np.zeros_like(cache["encoder"]["output"])
        grads["encoder"], dsource = encoder_backward(cfg, params, cache["encoder"], dmemory)
        if cfg.share_embeddings:
            table["weight"] = table["weight"] + dsource["weight"]
        else:
            grads["encoder"]["embed_tokens"] = dsource
    return _in_order_of(params, grads)


def _in_order_of(template, tree):
    """tree's entries in template's key order (so flatten(grads) lines up with flatten(params))."""
    if isinstance(template, dict):
        return {key: _in_order_of(value, tree[key]) for key, value in template.items()}
    if isinstance(template, list):
        return [_in_order_of(value, item) for value, item in zip(template, tree)]
    return tree


# ---------------------------------------------------------------------------- incremental decoding


def encode(cfg, params, src_ids, src_mask=None):
    """Run the encoder once: src_ids [B, S] int -> memory [B, S, D] and every decoder layer's cross-attention
    (k, v) [B, Hkv, S, Dh] (attention.project_kv), in the parameters' dtype.

    The NumPy twin of encoder.onnx. src_mask is a keep mask as in model_forward (floating masks are refused).
    Raises RefformerError for a decoder-only cfg or bad params, ids or mask.
    """
    check_config(cfg)
    check(cfg.is_encoder_decoder, "encode needs an encoder-decoder model")
    dtype = check_model(cfg, params)
    check_ids("src_ids", src_ids, cfg)
    src_keep = token_keep_mask("src_mask", src_mask, src_ids, cfg)
    check_activations_fit(cfg.replace(n_decoder_layers=0), src_ids.shape[0], src_ids.shape[1], 0, dtype)
    memory, _ = encoder_forward(cfg, params, src_ids, src_keep, _positions("src_positions", None, src_ids, cfg))
    cross_kv = [project_kv(p_layer["cross_attn"], memory, cfg.n_heads) for p_layer in params["decoder"]["layers"]]
    return memory, cross_kv


def decoder_step(cfg, params, ids, positions, attention_mask, past, cross_kv=None, encoder_attention_mask=None):
    """Decode T new tokens given a self-attention cache of P past positions. The NumPy twin of decoder.onnx.

    ids, positions [B, T] int; attention_mask [B, P + T] (1 = real token, past and new);
    past: per layer (k, v) [B, Hkv, P, Dh] (P may be 0); cross_kv: per layer (k, v) [B, Hkv, S, Dh]
    from encode, with encoder_attention_mask [B, S]. Returns logits [B, T, V] and the present cache: per layer
    (k, v) [B, Hkv, P + T, Dh], all in the parameters' dtype. It runs decoder_forward, so the layers are those of
    model_forward (layers.decoder_layer_forward with past). Masks are keep masks (boolean or 0/1 integers,
    1 = real token); a floating mask is refused. Raises RefformerError for bad input.
    """
    positions, attention_mask, encoder_attention_mask = _check_step_inputs(
        cfg, params, ids, positions, attention_mask, past, cross_kv, encoder_attention_mask)
    hidden, cache = decoder_forward(cfg, params, ids, attention_mask, positions, None, encoder_attention_mask,
                                    past=past, cross_kv=cross_kv)
    logits, _ = head_forward(cfg, params, hidden)
    return logits, cache["present"]


def _check_step_inputs(cfg, params, ids, positions, attention_mask, past, cross_kv, encoder_attention_mask):
    """decoder_step's checks; returns (positions, attention_mask, encoder_attention_mask) in the forms it uses."""
    dtype = check_model(cfg, params)
    p = params["decoder"]
    check_ids("ids", ids, cfg)
    positions = _positions("positions", positions, ids, cfg)
    B, T = ids.shape
    check(isinstance(past, (list, tuple)) and len(past) == len(p["layers"])
          and all(isinstance(kv, (list, tuple)) and len(kv) == 2 for kv in past),
          f"past must hold one (k, v) per decoder layer ({len(p['layers'])})")
    attention_mask = check_keep_mask("attention_mask", attention_mask, ndim=2)
    if past:
        check_array("past[0] keys", past[0][0], ndim=4, kind="f")
    P = past[0][0].shape[2] if past else attention_mask.shape[-1] - T  # no layers: the mask says how much came before
    check(P >= 0, f"attention_mask must cover the past and the {T} new positions, "
                  f"got shape {list(attention_mask.shape)}")
    for i, (k, v) in enumerate(past):
        check_array(f"past[{i}] keys", k, shape=(B, cfg.n_kv_heads, P, cfg.head_dim), kind="f", dtype=dtype)
        check_array(f"past[{i}] values", v, shape=(B, cfg.n_kv_heads, P, cfg.head_dim), kind="f", dtype=dtype)
    check(attention_mask.shape == (B, P + T),
          f"attention_mask must have shape [B, P + T] = {[B, P + T]}, got {list(attention_mask.shape)}")
    if cfg.is_encoder_decoder:
        check(isinstance(cross_kv, (list, tuple)) and len(cross_kv) == len(p["layers"])
              and all(isinstance(kv, (list, tuple)) and len(kv) == 2 for kv in cross_kv),
              "cross_kv must hold one (k, v) per decoder layer for an encoder-decoder model")
        check(encoder_attention_mask is not None, "encoder_attention_mask is required with cross_kv")
        encoder_attention_mask = check_keep_mask("encoder_attention_mask", encoder_attention_mask, ndim=2)
        if cross_kv:
            check_array("cross_kv[0] keys", cross_kv[0][0], ndim=4, kind="f")
        S = cross_kv[0][0].shape[2] if cross_kv else encoder_attention_mask.shape[1]
        check(encoder_attention_mask.shape == (B, S),
              f"encoder_attention_mask must have shape [B, S] = {[B, S]}, got {list(encoder_attention_mask.shape)}")
        for i, (k, v) in enumerate(cross_kv):
            check_array(f"cross_kv[{i}] keys", k, shape=(B, cfg.n_kv_heads, S, cfg.head_dim), kind="f", dtype=dtype)
            check_array(f"cross_kv[{i}] values", v, shape=(B, cfg.n_kv_heads, S, cfg.head_dim), kind="f",
                        dtype=dtype)
    else:
        check(cross_kv is None and encoder_attention_mask is None,
              "a decoder-only model takes cross_kv=None and encoder_attention_mask=None")

    check_activations_fit(cfg.replace(n_encoder_layers=0), B, encoder_attention_mask.shape[1]
                          if encoder_attention_mask is not None else 0, T, dtype, past=P)
    return positions, attention_mask, encoder_attention_mask


def empty_cache(cfg, batch_size, dtype=np.float32):
    """A self-attention cache with P = 0: per decoder layer (k, v) [B, Hkv, 0, Dh] of dtype, B = batch_size.

    Raises RefformerError for a negative batch_size or a dtype other than float32/float64.
    """
    check_config(cfg)
    check(is_integer(batch_size) and 0 <= batch_size <= np.iinfo(np.intp).max,
          f"batch_size must be an integer >= 0 (and below 2**63), got {batch_size!r}")
    check(dtype in (np.float32, np.float64, np.dtype(np.float32), np.dtype(np.float64)),
          f"dtype must be float32 or float64, got {dtype!r}")
    shape = (batch_size, cfg.n_kv_heads, 0, cfg.head_dim)
    return [(np.zeros(shape, dtype), np.zeros(shape, dtype)) for _ in range(cfg.n_decoder_layers)]
