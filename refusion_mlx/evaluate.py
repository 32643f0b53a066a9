"""Accuracy against speed: plan-and-infill at several knob settings and left-to-right decoding
of the same weights, on one test split, in one run (the paper's speed-vs-accuracy figure).

    python -m refusion_mlx.evaluate --model PATH [--limit N] [--data FOLDER] [--plot out.png]
    python -m refusion_mlx.evaluate --model PATH --tasks gsm8k_cot,arc_challenge_chat [--limit N]
    python -m refusion_mlx.evaluate --multi-turn [--limit N] [--settings SETTING]

With ``--tasks``, lm-evaluation-harness runs the named tasks instead (the ``eval`` extra;
``eval_tasks``), for plan-and-infill and left to right on the same weights.

Without ``--data`` the demo test split is regenerated from its seed
(``refusion_mlx.demo.tasks``). Decoding is greedy; every decoder is warmed up
before anything is timed; tokens/s is all generated tokens over all decoding
time. A setting is ``s=SLOT,b=BLOCKS,st=SLOT_THRESHOLD,tt=TOKEN_THRESHOLD``
(long names work too; omitted keys take the model's defaults, as ``generate_ids`` does).

``--multi-turn`` scores conversations instead (``evaluate_chat``).
"""

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

from .cli import ArgumentParser, add_model_flags, prog, run_command
from .errors import RefusionError
from .plot import check_matplotlib, plot

DEFAULT_SETTINGS = (
    "s=4,b=8,st=0.9,tt=0.9",  # cautious: small slots, strict verification
    "s=8,b=4,st=0.9,tt=0.5",
    "s=8,b=2,st=0.7,tt=0.3",
    "s=16,b=2,st=0.9,tt=0.4",
    "s=16,b=1,st=0.6,tt=0.2",
    "s=32,b=1,st=0.5,tt=0.1",  # aggressive: big slots, lenient verification
)
KEYS = {"s": "slot_size", "slot": "slot_size", "slot_size": "slot_size",
        "b": "serial_num_blocks", "blocks": "serial_num_blocks", "serial_num_blocks": "serial_num_blocks",
        "st": "slot_threshold", "slot_threshold": "slot_threshold",
        "tt": "token_threshold", "token_threshold": "token_threshold",
        "ps": "plan_slots", "plan_slots": "plan_slots"}
AR_NAME = "left-to-right"


@dataclass
class Case:
    """One test example: its prompt ids and what its answer is checked against."""

    prompt: List[int]
    example: dict  # has "response" (and "family"/"answer" for the demo tasks)


@dataclass
class Score:
    """One decoder's run over the test cases."""

    name: str
    correct: List[bool] = field(default_factory=list)
    families: List[Optional[str]] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    calls: int = 0
    tpf: List[float] = field(default_factory=list)
    peak_memory: float = 0.0

    def add(self, result, ok: bool, family: Optional[str]):
        """Count one generation."""
        self.correct.append(ok)
        self.families.append(family)
        self.tokens += len(result.tokens)
        self.seconds += result.wall_time
        self.calls += result.model_calls
        self.tpf.append(result.tpf)
        self.peak_memory = max(self.peak_memory, result.peak_memory)

    @property
    def accuracy(self) -> float:
        return sum(self.correct) / len(self.correct) if self.correct else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def parse_setting(text: str, gen_length: Optional[int]) -> dict:
    """The knobs ``s=8,b=2,st=0.9,tt=0.5`` sets (the others come from the model); checked now."""
    from .settings import settings_for

    knobs = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in KEYS:
            raise RefusionError(f"bad setting {text!r}: expected key=value with keys s, b, st, tt, ps")
        name = KEYS[key.strip()]
        try:
            knobs[name] = int(value) if name in ("slot_size", "serial_num_blocks", "plan_slots") else float(value)
        except ValueError:
            raise RefusionError(f"bad setting {text!r}: {part} is not a number") from None
    try:
        settings_for(None, gen_length=gen_length, **knobs)
    except RefusionError as e:
        raise RefusionError(f"setting {text!r}: {e}") from None
    return knobs


def setting_name(knobs: dict) -> str:
    """The canonical spelling of a setting, as the table prints it."""
    capped = f",ps={knobs['plan_slots']}" if knobs.get("plan_slots") else ""  # 0, all: the default
    return (f"s={knobs['slot_size']},b={knobs['serial_num_blocks']},"
            f"st={knobs['slot_threshold']:g},tt={knobs['token_threshold']:g}{capped}")


def read_examples(data: str, limit: Optional[int]) -> List[dict]:
    """Records of FOLDER/test.jsonl (or of a .jsonl file), the first ``limit`` of them."""
    from .utils import read_jsonl

    path = Path(data).expanduser()
    path = path / "test.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise RefusionError(f"no test split at {path} (expected a folder with test.jsonl or a .jsonl file)")
    records = []
    for _, record in read_jsonl(path):
        records.append(record)
        if limit is not None and len(records) == limit:
            break
    if not records:
        raise RefusionError(f"{path} has no examples")
    return records


def load_examples(data: Optional[str], limit: Optional[int], seed: int, size: int) -> List[dict]:
    """The test examples: read from ``data``, else the demo test split regenerated from ``seed``."""
    if data is not None:
        return read_examples(data, limit)
    from .demo.tasks import test_split

    # The split is generated first and in order, so its first ``limit`` examples need nothing more.
    return test_split(seed, min(size, limit) if limit else size)


def make_cases(tokenizer, records: Sequence[dict], room: int, max_position: int) -> List[Case]:
    """Prompt ids built exactly as training builds them; too-long prompts refused."""
    from .tokenizer_utils import prompt_ids
    from .tuner.datasets import split_record

    cases = []
    for k, record in enumerate(records, 1):
        messages, response = split_record(record, f"example {k}")
        ids = prompt_ids(tokenizer, messages)
        if len(ids) + room > max_position:
            raise RefusionError(
                f"example {k}: prompt ({len(ids)} tokens) + generation ({room}) exceeds the model's "
                f"max_position_embeddings ({max_position}); lower --max-tokens"
            )
        cases.append(Case(ids, {**record, "response": response}))
    return cases


def run_decoder(name: str, decode: Callable, cases: Sequence[Case], tokenizer) -> Score:
    """Decode every case (after one untimed warm-up) and score the answers."""
    from .demo.tasks import check

    decode(cases[0].prompt)  # warm-up: kernels built, buffers allocated
    score = Score(name)
    for case in cases:
        result = decode(case.prompt)
        text = tokenizer.decode(result.tokens, skip_special_tokens=True)
        score.add(result, check(case.example, text), case.example.get("family"))
    return score


def evaluate(model, tokenizer, cases: Sequence[Case], settings: Sequence[dict], gen_length: int,
             log=sys.stderr) -> List[Score]:
    """Left-to-right first, then each plan-and-infill setting, all greedy on the same cases."""
    from .autoregressive import generate_ar_ids
    from .decode import generate_ids
    from .settings import settings_for
    from .tokenizer_utils import default_eos

    eos = default_eos(tokenizer)
    mask_id = model.args.mask_token_id
    decoders = [(AR_NAME, lambda ids: generate_ar_ids(model, ids, max_tokens=gen_length, eos_token_id=eos))]
    for knobs in settings:
        full = vars(settings_for(model, gen_length=gen_length, **knobs))
        decoders.append((setting_name(full), lambda ids, k=knobs: generate_ids(
            model, ids, gen_length=gen_length, mask_id=mask_id, eos_token_id=eos, **k)))
    scores = []
    for name, decode in decoders:
        print(f"[{len(scores) + 1}/{len(decoders)}] {name}: {len(cases)} examples", file=log, flush=True)
        scores.append(run_decoder(name, decode, cases, tokenizer))
    return scores


def format_table(scores: Sequence[Score]) -> str:
    """One row per decoder: accuracy, tokens/s, speed-up over left-to-right, tokens per model call
    (the headline), calls per token, upstream's TPF (for comparison with the paper), memory."""
    base = scores[0].tokens_per_second
    lines = [f"{'#':>2}  {'setting':<24}{'accuracy':>9}{'tok/s':>10}{'speed-up':>9}{'tok/call':>9}"
             f"{'calls/tok':>10}{'paper TPF':>10}{'peak GB':>9}"]
    for k, s in enumerate(scores):
        speedup = s.tokens_per_second / base if base > 0 else 0.0
        lines.append(f"{k:>2}  {s.name:<24}{100 * s.accuracy:>8.1f}%{s.tokens_per_second:>10.1f}"
                     f"{speedup:>8.2f}x{s.tokens / max(s.calls, 1):>9.2f}"
                     f"{s.calls / max(s.tokens, 1):>10.3f}{sum(s.tpf) / max(len(s.tpf), 1):>10.2f}{s.peak_memory:>9.3f}")
    lines.append("tok/call: tokens returned per model call, every call counted. paper TPF: upstream's "
                 "tokens-per-forward credit, only for comparison with the paper.")
    return "\n".join(lines)


def format_families(scores: Sequence[Score]) -> Optional[str]:
    """Accuracy per task family (rows: decoders), or None when the examples carry no family."""
    families = sorted({f for f in scores[0].families if f})
    if not families:
        return None
    width = max(len(f) for f in families) + 2
    lines = [f"{'#':>2}  accuracy by family: " + "".join(f"{f:>{width}}" for f in families)]
    for k, s in enumerate(scores):
        cells = []
        for f in families:
            hits = [ok for ok, g in zip(s.correct, s.families) if g == f]
            cells.append(f"{100 * sum(hits) / len(hits):>{width - 1}.0f}%")
        lines.append(f"{k:>2}  {'':<20}" + "".join(cells))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=prog("evaluate"), description=__doc__,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(parser)
    parser.add_argument("--data", help="folder with test.jsonl (or a .jsonl file); default: the demo "
                        "test split regenerated from --seed")
    parser.add_argument("--seed", type=int, help="demo split seed (default: the demo's); with --tasks, "
                        "lm-eval's seeds (default: lm-eval's)")
    parser.add_argument("--test-size", type=int, help="demo test split size (default 500; --multi-turn: 50)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N examples")
    parser.add_argument("--settings", nargs="+", metavar="SETTING",
                        help="plan-and-infill settings, e.g. s=8,b=2,st=0.9,tt=0.5 "
                             f"(default: {' '.join(DEFAULT_SETTINGS)})")
    parser.add_argument("--max-tokens", type=int,
                        help="most tokens for every decoder (default: the model's own; 256 for the demo; "
                             "with --tasks: the preset's 512, else the task's)")
    parser.add_argument("--multi-turn", action="store_true",
                        help="score conversations turn by turn through a prompt cache (answers kept, "
                             "re-prefilled, no cache); the first --settings entry decodes; --test-size "
                             "defaults to 50 conversations")
    parser.add_argument("--plot", help="write the speed-vs-accuracy figure here as PNG (needs matplotlib: "
                                       "the plot extra)")
    from .eval_tasks import add_task_flags

    add_task_flags(parser)
    return parser


def check_args(args):
    """Refuse numbers that make no sense before anything is loaded."""
    if args.limit is not None and args.limit < 1:
        raise RefusionError(f"--limit must be at least 1, got {args.limit}")
    if args.test_size is not None and args.test_size < 1:
        raise RefusionError(f"--test-size must be at least 1, got {args.test_size}")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise RefusionError(f"--max-tokens must be positive, got {args.max_tokens}")
    if args.plot is not None and not Path(args.plot).expanduser().resolve().parent.is_dir():
        raise RefusionError(f"--plot: no folder {Path(args.plot).parent}")
    if args.plot is not None and args.multi_turn:
        raise RefusionError("--plot draws the single-turn table; leave it out with --multi-turn")
    if args.plot is not None:
        check_matplotlib()


def run(args) -> int:
    """Load, evaluate, print the tables, plot."""
    import mlx.core as mx

    from .blas import warn_if_slow_blas
    from .settings import settings_for
    from .demo.tasks import DEMO_SEED
    from .loading import load

    check_args(args)
    if args.tasks is not None:
        from .eval_tasks import run_tasks

        return run_tasks(args)
    settings = [parse_setting(s, args.max_tokens) for s in (args.settings or DEFAULT_SETTINGS)]
    seed = DEMO_SEED if args.seed is None else args.seed
    if args.multi_turn:
        args.test_size = args.test_size or 50
        from .evaluate_chat import load_conversations, run_multi_turn

        load_conversations(args.data, 1, seed, 1)  # bad data fails before a long load
        model, tokenizer = load(args.model, adapter_path=args.adapter_path, dtype=args.dtype)
        return run_multi_turn(args, model, tokenizer, settings, seed)
    args.test_size = args.test_size or 500
    records = load_examples(args.data, args.limit, seed, args.test_size)
    model, tokenizer = load(args.model, adapter_path=args.adapter_path, dtype=args.dtype)
    cases = make_cases(tokenizer, records, args.max_tokens or 0, model.args.max_position_embeddings)
    # Without --max-tokens: the model's own length, fitted to the longest prompt.
    gen_length = args.max_tokens or settings_for(model, max(len(c.prompt) for c in cases)).gen_length
    warn_if_slow_blas()  # here, once the input has proved good: bad input stays one line
    source = args.data or f"demo test split (seed {seed})"
    print(f"model: {args.model or 'demo'}  device: {mx.default_device()}  data: {source}, {len(cases)} "
          f"examples  max tokens: {gen_length}  greedy", flush=True)
    scores = evaluate(model, tokenizer, cases, settings, gen_length)
    print(format_table(scores))
    families = format_families(scores)
    if families:
        print(families)
    if args.plot:
        try:
            plot(scores, args.plot)
        except OSError as e:
            raise RefusionError(f"cannot write --plot {args.plot}: {e.strerror or e}") from None
        print(f"plot: {args.plot}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
