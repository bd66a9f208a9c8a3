"""Issue 15: export/quantize.py's quantize_graph turns an exported fp32 graph into its int8 variant: the same inputs
and outputs, quantized weight ops inside, logits close to fp32's; a missing or bad source, an unknown method or a
destination that cannot be written raise RefformerError, and a failure never leaves a half-written destination."""

import numpy as np
import onnx
import pytest

from refformer.export.contract import CPU_PROVIDER
from refformer.export.export import export_model
from refformer.export.quantize import QUANTIZE_METHODS, quantize_graph
from refformer.refimpl import RefformerError
from refformer.runtime.stepper import OrtStepper
from tests.helpers import save_random_model

# tied embeddings (the head is MatMul(x, Transpose(embed)): quantize_graph must quantize it too)
BASE = dict(vocab_size=96, d_model=32, n_heads=4, d_ff=64, n_encoder_layers=1, n_decoder_layers=2, max_positions=32,
            dropout=0.0, share_embeddings=True, tie_embeddings=True)
QUANTIZED_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulNBits", "QLinearMatMul",
                 "DequantizeLinear"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(cfg, fp32 export folder) of a tiny encoder-decoder model with tied embeddings."""
    folder = tmp_path_factory.mktemp("quantize")
    cfg = save_random_model(folder / "model", BASE)
    export_model(folder / "model", folder / "fp32", measure=False)
    return cfg, folder / "fp32"


def float_matmuls(model):
    """Names of the MatMul nodes of model whose second input is a constant (or a Transpose of one): weights left
    in float."""
    constants = {t.name for t in model.graph.initializer}
    transposed = {n.output[0] for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in constants}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in constants | transposed]


def io_of(model):
    def spec(values):
        return [(v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

    return spec(model.graph.input), spec(model.graph.output)


@pytest.mark.parametrize("method", [*QUANTIZE_METHODS, "int8-blocks32"])
@pytest.mark.parametrize("graph", ["encoder.onnx", "decoder.onnx"])
def test_every_weight_matmul_is_quantized_and_the_inputs_and_outputs_are_unchanged(exported, tmp_path, graph, method):
    _, fp32 = exported
    quantize_graph(fp32 / graph, tmp_path / graph, method=method)
    before, after = onnx.load(str(fp32 / graph)), onnx.load(str(tmp_path / graph))
    onnx.checker.check_model(after)
    assert float_matmuls(before) and not float_matmuls(after)  # the tied head too
    assert QUANTIZED_OPS & {n.op_type for n in after.graph.node}
    assert io_of(after) == io_of(before)


def test_logits_are_close_to_fp32(exported, tmp_path):
    """Greedy decoding's logits over 8 forced steps of 3 sources, int8 against fp32 (both on ONNX Runtime CPU):
    the largest difference is a small share of the logits' range (measured 4.5 % with "int8", 2.5 % with
    "int8-blocks32"; bound 10 %), and the argmax agrees on most positions."""
    cfg, fp32 = exported
    int8 = tmp_path / "int8"
    int8.mkdir()
    for graph in ("encoder.onnx", "decoder.onnx"):
        quantize_graph(fp32 / graph, int8 / graph)
    rng = np.random.default_rng(1)
    src = rng.integers(4, cfg.vocab_size, (3, 10))
    forced = rng.integers(4, cfg.vocab_size, (3, 8))
    ids = np.concatenate([np.full((3, 1), cfg.bos_id), forced[:, :-1]], axis=1)
    logits = {}
    for name, folder in (("fp32", fp32), ("int8", int8)):
        stepper = OrtStepper(cfg, str(folder), "fp32", CPU_PROVIDER, 1)
        stepper.start(src, np.ones_like(src), 3)
        logits[name] = np.concatenate([
            stepper.step(ids[:, t:t + 1], np.full((3, 1), t), np.ones((3, t + 1), np.int64)) for t in range(8)],
            axis=1)  # [B, T, V]
    span = logits["fp32"].max() - logits["fp32"].min()
    worst = np.abs(logits["int8"] - logits["fp32"]).max()
    print(f"max |logits int8 - fp32| = {worst:.4f} ({100 * worst / span:.1f} % of the range {span:.2f})")
    assert worst <= 0.10 * span
    assert (logits["int8"].argmax(-1) == logits["fp32"].argmax(-1)).mean() >= 0.75


def test_methods():
    assert "int8" in QUANTIZE_METHODS


def test_external_weights_stay_external(tmp_path):
    """A graph saved with its weights in PATH.data gives DST.data beside the destination, and nothing else."""
    cfg = save_random_model(tmp_path / "model", BASE)
    export_model(tmp_path / "model", tmp_path / "fp32", measure=False, external_data=True)
    assert (tmp_path / "fp32" / "decoder.onnx.data").is_file()
    out = tmp_path / "int8"
    out.mkdir()
    quantize_graph(tmp_path / "fp32" / "decoder.onnx", out / "decoder.onnx")
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "decoder.onnx.data"]
    model = onnx.load(str(out / "decoder.onnx"), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert not float_matmuls(onnx.load(str(out / "decoder.onnx")))
    assert cfg.tie_embeddings


def test_bad_method_source_or_destination_raise(exported, tmp_path):
    _, fp32 = exported
    with pytest.raises(RefformerError, match="method 'int3'"):
        quantize_graph(fp32 / "decoder.onnx", tmp_path / "out.onnx", method="int3")
    with pytest.raises(RefformerError, match="missing"):
        quantize_graph(tmp_path / "nothing.onnx", tmp_path / "out.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07 not a graph \xff" * 10)
    with pytest.raises(RefformerError, match="not a valid ONNX graph"):
        quantize_graph(garbage, tmp_path / "out.onnx")
    with pytest.raises(RefformerError, match="is the source graph"):
        quantize_graph(fp32 / "decoder.onnx", fp32 / "decoder.onnx")
    with pytest.raises(RefformerError, match="does not exist"):
        quantize_graph(fp32 / "decoder.onnx", tmp_path / "no" / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_a_failure_leaves_the_destination_as_it_was(exported, tmp_path, monkeypatch):
    """The quantizer fails after writing part of its output: the file already at the destination keeps its
    bytes, and no temporary is left beside it."""
    _, fp32 = exported
    destination = tmp_path / "decoder.onnx"
    destination.write_bytes(b"the user's file")

    def broken(model, out, external, recipe=None):
        with open(out, "wb") as f:
            f.write(b"half a graph")
        raise OSError("No space left on device")

    monkeypatch.setattr("refformer.export.quantize.quantize_blocks", broken)
    monkeypatch.setattr("refformer.export.quantize.quantize_dynamic", broken)
    with pytest.raises(OSError, match="No space"):
        quantize_graph(fp32 / "decoder.onnx", destination)
    assert destination.read_bytes() == b"the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoder.onnx"]
