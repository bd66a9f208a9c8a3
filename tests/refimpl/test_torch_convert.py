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


class Textbook(nn.Module):
    """The first model most people write: nn.Embedding + nn.Transformer + nn.Linear, no positional encoding and no
    embedding scale (issue 13). forward(src, tgt) takes ids in the transformer's layout; pos="sin" adds a
    sinusoidal table computed on the fly (no buffer to see), scale multiplies by sqrt(D)."""

    def __init__(self, V, D, H, F, *, batch_first=True, pos="none", scale=False, dtype=torch.float32):
        super().__init__()
        self.batch_first, self.pos, self.scale = batch_first, pos, scale
        self.embed = nn.Embedding(V, D, dtype=dtype)
        self.transformer = nn.Transformer(D, H, 2, 1, F, dropout=0.1, batch_first=batch_first, dtype=dtype)
        self.out = nn.Linear(D, V, dtype=dtype)

    def embed_ids(self, ids):
        x = self.embed(ids) * (math.sqrt(self.embed.embedding_dim) if self.scale else 1.0)
        if self.pos == "sin":
            L, D = ids.shape[1 if self.batch_first else 0], self.embed.embedding_dim
            den = torch.exp(-torch.arange(0, D, 2, dtype=x.dtype) * math.log(10000) / D)
            angles = torch.arange(L, dtype=x.dtype)[:, None] * den
            table = torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(L, D)
            x = x + (table[None] if self.batch_first else table[:, None])
        return x

    def forward(self, src, tgt):
        T = tgt.shape[1 if self.batch_first else 0]
        causal = nn.Transformer.generate_square_subsequent_mask(T, dtype=self.out.weight.dtype)
        return self.out(self.transformer(self.embed_ids(src), self.embed_ids(tgt), tgt_mask=causal))


class TextbookLM(nn.Module):
    """Decoder-only textbook: nn.Embedding + causal nn.TransformerEncoder + nn.Linear, forward(ids [B, T])."""

    def __init__(self, V, D, H, F, dtype=torch.float64):
        super().__init__()
        self.embed = nn.Embedding(V, D, dtype=dtype)
        layer = nn.TransformerEncoderLayer(D, H, F, dropout=0.1, batch_first=True, dtype=dtype)
        self.stack = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D, V, dtype=dtype)

    def forward(self, ids):
        causal = nn.Transformer.generate_square_subsequent_mask(ids.shape[1], dtype=self.head.weight.dtype)
        return self.head(self.stack(self.embed(ids), mask=causal, is_causal=True))


class DictInput(Textbook):
    """The textbook model with a forward from_torch's probe cannot call: forward(batch) with a dict."""

    def forward(self, batch):
        return super().forward(batch["src"], batch["tgt"])


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
    with pytest.raises(RefformerError, match=r"does not show whether the model scales its embeddings .* "
                                             r"--embed-scale/--no-embed-scale"):
        from_state_dict(model.state_dict(), n_heads=H, dropout=0.0)  # a table shows positions, never the scale
    cfg2, params2 = from_state_dict(model.state_dict(), n_heads=H, embed_scale=True, dropout=0.0)
    assert cfg.pad_id is None  # the module has no padding_idx; a state_dict does not say: pad_id 0 by default
    assert cfg2 == cfg.replace(pad_id=0)
    ours, theirs = lm_logits(cfg2, params2, model, seed=12)
    assert_same_as_torch(ours, theirs, torch.float64, "word_language_model via from_state_dict")


def textbook_logits(cfg, params, model, seed, B=3, S=6, T=5):
    """Logits of the module (eval mode) and of refimpl's model_forward (default masks) on the same random ids,
    every id included (0 too: a module without padding_idx attends to every token): both [B, T, V]."""
    rng = np.random.default_rng(seed)
    src, tgt = rng.integers(0, V, (B, S)), rng.integers(0, V, (B, T))
    model.eval()
    with torch.no_grad():
        layout = (lambda x: torch.from_numpy(x)) if model.batch_first else (lambda x: torch.from_numpy(x.T.copy()))
        theirs = model(layout(src), layout(tgt))
    theirs = theirs if model.batch_first else theirs.transpose(0, 1)
    ours, _ = model_forward(cfg.replace(dropout=0.0), params, src, tgt)
    return ours, theirs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch_first", [True, False])
def test_the_textbook_model_converts_exactly(dtype, batch_first):
    """Issue 13: Embedding + nn.Transformer + Linear without positions or scale was converted with sinusoids and
    sqrt(D) (relative error 0.35-0.65). The probe reads positional="none", embed_scale=False off the module; no
    padding_idx: pad_id null, so no token the module attends to is masked."""
    model = randomize_torch(Textbook(V, D, H, F, batch_first=batch_first, dtype=dtype), np.random.default_rng(21))
    model.train()
    cfg, params = from_torch(model)
    assert model.training and all(m.training for m in model.modules())  # the probe restores train mode
    assert (cfg.positional, cfg.embed_scale, cfg.pad_id, cfg.dropout) == ("none", False, None, 0.1)
    ours, theirs = textbook_logits(cfg, params, model, seed=22)
    assert_same_as_torch(ours, theirs, dtype, f"textbook batch_first={batch_first}")


@pytest.mark.parametrize("pos, scale", [("none", True), ("sin", False), ("sin", True)])
def test_the_probe_tells_positions_and_scale_apart(pos, scale):
    """Sinusoids computed in forward (no buffer shows them) and a sqrt(D) scale in forward code: each of the four
    combinations is read off the module and reproduced exactly."""
    model = randomize_torch(Textbook(V, D, H, F, pos=pos, scale=scale, dtype=torch.float64),
                            np.random.default_rng(23))
    cfg, params = from_torch(model)
    assert (cfg.positional, cfg.embed_scale) == ({"none": "none", "sin": "sinusoidal"}[pos], scale)
    ours, theirs = textbook_logits(cfg, params, model, seed=24)
    assert_same_as_torch(ours, theirs, torch.float64, f"pos={pos} scale={scale}")


def test_the_textbook_decoder_only_model_converts_exactly():
    model = randomize_torch(TextbookLM(V, D, H, F), np.random.default_rng(25))
    cfg, params = from_torch(model)
    assert (cfg.family, cfg.positional, cfg.embed_scale, cfg.pad_id) == ("decoder-only", "none", False, None)
    ids = np.random.default_rng(26).integers(0, V, (3, 7))
    ours, _ = model_forward(cfg.replace(dropout=0.0), params, None, ids)
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids))
    assert_same_as_torch(ours, theirs, torch.float64, "textbook decoder-only")


class TextbookVariant(Textbook):
    """Textbook with padding_idx 0 (its forward masking those keys or not), without the causal mask, or with an
    operation after its head."""

    def __init__(self, *, padding_idx=None, mask_pad=False, causal=True, post=None):
        super().__init__(V, D, H, F, dtype=torch.float64)
        self.embed.padding_idx, self.mask_pad, self.causal, self.post = padding_idx, mask_pad, causal, post

    def forward(self, src, tgt):
        masks = {}
        if self.mask_pad:
            pad = self.embed.padding_idx
            masks = {"src_key_padding_mask": src == pad, "tgt_key_padding_mask": tgt == pad,
                     "memory_key_padding_mask": src == pad}
        causal = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=torch.float64)
        y = self.out(self.transformer(self.embed_ids(src), self.embed_ids(tgt), tgt_mask=causal if self.causal
                                      else None, **masks))
        return y.log_softmax(-1) if self.post == "log_softmax" else y


@pytest.mark.parametrize("mask_pad", [False, True])
def test_pad_id_is_padding_idx_only_when_the_forward_masks_it(mask_pad):
    """padding_idx set but a forward that masks nothing: pad_id was padding_idx, so refformer masked keys the module
    attends to (8e-2 off on ids holding it, silently). The whole forward is now run on probe ids holding it."""
    model = randomize_torch(TextbookVariant(padding_idx=0, mask_pad=mask_pad), np.random.default_rng(31))
    cfg, params = from_torch(model)
    assert cfg.pad_id == (0 if mask_pad else None)
    rng = np.random.default_rng(32)
    src, tgt = rng.integers(1, V, (2, 6)), rng.integers(1, V, (2, 5))
    src[0, 4:], src[1, 2], tgt[1, 3:] = 0, 0, 0
    with torch.no_grad():
        theirs = model(torch.from_numpy(src), torch.from_numpy(tgt)).numpy()
    ours, _ = model_forward(cfg.replace(dropout=0.0), params, src, tgt)
    real = tgt != 0 if mask_pad else np.ones(tgt.shape, bool)
    assert_same_as_torch(ours[real], torch.from_numpy(theirs[real]), torch.float64, f"padding_idx, mask_pad={mask_pad}")


class TextbookLMVariant(nn.Module):
    """TextbookLM with padding_idx 0 (its forward masking those keys or not), batch- or sequence-first."""

    def __init__(self, *, batch_first, mask_pad):
        super().__init__()
        self.batch_first, self.mask_pad = batch_first, mask_pad
        self.embed = nn.Embedding(V, D, padding_idx=0, dtype=torch.float64)
        layer = nn.TransformerEncoderLayer(D, H, F, batch_first=batch_first, dtype=torch.float64)
        self.stack = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D, V, dtype=torch.float64)

    def forward(self, ids):
        causal = nn.Transformer.generate_square_subsequent_mask(ids.shape[1 if self.batch_first else 0],
                                                                dtype=torch.float64)
        pads = None if not self.mask_pad else (ids == 0) if self.batch_first else (ids == 0).T
        return self.head(self.stack(self.embed(ids), mask=causal, src_key_padding_mask=pads))


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_pad", [False, True])
def test_a_causal_lm_keeps_pad_id_only_when_its_forward_masks_it(batch_first, mask_pad):
    """The decoder-only check: a sequence-first module reads the probe's [B, T] as [T, B] (both readings are
    tried), and the padding sits where a later query of either reading attends to it."""
    model = randomize_torch(TextbookLMVariant(batch_first=batch_first, mask_pad=mask_pad), np.random.default_rng(34))
    cfg, params = from_torch(model)
    assert cfg.pad_id == (0 if mask_pad else None)
    ids = np.random.default_rng(35).integers(1, V, (2, 7))
    ids[1, 3], ids[0, 2] = 0, 0
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids if batch_first else ids.T.copy()))
    theirs = theirs if batch_first else theirs.transpose(0, 1)
    ours, _ = model_forward(cfg.replace(dropout=0.0), params, None, ids)
    real = ids != 0 if mask_pad else np.ones(ids.shape, bool)
    assert_same_as_torch(ours[real], theirs[torch.from_numpy(real)], torch.float64, "causal LM padding_idx")


@pytest.mark.parametrize("options", [{"causal": False}, {"post": "log_softmax"}])
def test_a_forward_that_does_more_than_refformer_is_refused(options):
    """No causal mask on the target, or log_softmax after the head: the probe saw only the stacks' inputs and the
    conversion was silently 0.27-0.75 off."""
    model = randomize_torch(TextbookVariant(**options), np.random.default_rng(33))
    with pytest.raises(RefformerError, match="computes other logits than its embeddings") as error:
        from_torch(model)
    assert "\n" not in str(error.value)


def test_options_the_probe_contradicts_are_refused():
    model = Textbook(V, D, H, F)
    with pytest.raises(RefformerError, match="no candidate reproduces") as error:
        from_torch(model, positional="sinusoidal")
    assert "positional='sinusoidal', embed_scale=False: " in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(RefformerError, match="no candidate reproduces"):
        from_torch(model, embed_scale=True)
    with pytest.raises(RefformerError, match="relative or rotary"):
        from_torch(model, positional="rotary")


def test_a_module_the_probe_cannot_run_refuses_then_converts_with_the_options_it_names():
    model = randomize_torch(DictInput(V, D, H, F, dtype=torch.float64), np.random.default_rng(27))
    with pytest.raises(RefformerError) as error:
        from_torch(model)
    message = str(error.value)
    assert "\n" not in message and "could not run its forward on probe ids" in message
    assert message.endswith("pass positional='none' or 'sinusoidal' and embed_scale=True or False")
    cfg, params = from_torch(model, positional="none", embed_scale=False)
    rng = np.random.default_rng(28)
    src, tgt = rng.integers(0, V, (3, 6)), rng.integers(0, V, (3, 5))
    with torch.no_grad():
        theirs = model({"src": torch.from_numpy(src), "tgt": torch.from_numpy(tgt)})
    ours, _ = model_forward(cfg.replace(dropout=0.0), params, src, tgt)
    assert_same_as_torch(ours, theirs, torch.float64, "dict-input textbook with options")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_textbook_state_dict_needs_both_options_then_converts_exactly(tmp_path, dtype):
    """convert-torch: a state_dict without a position table shows neither option; the one-line error names both
    flags, and with them the converted model equals the module."""
    from click.testing import CliRunner

    from refformer.runtime.cli import main

    model = randomize_torch(Textbook(V, D, H, F, dtype=dtype), np.random.default_rng(29))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    tokenizer = write_word_level_tokenizer(tmp_path / "tokenizer.json", V)
    args = ["convert-torch", str(tmp_path / "model.pt"), "--tokenizer", str(tokenizer), "--out", str(tmp_path / "m"),
            "--n-heads", str(H)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the state_dict has no position table"), result.output
    assert "--positional none|sinusoidal" in lines[0] and "--embed-scale/--no-embed-scale" in lines[0]
    assert "--pad-id none" in lines[0]  # a forward without key_padding_mask attends to id 0 too
    assert not (tmp_path / "m").exists()
    result = CliRunner().invoke(main, [*args, "--positional", "none"])
    assert result.exit_code == 1 and "--positional" not in result.stderr and "--no-embed-scale" in result.stderr
    result = CliRunner().invoke(main, [*args, "--positional", "none", "--no-embed-scale", "--pad-id", "none"])
    assert result.exit_code == 0, result.output
    cfg, params = load(tmp_path / "m")
    assert (cfg.positional, cfg.embed_scale, cfg.pad_id) == ("none", False, None)  # no id 0 masked by default
    ours, theirs = textbook_logits(cfg, params, model, seed=30)
    assert_same_as_torch(ours, theirs, torch.float32, "textbook via convert-torch")  # saved weights: float32
    with pytest.raises(RefformerError, match="relative or rotary"):
        from_state_dict(model.state_dict(), n_heads=H, positional="rotary", embed_scale=False)


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
                                  tmp_path / "out", n_heads=H, embed_scale=True, norm_first=norm_first)
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
    cfg, params = from_state_dict(state, n_heads=H, embed_scale=True, dropout=0.0)
    unpacked = {}
    for key, value in state.items():
        if key.endswith("in_proj_weight"):
            for name, part in zip("qkv", value.chunk(3)):
                unpacked[key.replace("in_proj_weight", f"{name}_proj_weight")] = part
        else:
            unpacked[key] = value
    cfg2, params2 = from_state_dict(unpacked, n_heads=H, embed_scale=True, dropout=0.0)
    assert cfg2 == cfg
    ours, theirs = seq2seq_logits(cfg2, params2, model, seed=10)
    assert_same_as_torch(ours, theirs, torch.float64, "separate q/k/v")


def test_from_state_dict_errors():
    state = Seq2SeqTransformer(V, D, H, F, 1, 1).state_dict()
    with pytest.raises(RefformerError, match="n_heads is required"):
        from_state_dict(state)
    with pytest.raises(RefformerError, match="unknown options"):
        from_state_dict(state, n_heads=H, embed_scale=True, d_model=D)
    with pytest.raises(RefformerError, match="cannot map: .*mystery.weight"):
        from_state_dict({**state, "mystery.weight": torch.zeros(3)}, n_heads=H, embed_scale=True)
    with pytest.raises(RefformerError, match="must divide"):
        from_state_dict(state, n_heads=3)
    with pytest.raises(RefformerError, match="not an nn.Transformer model"):
        from_state_dict({"linear.weight": torch.zeros(V, D)}, n_heads=H, embed_scale=True)
    with pytest.raises(RefformerError, match="not tensors"):
        from_state_dict({**state, "step": 3}, n_heads=H, embed_scale=True)


def test_convert_refuses_pickled_module_and_missing_files(tmp_path):
    model = Seq2SeqTransformer(V, D, H, F, 1, 1)
    tokenizer = write_word_level_tokenizer(tmp_path / "tokenizer.json", V)
    torch.save(model, tmp_path / "whole_model.pt")  # a pickled module: weights_only=True refuses it
    with pytest.raises(RefformerError, match="not a state_dict") as error:
        convert_state_dict_file(tmp_path / "whole_model.pt", tokenizer, tmp_path / "out", n_heads=H, embed_scale=True)
    assert "\n" not in str(error.value)
    with pytest.raises(RefformerError, match="does not exist"):
        convert_state_dict_file(tmp_path / "missing.pt", tokenizer, tmp_path / "out", n_heads=H, embed_scale=True)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    with pytest.raises(RefformerError, match="does not exist"):
        convert_state_dict_file(tmp_path / "model.pt", tmp_path / "no_tokenizer.json", tmp_path / "out", n_heads=H,
                                embed_scale=True)
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(RefformerError, match="not a state_dict"):
        convert_state_dict_file(tmp_path / "list.pt", tokenizer, tmp_path / "out", n_heads=H, embed_scale=True)
    with pytest.raises(RefformerError, match="13 tokens but the model's vocab_size is 12"):
        convert_state_dict_file(tmp_path / "model.pt", write_word_level_tokenizer(tmp_path / "big.json", V + 1),
                                tmp_path / "out", n_heads=H, embed_scale=True)
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
        convert_state_dict_file(tmp_path / "model.pt", tokenizer, tmp_path / "out", n_heads=H, embed_scale=True,
                                pad_id=5)
    (tmp_path / "latin1.json").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(RefformerError, match="not UTF-8"):
        convert_state_dict_file(tmp_path / "model.pt", tmp_path / "latin1.json", tmp_path / "out", n_heads=H,
                                embed_scale=True)
    assert not (tmp_path / "out").exists()
    bom = tmp_path / "bom.json"
    bom.write_bytes(b"\xef\xbb\xbf" + tokenizer.read_bytes())  # a byte-order mark is dropped
    cfg = convert_state_dict_file(tmp_path / "model.pt", bom, tmp_path / "out", n_heads=H, embed_scale=True,
                                  max_positions=64)
    loaded_cfg, _ = load(tmp_path / "out")  # what convert writes, load reads
    assert loaded_cfg == cfg and cfg.max_positions == 64
