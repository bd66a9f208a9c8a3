"""ONNX Runtime behind refimpl.generate's stepper interface, with IOBinding.

The self-attention cache and the cross-attention keys/values live as OrtValues on the session's
device (CUDA memory on the GPU): each step binds the previous step's present_* outputs as its
past_* inputs, so the cache never crosses to the host. Only token ids, positions and masks go in,
and only the logits come out to the host, for the sampler. Beam reordering gathers the rows of every
cache tensor on the device in one run of a Gather graph; cross-attention rows are gathered only when a
row's source changes (expanding to beams), not when beams of one input swap. On the CPU the same code
runs with device "cpu".
"""

import numpy as np
from onnx import TensorProto, helper

from refformer.export import contract
from refformer.export.graph import FLOAT_TYPES, NUMPY_TYPES
from refformer.export.session import DEVICE_OF_PROVIDER, make_session
from refformer.refimpl.errors import RefformerError, check
from refformer.refimpl.generate import Stepper

SOURCE_BUCKET = 16  # the static stepper pads sources to a multiple of this many positions
MAX_BUFFER_SETS = 8  # buffer sets (one per batch size and source bucket) a static stepper keeps
VIEWS = "rows"  # the third item of shape_key (and binding keys) while keep_rows' [n, ...] views are the buffers


def run_bound(session, binding, run_options=None, graph="a graph"):
    """session.run_with_iobinding; ONNX Runtime's own exceptions become one RefformerError naming the graph."""
    try:
        session.run_with_iobinding(binding, run_options)
    except Exception as error:  # onnxruntime's Fail, InvalidArgument, RuntimeException, ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RefformerError(f"ONNX Runtime failed running {graph} ({reason[:200]}); if the export folder was "
                             "changed or copied from another model, run `refformer export` again") from None


def tool_model(graph):
    """A small device graph as an opset-17 model, IR version 10 (readable by older onnxruntime builds too).

    Raises nothing.
    """
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def gather_rows_model(elem_type, n):
    """y_i = x_i[rows] for i < n: the device-side reorder of n cache tensors in one run.

    elem_type: a TensorProto float type; rows int64 [n]. Raises nothing.
    """
    graph = helper.make_graph(
        [helper.make_node("Gather", [f"x_{i}", "rows"], [f"y_{i}"], axis=0, name=f"/reorder/Gather_{i}")
         for i in range(n)],
        "reorder_rows",
        [helper.make_tensor_value_info(f"x_{i}", elem_type, None) for i in range(n)]
        + [helper.make_tensor_value_info("rows", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info(f"y_{i}", elem_type, None) for i in range(n)])
    return tool_model(graph)


def prompt_writer_model(elem_type, n):
    """y_i = GatherElements(Concat(present_i [B, H, T, Dh], cache_i [B, H, L, Dh]) on axis 2, index [B, L] broadcast):
    a prompt pass's cache moved into static slots (slot s of row b takes column index[b, s]).

    elem_type: a TensorProto float type; index int64 [B, L]. Raises nothing.
    """
    nodes = [helper.make_node("Unsqueeze", ["index", "axes"], ["index_4d"], name="/prompt/Unsqueeze")]
    for i in range(n):
        nodes += [helper.make_node("Concat", [f"present_{i}", f"cache_{i}"], [f"both_{i}"], axis=2,
                                   name=f"/prompt/Concat_{i}"),
                  helper.make_node("Shape", [f"cache_{i}"], [f"shape_{i}"], name=f"/prompt/Shape_{i}"),
                  helper.make_node("Expand", ["index_4d", f"shape_{i}"], [f"index_{i}"], name=f"/prompt/Expand_{i}"),
                  helper.make_node("GatherElements", [f"both_{i}", f"index_{i}"], [f"y_{i}"], axis=2,
                                   name=f"/prompt/GatherElements_{i}")]
    tensor = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes, "prompt_writer",
        [tensor("index", TensorProto.INT64, ["batch", "slots"])]
        + [tensor(f"{name}_{i}", elem_type, None) for i in range(n) for name in ("present", "cache")],
        [tensor(f"y_{i}", elem_type, None) for i in range(n)],
        initializer=[helper.make_tensor("axes", TensorProto.INT64, [2], [1, 3])])
    return tool_model(graph)


def zeros_model(elem_type, n):
    """y_i = zeros shaped like x_i for i < n (bound to x_i's own buffer: an in-place clear).

    elem_type: a TensorProto float type. Raises nothing.
    """
    zero = helper.make_tensor("zero", elem_type, [1], [0.0])
    nodes = []
    for i in range(n):
        nodes.append(helper.make_node("Shape", [f"x_{i}"], [f"shape_{i}"], name=f"/zeros/Shape_{i}"))
        nodes.append(helper.make_node("ConstantOfShape", [f"shape_{i}"], [f"y_{i}"], value=zero,
                                      name=f"/zeros/Fill_{i}"))
    graph = helper.make_graph(nodes, "zeros",
                              [helper.make_tensor_value_info(f"x_{i}", elem_type, None) for i in range(n)],
                              [helper.make_tensor_value_info(f"y_{i}", elem_type, None) for i in range(n)])
    return tool_model(graph)


def top_candidates(values, n, block=256):
    """np.argsort(-values, kind="stable")[:n] (the n largest, ties to the lower index) without sorting all of values.

    The runtime steppers' Stepper.top_candidates. Beam search ranks K * V candidates per input every step; a full sort
    of 128,000 of them costs far more than the decode step. values is cut into blocks: the blocks whose maximum is
    among the n largest block maxima (ties included) hold every one of the n best (a value outside them has n larger
    values ahead of it, one in each of n blocks), so only those blocks are sorted. Raises RefformerError for n or
    block not an integer >= 1, or values that are not numbers.
    """
    check(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1,
          f"n must be an integer >= 1, got {n!r}")
    check(isinstance(block, (int, np.integer)) and not isinstance(block, bool) and block >= 1,
          f"block must be an integer >= 1, got {block!r}")
    try:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise RefformerError("values must be an array of numbers") from None
    if values.size <= 4 * n * block or np.isnan(values).any():  # NaN maxima would hide their blocks
        return np.argsort(-values, kind="stable")[:n]
    pad = -values.size % block
    blocks = np.concatenate([values, np.full(pad, -np.inf)]).reshape(-1, block)
    maxima = blocks.max(axis=1)
    nth = np.partition(maxima, maxima.size - n)[maxima.size - n]  # the n-th largest block maximum
    chosen = np.flatnonzero(maxima >= nth)  # ascending, so the gathered indices stay ascending
    index = (chosen[:, None] * block + np.arange(block)).reshape(-1)
    index = index[index < values.size]
    return index[np.argsort(-values[index], kind="stable")[:n]]


class OrtStepper(Stepper):
    """encoder.onnx / decoder.onnx as a stepper (start, step, reorder) for refimpl.generate's search.

    OrtStepper(cfg, onnx_dir, dtype, provider, ...) raises RefformerError (make_session, import_onnxruntime) for a
    missing or unloadable graph or onnxruntime, and KeyError for a dtype or provider outside contract.DTYPES / PROVIDERS
    (Generator checks both first).
    """

    drops_finished_rows = True  # reorder gathers the rows still generating: later steps compute only those

    def top_candidates(self, values, n):
        """Stepper.top_candidates by the blocked search (top_candidates): the same indices, without a full sort.

        values: float logits, any shape (flattened); returns int64 [min(n, values.size)]. Raises RefformerError for
        n not an integer >= 1 or values that are not numbers.
        """
        return top_candidates(values, n)

    def __init__(self, cfg, onnx_dir, dtype, provider=contract.CPU_PROVIDER, threads=None,
                 decoder_file=contract.DECODER_FILE,
                 provider_options=None):
        """decoder_file: decoder.onnx (the reference graph) or decoder_fused.onnx (same inputs and outputs).

        Raises RefformerError, before any session, for a decoder graph without ONNX Runtime kernels in dtype on the
        provider (contract.runs_on: decoder_static_fused.onnx in fp32 on CUDA, where ONNX Runtime would run its
        GroupQueryAttention nodes on the CPU, copying every step, and refuse CUDA-graph capture).
        """
        from refformer.export.session import import_onnxruntime

        graph = decoder_file[:-len(contract.GRAPH_SUFFIX)] if decoder_file.endswith(contract.GRAPH_SUFFIX) else None
        if graph is not None:
            contract.check_runs_on(graph, dtype, provider)
        ort = import_onnxruntime()

        self.ort = ort
        self.cfg, self.dtype, self.provider = cfg, dtype, provider
        self.device = DEVICE_OF_PROVIDER[provider]
        self.float_type = NUMPY_TYPES[dtype]
        self.onnx_dir, self.decoder_file = onnx_dir, decoder_file
        self.decoder = make_session(f"{onnx_dir}/{decoder_file}", provider, threads, provider_options=provider_options)
        self.encoder = (make_session(f"{onnx_dir}/{contract.ENCODER_FILE}", provider, threads)
                        if cfg.is_encoder_decoder else None)
        self.tools = {}  # (graph builder name, n tensors) -> the session of that small device graph
        self.decoder_outputs = [o.name for o in self.decoder.get_outputs()]

    # ------------------------------------------------------------ helpers
    def on_device(self, array):
        """A NumPy array copied to an OrtValue on the stepper's device (CUDA memory, or the host).

        Raises nothing: its callers pass int64 or float arrays.
        """
        return self.ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, 0)

    def empty(self, batch_size):
        """An empty self-attention cache tensor [B, Hkv, 0, Dh] of the export's float type, on the device (Hkv =
        n_kv_heads: grouped-query attention caches one head per group).

        Raises nothing.
        """
        shape = (batch_size, self.cfg.n_kv_heads, 0, self.cfg.head_dim)
        return self.on_device(np.zeros(shape, self.float_type))

    def tool(self, build, n):
        """The session of a small device graph build(elem_type, n) over n cache tensors (reorder, clear, prompt
        writer), made on first use.

        Raises RefformerError (make_session) if the small graph cannot be loaded (never for the graphs here).
        """
        key = (build.__name__, n)
        if key not in self.tools:
            self.tools[key] = make_session(build(FLOAT_TYPES[self.dtype], n).SerializeToString(), self.provider)
        return self.tools[key]

    def gather_rows(self, values, rows, outs=None):
        """[value[rows] for value in values] on the device, in one run; into the fixed buffers outs if given.

        values: device tensors [N, ...]; rows int64 [n] (indices < N). Raises onnxruntime's own errors (it calls
        run_with_iobinding directly, not through run_bound).
        """
        session = self.tool(gather_rows_model, len(values))
        binding = session.io_binding()
        binding.bind_ortvalue_input("rows", self.on_device(np.ascontiguousarray(rows, dtype=np.int64)))
        for i, value in enumerate(values):
            binding.bind_ortvalue_input(f"x_{i}", value)
            if outs is None:
                binding.bind_output(f"y_{i}", self.device)
            else:
                binding.bind_ortvalue_output(f"y_{i}", outs[i])
        session.run_with_iobinding(binding)
        return binding.get_outputs() if outs is None else outs

    def fill_zeros(self, values):
        """Set every value (a device buffer) to zeros in place, in one run of a ConstantOfShape graph.

        Raises onnxruntime's own errors (it calls run_with_iobinding directly, not through run_bound).
        """
        session = self.tool(zeros_model, len(values))
        binding = session.io_binding()
        for i, value in enumerate(values):
            binding.bind_ortvalue_input(f"x_{i}", value)  # read for its shape only
            binding.bind_ortvalue_output(f"y_{i}", value)
        session.run_with_iobinding(binding)

    def sources_change(self, rows):
        """Whether reordering by rows gives some row another input's source (so cross-attention rows must move
        too); beams of one input swapping places keep every row's source.

        rows: int64 [n]. No checks: reached only through reorder, whose rows come from the search.
        """
        new = self.source_of_row[rows]
        changed = len(rows) != len(self.source_of_row) or not np.array_equal(new, self.source_of_row)
        self.source_of_row = new
        return changed

    # ------------------------------------------------------------ the stepper interface
    def start(self, src_ids, src_keep, batch_size):
        """Stepper.start: run encoder.onnx on src_ids [B, S] int64 with keep mask src_keep [B, S] (encoder-decoder;
        None for decoder-only), keeping the cross-attention keys/values on the device, and empty caches for
        batch_size rows.

        Raises RefformerError (run_bound) when ONNX Runtime fails running encoder.onnx.
        """
        self.cross, self.src_keep = [], None
        if self.cfg.is_encoder_decoder:
            binding = self.encoder.io_binding()
            binding.bind_cpu_input(contract.INPUT_IDS, np.ascontiguousarray(src_ids, dtype=np.int64))
            binding.bind_cpu_input(contract.ATTENTION_MASK, np.ascontiguousarray(src_keep, dtype=np.int64))
            names = [o.name for o in self.encoder.get_outputs()]
            for name in names:
                binding.bind_output(name, self.device)
            run_bound(self.encoder, binding, graph=f"{self.onnx_dir}/{contract.ENCODER_FILE}")
            values = dict(zip(names, binding.get_outputs()))
            self.cross = [(values[contract.cross_key(i)], values[contract.cross_value(i)])
                          for i in range(self.cfg.n_decoder_layers)]
            self.src_keep = np.asarray(src_keep, dtype=np.int64)
        self.source_of_row = np.arange(batch_size)
        self.past = [(self.empty(batch_size), self.empty(batch_size)) for _ in range(self.cfg.n_decoder_layers)]

    def run_decoder(self, session, output_names, ids, positions, attention_mask, past, cross, encoder_keep):
        """One run of a growing-cache decoder graph (decoder.onnx, decoder_fused.onnx): ids, positions and masks
        from the host, past and cross as device OrtValues -> {output name: OrtValue}, logits on the host and the
        present cache on the device.

        Raises RefformerError (run_bound) when ONNX Runtime fails.
        """
        binding = session.io_binding()
        binding.bind_cpu_input(contract.INPUT_IDS, np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input(contract.POSITION_IDS, np.ascontiguousarray(positions, dtype=np.int64))
        binding.bind_cpu_input(contract.ATTENTION_MASK, np.ascontiguousarray(attention_mask, dtype=np.int64))
        for i, (k, v) in enumerate(past):
            binding.bind_ortvalue_input(contract.past_key(i), k)
            binding.bind_ortvalue_input(contract.past_value(i), v)
        if self.cfg.is_encoder_decoder:
            binding.bind_cpu_input(contract.ENCODER_ATTENTION_MASK, encoder_keep)
            for i, (k, v) in enumerate(cross):
                binding.bind_ortvalue_input(contract.cross_key(i), k)
                binding.bind_ortvalue_input(contract.cross_value(i), v)
        binding.bind_output(contract.LOGITS, "cpu")  # the sampler needs them on the host
        for name in output_names[1:]:
            binding.bind_output(name, self.device)  # the cache stays on the device
        run_bound(session, binding, graph=f"the decoder in {self.onnx_dir}")
        return dict(zip(output_names, binding.get_outputs()))

    def step(self, ids, positions, attention_mask):
        """Stepper.step: ids and positions [B, T] int64, attention_mask [B, P + T] (1 = attend) -> logits [B, T, V]
        float32 on the host; the present cache stays on the device as the next step's past. Raises RefformerError
        when ONNX Runtime fails."""
        outputs = self.run_decoder(self.decoder, self.decoder_outputs, ids, positions, attention_mask, self.past,
                                   self.cross, self.src_keep)
        self.past = [(outputs[contract.present_key(i)], outputs[contract.present_value(i)])
                     for i in range(self.cfg.n_decoder_layers)]
        return outputs[contract.LOGITS].numpy()

    def reorder(self, rows):
        """Stepper.reorder: keep cache row rows[i] as row i (beam search), on the device in one run.

        rows: int64 [n] indices into the current rows. Raises onnxruntime's own errors (gather_rows calls
        run_with_iobinding directly, not through run_bound).
        """
        tensors = [self.past]
        if self.cfg.is_encoder_decoder and self.sources_change(rows):
            tensors.append(self.cross)
            self.src_keep = self.src_keep[rows]
        flat = self.gather_rows([t for pairs in tensors for pair in pairs for t in pair], rows)
        pairs = [tuple(flat[i:i + 2]) for i in range(0, len(flat), 2)]
        self.past = pairs[:len(self.past)]
        if len(tensors) == 2:
            self.cross = pairs[len(self.past):]


class StaticOrtStepper(OrtStepper):
    """decoder_static.onnx, decoder_static_mha.onnx or decoder_static_fused.onnx as a stepper: a fixed-size
    cache in fixed buffers, one token per call.

    Every input and output is a preallocated OrtValue on the device, updated in place. With the masked
    graphs (static, static_mha) the self-attention cache ping-pongs between two buffer sets (read one,
    write the other); decoder_static_fused.onnx writes each new key/value into the cache it reads, so its
    past and present are bound to the same buffers. A beam reorder gathers into the idle set. Buffer sets
    are kept per (batch size, source-length bucket), so on CUDA each (set, parity) is captured once as a
    CUDA graph (enable_cuda_graph) and replayed every token. A decoder-only prompt runs through
    decoder.onnx in one call and its cache is gathered into the static slots.

    Its constructor raises as OrtStepper's; step raises RefformerError when a call would write past the L static slots.
    """

    argmax_in_graph = True  # step_argmax reads the graph's next_ids output; the logits stay on the device

    @property
    def drops_finished_rows(self):
        """Stepper.drops_finished_rows: true for the in-place graph with its caches in host memory (the CPU), where
        reorder to fewer rows (keep_rows) packs the rows still generating into the leading rows of the buffers in
        use, copying only their written slots on the host, so later steps compute only those rows; false elsewhere
        (the masked graphs, CUDA: a buffer set and a captured graph per batch size, so the batch keeps its size).

        Raises nothing.
        """
        return self.in_place and self.host_cache

    def __init__(self, cfg, onnx_dir, dtype, provider=contract.CPU_PROVIDER, threads=None, cuda_graph=False,
                 decoder_file=contract.graph_file(contract.decoder_graph(contract.STATIC))):
        super().__init__(cfg, onnx_dir, dtype, provider, threads, decoder_file,
                         provider_options={"enable_cuda_graph": "1"} if cuda_graph else None)
        self.prompt_decoder = None  # decoder.onnx, loaded for the first prompt of more than one token
        self.decoder_inputs = {i.name for i in self.decoder.get_inputs()}
        self.max_length = next(i.shape[2] for i in self.decoder.get_inputs() if i.name == contract.past_key(0))
        # decoder_static_fused: slot = position, no masks
        self.in_place = contract.WRITE_INDEX not in self.decoder_inputs
        # the in-place caches as host memory (the CPU): a prompt and a beam reorder copy only the written slots, on
        # the host (write_prompt_on_host); elsewhere (CUDA) they go through the device graphs (write_prompt,
        # gather_rows). Tests set it False to drive the device path on the CPU
        self.host_cache = self.in_place and provider == contract.CPU_PROVIDER
        self.cuda_graph = cuda_graph
        self.bindings = {}  # (batch size, source length, parity, cross parity) -> (IOBinding, RunOptions)
        self.sets = {}  # (batch size, source length) -> (buffers, caches, cross_sets), least recently used first
        self.graph_count = 0  # gpu_graph_ids handed out; an id is never reused
        self.onnx_dir, self.threads = onnx_dir, threads
        self.prompt_logits = None  # the prompt pass's logits, while they are the last ones
        self.view_base = None  # the buffer set keep_rows' views are rows of

    def buffer(self, shape, dtype):
        """A zero-filled buffer of its own (on the CPU an OrtValue shares its NumPy array's memory, so each
        buffer needs a fresh array; zeros, because masked cache slots still enter a MatMul).

        Raises nothing.
        """
        return self.on_device(np.zeros(shape, dtype))

    def allocate(self, batch_size, source_length):
        """A set of fixed buffers for batch_size rows (cross-attention sets for source_length positions).

        Buffers: input_ids, position_ids [B, 1], write_index [1], attention_mask [B, L], next_ids [B] int64; logits
        [B, 1, V] float32; caches [B, Hkv, L, Dh] and cross caches [B, Hkv, S, Dh] in the export's float type. Raises
        nothing but onnxruntime's out-of-memory errors.
        """
        B, L, cfg = batch_size, self.max_length, self.cfg
        buffers = {
            contract.INPUT_IDS: self.buffer((B, 1), np.int64),
            contract.POSITION_IDS: self.buffer((B, 1), np.int64),
            contract.WRITE_INDEX: self.buffer(1, np.int64),
            contract.ATTENTION_MASK: self.buffer((B, L), np.int64),
            contract.LOGITS: self.buffer((B, 1, cfg.vocab_size), np.float32),
            contract.NEXT_IDS: self.buffer(B, np.int64),
        }
        cache_shape = (B, cfg.n_kv_heads, L, cfg.head_dim)
        caches = [[(self.buffer(cache_shape, self.float_type), self.buffer(cache_shape, self.float_type))
                   for _ in range(cfg.n_decoder_layers)] for _ in range(2)]
        cross_sets = [[], []]
        if cfg.is_encoder_decoder:
            buffers[contract.ENCODER_ATTENTION_MASK] = self.buffer((B, source_length), np.int64)
            cross_shape = (B, cfg.n_kv_heads, source_length, cfg.head_dim)
            cross_sets = [[(self.buffer(cross_shape, self.float_type), self.buffer(cross_shape, self.float_type))
                           for _ in range(cfg.n_decoder_layers)] for _ in range(2)]
        return buffers, caches, cross_sets

    def use_buffers(self, batch_size, source_length):
        """Switch to the buffer set of this shape, allocated once and kept: a captured CUDA graph replays
        the addresses it was captured with, so a set is never replaced while its graphs live. Beyond
        MAX_BUFFER_SETS the least recently used set goes, with its bindings and captured graphs (their
        ids are never handed out again).

        Raises nothing but allocate's.
        """
        key = (batch_size, source_length)
        if key not in self.sets:
            while len(self.sets) >= MAX_BUFFER_SETS:  # drop the least recently used sets, their bindings and graphs
                old = next(iter(self.sets))
                del self.sets[old]
                for binding_key in [k for k in self.bindings if k[:2] == old]:
                    _, options = self.bindings.pop(binding_key)
                    if self.cuda_graph and hasattr(self.decoder, "release_captured_graph"):
                        try:  # a no-op on some builds (the graph then stays until the session goes); never reused
                            self.decoder.release_captured_graph(int(options.get_run_config_entry("gpu_graph_id")))
                        except Exception:  # an id whose graph was never captured
                            pass
            self.sets[key] = self.allocate(batch_size, source_length)
        self.sets[key] = self.sets.pop(key)  # most recently used last
        self.shape_key, self.view_base = key, None  # whole sets again: keep_rows' views and their bindings go
        self.forget_view_bindings()
        self.buffers, self.caches, self.cross_sets = self.sets[key]
        self.parity = self.cross_parity = 0
        if self.cfg.is_encoder_decoder:
            keep = np.ascontiguousarray(self.src_keep, dtype=np.int64)
            self.buffers[contract.ENCODER_ATTENTION_MASK].update_inplace(keep)

    def pad_source(self, src_ids, src_keep):
        """Right-pad the sources to a multiple of SOURCE_BUCKET positions (masked), so that a few buffer sets
        and captured graphs serve every source length.

        src_ids, src_keep [B, S] int64 -> [B, S'] int64 (S' = S rounded up to a multiple of SOURCE_BUCKET, capped at
        max_positions, never below S). Raises nothing.
        """
        S = src_ids.shape[1]
        padded = max(S, min(-(-S // SOURCE_BUCKET) * SOURCE_BUCKET, self.cfg.max_positions))
        widths = ((0, 0), (0, padded - S))
        return np.pad(src_ids, widths, constant_values=self.cfg.fill_id), np.pad(np.asarray(src_keep, np.int64), widths)

    def start(self, src_ids, src_keep, batch_size):
        """Stepper.start, with the source padded to a multiple of SOURCE_BUCKET and the fixed buffers of this batch
        size and source bucket bound. Where the caches are host memory (host_cache) encoder.onnx runs on the
        unpadded source and its keys/values are copied into the first S positions of the padded cross buffers
        (the padding is masked: what an earlier call left there gets weight 0): the encoder costs what the reference
        stepper's does (on the bundled model, int8, 1 thread, the padded encoder was 0.2 s of a 1.3 s test-split
        pass), and with int8 its dynamically quantized activations are the reference stepper's.

        Raises RefformerError (run_bound) when ONNX Runtime fails running encoder.onnx; onnxruntime's own errors
        from fill_zeros.
        """
        source_length = 0
        if self.cfg.is_encoder_decoder:
            padded_ids, padded_keep = self.pad_source(src_ids, src_keep)
            if not self.host_cache:
                src_ids, src_keep = padded_ids, padded_keep
            source_length = padded_ids.shape[1]
        super().start(src_ids, src_keep, batch_size)
        if self.cfg.is_encoder_decoder:
            self.src_keep = padded_keep
        self.use_buffers(batch_size, source_length)
        if not self.in_place:  # masked slots still enter the attention products: clear what an earlier call left
            self.fill_zeros([t for pair in self.caches[0] for t in pair])
        for pair, pair_out in zip(self.cross, self.cross_sets[0]):
            for value, out in zip(pair, pair_out):
                if self.host_cache:  # views of host memory: the unpadded source's S positions
                    target = out.numpy()
                    target[:, :, :value.shape()[2]] = value.numpy()
                else:
                    out.update_inplace(value)  # device to device
        self.mask = np.zeros((batch_size, self.max_length), np.int64)
        self.length = 0  # slots written so far

    def binding(self):
        """(IOBinding, RunOptions) of the current buffer set and parities, built once: a captured CUDA graph
        replays the addresses bound at its capture, so each gpu_graph_id keeps one binding, and a step only
        copies its new inputs into the bound buffers.

        Raises nothing.
        """
        key = (*self.shape_key, self.parity, self.cross_parity)
        if key in self.bindings:
            return self.bindings[key]
        buffers = self.buffers
        binding = self.decoder.io_binding()
        for name in (contract.INPUT_IDS, contract.POSITION_IDS, contract.WRITE_INDEX, contract.ATTENTION_MASK):
            if name in self.decoder_inputs:
                binding.bind_ortvalue_input(name, buffers[name])
        read = self.caches[self.parity]
        write = read if self.in_place else self.caches[1 - self.parity]
        for i, ((k, v), (k_out, v_out)) in enumerate(zip(read, write)):
            binding.bind_ortvalue_input(contract.past_key(i), k)
            binding.bind_ortvalue_input(contract.past_value(i), v)
            binding.bind_ortvalue_output(contract.present_key(i), k_out)
            binding.bind_ortvalue_output(contract.present_value(i), v_out)
        if self.cfg.is_encoder_decoder:
            binding.bind_ortvalue_input(contract.ENCODER_ATTENTION_MASK, buffers[contract.ENCODER_ATTENTION_MASK])
            for i, (k, v) in enumerate(self.cross_sets[self.cross_parity]):
                binding.bind_ortvalue_input(contract.cross_key(i), k)
                binding.bind_ortvalue_input(contract.cross_value(i), v)
        binding.bind_ortvalue_output(contract.LOGITS, buffers[contract.LOGITS])
        binding.bind_ortvalue_output(contract.NEXT_IDS, buffers[contract.NEXT_IDS])
        options = self.ort.RunOptions()  # one captured graph per set of bound addresses (-1: no capture)
        options.add_run_config_entry("gpu_graph_id", str(self.graph_count) if self.cuda_graph else "-1")
        self.graph_count += 1
        self.bindings[key] = binding, options
        return binding, options

    def run_one(self, ids, positions):
        """One token per row at slot self.length (logits and next_ids stay in their device buffers).

        ids, positions [B, 1] int64. Raises RefformerError (run_bound) when ONNX Runtime fails.
        """
        buffers = self.buffers
        self.prompt_logits = None  # the last logits are this call's
        buffers[contract.INPUT_IDS].update_inplace(np.ascontiguousarray(ids, dtype=np.int64))
        buffers[contract.POSITION_IDS].update_inplace(np.ascontiguousarray(positions, dtype=np.int64))
        if not self.in_place:
            buffers[contract.WRITE_INDEX].update_inplace(np.array([self.length], dtype=np.int64))
            buffers[contract.ATTENTION_MASK].update_inplace(self.mask)
        run_bound(self.decoder, *self.binding(), graph=f"{self.onnx_dir}/{self.decoder_file}")
        if not self.in_place:
            self.parity = 1 - self.parity
        self.length += 1

    def step(self, ids, positions, attention_mask, logits_to_host=True):
        """Logits [B, T, V] on the host (None with logits_to_host=False after one-token calls). A prompt (T > 1 at
        the start) goes through the reference graph in one call and its cache is moved into the static buffers;
        later tokens run one per call.

        ids, positions [B, T] int64, attention_mask [B, P + T] int64. Raises RefformerError when P + T exceeds the L
        static slots, or (run_bound, make_session) when ONNX Runtime fails; AssertionError when not fed in order (P !=
        the slots written).
        """
        T = ids.shape[1]
        start = attention_mask.shape[1] - T  # P: the slots already written
        assert start == self.length, "the static stepper is fed in order"
        if start + T > self.max_length:
            from refformer.refimpl.errors import RefformerError

            raise RefformerError(f"the static cache holds {self.max_length} positions; export with a larger "
                                 "--static-length or use the reference graph")
        if T > 1 and start == 0:
            return self.prefill(ids, positions, attention_mask)
        logits = np.empty((ids.shape[0], T, self.cfg.vocab_size), np.float32) if logits_to_host else None
        for j in range(T):
            if not self.in_place:  # the in-place graph needs no mask: a row's slots are its real tokens
                self.mask[:, : start + j + 1] = attention_mask[:, : start + j + 1]
            self.run_one(ids[:, j:j + 1], positions[:, j:j + 1])
            if logits_to_host:  # a copy: on the CPU .numpy() is a view of the buffer the next call overwrites
                logits[:, j:j + 1] = self.buffers[contract.LOGITS].numpy()  # [B, 1, V] -> slot j of [B, T, V]
        return logits

    def prefill(self, ids, positions, attention_mask):
        """The prompt pass through decoder.onnx (T tokens in one call), its present cache then moved into the static
        slots: write_prompt_on_host for the in-place graph on the CPU, else write_prompt.

        ids, positions, attention_mask [B, T] int64 -> logits [B, T, V] float32. Raises RefformerError (make_session,
        run_bound) when decoder.onnx cannot be loaded or run; onnxruntime's errors from the prompt writer.
        """
        cfg, (B, T) = self.cfg, ids.shape
        if self.prompt_decoder is None:
            self.prompt_decoder = make_session(f"{self.onnx_dir}/{contract.DECODER_FILE}", self.provider, self.threads)
        names = [o.name for o in self.prompt_decoder.get_outputs()]
        empty = [(self.empty(B), self.empty(B)) for _ in range(cfg.n_decoder_layers)]
        cross = self.cross_sets[self.cross_parity]  # not self.cross: a reorder gathers the rows into cross_sets only
        values = self.run_decoder(self.prompt_decoder, names, ids, positions, attention_mask, empty, cross,
                                  self.src_keep)
        if self.host_cache:
            self.write_prompt_on_host(values, attention_mask)
        else:
            self.write_prompt(values, attention_mask)
        self.mask[:, :T] = attention_mask
        self.length = T
        self.prompt_logits = values[contract.LOGITS].numpy()
        return self.prompt_logits

    def write_prompt_on_host(self, values, attention_mask):
        """The in-place graph's prompt cache on the CPU, where each cache OrtValue is a view of host memory: each
        row's n real tokens (the last n of decoder.onnx's present [B, Hkv, T, Dh]) copied into slots 0 .. n - 1 of
        the caches the graph reads, and nothing else. GroupQueryAttention reads a row's slots only up to its
        position, so slots beyond are never read (what an earlier call left there stays); unlike write_prompt, the
        cost does not grow with the L slots (at L = 2048, B = 8 on the SmolLM shape write_prompt moved 0.75 GB per
        prompt).

        values: run_decoder's outputs; attention_mask [B, T] int64 (left padding). Raises nothing.
        """
        T = attention_mask.shape[1]
        lengths = attention_mask.sum(axis=1)
        same = bool((lengths == T).all())
        for i, pair in enumerate(self.caches[self.parity]):
            for cache, name in zip(pair, (contract.present_key, contract.present_value)):
                present, target = values[name(i)].numpy(), cache.numpy()  # views of the OrtValues' host memory
                if same:
                    target[:, :, :T] = present
                else:
                    for b, n in enumerate(lengths):
                        target[b, :, :n] = present[b, :, T - n:]

    def write_prompt(self, values, attention_mask):
        """The prompt's present caches (run_decoder's outputs) gathered into the idle static set on the device
        (run_prompt_writer), which then becomes the current one: column j to slot j for the masked graphs; for the
        in-place graph each row's real tokens to slots 0 .. n - 1 (its positions), dropping its left padding.

        attention_mask [B, T] int64. Raises onnxruntime's errors from the prompt writer.
        """
        cfg, (B, T), L = self.cfg, attention_mask.shape, self.max_length
        shift = T - attention_mask.sum(axis=1) if self.in_place else np.zeros(B, np.int64)  # left padding per row
        slot = np.arange(L)[None, :] + shift[:, None]
        index = np.where(slot < T, slot, T + np.arange(L)[None, :])  # [B, L] into Concat(present, cache) on axis 2
        presents = [values[name(i)] for i in range(cfg.n_decoder_layers)
                    for name in (contract.present_key, contract.present_value)]
        read, write = self.caches[self.parity], self.caches[1 - self.parity]
        self.run_prompt_writer(presents, [t for pair in read for t in pair], index, [t for pair in write for t in pair])
        self.parity = 1 - self.parity

    def run_prompt_writer(self, presents, caches, index, outs):
        """outs_i = GatherElements(Concat(presents_i, caches_i), index broadcast to [B, H, L, Dh]) on the device.

        presents [B, H, T, Dh], caches and outs [B, H, L, Dh] device tensors, index int64 [B, L]. Raises onnxruntime's
        own errors (it calls run_with_iobinding directly, not through run_bound).
        """
        session = self.tool(prompt_writer_model, len(presents))
        binding = session.io_binding()
        binding.bind_ortvalue_input("index", self.on_device(np.ascontiguousarray(index, dtype=np.int64)))
        for i, (present, cache, out) in enumerate(zip(presents, caches, outs)):
            binding.bind_ortvalue_input(f"present_{i}", present)
            binding.bind_ortvalue_input(f"cache_{i}", cache)
            binding.bind_ortvalue_output(f"y_{i}", out)
        session.run_with_iobinding(binding)

    def step_argmax(self, ids, positions, attention_mask):
        """Greedy fast path: only the in-graph argmax [B] crosses to the host; last_logits() fetches more.

        ids, positions [B, T] int64, attention_mask [B, P + T] int64 -> int64 [B]. Raises as step.
        """
        logits = self.step(ids, positions, attention_mask, logits_to_host=False)
        if logits is not None:  # a prompt pass: its logits are on the host already
            return logits[:, -1].argmax(axis=-1)
        return self.buffers[contract.NEXT_IDS].numpy().copy()

    def last_logits(self):
        """The logits of the last step_argmax call's last position, [B, 1, V] float32 on the host.

        Raises nothing.
        """
        if self.prompt_logits is not None:
            return self.prompt_logits[:, -1:].copy()
        return self.buffers[contract.LOGITS].numpy().copy()

    def reorder(self, rows):
        """Stepper.reorder into the idle buffer set (then flipped), or into a new batch size's set. The in-place
        graph's caches on the CPU are copied on the host, only their written slots (GroupQueryAttention reads no
        other): a beam step then costs what the reference graph's growing cache costs, not the L slots. Fewer rows
        there (finished rows leaving, drops_finished_rows) go to keep_rows: no new set.

        rows: int64 [n]. Raises onnxruntime's own errors (gather_rows calls run_with_iobinding directly, not through
        run_bound).
        """
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if self.drops_finished_rows and len(rows) < self.mask.shape[0]:  # finished rows leave (search_iter)
            return self.keep_rows(rows)
        cross_moves = self.cfg.is_encoder_decoder and self.sources_change(rows)
        old_cache, old_cross = self.caches[self.parity], self.cross_sets[self.cross_parity]
        if cross_moves:
            self.src_keep = self.src_keep[rows]
        if len(rows) != self.mask.shape[0]:  # a new batch size (expanding to beams): that size's buffer set
            self.use_buffers(len(rows), self.shape_key[1])
        else:  # gather into the idle sets, then flip
            self.parity = 1 - self.parity
            if cross_moves:
                self.cross_parity = 1 - self.cross_parity
                self.buffers[contract.ENCODER_ATTENTION_MASK].update_inplace(np.ascontiguousarray(self.src_keep))
        pairs_in = old_cache + (old_cross if cross_moves else [])
        pairs_out = self.caches[self.parity] + (self.cross_sets[self.cross_parity] if cross_moves else [])
        if self.host_cache:  # only the written slots: as the growing cache
            for pair_in, pair_out in zip(old_cache, self.caches[self.parity]):
                for cache_in, cache_out in zip(pair_in, pair_out):  # views of the OrtValues' host memory
                    cache_out.numpy()[:, :, :self.length] = cache_in.numpy()[rows, :, :self.length]
            pairs_in, pairs_out = pairs_in[len(old_cache):], pairs_out[len(old_cache):]
        if pairs_in:
            self.gather_rows([t for pair in pairs_in for t in pair], rows, [t for pair in pairs_out for t in pair])
        self.mask = self.mask[rows]

    def forget_view_bindings(self):
        """Drop the bindings of keep_rows' views (their keys: (rows, source length, VIEWS, parity, cross parity)).
        Raises nothing."""
        for key in [key for key in self.bindings if key[2] == VIEWS]:
            del self.bindings[key]

    def keep_rows(self, rows):
        """reorder to fewer rows where the caches are host memory (drops_finished_rows): rows[i]'s written slots
        (and its cross-attention keys/values and source mask) copied, on the host, into row i of the buffers in use,
        whose first len(rows) rows then serve as the buffers ([n, ...] views of the same memory, bound afresh). No
        buffer set is allocated: as rows finish one by one, a batch of 64 would otherwise allocate (and evict) a set
        per batch size, which cost more than the rows it spared (the bundled model, int8, test split in chunks of
        64). The next start (use_buffers) goes back to whole sets.

        rows: int64 [n], n < the current rows. Raises nothing: NumPy copies on the host.
        """
        n, length = len(rows), self.length
        moved = np.flatnonzero(rows != np.arange(n))
        first = int(moved[0]) if len(moved) else n  # rows before the first finished one stay where they are
        if self.cfg.is_encoder_decoder and self.sources_change(rows):
            self.src_keep = self.src_keep[rows]
            for pair in self.cross_sets[self.cross_parity]:
                for value in pair:  # views of the OrtValues' host memory; rows[...] copies before the write
                    array = value.numpy()
                    array[first:n] = array[rows[first:]]
        for pair in self.caches[self.parity]:
            for value in pair:
                array = value.numpy()
                array[first:n, :, :length] = array[rows[first:], :, :length]

        def view(value):
            return self.on_device(value.numpy()[:n])  # the leading rows: contiguous, the same memory

        if len(self.shape_key) == 2:  # the whole set's memory, kept alive while views of it are bound
            self.view_base = self.sets[self.shape_key]
        self.forget_view_bindings()  # the bindings of the last views
        self.buffers = {name: value if name == contract.WRITE_INDEX else view(value)
                        for name, value in self.buffers.items()}
        self.caches = [[tuple(view(v) for v in pair) for pair in caches] for caches in self.caches]
        self.cross_sets = [[tuple(view(v) for v in pair) for pair in cross] for cross in self.cross_sets]
        self.shape_key = (n, self.shape_key[1], VIEWS)
        if self.cfg.is_encoder_decoder:
            self.buffers[contract.ENCODER_ATTENTION_MASK].update_inplace(np.ascontiguousarray(self.src_keep))
        self.mask = self.mask[rows]
