"""How a run trains: TrainOptions, and the number checks its fields (and the other training modules) use."""

import dataclasses

from ..errors import check, is_integer, is_real
from ..errors import is_finite as finite


def is_finite(value):
    """True for a real number (errors.is_real) that is neither NaN nor infinite, as a float: an integer too large
    for a float (10**400) is not finite here (errors.is_finite).

    Raises nothing: a non-number is not finite.
    """
    return is_real(value) and finite(value)


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """How to train (the architecture, dropout included, is the Config).

    lr is the peak of the inverse-square-root schedule; clip is the global gradient norm
    (0 = off); eval_every / save_every count steps (0 = only at the end); eval_sentences
    is how many validation sentences are greedily decoded for BLEU/chrF (0: none); time_limit is
    in seconds of this session (None = none), checked between steps after the session's first.
    Every field is checked for type and range: RefformerError naming it.
    """

    steps: int = 1000
    max_tokens: int = 4096
    lr: float = 7e-4
    warmup: int = 400
    betas: tuple = (0.9, 0.98)
    eps: float = 1e-9
    weight_decay: float = 0.01
    clip: float = 1.0
    label_smoothing: float = 0.1
    eval_every: int = 0
    eval_sentences: int = 100
    save_every: int = 0
    seed: int = 0
    time_limit: float | None = None

    # Options a resumed run may change; every other one shapes the trajectory and must match.
    RESUMABLE_CHANGES = ("steps", "eval_every", "eval_sentences", "save_every", "time_limit")

    def __post_init__(self):
        """Raises RefformerError naming the first field that is of the wrong type or out of range."""
        def need(name, ok, what):
            check(ok, f"{name} must be {what}, got {getattr(self, name)!r}")

        for name, least in (("steps", 1), ("max_tokens", 1), ("warmup", 0), ("eval_every", 0),
                            ("eval_sentences", 0), ("save_every", 0), ("seed", 0)):
            value = getattr(self, name)
            need(name, is_integer(value) and value >= least,
                 "a positive integer" if least else "an integer >= 0")
        need("lr", is_finite(self.lr) and self.lr > 0, "a positive finite number")
        need("eps", is_finite(self.eps) and self.eps > 0, "a positive finite number")
        need("weight_decay", is_finite(self.weight_decay) and self.weight_decay >= 0, "a finite number >= 0")
        need("clip", is_finite(self.clip) and self.clip >= 0, "a finite number >= 0 (0 turns clipping off)")
        need("label_smoothing", is_real(self.label_smoothing) and 0.0 <= self.label_smoothing < 1.0,
             "a number in [0, 1)")
        need("time_limit", self.time_limit is None or (is_finite(self.time_limit) and self.time_limit > 0),
             "a positive finite number of seconds, or None for no limit")
        betas = self.betas
        need("betas", isinstance(betas, (tuple, list)) and len(betas) == 2
             and all(is_real(b) and 0.0 <= b < 1.0 for b in betas), "two numbers in [0, 1)")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))

    def to_dict(self):
        """The fields as a JSON-able dict (betas as a list): what a checkpoint's trainer_state.json stores.

        Raises nothing: __post_init__ checked the fields.
        """
        return {**dataclasses.asdict(self), "betas": list(self.betas)}

    @classmethod
    def from_dict(cls, data):
        """TrainOptions from to_dict()'s output; RefformerError for unknown or invalid fields."""
        check(isinstance(data, dict), f"training options must be a dict, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        check(not unknown, f"unknown training options {unknown}")
        return cls(**data)
