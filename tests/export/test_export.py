"""Whole-model export: both families, post-LN and pre-LN, fp32 and fp16, verified against refimpl;
external data, atomic replacement, and the errors a user can hit."""

import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from refformer.export.export import export_model
from refformer.export.folder import check_external_data, read_manifest
from refformer.export.verify import verify
from refformer.refimpl import Config, RefformerError, init_params, save
from refformer.runtime.cli import main

VARIANTS = [
    dict(family="encoder-decoder", norm_first=False),
    dict(family="encoder-decoder", norm_first=True, activation="gelu", tie_embeddings=False, share_embeddings=False,
         lm_head_bias=True),
    dict(family="decoder-only", norm_first=False, positional="learned"),
    dict(family="decoder-only", norm_first=True, norm="rmsnorm", activation="silu", final_norm=False),
]


def make_model(path, seed=0, **overrides):
    fields = dict(vocab_size=40, d_model=16, n_heads=4, d_ff=24, n_encoder_layers=2, n_decoder_layers=2,
                  max_positions=32, dropout=0.0)
    fields.update(overrides)
    cfg = Config(**fields)
    save(path, cfg, init_params(cfg, np.random.default_rng(seed)))
    return cfg


def worst(rows):
    return sorted(rows, key=lambda row: -row["error"])[:3]


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={v[k]}" for k in list(v)[:2]))
def test_export_then_verify(tmp_path, variant, dtype):
    make_model(tmp_path / "m", **variant)
    manifest = export_model(tmp_path / "m", dtype=dtype)
    bound = {"fp32": 1e-5, "fp16": 1e-2}[dtype]
    assert manifest["error"]["max"] <= bound
    rows, got_dtype = verify(tmp_path / "m", providers=["CPUExecutionProvider"])
    assert got_dtype == dtype
    assert all(row["ok"] for row in rows), worst(rows)
    assert {row["check"] for row in rows} == {"random", "incremental"}
    names = {g["file"] for g in manifest["graphs"].values()}
    assert names == ({"encoder.onnx", "decoder.onnx"} if variant["family"] == "encoder-decoder" else {"decoder.onnx"})
    decoder = manifest["graphs"]["decoder"]
    assert [o["name"] for o in decoder["outputs"]][:2] == ["logits", "present_key_self_0"]
    assert decoder["outputs"][0]["dtype"] == "float32"


def test_opset_18_and_newer_also_verify(tmp_path):
    make_model(tmp_path / "m", family="decoder-only", norm="rmsnorm")
    export_model(tmp_path / "m", opset=20)
    rows, _ = verify(tmp_path / "m", providers=["CPUExecutionProvider"])
    assert all(row["ok"] for row in rows), worst(rows)


def test_external_data_path(tmp_path):
    make_model(tmp_path / "m")
    export_model(tmp_path / "m", external_data=True)
    files = sorted(os.listdir(tmp_path / "m" / "onnx" / "fp32"))
    assert "decoder.onnx.data" in files and "encoder.onnx.data" in files
    folder = tmp_path / "m" / "onnx" / "fp32"
    for name in ("decoder.onnx", "encoder.onnx"):  # the weights as readable as their graph (onnx wrote them 0600)
        assert (folder / (name + ".data")).stat().st_mode & 0o777 == (folder / name).stat().st_mode & 0o777
    onnx.checker.check_model(str(tmp_path / "m" / "onnx" / "fp32" / "decoder.onnx"), full_check=True)
    rows, _ = verify(tmp_path / "m", providers=["CPUExecutionProvider"])
    assert all(row["ok"] for row in rows), worst(rows)


def test_external_data_outside_the_folder_is_refused(tmp_path):
    make_model(tmp_path / "m")
    export_model(tmp_path / "m", external_data=True)
    path = tmp_path / "m" / "onnx" / "fp32" / "decoder.onnx"
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../../../etc/passwd"
    onnx.save_model(model, str(path))
    with pytest.raises(RefformerError, match="outside the model folder"):
        check_external_data(path)


def test_a_failed_export_keeps_the_good_one(tmp_path, monkeypatch):
    make_model(tmp_path / "m")
    export_model(tmp_path / "m")
    before = (tmp_path / "m" / "onnx" / "fp32" / "manifest.json").read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("refformer.export.export.save_graph", broken)
    with pytest.raises(RuntimeError):
        export_model(tmp_path / "m")
    assert (tmp_path / "m" / "onnx" / "fp32" / "manifest.json").read_text() == before
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors", "onnx"]
    assert sorted(p.name for p in (tmp_path / "m" / "onnx").iterdir()) == ["fp32"]


def test_stale_export_is_detected(tmp_path):
    make_model(tmp_path / "m")
    export_model(tmp_path / "m")
    make_model(tmp_path / "m", seed=1)  # new weights, old export
    with pytest.raises(RefformerError, match="different config or weights"):
        verify(tmp_path / "m")


def test_manifest_records_hashes_versions_and_error(tmp_path):
    make_model(tmp_path / "m")
    export_model(tmp_path / "m", dtype="fp16")
    manifest = read_manifest(tmp_path / "m" / "onnx" / "fp16")
    assert len(manifest["weights_sha256"]) == 64 and len(manifest["config_sha256"]) == 64
    assert manifest["dtype"] == "fp16" and manifest["variant"] == "reference" and manifest["opset"] == 17
    assert set(manifest["versions"]) >= {"onnx", "onnxruntime", "refformer", "numpy"}
    assert 0 < manifest["error"]["max"] <= 1e-2


def test_cli_export_and_verify(tmp_path):
    make_model(tmp_path / "m")
    runner = CliRunner()
    result = runner.invoke(main, ["export", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["verify", "--model", str(tmp_path / "m"), "--onnx-dir", str(tmp_path / "out"),
                                  "--provider", "cpu"])
    assert result.exit_code == 0, result.output
    assert "logits (prompt + steps)" in result.output and "within the fp32 bound" in result.output


@pytest.mark.parametrize("args, message", [
    (["export", "--model", "{tmp}/missing"], "does not exist"),
    (["export", "--model", "{tmp}/m", "--opset", "13"], "--opset must be between 17"),
    (["verify", "--model", "{tmp}/m"], "run `refformer export` first"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    make_model(tmp_path / "m")
    result = CliRunner().invoke(main, [a.format(tmp=tmp_path) for a in args])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_corrupt_graph_is_a_clear_error(tmp_path):
    make_model(tmp_path / "m")
    export_model(tmp_path / "m")
    (tmp_path / "m" / "onnx" / "fp32" / "decoder.onnx").write_bytes(b"not a graph")
    result = CliRunner().invoke(main, ["verify", "--model", str(tmp_path / "m"), "--provider", "cpu"])
    assert result.exit_code == 1 and "run `refformer export` again" in result.output


def test_unwritable_output_folder(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/refformer-cannot-write-here/onnx"  # root ignores permission bits
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        target = str(tmp_path / "ro" / "onnx")
    make_model(tmp_path / "m")
    result = CliRunner().invoke(main, ["export", "--model", str(tmp_path / "m"), "--out", target])
    assert result.exit_code == 1 and ("cannot write" in result.output or "does not exist" in result.output)


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_torch_converted_model_exports_and_verifies(tmp_path, dtype):
    """PyTorch's translation-tutorial model: torch.save(state_dict) -> convert-torch -> export -> verify."""
    torch = pytest.importorskip("torch")
    from tests.helpers import randomize_torch, write_word_level_tokenizer
    from tests.refimpl.test_torch_convert import Seq2SeqTransformer

    V = 12
    model = randomize_torch(Seq2SeqTransformer(V, 8, 2, 16, 2, 2, norm_first=(dtype == "fp16"), maxlen=32),
                            np.random.default_rng(4))
    torch.save(model.state_dict(), tmp_path / "model.pt")
    tokenizer = write_word_level_tokenizer(tmp_path / "tokenizer.json", V)
    result = CliRunner().invoke(main, ["convert-torch", str(tmp_path / "model.pt"), "--tokenizer", str(tokenizer),
                                       "--out", str(tmp_path / "m"), "--n-heads", "2", "--embed-scale"]
                                + (["--norm-first"] if dtype == "fp16" else []))
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["export", "--model", str(tmp_path / "m"), "--dtype", dtype])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["verify", "--model", str(tmp_path / "m"), "--provider", "cpu"])
    assert result.exit_code == 0, result.output  # no options: the only export set there is
    assert f"/onnx/{dtype} on CPUExecutionProvider" in result.output
    assert "real " in result.output  # the tokenizer came along: real-text rows too
