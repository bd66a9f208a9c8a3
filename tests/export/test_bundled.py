"""The bundled German->English model: it loads, exports (into a temporary folder: the installed package
folder may be read-only) and passes refformer verify, and it translates."""

import json

from click.testing import CliRunner

from refformer.refimpl.io import load
from refformer.runtime.cli import main
from refformer.runtime.generator import default_model_dir


def test_bundled_model_is_small_and_complete():
    model_dir = default_model_dir()
    cfg, params = load(model_dir)
    assert cfg.family == "encoder-decoder"
    assert (model_dir / "model.safetensors").stat().st_size <= 12_000_000
    assert {p.name for p in model_dir.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}


def test_bundled_model_exports_and_verifies(tmp_path):
    runner = CliRunner()
    for dtype in ("fp32", "fp16"):
        out = tmp_path / dtype
        result = runner.invoke(main, ["export", "--out", str(out), "--dtype", dtype])
        assert result.exit_code == 0, result.output
        result = runner.invoke(main, ["verify", "--onnx-dir", str(out), "--provider", "cpu"])
        assert result.exit_code == 0, result.output
        assert "real " in result.output and "incremental" in result.output
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["error"]["max"] <= {"fp32": 1e-5, "fp16": 1e-2}[dtype]


def test_bundled_model_translates(tmp_path, monkeypatch):
    """...and its export goes to the per-user cache, never into the package folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    before = sorted(p.name for p in default_model_dir().iterdir())
    result = CliRunner().invoke(main, ["generate", "--provider", "cpu", "Wo ist der Bahnhof?"])
    assert result.exit_code == 0, result.output
    assert "station" in result.stdout.lower()
    assert [p.name for p in (tmp_path / "refformer").glob("*/fp32")] == ["fp32"]
    assert sorted(p.name for p in default_model_dir().iterdir()) == before
