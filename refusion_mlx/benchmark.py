"""Plan-and-infill against left-to-right decoding of the same model, measured in one run.

    python -m refusion_mlx.benchmark --model PATH_OR_REPO --prompt "..." [knobs]

Prints the forward time per token count (the backend's state at a glance), then
tokens/s, TPF, model calls per token and peak memory for both decoders, and the
speed-up ratio. Every run is preceded by a warm-up run of the same work.
"""

import argparse
import sys
import time
from typing import List, Optional, Sequence

import mlx.core as mx

from .autoregressive import generate_ar_ids
from .cache import SlotCache
from .decode import GenerationResult, generate_ids
from .presets import PRESETS
from .errors import ArgumentParser, RefusionError

FORWARD_SIZES = (1, 8, 32, 128)


def forward_time(model, n_tokens: int, context: int = 64, repeats: int = 3) -> float:
    """Median seconds of one forward of ``n_tokens`` after ``context`` cached tokens."""
    cache = SlotCache(len(model.layers), context + n_tokens)
    prefix = mx.zeros((1, context), dtype=mx.int32)
    model(prefix, None, cache, cache.append(context))
    cache.commit(context)
    mx.eval([layer.keys for layer in cache.layers])
    tokens = mx.ones((1, n_tokens), dtype=mx.int32)
    positions = mx.arange(context, context + n_tokens)[None]
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        tic = time.perf_counter()
        mx.eval(model(tokens, positions, cache, cache.append(n_tokens)))
        times.append(time.perf_counter() - tic)
    return sorted(times[1:])[len(times[1:]) // 2]


def row(name: str, r: GenerationResult) -> str:
    calls_per_token = r.model_calls / max(len(r.tokens), 1)
    return (f"{name:<17}{len(r.tokens):>7}{r.wall_time:>9.3f}{r.tokens_per_second:>10.1f}"
            f"{r.tpf:>7.2f}{calls_per_token:>12.3f}{r.peak_memory:>9.3f}")


def run_benchmark(model, ids: Sequence[int], knobs: dict, eos: List[int], out=sys.stdout):
    """Warm up, then time both decoders on the same prompt and print the table."""
    sizes = [n for n in FORWARD_SIZES if n + 64 <= model.args.max_position_embeddings]
    timings = ", ".join(f"{n} tok {1000 * forward_time(model, n):.1f} ms" for n in sizes)
    print(f"forward time (after 64 cached tokens): {timings}", file=out)

    def plan_and_infill():
        return generate_ids(model, ids, eos_token_id=eos, **knobs)

    def left_to_right():
        return generate_ar_ids(model, ids, max_tokens=knobs["gen_length"], temperature=knobs["temperature"],
                               seed=knobs.get("seed"), eos_token_id=eos)

    plan_and_infill(), left_to_right()  # warm-up: kernels compiled, memory allocated
    pi, ar = plan_and_infill(), left_to_right()
    print(f"{'decoder':<17}{'tokens':>7}{'time s':>9}{'tok/s':>10}{'TPF':>7}{'calls/token':>12}{'peak GB':>9}",
          file=out)
    print(row("plan-and-infill", pi), file=out)
    print(row("autoregressive", ar), file=out)
    if ar.tokens_per_second > 0:
        print(f"speed-up (tokens/s, plan-and-infill / autoregressive): "
              f"{pi.tokens_per_second / ar.tokens_per_second:.2f}x", file=out)
    same = pi.tokens == ar.tokens
    print(f"identical output: {'yes' if same else 'no'}", file=out)
    return pi, ar


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m refusion_mlx.benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="local folder or Hugging Face repo id")
    parser.add_argument("--prompt", default="Write a Python function that returns the n-th Fibonacci number.")
    parser.add_argument("--ignore-chat-template", action="store_true")
    parser.add_argument("--preset", choices=sorted(PRESETS))
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--slot-size", type=int)
    parser.add_argument("--blocks", type=int)
    parser.add_argument("--slot-threshold", type=float)
    parser.add_argument("--token-threshold", type=float)
    parser.add_argument("--temp", type=float, default=0.0)
    parser.add_argument("--seed", type=int)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .blas import blas_report, warn_if_slow_blas
    from .generate import settings_from_args
    from .loading import load
    from .text import default_eos, prompt_ids

    args = build_parser().parse_args(argv)
    try:
        knobs = settings_from_args(args)
        model, tokenizer = load(args.model)
        ids = prompt_ids(tokenizer, args.prompt, use_chat_template=not args.ignore_chat_template)
        warn_if_slow_blas()
        print(f"model: {args.model}  device: {mx.default_device()}  prompt: {len(ids)} tokens")
        print(blas_report())
        print("knobs: " + ", ".join(f"{k}={v}" for k, v in knobs.items()))
        run_benchmark(model, ids, knobs, default_eos(tokenizer))
    except RefusionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
