"""from_torch on live modules and convert_state_dict_file on saved state_dicts: refimpl's logits equal torch's.

The models here are written the way people write them (PyTorch's translation tutorial:
TokenEmbedding / PositionalEncoding wrappers, a `generator` head, sequence-first tensors;
a causal LM on nn.TransformerEncoder with learned positions and an `fc_out` head), so the
converters' name and shape rules are tested on realistic state_dict keys.
"""

import math
import re
import subprocess
import sys

import numpy as np
import pytest

from refformer.refimpl import (
    Config,
    RefformerError,
    decoder_layer_forward,
    encoder_layer_forward,
    load,
    model_forward,
    padding_mask,
    rel_error,
)
from refformer.refimpl.convert.torch import (
    config_from_torch_layer,
    convert_state_dict_file,
    decoder_layer_params_from_torch,
    encoder_layer_params_from_torch,
    from_state_dict,
    from_torch,
)
from tests.helpers import randomize_torch, write_word_level_tokenizer

torch = pytest.importorskip("torch")
nn = torch.nn

pytestmark = [pytest.mark.filterwarnings("ignore:enable_nested_tensor is True"),
              pytest.mark.usefixtures("torch_slow_path")]  # tests/refimpl/conftest.py

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


# ---------------------------------------------------------------------------- torch models


def additive(pad, dtype):
    """A boolean padding mask (True = pad) as the float mask torch adds to scores (0 keep, -inf pad)."""
    return torch.zeros(pad.shape, dtype=dtype).masked_fill(pad, -math.inf)


class TokenEmbedding(nn.Module):
    def __init__(self, vocab_size, emb_size, dtype):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, emb_size, dtype=dtype)
        self.emb_size = emb_size

    def forward(self, tokens):
        return self.embedding(tokens.long()) * math.sqrt(self.emb_size)


class PositionalEncoding(nn.Module):
    """The tutorial's table, computed in torch in the module's dtype: [maxlen, 1, D]."""

    def __init__(self, emb_size, maxlen, dtype, name="pos_embedding"):
        super().__init__()
        self.name = name
        den = torch.exp(-torch.arange(0, emb_size, 2, dtype=dtype) * math.log(10000) / emb_size)
        pos = torch.arange(0, maxlen, dtype=dtype).reshape(maxlen, 1)
        pos_embedding = torch.zeros((maxlen, emb_size), dtype=dtype)
        pos_embedding[:, 0::2] = torch.sin(pos * den)
        pos_embedding[:, 1::2] = torch.cos(pos * den)
        self.register_buffer(name, pos_embedding.unsqueeze(-2))

    def forward(self, token_embedding):  # [L, B, D]
        return token_embedding + getattr(self, self.name)[: token_embedding.size(0), :]


class Seq2SeqTransformer(nn.Module):
    """PyTorch's translation-tutorial model (sequence-first unless batch_first), with share/tie options."""

    def __init__(self, V, D, H, F, n_enc, n_dec, *, norm_first=False, activation="relu", share=False, tie=False,
                 batch_first=False, maxlen=32, dtype=torch.float32):
        super().__init__()
        self.batch_first = batch_first
        self.transformer = nn.Transformer(d_model=D, nhead=H, num_encoder_layers=n_enc, num_decoder_layers=n_dec,
                                          dim_feedforward=F, dropout=0.1, activation=activation,
                                          norm_first=norm_first, batch_first=batch_first, dtype=dtype)
        self.generator = nn.Linear(D, V, dtype=dtype)
        self.src_tok_emb = TokenEmbedding(V, D, dtype)
        self.tgt_tok_emb = self.src_tok_emb if share else TokenEmbedding(V, D, dtype)
        if tie:
            self.generator.weight = self.tgt_tok_emb.embedding.weight
        self.positional_encoding = PositionalEncoding(D, maxlen, dtype)

    def embed(self, table, ids):  # ids [B, L] -> [L, B, D] (or [B, L, D] when batch_first)
        x = self.positional_encoding(table(ids).transpose(0, 1))
        return x.transpose(0, 1) if self.batch_first else x

    def forward(self, src, tgt, src_pad, tgt_pad):
        """Batch-major ids and padding masks (True = pad) in, logits [B, T, V] out."""
        dtype = self.generator.weight.dtype
        tgt_mask = self.transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=dtype)  # float, -inf above
        out = self.transformer(self.embed(self.src_tok_emb, src), self.embed(self.tgt_tok_emb, tgt),
                               tgt_mask=tgt_mask, src_key_padding_mask=additive(src_pad, dtype),
                               tgt_key_padding_mask=additive(tgt_pad, dtype),
                               memory_key_padding_mask=additive(src_pad, dtype))
        logits = self.generator(out)
        return logits if self.batch_first else logits.transpose(0, 1)


class CausalLM(nn.Module):
    """Decoder-only: embedding (unscaled) + learned positions -> causal nn.TransformerEncoder -> fc_out."""

    def __init__(self, V, D, H, F, n_layers, *, norm_first=True, final_norm=True, tie=False, batch_first=True,
                 maxlen=16, dtype=torch.float32):
        super().__init__()
        self.batch_first = batch_first
        self.embedding = nn.Embedding(V, D, padding_idx=0, dtype=dtype)
        self.pos_emb = nn.Embedding(maxlen, D, dtype=dtype)
        layer = nn.TransformerEncoderLayer(D, H, F, dropout=0.0, activation="gelu", norm_first=norm_first,
                                           batch_first=batch_first, dtype=dtype)
        self.transformer_encoder = nn.TransformerEncoder(
            layer, n_layers, norm=nn.LayerNorm(D, dtype=dtype) if final_norm else None, enable_nested_tensor=False)
        self.fc_out = nn.Linear(D, V, bias=False, dtype=dtype)
        if tie:
            self.fc_out.weight = self.embedding.weight

    def forward(self, ids, pad):
        T = ids.shape[1]
        x = self.embedding(ids) + self.pos_emb(torch.arange(T))
        x = x if self.batch_first else x.transpose(0, 1)
        dtype = self.fc_out.weight.dtype
        h = self.transformer_encoder(x, mask=nn.Transformer.generate_square_subsequent_mask(T, dtype=dtype),
                                     is_causal=True, src_key_padding_mask=additive(pad, dtype))
        return self.fc_out(h if self.batch_first else h.transpose(0, 1))


class WordLanguageModel(nn.Module):
    """pytorch/examples word_language_model's TransformerModel: `encoder` is the embedding, `decoder` the head."""

    def __init__(self, V, D, H, F, n_layers, dtype=torch.float32):
        super().__init__()
        self.pos_encoder = PositionalEncoding(D, 64, dtype, name="pe")
        layer = nn.TransformerEncoderLayer(D, H, F, dropout=0.0, dtype=dtype)  # sequence-first
        self.transformer_encoder = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.encoder = nn.Embedding(V, D, dtype=dtype)
        self.decoder = nn.Linear(D, V, dtype=dtype)
        self.ninp = D

    def forward(self, ids, pad):
        T = ids.shape[1]
        dtype = self.decoder.weight.dtype
        src = self.pos_encoder(self.encoder(ids.T) * math.sqrt(self.ninp))  # [T, B, D]
        output = self.transformer_encoder(src, nn.Transformer.generate_square_subsequent_mask(T, dtype=dtype),
                                          src_key_padding_mask=additive(pad, dtype))
        return self.decoder(output).transpose(0, 1)


V, D, H, F = 12, 8, 2, 16


def batch(seed, B=3, S=5, T=4):
    """src, tgt ids [B, L] with right padding (pad_id 0, first token real) and torch's pad masks (True = pad)."""
    rng = np.random.default_rng(seed)

    def ids(L):
        lengths = rng.integers(1, L + 1, size=B)
        pad = np.arange(L)[None, :] >= lengths[:, None]
        return np.where(pad, 0, rng.integers(4, V, size=(B, L))), pad

    return ids(S), ids(T)


def assert_same_as_torch(ours, theirs, dtype, label):
    error = rel_error(ours, theirs.detach().numpy())
    assert error <= TOLERANCE[dtype], f"{label}: differs from torch by {error:.3e} (max-norm relative)"


def seq2seq_logits(cfg, params, model, seed):
    (src, src_pad), (tgt, tgt_pad) = batch(seed)
    ours, _ = model_forward(cfg, params, src, tgt, src_mask=~src_pad, tgt_mask=~tgt_pad)
    with torch.no_grad():
        theirs = model(*(torch.from_numpy(x) for x in (src, tgt, src_pad, tgt_pad)))
    return ours, theirs


def lm_logits(cfg, params, model, seed):
    _, (ids, pad) = batch(seed, T=6)
    ours, _ = model_forward(cfg, params, None, ids, tgt_mask=~pad)
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids), torch.from_numpy(pad))
    return ours, theirs


# ---------------------------------------------------------------------------- from_torch


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("share, tie, batch_first, norm_first, activation", [
    (False, False, False, False, "relu"), (True, True, True, True, "gelu"), (False, True, False, True, "relu"),
    (True, False, True, False, "gelu")])
def test_from_torch_seq2seq(dtype, share, tie, batch_first, norm_first, activation):
    model = randomize_torch(Seq2SeqTransformer(V, D, H, F, 2, 1, norm_first=norm_first, activation=activation,
                                               share=share, tie=tie, batch_first=batch_first, dtype=dtype),
                            np.random.default_rng(1))
    cfg, params = from_torch(model, dropout=0.0)
    assert (cfg.family, cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.d_ff) == ("encoder-decoder", V, D, H, F)
    assert (cfg.n_encoder_layers, cfg.n_decoder_layers) == (2, 1)
    assert (cfg.norm_first, cfg.activation) == (norm_first, activation)
    assert (cfg.share_embeddings, cfg.tie_embeddings, cfg.lm_head_bias, cfg.final_norm) == (share, tie, True, True)
    assert (cfg.positional, cfg.max_positions, cfg.embed_scale) == ("sinusoidal", 32, True)
    assert params["decoder"]["embed_tokens"]["weight"].dtype == (np.float64 if dtype == torch.float64 else np.float32)
    ours, theirs = seq2seq_logits(cfg, params, model, seed=2)
    assert_same_as_torch(ours, theirs, dtype, f"share={share} tie={tie} batch_first={batch_first}")


@pytest.mark.parametrize("tie, final_norm, batch_first", [(False, True, True), (True, False, False)])
def test_from_torch_decoder_only(tie, final_norm, batch_first):
    model = randomize_torch(CausalLM(V, D, H, F, 2, final_norm=final_norm, tie=tie, batch_first=batch_first,
                                     dtype=torch.float64), np.random.default_rng(3))
    cfg, params = from_torch(model, embed_scale=False)
    assert (cfg.family, cfg.n_encoder_layers, cfg.n_decoder_layers) == ("decoder-only", 0, 2)
    assert cfg.final_norm == final_norm
    assert (cfg.positional, cfg.max_positions, cfg.tie_embeddings, cfg.lm_head_bias) == ("learned", 16, tie, False)
    assert (cfg.pad_id, cfg.activation, cfg.norm_first, cfg.dropout) == (0, "gelu", True, 0.0)  # pad_id: padding_idx
    ours, theirs = lm_logits(cfg, params, model, seed=4)
    assert_same_as_torch(ours, theirs, torch.float64, f"decoder-only tie={tie}")


def test_word_language_model_naming():
    """encoder.weight (embedding), decoder.weight/bias (head), pos_encoder.pe: from_torch and from_state_dict agree."""
    model = randomize_torch(WordLanguageModel(V, D, H, F, 2, dtype=torch.float64), np.random.default_rng(11))
    cfg, params = from_torch(model)
    assert (cfg.family, cfg.final_norm, cfg.lm_head_bias, cfg.max_positions) == ("decoder-only", False, True, 64)
    ours, theirs = lm_logits(cfg, params, model, seed=12)
    assert_same_as_torch(ours, theirs, torch.float64, "word_language_model via from_torch")
    cfg2, params2 = from_state_dict(model.state_dict(), n_heads=H, dropout=0.0)
    assert cfg2 == cfg
    ours, theirs = lm_logits(cfg2, params2, model, seed=12)
    assert_same_as_torch(ours, theirs, torch.float64, "word_language_model via from_state_dict")


def test_from_torch_reads_dropout_and_takes_overrides():
    model = Seq2SeqTransformer(V, D, H, F, 1, 1)
    cfg, _ = from_torch(model, pad_id=5, bos_id=6, eos_id=7, unk_id=8, max_positions=20)
    assert (cfg.dropout, cfg.pad_id, cfg.bos_id, cfg.eos_id, cfg.unk_id, cfg.max_positions) == (0.1, 5, 6, 7, 8, 20)
    assert from_torch(model, d_model=D)[0].d_model == D  # agreeing with the module is fine


@pytest.mark.parametrize("make, overrides, message", [
    (lambda: nn.Transformer(D, H, 1, 1, F), {}, "no token nn.Embedding"),
    (lambda: nn.Sequential(nn.Embedding(V, D), nn.Linear(D, V)), {}, "nn.Transformer"),
    (lambda: Seq2SeqTransformer(V, D, H, F, 1, 1), {"d_model": 16}, "contradicts"),
    (lambda: Seq2SeqTransformer(V, D, H, F, 1, 1), {"colour": "red"}, "unknown"),
    (lambda: CausalLM(V, D, H, F, 1), {"positional": "sinusoidal"}, "contradicts"),
    (lambda: Seq2SeqTransformer(V, D, H, F, 1, 1, activation=nn.Tanh()), {}, "activation"),
])
def test_from_torch_refuses_what_it_cannot_reproduce(make, overrides, message):
    with pytest.raises(RefformerError, match=message):
        from_torch(make(), **overrides)


def test_from_torch_refuses_unmapped_parameters_and_foreign_positions():
    model = Seq2SeqTransformer(V, D, H, F, 1, 1)
    model.extra_norm = nn.LayerNorm(D)
    with pytest.raises(RefformerError, match="cannot map: extra_norm"):
        from_torch(model)
    model = Seq2SeqTransformer(V, D, H, F, 1, 1)
    model.positional_encoding.pos_embedding.normal_()  # not the sinusoidal table refimpl computes
    with pytest.raises(RefformerError, match="not the standard sinusoidal table"):
        from_torch(model)


@pytest.mark.parametrize("activation, expected", [
    (lambda: nn.GELU(approximate="tanh"), "gelu_tanh"), (lambda: nn.functional.silu, "silu"),
    (lambda: nn.ReLU(), "relu"), (lambda: "gelu", "gelu")])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_conversion_variants(activation, expected, bias):
    """Activations given as modules or functions, bias=False (zero biases), layer_norm_eps, read and reproduced."""
    kwargs = dict(d_model=D, nhead=H, dim_feedforward=F, dropout=0.0, activation=activation(), layer_norm_eps=1e-6,
                  batch_first=True, norm_first=not bias, bias=bias, dtype=torch.float64)
    encoder_layer = randomize_torch(nn.TransformerEncoderLayer(**kwargs), np.random.default_rng(13))
    decoder_layer = randomize_torch(nn.TransformerDecoderLayer(**kwargs), np.random.default_rng(14))
    fields = config_from_torch_layer(encoder_layer)
    assert fields == {"d_model": D, "n_heads": H, "d_ff": F, "norm_first": not bias, "activation": expected,
                      "norm_eps": 1e-6, "dropout": 0.0}
    cfg = Config(**fields)
    rng = np.random.default_rng(15)
    x, memory = rng.normal(size=(2, 5, D)), rng.normal(size=(2, 3, D))
    keep = padding_mask(np.ones((2, 5), bool))
    with torch.no_grad():
        theirs = encoder_layer(torch.from_numpy(x))
        ours, _ = encoder_layer_forward(encoder_layer_params_from_torch(encoder_layer), x, keep, cfg)
        assert_same_as_torch(ours, theirs, torch.float64, f"encoder layer, {expected}, bias={bias}")
        causal = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
        theirs = decoder_layer(torch.from_numpy(x), torch.from_numpy(memory), tgt_mask=causal)
        ours, _ = decoder_layer_forward(decoder_layer_params_from_torch(decoder_layer), x,
                                        np.tril(np.ones((5, 5), bool)), memory, None, cfg)
        assert_same_as_torch(ours, theirs, torch.float64, f"decoder layer, {expected}, bias={bias}")


# ---------------------------------------------------------------------------- state_dict files


@pytest.mark.parametrize("share, tie, norm_first", [(False, False, False), (True, True, True)])
def test_convert_state_dict_file_seq2seq_round_trip(tmp_path, share, tie, norm_first):
    model = randomize_torch(Seq2SeqTransformer(V, D, H, F, 2, 2, share=share, tie=tie, norm_first=norm_first),
                            np.random.default_rng(5))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    cfg = convert_state_dict_file(tmp_path / "model.pt", write_word_level_tokenizer(tmp_path / "tokenizer.json", V),
                                  tmp_path / "out", n_heads=H, norm_first=norm_first)
    loaded_cfg, params = load(tmp_path / "out")
    assert loaded_cfg == cfg
    assert (cfg.share_embeddings, cfg.tie_embeddings, cfg.max_positions) == (share, tie, 32)  # storage sharing survives
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    ours, theirs = seq2seq_logits(cfg, params, model, seed=6)
    assert_same_as_torch(ours, theirs, torch.float32, "converted seq2seq")


def test_convert_state_dict_file_decoder_only_round_trip(tmp_path):
    model = randomize_torch(CausalLM(V, D, H, F, 2, tie=True), np.random.default_rng(7))
    torch.save({"epoch": 3, "model_state_dict": model.state_dict()}, tmp_path / "checkpoint.pt")  # unwrapped
    cfg = convert_state_dict_file(tmp_path / "checkpoint.pt", write_word_level_tokenizer(tmp_path / "tok.json", V),
                                  tmp_path / "out", n_heads=H, norm_first=True, activation="gelu", embed_scale=False)
    assert (cfg.family, cfg.positional, cfg.tie_embeddings) == ("decoder-only", "learned", True)
    loaded_cfg, params = load(tmp_path / "out")
    ours, theirs = lm_logits(loaded_cfg, params, model, seed=8)
    assert_same_as_torch(ours, theirs, torch.float32, "converted decoder-only")


def test_from_state_dict_separate_qkv_weights():
    """q/k/v_proj_weight (MultiheadAttention with kdim/vdim given) convert like the packed in_proj_weight."""
    model = randomize_torch(Seq2SeqTransformer(V, D, H, F, 1, 1, dtype=torch.float64), np.random.default_rng(9))
    state = model.state_dict()
    cfg, params = from_state_dict(state, n_heads=H, dropout=0.0)
    unpacked = {}
    for key, value in state.items():
        if key.endswith("in_proj_weight"):
            for name, part in zip("qkv", value.chunk(3)):
                unpacked[key.replace("in_proj_weight", f"{name}_proj_weight")] = part
        else:
            unpacked[key] = value
    cfg2, params2 = from_state_dict(unpacked, n_heads=H, dropout=0.0)
    assert cfg2 == cfg
    ours, theirs = seq2seq_logits(cfg2, params2, model, seed=10)
    assert_same_as_torch(ours, theirs, torch.float64, "separate q/k/v")


def test_from_state_dict_errors():
    state = Seq2SeqTransformer(V, D, H, F, 1, 1).state_dict()
    with pytest.raises(RefformerError, match="n_heads is required"):
        from_state_dict(state)
    with pytest.raises(RefformerError, match="unknown options"):
        from_state_dict(state, n_heads=H, d_model=D)
    with pytest.raises(RefformerError, match="cannot map: .*mystery.weight"):
        from_state_dict({**state, "mystery.weight": torch.zeros(3)}, n_heads=H)
    with pytest.raises(RefformerError, match="must divide"):
        from_state_dict(state, n_heads=3)
    with pytest.raises(RefformerError, match="not an nn.Transformer model"):
        from_state_dict({"linear.weight": torch.zeros(V, D)}, n_heads=H)
    with pytest.raises(RefformerError, match="not tensors"):
        from_state_dict({**state, "step": 3}, n_heads=H)


def test_convert_refuses_pickled_module_and_missing_files(tmp_path):
    model = Seq2SeqTransformer(V, D, H, F, 1, 1)
    tokenizer = write_word_level_tokenizer(tmp_path / "tokenizer.json", V)
    torch.save(model, tmp_path / "whole_model.pt")  # a pickled module: weights_only=True refuses it
    with pytest.raises(RefformerError, match="not a state_dict") as error:
        convert_state_dict_file(tmp_path / "whole_model.pt", tokenizer, tmp_path / "out", n_heads=H)
    assert "\n" not in str(error.value)
    with pytest.raises(RefformerError, match="does not exist"):
        convert_state_dict_file(tmp_path / "missing.pt", tokenizer, tmp_path / "out", n_heads=H)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    with pytest.raises(RefformerError, match="does not exist"):
        convert_state_dict_file(tmp_path / "model.pt", tmp_path / "no_tokenizer.json", tmp_path / "out", n_heads=H)
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(RefformerError, match="not a state_dict"):
        convert_state_dict_file(tmp_path / "list.pt", tokenizer, tmp_path / "out", n_heads=H)
    with pytest.raises(RefformerError, match="13 tokens but the model's vocab_size is 12"):
        convert_state_dict_file(tmp_path / "model.pt", write_word_level_tokenizer(tmp_path / "big.json", V + 1),
                                tmp_path / "out",
                                n_heads=H)
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_refimpl_imports_without_torch():
    """torch is imported lazily: refimpl (and torch_convert itself) import with torch unavailable."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "import refformer.refimpl, refformer.refimpl.convert.torch as tc\n"
            "try:\n    tc.from_torch(object())\nexcept refformer.refimpl.RefformerError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "needs torch" in result.stdout


# ---------------------------------------------------------------------------- bad input: refused before writing


def _state_with(state, key, value):
    return {**state, key: value}


CONVERT_REFUSALS = [
    # (label, options, state_dict change, words in the message)
    ("n_heads 0", dict(n_heads=0), None, "n_heads must be a positive integer"),
    ("n_heads negative", dict(n_heads=-2), None, "n_heads must be a positive integer"),
    ("n_heads not dividing D", dict(n_heads=5), None, "must divide d_model"),
    ("n_heads float", dict(n_heads=2.0), None, "n_heads must be a positive integer, got 2.0"),
    ("n_heads bool", dict(n_heads=True), None, "n_heads must be a positive integer, got true"),
    ("pad_id = V", dict(pad_id=V), None, f"pad_id must be a token id in [0, {V})"),
    ("eos_id negative", dict(eos_id=-1), None, "eos_id must be an integer >= 0"),
    ("bos_id huge", dict(bos_id=10**9), None, "bos_id must be a token id"),
    ("norm_eps NaN", dict(norm_eps=float("nan")), None, "norm_eps must be a finite number"),
    ("dropout 1", dict(dropout=1.0), None, "dropout must be in [0, 1)"),
    ("norm_first string", dict(norm_first="false"), None, 'norm_first must be true or false, got "false"'),
    ("activation unknown", dict(activation="tanh"), None, "activation must be one of"),
    ("max_positions huge", dict(max_positions=10**12), None, "memory"),
    ("NaN weights", {}, lambda s: _state_with(s, "generator.bias", torch.full_like(s["generator.bias"], math.nan)),
     "generator.bias holds NaN or infinite values"),
    ("inf weights", {}, lambda s: _state_with(s, "transformer.encoder.layers.0.linear1.weight",
                                              torch.full_like(s["transformer.encoder.layers.0.linear1.weight"],
                                                              math.inf)), "NaN or infinite"),
    ("in_proj_bias misshapen", {}, lambda s: _state_with(s, "transformer.encoder.layers.0.self_attn.in_proj_bias",
                                                         torch.zeros(3 * D + 1)), "in_proj_bias is"),
    ("linear bias misshapen", {}, lambda s: _state_with(s, "transformer.encoder.layers.0.linear1.bias",
                                                        torch.zeros(F + 2)), "linear1.bias is"),
    ("norm weight misshapen", {}, lambda s: _state_with(s, "transformer.encoder.layers.0.norm1.weight",
                                                        torch.zeros(D - 1)), "norm1.weight is"),
    ("integer tensor", {}, lambda s: _state_with(s, "generator.bias", torch.zeros(V, dtype=torch.int64)),
     "expected floating point"),
    ("empty state_dict", {}, lambda s: {}, "not a state_dict"),
]


@pytest.mark.parametrize("label, options, change, words", CONVERT_REFUSALS, ids=[c[0] for c in CONVERT_REFUSALS])
def test_convert_refuses_bad_input_before_writing_anything(tmp_path, label, options, change, words):
    state = Seq2SeqTransformer(V, D, H, F, 1, 1).state_dict()
    torch.save(change(state) if change else state, tmp_path / "model.pt")
    tokenizer = write_word_level_tokenizer(tmp_path / "tokenizer.json", V)
    with pytest.raises(RefformerError, match=re.escape(words)) as info:
        convert_state_dict_file(tmp_path / "model.pt", tokenizer, tmp_path / "out", **{"n_heads": H, **options})
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # not even the folder


def test_convert_checks_the_tokenizer_before_writing(tmp_path):
    torch.save(Seq2SeqTransformer(V, D, H, F, 1, 1).state_dict(), tmp_path / "model.pt")
    tokenizer = write_word_level_tokenizer(tmp_path / "tokenizer.json", V)
    with pytest.raises(RefformerError, match="<pad> at id 0 but the model's pad_id is 5"):
        convert_state_dict_file(tmp_path / "model.pt", tokenizer, tmp_path / "out", n_heads=H, pad_id=5)
    (tmp_path / "latin1.json").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(RefformerError, match="not UTF-8"):
        convert_state_dict_file(tmp_path / "model.pt", tmp_path / "latin1.json", tmp_path / "out", n_heads=H)
    assert not (tmp_path / "out").exists()
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + tokenizer.read_bytes())  # a byte-order mark is dropped
    cfg = convert_state_dict_file(tmp_path / "model.pt", bom, tmp_path / "out", n_heads=H, max_positions=64)
    loaded_cfg, _ = load(tmp_path / "out")  # what convert writes, load reads
    assert loaded_cfg == cfg and cfg.max_positions == 64
