"""Config: every architecture choice of a model, as stored in the model directory's config.json."""

import dataclasses
import json

from .errors import RefformerError

FORMAT_VERSION = 1
FAMILIES = ("encoder-decoder", "decoder-only")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
NORMS = ("layernorm", "rmsnorm")
POSITIONALS = ("sinusoidal", "learned")


@dataclasses.dataclass(frozen=True)
class Config:
    """Architecture of an encoder-decoder or decoder-only Transformer.

    D = d_model, H = n_heads, F = d_ff, V = vocab_size. norm_first=False is the
    original post-LN layer (x = norm(x + f(x))); True is pre-LN (x = x + f(norm(x))),
    like torch's norm_first. final_norm adds a norm after each stack (nn.Transformer has one).
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
        def need(ok, what):
            if not ok:
                raise RefformerError(f"invalid config: {what}")

        need(self.family in FAMILIES, f"family must be one of {FAMILIES}, got {self.family!r}")
        need(self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        need(self.norm in NORMS, f"norm must be one of {NORMS}, got {self.norm!r}")
        need(self.positional in POSITIONALS, f"positional must be one of {POSITIONALS}, got {self.positional!r}")
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "max_positions"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"{name} must be a positive integer, got {value!r}")
        for name in ("n_encoder_layers", "n_decoder_layers"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 0, f"{name} must be a non-negative integer, got {value!r}")
        need(self.d_model % self.n_heads == 0,
             f"n_heads={self.n_heads} must divide d_model={self.d_model}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}")
        for name in ("pad_id", "bos_id", "eos_id", "unk_id"):
            value = getattr(self, name)
            need(isinstance(value, int) and 0 <= value < self.vocab_size,
                 f"{name} must be a token id in [0, {self.vocab_size}), got {value!r}")

    @property
    def head_dim(self):
        """Dh = D / H."""
        return self.d_model // self.n_heads

    @property
    def is_encoder_decoder(self):
        return self.family == "encoder-decoder"

    def replace(self, **changes):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self):
        """The config.json content (with format_version)."""
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data):
        """Read a config.json dict; unknown keys and a newer format_version are errors."""
        data = dict(data)
        version = data.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise RefformerError(f"config format_version {version} is not supported (expected {FORMAT_VERSION})")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RefformerError(f"invalid config: unknown keys {unknown}")
        return cls(**data)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
