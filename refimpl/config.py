"""Config: every architecture choice of a model, as stored in the model directory's config.json."""

import dataclasses
import json
import numbers

import numpy as np

from .errors import RefformerError, check_rng, is_finite, physical_memory_bytes

FORMAT_VERSION = 1
FAMILIES = ("encoder-decoder", "decoder-only")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
NORMS = ("layernorm", "rmsnorm")
POSITIONALS = ("sinusoidal", "learned")

# The JSON type and range of every field (Config.__post_init__ checks them all).
POSITIVE_INTS = ("vocab_size", "d_model", "n_heads", "d_ff", "max_positions")
NON_NEGATIVE_INTS = ("n_encoder_layers", "n_decoder_layers", "pad_id", "bos_id", "eos_id", "unk_id")
BOOLS = ("norm_first", "final_norm", "embed_scale", "share_embeddings", "tie_embeddings", "lm_head_bias")
CHOICES = {"family": FAMILIES, "activation": ACTIVATIONS, "norm": NORMS, "positional": POSITIONALS}
NORM_EPS_RANGE = (float(np.finfo(np.float32).tiny), 1.0)  # a zero float32 eps divides by zero on a constant row


@dataclasses.dataclass(frozen=True)
class Config:
    """Architecture of an encoder-decoder or decoder-only Transformer (config.json's fields; frozen).

    D = d_model, H = n_heads, F = d_ff, V = vocab_size, N = max_positions. norm_first=False is the
    original post-LN layer (x = norm(x + f(x))); True is pre-LN (x = x + f(norm(x))),
    like torch's norm_first. final_norm adds a norm after each stack (nn.Transformer has one).
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
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 3

    def __post_init__(self):
        """Check every field's JSON type and range, then that the model fits in memory (check_fits_memory).

        Raises RefformerError naming the field: `norm_first must be true or false, got "false"`.
        """
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, _checked_field(field.name, getattr(self, field.name)))

        def need(ok, what):
            if not ok:
                raise RefformerError(what)

        need(self.d_model % self.n_heads == 0, f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        for name in ("pad_id", "bos_id", "eos_id", "unk_id"):
            value = getattr(self, name)
            need(value < self.vocab_size, f"{name} must be a token id in [0, {self.vocab_size}), got {value}")
        check_fits_memory(self)

    @property
    def head_dim(self):
        """Dh = D / H, the width of one attention head.

        An int. Raises nothing: __post_init__ checked that n_heads divides d_model.
        """
        return self.d_model // self.n_heads

    @property
    def is_encoder_decoder(self):
        """True for family "encoder-decoder", False for "decoder-only".

        Raises nothing.
        """
        return self.family == "encoder-decoder"

    def replace(self, **changes):
        """A copy with some fields changed (validated again). Raises RefformerError for an unknown field."""
        unknown = sorted(set(changes) - {field.name for field in dataclasses.fields(self)})
        if unknown:
            raise RefformerError(f"unknown config keys {unknown}")
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        """The config.json content: a dict of every field, with format_version.

        Raises nothing: the fields were checked at construction.
        """
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data):
        """Read a config.json dict; raises RefformerError for unknown keys, another format_version, or a bad field."""
        if not isinstance(data, dict):
            raise RefformerError(f"a config must be a JSON object, got {_json_type(data)}")
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if type(version) is not int or version != FORMAT_VERSION:  # type(): true == 1 in Python
            raise RefformerError(f"config format_version {_show(version)} is not supported "
                                 f"(expected {FORMAT_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
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
    norm = 2 * D if cfg.norm == "layernorm" else D
    attention = 4 * (D * D + D)
    ffn = D * F + F + F * D + D
    layer = attention + norm + ffn + norm

    def stack(n_layers, cross, own_embedding):
        return ((V * D if own_embedding else 0) + (N * D if cfg.positional == "learned" else 0)
                + n_layers * (layer + (attention + norm if cross else 0)) + (norm if cfg.final_norm else 0))

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
