"""Weights from PyTorch: torch.nn Transformer modules and saved state_dicts -> (Config, params).

    mha_params_from_torch(mha)                  nn.MultiheadAttention -> {q_proj, k_proj, v_proj, out_proj}
    encoder_layer_params_from_torch(layer)      nn.TransformerEncoderLayer -> an encoder (or decoder-only) layer
    decoder_layer_params_from_torch(layer)      nn.TransformerDecoderLayer -> a decoder layer
    config_from_torch_layer(layer)              the Config fields a layer records (D, H, F, norm_first, ...)
    from_torch(module, **overrides)             a live model built on nn.Transformer or nn.TransformerEncoder
    from_state_dict(state_dict, **arch)         the saved state_dict of such a model
    convert_state_dict_file(path, tokenizer_path, out_dir, **arch)   what `refformer convert-torch` runs

Nothing the weights do not show is assumed: from_torch runs the module on probe ids to read whether it scales
embeddings by sqrt(D) and which positions it adds (none, sinusoidal, learned), takes pad_id from the token
embedding's padding_idx when its forward masks that id (null otherwise), and checks the whole forward's logits;
from_state_dict needs positional and embed_scale given when the state_dict has no position table (issue 13: the
textbook Embedding + nn.Transformer + Linear model).

Orientation: torch's nn.Linear stores weight [out, in] (y = x W^T + b); ours is [in, out]
(y = x @ W + b), so every matrix is transposed. nn.MultiheadAttention packs the three input
projections as in_proj_weight [3D, D] (rows q, then k, then v) and in_proj_bias [3D].

Layer mapping (torch -> refimpl):
    self_attn      -> self_attn           norm1 -> self_attn_norm
    multihead_attn -> cross_attn          norm2 -> cross_attn_norm (decoder layer)
    linear1        -> ffn.fc1             norm2 -> ffn_norm (encoder layer)
    linear2        -> ffn.fc2             norm3 -> ffn_norm (decoder layer)

A decoder-only refimpl layer (no cross-attention) has exactly nn.TransformerEncoderLayer's
structure, so a causal LM built as Embedding + nn.TransformerEncoder (run with a causal mask)
+ Linear converts to the decoder-only family. Missing biases (bias=False) and norms without
elementwise affine become zeros and ones. torch is imported only inside these functions, so
refimpl imports without it.
"""

import inspect
import math
import re
import warnings
from pathlib import Path

import numpy as np

from ..config import SPECIAL_IDS, Config
from ..errors import RefformerError, check
from ..io import check_params, check_tokenizer_matches, few_names, parse_tokenizer, save
from ..model import embed_forward
from ..ops import sinusoidal_table
from ..tree import tree_cast

SRC_WORDS = ("src", "source", "encoder", "enc")  # whole words of a name (split at . and _), or src inside one
TGT_WORDS = ("tgt", "trg", "target", "decoder", "dec")
HEAD_WORDS = ("generator", "lm_head", "head", "fc_out", "out", "proj", "classifier", "logit", "linear")
EMBEDDING_WORDS = ("emb", "wte", "tok")

# Config fields a state_dict cannot record, accepted by from_state_dict / convert_state_dict_file.
ARCH_FIELDS = ("n_heads", "norm_first", "activation", "norm_eps", "dropout", "pad_id", "bos_id", "eos_id", "unk_id",
               "embed_scale", "positional", "max_positions")
# Config fields a live module cannot tell, accepted as from_torch overrides.
OVERRIDABLE = ("embed_scale", "positional", "max_positions", "dropout", "pad_id", "bos_id", "eos_id", "unk_id")
# The position encodings an nn.Transformer model can have in front of its stacks (refimpl.model.embed_forward's):
# none (the textbook Embedding + nn.Transformer + Linear), sinusoidal (a fixed table) or learned (an nn.Embedding).
TORCH_POSITIONALS = ("none", "sinusoidal", "learned")
# from_torch's probe: ids [B, S] and [B, T] with B, S, T all different, so that the shape of what a stack receives
# tells which ids it holds and in which orientation; its match to a candidate is a max-norm relative error.
PROBE_SIZES = (2, 5, 3)
PROBE_TOLERANCE = 1e-4  # candidates differ by O(1): sqrt(D) against 1, a position row against none


def _torch():
    try:
        import torch
    except ImportError:
        raise RefformerError("converting from PyTorch needs torch: pip install 'refformer[torch]'") from None
    return torch


# ---------------------------------------------------------------------------- tensors -> arrays


def _array(value, name):
    """A torch tensor or numpy array -> a numpy copy: float64 stays float64, other floats become float32."""
    if isinstance(value, np.ndarray):
        array = value
    elif hasattr(value, "detach") and hasattr(value, "is_floating_point"):  # a torch tensor
        check(not getattr(value, "is_meta", False), f"{name} is a meta tensor (a shape without data, as from "
                                                    "torch.device('meta')); save the state_dict of a loaded model")
        tensor = value.detach().cpu()
        check(tensor.layout == _torch().strided, f"{name} is a {tensor.layout} tensor; refformer converts dense "
                                                 "tensors only (save the model's state_dict with tensor.to_dense())")
        check(not tensor.is_quantized, f"{name} is a quantized tensor; dequantize the model before converting it")
        if tensor.is_floating_point() and tensor.dtype not in (_torch().float32, _torch().float64):
            tensor = tensor.float()  # float16 / bfloat16 have no (or no exact) numpy twin
        try:
            array = tensor.numpy()
        except (TypeError, RuntimeError) as error:  # a dtype NumPy has no twin of
            raise RefformerError(f"{name} cannot be read as an array ({str(error).splitlines()[0]})") from None
    else:
        raise RefformerError(f"{name} is a {type(value).__name__}, expected a tensor")
    check(array.dtype.kind == "f", f"{name} has dtype {array.dtype}, expected floating point")
    array = np.array(array, dtype=np.float64 if array.dtype == np.float64 else np.float32)
    check(bool(np.all(np.isfinite(array))), f"{name} holds NaN or infinite values: refformer will not convert it")
    return array


def _flat_arrays(module):
    """{state_dict key: numpy array} of a torch module."""
    return {key: _array(value, key) for key, value in module.state_dict().items()}


def _same_tensor(a, b):
    """True when a and b are the same storage (a tied weight), torch tensors or numpy arrays."""
    if a is b:
        return True
    if hasattr(a, "data_ptr") and hasattr(b, "data_ptr"):
        return (a.data_ptr() == b.data_ptr() and tuple(a.shape) == tuple(b.shape)
                and tuple(a.stride()) == tuple(b.stride()))
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return a.shape == b.shape and np.shares_memory(a, b)
    return False


# ---------------------------------------------------------------------------- flat dict -> param tree


def _take(flat, used, key):
    """flat[key] (marking it used), or None when absent."""
    if key in flat:
        used.add(key)
        return flat[key]
    return None


def _linear_from_flat(flat, used, prefix):
    """torch Linear {weight [out, in], bias [out]} -> {"weight" [in, out], "bias" [out]}."""
    weight = _take(flat, used, prefix + "weight")
    check(weight is not None and weight.ndim == 2, f"{prefix}weight is missing or is not a matrix")
    bias = _take(flat, used, prefix + "bias")
    bias = np.zeros(weight.shape[0], weight.dtype) if bias is None else bias
    check(bias.shape == weight.shape[:1], f"{prefix}bias is {list(bias.shape)}, expected [{weight.shape[0]}]")
    return {"weight": np.ascontiguousarray(weight.T), "bias": bias.copy()}


def _norm_from_flat(flat, used, prefix, d_model, dtype):
    """LayerNorm {weight, bias} (ones / zeros where the module has no affine parameters)."""
    weight = _take(flat, used, prefix + "weight")
    bias = _take(flat, used, prefix + "bias")
    for name, value in (("weight", weight), ("bias", bias)):
        check(value is None or value.shape == (d_model,),
              f"{prefix}{name} is {list(value.shape) if value is not None else None}, expected [{d_model}]")
    return {"weight": np.ones(d_model, dtype) if weight is None else weight.copy(),
            "bias": np.zeros(d_model, dtype) if bias is None else bias.copy()}


def _mha_from_flat(flat, used, prefix):
    """nn.MultiheadAttention's state_dict entries under prefix -> {q_proj, k_proj, v_proj, out_proj}."""
    for extra in ("bias_k", "bias_v"):
        check(prefix + extra not in flat, f"{prefix}{extra}: attention with add_bias_kv=True is not supported")
    packed = _take(flat, used, prefix + "in_proj_weight")
    if packed is not None:
        check(packed.ndim == 2 and packed.shape[0] == 3 * packed.shape[1],
              f"{prefix}in_proj_weight must be [3D, D], got {list(packed.shape)}")
        weights = np.split(packed, 3)  # [3D, D] -> q, k, v [D, D] (torch's [out, in])
    else:
        weights = [_take(flat, used, f"{prefix}{name}_proj_weight") for name in "qkv"]
        check(all(w is not None for w in weights), f"{prefix}: neither in_proj_weight nor q/k/v_proj_weight found")
    d_model = weights[0].shape[0]
    check(all(w.shape == (d_model, d_model) for w in weights),
          f"{prefix}: attention with kdim or vdim different from embed_dim={d_model} is not supported")
    bias = _take(flat, used, prefix + "in_proj_bias")
    bias = np.zeros(3 * d_model, weights[0].dtype) if bias is None else bias
    check(bias.shape == (3 * d_model,), f"{prefix}in_proj_bias is {list(bias.shape)}, expected [{3 * d_model}]")
    p = {f"{name}_proj": {"weight": np.ascontiguousarray(w.T), "bias": b.copy()}
         for name, w, b in zip("qkv", weights, np.split(bias, 3))}
    p["out_proj"] = _linear_from_flat(flat, used, prefix + "out_proj.")
    return p


def _layer_from_flat(flat, used, prefix, cross):
    """A TransformerEncoderLayer (cross=False) or TransformerDecoderLayer (cross=True) under prefix."""
    p = {"self_attn": _mha_from_flat(flat, used, prefix + "self_attn.")}
    d_model, dtype = p["self_attn"]["q_proj"]["weight"].shape[0], p["self_attn"]["q_proj"]["weight"].dtype
    p["self_attn_norm"] = _norm_from_flat(flat, used, prefix + "norm1.", d_model, dtype)
    if cross:
        p["cross_attn"] = _mha_from_flat(flat, used, prefix + "multihead_attn.")
        p["cross_attn_norm"] = _norm_from_flat(flat, used, prefix + "norm2.", d_model, dtype)
    p["ffn"] = {"fc1": _linear_from_flat(flat, used, prefix + "linear1."),
                "fc2": _linear_from_flat(flat, used, prefix + "linear2.")}
    p["ffn_norm"] = _norm_from_flat(flat, used, prefix + ("norm3." if cross else "norm2."), d_model, dtype)
    return p


# ---------------------------------------------------------------------------- modules -> param tree


def _check_type(module, cls, what):
    check(isinstance(module, cls), f"{what} must be a torch.nn.{cls.__name__}, got {type(module).__name__}")


def _check_mha(mha):
    """Reject an nn.MultiheadAttention that refimpl's attention cannot reproduce."""
    _check_type(mha, _torch().nn.MultiheadAttention, "mha")
    check(mha.bias_k is None, "nn.MultiheadAttention with add_bias_kv=True is not supported")
    check(not mha.add_zero_attn, "nn.MultiheadAttention with add_zero_attn=True is not supported")
    check(mha.kdim == mha.embed_dim and mha.vdim == mha.embed_dim,
          f"nn.MultiheadAttention with kdim={mha.kdim}, vdim={mha.vdim} != embed_dim={mha.embed_dim} is not supported")


def mha_params_from_torch(mha):
    """nn.MultiheadAttention (packed in_proj or separate q/k/v_proj_weight) -> our attention params.

    {q_proj, k_proj, v_proj, out_proj} each {"weight" [D, D] (in, out), "bias" [D]}, float64 for a
    float64 module, float32 otherwise.
    Raises RefformerError for a module refimpl's attention cannot reproduce.
    """
    _check_mha(mha)
    return _mha_from_flat(_flat_arrays(mha), set(), "")


def _layer_from_torch(layer, cross):
    """nn.TransformerEncoderLayer (cross=False) / nn.TransformerDecoderLayer (cross=True) -> (params, layer config)."""
    nn = _torch().nn
    _check_type(layer, nn.TransformerDecoderLayer if cross else nn.TransformerEncoderLayer, "layer")
    config = config_from_torch_layer(layer)  # rejects what refimpl cannot reproduce
    for name in ("self_attn", "multihead_attn") if cross else ("self_attn",):
        _check_mha(getattr(layer, name))
    return _layer_from_flat(_flat_arrays(layer), set(), "", cross), config


def encoder_layer_params_from_torch(layer):
    """nn.TransformerEncoderLayer -> {self_attn, self_attn_norm, ffn: {fc1, fc2}, ffn_norm}.

    This is also a decoder-only layer (self-attention without cross-attention).
    Raises RefformerError for a layer refimpl cannot reproduce.
    """
    return _layer_from_torch(layer, cross=False)[0]


def decoder_layer_params_from_torch(layer):
    """nn.TransformerDecoderLayer -> {self_attn, self_attn_norm, cross_attn, cross_attn_norm, ffn, ffn_norm}.

    Raises RefformerError for a layer refimpl cannot reproduce.
    """
    return _layer_from_torch(layer, cross=True)[0]


def _activation_name(activation):
    """torch's layer.activation (a function or module) -> our activation name."""
    nn, functional = _torch().nn, _torch().nn.functional
    if activation is functional.relu or isinstance(activation, nn.ReLU):
        return "relu"
    if activation is functional.gelu or (isinstance(activation, nn.GELU) and activation.approximate == "none"):
        return "gelu"
    if isinstance(activation, nn.GELU) and activation.approximate == "tanh":
        return "gelu_tanh"
    if activation is functional.silu or isinstance(activation, nn.SiLU):
        return "silu"
    raise RefformerError(f"activation {activation!r} is not supported: use relu, gelu (exact), "
                         f"nn.GELU(approximate='tanh') or silu")


def config_from_torch_layer(layer):
    """The Config fields a TransformerEncoderLayer / TransformerDecoderLayer records.

    -> {"d_model", "n_heads", "d_ff", "norm_first", "activation", "norm_eps", "dropout"}.
    Raises RefformerError for a layer refimpl cannot reproduce.
    """
    nn = _torch().nn
    check(isinstance(layer, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)),
          f"layer must be a torch.nn.TransformerEncoderLayer or TransformerDecoderLayer, got {type(layer).__name__}")
    cross = isinstance(layer, nn.TransformerDecoderLayer)
    d_model = layer.self_attn.embed_dim
    norms = [layer.norm1, layer.norm2] + ([layer.norm3] if cross else [])
    for norm in norms:
        check(isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) == (d_model,),
              f"the layer's norms must be nn.LayerNorm({d_model}), got {norm!r}")
    eps = {norm.eps for norm in norms}
    check(len(eps) == 1, f"the layer's norms have different eps {sorted(eps)}; refformer uses one norm_eps")
    heads = {layer.self_attn.num_heads} | ({layer.multihead_attn.num_heads} if cross else set())
    check(len(heads) == 1, "self- and cross-attention have different numbers of heads; refformer uses one n_heads")
    return {"d_model": d_model, "n_heads": layer.self_attn.num_heads, "d_ff": layer.linear1.out_features,
            "norm_first": bool(layer.norm_first), "activation": _activation_name(layer.activation),
            "norm_eps": float(eps.pop()), "dropout": float(layer.dropout.p)}


# ---------------------------------------------------------------------------- naming heuristics


def _side(name):
    """Which side a name says it is: "src" (src_tok_emb, encoder_embedding), "tgt" (tgt_embed, dec_emb) or None."""
    lower = name.lower()
    words = re.split(r"[._]", lower)
    is_src = "src" in lower or any(word in SRC_WORDS for word in words)
    is_tgt = "tgt" in lower or "trg" in lower or any(word in TGT_WORDS for word in words)
    return "src" if is_src and not is_tgt else "tgt" if is_tgt and not is_src else None


def _is_position_name(name):
    """pos_embedding, positional_encoding.pe, tgt_pos.weight, position_embeddings ... (not post_norm)."""
    lower = name.lower()
    return re.search(r"(^|[._])pos(?!t)", lower) is not None or "pe" in re.split(r"[._]", lower)


def _src_tgt(named, what):
    """[(name, x)] -> (source item, target item): a single item is both; two are told apart by name."""
    if len(named) == 1:
        return named[0], named[0]
    sides = [_side(name) for name, _ in named]
    if len(named) == 2 and sides in (["src", "tgt"], ["src", None], [None, "tgt"]):
        return named[0], named[1]
    if len(named) == 2 and sides in (["tgt", "src"], ["tgt", None], [None, "src"]):
        return named[1], named[0]
    raise RefformerError(f"cannot tell the source {what} from the target one among {few_names([n for n, _ in named])}: "
                         f"name them with src/source/encoder and tgt/target/decoder")


def _as_position_table(array, d_model):
    """A positional table [N, D] from [N, D], [N, 1, D] or [1, N, D]; None when it has another shape."""
    if array.ndim < 2 or array.shape[-1] != d_model or sum(s != 1 for s in array.shape[:-1]) > 1:
        return None
    return array.reshape(-1, d_model)


def _is_sinusoidal(table):
    """Does the [N, D] table equal refimpl's sinusoidal table (to float32 rounding of large angles)?"""
    reference = sinusoidal_table(*table.shape)
    return bool(np.max(np.abs(table - reference), initial=0.0) <= 1e-3)


# ---------------------------------------------------------------------------- config assembly


def _make_config(read, given, overridable, source):
    """Config from what the weights record (read) and what the caller gave (given; None = not given)."""
    fields = dict(read)
    for name, value in given.items():
        if value is None:
            continue
        if name in overridable:
            fields[name] = value
        elif name in read:
            check(read[name] == value, f"{name}={value!r} contradicts the {source}, which has {name}={read[name]!r}")
        else:
            allowed = sorted(set(overridable))
            raise RefformerError(f"unknown or unsettable option {name!r} for the {source}: use {', '.join(allowed)}")
    return Config(**fields)


def _assemble(cfg, stacks, embeddings, positions, head):
    """The parameter tree of cfg from converted pieces, checked against param_shapes(cfg)."""
    dtype = embeddings["tgt"].dtype
    params = {}
    for stack in ("encoder", "decoder") if cfg.is_encoder_decoder else ("decoder",):
        side = "src" if stack == "encoder" else "tgt"
        tree = {}
        if stack == "decoder" or not cfg.share_embeddings:
            tree["embed_tokens"] = {"weight": embeddings[side].copy()}
        if cfg.positional == "learned":
            tree["embed_positions"] = {"weight": positions[side].copy()}
        tree["layers"] = stacks[stack]["layers"]
        if cfg.final_norm:
            tree["final_norm"] = stacks[stack]["final_norm"]
        params[stack] = tree
    lm_head = {}
    if not cfg.tie_embeddings:
        lm_head["weight"] = np.ascontiguousarray(head["weight"].T)  # [V, D] -> [D, V]
    if cfg.lm_head_bias:
        lm_head["bias"] = head["bias"].copy()
    if lm_head:
        params["lm_head"] = lm_head
    params = tree_cast(params, dtype)
    check_params(cfg, params)
    return params


# ---------------------------------------------------------------------------- live modules


def _owned(module):
    """ids of module and everything under it."""
    return {id(m) for m in module.modules()} | {id(p) for p in module.parameters()}


def _stack_from_torch(stack, cross):
    """nn.TransformerEncoder / nn.TransformerDecoder -> ({"layers", "final_norm"}, layer config, final norm eps)."""
    nn = _torch().nn
    layer_type = nn.TransformerDecoderLayer if cross else nn.TransformerEncoderLayer
    kind = type(stack).__name__
    check(len(stack.layers) >= 1, f"the {kind} has no layers")
    configs = []
    layers = []
    for i, layer in enumerate(stack.layers):
        check(isinstance(layer, layer_type),
              f"{kind}.layers[{i}] is a {type(layer).__name__}, expected {layer_type.__name__}")
        params, config = _layer_from_torch(layer, cross)
        layers.append(params)
        configs.append(config)
    check(all(c == configs[0] for c in configs), f"the layers of the {kind} differ in architecture: {configs}")
    tree = {"layers": layers}
    eps = None
    if stack.norm is not None:
        d_model = configs[0]["d_model"]
        check(isinstance(stack.norm, nn.LayerNorm) and tuple(stack.norm.normalized_shape) == (d_model,),
              f"the {kind}'s final norm must be nn.LayerNorm({d_model}), got {stack.norm!r}")
        tree["final_norm"] = _norm_from_flat(_flat_arrays(stack.norm), set(), "", d_model,
                                             layers[0]["self_attn"]["q_proj"]["weight"].dtype)
        eps = stack.norm.eps
    return tree, configs[0], eps


def from_torch(module, **overrides):
    """(cfg, params) from a live model: nn.Embedding(s) + nn.Transformer (or nn.TransformerEncoder) + nn.Linear head.

    Found in the module: an nn.Transformer, or one nn.TransformerEncoder plus one nn.TransformerDecoder
    (encoder-decoder family), or a lone nn.TransformerEncoder, which is taken to be a causal LM run with a
    causal mask (decoder-only family); the token nn.Embedding(s) (one = shared; two = source and target,
    told apart by names containing src/source/encoder and tgt/trg/target/decoder); a learned positional
    nn.Embedding (or nn.Parameter) named like pos/position; an nn.Linear LM head with out_features =
    vocab size (tied when its weight is the target embedding's tensor). D, H, F, layer counts,
    norm_first, activation, norm eps, final norms, head bias, vocabulary size and dropout come from
    the module.

    What only the module's forward code shows, whether it scales embeddings by sqrt(D) (embed_scale) and which
    positions it adds (positional "none", "sinusoidal" or "learned"), is decided by running the module: its forward
    is called once on probe ids (in eval mode, without gradients; see _probe_stack_inputs) and the input of each
    transformer stack is compared with refimpl.model.embed_forward under every candidate, (positional, embed_scale)
    in {none, sinusoidal (or learned, when the module has a learned table)} x {True, False}; the one candidate
    within PROBE_TOLERANCE is taken. Options given are checked the same way. When the forward cannot be called
    that way (another signature), a learned table or a sinusoidal buffer (named like pe/pos) fixes positional, and
    whatever is still unknown must be given: RefformerError names the options to pass.

    overrides (Config field names): embed_scale, positional ("none", "sinusoidal" or "learned"),
    max_positions (default: the positional table's length, else 512), dropout, pad_id (default: the token
    embedding's padding_idx when the module's forward masks it, else null: no token is masked as padding that the
    module attends to; see _check_whole_forward, which also refuses a forward whose logits refformer does not
    reproduce: no causal mask, other masks, operations after the head), bos_id,
    eos_id, unk_id (defaults 1, 2, 3). batch_first does not matter.
    Raises RefformerError for a module or override refimpl cannot reproduce (bad values as Config names them), a
    probe that matches no candidate (or several), or options the module cannot tell and that were not given.
    """
    nn = _torch().nn
    check(isinstance(module, nn.Module), f"from_torch needs a torch.nn.Module, got {type(module).__name__}")
    family, stacks, layer_cfg, final_norm, used = _find_stacks(module)
    d_model = layer_cfg["d_model"]
    tokens, learned_positions = _find_embeddings(module, used, d_model)
    check(tokens, "no token nn.Embedding found: from_torch needs the whole model (embeddings, transformer, LM head)")
    check(len(tokens) <= (2 if family == "encoder-decoder" else 1),
          f"found {len(tokens)} token embeddings ({few_names([n for n, _ in tokens])}); expected "
          f"{'1 or 2' if family == 'encoder-decoder' else 'one for a decoder-only model'}")
    (src_name, src_embed), (tgt_name, tgt_embed) = _src_tgt(tokens, "embedding")
    vocab_size = tgt_embed.num_embeddings
    check(src_embed.weight.shape == tgt_embed.weight.shape,
          f"{src_name} is {list(src_embed.weight.shape)} but {tgt_name} is {list(tgt_embed.weight.shape)}: "
          f"refformer uses one vocabulary")
    check(tgt_embed.embedding_dim == d_model,
          f"{tgt_name} has width {tgt_embed.embedding_dim}, the transformer's d_model is {d_model}")
    head_name, head = _find_head(module, used, d_model, vocab_size)
    unknown = [name for name, p in module.named_parameters() if id(p) not in used]
    check(not unknown, f"the module has parameters refformer cannot map: {few_names(unknown)}")
    read_positional, position_tables = _find_positions(module, learned_positions, d_model)

    read = {"family": family, "vocab_size": vocab_size, "d_model": d_model, "n_heads": layer_cfg["n_heads"],
            "d_ff": layer_cfg["d_ff"], "n_encoder_layers": len(stacks.get("encoder", {"layers": []})["layers"]),
            "n_decoder_layers": len(stacks["decoder"]["layers"]), "norm_first": layer_cfg["norm_first"],
            "norm": "layernorm", "norm_eps": layer_cfg["norm_eps"], "final_norm": final_norm,
            "activation": layer_cfg["activation"], "share_embeddings": src_embed is tgt_embed,
            "tie_embeddings": _same_tensor(head.weight, tgt_embed.weight), "lm_head_bias": head.bias is not None,
            "dropout": layer_cfg["dropout"],
            "pad_id": None if tgt_embed.padding_idx is None else int(tgt_embed.padding_idx)}
    if "max_positions" in read_positional:
        read["max_positions"] = read_positional["max_positions"]
    given = overrides.get("positional")
    check(given is None or given in TORCH_POSITIONALS,
          f"positional={given!r}: an nn.Transformer model has positional "
          f"{', '.join(repr(p) for p in TORCH_POSITIONALS)} (its attention has no relative or rotary positions)")
    if learned_positions and given not in (None, "learned"):
        raise RefformerError(f"positional={given!r} contradicts the module, which has positional='learned'")
    check(given != "learned" or bool(learned_positions),
          "positional='learned' but the module has no positional nn.Embedding (named like pos/position)")
    embeddings = {"src": _array(src_embed.weight, src_name), "tgt": _array(tgt_embed.weight, tgt_name)}
    call = {}
    read.update(_decide_embedding(module, family, read, overrides, read_positional.get("positional"),
                                  embeddings, position_tables, call))
    overridable = set(OVERRIDABLE) - {"positional", "embed_scale"} - ({"max_positions"} if learned_positions
                                                                       else set())
    cfg = _make_config(read, overrides, overridable, "module")
    head_arrays = {"weight": _array(head.weight, head_name),
                   "bias": None if head.bias is None else _array(head.bias, head_name + ".bias")}
    params = _assemble(cfg, stacks, embeddings, position_tables, head_arrays)
    if call.get("extras") is False:  # forward(src, tgt) / forward(ids): its logits can be checked whole
        cfg = _check_whole_forward(module, cfg, params, call["sequence_first"], "pad_id" in overrides)
    return cfg, params


def _check_whole_forward(module, cfg, params, sequence_first, pad_given):
    """cfg, its pad_id decided by the module's own logits: the module is run whole on probe ids (as the probe
    called it) and its output compared with refimpl.model_forward (default masks: causal target, pad_id keys
    masked). When the token embedding's padding_idx gave pad_id (not an override), the probe ids hold it and
    pad_id stays only if the module masks it (else null: a padding id the forward never masks must not mask what
    it attends to). An output that is not logits [B, T, V] (or [T, B, V] sequence-first) is not checked.
    Raises RefformerError when no candidate reproduces the logits: the forward does more than embeddings +
    transformer + head (no causal mask on the target, other masks, operations after the head)."""
    from ..model import model_forward

    torch = _torch()
    # a decoder-only [B, T] may be read as [T, B]: B, T >= 3 puts a position 1 (attended to by a later real query,
    # itself attending to a real position 0: no query sees only padding) in the middle of both readings
    B, S, T = PROBE_SIZES if cfg.is_encoder_decoder else (3, None, 4)
    rng = np.random.default_rng(1)
    pad = cfg.pad_id
    ordinary = np.array([i for i in range(cfg.vocab_size) if i != pad] or [0])
    src, tgt = rng.choice(ordinary, (B, S or 1)), rng.choice(ordinary, (B, T))
    candidates = [pad]
    if pad is not None and not pad_given:
        # padding at the end of a source row and at position 1 of the target, where a later real query attends
        # to it (the causal mask hides a last one; an encoder-decoder's first target token is its decoder start)
        src[0, -2:] = pad
        tgt[1, 1] = pad
        candidates = [pad, None]
    inputs = [src, tgt] if cfg.is_encoder_decoder else [tgt]
    device = next(module.parameters()).device
    training = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            output = module(*[torch.from_numpy(a.T.copy() if sequence_first else a).to(device) for a in inputs])
    except Exception:  # a forward that ran up to the stacks but not through with these ids: left unchecked
        return cfg
    finally:
        for m, flag in training.items():
            m.training = flag
    shape = (T, B, cfg.vocab_size) if sequence_first else (B, T, cfg.vocab_size)
    if not isinstance(output, torch.Tensor) or tuple(output.shape) != shape or not output.is_floating_point():
        return cfg
    theirs = output.detach().cpu().double().numpy()
    theirs = theirs.transpose(1, 0, 2) if sequence_first else theirs
    # the ids as the module read them: a decoder-only module given [B, T] may read it as [T, B] (the probe's
    # shapes cannot tell, src and tgt do for an encoder-decoder), so both readings are tried there
    readings = [(tgt, theirs)] + ([] if cfg.is_encoder_decoder else [(tgt.T, theirs.transpose(1, 0, 2))])
    params64 = tree_cast(params, np.float64)
    errors = {}
    for candidate in candidates:
        trial = cfg.replace(pad_id=candidate)
        for ids, expected in readings:
            real = ids != pad if pad is not None else np.ones(ids.shape, bool)  # padding rows are not logits
            ours, _ = model_forward(trial, params64, src if cfg.is_encoder_decoder else None, ids)
            scale = max(float(np.max(np.abs(expected[real]))), 1e-30)
            error = float(np.max(np.abs(ours[real] - expected[real]))) / scale
            errors[candidate] = min(errors.get(candidate, math.inf), error)
            if error <= PROBE_TOLERANCE:
                return trial
    shown = ", ".join(f"pad_id={json_id}: {error:.1e}" for json_id, error in
                      (("null" if c is None else c, e) for c, e in errors.items()))
    raise RefformerError(f"the module's forward computes other logits than its embeddings, transformer and head do "
                         f"in refformer (max-norm relative errors on probe ids: {shown}): refformer applies a causal "
                         f"mask to the target, masks pad_id keys and nothing after the head; a forward without the "
                         f"causal mask, with other masks or with operations after its head cannot be converted")


def _decide_embedding(module, family, read, overrides, shown, embeddings, position_tables, call=None):
    """{"positional", "embed_scale"} of a live module: the one candidate its probe matches (see from_torch), or,
    when the probe cannot run, shown (the positional its tables show: "learned", "sinusoidal" or None) and the
    overrides. Raises RefformerError naming the options to pass when neither decides."""
    learned = shown == "learned"
    positionals = [overrides["positional"]] if overrides.get("positional") is not None else (
        ["learned", "none"] if learned else ["none", "sinusoidal"])
    scales = [bool(overrides["embed_scale"])] if overrides.get("embed_scale") is not None else [False, True]
    captured, reason = _probe_stack_inputs(module, family, read["vocab_size"], read["pad_id"], call)
    if captured is None:
        decided = {"positional": positionals[0] if len(positionals) == 1 else shown,
                   "embed_scale": scales[0] if len(scales) == 1 else None}
        missing = [name for name, value in decided.items() if value is None]
        options = {"positional": "positional='none' or 'sinusoidal'", "embed_scale": "embed_scale=True or False"}
        check(not missing, f"from_torch cannot tell {' or '.join(missing)} from the module's weights and could not "
                           f"run its forward on probe ids ({reason}): pass {' and '.join(options[m] for m in missing)}")
        return decided
    errors = {}
    for positional in positionals:
        for scale in scales:
            fields = {**read, "positional": positional, "embed_scale": scale, "dropout": 0.0}
            if positional != "learned":
                fields["max_positions"] = max(read.get("max_positions", 1), max(PROBE_SIZES))
            candidate = Config(**fields)
            errors[positional, scale] = _probe_error(candidate, captured, embeddings, position_tables)
    matches = [key for key, error in errors.items() if error <= PROBE_TOLERANCE]
    shown_errors = ", ".join(f"positional={p!r}, embed_scale={s}: {e:.1e}" for (p, s), e in errors.items())
    check(matches, f"the module's forward feeds its transformer embeddings that no candidate reproduces "
                   f"(max-norm relative errors on probe ids: {shown_errors}): refformer cannot convert it")
    alike = " and ".join(f"positional={p!r}, embed_scale={s}" for p, s in matches)
    check(len(matches) == 1, f"probe ids cannot tell {alike} apart (the module's embeddings match both): pass "
                             f"positional= and embed_scale=")
    (positional, scale), = matches
    return {"positional": positional, "embed_scale": scale}


def _probe_error(cfg, captured, embeddings, position_tables):
    """The largest max-norm relative error between each captured stack input x [B', L', D] and
    refimpl.model.embed_forward of cfg on its ids [B, S] (or their transpose, for a module that reads the probe ids
    sequence-first); inf when x has neither shape."""
    worst = 0.0
    for stack, (ids, x) in captured.items():
        side = "src" if stack == "encoder" else "tgt"
        ids = ids if x.shape[:2] == ids.shape else ids.T
        if x.shape != (*ids.shape, cfg.d_model):
            return math.inf
        p_stack = {"embed_positions": {"weight": position_tables[side]}} if cfg.positional == "learned" else {}
        positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
        if cfg.positional == "learned" and ids.shape[1] > position_tables[side].shape[0]:
            return math.inf
        ours, _ = embed_forward(cfg, {"weight": embeddings[side].astype(np.float64)},
                                {k: {"weight": v["weight"].astype(np.float64)} for k, v in p_stack.items()},
                                ids, positions)
        worst = max(worst, float(np.max(np.abs(ours - x)) / max(float(np.max(np.abs(x))), 1e-30)))
    return worst


class _ProbeDone(Exception):
    """Raised by the probe's hook once every stack's input is captured: the rest of the forward need not run."""


def _probe_stack_inputs(module, family, vocab_size, pad_id, call=None):
    """Call module's forward on probe ids and capture what each transformer stack receives.

    Calls module(src, tgt) (encoder-decoder) or module(ids) (decoder-only) with int64 ids [B, S], [B, T]
    (PROBE_SIZES; ordinary ids, not the padding_idx), then with them transposed [S, B], [T, B] (a sequence-first
    forward); further required positional arguments get None, then all-False boolean masks shaped like the ids [B, L]
    (a name with tgt/trg/target/dec: the target's), then those masks transposed. The first call that reaches the
    stacks wins. A forward pre-hook on each nn.TransformerEncoder / nn.TransformerDecoder
    records its input and stops the forward once all are recorded. The ids are put on the module's device; it
    runs in eval mode under no_grad;
    every submodule's training flag is restored.
    Returns ({stack: (ids [B, L] int64 as passed, x float64 [B', L', D] batch-major: the stack's input, transposed
    when the stack is sequence-first)}, None), or (None, why the forward could not be run so); a dict call, when
    given, receives how the call that worked passed the ids: {"sequence_first": bool, "extras": bool (further
    arguments were filled in)}. Raises nothing of its own.
    """
    torch = _torch()
    nn = torch.nn
    kinds = {"encoder": nn.TransformerEncoder, "decoder": nn.TransformerDecoder}
    found = {name: [m for m in module.modules() if isinstance(m, kind)] for name, kind in kinds.items()}
    stacks = ({"encoder": found["encoder"][0], "decoder": found["decoder"][0]} if family == "encoder-decoder"
              else {"decoder": found["encoder"][0]})
    B, S, T = PROBE_SIZES
    rng = np.random.default_rng(0)
    ordinary = np.array([i for i in range(vocab_size) if i != pad_id] or [0])
    ids = {"encoder": rng.choice(ordinary, (B, S)), "decoder": rng.choice(ordinary, (B, T))}
    order = ["encoder", "decoder"] if family == "encoder-decoder" else ["decoder"]
    try:
        names = [p.name for p in inspect.signature(module.forward).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    except (TypeError, ValueError):
        names = []
    extras = names[len(order):]
    device = next(iter(stacks.values())).layers[0].linear1.weight.device  # the probe ids go where the module is

    def masks(transposed):
        out = []
        for name in extras:
            side = "decoder" if _side(name) == "tgt" or family == "decoder-only" else "encoder"
            shape = ids[side].shape[::-1] if transposed else ids[side].shape
            out.append(torch.zeros(shape, dtype=torch.bool, device=device))
        return out

    captured = {}

    def hook(name):
        def record(stack, args, kwargs):
            x = args[0] if args else kwargs.get("src", kwargs.get("tgt"))
            if name not in captured and x is not None:
                x = x.detach().cpu().double().numpy()
                captured[name] = (ids[name], x if stack.layers[0].self_attn.batch_first else x.transpose(1, 0, 2))
            if len(captured) == len(stacks):
                raise _ProbeDone
        return record

    training = {m: m.training for m in module.modules()}
    handles = [stack.register_forward_pre_hook(hook(name), with_kwargs=True) for name, stack in stacks.items()]
    reason = "it returned without calling the transformer"
    try:
        module.eval()
        fills = [[None] * len(extras), masks(False), masks(True)] if extras else [[]]
        for sequence_first in (False, True):
            inputs = [torch.from_numpy(ids[name].T.copy() if sequence_first else ids[name]).to(device)
                      for name in order]
            for extra in fills:
                captured.clear()
                try:
                    with torch.no_grad(), warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        module(*inputs, *extra)
                except _ProbeDone:
                    if call is not None:
                        call.update(sequence_first=sequence_first, extras=bool(extra))
                    return dict(captured), None
                except Exception as error:  # the module's own code refusing our arguments
                    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                    reason = f"{type(error).__name__}: {first}"[:200]
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in training.items():
            m.training = flag
    return None, reason


def _find_stacks(module):
    """The transformer stacks of module -> (family, {stack: tree}, layer config, final_norm, ids inside them)."""
    nn = _torch().nn
    encoders = [m for m in module.modules() if isinstance(m, nn.TransformerEncoder)]
    decoders = [m for m in module.modules() if isinstance(m, nn.TransformerDecoder)]
    if len(encoders) == 1 and len(decoders) == 1:
        family, found = "encoder-decoder", {"encoder": (encoders[0], False), "decoder": (decoders[0], True)}
    elif len(encoders) == 1 and not decoders:
        family, found = "decoder-only", {"decoder": (encoders[0], False)}  # a causal LM: see the module docstring
    else:
        raise RefformerError(f"from_torch needs a module with one nn.Transformer (or one nn.TransformerEncoder, "
                             f"for a causal LM); found {len(encoders)} TransformerEncoder(s) and "
                             f"{len(decoders)} TransformerDecoder(s)")
    stacks, configs, final_eps = {}, [], []
    for name, (stack, cross) in found.items():
        stacks[name], layer_cfg, eps = _stack_from_torch(stack, cross)
        configs.append(layer_cfg)
        final_eps.append(eps)
    check(all(c == configs[0] for c in configs),
          f"the encoder and decoder layers differ in architecture: {configs[0]} vs {configs[-1]}")
    has_final = {eps is not None for eps in final_eps}
    check(len(has_final) == 1, "the encoder and decoder must both have a final norm or both have none")
    final_norm = has_final.pop()
    check(not final_norm or all(eps == configs[0]["norm_eps"] for eps in final_eps),
          f"the final norms' eps {final_eps} differ from the layers' {configs[0]['norm_eps']}")
    inside = set().union(*(_owned(stack) for stack, _ in found.values()))
    return family, stacks, configs[0], final_norm, inside


def _find_embeddings(module, used, d_model):
    """Tables outside the stacks -> (tokens [(name, nn.Embedding)], positions [(name, nn.Embedding or Parameter)]).

    One entry per distinct weight tensor (a table registered twice is shared); positional ones are named like pos.
    """
    nn = _torch().nn
    tokens, positions = [], []
    for name, m in module.named_modules():
        if isinstance(m, nn.Embedding) and id(m) not in used:
            check(m.max_norm is None, f"{name}: nn.Embedding with max_norm is not supported")
            if not any(_same_tensor(m.weight, other.weight) for _, other in tokens + positions):
                (positions if _is_position_name(name) else tokens).append((name, m))
            used |= {id(m), id(m.weight)}
    for name, p in module.named_parameters():  # a positional table held directly as an nn.Parameter
        if id(p) not in used and _is_position_name(name) and _as_position_table(_array(p, name), d_model) is not None:
            positions.append((name, p))
            used.add(id(p))
    return tokens, positions


def _find_head(module, used, d_model, vocab_size):
    """The LM head: the nn.Linear(D, V) outside the stacks (by a head-like name when there are several)."""
    nn = _torch().nn
    heads = [(name, m) for name, m in module.named_modules()
             if isinstance(m, nn.Linear) and id(m) not in used
             and (m.in_features, m.out_features) == (d_model, vocab_size)]
    if len(heads) > 1:
        heads = [(name, m) for name, m in heads if any(word in name.lower() for word in HEAD_WORDS)] or heads
    check(len(heads) == 1, f"expected one nn.Linear({d_model}, {vocab_size}) LM head, found "
                           f"{few_names([n for n, _ in heads]) if heads else 'none'}")
    head_name, head = heads[0]
    used |= {id(head), id(head.weight)} | ({id(head.bias)} if head.bias is not None else set())
    return head_name, head


def _find_positions(module, learned, d_model):
    """-> (Config fields read, {"src", "tgt": [N, D] table} for learned positions).

    Learned tables fix positional="learned" and max_positions; otherwise a floating buffer named like
    pe/pos of shape [N, D] (or [N, 1, D], [1, N, D]) must be refimpl's sinusoidal table and fixes max_positions.
    """
    if learned:
        check(len(learned) <= 2, f"found {len(learned)} positional tables; expected 1 or 2")
        named_tables = [(name, _as_position_table(_array(getattr(m, "weight", m), name), d_model))
                        for name, m in learned]
        check(all(t is not None for _, t in named_tables), f"positional tables must be [N, {d_model}]")
        (_, src_table), (_, tgt_table) = _src_tgt(named_tables, "positional table")
        check(src_table.shape == tgt_table.shape, "the source and target positional tables must have the same length")
        return {"positional": "learned", "max_positions": tgt_table.shape[0]}, {"src": src_table, "tgt": tgt_table}
    read = {}
    for name, buffer in module.named_buffers():
        table = (_as_position_table(_array(buffer, name), d_model)
                 if _is_position_name(name) and buffer.is_floating_point() else None)
        if table is not None:
            check(_is_sinusoidal(table), f"positional buffer {name} is not the standard sinusoidal table "
                                         f"(sin in even columns, cos in odd): refformer cannot reproduce it")
            read = {"positional": "sinusoidal", "max_positions": table.shape[0]}
    return read, {}


# ---------------------------------------------------------------------------- saved state_dicts

_STACK_KEY = re.compile(r"^(.*)layers\.0\.self_attn\.(in_proj_weight|q_proj_weight)$")


def _stack_from_flat(flat, used, root, cross):
    """Layers (root + "layers.i.") and final norm (root + "norm.") of one saved stack."""
    indices = {int(m.group(1)) for key in flat for m in [re.match(re.escape(root) + r"layers\.(\d+)\.", key)] if m}
    check(indices == set(range(len(indices))), f"{root}layers: layer indices {sorted(indices)} are not 0 .. n-1")
    layers = [_layer_from_flat(flat, used, f"{root}layers.{i}.", cross) for i in range(len(indices))]
    tree = {"layers": layers}
    if root + "norm.weight" in flat or root + "norm.bias" in flat:
        weight = layers[0]["self_attn"]["q_proj"]["weight"]
        tree["final_norm"] = _norm_from_flat(flat, used, root + "norm.", weight.shape[0], weight.dtype)
    return tree


def from_state_dict(state_dict, **arch):
    """(cfg, params) from the state_dict of an nn.Transformer-based model (or an nn.TransformerEncoder causal LM).

    D, F, V, layer counts, final norms, head bias, shared/tied embeddings and learned positions are
    read from the tensors (keys like src_embed.weight, transformer.encoder.layers.0.self_attn.in_proj_weight,
    transformer.decoder.norm.weight, generator.weight); arch supplies what a state_dict cannot record:
    n_heads (required), norm_first (False), activation ("relu"), norm_eps (1e-5), dropout (0.1),
    pad_id, bos_id, eos_id, unk_id (0, 1, 2, 3; an id passed as None is null: the model has no such token, and
    pad_id None masks no token as padding, as a forward without key_padding_mask), positional ("none",
    "sinusoidal" or "learned") and embed_scale, max_positions (the table's length, else 512). Another option
    passed as None means "the default". A state_dict with a position table
    shows positional (a learned table: "learned"; the sinusoidal table of PyTorch's translation tutorial:
    "sinusoidal", or "learned" when asked); one without shows no positional encoding, which must be given. No
    state_dict shows embed_scale (a multiplication in the forward code), so it must always be given (PyTorch's
    translation tutorial: True; the textbook Embedding + nn.Transformer + Linear model: positional="none",
    embed_scale=False). Keys that cannot be mapped are an error.
    Raises RefformerError for keys it cannot map, misshapen or non-finite tensors, bad options, embed_scale not given,
    and positional missing where the state_dict does not show it (one line naming the options to pass).
    """
    unknown = sorted(set(arch) - set(ARCH_FIELDS))
    check(not unknown, f"unknown options {unknown}: from_state_dict accepts {', '.join(ARCH_FIELDS)}")
    check(arch.get("n_heads") is not None, "n_heads is required: a state_dict does not record the number of heads")
    check(arch.get("positional") in (None, *TORCH_POSITIONALS),
          f"positional={arch.get('positional')!r}: an nn.Transformer model has positional "
          f"{', '.join(repr(p) for p in TORCH_POSITIONALS)} (its attention has no relative or rotary positions)")
    check(hasattr(state_dict, "items"), f"a state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    raw = dict(state_dict.items())
    bad = [str(key) for key, value in raw.items() if not isinstance(key, str)
           or not (isinstance(value, np.ndarray) or hasattr(value, "is_floating_point"))]
    check(not bad, f"a state_dict must map names to tensors; these entries are not tensors: {few_names(bad)}")
    flat = {key: _array(value, key) for key, value in raw.items()}
    used = set()

    roots = sorted({m.group(1) for key in flat for m in [_STACK_KEY.match(key)] if m})
    decoder_roots = [root for root in roots if any(key.startswith(root + "layers.0.multihead_attn.") for key in flat)]
    encoder_roots = [root for root in roots if root not in decoder_roots]
    if len(encoder_roots) == 1 and len(decoder_roots) == 1:
        family = "encoder-decoder"
        stacks = {"encoder": _stack_from_flat(flat, used, encoder_roots[0], cross=False),
                  "decoder": _stack_from_flat(flat, used, decoder_roots[0], cross=True)}
    elif len(encoder_roots) == 1 and not decoder_roots:
        family = "decoder-only"
        stacks = {"decoder": _stack_from_flat(flat, used, encoder_roots[0], cross=False)}
    else:
        raise RefformerError(f"the state_dict is not an nn.Transformer model: expected keys ending in "
                             f"encoder.layers.0.self_attn.in_proj_weight (and decoder.layers.0...), found "
                             f"{len(encoder_roots)} encoder and {len(decoder_roots)} decoder stacks")
    has_final = {"final_norm" in stack for stack in stacks.values()}
    check(len(has_final) == 1, "the encoder and decoder must both have a final norm (…norm.weight) or both none")
    first = stacks["decoder"]["layers"][0]
    d_model, d_ff = first["self_attn"]["q_proj"]["weight"].shape[0], first["ffn"]["fc1"]["weight"].shape[1]

    # what is left: token embeddings, positional tables, the LM head
    rest = [key for key in flat if key not in used]
    positions = [key for key in rest if _is_position_name(key) and _as_position_table(flat[key], d_model) is not None]
    matrices = [key for key in rest if key not in positions and key.endswith(".weight") and flat[key].ndim == 2
                and flat[key].shape[1] == d_model]
    embedding_keys = [key for key in matrices if any(word in key.lower() for word in EMBEDDING_WORDS)]
    # the head: a Linear (a [V] bias beside it; embeddings have none) or a head-like name (generator, fc_out, ...)
    head_keys = [key for key in matrices if key not in embedding_keys
                 and (key[: -len("weight")] + "bias" in flat
                      or any(word in key[: -len(".weight")].lower() for word in HEAD_WORDS))]
    embedding_keys += [key for key in matrices if key not in embedding_keys and key not in head_keys]
    check(head_keys, f"no LM head weight [V, {d_model}] found (a key like generator.weight, lm_head.weight or "
                     f"fc_out.weight); candidates: {few_names(matrices) if matrices else 'none'}")
    check(len(head_keys) == 1, f"more than one possible LM head: {few_names(head_keys)}")
    head_key = head_keys[0]
    used.add(head_key)
    head_bias_key = head_key[: -len("weight")] + "bias"
    head = {"weight": flat[head_key], "bias": _take(flat, used, head_bias_key)}

    # embeddings: several keys may hold one table (a module registered twice, a tied weight)
    distinct = []
    for key in embedding_keys:
        used.add(key)
        if not any(_same_tensor(raw[key], raw[other]) for other in distinct):
            distinct.append(key)
    check(distinct, "no token embedding [V, D] found (a key like src_embed.weight or embedding.weight)")
    check(len(distinct) <= (2 if family == "encoder-decoder" else 1),
          f"found {len(distinct)} token embeddings ({few_names(distinct)}); expected "
          f"{'1 or 2' if family == 'encoder-decoder' else 'one for a decoder-only model'}")
    src_key, tgt_key = (pair[0] for pair in _src_tgt([(key, None) for key in distinct], "embedding"))
    vocab_size = flat[tgt_key].shape[0]
    check(flat[src_key].shape == flat[tgt_key].shape,
          f"{src_key} is {list(flat[src_key].shape)} but {tgt_key} is {list(flat[tgt_key].shape)}: "
          f"refformer uses one vocabulary")
    check(head["weight"].shape == (vocab_size, d_model),
          f"{head_key} is {list(head['weight'].shape)}, expected [V, D] = {[vocab_size, d_model]}")
    tied = any(_same_tensor(raw[head_key], raw[key]) for key in embedding_keys
               if _same_tensor(raw[key], raw[tgt_key]))

    read_positional, position_tables, missing = {}, {}, []
    if positions:
        used.update(positions)
        check(len(positions) <= 2,
              f"found {len(positions)} positional tables ({few_names(positions)}); expected 1 or 2")
        (_, position_tables["src"]), (_, position_tables["tgt"]) = _src_tgt(
            [(key, _as_position_table(flat[key], d_model)) for key in positions], "positional table")
        check(position_tables["src"].shape == position_tables["tgt"].shape,
              "the source and target positional tables must have the same length")
        sinusoidal = all(_is_sinusoidal(table) for table in position_tables.values())
        wanted = arch.get("positional") or ("sinusoidal" if sinusoidal else "learned")
        check(wanted == "learned" or sinusoidal,
              f"positional='sinusoidal' but {few_names(positions)} is not the standard sinusoidal table")
        read_positional = {"positional": wanted, "max_positions": position_tables["tgt"].shape[0]}
        if wanted == "sinusoidal":
            position_tables = {}
    else:
        check(arch.get("positional") != "learned", "positional='learned' but the state_dict has no positional table")
        missing = [option for name, option in (("positional", "positional='none' or 'sinusoidal' (convert-torch "
                                                              "--positional none|sinusoidal)"),
                                               ("embed_scale", "embed_scale=True or False (convert-torch "
                                                               "--embed-scale/--no-embed-scale)"))
                   if arch.get(name) is None]
        read_positional = {"positional": arch.get("positional") or "sinusoidal"}  # checked below, after the options

    leftover = [key for key in flat if key not in used]
    check(not leftover, f"the state_dict has keys refformer cannot map: {few_names(leftover)}")

    read = {"family": family, "vocab_size": vocab_size, "d_model": d_model, "d_ff": d_ff,
            "n_encoder_layers": len(stacks["encoder"]["layers"]) if "encoder" in stacks else 0,
            "n_decoder_layers": len(stacks["decoder"]["layers"]), "norm": "layernorm",
            "final_norm": has_final.pop(), "share_embeddings": src_key == tgt_key, "tie_embeddings": tied,
            "lm_head_bias": head["bias"] is not None}
    read.update(read_positional)
    read.update({name: None for name in SPECIAL_IDS if name in arch and arch[name] is None})  # null, as passed
    overridable = set(ARCH_FIELDS) - {"positional"} - ({"max_positions"} if position_tables else set())
    given = {key: value for key, value in arch.items() if key != "positional"}
    cfg = _make_config(read, given, overridable, "state_dict")  # bad option values are named first
    check(not positions or arch.get("embed_scale") is not None,
          "a state_dict does not show whether the model scales its embeddings by sqrt(D) (PyTorch's translation "
          "tutorial does, the textbook Embedding + nn.Transformer + Linear model does not): pass embed_scale=True or "
          "False (convert-torch --embed-scale/--no-embed-scale)")
    check(not missing, "the state_dict has no position table, so it does not show the model's positional encoding "
                       "or whether it scales embeddings by sqrt(D) (the textbook Embedding + nn.Transformer + Linear "
                       f"model does neither): pass {' and '.join(missing)} (and pad_id=None, --pad-id none, when its "
                       "forward masks no padding)")
    embeddings = {"src": flat[src_key], "tgt": flat[tgt_key]}
    return cfg, _assemble(cfg, stacks, embeddings, position_tables, head)


_WRAPPER_KEYS = ("model_state_dict", "state_dict", "model")


def convert_state_dict_file(path, tokenizer_path, out_dir, *, n_heads=None, norm_first=None, activation=None,
                            pad_id=0, bos_id=1, eos_id=2, unk_id=3, embed_scale=None, positional=None,
                            max_positions=None, norm_eps=None, dropout=None):
    """Convert a torch.save(model.state_dict()) file into a model directory (what `refformer convert-torch` runs).

    The file is read with torch.load(weights_only=True): a pickled module or other objects are refused.
    A training checkpoint {"model_state_dict": ..., ...} is unwrapped. The options are from_state_dict's (a
    special id None: null, no such token); the tokenizer's vocabulary and special ids must match the model's.
    Returns the Config written.
    Everything (the file, the options, the tokenizer) is checked before anything is written: bad input raises
    RefformerError and leaves out_dir untouched (not even created).
    """
    torch = _torch()
    path = Path(path)
    check(path.exists(), f"{path} does not exist")
    check(path.is_file(), f"{path} is not a file (a state_dict saved with torch.save)")
    check(tokenizer_path is None or Path(tokenizer_path).exists(), f"tokenizer {tokenizer_path} does not exist")
    check(tokenizer_path is None or Path(tokenizer_path).is_file(), f"tokenizer {tokenizer_path} is not a file")
    tokenizer = None
    if tokenizer_path is not None:
        try:
            tokenizer_json = Path(tokenizer_path).read_bytes().decode("utf-8-sig")  # a byte-order mark is dropped
        except UnicodeDecodeError:
            raise RefformerError(f"tokenizer {tokenizer_path} is not UTF-8 text (a tokenizer.json)") from None
        tokenizer = parse_tokenizer(tokenizer_json, f"tokenizer {tokenizer_path}")  # checked against cfg below
    try:
        with warnings.catch_warnings():  # torch's deprecation notes (TypedStorage, quantized) are not the user's
            warnings.simplefilter("ignore")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, ... for what it will not load
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        first_line = first_line.split(". ")[0]  # torch's message goes on with advice on weights_only=False
        raise RefformerError(f"{path} is not a state_dict of tensors that torch.load(weights_only=True) accepts "
                             f"(a pickled module? save model.state_dict() instead): {first_line}") from None

    def is_state_dict(obj):
        """A non-empty dict whose values are all torch tensors."""
        return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())

    if not is_state_dict(loaded) and isinstance(loaded, dict):
        wrapped = [loaded[key] for key in _WRAPPER_KEYS if is_state_dict(loaded.get(key))]
        loaded = wrapped[0] if len(wrapped) == 1 else loaded
    check(is_state_dict(loaded), f"{path} holds a {type(loaded).__name__}, not a state_dict (a dict of tensors): "
                                 f"save model.state_dict()")
    arch = {"n_heads": n_heads, "norm_first": norm_first, "activation": activation, "pad_id": pad_id,
            "bos_id": bos_id, "eos_id": eos_id, "unk_id": unk_id, "embed_scale": embed_scale,
            "positional": positional, "max_positions": max_positions, "norm_eps": norm_eps, "dropout": dropout}
    cfg, params = from_state_dict(loaded, **arch)
    if tokenizer is not None:
        check_tokenizer_matches(cfg, tokenizer, f"tokenizer {tokenizer_path}")
    save(out_dir, cfg, params, tokenizer=tokenizer)
    return cfg
