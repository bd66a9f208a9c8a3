"""refformer.runtime.Generator: text in, text out, on ONNX Runtime (CUDA when it can, else CPU).

    from refformer.runtime import Generator
    gen = Generator()                                   # the bundled German->English model
    gen.generate(["Das Wetter ist schön."])             # -> ["The weather is nice."]
    for piece in gen.stream("Ich habe Hunger."): print(piece, end="")
"""

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np

from refformer.export import contract
from refformer.export.session import PROVIDER_OPTIONS, resolve_provider
from refformer.refimpl.convert.hf_folder import APPLIED_SAMPLING_SETTINGS, APPLIED_SETTINGS
from refformer.refimpl.errors import RefformerError, is_integer
from refformer.refimpl.generate import GenerationOptions, generate, search_iter
from refformer.refimpl.io import CONFIG_FILE, TOKENIZER_FILE, check_tokenizer_matches, load_config, read_tokenizer
from refformer.refimpl.model import left_pad
from refformer.refimpl.training import tokenizer as tok
from refformer.refimpl.training.batching import pad_rows

from .errors import InputTooLong, shown
from .stepper import OrtStepper, StaticOrtStepper

VARIANTS = contract.VARIANT_OPTIONS  # the Generator's and generate --variant's choices


def note(message):
    """One notice or warning line on stderr; nothing when stderr is closed (print(file=None) would use stdout).

    Raises nothing.
    """
    if sys.stderr is not None:
        print(message, file=sys.stderr)


def default_model_dir():
    """The German->English model shipped inside the package (a Path). Raises RefformerError when it is missing."""
    path = Path(__file__).parent / "models" / "de-en"
    if not (path / CONFIG_FILE).is_file():
        raise RefformerError(f"the bundled model is missing from {path}: reinstall refformer or pass --model DIR")
    return path


def ensure_export(model_dir, dtype="fp32", static_length=None, fused_attention=False):
    """A fresh export set of model_dir that has the graphs asked for, exported now when there is none.

    Looks in MODEL_DIR/onnx/ and the per-user cache for the set named export_name(dtype, static_length,
    fused_attention), then for any other set of the same dtype that holds those graphs (e.g. fp32-static128-fused
    serves the reference decoder). A set is fresh when its manifest matches the model's hashes and every file its
    sha256. Otherwise the set is exported into default_export_dir (MODEL_DIR/onnx/NAME; the per-user cache for the
    bundled model or a read-only model folder), replacing a stale or damaged export of that name only. Leftovers
    of killed exports are cleaned up first. Raises RefformerError when the export fails."""
    from refformer.export.export import export_model
    from refformer.export.folder import (
        EXPORTS_FOLDER,
        check_files,
        default_export_dir,
        export_locations,
        export_name,
        is_stale,
        read_manifest,
        recover_leftovers,
        remove_legacy_leftovers,
    )

    model_dir = Path(model_dir)
    name = export_name(dtype, static_length, fused_attention)
    local, cached = export_locations(model_dir, name)
    for parent in (model_dir / EXPORTS_FOLDER, cached.parent):
        recover_leftovers(parent)
    remove_legacy_leftovers(model_dir)

    # the contrib-op graphs an export with these options writes for this model (a Llama's set has no
    # decoder_fused or decoder_static_mha: asking for them re-exported it at every Generator)
    wanted = [contract.decoder_graph(variant) for variant in
              contract.exported_variants(load_config(model_dir), static_length, fused_attention)
              if variant != contract.STATIC]

    def fresh(onnx_dir):
        try:
            manifest = read_manifest(onnx_dir)
            graphs = manifest["graphs"]
            static = graphs.get(contract.decoder_graph(contract.STATIC), {})
            ok = (manifest.get("dtype") == dtype and not is_stale(model_dir, manifest)
                  and (static_length is None or static.get("max_length") == static_length)
                  and all(graph in graphs for graph in wanted))
            if ok:
                check_files(onnx_dir, manifest)
            return ok
        except (RefformerError, OSError, AttributeError, TypeError):
            return False

    candidates = [local, cached]
    for parent in (local.parent, cached.parent):  # other sets of this dtype that hold the graphs too
        try:  # a folder this user cannot read (another user's cache) holds no candidates
            candidates += sorted(folder for folder in parent.iterdir()
                                 if folder.name.startswith(f"{dtype}-") and folder.name != name)
        except OSError:
            pass
    for candidate in candidates:
        if fresh(candidate):
            return candidate
    target = default_export_dir(model_dir, dtype, static_length, fused_attention)
    note(f"notice: exporting {shown(model_dir)} to {shown(target)} ({dtype}) ...")
    export_model(model_dir, target, dtype=dtype, static_length=static_length, fused_attention=fused_attention)
    return target


def capped_threads(threads):
    """ONNX Runtime's intra-op thread count: threads (an int >= 1, checked by the caller) capped to os.cpu_count();
    None stays None (ONNX Runtime's default). The one cap of Generator and generate --threads.

    Raises nothing.
    """
    return None if threads is None else min(int(threads), os.cpu_count() or 1)


# generation.json settings (transformers' GenerationConfig names) that are GenerationOptions fields of the same name
CHECKPOINT_OPTIONS = APPLIED_SETTINGS  # the generation.json settings generate applies (import-hf names the others)
SAMPLING_OPTIONS = APPLIED_SAMPLING_SETTINGS  # read only when the checkpoint samples
TRANSFORMERS_NEW_TOKENS = 20  # transformers' generate without max_length or max_new_tokens
TRANSFORMERS_TOP_K = 50  # GenerationConfig's top_k, which a checkpoint that samples uses unless it sets its own


def checkpoint_options(model_dir, cfg):
    """The decoding options of an imported checkpoint (generation.json, written by import-hf) as GenerationOptions
    fields: the settings CHECKPOINT_OPTIONS names (and SAMPLING_OPTIONS when it samples, with transformers' top_k of
    50 unless it sets one), and transformers' 20 new tokens when it sets no length, so that generate without options
    gives transformers' model.generate(input_ids).
    A setting the search cannot take (early_stopping "never", several forced eos ids) is left out; the import named
    such settings. {} for a folder without generation.json (refformer's own models keep their defaults).
    Raises RefformerError for a generation.json that cannot be read."""
    from refformer.refimpl.convert.hf_folder import GENERATION_FILE

    path = Path(model_dir) / GENERATION_FILE
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8")).get("settings", {})
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as error:
        raise RefformerError(f"cannot read {shown(path)}: {error}") from None
    if not isinstance(settings, dict):
        raise RefformerError(f"{shown(path)}: \"settings\" must be a JSON object")
    names = CHECKPOINT_OPTIONS + (SAMPLING_OPTIONS if settings.get("do_sample") is True else ())
    options = {name: settings[name] for name in names if settings.get(name) is not None}
    if isinstance(options.get("forced_eos_token_id"), list):
        ids = options.pop("forced_eos_token_id")
        if len(ids) == 1:
            options["forced_eos_token_id"] = ids[0]
    if not isinstance(options.get("early_stopping", False), bool):
        options.pop("early_stopping")
    if not cfg.is_encoder_decoder:
        options.pop("decoder_start_token_id", None)
    if "max_length" not in options and "max_new_tokens" not in options:
        options["max_new_tokens"] = TRANSFORMERS_NEW_TOKENS
    if options.get("do_sample") is True and "top_k" not in settings:
        options["top_k"] = TRANSFORMERS_TOP_K
    return options


def model_tokenizer(model_dir):
    """The model folder's tokenizer.json (padding and truncation off). Its special tokens are checked against
    config.json's ids by the caller (an imported model's are where its checkpoint has them: BART's <s> is 0 and
    <pad> 1). Raises RefformerError for a missing or invalid file."""
    path = Path(model_dir) / TOKENIZER_FILE
    if not path.is_file():
        raise RefformerError(f"{path} not found: train one with 'refformer tokenizer train', or, for a model imported "
                             "from Hugging Face, import its folder again with its tokenizer files")
    return read_tokenizer(path)


def tokenizer_affixes(tokenizer):
    """(prefix, suffix): the special ids the tokenizer's own post-processor puts around a text (BART's <s> and </s>,
    T5's </s>, Llama's <s>, none for GPT-2), read from one encoded probe text; ([], []) where it adds none or in a
    way that is not around the text. Raises nothing for a tokenizer that encodes the probe."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start], full[start + len(plain):]
    return [], []


LIBRARY_BATCH = 64  # generate() and generate_ids() run many texts this many at a time (outputs are per row, so the
# same): 20,000 texts at once were refused for their caches' 24 GiB, with advice to lower a batch size they lack

def auto_variant(cfg, on_cuda, dtype):
    """The decoders variant="auto" tries, fastest first, for the provider and dtype: only variants that compute cfg's
    model with kernels for dtype there (contract.variant_runs), so the probe's fallback and its notice are for a
    graph that fails to run, never for one that cannot compute the model.

    CUDA: decoder_static_fused in fp16 (GroupQueryAttention has fp16 CUDA kernels only, and needs a head size
    that is a multiple of 8, of 16 with rotary), then decoder_static_mha (contrib ops, fp32 too; no grouped-query,
    rotary or relative attention), then decoder_static (standard ops only: every model). An imported Llama / Qwen2
    gets (static_fused, static) in fp16 and (static,) in fp32, T5 (relative bias) (static,), BART / Marian
    static_mha first in fp32. CPU: decoder_static_fused first for a decoder-only rotary model in fp32 that it
    computes (Llama / Qwen2 / SmolLM imports with a head size that is a multiple of 16: one GroupQueryAttention node
    with rotary per layer in place of the reference graph's standard-op rotary and attention, measured faster on the
    SmolLM-135M shape, benchmarks/RESULTS.md generate_imported_cpu), then the reference graph; in int8,
    decoder_static_fused first for an encoder-decoder that it computes (head size a multiple of 8, no relative
    attention), then the reference graph: since its stepper drops finished rows on the CPU
    (StaticOrtStepper.keep_rows) and runs the encoder on the unpadded source, it was faster than the int8 reference
    graph over the bundled model's whole test split in all four cells (chunks of 16 and 64, 1 and 2 threads: 1.09
    against 1.15 s and 1.14 against 1.16 s at 1 thread, 1.47 against 2.22 s and 1.18 against 1.48 s at 2;
    benchmarks/RESULTS.md generate_cpu_variants, static_fused drops finished rows), as it already was per step at
    B 1 and on the Marian-base shape. Its export set, int8-static<max_positions>-fused, takes longer to make on
    first use (about 5 against 1.3 s on the bundled model). The reference graph alone for every other model and
    dtype: fp32 static_fused won three of those four cells and tied the fourth (1.53 against 1.52 s, 1 thread,
    chunks of 64), so refformer's own fp32 models stay on it; int8 decoder-only models were not measured.

    Returns a tuple of contract variant names, never empty. Raises nothing: cfg is a checked Config.
    """
    if not on_cuda:
        if (dtype == "fp32" and not cfg.is_encoder_decoder and cfg.positional == "rotary"
                and contract.variant_runs(cfg, contract.STATIC_FUSED, dtype, contract.CPU_PROVIDER)):
            return (contract.STATIC_FUSED, contract.REFERENCE)
        if (dtype == "int8" and cfg.is_encoder_decoder
                and contract.variant_runs(cfg, contract.STATIC_FUSED, dtype, contract.CPU_PROVIDER)):
            return (contract.STATIC_FUSED, contract.REFERENCE)
        return (contract.REFERENCE,)
    return tuple(variant for variant in (contract.STATIC_FUSED, contract.STATIC_MHA, contract.STATIC)
                 if contract.variant_runs(cfg, variant, dtype, contract.CUDA_PROVIDER))


def runtime_provider(provider, dtype):
    """The ONNX Runtime provider a Generator of dtype runs on: resolve_provider(provider)'s (CUDA when it can be
    loaded, for auto), except for a quantized dtype (int8), whose graphs run on the CPU only
    (contract.QUANTIZED_PROVIDERS): auto is the CPU then. provider and dtype are checked (Generator.check_arguments).
    Raises RefformerError for provider "cuda" with a quantized dtype, or resolve_provider's errors."""
    if dtype not in contract.QUANTIZED_DTYPES:
        return resolve_provider(provider)
    if provider == "cuda":
        raise RefformerError(f"{dtype} graphs run on the CPU only (ONNX Runtime's CUDA provider has no "
                             "DynamicQuantizeLinear kernel): use the cpu or auto provider, or fp16 on CUDA")
    return contract.QUANTIZED_PROVIDERS[0]


class Generator:
    """Generation from a model directory (default: the bundled model) on ONNX Runtime.

    The model is exported first when its export set (onnx/<dtype>[-static<L>][-fused], or the per-user cache for
    the bundled and read-only models) is missing or stale. provider: auto, cuda or cpu. dtype: fp32, fp16 or int8.

    Generator(...) raises RefformerError for a bad argument, a missing or broken model folder, or an export that fails
    (see __init__).
    """

    def __init__(self, model_dir=None, provider="auto", dtype="fp32", threads=None, truncate=False, variant="auto",
                 static_length=None, cuda_graph=None):
        """variant: "reference" (decoder.onnx, growing cache), "fused" (decoder_fused.onnx: the same with ONNX
        Runtime's MultiHeadAttention op), "static" (decoder_static.onnx: fixed buffers, in-graph argmax,
        CUDA-graph replay on CUDA), "static_mha" (decoder_static_mha.onnx: static with contrib attention and fused
        norms), "static_fused" (decoder_static_fused.onnx: GroupQueryAttention writing the cache in place) or
        "auto" (see auto_variant: on CUDA static_fused in fp16, then static_mha, then static, each only where it
        computes the model, with a probed fallback and a notice; on the CPU static_fused for a decoder-only rotary
        fp32 model or an int8 encoder-decoder it computes, else the reference graph).
        static_length defaults to max_positions (on the CPU the in-place cache's unread slots are never touched).
        threads: ONNX Runtime's intra-op threads (an integer >= 1; more than os.cpu_count() is capped to it).
        dtype: "fp32" (the default: the path exact against refimpl and transformers), "fp16", or "int8" (the fp32
        graphs with int8 weights, export/quantize.py: float32 in and out, ids close to fp32's but not exact; the CPU
        only, so provider auto is the CPU).

        Raises RefformerError for a bad argument, a missing or broken model folder, or an export that fails; for
        dtype int8 with provider cuda."""
        self.check_arguments(model_dir, provider, dtype, threads, truncate, variant, static_length, cuda_graph)
        threads = capped_threads(threads)
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        self.cfg = load_config(self.model_dir)
        self.checkpoint_options = checkpoint_options(self.model_dir, self.cfg)
        # before any export notice: a model the graphs cannot run is one line. An imported checkpoint may lack pad,
        # bos or eos ids: its tokenizer adds its own specials, its decoder start comes with its settings, and
        # finished rows are filled with Config.fill_id
        contract.check_exportable(self.cfg, ids=not self.checkpoint_options)
        self.tokenizer = model_tokenizer(self.model_dir)
        check_tokenizer_matches(self.cfg, self.tokenizer, f"{self.model_dir}/{TOKENIZER_FILE}", whose="config.json's")
        self.provider = runtime_provider(provider, dtype)
        if variant not in VARIANTS:
            raise RefformerError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        on_cuda = self.provider == contract.CUDA_PROVIDER
        self.dtype, self.threads = dtype, threads
        cuda_graph = on_cuda if cuda_graph is None else cuda_graph
        if variant != "auto":
            self.variant, self.stepper = variant, self.make_stepper(variant, static_length, cuda_graph)
        else:
            choices = auto_variant(self.cfg, on_cuda, dtype)
            for number, choice in enumerate(choices):
                last = number == len(choices) - 1
                try:
                    self.variant, self.stepper = choice, self.make_stepper(choice, static_length, cuda_graph)
                    if not last:
                        self.probe()
                    break
                except Exception as error:  # RefformerError from export or loading; onnxruntime's own from a run
                    if last:
                        raise
                    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
                    note(f"notice: the {choice} decoder cannot run here ({reason}); trying {choices[number + 1]}")
        # an imported checkpoint's inputs get the special tokens its tokenizer adds, as transformers' users pass them
        self.affixes = tokenizer_affixes(self.tokenizer) if self.checkpoint_options else None
        self.truncate = truncate
        self.collected_warnings = None  # a list: truncation warnings go there instead of stderr (the CLI's one line)

    @staticmethod
    def check_arguments(model_dir, provider, dtype, threads, truncate, variant, static_length, cuda_graph):
        """RefformerError for a constructor argument of the wrong type or range (before anything is loaded)."""
        if model_dir is not None and not isinstance(model_dir, (str, os.PathLike)):
            raise RefformerError(f"model_dir must be a folder path, got {type(model_dir).__name__}")
        if not isinstance(provider, str) or provider not in PROVIDER_OPTIONS:
            raise RefformerError(f"provider must be auto, cuda or cpu, got {provider!r}")
        if not isinstance(variant, str) or variant not in VARIANTS:
            raise RefformerError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
        if not isinstance(dtype, str) or dtype not in contract.EXPORT_DTYPES:
            raise RefformerError(f"dtype must be {', '.join(contract.EXPORT_DTYPES[:-1])} or "
                                 f"{contract.EXPORT_DTYPES[-1]}, got {dtype!r}")
        if threads is not None and not (is_integer(threads) and threads >= 1):
            raise RefformerError(f"threads must be an integer >= 1, got {threads!r}")
        if not isinstance(truncate, bool):
            raise RefformerError(f"truncate must be True or False, got {truncate!r}")
        if static_length is not None and not (is_integer(static_length) and static_length >= 1):
            raise RefformerError(f"static_length must be an integer >= 1, got {static_length!r}")
        if cuda_graph is not None and not isinstance(cuda_graph, bool):
            raise RefformerError(f"cuda_graph must be True, False or None, got {cuda_graph!r}")

    def probe(self):
        """Six decoder calls on a one-token input: a graph that loads but cannot run (a kernel this GPU lacks, a
        failed CUDA-graph capture, which ONNX Runtime makes on a graph id's second run, or its replay) fails here
        rather than in the user's first call. The masked static graphs alternate between two graph ids (ping-pong
        buffers) and the in-place one keeps one, so six calls run every id plainly, capture it and replay it.

        Raises what the stepper's ONNX Runtime calls raise; __init__ catches it and tries the next variant.
        """
        cfg = self.cfg
        token = next(i for i in (cfg.eos_id, cfg.bos_id, 0) if i is not None)  # any id will do; a model may lack some
        inputs = {"src_ids" if cfg.is_encoder_decoder else "prompt_ids": np.array([[token]])}
        start = next(i for i in (self.checkpoint_options.get("decoder_start_token_id"), cfg.bos_id, token)
                     if i is not None)
        options = GenerationOptions(max_new_tokens=6, min_new_tokens=6,  # eos banned: every call runs
                                    decoder_start_token_id=start)
        generate(cfg, None, options=options, stepper=self.stepper, **inputs)

    def make_stepper(self, variant, static_length, cuda_graph):
        """Export what the variant needs (when missing or stale) and open its stepper. Raises RefformerError for an
        unknown variant or one this model or provider cannot run."""
        if not isinstance(variant, str) or variant not in VARIANTS[1:]:
            raise RefformerError(f"variant must be one of {', '.join(VARIANTS[1:])}, got {variant!r}")
        dtype, threads = self.dtype, self.threads
        float_dtype = contract.graph_dtype(dtype)  # the graphs' inputs and caches: an int8 set's are float32
        refusal = contract.variant_refusal(self.cfg, variant, dtype, self.provider)
        if refusal:  # before any export
            raise RefformerError(refusal)
        if variant in contract.STATIC_VARIANTS:
            static_length = static_length or self.cfg.max_positions
            if static_length > self.cfg.max_positions:  # before the export notice, in the API's own terms
                raise RefformerError(f"static_length must be at most the model's max_positions "
                                     f"({self.cfg.max_positions}), got {static_length}")
            fused = variant != contract.STATIC
            self.onnx_dir = ensure_export(self.model_dir, dtype, static_length, fused_attention=fused)
            return StaticOrtStepper(self.cfg, self.onnx_dir, float_dtype, self.provider, threads, cuda_graph=cuda_graph,
                                    decoder_file=contract.graph_file(contract.decoder_graph(variant)))
        fused = variant == contract.FUSED
        self.onnx_dir = ensure_export(self.model_dir, dtype, fused_attention=fused)
        return OrtStepper(self.cfg, self.onnx_dir, float_dtype, self.provider, threads,
                          decoder_file=contract.graph_file(contract.decoder_graph(variant)))

    # ------------------------------------------------------------ text <-> ids
    def encode_rows(self, texts, names=None):
        """Texts -> token rows, each checked: an empty text is an error, and so is one of more than max_positions - 1
        tokens, unless truncate is set (then it is cut, with a warning). names: how messages call each text
        (default "input 1", "input 2", ...). Raises RefformerError for a text that is not a str, or is empty, gives no
        tokens or is too long."""
        cfg = self.cfg
        texts = self.text_list(texts)
        if names is None:
            names = [f"input {number + 1}" for number in range(len(texts))]
        if (not isinstance(names, (list, tuple)) or len(names) != len(texts)
                or not all(isinstance(n, str) for n in names)):
            raise RefformerError(f"names must be {len(texts)} strings, one per text")
        for name, text in zip(names, texts):
            if not isinstance(text, str):
                raise RefformerError(f"{name} must be a str, got {type(text).__name__}")
            if not text.strip():
                raise RefformerError(f"{name} is empty")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise RefformerError(f"{name} is not valid Unicode (it has a lone surrogate)") from None
        # room for eos (source) or bos (prompt), or an imported tokenizer's specials, and at least one new token
        limit = cfg.max_positions - max(1, sum(map(len, self.affixes or ())))
        # A text far longer than limit tokens can cover is refused (or cut) before the tokenizer sees it
        most = tok.most_characters(self.tokenizer, limit + 1, self.longest_token())
        long_texts = {number: len(text) for number, text in enumerate(texts) if len(text) > most}
        for number in long_texts:
            if not self.truncate:
                raise InputTooLong(f"{names[number]} has {len(texts[number])} characters, far more than the model's "
                                   f"{limit} tokens hold")
        if long_texts:
            texts = [text[:most] if number in long_texts else text for number, text in enumerate(texts)]
        try:
            rows = tok.encode(self.tokenizer, texts)
        except RefformerError as error:  # the tokenizer panicked: name the text when there is one
            if len(names) == 1:
                raise RefformerError(f"{names[0]}: {error}") from None
            raise
        for number, (name, row) in enumerate(zip(names, rows)):
            if not row:  # a tokenizer.json whose normalizer deletes the text: the model would see only eos
                raise RefformerError(f"{name} gives no tokens: the tokenizer's normalizer removes all of it")
            if len(row) > limit:
                if not self.truncate:
                    raise InputTooLong(f"{name} has {len(row)} tokens, more than the model's {limit}")
                size = f"{len(row)}" if number not in long_texts else f"its {long_texts[number]} characters"
                warning = f"warning: {name} truncated from {size} to {limit} tokens"
                if self.collected_warnings is None:
                    note(warning)
                else:
                    self.collected_warnings.append(warning)
                rows[number] = row[:limit]
        return rows

    def longest_token(self):
        """tokenizer.longest_token of this model's tokenizer, computed once.

        An int, in characters. Raises nothing.
        """
        if getattr(self, "_longest_token", None) is None:
            self._longest_token = tok.longest_token(self.tokenizer)
        return self._longest_token

    @staticmethod
    def text_list(texts):
        """texts as a list of texts: one str, or a list or tuple of them (RefformerError for anything else)."""
        if isinstance(texts, str):
            return [texts]
        if not isinstance(texts, (list, tuple)):
            raise RefformerError(f"texts must be a str or a list of str, got {type(texts).__name__}")
        return list(texts)

    def pad_inputs(self, rows):
        """Token rows (from encode_rows) -> the padded arrays the search takes (sources + eos right-padded, or bos +
        prompt left-padded; for an imported checkpoint the specials its tokenizer adds, tokenizer_affixes). Raises
        RefformerError for rows that are not lists of token ids in the vocabulary."""
        cfg = self.cfg
        if not isinstance(rows, (list, tuple)) or not rows:
            raise RefformerError("rows must be a non-empty list of token id lists (from encode_rows)")
        for number, row in enumerate(rows):
            if not isinstance(row, (list, tuple)) or not all(
                    is_integer(t) and 0 <= t < cfg.vocab_size
                    for t in row):
                raise RefformerError(f"row {number} must be a list of token ids in [0, {cfg.vocab_size})")
        rows = [list(row) for row in rows]
        if self.affixes is not None:  # an imported checkpoint: its tokenizer's specials around the text
            prefix, suffix = self.affixes
            rows = [prefix + row + suffix for row in rows]
            if cfg.is_encoder_decoder:
                ids, keep = pad_rows(rows, cfg.fill_id)
                return {"src_ids": ids, "src_mask": keep.astype(np.int64)}
            ids, keep, _ = left_pad(rows, cfg.fill_id)
            return {"prompt_ids": ids, "prompt_mask": keep}
        if cfg.is_encoder_decoder:
            ids, keep = pad_rows([row + [cfg.eos_id] for row in rows], cfg.pad_id)
            return {"src_ids": ids, "src_mask": keep.astype(np.int64)}
        ids, keep, _ = left_pad([[cfg.bos_id] + row for row in rows], cfg.pad_id)
        return {"prompt_ids": ids, "prompt_mask": keep}

    def encode_inputs(self, texts):
        """Texts -> the padded arrays the search takes: pad_inputs(encode_rows(texts)).

        Returns {"src_ids", "src_mask"} [B, S] int64 (encoder-decoder, right-padded) or {"prompt_ids", "prompt_mask"}
        [B, T] int64 (left-padded). Raises RefformerError (encode_rows) for a text that is not a str, is empty, gives no
        tokens or is too long without truncate.
        """
        return self.pad_inputs(self.encode_rows(texts))

    def decode(self, ids):
        """The text of generated ids (eos and other special tokens skipped); RefformerError for ids that are not token
        ids of the vocabulary."""
        ids = list(ids) if isinstance(ids, (list, tuple, np.ndarray)) else None
        if ids is None or not all(is_integer(t) for t in ids):
            raise RefformerError("ids must be a list of integer token ids")
        return tok.decode(self.tokenizer, [t for t in ids if t != self.cfg.eos_id])

    # ------------------------------------------------------------ generation
    def generate_ids(self, texts, options=None):
        """Per input, num_return_sequences lists of generated ids (eos kept): refimpl's search on the ONNX stepper.
        options: a GenerationOptions (default: greedy). Raises RefformerError for bad texts or options."""
        options = self.check_options(options)
        rows = self.encode_rows(texts)
        return [ids for start in range(0, len(rows), LIBRARY_BATCH)
                for ids in self.search_rows(rows[start:start + LIBRARY_BATCH], options)]

    def generate(self, texts, **options):
        """Texts -> generated texts: a list of str, or of lists of str when num_return_sequences > 1; one str (or list)
        for one str. [] gives []. options: GenerationOptions' fields; without seed, sampling draws a new seed every
        call. Each text's output depends only on it, the options and the seed, not on the other texts; many texts
        run LIBRARY_BATCH at a time. Raises RefformerError for bad texts (not a str, empty, too long) or options."""
        options = GenerationOptions.from_keywords(**options)
        single = isinstance(texts, str)
        if not single and isinstance(texts, (list, tuple)) and not texts:
            return []
        rows = self.encode_rows(texts)  # every text is checked before any is generated
        outputs = [output for start in range(0, len(rows), LIBRARY_BATCH)
                   for output in self.generate_rows(rows[start:start + LIBRARY_BATCH], options)]
        return outputs[0] if single else outputs

    def check_options(self, options):
        """options (default GenerationOptions()) with the checkpoint's settings (checkpoint_options) in every field
        options leaves at GenerationOptions' default. Raises RefformerError for anything but a GenerationOptions or
        None, or settings the options refuse."""
        if options is None:
            options = GenerationOptions()
        if not isinstance(options, GenerationOptions):
            raise RefformerError(f"options must be a GenerationOptions, got {type(options).__name__}")
        fields = {field.name: field.default for field in dataclasses.fields(GenerationOptions)}
        unset = {name: value for name, value in self.checkpoint_options.items()
                 if getattr(options, name) == fields[name]}
        if "max_length" in unset and options.max_new_tokens is not None:  # a given max_new_tokens wins
            del unset["max_length"]
        if "max_new_tokens" in unset and options.max_length is not None:
            del unset["max_new_tokens"]
        try:
            return dataclasses.replace(options, **unset) if unset else options
        except RefformerError as error:  # a setting the user never typed: name the file it came from
            raise RefformerError(f"{shown(self.model_dir / 'generation.json')}, the checkpoint's generation "
                                 f"settings: {error}") from None

    def search_rows(self, rows, options):
        """Token rows -> per row, num_return_sequences lists of generated ids. The static decoders hold a fixed
        number of slots, which a decoder-only batch of prompts of several lengths can overrun (the left padding
        takes slots); such a batch runs as one batch per prompt length (the same outputs: rows are independent).
        Raises RefformerError for rows that are not a list of token id lists."""
        if not isinstance(rows, (list, tuple)):
            raise RefformerError(f"rows must be a list of token id lists (from encode_rows), got {type(rows).__name__}")
        if not rows:
            return []
        cfg = self.cfg
        if (self.variant in contract.STATIC_VARIANTS and not cfg.is_encoder_decoder
                and len({len(row) for row in rows}) > 1):
            lengths = [len(row) for row in rows]
            longest, shortest = max(lengths), min(lengths)
            budget = cfg.max_positions - shortest if options.max_new_tokens is None else options.max_new_tokens
            if 1 + longest + budget > self.stepper.max_length:
                outputs = [None] * len(rows)
                for length in sorted(set(lengths)):
                    group = [number for number, row_length in enumerate(lengths) if row_length == length]
                    for number, result in zip(group, self.search_rows([rows[i] for i in group], options)):
                        outputs[number] = result
                return outputs
        return generate(cfg, None, options=options, stepper=self.stepper, **self.pad_inputs(rows))

    def generate_rows(self, rows, options):
        """Token rows (from encode_rows, which the CLI runs line by line) -> generated texts, as generate.
        Raises RefformerError for bad rows or options."""
        return [output for output, _ in self.generate_rows_and_ids(rows, options)]

    def generate_rows_and_ids(self, rows, options):
        """Token rows -> per row (text, ids): the generated text and its token ids (eos kept when generated; neither
        the decoder start token nor the prompt), or with num_return_sequences > 1 (texts, ids), one entry per
        sequence, best first. What generate --json writes as "output" and "ids". Raises RefformerError for bad rows
        or options."""
        options = self.check_options(options)
        results = []
        for candidates in self.search_rows(rows, options):
            texts = [self.decode(ids) for ids in candidates]
            ids = [[int(t) for t in sequence] for sequence in candidates]
            results.append((texts[0], ids[0]) if options.num_return_sequences == 1 else (texts, ids))
        return results

    def stream(self, text, **options):
        """Yield pieces of text as tokens are produced (beam search yields its best result at the end).
        Raises RefformerError (at the first piece) for a bad text or options."""
        options = self.check_options(GenerationOptions.from_keywords(**options))
        if not isinstance(text, str):
            raise RefformerError(f"text must be a str, got {type(text).__name__}")
        if options.num_beams > 1 or options.num_return_sequences > 1:
            # the options are checked: searched as they are (generate would take a checkpoint's num_return_sequences
            # back in, and yield a list)
            best = self.search_rows(self.encode_rows([text]), dataclasses.replace(options, num_return_sequences=1))
            yield self.decode(best[0][0])
            return
        shown, tokens = "", []
        for next_ids in search_iter(self.stepper, self.cfg, options, **self.encode_inputs([text])):
            token = int(next_ids[0])
            if token == self.cfg.eos_id:
                break
            tokens.append(token)
            text_so_far = self.decode(tokens)
            if text_so_far.startswith(shown) and not text_so_far.endswith("\ufffd"):  # whole characters only
                yield text_so_far[len(shown):]
                shown = text_so_far
        final = self.decode(tokens)
        if final != shown:
            yield final[len(shown):] if final.startswith(shown) else final


# ------------------------------------------------------------ refformer eval --dtype: the exported graphs measured

def evaluate_on_runtime(data_dir, model_dir=None, split="valid", *, dtype="fp32", provider="auto", threads=None,
                        max_sentences=None, max_tokens=4096):
    """`refformer eval --dtype`: refimpl.training.setup.evaluate_split's measurement, with the export set of dtype
    (fp32, fp16 or int8) on ONNX Runtime doing the work through a Generator (exported on first use, provider and
    decoder variant chosen as generate chooses them): the loss is the mean cross-entropy (nats per target token) of the
    decoder graph fed each whole target (teacher forcing, as refimpl's evaluate feeds model_forward), and BLEU/chrF
    (sacrebleu, encoder-decoder models) score greedy decoding through the same graphs: refimpl's translate_examples
    (batches by source length) with the Generator's stepper behind the search (an int8 row's output can depend on
    its batch; fp32's and fp16's do not).

    Returns (cfg, result) with evaluate_split's keys (split, examples, skipped_too_long, tokens, loss, perplexity, bleu,
    chrf, seconds, notes), and "dtype", "provider", "variant" and "hypotheses" (the greedy texts in the split's
    order; None for decoder-only models). Raises RefformerError for what Generator raises (a bad dtype, int8 asked
    for on CUDA, a failed export), a missing or unreadable split (load_examples), and running out of memory.
    """
    import math
    import time

    from refformer.refimpl.io import load_tokenizer
    from refformer.refimpl.loss import cross_entropy_forward
    from refformer.refimpl.model import left_padded_positions
    from refformer.refimpl.training.batching import make_batches
    from refformer.refimpl.training.data import SUFFIX, not_a_file, split_path
    from refformer.refimpl.training.evaluate import translate_examples
    from refformer.refimpl.training.setup import load_examples, text_decoder

    generator = Generator(model_dir, provider=provider, dtype=dtype, threads=threads)
    cfg, stepper = generator.cfg, generator.stepper
    path = split_path(data_dir, split, cfg.family)
    if not_a_file(path):
        raise RefformerError(f"{path} {not_a_file(path)}: {cfg.family} models are evaluated on "
                             f"{split}{SUFFIX[cfg.family]}, a regular file")
    tokenizer = load_tokenizer(generator.model_dir)
    examples, references, dropped = load_examples(data_dir, split, cfg.family, tokenizer, cfg, max_sentences)
    start = time.perf_counter()
    total, n_tokens, notes = 0.0, 0, []
    try:
        for batch in make_batches(examples, max_tokens=max_tokens, pad_id=cfg.pad_id, shuffle_ties=False):
            stepper.start(batch.src_ids, batch.src_mask, batch.n_rows)
            keep = batch.tgt_mask.astype(np.int64)  # [B, T]: right-padded targets, bos first
            logits = stepper.step(batch.tgt_ids, left_padded_positions(keep), keep)  # [B, T, V]
            loss, _ = cross_entropy_forward(logits.astype(np.float64), batch.labels, ignore_id=cfg.pad_id)
            tokens = int((batch.labels != cfg.pad_id).sum())
            total += float(loss) * tokens
            n_tokens += tokens
        loss = total / max(n_tokens, 1)
        hypotheses = bleu = chrf = None
        if cfg.is_encoder_decoder and examples:
            hypotheses = translate_examples(cfg, None, examples, text_decoder(tokenizer), max_tokens, stepper=stepper)
            try:
                import sacrebleu
            except ImportError:
                notes.append("BLEU/chrF skipped: sacrebleu is not installed (pip install 'refformer[train]')")
            else:
                bleu = sacrebleu.corpus_bleu(hypotheses, [list(references)]).score
                chrf = sacrebleu.corpus_chrf(hypotheses, [list(references)]).score
    except MemoryError:
        raise RefformerError("out of memory while evaluating: lower --max-tokens") from None
    if not math.isfinite(loss):
        notes.append(f"the loss is {loss}: the model's outputs overflow (its weights are too large); retrain it")
    perplexity = math.exp(min(loss, 700.0)) if not math.isnan(loss) else math.nan
    return cfg, {"split": split, "examples": len(examples), "skipped_too_long": dropped, "tokens": n_tokens,
                 "loss": loss, "perplexity": perplexity, "bleu": bleu, "chrf": chrf,
                 "seconds": round(time.perf_counter() - start, 2), "notes": notes, "dtype": dtype,
                 "provider": generator.provider, "variant": generator.variant, "hypotheses": hypotheses}
