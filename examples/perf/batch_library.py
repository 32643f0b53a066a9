"""Batched decoding without the server: the demo model on its first 192 test prompts, at most 1, 8
and 16 sequences at a time (``batch_generate_ids``), with each step's time split into waiting for
the device and host work.

    python examples/perf/batch_library.py [--requests 192] [--packed | --padded]

Prints tokens/s per batch size, steps, the mean number of sequences per step, and ms per step.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's refusion_mlx

from refusion_mlx import load  # noqa: E402  (first: it loads a fast BLAS before mlx.core)
import mlx.core as mx  # noqa: E402
from refusion_mlx import batch, scheduler  # noqa: E402
from refusion_mlx.demo.tasks import test_split  # noqa: E402
from refusion_mlx.tokenizer_utils import default_eos, prompt_ids  # noqa: E402


class TimedEval:
    """``mx`` as the batch module sees it, with the time spent in ``eval`` added up."""

    seconds = 0.0

    def __getattr__(self, name):
        return getattr(mx, name)

    def eval(self, *arrays):
        tic = time.perf_counter()
        mx.eval(*arrays)
        TimedEval.seconds += time.perf_counter() - tic


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=192)
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument("--packed", action="store_true", help="the CPU's layout on any device")
    layout.add_argument("--padded", action="store_true", help="the GPU's layout on any device")
    args = parser.parse_args()

    model, tokenizer = load()
    prompts = [prompt_ids(tokenizer, x["query"]) for x in test_split(size=args.requests)]
    eos = default_eos(tokenizer)
    scheduler.mx = TimedEval()
    counts = {"steps": 0, "sequences": 0, "seconds": 0.0}
    step = scheduler.Scheduler.step

    def counted_step(self):
        if args.packed or args.padded:
            self.executor.packed = args.packed
        counts["steps"] += 1
        counts["sequences"] += len(self.active)
        tic = time.perf_counter()
        left = step(self)
        counts["seconds"] += time.perf_counter() - tic
        return left

    scheduler.Scheduler.step = counted_step
    print(f"device {mx.default_device()}, {len(prompts)} prompts")
    for size in [size for size in (1, 8, 16) if size <= len(prompts)]:
        batch.batch_generate_ids(model, prompts[:32], max_batch_size=size, eos_token_id=eos)  # warm-up
        TimedEval.seconds = 0.0
        counts.update(steps=0, sequences=0, seconds=0.0)
        tic = time.perf_counter()
        results = batch.batch_generate_ids(model, prompts, max_batch_size=size, eos_token_id=eos)
        wall = time.perf_counter() - tic
        steps = counts["steps"]
        print(f"batch {size:>2}: {sum(len(r.tokens) for r in results) / wall:8.0f} tokens/s, {steps} steps, "
              f"{counts['sequences'] / steps:.2f} sequences per step, {counts['seconds'] / steps * 1e3:.2f} ms "
              f"per step ({TimedEval.seconds / steps * 1e3:.2f} waiting for the device, "
              f"{(counts['seconds'] - TimedEval.seconds) / steps * 1e3:.2f} on the host)")


if __name__ == "__main__":
    main()
