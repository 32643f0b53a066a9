"""An estimate of plan-and-infill's tokens/s at the 8B shape, from the demo model's real call pattern.

Random 8B weights are never confident, so they cannot show how many calls a trained model saves.
This replays what a trained model does: record every model call (tokens fed, cached context,
logits kept) of the demo model decoding the first test examples, then time plain forwards of
exactly those shapes on random weights of the 8B shape, and left-to-right steps for the same
answers. It is an estimate: the demo model's answers are short and its confidence is its own; the
8B model's would differ. The decoder's host-side work between calls is not included (the benchmark
measures a call at 1.0-1.3x a plain forward).

    python examples/perf/replay_8b.py record calls.json [--limit 100]   # any machine, demo model
    python examples/perf/replay_8b.py replay calls.json [--shape qwen3-8b] [--quantize 4]
"""

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's package, not an installed one
import refusion_mlx  # noqa: F401  (before mlx.core: the BLAS preload on Linux)
import mlx.core as mx

from refusion_mlx import generate_ids, load
from refusion_mlx.benchmark import PlainForward, RecordingModel, plain_time_of, random_model
from refusion_mlx.settings import settings_for
from refusion_mlx.evaluate import load_examples, make_cases


def record(path: str, limit: int):
    model, tokenizer = load()
    settings = settings_for(model)
    cases = make_cases(tokenizer, load_examples(None, limit, 0, 500), settings.gen_length,
                       model.args.max_position_embeddings)
    recorder, runs = RecordingModel(model), []
    for case in cases:
        recorder.calls.clear()
        result = generate_ids(recorder, case.prompt, eos_token_id=tokenizer.eos_token_ids)
        runs.append(dict(prompt=len(case.prompt), tokens=len(result.tokens), calls=list(recorder.calls)))
    with open(path, "w") as f:
        json.dump(dict(settings=str(settings), runs=runs), f)
    tokens, calls = sum(r["tokens"] for r in runs), sum(len(r["calls"]) for r in runs)
    print(f"recorded {len(runs)} generations: {tokens} tokens in {calls} calls ({calls / tokens:.3f} per token)")


def replay(path: str, shape: str, bits):
    runs = json.load(open(path))["runs"]
    model = random_model(shape, "bfloat16", bits)
    longest = max(r["prompt"] + r["tokens"] + 64 for r in runs)
    plain = PlainForward(model, longest)
    calls = [tuple(c) for r in runs for c in r["calls"]]
    plain_time_of(plain, calls)  # warm-up: every shape once
    decoder_s = plain_time_of(plain, calls)
    tokens = sum(r["tokens"] for r in runs)
    # Left to right: one prefill per prompt, then one single-token forward per generated token.
    steps = [(r["prompt"], 0, 1) for r in runs] + [(1, r["prompt"] + i, None) for r in runs for i in range(r["tokens"])]
    plain_time_of(plain, steps[: len(runs)])
    ar_s = plain_time_of(plain, steps)
    print(f"{shape} bf16{f' {bits}-bit' if bits else ''} on {mx.default_device()}: {len(runs)} generations, "
          f"{tokens} tokens, {len(calls)} plan-and-infill calls")
    print(f"plan-and-infill (the calls as plain forwards): {decoder_s:.2f} s, {tokens / decoder_s:.1f} tokens/s")
    print(f"left-to-right (prefill + one forward per token): {ar_s:.2f} s, {tokens / ar_s:.1f} tokens/s")
    print(f"estimated speed-up: {ar_s / decoder_s:.2f}x")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["record", "replay"])
    parser.add_argument("path")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--shape", default="qwen3-8b")
    parser.add_argument("--quantize", type=int)
    args = parser.parse_args()
    tic = time.perf_counter()
    record(args.path, args.limit) if args.mode == "record" else replay(args.path, args.shape, args.quantize)
    print(f"({time.perf_counter() - tic:.0f} s)")


if __name__ == "__main__":
    main()
