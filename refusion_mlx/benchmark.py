"""Plan-and-infill against left-to-right decoding of the same weights, measured in one run.

    python -m refusion_mlx.benchmark [--model PATH_OR_REPO] [--prompt "..."] [knobs]
    python -m refusion_mlx.benchmark --shape qwen3-8b [--dtype bfloat16] [--quantize 4]
    python -m refusion_mlx.benchmark --shape qwen3-8b --break-even [--presets gsm8k,gpqa]

With ``--model`` (default: the packaged demo model) it decodes a real prompt. With
``--shape`` it builds random weights of a named shape instead, so the real model's
per-call cost can be measured without downloading it.

Printed, each after an untimed warm-up on a shorter prompt: the plain forward's time
by token count; for plan-and-infill the time per model call and its ratio to plain
forwards of the same fed tokens after the same context (the decoder's own overhead),
tokens/s, tokens per model call (and upstream's TPF, for comparison with the paper) and peak memory; left-to-right decoding by this
package and by mlx-lm's ``generate_step`` on the very same arrays; and the speed-up
against the faster of the two left-to-right loops. ``--break-even`` instead sweeps scripted
decisions for tokens/s as a function of tokens per call (``break_even.py``).
"""

import argparse
import dataclasses
import sys
import time
from collections import Counter
from statistics import median
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .autoregressive import generate_ar_ids
from .kv import SlotCache
from .decode import generate_ids
from .settings import DecodeSettings
from .transcript import GenerationResult
from .cli import ArgumentParser, prog, run_command
from .errors import RefusionError
from .presets import PRESETS

# Qwen3 shapes (the 8B one is ReFusion's backbone); "small" is sized for a laptop CPU.
SHAPES: Dict[str, dict] = {
    "qwen3-8b": dict(hidden_size=4096, num_hidden_layers=36, intermediate_size=12288, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=False),
    "qwen3-1.7b": dict(hidden_size=2048, num_hidden_layers=28, intermediate_size=6144, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, intermediate_size=3072, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "small": dict(hidden_size=1024, num_hidden_layers=8, intermediate_size=3072, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=128, vocab_size=32000, tie_word_embeddings=False),
}
# Where the shape benchmarks run plan-and-infill: the slot sizes and block counts upstream was timed with.
SHAPE_SETTINGS = [dict(slot_size=32, serial_num_blocks=2, slot_threshold=0.9, token_threshold=0.3),
                  dict(slot_size=8, serial_num_blocks=8, slot_threshold=0.9, token_threshold=0.3)]
FORWARD_SIZES = (1, 8, 32, 128)
DEMO_PROMPT = "What is 682 + 459? Work column by column."  # = demo.tasks.EXAMPLE_QUERIES[0] (tested)
RANDOM_WEIGHTS_NOTE = (
    "Random weights: a random model is never confident, so plan-and-infill runs at its worst case\n"
    "(about 2 model calls per token). These numbers show what one call costs, not how many calls\n"
    "a trained model saves; tokens/s of a real model follow from calls per token (see the README).")


def random_model(shape: str, dtype: str = "bfloat16", bits: Optional[int] = None, group_size: int = 64,
                 group: Optional[mx.distributed.Group] = None):
    """A ReFusion model of a named shape with random weights, cast and optionally quantized;
    with ``group``, this rank's shard of it (the same seed on every rank: the same model)."""
    from .utils import DTYPES
    from .model import Model, ModelArgs

    args = ModelArgs(model_type="qwen3", rms_norm_eps=1e-6, max_position_embeddings=40960,
                     rope_theta=1e6, mask_token_id=SHAPES[shape]["vocab_size"] - 2, eos_token_id=None,
                     **SHAPES[shape])
    mx.random.seed(0)
    model = Model(args)
    model.set_dtype(DTYPES[dtype])
    if bits:
        nn.quantize(model, group_size=group_size, bits=bits)
    if group is not None:
        model.shard(group)
    mx.eval(model.parameters())
    return model


def mlx_lm_twin(model):
    """mlx-lm's own qwen3 model holding the very same weight arrays (no copy)."""
    from mlx_lm.models import qwen3

    config = {k: v for k, v in dataclasses.asdict(model.args).items() if v is not None}
    twin = qwen3.Model(qwen3.ModelArgs.from_dict(config))
    quantized = {path: (m.group_size, m.bits) for path, m in model.named_modules() if hasattr(m, "bits")}
    if quantized:
        def same_as_ours(path, module):
            if path not in quantized:
                return False
            group_size, bits = quantized[path]
            return {"group_size": group_size, "bits": bits}

        nn.quantize(twin, class_predicate=same_as_ours)
    if getattr(model, "group", None) is not None:
        twin.shard(model.group)  # mlx-lm's own tensor parallelism: the same split as ours
    twin.load_weights(tree_flatten(model.parameters()), strict=True)
    return twin


class RecordingModel:
    """The model, noting each call's fed tokens, context (committed cache entries) and logits kept."""

    def __init__(self, model):
        self.model, self.args, self.layers = model, model.args, model.layers
        self.calls: List[Tuple[int, int, Optional[int]]] = []

    def __getattr__(self, name):  # anything else (the model's own decoding defaults...) is the model's
        return getattr(self.model, name)

    def __call__(self, inputs, positions=None, cache=None, view=None, last=None):
        self.calls.append((inputs.shape[1], cache.length if cache is not None else 0, last))
        return self.model(inputs, positions, cache, view, last=last)


class PlainForward:
    """Times plain forwards: ``n`` tokens at contiguous positions after ``context`` cached ones.

    This is the call a left-to-right decoder makes (causal, exact key length), the
    yardstick a plan-and-infill call is compared with.
    """

    def __init__(self, model, max_context: int):
        self.model = model
        self.cache = SlotCache(len(model.layers), max_context + 512, bucket=1)
        prefix = mx.ones((1, max_context), dtype=mx.int32)
        mx.eval(model(prefix, 0, self.cache, self.cache.append(max_context), last=1))
        self.cache.commit(max_context)
        self.filled = max_context

    def __call__(self, n: int, context: int, last: Optional[int] = None, repeats: int = 1,
                 pick=None) -> float:
        """Median seconds of ``repeats`` forwards (or ``pick``'s choice: ``min``), after one untimed warm-up."""
        self.cache.length = self.filled  # the prefix entries stay valid: forwards only write after them
        self.cache.crop(context)
        tokens = mx.ones((1, n), dtype=mx.int32)
        times = []
        for _ in range(repeats + 1):
            tic = time.perf_counter()
            mx.eval(self.model(tokens, context, self.cache, self.cache.append(n), last=last))
            times.append(time.perf_counter() - tic)
        return pick(times[1:]) if pick else sorted(times[1:])[len(times[1:]) // 2]


def plain_time_of(plain: PlainForward, calls: Sequence[Tuple[int, int, Optional[int]]], grain: int = 32) -> float:
    """Seconds that plain forwards of the same fed tokens and contexts take, summed over ``calls``.

    Calls are grouped by (tokens, logits kept, context rounded down to ``grain``): the
    context changes a forward's cost very little, and one measurement per group keeps
    the benchmark short.
    """
    groups = Counter((n, last, context // grain * grain) for n, context, last in calls)
    return sum(count * plain(n, context, last) for (n, last, context), count in groups.items())


def time_mlx_lm(twin, ids: Sequence[int], n: int, prompt_cache=None) -> Tuple[float, List[int]]:
    """Seconds and tokens of mlx-lm's ``generate_step`` (greedy, prompt included) for ``n`` tokens.

    With ``prompt_cache`` (mlx-lm's, holding all but the last prompt token) only the last prompt
    token is fed, and the cache is trimmed back to that afterwards."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import trim_prompt_cache

    fed = ids[-1:] if prompt_cache is not None else ids
    tic = time.perf_counter()
    steps = (t for t, _ in generate_step(mx.array(fed), twin, max_tokens=n, prompt_cache=prompt_cache))
    tokens = [int(t) for t, _ in zip(steps, range(n))]
    wall = time.perf_counter() - tic
    if prompt_cache is not None:
        trim_prompt_cache(prompt_cache, prompt_cache[0].offset - (len(ids) - 1))
    return wall, tokens


def cached_prompts(model, twin, ids: Sequence[int]):
    """Prompt caches holding ``ids`` (all but the last token) for this package's and for mlx-lm's
    loop: decoding from them times the decoding alone, without the prefill."""
    from mlx_lm.models.cache import make_prompt_cache as mlx_lm_cache

    from .autoregressive import prefill_ids
    from .kv.prompt import make_prompt_cache

    ours = make_prompt_cache(model)
    prefill_ids(model, ids, ours)
    theirs = mlx_lm_cache(twin)
    mx.eval(twin(mx.array(ids[:-1])[None], cache=theirs))
    return ours, theirs


def warm_up_prompt(ids: Sequence[int]) -> List[int]:
    """A short prompt for the warm-up runs: kernels get compiled, but the timed runs meet sequence
    lengths never seen before, as a new request does (a backend that builds a plan per attention
    shape pays for it in the first timed run, as it would in use)."""
    return list(ids[:8])


def left_to_right_rows(model, ids: Sequence[int], n: int, eos: List[int], out, repeats: int = 3,
                       cached: bool = False, pick=median, both: bool = False):
    """Time left-to-right decoding by this package and by mlx-lm, taking turns; return the faster tokens/s.

    Each loop runs the same request ``repeats`` times, alternating with the other (so a
    busy machine slows both alike); the median of each is printed. ``cached``: both start from
    a prompt cache holding all but the last prompt token (decoding timed without the prefill).
    ``pick``: how each loop's runs make one figure (``max``: the fastest, on a shared machine).
    ``both``: return (ours, mlx-lm's) tokens/s.
    """
    twin = mlx_lm_twin(model)
    generate_ar_ids(model, warm_up_prompt(ids), max_tokens=8, eos_token_id=eos)
    time_mlx_lm(twin, warm_up_prompt(ids), 8)
    ours_cache, theirs_cache = cached_prompts(model, twin, ids) if cached else (None, None)
    ours_runs, theirs_runs = [], []
    for _ in range(repeats):
        ours = generate_ar_ids(model, ids, max_tokens=n, eos_token_id=eos, prompt_cache=ours_cache)
        # As many tokens (ours may stop at an EOS).
        wall, theirs = time_mlx_lm(twin, ids, len(ours.tokens), theirs_cache)
        ours_runs.append(ours.tokens_per_second)
        theirs_runs.append(len(theirs) / wall)
    ours_tps, theirs_tps = pick(ours_runs), pick(theirs_runs)
    prefill = "prompt cached: decoding alone" if cached else "prefill included"
    picked = "fastest" if pick is max else "median"
    print(f"\nleft-to-right, {len(ours.tokens)} tokens after the {len(ids)}-token prompt ({prefill}; "
          f"{picked} of {repeats} runs each, taking turns):", file=out)
    print(f"{'decoder':<28}{'tok/s':>9}{'ms/token':>10}{'vs mlx-lm':>11}", file=out)
    print(f"{'refusion_mlx':<28}{ours_tps:>9.1f}{1000 / max(ours_tps, 1e-9):>10.2f}"
          f"{ours_tps / theirs_tps:>10.2f}x", file=out)
    print(f"{'mlx-lm generate_step':<28}{theirs_tps:>9.1f}{1000 / theirs_tps:>10.2f}{1.0:>10.2f}x", file=out)
    print(f"same tokens: {'yes' if theirs == ours.tokens else 'no'}", file=out)
    return (ours_tps, theirs_tps) if both else max(ours_tps, theirs_tps)


def describe(knobs: dict) -> str:
    return (f"s={knobs['slot_size']},b={knobs['serial_num_blocks']},"
            f"st={knobs['slot_threshold']},tt={knobs['token_threshold']}")


def plan_and_infill_rows(model, ids: Sequence[int], settings: List[dict], eos: List[int], out
                         ) -> List[GenerationResult]:
    """Time plan-and-infill at each setting, and compare every call with a plain forward."""
    recorder = RecordingModel(model)
    # Room for the padded generation: a --max-tokens short of whole slots in every block is padded.
    plain = PlainForward(model, len(ids) + max(DecodeSettings(**k).padded_length for k in settings))
    print(f"\nplan-and-infill, prompt {len(ids)} tokens:", file=out)
    print(f"{'setting':<28}{'tokens':>7}{'calls':>7}{'ms/call':>9}{'plain ms':>10}{'ratio':>7}"
          f"{'tok/s':>9}{'tok/call':>9}{'paper TPF':>10}{'peak GB':>9}", file=out)
    results = []
    for knobs in settings:
        shortest = dict(knobs, gen_length=knobs["slot_size"] * knobs["serial_num_blocks"])
        generate_ids(model, warm_up_prompt(ids), eos_token_id=eos, **shortest)
        # Positions out of order, as infill rows have them (a confident model may not infill above).
        mx.eval(model(mx.array([ids[:3]]), mx.array([[2, 0, 1]])))
        for run in ("first", "again"):
            recorder.calls.clear()
            r = generate_ids(recorder, ids, eos_token_id=eos, **knobs)
            plain_s = plain_time_of(plain, recorder.calls)
            calls = max(r.model_calls, 1)
            print(f"{describe(knobs) + ' ' + run:<28}{len(r.tokens):>7}{r.model_calls:>7}"
                  f"{1000 * r.wall_time / calls:>9.2f}{1000 * plain_s / calls:>10.2f}{r.wall_time / plain_s:>6.2f}x"
                  f"{r.tokens_per_second:>9.1f}{r.tokens_per_call:>9.2f}{r.tpf:>10.2f}{r.peak_memory:>9.3f}", file=out)
        results.append(r)
    print("ratio: a call's time over plain forwards of the same fed tokens after the same contexts;\n"
          "first: the request's lengths never seen before; again: the same request repeated;\n"
          "tok/call: tokens returned per model call, every call counted; paper TPF: upstream's\n"
          "tokens-per-forward credit, only for comparison with the paper", file=out)
    return results


def forward_table(model, contexts: Sequence[int], sizes: Sequence[int], out):
    plain = PlainForward(model, max(contexts))
    print("\nplain forward, ms (rows: cached tokens before it; columns: tokens fed)", file=out)
    print(f"{'':<10}" + "".join(f"{n:>9}" for n in sizes), file=out)
    for context in contexts:
        print(f"{context:<10}" + "".join(f"{1000 * plain(n, context, repeats=3):>9.2f}" for n in sizes), file=out)


def weights_gb(model) -> float:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters())) / 1e9


def shape_dtype(requested: Optional[str], device=None) -> Tuple[str, str]:
    """The dtype of ``--shape``'s random weights and why: ``requested``, else the one ``device``
    (default: MLX's default device) runs well: float32 on the CPU, whose bfloat16 products are
    slow (a 256-token forward of the small shape took 45.6 s in bfloat16 on a 2-core Linux CPU),
    bfloat16 on a GPU (the real model's dtype)."""
    if requested:
        return requested, "--dtype"
    device = mx.default_device() if device is None else device
    if device == mx.cpu:
        return "float32", "the CPU's default; --dtype to change"
    return "bfloat16", "the GPU's default; --dtype to change"


def run_shape(args, out=None):
    """The random-weights benchmark at a named shape."""
    from .distributed import connect, ranks_note, take_part

    group = connect()
    dtype, why = shape_dtype(args.dtype)
    model = random_model(args.shape, dtype, args.quantize, args.q_group_size, group)
    take_part(model, group, args.verbose)
    out = out or sys.stdout  # looked up now (after take_part, which silences the other ranks)
    gen = args.max_tokens or 256
    ids = mx.random.randint(0, model.args.vocab_size - 2, (args.prompt_tokens,)).tolist()
    quant = f", {args.quantize}-bit (group {args.q_group_size})" if args.quantize else ""
    where = " on this rank" if group else ""
    print(f"shape {args.shape}: {model.args.num_hidden_layers} layers, hidden {model.args.hidden_size}, "
          f"vocabulary {model.args.vocab_size}; {dtype} ({why}){quant}; weights {weights_gb(model):.2f} GB"
          f"{where}; device {mx.default_device()}; mlx {mx.__version__}{ranks_note(group)}", file=out)
    print(RANDOM_WEIGHTS_NOTE, file=out)
    forward_table(model, [len(ids), len(ids) + gen], FORWARD_SIZES + (256,), out)
    settings = [dict(knobs, gen_length=gen) for knobs in SHAPE_SETTINGS]
    plan_and_infill_rows(model, ids, settings, [], out)
    left_to_right_rows(model, ids, args.ar_tokens or min(gen, 128), [], out)


def run_model(args, out=None):
    """The benchmark on a real checkpoint and prompt."""
    from .blas import blas_report, warn_if_slow_blas
    from .cli import settings_from_args
    from .distributed import load_for_command, ranks_note, shared_seed
    from .tokenizer_utils import default_eos, prompt_ids

    settings_from_args(args)  # bad flags fail before the load
    model, tokenizer, group = load_for_command(args.model, args.adapter_path, args.dtype, args.verbose)
    out = out or sys.stdout  # looked up now (after the load, which silences ranks other than 0)
    args.seed = shared_seed(args.seed, group)  # every rank must sample alike
    prompt = args.prompt or DEMO_PROMPT
    ids = prompt_ids(tokenizer, prompt, use_chat_template=not args.ignore_chat_template)
    knobs = settings_from_args(args, model, len(ids))  # unset knobs: the model's own, fitted
    eos = default_eos(tokenizer)
    warn_if_slow_blas()
    print(f"model: {args.model or 'demo'}  device: {mx.default_device()}  prompt: {len(ids)} tokens"
          f"{ranks_note(group)}", file=out)
    print(blas_report(), file=out)
    sizes = [n for n in FORWARD_SIZES if len(ids) + n <= model.args.max_position_embeddings]
    forward_table(model, [len(ids)], sizes, out)
    pi = plan_and_infill_rows(model, ids, [knobs], eos, out)[0]
    best_ar = left_to_right_rows(model, ids, knobs["gen_length"], eos, out)
    print(f"\nspeed-up (tokens/s, plan-and-infill / the faster left-to-right loop): "
          f"{pi.tokens_per_second / best_ar:.2f}x", file=out)
    ar = generate_ar_ids(model, ids, max_tokens=knobs["gen_length"], eos_token_id=eos)
    print(f"same text as left-to-right: {'yes' if pi.tokens == ar.tokens else 'no'}", file=out)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=prog("benchmark"), description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="local folder or Hugging Face repo id (default: the demo model)")
    source.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape instead of a model")
    parser.add_argument("--adapter-path", help="folder with fine-tuned adapters (with --model)")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                        help="weights' dtype (default: the checkpoint's; for --shape, float32 on the CPU, "
                             "bfloat16 on a GPU)")
    parser.add_argument("--quantize", type=int, choices=[2, 3, 4, 5, 6, 8], help="quantize --shape weights")
    parser.add_argument("--q-group-size", type=int, default=64, choices=[32, 64, 128])
    parser.add_argument("--prompt-tokens", type=int, default=200, help="prompt length for --shape")
    parser.add_argument("--ar-tokens", type=int, help="left-to-right tokens for --shape (default min(128, max tokens))")
    parser.add_argument("--break-even", action="store_true",
                        help="with --shape: tokens/s against left to right by tokens committed per call, from "
                             "scripted decisions, and the break-even per setting (break_even.py)")
    parser.add_argument("--presets", help="with --break-even: comma-separated presets (and 'default') to run "
                                          "(default: all)")
    parser.add_argument("--estimate", action="store_true",
                        help="with --break-even: only the Apple GPU estimates, from the calls' widths (no forward "
                             "of the shape is run)")
    parser.add_argument("--min-calls", type=int, default=32,
                        help="with --break-even: run each profile again until its runs made this many calls "
                             "(at most 8 runs); the fastest run counts")
    parser.add_argument("--plan-slots-sweep", help="with --break-even: comma-separated plan_slots caps; each "
                                                   "setting is also run capped at each")
    parser.add_argument("--prompt", help=f"prompt for --model (default: {DEMO_PROMPT!r})")
    parser.add_argument("--ignore-chat-template", action="store_true")
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--slot-size", type=int)
    parser.add_argument("--blocks", type=int)
    parser.add_argument("--slot-threshold", type=float)
    parser.add_argument("--token-threshold", type=float)
    parser.add_argument("--plan-slots", type=int)
    parser.add_argument("--temp", type=float, default=0.0)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--verbose", action="store_true", help="under mlx.launch: each rank names its shard")
    return parser


def run(args) -> int:
    if args.shape:
        if args.max_tokens is not None and args.max_tokens <= 0:
            raise RefusionError(f"--max-tokens must be positive, got {args.max_tokens}")
        if args.prompt_tokens <= 0:
            raise RefusionError(f"--prompt-tokens must be positive, got {args.prompt_tokens}")
        if args.break_even and args.min_calls < 1:
            raise RefusionError(f"--min-calls must be positive, got {args.min_calls}")
        if args.break_even:
            from .break_even import run_break_even, run_estimate

            (run_estimate if args.estimate else run_break_even)(args)
        else:
            run_shape(args)
    else:
        if args.break_even:
            raise RefusionError("--break-even needs --shape (random weights of a named shape)")
        if args.quantize:
            raise RefusionError("--quantize applies to --shape; quantize a checkpoint with refusion-convert")
        run_model(args)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command(run, build_parser().parse_args(argv), decode_flags=True)


if __name__ == "__main__":
    sys.exit(main())
