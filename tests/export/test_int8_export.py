"""Issue 15: `refformer export --dtype int8` writes the int8 export set (the fp32 graphs, quantized by
export/quantize.py) beside the fp32 one, named in its manifest; `refformer verify` checks it against refimpl with its
own bound (contract.ERROR_BOUNDS["int8"]) on the CPU, and fails a graph that computes another model."""

import json
import shutil

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from refformer.export import contract
from refformer.export.contract import CPU_PROVIDER, CUDA_PROVIDER, ERROR_BOUNDS
from refformer.export.export import export_model
from refformer.export.folder import read_manifest
from refformer.export.verify import providers_for, verify
from refformer.refimpl import Config, RefformerError, init_params, save
from refformer.refimpl.io import sha256
from refformer.runtime.cli import main

CPU = [CPU_PROVIDER]


def make_model(path, seed=0, **overrides):
    fields = dict(vocab_size=40, d_model=16, n_heads=4, d_ff=24, n_encoder_layers=2, n_decoder_layers=2,
                  max_positions=32, dropout=0.0)
    cfg = Config(**{**fields, **overrides})
    save(path, cfg, init_params(cfg, np.random.default_rng(seed)))
    return cfg


def worst(rows):
    return max(rows, key=lambda row: row["error"])


@pytest.mark.parametrize("family", ["encoder-decoder", "decoder-only"])
def test_int8_export_is_a_set_of_its_own_and_verifies(tmp_path, family):
    make_model(tmp_path / "m", family=family)
    export_model(tmp_path / "m")
    fp32_before = {path.name: sha256(path) for path in (tmp_path / "m" / "onnx" / "fp32").iterdir()}
    manifest = export_model(tmp_path / "m", dtype="int8")
    assert sorted(p.name for p in (tmp_path / "m" / "onnx").iterdir()) == ["fp32", "int8"]
    assert {path.name: sha256(path) for path in (tmp_path / "m" / "onnx" / "fp32").iterdir()} == fp32_before
    assert manifest == read_manifest(tmp_path / "m" / "onnx" / "int8")
    assert manifest["dtype"] == "int8" and manifest["variant"] == "reference"
    quantization = manifest["quantization"]
    assert quantization["method"] == "int8" and quantization["from"] == "fp32" and quantization["ops_added"]
    assert quantization["graphs"] == ["decoder"]  # the encoder stays fp32
    assert manifest["error"]["bound"] == ERROR_BOUNDS["int8"] and manifest["error"]["max"] <= ERROR_BOUNDS["int8"]
    expected = {"encoder.onnx", "decoder.onnx"} if family == "encoder-decoder" else {"decoder.onnx"}
    assert set(manifest["files"]) == expected and not (tmp_path / "m" / "onnx" / "int8" / ".source").exists()
    decoder = onnx.load(str(tmp_path / "m" / "onnx" / "int8" / "decoder.onnx"))
    eight_bits = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)  # (MatMulNBits packs its int8 weights as uint8)
    assert any(t.data_type in eight_bits for t in decoder.graph.initializer)  # the weights are 8-bit
    if family == "encoder-decoder":
        encoder = onnx.load(str(tmp_path / "m" / "onnx" / "int8" / "encoder.onnx"))
        assert sha256(tmp_path / "m" / "onnx" / "int8" / "encoder.onnx") == fp32_before["encoder.onnx"]
        assert not any(t.data_type in eight_bits for t in encoder.graph.initializer)
    assert set(quantization["ops_added"]) <= {node.op_type for node in decoder.graph.node}
    # the same inputs and outputs as the fp32 graphs: float32 caches and logits, int64 ids
    fp32 = read_manifest(tmp_path / "m" / "onnx" / "fp32")
    assert manifest["graphs"] == fp32["graphs"]
    rows, dtype = verify(tmp_path / "m", tmp_path / "m" / "onnx" / "int8", providers=CPU)
    assert dtype == "int8" and all(row["ok"] and row["bound"] == ERROR_BOUNDS["int8"] for row in rows), worst(rows)
    assert 1e-4 < worst(rows)["error"]  # quantized: not the fp32 graphs (whose error is below 1e-5)
    assert {row["check"] for row in rows} == {"random", "incremental"}


def test_int8_static_variant_verifies(tmp_path):
    make_model(tmp_path / "m")
    manifest = export_model(tmp_path / "m", dtype="int8", static_length=12)
    assert (tmp_path / "m" / "onnx" / "int8-static12" / "decoder_static.onnx").is_file()
    assert manifest["graphs"]["decoder_static"]["max_length"] == 12
    rows, _ = verify(tmp_path / "m", tmp_path / "m" / "onnx" / "int8-static12", providers=CPU)
    assert {row["check"] for row in rows} == {"random", "incremental", "static"}
    assert all(row["ok"] for row in rows), worst(rows)


def test_cli_export_and_verify_int8(tmp_path):
    make_model(tmp_path / "m")
    runner = CliRunner()
    result = runner.invoke(main, ["export", "--model", str(tmp_path / "m"), "--dtype", "int8"])
    assert result.exit_code == 0, result.output
    assert f"wrote {tmp_path / 'm' / 'onnx' / 'int8'} (encoder-decoder, int8, opset 17)" in result.output
    result = runner.invoke(main, ["verify", "--model", str(tmp_path / "m"), "--dtype", "int8", "--provider", "cpu"])
    assert result.exit_code == 0, result.output
    assert "logits (prompt + steps)" in result.output and "within the int8 bound 1e-01" in result.output
    # with no fp32 set, the only set there is
    result = runner.invoke(main, ["verify", "--model", str(tmp_path / "m"), "--provider", "cpu"])
    assert result.exit_code == 0 and "within the int8 bound" in result.output, result.output


def test_verify_fails_int8_graphs_of_another_model(tmp_path):
    """A graph that does not compute this model (another model's int8 decoder of the same shape, its sha256 written
    into the manifest so that only the numbers can tell) fails the int8 bound; a changed file is refused outright."""
    make_model(tmp_path / "m", seed=0)
    make_model(tmp_path / "other", seed=1)
    export_model(tmp_path / "m", dtype="int8")
    export_model(tmp_path / "other", dtype="int8")
    folder = tmp_path / "m" / "onnx" / "int8"
    shutil.copy(tmp_path / "other" / "onnx" / "int8" / "decoder.onnx", folder / "decoder.onnx")
    result = CliRunner().invoke(main, ["verify", "--model", str(tmp_path / "m"), "--dtype", "int8", "--provider",
                                       "cpu"])
    assert result.exit_code == 1 and "not the file its manifest.json records" in result.output, result.output
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["decoder.onnx"] = sha256(folder / "decoder.onnx")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    rows, _ = verify(tmp_path / "m", folder, providers=CPU)
    assert worst(rows)["error"] > 5 * ERROR_BOUNDS["int8"] and not all(row["ok"] for row in rows)
    result = CliRunner().invoke(main, ["verify", "--model", str(tmp_path / "m"), "--dtype", "int8", "--provider",
                                       "cpu"])
    assert result.exit_code == 1 and "exceed the int8 bound" in result.output, result.output


def test_int8_beyond_its_bound_is_not_written(tmp_path, monkeypatch):
    make_model(tmp_path / "m")
    monkeypatch.setitem(ERROR_BOUNDS, "int8", 1e-6)
    with pytest.raises(RefformerError, match=r"beyond the int8 bound 1e-06; nothing was written: use --dtype "
                                             r"fp32"):
        export_model(tmp_path / "m", dtype="int8")
    assert not (tmp_path / "m" / "onnx" / "int8").exists()
    assert [p.name for p in (tmp_path / "m" / "onnx").iterdir()] == []


def test_every_decoder_variant_has_an_int8_twin(tmp_path):
    """--static-length and --fused-attention with --dtype int8: static, fused, static_mha and static_fused decoders,
    each quantized and checked by verify against decoder.onnx and refimpl within the int8 bound."""
    make_model(tmp_path / "m", d_model=32, n_heads=4)  # head size 8: static_fused too
    manifest = export_model(tmp_path / "m", dtype="int8", static_length=12, fused_attention=True)
    names = ["decoder", "decoder_static", "decoder_fused", "decoder_static_mha", "decoder_static_fused"]
    assert manifest["quantization"]["graphs"] == names
    rows, _ = verify(tmp_path / "m", tmp_path / "m" / "onnx" / "int8-static12-fused", providers=CPU)
    assert {row["check"] for row in rows} == {"random", "incremental", "static", "fused", "static_mha",
                                              "static_fused"}
    assert all(row["ok"] for row in rows), worst(rows)


def test_int8_sets_run_on_the_cpu_only():
    assert providers_for("int8", [CPU_PROVIDER, CUDA_PROVIDER]) == [CPU_PROVIDER]
    assert providers_for("fp32", [CPU_PROVIDER, CUDA_PROVIDER]) == [CPU_PROVIDER, CUDA_PROVIDER]
    with pytest.raises(RefformerError, match="int8 export sets run on CPUExecutionProvider only .* --provider cpu"):
        providers_for("int8", [CUDA_PROVIDER])
    assert contract.graph_dtype("int8") == "fp32" and contract.graph_dtype("fp16") == "fp16"


def test_int8_with_external_data(tmp_path):
    make_model(tmp_path / "m")
    manifest = export_model(tmp_path / "m", dtype="int8", external_data=True)
    assert sorted(manifest["files"]) == ["decoder.onnx", "decoder.onnx.data", "encoder.onnx", "encoder.onnx.data"]
    rows, _ = verify(tmp_path / "m", providers=CPU)
    assert all(row["ok"] for row in rows), worst(rows)


def test_a_model_too_far_from_its_int8_graphs_is_refused(tmp_path):
    """Every weight with +0.3 noise (save_random_model) and a gated SiLU feed-forward: the int8 graphs differ from
    refimpl by 0.15 (measured), beyond the bound; export says to use fp32 and writes nothing."""
    from tests.export.test_features import BASE
    from tests.helpers import save_random_model

    save_random_model(tmp_path / "m", BASE, 0, ffn_gated=True, activation="silu", ffn_bias=False)
    with pytest.raises(RefformerError, match=r"beyond the int8 bound 1e-01; nothing was written: use --dtype "
                                             r"fp32"):
        export_model(tmp_path / "m", dtype="int8", static_length=8)
    assert not (tmp_path / "m" / "onnx" / "int8-static8").exists()
