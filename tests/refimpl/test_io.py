"""The model directory: exact save -> load round trips, float16 storage, the tokenizer, and every way a
directory can be wrong giving a RefformerError that says what is wrong."""

import json
import os
import pickle

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from refformer.refimpl import (
    Config,
    RefformerError,
    flatten,
    init_params,
    load,
    load_config,
    load_tokenizer,
    model_forward,
    save,
)
from tests.helpers import word_level_tokenizer

CONFIGS = {
    "encoder-decoder": Config(vocab_size=13, d_model=8, n_heads=2, d_ff=12, n_encoder_layers=1, n_decoder_layers=2,
                              max_positions=10),
    "encoder-decoder untied unshared learned bias rmsnorm": Config(
        vocab_size=13, d_model=8, n_heads=2, d_ff=12, n_encoder_layers=2, n_decoder_layers=1, max_positions=10,
        share_embeddings=False, tie_embeddings=False, positional="learned", lm_head_bias=True, norm="rmsnorm",
        norm_first=True),
    "decoder-only": Config(vocab_size=13, d_model=8, n_heads=4, d_ff=12, n_decoder_layers=2, family="decoder-only",
                           max_positions=10, positional="learned", final_norm=False),
}


def random_params32(cfg, seed=0):
    """float32 parameters with no special values (random biases and norm weights too)."""
    rng = np.random.default_rng(seed)
    params = init_params(cfg, rng, np.float32)
    for value in flatten(params).values():
        value += rng.standard_normal(value.shape).astype(np.float32) * np.float32(0.1)
    return params


def assert_trees_equal(actual, expected, dtype):
    flat_actual, flat_expected = flatten(actual), flatten(expected)
    assert list(flat_actual) == list(flat_expected)
    for name, value in flat_expected.items():
        assert flat_actual[name].dtype == dtype, name
        np.testing.assert_array_equal(flat_actual[name], value, err_msg=name)


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_float32_is_exact(tmp_path, name):
    cfg = CONFIGS[name]
    params = random_params32(cfg)
    save(tmp_path / "model", cfg, params)
    assert sorted(os.listdir(tmp_path / "model")) == ["config.json", "model.safetensors"]
    loaded_cfg, loaded = load(tmp_path / "model")
    assert loaded_cfg == cfg
    assert_trees_equal(loaded, params, np.float32)
    assert load_config(tmp_path / "model") == cfg

    tgt = np.array([[1, 5, 6, 0], [1, 7, 0, 0]])
    src = np.array([[4, 5, 2], [9, 2, 0]]) if cfg.is_encoder_decoder else None
    np.testing.assert_array_equal(model_forward(loaded_cfg, loaded, src, tgt)[0],
                                  model_forward(cfg, params, src, tgt)[0])


def test_round_trip_float64_params_and_upcast(tmp_path):
    cfg = CONFIGS["encoder-decoder"]
    params64 = init_params(cfg, np.random.default_rng(1), np.float64)
    save(tmp_path, cfg, params64)
    assert all(a.dtype == np.float32 for a in load_file(tmp_path / "model.safetensors").values())  # stored float32
    _, loaded = load(tmp_path)
    expected = {name: a.astype(np.float32) for name, a in flatten(params64).items()}
    assert_trees_equal(flatten(loaded), expected, np.float32)
    _, loaded64 = load(tmp_path, dtype=np.float64)
    assert_trees_equal(flatten(loaded64), {n: a.astype(np.float64) for n, a in expected.items()}, np.float64)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_float16_storage_loads_upcast(tmp_path, name):
    cfg = CONFIGS[name]
    params = random_params32(cfg)
    save(tmp_path / "fp32", cfg, params)
    save(tmp_path / "fp16", cfg, params, dtype=np.float16)
    stored = load_file(tmp_path / "fp16" / "model.safetensors")
    assert all(a.dtype == np.float16 for a in stored.values())
    size16, size32 = ((tmp_path / name / "model.safetensors").stat().st_size for name in ("fp16", "fp32"))
    assert size16 < size32
    loaded_cfg, loaded = load(tmp_path / "fp16")
    assert loaded_cfg == cfg
    expected = {n: a.astype(np.float16).astype(np.float32) for n, a in flatten(params).items()}
    assert_trees_equal(flatten(loaded), expected, np.float32)


def test_save_overwrites_an_existing_directory(tmp_path):
    cfg = CONFIGS["decoder-only"]
    save(tmp_path, cfg, random_params32(cfg, 0))
    newer = random_params32(cfg, 1)
    save(tmp_path, cfg, newer)
    assert_trees_equal(load(tmp_path)[1], newer, np.float32)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # no temporary files left behind


# ---------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(tmp_path):
    cfg = CONFIGS["encoder-decoder"]
    tokenizer = word_level_tokenizer(cfg.vocab_size)
    assert tokenizer.get_vocab_size() == cfg.vocab_size
    save(tmp_path / "a", cfg, random_params32(cfg), tokenizer=tokenizer)
    assert (tmp_path / "a" / "tokenizer.json").is_file()
    loaded = load_tokenizer(tmp_path / "a")
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert loaded.encode("w0 w3 nope").ids == [4, 7, cfg.unk_id]

    # a path to a tokenizer.json works too
    save(tmp_path / "b", cfg, random_params32(cfg), tokenizer=str(tmp_path / "a" / "tokenizer.json"))
    assert load_tokenizer(tmp_path / "b").get_vocab() == tokenizer.get_vocab()


@pytest.mark.parametrize("size", [14, 20])
def test_tokenizer_with_more_tokens_than_the_vocabulary_is_refused(tmp_path, size):
    cfg = CONFIGS["encoder-decoder"]
    with pytest.raises(RefformerError, match=rf"{size} tokens.*vocab_size is {cfg.vocab_size}"):
        save(tmp_path, cfg, random_params32(cfg), tokenizer=word_level_tokenizer(size))
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "tokenizer.json").exists()

    # a mismatched tokenizer.json already in a directory is refused on load
    save(tmp_path, cfg, random_params32(cfg))
    (tmp_path / "tokenizer.json").write_text(word_level_tokenizer(size).to_str())
    with pytest.raises(RefformerError, match=rf"tokenizer.json has {size} tokens"):
        load_tokenizer(tmp_path)


def test_tokenizer_with_fewer_tokens_than_the_vocabulary_loads(tmp_path):
    """T5's tokenizer has 32,100 tokens for 32,128 embedding rows: the rows past the tokenizer are never produced."""
    cfg = CONFIGS["encoder-decoder"]
    save(tmp_path, cfg, random_params32(cfg), tokenizer=word_level_tokenizer(cfg.vocab_size - 3))
    assert load_tokenizer(tmp_path).get_vocab_size() == cfg.vocab_size - 3
    load(tmp_path)


def test_special_tokens_of_null_ids_are_not_checked(tmp_path):
    """A null special id (the model has no such token) checks nothing; a set one must still match the tokenizer."""
    cfg = CONFIGS["encoder-decoder"].replace(pad_id=None, bos_id=None, unk_id=None)  # <pad> <s> <unk> at 0, 1, 3
    save(tmp_path, cfg, random_params32(cfg), tokenizer=word_level_tokenizer(cfg.vocab_size))
    with pytest.raises(RefformerError, match="has </s> at id 2 but the model's eos_id is 5"):
        save(tmp_path / "b", cfg.replace(eos_id=5), random_params32(cfg), tokenizer=word_level_tokenizer(12))


def test_tokenizer_errors(tmp_path):
    cfg = CONFIGS["decoder-only"]
    save(tmp_path, cfg, random_params32(cfg))
    with pytest.raises(RefformerError, match="tokenizer.json is missing"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not a tokenizer")
    with pytest.raises(RefformerError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------- refusing pickle


class _Trap:
    """Unpickling this creates a directory: proof that something ran the pickle."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def write_pickle(path, marker):
    with open(path, "wb") as f:
        pickle.dump({"model.weight": _Trap(marker)}, f)


def test_load_refuses_pickle_next_to_config(tmp_path):
    cfg = CONFIGS["encoder-decoder"]
    (tmp_path / "config.json").write_text(cfg.to_json())
    write_pickle(tmp_path / "pytorch_model.bin", tmp_path / "unpickled")
    with pytest.raises(RefformerError, match="convert-torch") as info:
        load(tmp_path)
    assert "pytorch_model.bin" in str(info.value)
    assert not (tmp_path / "unpickled").exists()


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "checkpoint.ckpt"])
def test_load_refuses_a_directory_with_only_a_pickle(tmp_path, name):
    write_pickle(tmp_path / name, tmp_path / "unpickled")
    with pytest.raises(RefformerError, match="convert-torch") as info:
        load(tmp_path)
    assert name in str(info.value)
    assert not (tmp_path / "unpickled").exists()


# ---------------------------------------------------------------------------- broken directories


@pytest.fixture
def model_dir(tmp_path):
    cfg = CONFIGS["encoder-decoder"]
    save(tmp_path / "model", cfg, random_params32(cfg))
    return tmp_path / "model"


def test_missing_directory(tmp_path):
    with pytest.raises(RefformerError, match="does not exist"):
        load(tmp_path / "nowhere")
    with pytest.raises(RefformerError, match="does not exist"):
        load_config(tmp_path / "nowhere")


def test_missing_config(model_dir):
    os.remove(model_dir / "config.json")
    with pytest.raises(RefformerError, match="config.json is missing"):
        load(model_dir)


def test_missing_weights(model_dir):
    os.remove(model_dir / "model.safetensors")
    with pytest.raises(RefformerError, match="model.safetensors is missing"):
        load(model_dir)


@pytest.mark.parametrize("damage", ["half", "empty", "garbage", "header"])
def test_corrupt_weights(model_dir, damage):
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    if damage == "half":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = b""
    elif damage == "garbage":
        data = np.random.default_rng(0).bytes(len(data))
    else:
        data = data[:8] + b"{" * (len(data) - 8)  # a valid length prefix, then a header that is not JSON
    path.write_bytes(data)
    with pytest.raises(RefformerError, match="model.safetensors is not a readable safetensors file"):
        load(model_dir)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"format_version": 99}', "format_version 99 is not supported"),
    ('{"hidden_size": 8}', "unknown (config )?keys \\['hidden_size'\\]"),
    ('{"d_model": 10, "n_heads": 3}', "n_heads=3 must divide d_model=10"),
    ('{"family": "encoder-only"}', "family must be one of"),
])
def test_bad_config(model_dir, text, message):
    (model_dir / "config.json").write_text(text)
    with pytest.raises(RefformerError, match=message):
        load(model_dir)


def rewrite_weights(model_dir, change):
    path = model_dir / "model.safetensors"
    flat = load_file(path)
    change(flat)
    save_file(flat, path)


def test_weights_missing_a_key(model_dir):
    rewrite_weights(model_dir, lambda flat: flat.pop("decoder.layers.1.cross_attn.k_proj.bias"))
    with pytest.raises(RefformerError, match=r"does not match its config: missing decoder\.layers\.1\.cross_attn"
                                             r"\.k_proj\.bias"):
        load(model_dir)


def test_weights_with_an_extra_key(model_dir):
    rewrite_weights(model_dir, lambda flat: flat.update({"lm_head.weight": np.zeros((8, 13), np.float32)}))
    with pytest.raises(RefformerError, match=r"does not match its config: unexpected lm_head\.weight"):
        load(model_dir)


def test_weights_with_a_wrong_shape(model_dir):
    rewrite_weights(model_dir, lambda flat: flat.update({"decoder.layers.0.ffn.fc1.weight": np.zeros((8, 11),
                                                                                                      np.float32)}))
    with pytest.raises(RefformerError, match=r"decoder\.layers\.0\.ffn\.fc1\.weight has shape \[8, 11\], the config "
                                             r"needs \[8, 12\]"):
        load(model_dir)


def test_config_that_does_not_match_the_weights(model_dir):
    data = json.loads((model_dir / "config.json").read_text())
    data["n_decoder_layers"] = 3
    (model_dir / "config.json").write_text(json.dumps(data))
    with pytest.raises(RefformerError, match=r"missing decoder\.layers\.2\."):
        load(model_dir)
    data.update(n_decoder_layers=2, d_ff=16)
    (model_dir / "config.json").write_text(json.dumps(data))
    with pytest.raises(RefformerError, match=r"has shape \[8, 12\], the config needs \[8, 16\]"):
        load(model_dir)


def test_integer_weights_are_refused(model_dir):
    rewrite_weights(model_dir, lambda flat: flat.update({"decoder.final_norm.bias": np.zeros(8, np.int32)}))
    with pytest.raises(RefformerError, match=r"decoder\.final_norm\.bias has dtype int32"):
        load(model_dir)


def test_save_checks_params_against_config(tmp_path):
    cfg = CONFIGS["encoder-decoder"]
    params = random_params32(cfg)
    del params["decoder"]["layers"][0]["ffn"]["fc2"]["bias"]
    with pytest.raises(RefformerError, match=r"missing decoder\.layers\.0\.ffn\.fc2\.bias"):
        save(tmp_path, cfg, params)
    assert not (tmp_path / "model.safetensors").exists()
    with pytest.raises(RefformerError, match="has shape"):
        save(tmp_path, cfg.replace(d_ff=16), random_params32(cfg))


def test_tokenizer_special_ids_must_match_the_config(tmp_path):
    from tokenizers import Tokenizer, models

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3}  # bos and eos swapped against the config's 1 and 2
    vocab.update({f"w{i}": i for i in range(4, 11)})
    cfg = Config(vocab_size=11, d_model=8, n_heads=2, d_ff=12)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    with pytest.raises(RefformerError, match="bos_id"):
        save(tmp_path / "m", cfg, init_params(cfg, np.random.default_rng(0)), tokenizer=tokenizer)


# ---------------------------------------------------------------------------- save switches its files together


def test_save_leaves_no_temporary_file_and_no_journal(tmp_path):
    cfg = CONFIGS["encoder-decoder"]
    save(tmp_path / "m", cfg, random_params32(cfg), tokenizer=word_level_tokenizer(cfg.vocab_size))
    save(tmp_path / "m", cfg, random_params32(cfg, seed=1))
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors", "tokenizer.json"]


def test_a_journal_left_by_a_killed_save_is_rolled_forward_by_load(tmp_path):
    """A save killed after its journal: the next load finishes it (weights and config switch together)."""
    from refformer.refimpl.io import HOST, SAVE_JOURNAL

    small, big = CONFIGS["encoder-decoder"], CONFIGS["encoder-decoder"].__class__(
        **{**vars(CONFIGS["encoder-decoder"]), "d_ff": 16})
    save(tmp_path / "m", small, random_params32(small))
    save(tmp_path / "new", big, random_params32(big, seed=3))
    renames = []
    for name in ("model.safetensors", "config.json"):
        tmp = f".{name}.{os.getpid()}@{HOST}.abc.tmp"
        os.replace(tmp_path / "new" / name, tmp_path / "m" / tmp)
        renames.append([tmp, name])
    os.replace(tmp_path / "m" / renames[0][0], tmp_path / "m" / "model.safetensors")  # killed after the first rename
    (tmp_path / "m" / SAVE_JOURNAL).write_text(json.dumps({"renames": renames}))
    cfg, params = load(tmp_path / "m")
    assert cfg.d_ff == 16 and params["encoder"]["layers"][0]["ffn"]["fc1"]["weight"].shape[1] == 16
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]


def test_save_refuses_a_model_file_that_is_a_folder(tmp_path):
    cfg = CONFIGS["decoder-only"]
    (tmp_path / "m" / "model.safetensors").mkdir(parents=True)
    with pytest.raises(RefformerError, match="not a plain file"):
        save(tmp_path / "m", cfg, random_params32(cfg))
    assert sorted(os.listdir(tmp_path / "m")) == ["model.safetensors"]


def test_config_and_tokenizer_with_a_byte_order_mark_load(tmp_path):
    cfg = CONFIGS["encoder-decoder"]
    save(tmp_path / "m", cfg, random_params32(cfg), tokenizer=word_level_tokenizer(cfg.vocab_size))
    for name in ("config.json", "tokenizer.json"):
        path = tmp_path / "m" / name
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert load_config(tmp_path / "m") == cfg
    assert load_tokenizer(tmp_path / "m").get_vocab_size() == cfg.vocab_size


@pytest.mark.parametrize("content, message", [
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ('{"vocab_size": ' + "9" * 5000 + "}", "4300 digits"),
])
def test_a_config_json_python_cannot_parse_is_one_error(tmp_path, content, message):
    (tmp_path / "config.json").write_text(content)
    with pytest.raises(RefformerError, match=message):
        load_config(tmp_path)


def test_a_huge_config_json_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "config.json"
    with open(path, "wb") as f:
        f.truncate(2**31)  # sparse: 2 GiB of zeros, read whole before (4 GB of memory)
    with pytest.raises(RefformerError, match="2048 MiB, larger than"):
        load_config(tmp_path)


def test_bfloat16_weights_load_as_float32(tmp_path):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    cfg = CONFIGS["encoder-decoder"]
    params = random_params32(cfg)
    save(tmp_path, cfg, params)
    flat = {name: value.astype(ml_dtypes.bfloat16) for name, value in flatten(params).items()}
    save_file(flat, str(tmp_path / "model.safetensors"))
    _, got = load(tmp_path)
    for name, value in flatten(got).items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, flat[name].astype(np.float32))  # exact: bfloat16 is float32's top half


def test_a_huge_tokenizer_json_is_refused_before_it_is_read(tmp_path):
    from refformer.refimpl.training.tokenizer import load_tokenizer as runtime_load_tokenizer

    cfg = CONFIGS["encoder-decoder"]
    save(tmp_path, cfg, random_params32(cfg))
    with open(tmp_path / "tokenizer.json", "wb") as f:
        f.truncate(3 * 2**30)  # sparse; read whole, 3 GB of zeros took 15 GB of memory and over a minute
    with pytest.raises(RefformerError, match="3072 MiB, larger than"):
        load_tokenizer(tmp_path)
    with pytest.raises(RefformerError, match="3072 MiB, larger than"):
        runtime_load_tokenizer(tmp_path / "tokenizer.json")


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path):
    from refformer.refimpl.io import atomic_write

    path = tmp_path / "a.txt"
    path.write_text("old")

    def write(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(RefformerError,
                       match=r"cannot write .*a.txt \(No space left on device\); it was left as it was"):
        atomic_write(path, write)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_write_without_replace_keeps_a_file_another_process_wrote_meanwhile(tmp_path):
    from refformer.refimpl.io import atomic_write

    path = tmp_path / "g.npz"

    def write(tmp):
        path.write_text("the other process's")  # created while this write was under way
        with open(tmp, "w") as f:
            f.write("mine")

    with pytest.raises(RefformerError, match="created by another process meanwhile; pass --overwrite"):
        atomic_write(path, write, replace=False)
    assert path.read_text() == "the other process's" and [p.name for p in tmp_path.iterdir()] == ["g.npz"]
    atomic_write(tmp_path / "new.txt", lambda tmp: open(tmp, "w").write("x"), replace=False)
    assert (tmp_path / "new.txt").read_text() == "x" and len(list(tmp_path.iterdir())) == 2
