"""The shape of an imported Llama-style decoder.onnx after ONNX Runtime's own graph optimizer (issue 14's CPU speed):
the node patterns benchmarks/generate_imported_cpu.py was measured with stay in place. Their values are checked by
export's own comparison with refimpl and by verify (test_features.py); here only what the optimizer makes of them."""

import collections

import onnx

from refformer.export.contract import ERROR_BOUNDS
from refformer.export.export import export_model
from refformer.export.verify import verify
from tests.helpers import save_random_model

LLAMA = dict(vocab_size=40, d_model=24, n_heads=6, n_kv_heads=2, d_ff=32, n_encoder_layers=0, n_decoder_layers=2,
             max_positions=16, dropout=0.0, family="decoder-only", norm="rmsnorm", norm_first=True,
             positional="rotary", rope_theta=500.0, ffn_gated=True, activation="silu", ffn_bias=False,
             attention_qkv_bias=False, attention_out_bias=False, tie_embeddings=True)


def optimized_ops(path, tmp_path):
    """Op type -> count in ONNX Runtime's optimized graph of path (the CPU provider's, at its default level)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


def test_an_imported_llama_decoder_runs_fused_norms_and_no_cache_copies(tmp_path):
    cfg = save_random_model(tmp_path / "m", LLAMA)
    manifest = export_model(tmp_path / "m", tmp_path / "out", dtype="fp32")
    assert manifest["error"]["max"] <= ERROR_BOUNDS["fp32"]
    rows, _ = verify(tmp_path / "m", tmp_path / "out", providers=["CPUExecutionProvider"])
    assert all(row["ok"] for row in rows), [row for row in rows if not row["ok"]]
    ops = optimized_ops(tmp_path / "out" / "decoder.onnx", tmp_path)
    L = cfg.n_decoder_layers
    # every RMSNorm (two per layer and the final one) is one SimplifiedLayerNormalization node
    assert ops["SimplifiedLayerNormalization"] == 2 * L + 1
    assert ops["ReduceMean"] == ops["Sqrt"] == ops["Div"] == 0
    # grouped-query attention reads the cache by broadcasting: no repeat_kv Expand; rotary has no Neg
    assert ops["Expand"] == 0 and ops["Neg"] == 0
    # per layer: q, k, v, out_proj, fc1, fc_up, fc2, scores (FusedMatMul with the scale), probs @ v; then the head
    assert ops["MatMul"] + ops["FusedMatMul"] == 9 * L + 1

