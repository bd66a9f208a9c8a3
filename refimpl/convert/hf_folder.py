"""A Hugging Face folder beyond its weights: the tokenizer (or Marian's two) and the generation settings, written
into a refformer model folder next to what from_hf reads (`refformer import-hf`).

    import_hf(hf_dir, out_dir)             from_hf + tokenizers + generation settings -> a model folder; the notices
    hf_tokenizers(hf_dir, cfg)             (source tokenizer, target tokenizer or None, notices)
    marian_tokenizer(spm_file, vocab)      one side of a Marian folder as a tokenizers.Tokenizer over vocab.json's ids
    generation_settings(hf_dir, hf_config) {"source": file, "settings": {name: value}} as transformers reads them
    not_applied(settings, cfg)             the settings `refformer generate` does not apply

Files written beside io.save's config.json, model.safetensors and tokenizer.json (each with io.atomic_write):
- tokenizer_target.json: Marian only, the target side's tokenizer (tokenizer.json is the source side);
- generation.json: {"format_version": 1, "source": "generation_config.json" | "config.json",
  "settings": {Hugging Face GenerationConfig name: value}}.

Tokenizers: the folder's own tokenizer.json is taken as it is. A folder with sentencepiece files only is converted
with transformers (AutoTokenizer, whose converters live in transformers.convert_slow_tokenizer; needs sentencepiece
and protobuf), imported lazily. Marian (opus-mt) folders hold source.spm and target.spm over one vocab.json, and
transformers has no fast Marian tokenizer: each side becomes a Unigram tokenizer with the side's sentencepiece pieces
and scores at vocab.json's ids (what MarianTokenizer computes: sentencepiece pieces looked up in vocab.json), </s>
appended. Pieces of vocab.json that the side's model lacks are kept at their ids under a name no text can produce
(NUL + piece), so segmentation follows the side's model alone.
"""

import json
from pathlib import Path

from ..errors import RefformerError, check
from ..io import TOKENIZER_FILE, atomic_write, check_tokenizer, read_json, save
from ..tree import flatten
from .hf import family_of, from_hf, has_file, read_hf_config

TARGET_TOKENIZER_FILE = "tokenizer_target.json"
GENERATION_FILE = "generation.json"
GENERATION_FORMAT_VERSION = 1
FOREIGN_PREFIX = "\x00"  # a vocab.json piece the side's sentencepiece model lacks: kept at its id, never matched
INSTALL_HINT = "pip install transformers sentencepiece protobuf"

# The GenerationConfig settings that change which tokens come out (transformers 5.24's names), and the value at
# which refformer's runtime already behaves the same way (None: no such value; it is always listed).
RUNTIME_DEFAULTS = {
    "num_beams": 1, "do_sample": False, "num_return_sequences": 1, "length_penalty": 1.0, "early_stopping": False,
    "repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_new_tokens": 0, "min_length": 0,
    "max_length": None, "max_new_tokens": None, "num_beam_groups": 1, "diversity_penalty": 0.0,
    "encoder_repetition_penalty": 1.0, "encoder_no_repeat_ngram_size": 0, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "sequence_bias": None, "exponential_decay_length_penalty": None, "renormalize_logits": False,
    "remove_invalid_values": False, "guidance_scale": None, "force_words_ids": None, "constraints": None,
    "max_time": None, "stop_strings": None,
}
SPECIAL_SETTINGS = ("decoder_start_token_id", "bos_token_id", "eos_token_id", "pad_token_id")
SAMPLING_SETTINGS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "typical_p": 1.0, "min_p": None,
                     "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}  # read only when do_sample is true
# Keys that never change the tokens (bookkeeping, what generate returns, caching).
IGNORED_SETTINGS = {"transformers_version", "_from_model_config", "use_cache", "return_dict_in_generate",
                    "output_scores", "output_logits", "output_attentions", "output_hidden_states",
                    "cache_implementation", "cache_config", "return_legacy_cache", "compile_config",
                    "disable_compile", "is_assistant", "num_assistant_tokens", "num_assistant_tokens_schedule",
                    "assistant_confidence_threshold", "prompt_lookup_num_tokens", "max_matching_ngram_size",
                    "dola_layers", "low_memory", "token_healing", "watermarking_config"}
GENERATION_KEYS = tuple(SPECIAL_SETTINGS) + tuple(RUNTIME_DEFAULTS) + tuple(SAMPLING_SETTINGS)


# ---------------------------------------------------------------------------- the whole folder


def import_hf(hf_dir, out_dir):
    """Write the refformer model folder out_dir from the Hugging Face folder hf_dir: config.json and
    model.safetensors (from_hf, the checkpoint's dtype kept: float64 stays float64, else float32), tokenizer.json
    (and tokenizer_target.json for Marian) when the folder has a tokenizer, generation.json always. Files of an
    earlier model in out_dir that this import does not write (tokenizer.json, tokenizer_target.json) are removed.

    Returns (cfg, notices): notices are one-line strings, one per thing the user should know (the generation
    settings the runtime does not apply yet, a folder without a tokenizer, Marian pieces vocab.json lacks).
    Raises RefformerError as from_hf, hf_tokenizers and generation_settings do, and for a folder io.save cannot
    write. The caller checks out_dir first (runtime/import_cli.py).
    """
    hf_config = read_hf_config(hf_dir)
    family_of(hf_config)
    cfg, params = from_hf(hf_dir)
    source, target, notices = hf_tokenizers(hf_dir, cfg)
    generation = generation_settings(hf_dir, hf_config)
    target_json = None if target is None else target.to_str()
    if target_json is not None:  # io.save checks the source side (tokenizer.json) the same way
        check_tokenizer(cfg, target_json, f"the target tokenizer ({TARGET_TOKENIZER_FILE})")
    dtype = next(iter(flatten(params).values())).dtype  # from_hf's: float64 or float32 throughout
    save(out_dir, cfg, params, tokenizer=source, dtype=dtype)
    out = Path(out_dir)
    if source is None:
        _remove(out / TOKENIZER_FILE)
    if target is None:
        _remove(out / TARGET_TOKENIZER_FILE)
    else:
        atomic_write(out / TARGET_TOKENIZER_FILE, lambda tmp: Path(tmp).write_text(target_json, encoding="utf-8"))
    text = json.dumps({"format_version": GENERATION_FORMAT_VERSION, **generation}, indent=2) + "\n"
    atomic_write(out / GENERATION_FILE, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    missing = not_applied(generation["settings"], cfg)
    if missing:
        notices.append(f"refformer generate does not apply these generation settings of the checkpoint (kept in "
                       f"{GENERATION_FILE}): " + ", ".join(f"{key}={json.dumps(value)}" for key, value in missing))
    return cfg, notices


def _remove(path):
    if path.is_file() or path.is_symlink():
        path.unlink()


# ---------------------------------------------------------------------------- tokenizers


def hf_tokenizers(hf_dir, cfg):
    """(source, target, notices) for the Hugging Face folder: source a tokenizers.Tokenizer or None (no tokenizer
    files), target the Marian target side or None, notices a list of one-line strings.

    Order: tokenizer.json as it is; Marian's source.spm + target.spm + vocab.json (marian_tokenizer, target side
    over target_vocab.json when the folder has one); other sentencepiece or vocabulary files through transformers'
    AutoTokenizer. Raises RefformerError for an unreadable tokenizer file, a folder whose sentencepiece files need
    transformers, sentencepiece or protobuf that are missing (naming what to install), or a converted tokenizer
    transformers refuses.
    """
    from ..io import read_tokenizer

    folder = Path(hf_dir)
    if has_file(folder / TOKENIZER_FILE):
        return read_tokenizer(folder / TOKENIZER_FILE), None, []
    if has_file(folder / "source.spm") or has_file(folder / "target.spm"):
        return _marian_tokenizers(folder, cfg.vocab_size)
    slow = [name for name in ("spiece.model", "tokenizer.model", "sentencepiece.bpe.model", "vocab.json")
            if has_file(folder / name)]
    if not slow:
        return None, None, [f"{hf_dir} has no tokenizer (tokenizer.json or sentencepiece files): the model folder has "
                            "none (golden and model_forward do not need one; generate does)"]
    tokenizer = _auto_tokenizer(folder, slow)
    return tokenizer, None, []


def _needs(files):
    return RefformerError(f"converting {files} to tokenizer.json needs transformers, sentencepiece and protobuf: "
                          f"{INSTALL_HINT}")


def _auto_tokenizer(folder, files):
    """The tokenizers.Tokenizer transformers' AutoTokenizer builds from the folder's slow-tokenizer files."""
    names = ", ".join(files)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise _needs(names) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as error:  # transformers raises many types (ImportError without sentencepiece or protobuf)
        raise RefformerError(f"transformers cannot build a tokenizer from {folder} ({names}): "
                             f"{' '.join(str(error).split())[:300]} ({INSTALL_HINT})") from None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    check(backend is not None, f"transformers has no tokenizers-backed tokenizer for {folder} ({names}, "
                               f"{type(tokenizer).__name__}): convert it to tokenizer.json first")
    return backend


def _marian_tokenizers(folder, vocab_size):
    """(source, target, notices) of a Marian folder: source.spm, target.spm and vocab.json (target_vocab.json for
    the target side when present, as MarianTokenizer's separate_vocabs). An id of a vocabulary outside the model's
    vocab_size is refused before any table is built (one of 10**9 took minutes and gigabytes)."""
    for name in ("source.spm", "target.spm", "vocab.json"):
        check((folder / name).is_file(), f"{folder} has Marian's sentencepiece files but no {name}")
    vocab = _read_vocab(folder / "vocab.json")
    target_vocab = _read_vocab(folder / "target_vocab.json") if (folder / "target_vocab.json").is_file() else vocab
    for name, ids in (("vocab.json", vocab), ("target_vocab.json", target_vocab)):
        piece, top = max(ids.items(), key=lambda item: item[1])
        check(top < vocab_size, f"{folder / name} gives {piece!r} the id {top}, outside the model's vocab_size "
                                f"{vocab_size}")
    notices = []
    source, lacking = marian_tokenizer(folder / "source.spm", vocab)
    target, target_lacking = marian_tokenizer(folder / "target.spm", target_vocab)
    for name, pieces in (("source.spm", lacking), ("target.spm", target_lacking)):
        if pieces:
            notices.append(f"{len(pieces)} pieces of {name} are not in the vocabulary ({', '.join(pieces[:4])}"
                           f"{' ...' if len(pieces) > 4 else ''}): text that sentencepiece splits into them gets "
                           "other ids than MarianTokenizer's (which maps them to <unk>)")
    return source, target, notices


def _read_vocab(path):
    vocab = read_json(path, "a Marian folder needs it")
    check(isinstance(vocab, dict) and vocab and all(isinstance(key, str) and isinstance(value, int)
                                                    and not isinstance(value, bool) and value >= 0
                                                    for key, value in vocab.items()),
          f"{path} must map pieces to token ids >= 0")
    check(len(set(vocab.values())) == len(vocab), f"{path} gives two pieces the same id")
    return vocab


def marian_tokenizer(spm_file, vocab, eos="</s>", unk="<unk>", pad="<pad>"):
    """(tokenizers.Tokenizer, lacking) for one side of a Marian folder: MarianTokenizer's ids (its _tokenize: a
    leading >>lang<< code kept whole, the side's sentencepiece pieces looked up in vocab, </s> appended) as a Unigram
    model at vocab's ids. lacking: the side's pieces vocab does not hold (sorted), whose text tokenizes differently.

    Unigram vocabulary [max id + 1]: a piece of the sentencepiece model keeps its score; eos, unk, pad and the
    >>lang<< codes are special tokens; any other piece of vocab is NUL + piece at the lowest score (never matched,
    and the lowest score keeps the unknown-character penalty, min score - 10, where sentencepiece has it). Ids not in
    vocab hold NUL + "<unused id>". Decoding reads a NUL-prefixed piece as its text.

    Where the ids differ from MarianTokenizer's (seen, not fixed): a run of characters the side's model does not know
    is one sentencepiece piece of that text, which MarianTokenizer looks up in vocab (another side's piece may match)
    and this tokenizer maps to <unk>; a >>lang<< code after the start of a text is kept whole here and split by
    sentencepiece there; the lacking pieces above. Raises RefformerError when vocab has no unk or eos token, the
    file is not a sentencepiece model or has user-defined or byte-fallback pieces, or transformers/protobuf is
    missing.
    """
    try:
        from tokenizers import AddedToken, decoders, processors
        from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf
        proto = import_protobuf().ModelProto()
    except ImportError:
        raise _needs(spm_file.name) from None
    check(unk in vocab and eos in vocab, f"{spm_file.parent / 'vocab.json'} has no {unk} or no {eos}")
    try:
        proto.ParseFromString(Path(spm_file).read_bytes())
    except Exception as error:  # protobuf's DecodeError
        raise RefformerError(f"{spm_file} is not a sentencepiece model: {error}") from None
    kinds = {piece.type for piece in proto.pieces}
    check(not kinds & {4, 6}, f"{spm_file} has user-defined or byte-fallback pieces, which refformer does not "
                              "convert for Marian yet")
    scores = {piece.piece: piece.score for piece in proto.pieces if piece.type == 1}  # NORMAL pieces
    check(scores, f"{spm_file} has no pieces")
    lowest = min(scores.values())
    codes = [piece for piece in vocab if piece.startswith(">>") and piece.endswith("<<")]
    specials = [token for token in (eos, unk, pad) if token in vocab]
    table = [(f"{FOREIGN_PREFIX}<unused {i}>", lowest) for i in range(max(vocab.values()) + 1)]
    for piece, i in vocab.items():
        if piece in scores:
            table[i] = (piece, scores[piece])
        elif piece in specials or piece in codes:
            table[i] = (piece, 0.0)
        else:
            table[i] = (FOREIGN_PREFIX + piece, lowest)
    proto.trainer_spec.unk_id = vocab[unk]
    tokenizer = SpmConverter.build_tokenizer_from_spm_proto(proto, table)  # legacy: each text chunk gets a "▁"
    # decoding as MarianTokenizer.convert_tokens_to_string, a piece of the other side read as its text (but a
    # trailing space kept: tokenizers' Strip(right=1) panics on an empty text)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(FOREIGN_PREFIX, ""), tokenizer.decoder])
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    tokenizer.add_tokens([AddedToken(code, normalized=False) for code in codes])
    tokenizer.post_processor = processors.TemplateProcessing(single=["$A", eos], pair=["$A", "$B", eos],
                                                             special_tokens=[(eos, vocab[eos])])
    return tokenizer, sorted(set(scores) - set(vocab))


# ---------------------------------------------------------------------------- generation settings


def generation_settings(hf_dir, hf_config):
    """{"source": file name, "settings": {name: value}} as transformers' generate reads them: generation_config.json
    when the folder has one (every key but bookkeeping ones: IGNORED_SETTINGS), else config.json's GENERATION_KEYS.
    Raises RefformerError for a generation_config.json that is not a JSON object."""
    file = Path(hf_dir) / "generation_config.json"
    if file.is_file():
        data = read_json(file, "")
        check(isinstance(data, dict), f"{file} must hold a JSON object")
        return {"source": file.name,
                "settings": {key: value for key, value in data.items() if key not in IGNORED_SETTINGS}}
    return {"source": "config.json",
            "settings": {key: hf_config[key] for key in GENERATION_KEYS if key in hf_config}}


# the settings `refformer generate` applies from generation.json (runtime.generator.checkpoint_options reads these
# lists), under transformers' GenerationConfig names, which are GenerationOptions' field names
APPLIED_SETTINGS = ("max_new_tokens", "max_length", "min_new_tokens", "num_beams", "num_return_sequences",
                    "length_penalty", "early_stopping", "repetition_penalty", "no_repeat_ngram_size", "do_sample",
                    "forced_bos_token_id", "forced_eos_token_id", "bad_words_ids", "decoder_start_token_id")
APPLIED_SAMPLING_SETTINGS = ("temperature", "top_k", "top_p")  # applied when the checkpoint samples


def not_applied(settings, cfg):
    """[(name, value)] of settings `refformer generate` does not apply: those outside APPLIED_SETTINGS (and
    APPLIED_SAMPLING_SETTINGS when do_sample is true) whose value differs from the runtime's default
    (RUNTIME_DEFAULTS, SAMPLING_SETTINGS), early_stopping "never", several forced eos ids, an eos_token_id list
    whose other ids config.json's one eos_id does not cover, a pad_token_id other than config.json's, and any key
    refformer does not know. Raises nothing."""
    sampling = settings.get("do_sample") is True
    missing = []
    for key, value in settings.items():
        if value is None or key == "bos_token_id":  # the decoder start is decoder_start_token_id (applied)
            continue
        if key in APPLIED_SETTINGS or (sampling and key in APPLIED_SAMPLING_SETTINGS):
            same = not (key == "early_stopping" and not isinstance(value, bool)) and not (
                key == "forced_eos_token_id" and isinstance(value, list) and len(value) > 1)
        elif key == "eos_token_id":
            same = value == cfg.eos_id or value == [cfg.eos_id]
        elif key == "pad_token_id":
            same = value == cfg.pad_id
        elif key in RUNTIME_DEFAULTS:
            same = value == RUNTIME_DEFAULTS[key] or value == []
        elif key in SAMPLING_SETTINGS:
            same = not sampling or value == SAMPLING_SETTINGS[key]
        else:
            same = False
        if not same:
            missing.append((key, value))
    return missing
