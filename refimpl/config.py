"""Config: every architecture choice of a model, as stored in the model directory's config.json."""

import dataclasses
import json
import math
import numbers

import numpy as np

from .errors import RefformerError, check_rng, is_finite, physical_memory_bytes

FORMAT_VERSION = 2
FAMILIES = ("encoder-decoder", "decoder-only")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
NORMS = ("layernorm", "rmsnorm")
POSITIONALS = ("sinusoidal", "learned", "none", "relative", "rotary")
SPECIAL_IDS = ("pad_id", "bos_id", "eos_id", "unk_id")

# The JSON type and range of every field (Config.__post_init__ checks them all).
POSITIVE_INTS = ("vocab_size", "d_model", "n_heads", "d_ff", "max_positions", "relative_num_buckets",
                 "relative_max_distance")
NON_NEGATIVE_INTS = ("n_encoder_layers", "n_decoder_layers", "position_offset")
NULLABLE_POSITIVE_INTS = ("n_kv_heads", "head_dim")
NULLABLE_IDS = SPECIAL_IDS  # an id in [0, vocab_size), or null where the model has no such token
BOOLS = ("norm_first", "final_norm", "embed_scale", "share_embeddings", "tie_embeddings", "lm_head_bias",
         "attention_qkv_bias", "attention_out_bias", "ffn_gated", "ffn_bias", "embed_norm")
POSITIVE_NUMBERS = ("rope_theta", "head_scale")
NULLABLE_POSITIVE_NUMBERS = ("attention_scale",)
CHOICES = {"family": FAMILIES, "activation": ACTIVATIONS, "norm": NORMS, "positional": POSITIONALS}
NORM_EPS_RANGE = (float(np.finfo(np.float32).tiny), 1.0)  # a zero float32 eps divides by zero on a constant row
# Format 1 (config.json written before issue 13) has only these fields; the others take their defaults, which are
# the architecture every format-1 model has.
FORMAT_1_FIELDS = ("vocab_size", "d_model", "n_heads", "d_ff", "n_encoder_layers", "n_decoder_layers", "family",
                   "norm_first", "norm", "norm_eps", "final_norm", "activation", "positional", "max_positions",
                   "embed_scale", "share_embeddings", "tie_embeddings", "lm_head_bias", "dropout", *SPECIAL_IDS)


class _Effective:
    """A nullable Config field read as its effective value: null (None) stored as given (config.json keeps it),
    the attribute reads derive(cfg) in its place (head_dim: d_model // n_heads). Config.raw(name) is the stored
    value. The field's default is None."""

    def __init__(self, derive):
        self.derive = derive

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, cfg, owner=None):
        if cfg is None:
            return None  # the dataclass default
        value = cfg.__dict__[self.name]
        return self.derive(cfg) if value is None else value

    def __set__(self, cfg, value):  # frozen: only __init__ and __post_init__ reach this (object.__setattr__)
        cfg.__dict__[self.name] = value


@dataclasses.dataclass(frozen=True, eq=False)
class Config:
    """Architecture of an encoder-decoder or decoder-only Transformer (config.json's fields; frozen).

    D = d_model, H = n_heads, F = d_ff, V = vocab_size, N = max_positions. norm_first=False is the
    original post-LN layer (x = norm(x + f(x))); True is pre-LN (x = x + f(norm(x))),
    like torch's norm_first. final_norm adds a norm after each stack (nn.Transformer has one).

    The fields after unk_id describe the Hugging Face families (docs/DESIGN.md; their defaults are the
    architecture above): Hkv = n_kv_heads (grouped-query attention; null = H), Dh = head_dim (null = D / H),
    attention_scale (null = 1 / sqrt(Dh)), attention_qkv_bias / attention_out_bias, ffn_gated
    (fc2(act(fc1(x)) * fc_up(x))), ffn_bias, positional "none" / "relative" (T5 buckets: relative_num_buckets,
    relative_max_distance) / "rotary" (rope_theta), position_offset (learned rows = position + offset, BART's 2),
    embed_norm (a norm after the embeddings, per stack), head_scale (multiplies the decoder output before the LM
    head). n_kv_heads, head_dim and attention_scale read as their effective values (cfg.head_dim is always an
    int); to_dict keeps null where null was given. pad_id, bos_id, eos_id, unk_id may be null (no such token).
    Construction raises RefformerError naming the field for a bad type or range, n_heads not dividing d_model,
    a special id outside the vocabulary, or a model too large for this machine's memory.
    """

    vocab_size: int = 64
    d_model: int = 16
    n_heads: int = 2
    d_ff: int = 32
    n_encoder_layers: int = 2
    n_decoder_layers: int = 2
    family: str = "encoder-decoder"
    norm_first: bool = False
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    final_norm: bool = True
    activation: str = "relu"
    positional: str = "sinusoidal"
    max_positions: int = 512
    embed_scale: bool = True
    share_embeddings: bool = True
    tie_embeddings: bool = True
    lm_head_bias: bool = False
    dropout: float = 0.1
    pad_id: int | None = 0
    bos_id: int | None = 1
    eos_id: int | None = 2
    unk_id: int | None = 3
    n_kv_heads: int | None = _Effective(lambda cfg: cfg.n_heads)
    head_dim: int | None = _Effective(lambda cfg: cfg.d_model // cfg.n_heads)
    attention_scale: float | None = _Effective(lambda cfg: 1.0 / math.sqrt(cfg.head_dim))
    attention_qkv_bias: bool = True
    attention_out_bias: bool = True
    ffn_gated: bool = False
    ffn_bias: bool = True
    position_offset: int = 0
    relative_num_buckets: int = 32
    relative_max_distance: int = 128
    rope_theta: float = 10000.0
    embed_norm: bool = False
    head_scale: float = 1.0

    def __post_init__(self):
        """Check every field's JSON type and range, then that the model fits in memory (check_fits_memory).

        Raises RefformerError naming the field: `norm_first must be true or false, got "false"`,
        `n_kv_heads=3 must divide n_heads=4`.
        """
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _checked_field(field.name, self.raw(field.name)))

        def need(ok, what):
            if not ok:
                raise RefformerError(what)

        if self.raw("head_dim") is None:
            need(self.d_model % self.n_heads == 0, f"n_heads={self.n_heads} must divide d_model={self.d_model} "
                                                   f"(or give head_dim)")
        need(self.n_heads % self.n_kv_heads == 0, f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        # transformers' T5Attention._relative_position_bucket divides by log(max_distance / max_exact), max_exact =
        # num_buckets // 2 (causal) or // 4 (bidirectional): both must be >= 1 and max_distance above them
        least = 4 if self.is_encoder_decoder else 2
        need(self.relative_num_buckets >= least, f"relative_num_buckets={self.relative_num_buckets} must be at least "
                                                 f"{least} (T5's bucket formula divides by its quarter or half)")
        need(self.relative_max_distance > self.relative_num_buckets // 2,
             f"relative_max_distance={self.relative_max_distance} must exceed relative_num_buckets // 2 = "
             f"{self.relative_num_buckets // 2} (T5's bucket formula takes the log of their ratio)")
        need(self.relative_max_distance < 2**63, f"relative_max_distance={self.relative_max_distance} must be below "
                                                 f"2**63 (the bucket formula takes its logarithm as a float)")
        need(self.positional != "rotary" or self.head_dim % 2 == 0,
             f'positional "rotary" needs an even head_dim (it rotates pairs of features), got {self.head_dim}')
        need(self.position_offset == 0 or self.positional == "learned",
             f'position_offset={self.position_offset} needs positional "learned" (it shifts the learned table\'s rows)')
        for name in SPECIAL_IDS:
            value = getattr(self, name)
            need(value is None or value < self.vocab_size,
                 f"{name} must be a token id in [0, {self.vocab_size}) or null, got {value}")
        check_fits_memory(self)

    def raw(self, name):
        """The stored value of field name, None where config.json has null (getattr gives n_kv_heads, head_dim and
        attention_scale as their effective values instead). Raises RefformerError for an unknown field."""
        if name not in {field.name for field in dataclasses.fields(self)}:
            raise RefformerError(f"unknown config key {name!r}")
        return self.__dict__[name]

    def _key(self):
        return tuple(self.raw(field.name) for field in dataclasses.fields(self))

    def __eq__(self, other):
        """Equal when every stored field is (null and its effective value differ: to_json differs too)."""
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    @property
    def fill_id(self):
        """The id that fills a position holding no token (a finished row of generate, the padding of stacked rows):
        pad_id, else eos_id (transformers' generate pads finished rows with eos when a model has no pad token), else
        0 (a model with neither; the masks, not this id, say which positions are real). An int. Raises nothing."""
        for value in (self.pad_id, self.eos_id):
            if value is not None:
                return value
        return 0

    @property
    def is_encoder_decoder(self):
        """True for family "encoder-decoder", False for "decoder-only".

        Raises nothing.
        """
        return self.family == "encoder-decoder"

    def replace(self, **changes):
        """A copy with some fields changed (validated again). Raises RefformerError for an unknown field."""
        fields = [field.name for field in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise RefformerError(f"unknown config keys {unknown}")
        return type(self)(**{**{name: self.raw(name) for name in fields}, **changes})  # null stays null

    def to_dict(self):
        """The config.json content: a dict of every field, with format_version.

        Raises nothing: the fields were checked at construction.
        """
        return {"format_version": FORMAT_VERSION, **{field.name: self.raw(field.name) for field in
                                                     dataclasses.fields(self)}}

    @classmethod
    def from_dict(cls, data):
        """Read a config.json dict of format 2, or of format 1 (the fields before issue 13; the new ones take their
        defaults); raises RefformerError for unknown keys, another format_version, or a bad field."""
        if not isinstance(data, dict):
            raise RefformerError(f"a config must be a JSON object, got {_json_type(data)}")
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if type(version) is not int or version not in (1, FORMAT_VERSION):  # type(): true == 1 in Python
            raise RefformerError(f"config format_version {_show(version)} is not supported "
                                 f"(expected 1 or {FORMAT_VERSION})")
        known = set(FORMAT_1_FIELDS) if version == 1 else {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RefformerError(f"unknown config keys {unknown}")
        return cls(**data)

    def to_json(self):
        """to_dict() as indented JSON text with sorted keys and a final newline (config.json's bytes).

        Raises nothing: the fields were checked at construction (JSON types only).
        """
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


# ---------------------------------------------------------------------------- field checks


def _show(value):
    """A value as config.json would spell it: "false" (a string), true, null, NaN, 2.0."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _json_type(value):
    if value is None:
        return "null"
    if isinstance(value, (bool, np.bool_)):
        return "a boolean"
    if isinstance(value, numbers.Number):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "a list"
    return "an object" if isinstance(value, dict) else type(value).__name__


def _checked_field(name, value):
    """value as the plain Python type of field name (int, float, bool, str); RefformerError naming the field."""
    def fail(what):
        raise RefformerError(f"{name} must be {what}, got {_show(value)}")

    is_bool = isinstance(value, (bool, np.bool_))
    if value is None and name in NULLABLE_POSITIVE_INTS + NULLABLE_IDS + NULLABLE_POSITIVE_NUMBERS:
        return None
    if name in NULLABLE_IDS:
        if is_bool or not isinstance(value, numbers.Integral) or int(value) < 0:
            fail("an integer >= 0 (a token id) or null")
        return int(value)
    if name in NULLABLE_POSITIVE_INTS:
        if is_bool or not isinstance(value, numbers.Integral) or int(value) < 1:
            fail("a positive integer or null")
        return int(value)
    if name in BOOLS:
        if not is_bool:
            fail("true or false")
        return bool(value)
    if name in CHOICES:
        if not isinstance(value, str) or value not in CHOICES[name]:
            fail("one of " + ", ".join(f'"{choice}"' for choice in CHOICES[name]))
        return value
    if name in POSITIVE_INTS or name in NON_NEGATIVE_INTS:
        least = 1 if name in POSITIVE_INTS else 0
        if is_bool or not isinstance(value, numbers.Integral) or int(value) < least:
            fail("a positive integer" if least else "an integer >= 0")
        return int(value)
    if is_bool or not isinstance(value, numbers.Real) or not is_finite(value):
        fail("a finite number")
    value = float(value)
    if name == "norm_eps" and not NORM_EPS_RANGE[0] <= value <= NORM_EPS_RANGE[1]:
        fail(f"a small positive number in [{NORM_EPS_RANGE[0]:.3g}, {NORM_EPS_RANGE[1]:g}]")
    if name == "dropout" and not 0.0 <= value < 1.0:
        fail("in [0, 1)")
    if name in NULLABLE_POSITIVE_NUMBERS and not value > 0.0:
        fail("a finite number > 0 or null")
    if name in POSITIVE_NUMBERS and not value > 0.0:
        fail("a finite number > 0")
    return value


# ---------------------------------------------------------------------------- memory


def check_config(cfg, rng=None):
    """Raises RefformerError unless cfg is a Config and rng is None or a numpy.random.Generator."""
    if not isinstance(cfg, Config):
        raise RefformerError(f"cfg must be a refformer Config, got {type(cfg).__name__}")
    check_rng("rng", rng)


def parameter_count(cfg):
    """How many numbers the parameters of cfg hold (the sum over model.param_shapes), counted without building them.

    Raises RefformerError unless cfg is a Config.
    """
    check_config(cfg)
    D, F, V, N = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.max_positions
    H, Hkv, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    norm = 2 * D if cfg.norm == "layernorm" else D
    attention = (2 * D * H * Dh + 2 * D * Hkv * Dh + (H * Dh + 2 * Hkv * Dh if cfg.attention_qkv_bias else 0)
                 + (D if cfg.attention_out_bias else 0))  # q, out [D, H Dh]; k, v [D, Hkv Dh]; biases
    n_in = 2 if cfg.ffn_gated else 1  # fc1 (and fc_up) [D, F]
    ffn = n_in * D * F + F * D + ((n_in * F + D) if cfg.ffn_bias else 0)
    layer = attention + norm + ffn + norm
    positions = (N + cfg.position_offset) * D if cfg.positional == "learned" else 0
    per_stack = (positions + (norm if cfg.embed_norm else 0) + (norm if cfg.final_norm else 0)
                 + (cfg.relative_num_buckets * H if cfg.positional == "relative" else 0))

    def stack(n_layers, cross, own_embedding):
        return (V * D if own_embedding else 0) + per_stack + n_layers * (layer + (attention + norm if cross else 0))

    count = stack(cfg.n_decoder_layers, cfg.is_encoder_decoder, True)
    if cfg.is_encoder_decoder:
        count += stack(cfg.n_encoder_layers, False, not cfg.share_embeddings)
    return count + (0 if cfg.tie_embeddings else D * V) + (V if cfg.lm_head_bias else 0)


def parameter_bytes(cfg, dtype=np.float32):
    """Bytes of cfg's parameters in dtype.

    Raises RefformerError unless cfg is a Config and dtype a numpy dtype.
    """
    return parameter_count(cfg) * _dtype(dtype).itemsize


def _dtype(dtype):
    try:
        return np.dtype(dtype)
    except TypeError:
        raise RefformerError(f"dtype must be a numpy dtype such as np.float32, got {dtype!r}") from None


def format_bytes(n_bytes):
    """A byte count (a number) for messages: '3.2 GiB' from 1 GiB up, else '12.5 MiB' (3 significant digits).

    Raises nothing for a number (TypeError for anything else).
    """
    return f"{n_bytes / (1 << 30):.3g} GiB" if n_bytes >= 1 << 30 else f"{n_bytes / (1 << 20):.3g} MiB"


def check_fits_memory(cfg, dtype=np.float32, copies=1):
    """Refuse, before anything is allocated, a model whose parameters cannot fit in this machine's memory.

    Counts copies x the parameters in dtype (a trainer holds weights, gradients and optimizer moments) plus
    the sinusoidal table [max_positions, D] in float64 that an export embeds. No array is allocated.
    Raises RefformerError naming the sizes to lower.
    """
    check_config(cfg)
    if isinstance(copies, bool) or not isinstance(copies, numbers.Integral) or copies < 1:
        raise RefformerError(f"copies must be a positive integer, got {copies!r}")
    weights = copies * parameter_bytes(cfg, dtype)
    table = cfg.max_positions * cfg.d_model * 8 if cfg.positional == "sinusoidal" else 0
    available = physical_memory_bytes()
    if weights + table > available:
        copies_of = f"{copies} copies of " if copies != 1 else ""
        parts = [f"{format_bytes(weights)} for {copies_of}its {parameter_count(cfg):,} parameters in "
                 f"{np.dtype(dtype).name}"]
        if table:
            parts.append(f"{format_bytes(table)} for its sinusoidal position table [max_positions, d_model]")
        raise RefformerError(
            f"this model needs {format_bytes(weights + table)} of memory ({', '.join(parts)}), more than this "
            f"machine's {format_bytes(available)}: lower d_model ({cfg.d_model}), d_ff ({cfg.d_ff}), vocab_size "
            f"({cfg.vocab_size}), max_positions ({cfg.max_positions}) or the number of layers")
