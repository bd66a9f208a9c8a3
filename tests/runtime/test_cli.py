"""The `refformer` group itself, and `refformer golden`."""

import numpy as np
import pytest
from click.testing import CliRunner

from refformer.refimpl import Config, flatten, init_params, load, model_forward, save
from refformer.refimpl.convert.golden import golden_inputs
from refformer.refimpl.errors import RefformerError
from refformer.runtime.cli import main


def test_version_and_help():
    import refformer

    runner = CliRunner()
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and result.output == f"refformer, version {refformer.__version__}\n"
    assert refformer.__version__ != "unknown"
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("generate", "export", "verify", "golden", "convert-torch", "data", "tokenizer", "train", "eval"):
        assert command in result.output


def test_golden_holds_inputs_activations_logits_and_every_gradient(tmp_path):
    cfg = Config(vocab_size=20, d_model=8, n_heads=2, d_ff=16, dropout=0.1)
    save(tmp_path / "m", cfg, init_params(cfg, np.random.default_rng(0)))
    result = CliRunner().invoke(main, ["golden", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "g.npz"),
                                       "--seed", "3"])
    assert result.exit_code == 0, result.output
    data = np.load(tmp_path / "g.npz")
    cfg, params = load(tmp_path / "m", dtype=np.float64)
    inputs = golden_inputs(cfg, 3)
    np.testing.assert_array_equal(data["inputs.src_ids"], inputs["src_ids"])
    logits, _ = model_forward(cfg, params, inputs["src_ids"], inputs["tgt_ids"])
    np.testing.assert_array_equal(data["logits"], logits)  # float64, eval mode: exactly the reference
    assert {f"grads.{name}" for name in flatten(params)} == {k for k in data.files if k.startswith("grads.")}
    assert "activations.decoder.layers.1.cross_attn.sublayer.attention.probs" in data.files
    assert all(data[k].dtype == np.float64 for k in data.files if k.startswith(("activations.", "grads.")))


def test_golden_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(main, ["golden", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "g.npz")])
    assert result.exit_code == 1 and "does not exist" in result.output
    cfg = Config(vocab_size=20, d_model=8, n_heads=2, d_ff=16)
    save(tmp_path / "m", cfg, init_params(cfg, np.random.default_rng(0)))
    result = CliRunner().invoke(main, ["golden", "--model", str(tmp_path / "m"), "--out",
                                       str(tmp_path / "no" / "g.npz")])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_golden_checks_the_output_folder_before_any_work(tmp_path, monkeypatch):
    import refformer.refimpl.convert.golden as golden_module

    monkeypatch.setattr(golden_module, "load", lambda *a, **k: pytest.fail("the model was loaded before the check"))
    with pytest.raises(RefformerError, match="output folder .* does not exist"):
        golden_module.write_golden(tmp_path / "m", tmp_path / "no" / "g.npz")
