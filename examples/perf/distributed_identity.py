"""Do the ranks of a split model see bit-identical logits, and what would broadcasting decisions cost?

    mlx.launch --backend ring -n 2 -- python examples/perf/distributed_identity.py [--model PATH]

Every model call's logits are gathered from all ranks and compared bit for bit (the check
itself is not timed). Then the decoder runs again unchecked, and a broadcast of one
decision-sized message from rank 0 (what "rank 0 decides, the others follow" would add to
every decoding step) is timed on its own, and so is one all_sum of one value and of an 8B
layer's output for 64 tokens (the link's latency and bandwidth as MLX sees them). Rank 0
prints: calls checked, calls whose logits differed between ranks, the time of a call, of a
broadcast, their ratio, and the all_sum times.
"""

import argparse
import sys
import time
from statistics import median

import mlx.core as mx

from refusion_mlx import generate_ar_ids, generate_ids
from refusion_mlx.distributed import broadcast_json, connect, take_part
from refusion_mlx.loading import load
from refusion_mlx.tokenizer_utils import default_eos, prompt_ids


class Checked:
    """The model, gathering every call's logits from all ranks and counting the calls where they differ."""

    def __init__(self, model, group):
        self.model, self.group, self.args, self.layers = model, group, model.args, model.layers
        self.calls = self.differing = 0

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, *args, **kwargs):
        logits = self.model(*args, **kwargs)
        every = mx.distributed.all_gather(logits[None], group=self.group)  # (ranks, ...)
        self.calls += 1
        self.differing += int(not mx.all(every == every[0]).item())
        return logits


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--prompt", default="What is 682 + 459? Work column by column.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()

    group = connect()
    if group is None:
        print("error: start this under mlx.launch (two ranks or more)", file=sys.stderr)
        return 2
    model, tokenizer = load(args.model, dtype=args.dtype, group=group)
    take_part(model, group)
    ids = prompt_ids(tokenizer, args.prompt)
    eos = default_eos(tokenizer)

    checked = Checked(model, group)
    generate_ids(checked, ids, gen_length=args.max_tokens, eos_token_id=eos)
    generate_ar_ids(checked, ids, max_tokens=args.max_tokens, eos_token_id=eos)

    generate_ids(model, ids, gen_length=args.max_tokens, eos_token_id=eos)  # warm-up
    runs = [generate_ids(model, ids, gen_length=args.max_tokens, eos_token_id=eos) for _ in range(3)]
    call_ms = median(1000 * r.wall_time / r.model_calls for r in runs)
    decision = {"slots": list(range(8)), "tokens": list(range(100000, 100032))}  # a step's worth, generous
    broadcasts = []
    for _ in range(200):
        tic = time.perf_counter()
        broadcast_json(decision, group)
        broadcasts.append(time.perf_counter() - tic)
    broadcast_ms = 1000 * median(broadcasts)
    reduce_ms = {}
    for label, shape in (("1 value", (1,)), ("64 tokens x 4096 (an 8B layer's output, bf16)", (64, 4096))):
        x = mx.ones(shape, dtype=mx.bfloat16)
        times = []
        for _ in range(100):
            tic = time.perf_counter()
            mx.eval(mx.distributed.all_sum(x, group=group))
            times.append(time.perf_counter() - tic)
        reduce_ms[label] = 1000 * median(times)

    print(f"{group.size()} ranks, {args.dtype}, device {mx.default_device()}, model {args.model}")
    print(f"calls checked: {checked.calls} (plan-and-infill and left to right, {args.max_tokens} tokens each); "
          f"calls whose logits differed between ranks: {checked.differing}")
    print(f"plan-and-infill call: {call_ms:.2f} ms (median of 3 runs); a decision broadcast from rank 0: "
          f"{broadcast_ms:.3f} ms (median of 200) = {100 * broadcast_ms / call_ms:.1f}% of a call")
    print("one all_sum over this link: " + "; ".join(f"{k}: {v:.3f} ms" for k, v in reduce_ms.items())
          + " (median of 100)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
