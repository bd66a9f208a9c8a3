"""ONNX Runtime behind refimpl.generate's stepper interface, with IOBinding.

The self-attention cache and the cross-attention keys/values live as OrtValues on the session's
device (CUDA memory on the GPU): each step binds the previous step's present_* outputs as its
past_* inputs, so the cache never crosses to the host. Only token ids, positions and masks go in,
and only the logits come out to the host, for the sampler. Beam reordering gathers cache rows on
the device with a one-node Gather graph. On the CPU the same code runs with device "cpu".
"""

import numpy as np
from onnx import TensorProto, helper

from refformer.export.verify import session as make_session

DEVICE_OF_PROVIDER = {"CUDAExecutionProvider": "cuda", "CPUExecutionProvider": "cpu"}
NUMPY_OF_DTYPE = {"fp32": np.float32, "fp16": np.float16}


def gather_rows_model(elem_type):
    """y = x[rows]: the device-side reorder of a cache tensor."""
    graph = helper.make_graph(
        [helper.make_node("Gather", ["x", "rows"], ["y"], axis=0, name="/reorder/Gather")], "reorder_rows",
        [helper.make_tensor_value_info("x", elem_type, None), helper.make_tensor_value_info("rows", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", elem_type, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


class OrtStepper:
    """encoder.onnx / decoder.onnx as a stepper (start, step, reorder) for refimpl.generate's search."""

    def __init__(self, cfg, onnx_dir, dtype, provider="CPUExecutionProvider", threads=None):
        import onnxruntime as ort

        self.ort = ort
        self.cfg, self.dtype, self.provider = cfg, dtype, provider
        self.device = DEVICE_OF_PROVIDER[provider]
        self.float_type = NUMPY_OF_DTYPE[dtype]
        self.decoder = make_session(f"{onnx_dir}/decoder.onnx", provider, threads)
        self.encoder = make_session(f"{onnx_dir}/encoder.onnx", provider, threads) if cfg.is_encoder_decoder else None
        elem_type = TensorProto.FLOAT if dtype == "fp32" else TensorProto.FLOAT16
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.gather = ort.InferenceSession(gather_rows_model(elem_type).SerializeToString(), options, providers=[provider])
        self.decoder_outputs = [o.name for o in self.decoder.get_outputs()]

    # ------------------------------------------------------------ helpers
    def on_device(self, array):
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def empty(self, batch_size):
        shape = (batch_size, self.cfg.n_heads, 0, self.cfg.head_dim)
        return self.on_device(np.zeros(shape, self.float_type))

    def gather_rows(self, value, rows_value):
        binding = self.gather.io_binding()
        binding.bind_ortvalue_input("x", value)
        binding.bind_ortvalue_input("rows", rows_value)
        binding.bind_output("y", self.device)
        self.gather.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    # ------------------------------------------------------------ the stepper interface
    def start(self, src_ids, src_keep, batch_size):
        self.cross, self.src_keep = [], None
        if self.cfg.is_encoder_decoder:
            binding = self.encoder.io_binding()
            binding.bind_cpu_input("input_ids", np.ascontiguousarray(src_ids, dtype=np.int64))
            binding.bind_cpu_input("attention_mask", np.ascontiguousarray(src_keep, dtype=np.int64))
            names = [o.name for o in self.encoder.get_outputs()]
            for name in names:
                binding.bind_output(name, self.device)
            self.encoder.run_with_iobinding(binding)
            values = dict(zip(names, binding.get_outputs()))
            self.cross = [(values[f"cross_key_{i}"], values[f"cross_value_{i}"]) for i in range(self.cfg.n_decoder_layers)]
            self.src_keep = np.asarray(src_keep, dtype=np.int64)
        self.past = [(self.empty(batch_size), self.empty(batch_size)) for _ in range(self.cfg.n_decoder_layers)]

    def step(self, ids, positions, attention_mask):
        binding = self.decoder.io_binding()
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(attention_mask, dtype=np.int64))
        for i, (k, v) in enumerate(self.past):
            binding.bind_ortvalue_input(f"past_key_self_{i}", k)
            binding.bind_ortvalue_input(f"past_value_self_{i}", v)
        if self.cfg.is_encoder_decoder:
            binding.bind_cpu_input("encoder_attention_mask", self.src_keep)
            for i, (k, v) in enumerate(self.cross):
                binding.bind_ortvalue_input(f"cross_key_{i}", k)
                binding.bind_ortvalue_input(f"cross_value_{i}", v)
        binding.bind_output("logits", "cpu")  # the sampler needs them on the host
        for name in self.decoder_outputs[1:]:
            binding.bind_output(name, self.device)  # the cache stays on the device
        self.decoder.run_with_iobinding(binding)
        outputs = dict(zip(self.decoder_outputs, binding.get_outputs()))
        self.past = [(outputs[f"present_key_self_{i}"], outputs[f"present_value_self_{i}"])
                     for i in range(self.cfg.n_decoder_layers)]
        return outputs["logits"].numpy()

    def reorder(self, rows):
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        rows_value = self.on_device(rows)
        self.past = [(self.gather_rows(k, rows_value), self.gather_rows(v, rows_value)) for k, v in self.past]
        if self.cfg.is_encoder_decoder:
            self.cross = [(self.gather_rows(k, rows_value), self.gather_rows(v, rows_value)) for k, v in self.cross]
            self.src_keep = self.src_keep[rows]
