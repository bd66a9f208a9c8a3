"""Hugging Face checkpoints -> (Config, params): T5, BART, Marian, GPT-2, Llama and Qwen2, as transformers 5.24 runs
them (each family's modeling_*.py is the definition matched; tests/refimpl/test_hf_parity.py checks logits and every
gradient against it in float64).

    from_hf(path)                          a local Hugging Face folder -> (cfg, params)
    read_hf_config(path)                   its config.json as a dict
    read_hf_tensors(path)                  its weights {checkpoint key: array} (safetensors, sharded or not; or
                                           pytorch_model.bin through torch.load(weights_only=True))
    params_from_hf(hf_config, tensors)     the mapping itself: a config.json dict and {key: array} -> (cfg, params)
    hf_special_ids(hf_config)              pad, bos, eos and decoder start ids as the config states them (or None)

Orientation: nn.Linear stores weight [out, in] (y = x W^T + b) and ours is [in, out], so those matrices are
transposed; GPT-2's Conv1D already stores [in, out] and packs q, k, v as c_attn [D, 3D]. Tied tables follow
transformers' loading rule (PreTrainedModel.tie_weights): when the config ties them, a table the checkpoint leaves
out is the one it names, and two tables present with different values stay apart.

Anything that changes the math and that refformer cannot represent exactly is refused with a RefformerError that
names it (rope_scaling, sliding-window attention, partial_rotary_factor, an unknown model_type, BART/Marian
pre-LN variants, ...); options that only matter in training (dropout placements, layerdrop) are not refused, and
dropout takes the family's main rate. safetensors input needs neither torch nor transformers.
"""

import json
import os
import re
from pathlib import Path

import numpy as np

from ..config import Config
from ..errors import RefformerError, check
from ..io import few_names, unflatten_checked
from ..tree import flatten

SUPPORTED = ("t5", "bart", "marian", "gpt2", "llama", "qwen2")

# transformers' ACT2FN names -> refformer's activations (the same formulas: relu, erf gelu, the tanh gelu, silu)
ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "silu": "silu", "swish": "silu"}

# The defaults of transformers 5.24's config classes for the keys read here: a config.json may leave them out.
DEFAULTS = {
    "gpt2": {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
             "activation_function": "gelu_new", "resid_pdrop": 0.1, "layer_norm_epsilon": 1e-5,
             "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False,
             "tie_word_embeddings": True, "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": None},
    "bart": {"vocab_size": 50265, "max_position_embeddings": 1024, "encoder_layers": 12, "encoder_ffn_dim": 4096,
             "encoder_attention_heads": 16, "decoder_layers": 12, "decoder_ffn_dim": 4096,
             "decoder_attention_heads": 16, "activation_function": "gelu", "d_model": 1024, "dropout": 0.1,
             "scale_embedding": False, "tie_word_embeddings": True, "pad_token_id": 1, "bos_token_id": 0,
             "eos_token_id": 2, "decoder_start_token_id": 2},
    "marian": {"vocab_size": 58101, "decoder_vocab_size": None, "max_position_embeddings": 1024,
               "encoder_layers": 12, "encoder_ffn_dim": 4096, "encoder_attention_heads": 16, "decoder_layers": 12,
               "decoder_ffn_dim": 4096, "decoder_attention_heads": 16, "activation_function": "gelu",
               "d_model": 1024, "dropout": 0.1, "scale_embedding": False, "share_encoder_decoder_embeddings": True,
               "tie_word_embeddings": True, "pad_token_id": 58100, "bos_token_id": None, "eos_token_id": 0,
               "decoder_start_token_id": 58100},
    "t5": {"vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_decoder_layers": None,
           "num_heads": 8, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
           "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6, "feed_forward_proj": "relu", "n_positions": 512,
           "tie_word_embeddings": True, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": None,
           "decoder_start_token_id": None},
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "attention_bias": False, "mlp_bias": False, "head_dim": None, "attention_dropout": 0.0,
              "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2},
    "qwen2": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
              "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "use_sliding_window": False, "attention_dropout": 0.0, "head_dim": None,
              "pad_token_id": None, "bos_token_id": None, "eos_token_id": None},
}

# Checkpoint keys transformers itself skips (causal-mask buffers of old GPT-2 files, RoPE's recomputed inverse
# frequencies, T5's unused cross-attention bias table, Marian's recomputed sinusoids when not read).
IGNORED = {
    "gpt2": re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$"),
    "llama": re.compile(r"(^|\.)rotary_emb\.inv_freq$"),
    "qwen2": re.compile(r"(^|\.)rotary_emb\.inv_freq$"),
    "t5": re.compile(r"^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$"),
    "marian": re.compile(r"^(model\.)?(encoder|decoder)\.embed_positions\.weight$"),
    "bart": re.compile(r"$^"),
}


# safetensors dtypes read (NumPy holds all but BF16, which is decoded from its bytes); F8_* and the like are refused
SAFETENSORS_DTYPES = ("F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL")


# ---------------------------------------------------------------------------- the folder


def from_hf(path):
    """(cfg, params) of the Hugging Face model folder at path (config.json and model.safetensors, sharded
    safetensors with model.safetensors.index.json, or pytorch_model.bin when torch is installed).

    Parameters keep the checkpoint's float dtype when it is float64, else are float32 (float16 and bfloat16 widen
    exactly). Raises RefformerError for a folder it cannot read, an unknown model_type, or an option refformer
    cannot represent exactly (naming it).
    """
    hf_config = read_hf_config(path)
    family_of(hf_config)  # refuse an unknown model_type before reading any weights
    return params_from_hf(hf_config, read_hf_tensors(path))


def has_file(file):
    """True when file is a readable regular file (through links), False when nothing is there; raises
    RefformerError for a name that is there but is not a file (a dangling or looping link, a folder), so that it is
    not mistaken for a file the folder lacks."""
    if Path(file).is_file():
        return True
    check(not os.path.lexists(file), f"{file} is not a readable file (a broken or looping link, or a folder)")
    return False


def _folder(path):
    folder = Path(path)
    check(folder.is_dir(), f"{path} is not a folder (expected a Hugging Face model folder with config.json)")
    return folder


def read_hf_config(path):
    """The config.json of the Hugging Face folder at path, as a dict. Raises RefformerError if it is missing or not
    a JSON object."""
    file = _folder(path) / "config.json"
    check(has_file(file), f"{path} has no config.json: not a Hugging Face model folder")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise RefformerError(f"{file} is not readable JSON: {error}") from None
    except RecursionError:
        raise RefformerError(f"{file} is not readable JSON: nested too deeply") from None
    check(isinstance(data, dict), f"{file} must hold a JSON object")
    return data


def read_hf_tensors(path):
    """{checkpoint key: numpy array} of the Hugging Face folder at path: model.safetensors, or the shards that
    model.safetensors.index.json lists, else pytorch_model.bin (or its index) through torch.load(weights_only=True).

    Floating tensors come back float64 when every one of them is float64, else float32 (bfloat16 decoded from its
    bytes, float16 widened: both exact); other dtypes as stored. Raises RefformerError for a folder without weights,
    an index naming a file outside the folder or missing, or pytorch_model.bin without torch.
    """
    folder = _folder(path)
    if has_file(folder / "model.safetensors"):
        tensors = _read_safetensors(folder / "model.safetensors")
    elif has_file(folder / "model.safetensors.index.json"):
        tensors = _read_shards(folder, "model.safetensors.index.json", _read_safetensors)
    elif has_file(folder / "pytorch_model.bin"):
        tensors = _read_torch_bin(folder / "pytorch_model.bin")
    elif has_file(folder / "pytorch_model.bin.index.json"):
        tensors = _read_shards(folder, "pytorch_model.bin.index.json", _read_torch_bin)
    else:
        raise RefformerError(f"{path} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    floats = [array for array in tensors.values() if array.dtype.kind == "f"]
    dtype = np.float64 if floats and all(array.dtype == np.float64 for array in floats) else np.float32
    return {key: array.astype(dtype) if array.dtype.kind == "f" else array for key, array in tensors.items()}


def _read_shards(folder, index_name, read):
    """Every tensor of the shards an index file's weight_map names (files inside folder only)."""
    index = folder / index_name
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise RefformerError(f"{index} is not an index with a weight_map: {error}") from None
    except RecursionError:
        raise RefformerError(f"{index} is not an index with a weight_map: nested too deeply") from None
    check(isinstance(weight_map, dict), f"{index}: weight_map must map tensor names to file names")
    tensors = {}
    for shard in sorted(set(weight_map.values())):
        check(isinstance(shard, str) and Path(shard).name == shard and (folder / shard).is_file(),
              f"{index} names the shard {shard!r}, which is not a file in {folder}")
        tensors.update(read(folder / shard))
    missing = sorted(set(weight_map) - set(tensors))
    check(not missing, f"{index} lists tensors its shards do not hold: {few_names(missing)}")
    return tensors


def _safetensors_header(file):
    """(header dict, byte offset of the data) of a safetensors file: 8 bytes little-endian header length, then the
    JSON header {name: {dtype, shape, data_offsets}} (the format's own definition)."""
    with open(file, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        check(0 < length < (100 << 20), f"{file} is not a safetensors file")
        try:
            header = json.loads(handle.read(length))
        except ValueError as error:
            raise RefformerError(f"{file} has an unreadable safetensors header: {error}") from None
        except RecursionError:
            raise RefformerError(f"{file} has an unreadable safetensors header: nested too deeply") from None
    return header, 8 + length


def _bfloat16(file, info, data_start):
    """A BF16 tensor as float32 (exact: bfloat16 is float32's top 16 bits), read from the file's raw bytes."""
    begin, end = info["data_offsets"]
    raw = np.fromfile(file, dtype="<u2", count=(end - begin) // 2, offset=data_start + begin)
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])


def _read_safetensors(file):
    """{name: array} of one safetensors file, through safetensors' numpy reader; BF16 (which NumPy cannot hold)
    decoded from the bytes."""
    from safetensors import SafetensorError, safe_open

    header, data_start = _safetensors_header(file)
    if isinstance(header, dict):  # else safe_open names what is wrong
        odd = sorted({info.get("dtype") for name, info in header.items() if name != "__metadata__"
                      and isinstance(info, dict) and info.get("dtype") not in SAFETENSORS_DTYPES}, key=str)
        check(not odd, f"{file} holds tensors of dtype {', '.join(map(str, odd))}, which refformer does not read "
                       f"(floating point: F64, F32, F16, BF16; a float8 or quantized checkpoint must be "
                       f"dequantized first)")
    tensors = {}
    try:
        with safe_open(str(file), framework="numpy") as handle:
            for name in handle.keys():
                if header[name]["dtype"] == "BF16":
                    tensors[name] = _bfloat16(file, header[name], data_start)
                else:
                    tensors[name] = handle.get_tensor(name)
    except (SafetensorError, OSError, TypeError, KeyError) as error:
        raise RefformerError(f"{file} is not a readable safetensors file: {error}") from None
    return tensors


def _read_torch_bin(file):
    """{name: array} of a pytorch_model.bin, read with torch.load(weights_only=True) (no arbitrary pickles)."""
    try:
        import torch
    except ImportError:
        raise RefformerError(f"{file} is a pickled torch checkpoint: install torch (pip install 'refformer[torch]') "
                             "or convert the folder to safetensors") from None
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a bad or unsafe pickle
        raise RefformerError(f"{file} cannot be read with torch.load(weights_only=True): {error}") from None
    check(isinstance(state, dict), f"{file} does not hold a state_dict")
    arrays = {}
    for name, tensor in state.items():
        check(isinstance(tensor, torch.Tensor), f"{file}: {name} is not a tensor")
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point() and tensor.dtype not in (torch.float32, torch.float64):
            tensor = tensor.float()
        arrays[name] = tensor.numpy()
    return arrays


# ---------------------------------------------------------------------------- config.json


def family_of(hf_config):
    """The config's model_type, one of SUPPORTED. Raises RefformerError naming any other."""
    model_type = hf_config.get("model_type")
    check(model_type in SUPPORTED, f"model_type {model_type!r} is not supported: refformer imports "
                                   f"{', '.join(SUPPORTED)}")
    return model_type


def _option(hf_config, key):
    """hf_config[key], or transformers' default for the family when config.json leaves it out."""
    return hf_config.get(key, DEFAULTS[hf_config["model_type"]].get(key))


def _refuse(name, value, why):
    raise RefformerError(f"config.json's {name}={json.dumps(value)} is not supported: {why}")


def _activation(hf_config, key):
    name = _option(hf_config, key)
    if name not in ACTIVATIONS:
        _refuse(key, name, f"refformer has the activations {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


def _first_id(value):
    """A special id as config.json states it (an int, a list whose first entry is used, or null)."""
    if isinstance(value, list):
        return value[0] if value else None
    return value


def hf_special_ids(hf_config):
    """{"pad_id", "bos_id", "eos_id", "decoder_start_id", "eos_ids"} from a config.json dict: the ids it states
    (transformers' defaults for the family where it is silent), None where it has none. eos_ids is the full list
    when config.json gives several (eos_id is the first). Raises RefformerError for an unknown model_type."""
    family_of(hf_config)
    eos = _option(hf_config, "eos_token_id")
    return {"pad_id": _option(hf_config, "pad_token_id"), "bos_id": _option(hf_config, "bos_token_id"),
            "eos_id": _first_id(eos), "decoder_start_id": _option(hf_config, "decoder_start_token_id"),
            "eos_ids": list(eos) if isinstance(eos, list) else ([] if eos is None else [eos])}


def _ids(hf_config):
    ids = hf_special_ids(hf_config)
    return {"pad_id": ids["pad_id"], "bos_id": ids["bos_id"], "eos_id": ids["eos_id"], "unk_id": None}


def _check_rope(hf_config):
    """rope_theta of a Llama/Qwen2 config; refuses rope scaling of any kind and partial rotary embeddings."""
    theta = hf_config.get("rope_theta", 10000.0)
    parameters = hf_config.get("rope_parameters")
    if isinstance(parameters, dict):
        rope_type = parameters.get("rope_type", parameters.get("type", "default"))
        if rope_type != "default":
            _refuse("rope_parameters.rope_type", rope_type, "rope_scaling is not supported (plain RoPE only)")
        if parameters.get("partial_rotary_factor", 1.0) != 1.0:
            _refuse("partial_rotary_factor", parameters["partial_rotary_factor"], "RoPE rotates every dimension")
        theta = parameters.get("rope_theta", theta)
    scaling = hf_config.get("rope_scaling")
    if scaling is not None and (not isinstance(scaling, dict)
                                or scaling.get("rope_type", scaling.get("type")) != "default"):
        _refuse("rope_scaling", scaling, "rope_scaling is not supported (plain RoPE only)")
    if hf_config.get("partial_rotary_factor", 1.0) != 1.0:
        _refuse("partial_rotary_factor", hf_config["partial_rotary_factor"], "RoPE rotates every dimension")
    return theta


def _check_bart_variant(hf_config, family):
    """Refuse the legacy fairseq flags of a BART/Marian config.json that transformers' bart/marian code does not
    implement (so the weights would not mean what they meant where they were trained)."""
    unsupported = {"normalize_before": True, "add_final_layer_norm": True, "add_bias_logits": True,
                   "static_position_embeddings": family == "bart", "normalize_embedding": family == "marian"}
    for name, bad in unsupported.items():
        if name in hf_config and hf_config[name] == bad:
            _refuse(name, hf_config[name], f"transformers' {family} model has no such variant")


def _config_gpt2(hf):
    """GPT-2: pre-LN layers, learned positions, Conv1D weights, the head tied to wte unless the config unties it;
    scale_attn_weights=false is attention_scale 1."""
    if _option(hf, "scale_attn_by_inverse_layer_idx"):
        _refuse("scale_attn_by_inverse_layer_idx", True, "refformer scales every layer's attention alike")
    if _option(hf, "add_cross_attention"):
        _refuse("add_cross_attention", True, "a decoder-only model has no cross-attention")
    D = _option(hf, "n_embd")
    return {"family": "decoder-only", "vocab_size": _option(hf, "vocab_size"), "d_model": D,
            "n_heads": _option(hf, "n_head"), "d_ff": _option(hf, "n_inner") or 4 * D, "n_encoder_layers": 0,
            "n_decoder_layers": _option(hf, "n_layer"), "norm_first": True, "norm": "layernorm",
            "norm_eps": _option(hf, "layer_norm_epsilon"), "final_norm": True,
            "activation": _activation(hf, "activation_function"), "positional": "learned",
            "max_positions": _option(hf, "n_positions"), "embed_scale": False, "lm_head_bias": False,
            "dropout": _option(hf, "resid_pdrop"),
            "attention_scale": None if _option(hf, "scale_attn_weights") else 1.0}


def _config_bart(hf):
    """BART and Marian: post-LN layers without final norms, final_logits_bias as the head's bias, the sqrt(D)
    embedding scale when scale_embedding; BART's learned positions start at row 2 and each stack normalises its
    embeddings, Marian's positions are its fixed sinusoids (marian_sinusoids), stored as a learned table."""
    family = hf["model_type"]
    _check_bart_variant(hf, family)
    for encoder_key, decoder_key in (("encoder_attention_heads", "decoder_attention_heads"),
                                     ("encoder_ffn_dim", "decoder_ffn_dim")):
        if _option(hf, encoder_key) != _option(hf, decoder_key):
            _refuse(decoder_key, _option(hf, decoder_key), f"refformer's encoder and decoder share one value "
                                                           f"(the {encoder_key} is {_option(hf, encoder_key)})")
    if family == "marian" and _option(hf, "decoder_vocab_size") not in (None, _option(hf, "vocab_size")):
        _refuse("decoder_vocab_size", _option(hf, "decoder_vocab_size"),
                "refformer's source and target share one vocabulary size")
    fields = {"family": "encoder-decoder", "vocab_size": _option(hf, "vocab_size"), "d_model": _option(hf, "d_model"),
              "n_heads": _option(hf, "encoder_attention_heads"), "d_ff": _option(hf, "encoder_ffn_dim"),
              "n_encoder_layers": _option(hf, "encoder_layers"), "n_decoder_layers": _option(hf, "decoder_layers"),
              "norm_first": False, "norm": "layernorm", "norm_eps": 1e-5, "final_norm": False,
              "activation": _activation(hf, "activation_function"), "positional": "learned",
              "max_positions": _option(hf, "max_position_embeddings"),
              "embed_scale": bool(_option(hf, "scale_embedding")), "lm_head_bias": True,
              "dropout": _option(hf, "dropout")}
    if family == "bart":  # BartLearnedPositionalEmbedding's offset of 2, and layernorm_embedding in each stack
        fields.update(position_offset=2, embed_norm=True)
    return fields


def _t5_feed_forward(hf):
    """(activation, gated) of a T5 config as T5Config reads it: from feed_forward_proj ("relu", "gated-gelu" ->
    gelu_new, "gated-ACT"), unless config.json states dense_act_fn / is_gated_act, which then win (as they do in
    transformers 5.24, where they are set after __post_init__ derives them)."""
    proj = _option(hf, "feed_forward_proj")
    parts = proj.split("-") if isinstance(proj, str) else []
    if not parts or len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        _refuse("feed_forward_proj", proj, "expected an activation such as relu, or gated-ACT such as gated-gelu")
    name = hf.get("dense_act_fn", "gelu_new" if proj == "gated-gelu" else parts[-1])
    if name not in ACTIVATIONS:
        _refuse("dense_act_fn" if "dense_act_fn" in hf else "feed_forward_proj", hf.get("dense_act_fn", proj),
                f"refformer has the activations {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name], bool(hf.get("is_gated_act", parts[0] == "gated"))


def _config_t5(hf):
    """T5 v1.0 / v1.1 / flan-t5: pre-RMSNorm layers without biases, unscaled attention with relative position
    buckets, head_scale D^-0.5 where transformers scales the decoder output (scale_decoder_outputs, else
    tie_word_embeddings not false). T5 has no position limit; max_positions is the legacy n_positions, else 512."""
    activation, gated = _t5_feed_forward(hf)
    D, H, Dh = _option(hf, "d_model"), _option(hf, "num_heads"), _option(hf, "d_kv")
    scale_outputs = hf.get("scale_decoder_outputs", _option(hf, "tie_word_embeddings") is not False)
    n_layers, n_decoder = _option(hf, "num_layers"), _option(hf, "num_decoder_layers")
    return {"family": "encoder-decoder", "vocab_size": _option(hf, "vocab_size"), "d_model": D, "n_heads": H,
            "head_dim": None if H * Dh == D else Dh, "d_ff": _option(hf, "d_ff"), "n_encoder_layers": n_layers,
            "n_decoder_layers": n_layers if n_decoder is None else n_decoder, "norm_first": True, "norm": "rmsnorm",
            "norm_eps": _option(hf, "layer_norm_epsilon"), "final_norm": True, "activation": activation,
            "ffn_gated": gated, "ffn_bias": False, "attention_qkv_bias": False, "attention_out_bias": False,
            "attention_scale": 1.0, "positional": "relative",
            "relative_num_buckets": _option(hf, "relative_attention_num_buckets"),
            "relative_max_distance": _option(hf, "relative_attention_max_distance"),
            "max_positions": _option(hf, "n_positions"), "embed_scale": False, "lm_head_bias": False,
            "head_scale": D ** -0.5 if scale_outputs else 1.0, "dropout": _option(hf, "dropout_rate")}


def _config_llama(hf):
    """Llama and Qwen2: pre-RMSNorm layers, SwiGLU, RoPE, grouped-query attention; Llama's attention_bias switches
    all four projection biases and mlp_bias the feed-forward's, Qwen2 has q/k/v biases and no others."""
    qwen = hf["model_type"] == "qwen2"
    if qwen and _option(hf, "use_sliding_window"):
        _refuse("use_sliding_window", hf["use_sliding_window"], "sliding-window attention is not supported")
    if qwen and "sliding_attention" in (hf.get("layer_types") or []):
        _refuse("layer_types", hf["layer_types"], "sliding-window attention is not supported")
    D, H = _option(hf, "hidden_size"), _option(hf, "num_attention_heads")
    Dh = _option(hf, "head_dim") or D // H
    bias = False if qwen else bool(_option(hf, "attention_bias"))
    return {"family": "decoder-only", "vocab_size": _option(hf, "vocab_size"), "d_model": D, "n_heads": H,
            "n_kv_heads": _option(hf, "num_key_value_heads") or H, "head_dim": None if H * Dh == D else Dh,
            "d_ff": _option(hf, "intermediate_size"), "n_encoder_layers": 0,
            "n_decoder_layers": _option(hf, "num_hidden_layers"), "norm_first": True, "norm": "rmsnorm",
            "norm_eps": _option(hf, "rms_norm_eps"), "final_norm": True, "activation": _activation(hf, "hidden_act"),
            "ffn_gated": True, "ffn_bias": False if qwen else bool(_option(hf, "mlp_bias")),
            "attention_qkv_bias": True if qwen else bias, "attention_out_bias": bias, "positional": "rotary",
            "rope_theta": _check_rope(hf), "max_positions": _option(hf, "max_position_embeddings"),
            "embed_scale": False, "lm_head_bias": False, "dropout": _option(hf, "attention_dropout")}


# ---------------------------------------------------------------------------- weights


class Checkpoint:
    """The checkpoint's tensors {key: array} and the keys read so far (params_from_hf refuses a key left unread
    that transformers would not skip either)."""

    def __init__(self, tensors):
        self.tensors, self.used = tensors, set()

    def has(self, key):
        """True when the checkpoint holds key."""
        return key in self.tensors

    def take(self, key, shape=None):
        """The float array under key, marked read. Raises RefformerError naming the key when it is missing, not
        floating or not of shape."""
        check(key in self.tensors, f"the checkpoint has no tensor {key}")
        array = self.tensors[key]
        check(array.dtype.kind == "f", f"the checkpoint's {key} has dtype {array.dtype}, expected floating point")
        check(shape is None or tuple(array.shape) == tuple(shape),
              f"the checkpoint's {key} has shape {list(array.shape)}, expected {list(shape or ())}")
        self.used.add(key)
        return array

    def linear(self, key, bias):
        """nn.Linear {weight [out, in], bias [out]} -> {"weight" [in, out], "bias" [out] (only when bias)}."""
        p = {"weight": np.ascontiguousarray(self.take(key + ".weight").T)}
        if bias:
            p["bias"] = self.take(key + ".bias")
        return p

    def norm(self, key, bias):
        """A norm's {"weight" [D], "bias" [D] (only when bias)}."""
        p = {"weight": self.take(key + ".weight")}
        if bias:
            p["bias"] = self.take(key + ".bias")
        return p

    def attention(self, q, k, v, out, fields):
        """{q_proj, k_proj, v_proj, out_proj} from four nn.Linear keys, with the biases fields switch on."""
        qkv_bias, out_bias = fields.get("attention_qkv_bias", True), fields.get("attention_out_bias", True)
        return {"q_proj": self.linear(q, qkv_bias), "k_proj": self.linear(k, qkv_bias),
                "v_proj": self.linear(v, qkv_bias), "out_proj": self.linear(out, out_bias)}

    def tied(self, enabled, keys):
        """{key: (array, group)} for a table keys[0] and the keys tied to it, by transformers' loading rule
        (PreTrainedModel.tie_weights): with ties enabled, a key the checkpoint leaves out is its group's table and
        a key present with other values stays apart; disabled, every key must be present. One group = one
        parameter. Raises RefformerError naming a key that is needed and missing."""
        if not enabled:
            return {key: (self.take(key), key) for key in keys}
        present = [key for key in keys if self.has(key)]
        check(present, f"the checkpoint has none of the tied tables {', '.join(keys)}")
        base = present[0]
        table = self.take(base)
        groups = {}
        for key in keys:
            if self.has(key) and not np.array_equal(self.take(key), table):
                groups[key] = (self.tensors[key], key)
            else:
                groups[key] = (table, base)
        return groups

    def unread(self, family):
        """The keys not read that transformers would not skip either (sorted)."""
        return sorted(key for key in set(self.tensors) - self.used if not IGNORED[family].search(key))


def _prefix(tensors, prefix):
    """prefix when some key starts with it (a model saved with its head), else '' (the base model alone)."""
    return prefix if any(key.startswith(prefix) for key in tensors) else ""


def _embeddings(fields, tables, params, encoder_key, decoder_key, head_key):
    """Set share_embeddings / tie_embeddings from the tie groups and put the tables in params: the encoder's own
    table only when not shared, lm_head.weight [D, V] only when not tied."""
    params["decoder"]["embed_tokens"] = {"weight": tables[decoder_key][0]}
    if encoder_key is not None:
        fields["share_embeddings"] = tables[encoder_key][1] == tables[decoder_key][1]
        if not fields["share_embeddings"]:
            params["encoder"]["embed_tokens"] = {"weight": tables[encoder_key][0]}
    fields["tie_embeddings"] = tables[head_key][1] == tables[decoder_key][1]
    if not fields["tie_embeddings"]:
        params.setdefault("lm_head", {})["weight"] = np.ascontiguousarray(tables[head_key][0].T)


def _weights_gpt2(ck, fields, tie, hf):
    m = _prefix(ck.tensors, "transformer.")
    layers = []
    for i in range(fields["n_decoder_layers"]):
        h = f"{m}h.{i}."
        q_w, k_w, v_w = np.split(ck.take(h + "attn.c_attn.weight"), 3, axis=1)  # Conv1D [D, 3D]: q | k | v
        q_b, k_b, v_b = np.split(ck.take(h + "attn.c_attn.bias"), 3)
        layers.append({
            "self_attn": {"q_proj": {"weight": q_w, "bias": q_b}, "k_proj": {"weight": k_w, "bias": k_b},
                          "v_proj": {"weight": v_w, "bias": v_b},
                          "out_proj": {"weight": ck.take(h + "attn.c_proj.weight"),
                                       "bias": ck.take(h + "attn.c_proj.bias")}},
            "self_attn_norm": ck.norm(h + "ln_1", True),
            "ffn": {"fc1": {"weight": ck.take(h + "mlp.c_fc.weight"), "bias": ck.take(h + "mlp.c_fc.bias")},
                    "fc2": {"weight": ck.take(h + "mlp.c_proj.weight"), "bias": ck.take(h + "mlp.c_proj.bias")}},
            "ffn_norm": ck.norm(h + "ln_2", True)})
    params = {"decoder": {"embed_positions": {"weight": ck.take(m + "wpe.weight")}, "layers": layers,
                          "final_norm": ck.norm(m + "ln_f", True)}}
    tables = ck.tied(tie, [m + "wte.weight", "lm_head.weight"])
    _embeddings(fields, tables, params, None, m + "wte.weight", "lm_head.weight")
    return params


def marian_sinusoids(n_positions, D):
    """[N, D] float64: MarianSinusoidalPositionalEmbedding.create_weight's table (sin of the even-indexed angles in
    the first half, cos of the odd-indexed ones in the second), rounded to float32 as create_weight rounds it.
    Raises nothing for sizes >= 1."""
    angles = np.arange(n_positions)[:, None] / np.power(10000, 2 * (np.arange(D) // 2) / D)[None, :]
    half = D // 2 + D % 2
    table = np.empty((n_positions, D))
    table[:, :half] = np.sin(angles[:, 0::2]).astype(np.float32)
    table[:, half:] = np.cos(angles[:, 1::2]).astype(np.float32)
    return table


def _weights_bart(ck, fields, tie, hf):
    """BART and Marian (post-LN layers; BART adds the +2 position offset and layernorm_embedding)."""
    family = hf["model_type"]
    m = _prefix(ck.tensors, "model.")
    D, N, V = fields["d_model"], fields["max_positions"], fields["vocab_size"]

    def positions(stack):
        key = f"{m}{stack}.embed_positions.weight"
        if family == "bart":
            return ck.take(key, (N + 2, D))
        return ck.take(key, (N, D)) if ck.has(key) else marian_sinusoids(N, D)  # not saved since transformers 4.x

    def layer(s, cross):
        p = {"self_attn": ck.attention(*(f"{s}self_attn.{n}_proj" for n in ("q", "k", "v", "out")), fields),
             "self_attn_norm": ck.norm(s + "self_attn_layer_norm", True)}
        if cross:
            p["cross_attn"] = ck.attention(*(f"{s}encoder_attn.{n}_proj" for n in ("q", "k", "v", "out")), fields)
            p["cross_attn_norm"] = ck.norm(s + "encoder_attn_layer_norm", True)
        p["ffn"] = {"fc1": ck.linear(s + "fc1", True), "fc2": ck.linear(s + "fc2", True)}
        p["ffn_norm"] = ck.norm(s + "final_layer_norm", True)
        return p

    params = {}
    for stack, n_layers in (("encoder", fields["n_encoder_layers"]), ("decoder", fields["n_decoder_layers"])):
        p = params[stack] = {"embed_positions": {"weight": positions(stack)}}
        if family == "bart":
            p["embed_norm"] = ck.norm(f"{m}{stack}.layernorm_embedding", True)
        p["layers"] = [layer(f"{m}{stack}.layers.{i}.", stack == "decoder") for i in range(n_layers)]
    encoder, decoder = f"{m}encoder.embed_tokens.weight", f"{m}decoder.embed_tokens.weight"
    if family == "marian" and not _option(hf, "share_encoder_decoder_embeddings"):
        tables = {**ck.tied(tie, [decoder, "lm_head.weight"]), encoder: (ck.take(encoder), encoder)}
    else:
        tables = ck.tied(tie, [m + "shared.weight", encoder, decoder, "lm_head.weight"])
    _embeddings(fields, tables, params, encoder, decoder, "lm_head.weight")
    # final_logits_bias is a buffer [1, V]; transformers leaves it zero when the checkpoint has none
    bias = ck.take("final_logits_bias", (1, V)).reshape(V) if ck.has("final_logits_bias") else np.zeros(V)
    params.setdefault("lm_head", {})["bias"] = bias
    return params


def _weights_t5(ck, fields, tie, hf):
    def layer(b, cross):
        p = {"self_attn": ck.attention(*(f"{b}0.SelfAttention.{n}" for n in "qkvo"), fields),
             "self_attn_norm": ck.norm(b + "0.layer_norm", False)}
        if cross:
            p["cross_attn"] = ck.attention(*(f"{b}1.EncDecAttention.{n}" for n in "qkvo"), fields)
            p["cross_attn_norm"] = ck.norm(b + "1.layer_norm", False)
        f = f"{b}{2 if cross else 1}."
        if fields["ffn_gated"]:
            p["ffn"] = {"fc1": ck.linear(f + "DenseReluDense.wi_0", False),
                        "fc_up": ck.linear(f + "DenseReluDense.wi_1", False),
                        "fc2": ck.linear(f + "DenseReluDense.wo", False)}
        else:
            p["ffn"] = {"fc1": ck.linear(f + "DenseReluDense.wi", False),
                        "fc2": ck.linear(f + "DenseReluDense.wo", False)}
        p["ffn_norm"] = ck.norm(f + "layer_norm", False)
        return p

    params = {}
    for stack, n_layers in (("encoder", fields["n_encoder_layers"]), ("decoder", fields["n_decoder_layers"])):
        params[stack] = {
            "relative_attention_bias": {"weight": ck.take(  # T5 keeps the stack's one table in its first layer
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                (fields["relative_num_buckets"], fields["n_heads"]))},
            "layers": [layer(f"{stack}.block.{i}.layer.", stack == "decoder") for i in range(n_layers)],
            "final_norm": ck.norm(f"{stack}.final_layer_norm", False)}
    tables = ck.tied(tie, ["shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                           "lm_head.weight"])
    _embeddings(fields, tables, params, "encoder.embed_tokens.weight", "decoder.embed_tokens.weight",
                "lm_head.weight")
    return params


def _weights_llama(ck, fields, tie, hf):
    """Llama and Qwen2 (pre-RMSNorm layers, SwiGLU feed-forward, RoPE)."""
    m = _prefix(ck.tensors, "model.")
    layers = []
    for i in range(fields["n_decoder_layers"]):
        s = f"{m}layers.{i}."
        mlp = fields["ffn_bias"]
        layers.append({
            "self_attn": ck.attention(*(f"{s}self_attn.{n}_proj" for n in "qkvo"), fields),
            "self_attn_norm": ck.norm(s + "input_layernorm", False),
            "ffn": {"fc1": ck.linear(s + "mlp.gate_proj", mlp), "fc_up": ck.linear(s + "mlp.up_proj", mlp),
                    "fc2": ck.linear(s + "mlp.down_proj", mlp)},
            "ffn_norm": ck.norm(s + "post_attention_layernorm", False)})
    params = {"decoder": {"layers": layers, "final_norm": ck.norm(m + "norm", False)}}
    tables = ck.tied(tie, [m + "embed_tokens.weight", "lm_head.weight"])
    _embeddings(fields, tables, params, None, m + "embed_tokens.weight", "lm_head.weight")
    return params


CONFIGS = {"gpt2": _config_gpt2, "bart": _config_bart, "marian": _config_bart, "t5": _config_t5,
           "llama": _config_llama, "qwen2": _config_llama}
WEIGHTS = {"gpt2": _weights_gpt2, "bart": _weights_bart, "marian": _weights_bart, "t5": _weights_t5,
           "llama": _weights_llama, "qwen2": _weights_llama}


def params_from_hf(hf_config, tensors):
    """(cfg, params) from a config.json dict and the checkpoint's {key: array}: the mapping from_hf applies, and
    the one the parity tests apply to transformers' gradients (every step is a transpose, a split, a reshape or a
    tie, so it maps gradients as it maps weights).

    The parameters are float64 when every floating tensor is, else float32. Raises RefformerError for an unknown
    model_type, an option refformer cannot represent (naming it), a missing or misshapen tensor, a tensor that
    transformers would read and refformer does not map, or weights that are not finite.
    """
    check(isinstance(hf_config, dict), "hf_config must be a config.json dict")
    check(isinstance(tensors, dict), "tensors must be a dict of checkpoint keys to arrays")
    family = family_of(hf_config)
    fields = {**CONFIGS[family](hf_config), **_ids(hf_config)}
    # transformers 5.24's T5Config always ties (T5Config.__post_init__); an untied head stays apart by its values
    tie = True if family == "t5" else bool(_option(hf_config, "tie_word_embeddings"))
    ck = Checkpoint(tensors)
    params = WEIGHTS[family](ck, fields, tie, hf_config)
    unread = ck.unread(family)
    check(not unread, f"the checkpoint holds tensors refformer does not map (another architecture, or an option "
                      f"it does not represent): {few_names(unread)}")
    floats = [array for array in tensors.values() if array.dtype.kind == "f"]
    dtype = np.float64 if floats and all(array.dtype == np.float64 for array in floats) else np.float32
    cfg = Config(**fields)
    flat = {name: np.ascontiguousarray(array, dtype=dtype) for name, array in flatten(params).items()}
    for name, array in flat.items():
        check(bool(np.all(np.isfinite(array))), f"the checkpoint's weights for {name} hold NaN or infinite values: "
                                                "refformer will not import them")
    return cfg, unflatten_checked(cfg, flat, "the checkpoint")
