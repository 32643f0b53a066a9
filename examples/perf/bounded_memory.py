"""Peak memory while generating left to right with and without a bounded cache, by length.

    python examples/perf/bounded_memory.py --shape qwen3-0.6b --n 256 --lengths 512,2560,10240 [--bounded-only]

Random weights of a benchmark shape; each generation starts from a cleared allocator cache and
reports its peak above what was in use before it (MLX's own accounting, every device), and what
is still in use after it (a leak would show there).
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's refusion_mlx

import mlx.core as mx  # noqa: E402

from refusion_mlx.autoregressive import generate_ar_ids  # noqa: E402
from refusion_mlx.benchmark import random_model  # noqa: E402


def peak_above_start(model, prompt, tokens: int, max_kv_size) -> tuple:
    mx.clear_cache()
    before = mx.get_active_memory()
    generate_ar_ids(model, prompt, max_tokens=tokens, eos_token_id=[], max_kv_size=max_kv_size)
    peak = mx.get_peak_memory()  # generate_ar_ids resets the peak once its cache is made
    mx.clear_cache()
    return (peak - before) / 1e6, (mx.get_active_memory() - before) / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="small")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--n", type=int, default=256, help="--max-kv-size of the bounded runs")
    parser.add_argument("--lengths", default="512,2560", help="comma-separated generated lengths")
    parser.add_argument("--bounded-only", action="store_true")
    args = parser.parse_args()
    model = random_model(args.shape, args.dtype)
    prompt = list(range(10, 42))
    generate_ar_ids(model, prompt, max_tokens=8, eos_token_id=[], max_kv_size=args.n)  # warm-up
    print(f"shape {args.shape}, {args.dtype}, N={args.n}, device {mx.default_device()}, mlx {mx.__version__}")
    for bounded in (args.n,) if args.bounded_only else (args.n, None):
        for tokens in (int(x) for x in args.lengths.split(",")):
            tic = time.perf_counter()
            peak, left = peak_above_start(model, prompt, tokens, bounded)
            print(f"max_kv_size={bounded} tokens={tokens}: peak above start {peak:8.2f} MB, "
                  f"in use after {left:6.2f} MB, {time.perf_counter() - tic:.1f} s", flush=True)


if __name__ == "__main__":
    main()
