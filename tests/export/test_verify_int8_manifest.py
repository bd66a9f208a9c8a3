"""verify checks that an export set's graphs are quantized as its manifest says (export/verify.py
check_quantization): an fp32 set relabelled "int8" (whose graphs are within the int8 bound, so the numbers alone pass
it) and an int8 set relabelled fp32 or fp16 are each refused in one line, and so is a "quantization" entry that does
not match the graphs (method, the graphs listed, the ops it records)."""

import json
import shutil

import pytest
from click.testing import CliRunner

from refformer.export.contract import CPU_PROVIDER, ERROR_BOUNDS
from refformer.export.export import export_model
from refformer.export.folder import read_manifest
from refformer.export.quantize import QUANTIZED_OPS, graph_op_types, signature_ops
from refformer.export.verify import check_quantization, verify
from refformer.refimpl import RefformerError
from refformer.runtime.cli import main

from .test_int8_export import make_model


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A model folder with its fp32 and int8 export sets: {"model": folder, "fp32": set, "int8": set}."""
    model = tmp_path_factory.mktemp("int8-manifest") / "m"
    make_model(model)
    export_model(model)
    export_model(model, dtype="int8")
    return {"model": model, "fp32": model / "onnx" / "fp32", "int8": model / "onnx" / "int8"}


def relabelled(sets, tmp_path, source, edit):
    """A copy of the export set source ("fp32" or "int8") in a model folder of its own, its manifest.json changed
    by edit(manifest) (the graphs, and their sha256 in the manifest, untouched) -> (model folder, set folder)."""
    model = tmp_path / "m"
    shutil.copytree(sets["model"], model, ignore=shutil.ignore_patterns("onnx"))
    folder = model / "onnx" / "set"
    shutil.copytree(sets[source], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return model, folder


def one_line_refusal(model, folder):
    result = CliRunner().invoke(main, ["verify", "--model", str(model), "--onnx-dir", str(folder), "--provider",
                                       "cpu"])
    lines = result.stderr.splitlines()
    assert result.exit_code == 1 and not isinstance(result.exception, TypeError), (repr(result.exception),
                                                                                  result.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


def test_true_sets_pass(sets):
    for name in ("fp32", "int8"):
        check_quantization(sets[name], read_manifest(sets[name]))
    assert not graph_op_types(sets["fp32"] / "decoder.onnx") & QUANTIZED_OPS
    assert any(ops <= graph_op_types(sets["int8"] / "decoder.onnx") for ops in signature_ops("int8"))


def test_an_fp32_set_relabelled_int8_passes_the_bound_but_is_refused(sets, tmp_path):
    """With the int8 manifest's own "quantization" entry copied in, only the graphs' ops can tell."""
    entry = read_manifest(sets["int8"])["quantization"]
    model, folder = relabelled(sets, tmp_path, "fp32", lambda m: m.update(dtype="int8", quantization=entry))
    # what verify ran before it checked the manifest: the fp32 graphs are far within the int8 bound
    fp32_rows, _ = verify(sets["model"], sets["fp32"], providers=[CPU_PROVIDER])
    assert max(row["error"] for row in fp32_rows) < ERROR_BOUNDS["int8"]
    line = one_line_refusal(model, folder)
    assert f"{folder / 'decoder.onnx'} holds no int8 ops (DynamicQuantizeLinear + MatMulInteger or " \
           f"DynamicQuantizeMatMul) but {folder}/manifest.json says it is quantized (int8): these are not int8 " \
           "graphs; export the set again (`refformer export --dtype int8`)" in line, line
    with pytest.raises(RefformerError, match="holds no int8 ops"):
        verify(model, folder, providers=[CPU_PROVIDER])


def test_an_fp32_set_relabelled_int8_without_an_entry_is_refused(sets, tmp_path):
    model, folder = relabelled(sets, tmp_path, "fp32", lambda m: m.update(dtype="int8"))
    assert (f"{folder}/manifest.json says dtype int8 but has no \"quantization\" entry naming its quantized graphs"
            in one_line_refusal(model, folder))


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_an_int8_set_relabelled_float_is_refused(sets, tmp_path, dtype):
    model, folder = relabelled(sets, tmp_path, "int8", lambda m: (m.update(dtype=dtype), m.pop("quantization")))
    line = one_line_refusal(model, folder)
    assert (f"{folder / 'decoder.onnx'} holds quantized ops (DynamicQuantizeLinear, MatMulInteger) but "
            f"{folder}/manifest.json says dtype {dtype}: export the set again (`refformer export --dtype {dtype}`)"
            in line), line


def test_a_float_manifest_with_a_quantization_entry_is_refused(sets, tmp_path):
    model, folder = relabelled(sets, tmp_path, "int8", lambda m: m.update(dtype="fp32"))
    assert f"{folder}/manifest.json says dtype fp32 but has a \"quantization\" entry" in one_line_refusal(model,
                                                                                                          folder)


@pytest.mark.parametrize("change, message", [
    (dict(method="int4-blocks32"), "says dtype int8 but its quantization method is 'int4-blocks32'"),
    (dict(method=None), "says dtype int8 but its quantization method is None"),
    (dict(graphs=["decoder", "encoder"]), "encoder.onnx holds no int8 ops"),
    (dict(graphs=["decoder", "decoder_static"]), "lists decoder_static as quantized, a graph the set does not hold"),
    (dict(graphs=[]), "has no \"quantization\" entry naming its quantized graphs"),
    (dict(graphs="decoder"), "has no \"quantization\" entry naming its quantized graphs"),
    (dict(ops_added=["MatMulNBits"]), "hold none of MatMulNBits, which manifest.json records as added by the int8 "
                                      "method"),
])
def test_a_quantization_entry_that_does_not_match_the_graphs_is_refused(sets, tmp_path, change, message):
    model, folder = relabelled(sets, tmp_path, "int8", lambda m: m["quantization"].update(change))
    assert message in one_line_refusal(model, folder)


def test_an_int8_graph_the_manifest_does_not_list_is_refused(sets, tmp_path):
    """The decoder quantized, but the entry names only the encoder (quantized graphs that hold the method's ops
    named first, if it held them: the unlisted decoder)."""
    def only_the_encoder(manifest):
        manifest["graphs"] = {"decoder": manifest["graphs"]["decoder"], "encoder": manifest["graphs"]["encoder"]}
        manifest["quantization"]["graphs"] = ["encoder"]

    model, folder = relabelled(sets, tmp_path, "int8", only_the_encoder)
    assert (f"{folder / 'decoder.onnx'} holds quantized ops (DynamicQuantizeLinear, MatMulInteger) but "
            f"{folder}/manifest.json says decoder is not quantized" in one_line_refusal(model, folder))
