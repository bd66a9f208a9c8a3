"""from_hf against transformers, family by family (tests/hf_models.py builds the tiny random models, no hub):
a model saved with save_pretrained and read back by from_hf computes transformers' logits at <= 1e-10 in float64 on
padded batches, every parameter's gradient of a weighted sum of the logits matches torch autograd (mapped by name
through params_from_hf) at <= 1e-9, and decoder_step with its cache reproduces the full forward. Then the reader
(dtypes, shards, pytorch_model.bin) and the refusals of what refformer cannot represent.

Errors are max |ours - theirs| / max(1, max |theirs|) over the real (non-padding) positions; every test prints its
worst error.
"""


import functools
import json

import numpy as np
import pytest

from refformer.refimpl import RefformerError, decoder_step, encode, flatten, model_backward, model_forward
from refformer.refimpl.convert.hf import from_hf, hf_special_ids, marian_sinusoids, params_from_hf, read_hf_tensors
from refformer.refimpl.model import empty_cache, left_padded_positions

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from tests import hf_models  # noqa: E402  (needs torch and transformers)

LOGITS_TOL = 1e-10
GRAD_TOL = 1e-9
DECODER_ONLY = ("gpt2", "llama", "qwen2")  # the rest are encoder-decoder
FAMILIES = tuple(hf_models.FAMILIES)


def error(ours, theirs):
    """max |ours - theirs| / max(1, max |theirs|)."""
    theirs = np.asarray(theirs)
    return float(np.max(np.abs(ours - theirs)) / max(1.0, float(np.max(np.abs(theirs)))))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """family -> (transformers model, cfg, params): each built once, saved with save_pretrained, read by from_hf."""
    saved = hf_models.saved_models(tmp_path_factory)

    @functools.cache
    def get(family):
        model, folder = saved(family)
        return (model, *from_hf(folder))

    return get


def padded_batch(family, cfg, model, seed=0):
    """(inputs, keep): a batch with padding, as transformers' tokenizers pad each family.

    Decoder-only: three rows, two left-padded, positions cumsum(mask) - 1 (transformers' generate).
    Encoder-decoder: a right-padded and a left-padded source row (positions are 0.. in both libraries whatever the
    padding), targets starting with the decoder start id, one right-padded.
    """
    rng = np.random.default_rng(seed)
    low = 3  # ids below 3 are special in every tiny model
    if family in DECODER_ONLY:
        ids = rng.integers(low, cfg.vocab_size - 1, size=(3, 7))
        keep = np.ones_like(ids)
        keep[1, :2] = 0
        keep[2, :4] = 0
        ids[keep == 0] = cfg.pad_id if cfg.pad_id is not None else 0
        return {"ids": ids, "keep": keep, "positions": left_padded_positions(keep)}, keep
    src = rng.integers(low, cfg.vocab_size - 1, size=(2, 6))
    src_keep = np.ones_like(src)
    src_keep[0, 4:] = 0
    src_keep[1, :2] = 0
    tgt = rng.integers(low, cfg.vocab_size - 1, size=(2, 5))
    tgt[:, 0] = hf_special_ids(model.config.to_dict())["decoder_start_id"]
    tgt_keep = np.ones_like(tgt)
    tgt_keep[1, 3:] = 0
    pad = cfg.pad_id if cfg.pad_id is not None else 0
    src[src_keep == 0] = pad
    tgt[tgt_keep == 0] = pad
    return {"src": src, "src_keep": src_keep, "tgt": tgt, "tgt_keep": tgt_keep}, tgt_keep


def ours(cfg, params, family, batch):
    """model_forward on the batch -> (logits, cache)."""
    if family in DECODER_ONLY:
        return model_forward(cfg, params, None, batch["ids"], tgt_mask=batch["keep"], tgt_positions=batch["positions"])
    return model_forward(cfg, params, batch["src"], batch["tgt"], src_mask=batch["src_keep"],
                         tgt_mask=batch["tgt_keep"])


def theirs(model, family, batch):
    """transformers' logits (a float64 tensor with grad) on the batch."""
    t = torch.as_tensor
    with hf_models.float64_exact():
        if family in DECODER_ONLY:
            return model(input_ids=t(batch["ids"]), attention_mask=t(batch["keep"]),
                         position_ids=t(batch["positions"]), use_cache=False).logits
        return model(input_ids=t(batch["src"]), attention_mask=t(batch["src_keep"]),
                     decoder_input_ids=t(batch["tgt"]), decoder_attention_mask=t(batch["tgt_keep"]),
                     use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(family, imported):
    model, cfg, params = imported(family)
    batch, keep = padded_batch(family, cfg, model)
    logits, _ = ours(cfg, params, family, batch)
    with torch.no_grad():
        expected = theirs(model, family, batch).numpy()
    real = keep.astype(bool)
    worst = error(logits[real], expected[real])
    print(f"{family}: logits max error {worst:.2e}")
    assert worst <= LOGITS_TOL


def torch_gradients(model, family):
    """{checkpoint key: gradient} of every parameter and of the buffers params_from_hf maps (final_logits_bias;
    Marian's sinusoid tables, frozen in transformers but plain weights in refformer), tied keys repeated."""
    grads = {name: p.grad for name, p in model.named_parameters(remove_duplicate=False)}
    if hasattr(model, "final_logits_bias"):
        grads["final_logits_bias"] = model.final_logits_bias.grad
    return {name: (torch.zeros_like(dict(model.named_parameters(remove_duplicate=False))[name])
                   if grad is None else grad).detach().numpy() for name, grad in grads.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_torch_autograd(family, imported):
    model, cfg, params = imported(family)
    batch, keep = padded_batch(family, cfg, model, seed=1)
    logits, cache = ours(cfg, params, family, batch)
    upstream = np.random.default_rng(2).standard_normal(logits.shape) * keep[..., None]  # real positions only
    grads = flatten(model_backward(cfg, params, cache, upstream))

    model.zero_grad(set_to_none=True)
    frozen = [p for name, p in model.named_parameters() if not p.requires_grad]
    extra = [model.final_logits_bias] if hasattr(model, "final_logits_bias") else []
    for tensor in frozen + extra:
        tensor.requires_grad_(True)
    try:
        (theirs(model, family, batch) * torch.as_tensor(upstream)).sum().backward()
        _, expected = params_from_hf(model.config.to_dict(), torch_gradients(model, family))
    finally:
        for tensor in frozen + extra:
            tensor.requires_grad_(False)
            tensor.grad = None
    expected = flatten(expected)
    assert grads.keys() == expected.keys()
    errors = {name: error(grads[name], expected[name]) for name in grads}
    name = max(errors, key=errors.get)
    print(f"{family}: {len(errors)} gradients, max error {errors[name]:.2e} ({name})")
    assert errors[name] <= GRAD_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_incremental_decoding_matches_full_forward(family, imported):
    model, cfg, params = imported(family)
    batch, keep = padded_batch(family, cfg, model, seed=3)
    full, _ = ours(cfg, params, family, batch)
    ids = batch["ids"] if family in DECODER_ONLY else batch["tgt"]
    B, T = ids.shape
    past = empty_cache(cfg, B, np.float64)
    cross_kv, src_keep = None, None
    if family not in DECODER_ONLY:
        _, cross_kv = encode(cfg, params, batch["src"], batch["src_keep"])
        src_keep = batch["src_keep"]
    positions = batch["positions"] if family in DECODER_ONLY else np.broadcast_to(np.arange(T), (B, T))
    first = 3 if family in DECODER_ONLY else 1  # a prompt of several tokens, then one token a step
    steps = [(0, first)] + [(t, t + 1) for t in range(first, T)]
    stepped = []
    for start, stop in steps:
        logits, past = decoder_step(cfg, params, ids[:, start:stop], np.ascontiguousarray(positions[:, start:stop]),
                                    keep[:, :stop], past, cross_kv, src_keep)
        stepped.append(logits)
    stepped = np.concatenate(stepped, axis=1)
    real = keep.astype(bool)
    worst = error(stepped[real], full[real])
    print(f"{family}: decoder_step vs model_forward max error {worst:.2e}")
    assert worst <= LOGITS_TOL


# ---------------------------------------------------------------------------- the folder: dtypes, shards, .bin


def test_special_ids_come_from_the_config_and_are_null_where_missing(imported):
    _, gpt2, _ = imported("gpt2")
    assert (gpt2.pad_id, gpt2.bos_id, gpt2.eos_id, gpt2.unk_id) == (None, 1, 2, None)
    model, marian, _ = imported("marian")
    assert (marian.pad_id, marian.bos_id, marian.eos_id, marian.unk_id) == (hf_models.V - 1, None, 0, None)
    assert hf_special_ids(model.config.to_dict())["decoder_start_id"] == hf_models.V - 1


@pytest.mark.parametrize("dtype, expected", [(torch.float64, np.float64), (torch.float32, np.float32),
                                             (torch.float16, np.float32), (torch.bfloat16, np.float32)])
def test_the_checkpoint_dtype_is_kept_and_half_precision_widens_exactly(dtype, expected, tmp_path):
    model = hf_models.build("gpt2").to(dtype)
    model.save_pretrained(tmp_path)
    tensors = read_hf_tensors(tmp_path)
    for name, tensor in model.state_dict().items():
        if name in tensors:
            assert tensors[name].dtype == expected
            np.testing.assert_array_equal(tensors[name], tensor.to(torch.float64).numpy(), err_msg=name)
    _, params = from_hf(tmp_path)
    assert {array.dtype for array in flatten(params).values()} == {np.dtype(expected)}


def test_sharded_safetensors_and_pytorch_model_bin_read_the_same_weights(tmp_path, imported):
    model, _, params = imported("marian")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "sharded" / "model.safetensors").exists()
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "sharded" / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    for folder in ("sharded", "bin"):
        _, other = from_hf(tmp_path / folder)
        for name, array in flatten(params).items():
            np.testing.assert_array_equal(flatten(other)[name], array, err_msg=f"{folder}: {name}")


def test_pytorch_model_bin_without_torch_says_what_to_do(tmp_path, monkeypatch):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    monkeypatch.setitem(__import__("sys").modules, "torch", None)
    with pytest.raises(RefformerError, match="install torch.*or convert the folder to safetensors"):
        from_hf(tmp_path)


# ---------------------------------------------------------------------------- refusals


def saved(tmp_path, family, **changes):
    """A tiny model's folder with config.json entries changed (None removes one)."""
    hf_models.build(family).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key, value in changes.items():
        config.pop(key, None) if value is None else config.__setitem__(key, value)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("family, changes, named", [
    ("gpt2", {"model_type": "gptj"}, "model_type 'gptj' is not supported"),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope_scaling"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ("qwen2", {"use_sliding_window": True}, "use_sliding_window=true .*sliding-window"),
    ("qwen2", {"layer_types": ["sliding_attention", "full_attention"]}, "layer_types=.*sliding-window"),
    ("t5", {"num_decoder_layers": 0}, "does not map.*decoder.block.0"),
    ("marian", {"normalize_before": True}, "normalize_before"),
    ("bart", {"add_final_layer_norm": True}, "add_final_layer_norm"),
    ("bart", {"decoder_attention_heads": 2}, "decoder_attention_heads"),
    ("gpt2", {"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ("gpt2", {"activation_function": "gelu_fast"}, "activation_function"),
    ("t5", {"feed_forward_proj": "gated-gelu-x"}, "feed_forward_proj"),
])
def test_what_refformer_cannot_represent_is_refused_by_name(tmp_path, family, changes, named):
    with pytest.raises(RefformerError, match=named):
        from_hf(saved(tmp_path, family, **changes))


def test_a_tensor_refformer_does_not_map_is_refused_by_name(imported):
    model, _, _ = imported("gpt2")
    tensors = {name: t.detach().numpy() for name, t in model.state_dict().items()}
    tensors["score.weight"] = np.zeros((2, 24))
    with pytest.raises(RefformerError, match="does not map.*score.weight"):
        params_from_hf(model.config.to_dict(), tensors)


def test_marian_sinusoids_are_transformers_table(imported):
    model, cfg, _ = imported("marian")
    table = model.model.encoder.embed_positions.weight.detach().numpy()
    np.testing.assert_array_equal(marian_sinusoids(cfg.max_positions, cfg.d_model), table)


def test_non_finite_weights_are_refused(imported):
    model, _, _ = imported("gpt2")
    tensors = {name: t.detach().numpy().copy() for name, t in model.state_dict().items()}
    tensors["transformer.h.1.mlp.c_fc.bias"][3] = np.nan
    with pytest.raises(RefformerError, match="decoder.layers.1.ffn.fc1.bias hold NaN"):
        params_from_hf(model.config.to_dict(), tensors)


def test_t5_reads_its_activation_as_transformers_does(imported):
    """T5Config derives dense_act_fn / is_gated_act from feed_forward_proj, but saved values win."""
    model, _, _ = imported("t5-v1.1")
    tensors = {name: t.detach().numpy() for name, t in model.state_dict().items()}
    config = model.config.to_dict()
    assert (config["dense_act_fn"], config["is_gated_act"]) == ("gelu_new", True)
    cfg, _ = params_from_hf({**config, "dense_act_fn": "relu"}, tensors)
    assert (cfg.activation, cfg.ffn_gated, cfg.head_scale) == ("relu", True, 1.0)
    del config["dense_act_fn"], config["is_gated_act"]
    cfg, _ = params_from_hf(config, tensors)
    assert (cfg.activation, cfg.ffn_gated) == ("gelu_tanh", True)


def test_t5_num_decoder_layers_zero_is_zero_as_in_t5config():
    """T5Config keeps an explicit num_decoder_layers=0 (only null means num_layers): never a silent 2."""
    from refformer.refimpl.convert.hf import CONFIGS

    fields = CONFIGS["t5"]({"model_type": "t5", "num_layers": 2, "num_decoder_layers": 0})
    assert (fields["n_encoder_layers"], fields["n_decoder_layers"]) == (2, 0)
    assert CONFIGS["t5"]({"model_type": "t5", "num_layers": 3, "num_decoder_layers": None})["n_decoder_layers"] == 3


def test_a_float8_checkpoint_is_refused_naming_its_dtype(tmp_path):
    """NumPy has no float8: safetensors' numpy reader raised AttributeError (a traceback)."""
    header = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}).encode()
    header += b" " * (-len(header) % 8)
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(RefformerError, match="dtype F8_E4M3, which refformer does not read"):
        from_hf(tmp_path)


def test_a_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(RefformerError, match="has no model.safetensors"):
        from_hf(tmp_path)


@pytest.mark.parametrize("family", ["t5", "marian"])
def test_default_masks_keep_the_decoder_start_token(family, imported):
    """T5 and Marian start their decoder with their pad id: the default target mask keeps that first token."""
    model, cfg, params = imported(family)
    src, tgt = np.array([[5, 6, 7, 8]]), np.array([[model.config.decoder_start_token_id, 9, 10]])
    logits, _ = model_forward(cfg, params, src, tgt)
    with torch.no_grad():
        expected = theirs(model, family, {"src": src, "src_keep": np.ones_like(src), "tgt": tgt,
                                          "tgt_keep": np.ones_like(tgt)}).numpy()
    assert error(logits, expected) <= LOGITS_TOL


def state(model):
    """{checkpoint key: array} of a model's state_dict, tied keys repeated (as older checkpoints store them)."""
    return {name: t.detach().numpy() for name, t in model.state_dict().items()}


def test_older_checkpoint_layouts_read_the_same(imported):
    """What hub checkpoints written by older transformers hold: GPT-2 without the 'transformer.' prefix and with its
    causal-mask buffers; T5 and Marian with every tied table repeated, T5's unused cross-attention bias table, Marian's
    sinusoids and final_logits_bias; Llama with RoPE's inv_freq buffers."""
    for family, edit in [
        ("gpt2", lambda t: {**{k.removeprefix("transformer."): v for k, v in t.items()},
                            "h.0.attn.bias": np.tril(np.ones((1, 1, 40, 40))), "h.1.attn.masked_bias": np.array(-1e4)}),
        ("t5", lambda t: {**t, "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight":
                          np.zeros((8, 2))}),
        ("marian", lambda t: t),
        ("llama", lambda t: {**t, "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(6)}),
    ]:
        model, cfg, params = imported(family)
        other_cfg, other = params_from_hf(model.config.to_dict(), edit(state(model)))
        assert other_cfg == cfg, family
        for name, array in flatten(params).items():
            np.testing.assert_array_equal(flatten(other)[name], array, err_msg=f"{family}: {name}")


def test_safetensors_folders_need_neither_torch_nor_transformers(tmp_path, monkeypatch):
    folder = saved(tmp_path, "llama")
    modules = __import__("sys").modules
    for name in [name for name in modules if name.split(".")[0] in ("torch", "transformers")]:
        monkeypatch.delitem(modules, name)
    monkeypatch.setitem(modules, "torch", None)  # any import of them now raises ImportError
    monkeypatch.setitem(modules, "transformers", None)
    cfg, params = from_hf(folder)
    assert cfg.positional == "rotary" and cfg.n_kv_heads == 2
