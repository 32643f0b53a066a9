"""Step times of the scheduler while a long prompt joins four decoding sequences, with the prompt fed
whole and in chunks (``Scheduler(prefill_step=...)``): the longest step is what every other stream
waits for.

    python examples/perf/chunked_prefill.py [--model PATH] [--prompt-tokens 3000] [--step 256]

The model's positions must hold the prompt (the demo's 512 do not hold 3000: copy the demo model and
raise ``max_position_embeddings`` in its config.json; RoPE takes any position).
"""

import argparse
import statistics
import time

import mlx.core as mx

from refusion_mlx.loading import load
from refusion_mlx.scheduler import LEFT_TO_RIGHT, Scheduler
from refusion_mlx.settings import DecodeSettings


def run(model, prompt, step):
    scheduler = Scheduler(model, max_active=5, prefill_step=step)
    for k in range(4):
        scheduler.add([10 + k, 11, 12], DecodeSettings(gen_length=200), decoder=LEFT_TO_RIGHT, eos_token_id=[])
    for _ in range(5):
        scheduler.step()
    joining = scheduler.add(prompt, DecodeSettings(gen_length=4), decoder=LEFT_TO_RIGHT, eos_token_id=[])
    times = []
    while not joining.done:
        tic = time.perf_counter()
        scheduler.step()
        mx.eval(mx.array(0))
        times.append(time.perf_counter() - tic)
    for _ in range(5):  # the others alone again
        tic = time.perf_counter()
        scheduler.step()
        times.append(time.perf_counter() - tic)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--prompt-tokens", type=int, default=3000)
    parser.add_argument("--step", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    model, _ = load(args.model)
    prompt = [(7 * i) % 900 + 20 for i in range(args.prompt_tokens)]
    run(model, prompt[:300], args.step)  # warm-up
    for label, step in (("whole prompt", None), (f"chunks of {args.step}", args.step)):
        runs = [run(model, prompt, step) for _ in range(args.repeat)]
        longest = statistics.median(max(t) for t in runs)
        typical = statistics.median(statistics.median(t) for t in runs)
        total = statistics.median(sum(t) for t in runs)
        print(f"{label}: longest step {longest * 1000:.1f} ms, median step {typical * 1000:.1f} ms, "
              f"{len(runs[0])} steps in {total:.3f} s (medians of {args.repeat})")


if __name__ == "__main__":
    main()
