"""A request's knobs: one table (``KNOB_TABLE``) of every decoding knob, its name in the library,
on the command line and in an HTTP request, its type, bounds and help; the defaults
(``DecodeSettings``); and how one request's settings are layered (``settings_for``).

The command lines build their flags from the table (``cli.add_decode_flags``), the server names
request fields from it, and ``DecodeSettings.validate`` checks every knob with the table's one
validator (``Knob.check``), so a bound is written once.
"""

from dataclasses import dataclass, replace
from typing import Optional

from .errors import RefusionError
from .validation import MAX_TEMPERATURE, SEED_LIMIT, check_float, check_int


@dataclass(frozen=True)
class Knob:
    """One decoding knob: ``name`` in the library, ``flag`` on the command line, ``field`` in a request."""

    name: str
    flag: str
    field: str
    kind: type  # int or float
    low: Optional[float] = None
    high: Optional[float] = None
    help: str = ""
    low_open: bool = False  # the low bound itself is refused (top_p > 0)
    optional: bool = False  # None is a value (seed: draw one)

    def check(self, value):
        """The value in its plain type, or ``RefusionError`` naming the knob."""
        if value is None and self.optional:
            return None
        if self.kind is int:
            value = check_int(self.name, value, self.low, self.high)
        else:
            value = check_float(self.name, value, self.low, self.high)
        if self.low_open and value == self.low:
            raise RefusionError(f"{self.name} must be in ({self.low:g}, {self.high:g}], got {value}")
        return value


KNOB_TABLE = (
    Knob("gen_length", "--max-tokens", "max_tokens", int, 1, None,
         "most tokens to generate (padded internally to whole slots and blocks); default: the model's, "
         "fitted to its positions"),
    Knob("slot_size", "--slot-size", "slot_size", int, 1, None, "tokens per slot"),
    Knob("serial_num_blocks", "--blocks", "blocks", int, 1, None, "serial blocks the generation is cut into"),
    Knob("slot_threshold", "--slot-threshold", "slot_threshold", float, 0.0, 1.0,
         "first-token confidence to pick a slot"),
    Knob("token_threshold", "--token-threshold", "token_threshold", float, 0.0, 1.0,
         "probability to accept a drafted token"),
    Knob("plan_slots", "--plan-slots", "plan_slots", int, 0, None,
         "most pending slots a plan call feeds, the leftmost of the block (0: all, as upstream); fewer "
         "makes every call cheaper where compute is scarce, at the cost of some parallelism"),
    Knob("temperature", "--temp", "temperature", float, 0.0, MAX_TEMPERATURE,
         f"sampling temperature in [0, {MAX_TEMPERATURE:g}] (0: greedy)"),
    Knob("seed", "--seed", "seed", int, 0, SEED_LIMIT - 1, "random seed for sampling", optional=True),
    Knob("top_p", "--top-p", "top_p", float, 0.0, 1.0, "sample among the most likely tokens holding this mass",
         low_open=True),
    Knob("top_k", "--top-k", "top_k", int, 0, None, "sample among this many most likely tokens (0: all)"),
    Knob("min_p", "--min-p", "min_p", float, 0.0, 1.0,
         "sample among tokens at least this fraction as likely as the most likely one"),
)
KNOB_BY_NAME = {knob.name: knob for knob in KNOB_TABLE}


@dataclass(frozen=True)
class DecodeSettings:
    """The upstream knobs, and the library's defaults for them: upstream ``generate.py``'s example.

    This is the one table of defaults. A model may bring its own (``generation_config.json``,
    read by ``load``) and a preset its slot and threshold settings; ``settings_for`` layers
    them. See docs/decoding.md for what each knob trades.
    """

    gen_length: int = 512
    slot_size: int = 4
    serial_num_blocks: int = 32
    slot_threshold: float = 0.6
    token_threshold: float = 0.3
    # Most pending slots one plan call feeds (0: all of the block's, as upstream). A plan call
    # costs as many fed tokens as it drafts; where compute, not the weights' reading, bounds a
    # forward (Apple GPUs, CPUs, 4-bit) a capped plan stays near a one-token step's cost.
    plan_slots: int = 0
    temperature: float = 0.0
    seed: Optional[int] = None
    # Sampling (temperature > 0) among fewer tokens: sampling.truncate; the defaults keep all.
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    # Log-probabilities of the generated tokens (docs/decoding.md): None computes none (no extra
    # work, no extra host transfer); k >= 0 puts each token's and its k most likely alternatives'
    # in the commits. Not a decoding knob: it never changes a token.
    logprobs: Optional[int] = None

    @property
    def padded_length(self) -> int:
        """gen_length rounded up to whole slots in every block; only gen_length tokens are returned."""
        unit = self.slot_size * self.serial_num_blocks
        return -(-self.gen_length // unit) * unit

    @property
    def block_length(self) -> int:
        return self.padded_length // self.serial_num_blocks

    def validate(self):
        """Raise RefusionError (naming the argument) for knobs that cannot work."""
        from .sampling import MAX_TOP_LOGPROBS

        for knob in KNOB_TABLE:
            knob.check(getattr(self, knob.name))
        if self.logprobs is not None:
            check_int("logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS)

    def check_fits(self, prompt_length: int, positions: int):
        """Raise RefusionError unless a prompt of ``prompt_length`` tokens and this generation fit a
        model of ``positions`` positions: checked before anything is allocated or tokenized.

        The returned tokens must fit (prompt + gen_length <= positions). The padding to whole slots
        and blocks may run past them (RoPE is computed for any position, nothing there is returned),
        but by less than one slot_size x serial_num_blocks, which must itself fit: so the cache a
        generation allocates stays under twice the model's positions, whatever the knobs.
        """
        unit = self.slot_size * self.serial_num_blocks
        if unit > positions:
            raise RefusionError(
                f"slot_size ({self.slot_size}) x serial_num_blocks ({self.serial_num_blocks}) = {unit} exceeds the "
                f"model's max_position_embeddings ({positions})")
        if prompt_length + self.gen_length > positions:
            raise RefusionError(
                f"prompt ({prompt_length} tokens) + gen_length ({self.gen_length}) = "
                f"{prompt_length + self.gen_length} exceeds the model's max_position_embeddings "
                f"({positions}); at most {max(positions - prompt_length, 0)} tokens fit after this prompt")


# The knobs a model may bring in its generation_config.json (upstream's names).
KNOBS = ("gen_length", "slot_size", "serial_num_blocks", "slot_threshold", "token_threshold")


def settings_for(model=None, prompt_length: int = 0, *, preset: Optional[str] = None,
                 **knobs) -> DecodeSettings:
    """The settings for one request: the given knobs, then ``preset``'s, then the model's own
    (``model.generation_defaults``), then ``DecodeSettings``'s.

    A gen_length nobody gave explicitly is fitted to the model: at most the positions left
    after a prompt of ``prompt_length`` tokens. Knobs given as None count as not given.
    """
    from .presets import PRESETS

    knobs = {k: v for k, v in knobs.items() if v is not None}
    unknown = sorted(set(knobs) - set(DecodeSettings.__dataclass_fields__))
    if unknown:
        raise RefusionError(f"unknown decoding argument {unknown[0]!r}")
    if preset is not None and preset not in PRESETS:
        raise RefusionError(f"unknown preset {preset!r} (choose from {', '.join(sorted(PRESETS))})")
    own = dict(getattr(model, "generation_defaults", None) or {}) if model is not None else {}
    layered = {**own, **(PRESETS[preset] if preset else {}), **knobs}
    settings = DecodeSettings(**{k: v for k, v in layered.items() if k in DecodeSettings.__dataclass_fields__})
    if model is not None and "gen_length" not in knobs:
        room = model.args.max_position_embeddings - prompt_length
        if 0 < room < settings.gen_length:
            settings = replace(settings, gen_length=room)
    settings.validate()
    if model is not None and prompt_length:
        settings.check_fits(prompt_length, model.args.max_position_embeddings)
    return settings

