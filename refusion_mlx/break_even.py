"""Where plan-and-infill wins: tokens/s against left to right as a function of tokens committed
per model call, and the break-even per knob setting.

    python -m refusion_mlx.benchmark --shape qwen3-8b --break-even [--presets gsm8k,gpqa] [--quantize 4]

Random weights commit about 0.5 tokens per call and a trained model some unknown number, so
here the decisions are scripted: every forward is the real one at the real shape (``random_model``)
and runs for its cost, then its logits are replaced by a scripted distribution
(``ScriptedDecisions``), which says how many slots pass the slot threshold in each plan call and
how many drafted tokens in a row pass the token threshold. The decoder is the real one
(``decode.generate_ids``): its calls, their widths and its host work are what is timed. A profile
fixes the tokens committed per call (``Profile.tokens_per_call``); sweeping profiles gives
tokens/s as a function of it, and the break-even is where that curve meets the faster
left-to-right loop (ours or mlx-lm's ``generate_step``) on the same weights.

The plain forward's cost curve (time by tokens fed) measured here is also fitted to a roofline;
the same fit with a device's published bandwidth and FLOP rate estimates the break-even on a
device we cannot run (``roofline.DEVICES``: Apple GPUs), labelled as an estimate.
"""

import math
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .presets import PRESETS
from .roofline import (DEVICES, Roofline, ScaledCurve, estimated_ar_tokens_per_second,
                       estimated_tokens_per_second, fit_roofline, flop_per_token, ridge, shape_weight_bytes)
from .settings import DecodeSettings

MAX_RUNS = 8  # runs of one profile at most, however few calls each makes
HIGH, LOW = 0.999, 0.001  # scripted probabilities: above / below every threshold in (0.001, 0.999)
SCRIPTED_NOTE = (
    "Scripted decisions: each forward is the real one at this shape and runs for its cost, then its\n"
    "logits are replaced by a profile's (slots passing the slot threshold per plan call, drafted tokens\n"
    "passing the token threshold in a row). Tokens per call come from the profile, not from a model;\n"
    "tokens/s is what the real decoder achieves at that many tokens per call on this device.\n"
    "Both decoders start from the prompt in a cache: decoding alone is timed, not the prefill.\n"
    "Each profile runs until it made --min-calls calls (at most 8 runs), left to right 3 times; the\n"
    "fastest run of each counts (the least disturbed on a shared machine).")

@dataclass(frozen=True)
class Profile:
    """Scripted decisions. In every plan call the ``slots`` leftmost pending slots pass the slot
    threshold (the others do not); a drafted token at offset j > 0 of its slot fails the token
    threshold when j is a multiple of ``run`` (``run`` >= slot size: none fails), so a verify pass
    accepts ``run`` tokens of a slot and each infill round ``run`` more."""

    slots: int
    run: int

    def calls_per_iteration(self, slot_size: int) -> int:
        """Plan + verify, plus 2 per infill round when a slot is not accepted whole."""
        return 2 if self.run >= slot_size else 2 * math.ceil(slot_size / self.run)

    def tokens_per_call(self, slot_size: int) -> float:
        """Tokens committed per model call: ``slots`` whole slots per iteration (when the block's
        slots are a multiple of ``slots`` and nothing is padded)."""
        return self.slots * slot_size / self.calls_per_iteration(slot_size)

    def describe(self, slot_size: int) -> str:
        run = "whole slot" if self.run >= slot_size else f"run {self.run}"
        return f"{self.slots} slot{'s' if self.slots > 1 else ''}, {run}"


def profiles(slot_size: int, block_slots: int) -> List[Profile]:
    """Doubling tokens per call: one slot with runs 1, 2, 4... (infilled), then 2, 4... whole slots."""
    runs = [1 << k for k in range(int(math.log2(slot_size)) + 1)]
    out = [Profile(1, r) for r in runs]
    slots = 2
    while slots <= block_slots and block_slots % slots == 0:
        out.append(Profile(slots, slot_size))
        slots *= 2
    return out


def scripted_text(positions: mx.array, vocab_size: int) -> mx.array:
    """The token the script puts at each position: anything but the mask (vocab - 2) and 0."""
    return positions * 7919 % (vocab_size - 3) + 1


class ScriptedDecisions:
    """The model, its logits replaced after every real forward by ``profile``'s distribution.

    Context is ignored (like tests/scripted_model.py): a masked token at position p predicts
    the script's token at p, a real token at p the one at p + 1; how sure follows the profile.
    The replacement is built on the device from the forward's own (possibly lazy) inputs, and
    depends on the real logits (``mx.depends``), so the real forward is always computed and no
    synchronisation is added. Its extra cost: one elementwise pass over the kept logits.
    """

    def __init__(self, model, profile: Profile, slot_size: int, prompt_length: int):
        self.model, self.args, self.layers = model, model.args, model.layers
        self.profile, self.slot_size, self.prompt_length = profile, slot_size, prompt_length
        vocab = model.args.vocab_size
        # With every other logit 0, softmax gives the target exactly p.
        self.logit = {p: math.log(p * (vocab - 1) / (1 - p)) for p in (HIGH, LOW)}

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, inputs, positions=None, cache=None, view=None, last=None):
        real = self.model(inputs, positions, cache, view, last=last)
        return mx.depends(self.scripted(inputs, positions, last).astype(real.dtype), real)

    def scripted(self, inputs: mx.array, positions, last: Optional[int]) -> mx.array:
        tokens = inputs.reshape(-1)
        n = tokens.size
        pos = mx.arange(positions, positions + n) if isinstance(positions, int) else positions.reshape(-1)
        if last is not None:
            tokens, pos = tokens[-last:], pos[-last:]
        S, vocab = self.slot_size, self.args.vocab_size
        masked = tokens == self.args.mask_token_id
        offset = (pos - self.prompt_length) % S
        starts = masked & (offset == 0)
        # The call's slots in the order fed (a plan feeds pending slots in position order).
        rank = mx.cumsum(starts.astype(mx.int32)) - 1
        unsure_start = starts & (rank >= self.profile.slots)
        following = (offset + 1) % S  # offset of the token a real token predicts
        hard = (following > 0) & (following % self.profile.run == 0)
        target = mx.where(masked, scripted_text(pos, vocab), scripted_text(pos + 1, vocab))
        low = mx.where(masked, unsure_start, hard)
        value = mx.where(low, self.logit[LOW], self.logit[HIGH])
        logits = mx.where(mx.arange(vocab)[None] == target[:, None], value[:, None], 0.0)
        return logits[None]


# --- break-even from cost curves -------------------------------------------------------------

def break_even(points: Sequence[Tuple[float, float]], baseline: float) -> Tuple[str, float]:
    """Tokens per call at which tokens/s reaches ``baseline``, from (tokens per call, tokens/s) points.

    Points are taken in order of tokens per call; the first crossing is interpolated linearly
    (exact when a call's cost does not depend on how many tokens it commits: tokens/s is then
    proportional to tokens per call). Returns ("=", value), or ("<", lowest) when the lowest point
    already wins, or (">", highest) when no point does.
    """
    points = sorted(points)
    if points[0][1] >= baseline:
        return "<", points[0][0]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if y1 >= baseline:
            return "=", x0 + (baseline - y0) * (x1 - x0) / (y1 - y0)
    return ">", points[-1][0]


def format_break_even(found: Tuple[str, float]) -> str:
    relation, value = found
    return f"{value:.2f}" if relation == "=" else f"{relation}{value:g}"


# --- the run ------------------------------------------------------------------------------------

def cost_shapes(names: Sequence[str], plan_slots: Sequence[int] = ()) -> List[Tuple[str, dict, List[str]]]:
    """The settings to run, one per cost shape (slot size, block length, plan cap: the thresholds
    only matter through the profile): (name, knobs, other names sharing its shape). With
    ``plan_slots``, each shape also capped at each of them (where the cap is below its block's slots)."""
    named = {name: PRESETS[name] for name in names if name != "default"}
    if "default" in names:
        d = DecodeSettings()
        named["default"] = dict(gen_length=d.gen_length, slot_size=d.slot_size,
                                serial_num_blocks=d.serial_num_blocks, slot_threshold=d.slot_threshold,
                                token_threshold=d.token_threshold)
    shapes: Dict[Tuple[int, int], Tuple[str, dict, List[str]]] = {}
    for name, knobs in named.items():
        key = (knobs["slot_size"], DecodeSettings(**knobs).block_length)
        if key in shapes:
            shapes[key][2].append(name)
        else:
            shapes[key] = (name, knobs, [])
    capped = []
    for name, knobs, also in shapes.values():
        capped.append((name, knobs, also))
        block_slots = DecodeSettings(**knobs).block_length // knobs["slot_size"]
        for cap in plan_slots:
            if cap < block_slots:
                capped.append((f"{name} plan_slots={cap}", dict(knobs, plan_slots=cap), []))
    return capped


def first_blocks(knobs: dict, tokens: int) -> dict:
    """The setting cut to its first blocks (at least ``tokens`` tokens): the same block length and
    slots, so every call has the width it has in the full generation."""
    block = DecodeSettings(**knobs).block_length
    blocks = min(max(1, -(-tokens // block)), knobs["serial_num_blocks"])
    return dict(knobs, serial_num_blocks=blocks, gen_length=blocks * block)


@dataclass
class ProfileRun:
    """One profile of one setting, as measured: its fastest run's result and recorded calls (tokens
    fed, context, logits kept), and its tokens/s over left to right's measured beside it."""

    profile: Profile
    result: object  # GenerationResult
    calls: list
    vs_ar: Optional[float] = None


def record_setting(model, ids: List[int], knobs: dict, prompt_cache=None, out=None, min_calls: int = 1,
                   left_to_right=None) -> List[ProfileRun]:
    """Every profile of one setting (cut by ``first_blocks``) through the real decoder; with ``out``,
    a row printed for each. ``prompt_cache`` (holding ``ids``): each run feeds only the last prompt
    token. A profile is run again until its runs made ``min_calls`` calls (at most ``MAX_RUNS``);
    the fastest run is kept. ``left_to_right`` (a function returning tokens/s) runs right after
    each run, so both meet the same load: the median ratio over the runs is ``vs_ar``."""
    from .benchmark import RecordingModel
    from .decode import generate_ids

    S = knobs["slot_size"]
    settings = DecodeSettings(**knobs)
    rows = []
    for profile in profiles(S, planned_slots(settings)):
        runs, ratios, calls = [], [], 0
        while calls < min_calls and len(runs) < MAX_RUNS or not runs:
            recorder = RecordingModel(ScriptedDecisions(model, profile, S, len(ids)))
            runs.append(generate_ids(recorder, ids, eos_token_id=[], prompt_cache=prompt_cache, **knobs))
            calls += runs[-1].model_calls
            if left_to_right is not None:
                ratios.append(runs[-1].tokens_per_second / left_to_right())
        r = min(runs, key=lambda run: run.wall_time)
        row = ProfileRun(profile, r, list(recorder.calls), float(np.median(ratios)) if ratios else None)
        if out is not None:
            beside = f"{row.vs_ar:>8.2f}x" if ratios else ""
            print(f"{profile.describe(S):<20}{len(runs):>5}{r.model_calls:>7}{r.tokens_per_call:>9.2f}"
                  f"{profile.tokens_per_call(S):>9.2f}{r.tokens_fed / r.model_calls:>9.1f}"
                  f"{1000 * r.wall_time / r.model_calls:>9.2f}{r.tokens_per_second:>9.1f}{beside}",
                  file=out, flush=True)
        rows.append(row)
    return rows


def planned_slots(settings: DecodeSettings) -> int:
    """Slots a plan call feeds, and so the most that can pass the slot threshold at once."""
    block_slots = settings.block_length // settings.slot_size
    return min(block_slots, settings.plan_slots or block_slots)


def run_setting(model, ids: List[int], name: str, knobs: dict, also: List[str], out, prompt_cache,
                min_calls: int, left_to_right) -> List[ProfileRun]:
    """``record_setting`` after a warm-up, with its table."""
    from .benchmark import warm_up_prompt
    from .decode import generate_ids

    S = knobs["slot_size"]
    settings = DecodeSettings(**knobs)
    shared = f"; same cost shape: {', '.join(also)}" if also else ""
    print(f"\n{name}: slot {S}, block {settings.block_length} tokens ({settings.block_length // S} slots); first "
          f"{settings.serial_num_blocks} block(s) = {settings.gen_length} tokens{shared}", file=out)
    print(f"{'profile':<20}{'runs':>5}{'calls':>7}{'tok/call':>9}{'expected':>9}{'fed/call':>9}{'ms/call':>9}"
          f"{'tok/s':>9}{'vs AR':>9}", file=out, flush=True)
    short = warm_up_prompt(ids)
    # Warm-up (kernels built): an infill and a verified commit, in one block of a short prompt.
    for profile in (Profile(1, max(1, S // 2)), Profile(planned_slots(settings), S)):
        generate_ids(ScriptedDecisions(model, profile, S, len(short)), short, eos_token_id=[],
                     **dict(knobs, serial_num_blocks=1, gen_length=settings.block_length))
    return record_setting(model, ids, knobs, prompt_cache, out, min_calls, left_to_right)


def device_estimates(rows, args, weight_bytes: float, ar_context: int,
                     measured: Optional[Tuple[Dict[int, float], float]] = None) -> Dict[str, Tuple[str, float]]:
    """Break-even per device of ``DEVICES`` from the recorded calls' widths (an estimate): each call
    costing what the device's peak roofline says, or with ``measured`` = (this device's plain
    forward times, its ridge), what this device's curve says when moved to the device's ridge."""
    found = {}
    for device, (gbps, tflops) in DEVICES.items():
        roof = Roofline(gbps * 1e9, tflops * 1e12)
        if measured is None:
            speeds = [(row.result.tokens_per_call,
                       estimated_tokens_per_second(row.calls, len(row.result.tokens), args, weight_bytes, roof))
                      for row in rows]
            ar = estimated_ar_tokens_per_second(args, weight_bytes, roof, ar_context)
        else:
            times, here = measured
            curve = ScaledCurve(tuple(sorted(times.items())),
                                here / ridge(roof, weight_bytes, flop_per_token(args, ar_context)),
                                weight_bytes / roof.bandwidth)
            speeds = [(row.result.tokens_per_call,
                       len(row.result.tokens) / sum(curve.seconds(n) for n, _, _ in row.calls)) for row in rows]
            ar = 1 / curve.seconds(1)
        found[device] = break_even(speeds, ar)
    return found


ESTIMATE_NOTE = (
    "Apple columns: ESTIMATES from the recorded calls' widths, Apple's published memory bandwidth and\n"
    "third-party FP16 FLOP rates at peak, a roofline without host overhead (a call costs the longer of\n"
    "reading the weights and its FLOP); '<x': even x tokens per call wins, '>x': x does not.")


def print_summary(title: str, summary, out, measured: bool = True):
    """``summary``: (setting, measured, fitted, Apple peak-roofline estimates, Apple estimates from this
    device's curve or None) per setting."""
    print(f"\nwhere plan-and-infill wins, {title}: break-even tokens per call (above it plan-and-infill is "
          f"faster than left to right)", file=out)
    head = f"{'measured':>10}{'fit':>8}" if measured else ""
    apple = [d.split(" (")[0] for d in DEVICES]
    curves = measured and summary and summary[0][4] is not None
    print(f"{'setting':<28}{head}" + "".join(f"{d:>11}" for d in apple)
          + ("".join(f"{d + '*':>11}" for d in apple) if curves else ""), file=out)
    for label, found, fitted, estimates, scaled in summary:
        here = f"{format_break_even(found):>10}{format_break_even(fitted):>8}" if measured else ""
        print(f"{label:<28}{here}" + "".join(f"{format_break_even(e):>11}" for e in estimates.values())
              + ("".join(f"{format_break_even(e):>11}" for e in scaled.values()) if curves else ""), file=out)
    if measured:
        print("measured: this device; fit: the roofline fitted to this device's plain forwards (a check of the "
              "model)", file=out)
    print(ESTIMATE_NOTE, file=out)
    if curves:
        print("Apple*: ESTIMATES too, each call costing what this device's measured plain-forward curve says,\n"
              "moved to that Apple GPU's ridge (its step = weights / bandwidth; the curve's bend kept)", file=out)


def sweep_arguments(presets: Optional[str], caps: Optional[str]) -> Tuple[List[str], List[int]]:
    """--presets (default: every preset and the library's default) and --plan-slots-sweep, checked."""
    from .errors import RefusionError

    names = [n.strip() for n in presets.split(",")] if presets else sorted(PRESETS) + ["default"]
    unknown = [n for n in names if n != "default" and n not in PRESETS]
    if unknown:
        raise RefusionError(f"unknown preset {unknown[0]!r} (choose from {', '.join(sorted(PRESETS))}, default)")
    parsed = []
    for cap in (caps.split(",") if caps else []):
        if not cap.strip().isdigit() or int(cap) < 1:
            raise RefusionError(f"--plan-slots-sweep takes positive integers, got {cap.strip()!r}")
        parsed.append(int(cap))
    return names, parsed


def run_estimate(args, out=None):
    """Break-even estimates for Apple GPUs at ``args.shape`` without its forwards
    (``--break-even --estimate``): the calls' widths depend on the setting, the profile and the
    prompt only, so a stand-in model of a few layers records them."""
    from .benchmark import SHAPES
    from .model import Model, ModelArgs

    out = out or sys.stdout
    names, caps = sweep_arguments(args.presets, args.plan_slots_sweep)
    real = ModelArgs(model_type="qwen3", rms_norm_eps=1e-6, **SHAPES[args.shape])
    wbytes = shape_weight_bytes(real, args.quantize, args.q_group_size)
    mx.random.seed(0)
    stand_in = Model(ModelArgs(model_type="qwen3", rms_norm_eps=1e-6, hidden_size=64, num_hidden_layers=1,
                               intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                               vocab_size=1024, mask_token_id=1022))
    ids = mx.random.randint(0, 1021, (args.prompt_tokens,)).tolist()
    quant = f"{args.quantize}-bit (group {args.q_group_size})" if args.quantize else "bfloat16"
    print(f"break-even ESTIMATES, shape {args.shape} {quant}: weights {wbytes / 1e9:.2f} GB; prompt {len(ids)} "
          f"tokens; no forward of this shape is run", file=out)
    from .autoregressive import prefill_ids
    from .kv.prompt import make_prompt_cache

    prompt_cache = make_prompt_cache(stand_in)  # as the measured run: decoding alone
    prefill_ids(stand_in, ids, prompt_cache)
    ar_context = len(ids) + (args.ar_tokens or 32) // 2
    summary = []
    for name, knobs, also in cost_shapes(names, caps):
        rows = record_setting(stand_in, ids, first_blocks(knobs, args.max_tokens or 128), prompt_cache)
        summary.append((", ".join([name] + also), None, None, device_estimates(rows, real, wbytes, ar_context),
                        None))
    print_summary(f"shape {args.shape} {quant}", summary, out, measured=False)


def run_break_even(args, out=None):
    """The break-even benchmark at ``args.shape`` (``benchmark --shape ... --break-even``)."""
    from .benchmark import (FORWARD_SIZES, PlainForward, left_to_right_rows, random_model, shape_dtype,
                            weights_gb)

    out = out or sys.stdout
    names, caps = sweep_arguments(args.presets, args.plan_slots_sweep)
    dtype, why = shape_dtype(args.dtype)
    model = random_model(args.shape, dtype, args.quantize, args.q_group_size)
    a = model.args
    wbytes = weights_gb(model) * 1e9
    ids = mx.random.randint(0, a.vocab_size - 3, (args.prompt_tokens,)).tolist()
    quant = f", {args.quantize}-bit (group {args.q_group_size})" if args.quantize else ""
    print(f"break-even, shape {args.shape}: {a.num_hidden_layers} layers, hidden {a.hidden_size}, vocabulary "
          f"{a.vocab_size}; {dtype} ({why}){quant}; weights {wbytes / 1e9:.2f} GB; device {mx.default_device()}; "
          f"mlx {mx.__version__}; prompt {len(ids)} tokens", file=out)
    print(SCRIPTED_NOTE, file=out)

    plain = PlainForward(model, len(ids))
    sizes = FORWARD_SIZES + (256,)
    times = {n: plain(n, len(ids), repeats=3, pick=min) for n in sizes}
    print("\nplain forward after the prompt, ms by tokens fed (fastest of 3): "
          + ", ".join(f"{n}: {1000 * t:.1f}" for n, t in times.items()), file=out)
    roof = fit_roofline(times, wbytes, flop_per_token(a, len(ids)))
    here = ridge(roof, wbytes, flop_per_token(a, len(ids)))
    print(f"roofline fitted to it: {roof.bandwidth / 1e9:.1f} GB/s, {roof.flops / 1e12:.2f} TFLOP/s "
          f"(ridge: past ~{here:.0f} fed tokens a call costs more than a one-token step)", file=out)

    from .autoregressive import prefill_ids
    from .kv.prompt import make_prompt_cache

    # Decoding alone is compared: both decoders start from the prompt in a cache (the prefill is
    # the same work for both, and on a compute-poor device it would dominate a short generation).
    ours, theirs = left_to_right_rows(model, ids, args.ar_tokens or 32, [], out, cached=True, pick=max, both=True)
    best_ar = max(ours, theirs)
    prompt_cache = make_prompt_cache(model)
    prefill_ids(model, ids, prompt_cache)
    ar_cache = make_prompt_cache(model)
    prefill_ids(model, ids, ar_cache)

    def beside() -> float:
        """Left to right right now: our loop's tokens/s, scaled to the faster loop's (mlx-lm's where it
        was faster above), so a profile is compared with left to right under the same load."""
        from .autoregressive import generate_ar_ids

        run = generate_ar_ids(model, ids, max_tokens=args.ar_tokens or 32, eos_token_id=[], prompt_cache=ar_cache)
        return run.tokens_per_second * best_ar / ours

    print("\nvs AR: each run's tokens/s over left to right's, run right after it on the same prompt cache "
          "(median over the runs)", file=out)
    ar_context = len(ids) + (args.ar_tokens or 32) // 2
    summary = []
    for name, knobs, also in cost_shapes(names, caps):
        rows = run_setting(model, ids, name, first_blocks(knobs, args.max_tokens or 128), also, out, prompt_cache,
                           args.min_calls, beside)
        found = break_even([(row.result.tokens_per_call, row.vs_ar) for row in rows], 1.0)
        fitted = break_even([(row.result.tokens_per_call,
                              estimated_tokens_per_second(row.calls, len(row.result.tokens), a, wbytes, roof))
                             for row in rows], estimated_ar_tokens_per_second(a, wbytes, roof, ar_context))
        print(f"break-even: {format_break_even(found)} tokens per call measured "
              f"(the roofline fitted here predicts {format_break_even(fitted)})", file=out)
        summary.append((", ".join([name] + also), found, fitted, device_estimates(rows, a, wbytes, ar_context),
                        device_estimates(rows, a, wbytes, ar_context, (times, here))))

    again = max(left_to_right_rows(model, ids, args.ar_tokens or 32, [], out, cached=True, pick=max, both=True))
    print(f"left to right again after the sweep: {again:.1f} tok/s against {best_ar:.1f} before "
          f"({again / best_ar:.2f}x: how much the machine's speed drifted during the run)", file=out)
    print_summary(f"shape {args.shape} {dtype}{quant}", summary, out)
