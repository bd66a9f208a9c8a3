"""Export refuses, in one line naming them, the Config options its graphs do not compute yet (issue 13: imported
models reached the reference first), before any work and through every door: export_model, `refformer export`, and
`refformer generate`'s export on demand. Since issue 14 the reference graphs compute every option of issue 13
(tests/export/test_features.py), so the refusal machinery is exercised here with a position scheme taken out of
contract.EXPORTED_POSITIONALS; the runtime's generate still refuses null pad, bos and eos ids (its prompts, padding
and stop test read them), export and verify take them. The options the graphs compute (biases off, explicit values
equal to the defaults) still export, verified against refimpl."""

import math

import numpy as np
import pytest
from click.testing import CliRunner

from refformer.export import contract
from refformer.export.contract import unsupported_features
from refformer.export.export import export_model
from refformer.export.verify import verify
from refformer.refimpl import Config, RefformerError, init_params, save
from refformer.refimpl.training import tokenizer as tok
from refformer.runtime.cli import main
from tests.helpers import save_random_model

BASE = dict(vocab_size=40, d_model=16, n_heads=4, d_ff=24, n_encoder_layers=1, n_decoder_layers=1, max_positions=16,
            dropout=0.0)

# option(s) -> what the one-line error must name, with the positional scheme "rotary" taken out of the exported ones
UNSUPPORTED = [
    (dict(positional="rotary"), 'positional="rotary"'),
    (dict(positional="rotary", family="decoder-only", n_kv_heads=2), 'positional="rotary"'),
    (dict(positional="relative", relative_max_distance=10**18), "relative_max_distance=1000000000000000000"),
]


@pytest.fixture(autouse=True)
def rotary_unsupported(monkeypatch):
    """Every test here runs as if the graphs did not compute rotary positions (the guard's machinery needs an option
    the graphs do not compute, and since issue 14 they compute every option)."""
    monkeypatch.setattr(contract, "EXPORTED_POSITIONALS", tuple(p for p in contract.EXPORTED_POSITIONALS
                                                                if p != "rotary"))


def make(path, seed=0, **overrides):
    """A tiny model folder of BASE with overrides, every parameter redrawn (tests.helpers.save_random_model)."""
    return save_random_model(path, BASE, seed, **overrides)


@pytest.mark.parametrize("options, named", UNSUPPORTED, ids=[named for _, named in UNSUPPORTED])
def test_export_refuses_each_option_its_graphs_do_not_compute(tmp_path, options, named):
    make(tmp_path / "m", **options)
    with pytest.raises(RefformerError) as error:
        export_model(tmp_path / "m", tmp_path / "out")
    message = str(error.value)
    assert message.startswith(f"export does not support yet: {named} (") and "\n" not in message
    assert message.endswith("the reference (model_forward, golden) does")
    assert not (tmp_path / "out").exists() and not (tmp_path / "m" / "onnx").exists()  # nothing begun
    assert [entry.name for entry in tmp_path.iterdir()] == ["m"]  # no temporary folder either


def test_every_option_is_named_in_one_line(tmp_path):
    make(tmp_path / "m", family="decoder-only", positional="rotary", n_kv_heads=2, ffn_gated=True, ffn_bias=False,
         attention_qkv_bias=False, head_scale=0.5, pad_id=None, eos_id=None)
    result = CliRunner().invoke(main, ["export", "--model", str(tmp_path / "m")])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith('error: export does not support yet: positional="rotary" (')  # the rest (n_kv_heads,
    # ffn_gated, head_scale and, for export, null ids) exports since issue 14


def test_verify_names_the_options_rather_than_asking_for_an_export(tmp_path):
    make(tmp_path / "m", family="decoder-only", positional="rotary", pad_id=None)
    with pytest.raises(RefformerError, match='^export does not support yet: positional="rotary" \\('):
        verify(tmp_path / "m", providers=["CPUExecutionProvider"])


def test_verify_command_names_the_options_rather_than_asking_for_an_export(tmp_path):
    make(tmp_path / "m", family="decoder-only", positional="rotary", bos_id=None)
    result = CliRunner().invoke(main, ["verify", "--model", str(tmp_path / "m")])
    assert result.exit_code == 1  # as verify() and export: a null bos_id verifies (only generate needs it)
    assert result.stderr.startswith('error: export does not support yet: positional="rotary" (')
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_generate_on_demand_refuses_in_one_line(tmp_path):
    tokenizer, trainer = tok.new_tokenizer(270)
    tokenizer.train_from_iterator(["the weather is fine", "errors should never pass silently"] * 3, trainer)
    tok.save_tokenizer(tokenizer, tmp_path / "tokenizer.json")
    cfg = Config(**{**BASE, "vocab_size": tokenizer.get_vocab_size(), "family": "decoder-only",
                    "positional": "rotary", "n_kv_heads": 2, "eos_id": None})
    save(tmp_path / "m", cfg, init_params(cfg, np.random.default_rng(0)), tokenizer=tmp_path / "tokenizer.json")
    result = CliRunner().invoke(main, ["generate", "--model", str(tmp_path / "m"), "--provider", "cpu",
                                       "the weather"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.stderr.strip().splitlines() == errors and "Traceback" not in result.output, result.output
    assert errors[0].startswith('error: export does not support yet: positional="rotary", eos_id=null (')
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert not (tmp_path / "m" / "onnx").exists() or not any((tmp_path / "m" / "onnx").iterdir())


def test_options_the_graphs_compute_still_export_and_verify(tmp_path):
    """Biases off (linear adds a bias only where the tree has one; the fused graphs fold none) and explicit
    values equal to the defaults build the same function: measured against refimpl, every variant."""
    options = dict(family="decoder-only", d_model=32, n_kv_heads=4, head_dim=8, attention_scale=1 / math.sqrt(8),
                   attention_qkv_bias=False, attention_out_bias=False, ffn_bias=False, activation="gelu",
                   position_offset=0, head_scale=1.0)
    cfg = make(tmp_path / "m", **options)
    assert unsupported_features(cfg) == []
    manifest = export_model(tmp_path / "m", static_length=8, fused_attention=True)
    assert manifest["error"]["max"] <= 1e-5
    assert set(manifest["graphs"]) == {"decoder", "decoder_fused", "decoder_static", "decoder_static_mha",
                                       "decoder_static_fused"}
    cfg = make(tmp_path / "e", attention_out_bias=False, ffn_bias=False, norm_first=True)
    assert export_model(tmp_path / "e")["error"]["max"] <= 1e-5


def test_today_s_models_have_nothing_unsupported():
    for options in (dict(), dict(family="decoder-only", positional="learned", norm="rmsnorm", activation="silu"),
                    dict(tie_embeddings=False, share_embeddings=False, lm_head_bias=True, embed_scale=False)):
        assert unsupported_features(Config(**{**BASE, **options})) == []


def test_generate_still_refuses_null_special_ids_that_export_takes(tmp_path):
    """The runtime's prompts, padding and stop test read pad, bos and eos: Generator (contract.check_exportable with
    ids=True) names a null one; export and verify (ids=False) take the model."""
    tokenizer, trainer = tok.new_tokenizer(270)
    tokenizer.train_from_iterator(["the weather is fine", "errors should never pass silently"] * 3, trainer)
    tok.save_tokenizer(tokenizer, tmp_path / "tokenizer.json")
    cfg = Config(**{**BASE, "vocab_size": tokenizer.get_vocab_size(), "family": "decoder-only", "pad_id": None})
    save(tmp_path / "m", cfg, init_params(cfg, np.random.default_rng(0)), tokenizer=tmp_path / "tokenizer.json")
    assert unsupported_features(cfg) == ["pad_id=null"] and unsupported_features(cfg, ids=False) == []
    result = CliRunner().invoke(main, ["generate", "--model", str(tmp_path / "m"), "--provider", "cpu", "the"])
    assert result.exit_code == 1 and result.stderr.startswith("error: export does not support yet: pad_id=null (")
    assert export_model(tmp_path / "m")["error"]["max"] <= 1e-5
