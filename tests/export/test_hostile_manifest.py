"""Hand-edited manifest.json files against `refformer verify`, as a hostile user writes them: JSON of the wrong type
where the code reads a value (a list or an object as "dtype" or as a graph's "file": a TypeError traceback before),
and a set whose manifest lies about its float type (fp32 graphs labelled fp16 and the converse: only ONNX Runtime's
"Unexpected input data type" named them before). Each is one `error:` line and exit 1 (export/folder.py
read_manifest, export/verify.py check_quantization with quantize.graph_types)."""

import json
import shutil

import pytest
from click.testing import CliRunner

from refformer.export.export import export_model
from refformer.export.folder import file_sha256, read_manifest
from refformer.export.quantize import graph_types
from refformer.refimpl import RefformerError
from refformer.runtime.cli import main

from .test_int8_export import make_model
from .test_verify_int8_manifest import one_line_refusal, relabelled


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """A model folder with its fp32, fp16 and int8 export sets: {"model": folder, dtype: set folder}."""
    model = tmp_path_factory.mktemp("hostile-manifest") / "m"
    make_model(model)
    for dtype in ("fp32", "fp16", "int8"):
        export_model(model, dtype=dtype)
    export_model(model, dtype="int8", static_length=8)
    return {"model": model, **{dtype: model / "onnx" / dtype for dtype in ("fp32", "fp16", "int8")},
            "int8-static": model / "onnx" / "int8-static8"}


def edited(sets, tmp_path, source, edit, swap=None):
    """test_verify_int8_manifest.relabelled's copy of the export set source, edit(manifest) applied, and then the graph
    file swap replaced by the fp32 set's copy with its sha256 recorded -> (model folder, set folder)."""
    model, folder = relabelled(sets, tmp_path, source, edit)
    if swap:
        shutil.copy(sets["fp32"] / swap, folder / swap)
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["files"][swap] = file_sha256(folder / swap)
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return model, folder


def set_graph_file(value):
    return lambda manifest: manifest["graphs"]["decoder"].update(file=value)


@pytest.mark.parametrize("edit, expected", [
    (lambda manifest: manifest.update(dtype=["int8"]), "manifest.json: dtype ['int8'] is not one of fp32, fp16, "
                                                       "int8: run `refformer export` again"),
    (lambda manifest: manifest.update(dtype={"int8": 1}), "manifest.json: dtype {'int8': 1} is not one of"),
    (set_graph_file(["decoder.onnx"]), "manifest.json does not list the export's files as refformer writes them"),
    (set_graph_file({"decoder.onnx": 1}), "manifest.json does not list the export's files as refformer writes them"),
], ids=["dtype-list", "dtype-object", "file-list", "file-object"])
def test_json_of_the_wrong_type_is_one_line_not_a_traceback(sets, tmp_path, edit, expected):
    model, folder = edited(sets, tmp_path, "int8", edit)
    assert expected in one_line_refusal(model, folder)
    with pytest.raises(RefformerError, match="manifest.json"):
        read_manifest(folder)


@pytest.mark.parametrize("source, label, held, said", [
    ("fp32", "fp16", "float32", "float16"),
    ("fp16", "fp32", "float16", "float32"),
])
def test_a_float_type_the_manifest_lies_about_is_named(sets, tmp_path, source, label, held, said):
    model, folder = edited(sets, tmp_path, source, lambda manifest: manifest.update(dtype=label))
    assert one_line_refusal(model, folder) == (
        f"error: {folder / 'encoder.onnx'} takes or gives {held} tensors but {folder}/manifest.json says dtype "
        f"{label} ({said}): export the set again (`refformer export --dtype {label}`)")


def test_graph_types_reads_the_float_type_without_logits(sets):
    """fp16 decoders give float32 logits (contract.LOGITS): not counted, so the true sets pass."""
    assert graph_types(sets["fp16"] / "decoder.onnx")[1] == {"float16"}
    assert graph_types(sets["int8"] / "decoder.onnx")[1] == {"float32"}
    for dtype in ("fp32", "fp16", "int8"):
        result = CliRunner().invoke(main, ["verify", "--model", str(sets["model"]), "--dtype", dtype, "--provider",
                                           "cpu"])
        assert result.exit_code == 0, result.output


def test_a_huge_manifest_is_not_read_to_decide_a_folder_is_an_export(tmp_path):
    """is_export (export --out's check) read a manifest.json of any size whole: 300 MB took 660 MB of memory, and a
    folder holding only it was then replaced as an export. Now refused unread above read_json's JSON_MAX_BYTES."""
    from refformer.export.folder import is_export
    from refformer.refimpl.io import JSON_MAX_BYTES

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"format_version": 2, "pad": "' + "x" * (JSON_MAX_BYTES + 1) + '"}')
    assert not is_export(folder)
    (folder / "manifest.json").write_text('{"format_version": 2}')
    assert is_export(folder)  # a small one is read as before


def test_a_decoder_swapped_for_fp32_and_left_out_of_the_quantization_entry_is_refused(sets, tmp_path):
    """int8 sets quantize every decoder (export.quantized_graph): an fp32 decoder.onnx swapped into an int8 set with
    two decoders and struck from the entry's "graphs" (and from the manifest's) passed before."""
    def hide(manifest):
        manifest["quantization"]["graphs"].remove("decoder")
        manifest["graphs"].pop("decoder")

    model, folder = edited(sets, tmp_path, "int8-static", hide, swap="decoder.onnx")
    assert one_line_refusal(model, folder) == (
        f"error: {folder / 'decoder.onnx'} holds no int8 ops and {folder}/manifest.json does not list decoder as "
        "quantized, but int8 sets quantize every decoder graph: export the set again (`refformer export --dtype "
        "int8`)")


def test_a_quantized_graph_left_out_of_graphs_is_still_read(sets, tmp_path):
    """An int8 set labelled fp32 whose "graphs" entry leaves out decoder: its decoder.onnx (in "files") is read."""
    def relabel(manifest):
        manifest.update(dtype="fp32")
        del manifest["quantization"], manifest["graphs"]["decoder"]

    model, folder = edited(sets, tmp_path, "int8", relabel)
    assert f"{folder / 'decoder.onnx'} holds quantized ops (DynamicQuantizeLinear, MatMulInteger) but " in \
        one_line_refusal(model, folder)
