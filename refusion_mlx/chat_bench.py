"""Conversations with and without a prompt cache, and memory with and without a bounded cache.

    python -m refusion_mlx.chat_bench                          # the demo model (offline)
    python -m refusion_mlx.chat_bench --shape qwen3-8b         # random weights of the 8B shape

Part 1, a chat with growing history: every turn appends a user message to the conversation
(its earlier answers included) and decodes with plan-and-infill. With a model's own tokenizer
the turns are one of the demo's multi-turn test conversations, rendered by the chat template
as ``chat`` renders them (the answers as decoded text, so a cache may re-feed an answer whose
text re-tokenizes differently); with ``--shape``, random token ids appended to the history. With the cache only the new
turn is fed; without it the whole history is fed again. Per turn it prints the prompt tokens,
the tokens fed from the prompt, the time to first token and the answer's tokens/s. The time to
first token is that of a left-to-right first token (the prefill plus one step, in a copy of the
turn's cache): how soon a plan-and-infill token is final depends on the model's confidence,
which random weights do not have. Both runs feed the same prompts (the answers of the cached
run), turn by turn, one after the other.

Part 2, peak memory while generating 2N and 10N tokens left to right, with an unbounded cache
and with ``--max-kv-size N``: a bounded cache's memory stays flat.

Timings are printed, never asserted; ratios are measured in one run. Random weights (``--shape``)
give real per-call costs and meaningless text.
"""

import sys
import time
from typing import List, Optional, Sequence

import mlx.core as mx

from .cli import ArgumentParser, run_command


def user_turns(tokenizer, model, count: int, length: int) -> tuple:
    """(system prompt or None, ``count`` user turns): with a tokenizer, the user messages of the demo's
    first multi-turn test conversation that has that many turns (texts); else random token ids."""
    import random

    if tokenizer is not None:
        from .demo.conversations import test_split

        for record in test_split(size=200):
            users = [m["content"] for m in record["messages"] if m["role"] == "user"]
            if len(users) >= count:
                system = [m["content"] for m in record["messages"] if m["role"] == "system"]
                return (system or [None])[0], users[:count]
        from .errors import RefusionError

        raise RefusionError(f"no demo test conversation has {count} turns")
    rng = random.Random(0)
    return None, [[rng.randrange(100, model.args.vocab_size - 100) for _ in range(length)] for _ in range(count)]


class History:
    """A conversation as the next turn's prompt ids: through the chat template when there is a
    tokenizer (answers as the text the user saw, as ``chat`` keeps them), else token ids joined."""

    def __init__(self, tokenizer, system: Optional[str] = None):
        self.tokenizer, self.ids = tokenizer, []
        self.messages = [{"role": "system", "content": system}] if system else []

    def ask(self, turn) -> List[int]:
        if self.tokenizer is None:
            self.ids = self.ids + list(turn)
            return self.ids
        from .tokenizer_utils import prompt_ids

        self.messages.append({"role": "user", "content": turn})
        return prompt_ids(self.tokenizer, self.messages)

    def answer(self, ids: List[int]):
        if self.tokenizer is None:
            self.ids = self.ids + list(ids)
        else:
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            self.messages.append({"role": "assistant", "content": text})


def first_token_time(model, prompt: Sequence[int], prompt_cache=None, repeats: int = 3) -> float:
    """Seconds to the first token left to right: the prefill of what the cache lacks, plus one step
    (the median of ``repeats``, each from its own copy of the cache: one run is a few ms on a CPU)."""
    from .autoregressive import generate_ar_ids

    times = []
    for _ in range(repeats):
        copy = prompt_cache.copy() if prompt_cache is not None else None
        tic = time.perf_counter()
        generate_ar_ids(model, list(prompt), max_tokens=1, eos_token_id=[], prompt_cache=copy)
        times.append(time.perf_counter() - tic)
    return sorted(times)[len(times) // 2]


def decode_turn(model, prompt: Sequence[int], knobs: dict, prompt_cache=None) -> dict:
    """One turn: time to first token, decoding time, the answer."""
    from .decode import generate_step
    from .state import start_state
    from .settings import settings_for
    from .transcript import Transcript

    ttft = first_token_time(model, prompt, prompt_cache)
    knobs = dict(knobs)
    eos = knobs.pop("eos", [])
    settings = settings_for(model, len(prompt), **knobs)
    state = start_state(model, list(prompt), settings, None, eos, prompt_cache)
    transcript = Transcript(state.eos_ids, settings.gen_length)
    tic = time.perf_counter()
    for commit in generate_step(model, state, settings):
        transcript.add(commit)
    wall = time.perf_counter() - tic
    if prompt_cache is not None:
        prompt_cache.record(prompt, transcript.placed)
    answer = transcript.tokens()
    return dict(prompt=len(prompt), fed=len(prompt) - state.cached_tokens, ttft=ttft, wall=wall,
                answer=answer, tps=len(answer) / wall if wall else 0.0)


def chat_table(model, tokenizer, system: Optional[str], turns: list, knobs: dict, out):
    from .kv import make_prompt_cache

    cache = make_prompt_cache(model)
    history = History(tokenizer, system)
    cached_rows, fresh_rows = [], []
    for turn in turns:
        prompt = history.ask(turn)
        row = decode_turn(model, prompt, knobs, cache)
        fresh_rows.append(decode_turn(model, prompt, knobs))
        cached_rows.append(row)
        history.answer(row["answer"])
    print("| turn | prompt tokens | fed (cache) | fed (no cache) | TTFT cache (s) | TTFT no cache (s) | "
          "tokens/s cache | tokens/s no cache |", file=out)
    print("|---|---|---|---|---|---|---|---|", file=out)
    for i, (c, f) in enumerate(zip(cached_rows, fresh_rows), 1):
        print(f"| {i} | {c['prompt']} | {c['fed']} | {f['fed']} | {c['ttft']:.3f} | {f['ttft']:.3f} | "
              f"{c['tps']:.1f} | {f['tps']:.1f} |", file=out)
    last, first = cached_rows[-1], cached_rows[0]
    print(f"turn {len(turns)} time to first token: {last['ttft'] / first['ttft']:.2f}x turn 1's with the cache, "
          f"{fresh_rows[-1]['ttft'] / fresh_rows[0]['ttft']:.2f}x without; at turn {len(turns)} the cache's is "
          f"{fresh_rows[-1]['ttft'] / last['ttft']:.2f}x faster", file=out)


def peak_while_generating(model, prompt: List[int], tokens: int, max_kv_size: Optional[int]) -> float:
    """Peak memory above what was in use before (GB), generating ``tokens`` left to right."""
    from .autoregressive import generate_ar_ids

    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    generate_ar_ids(model, prompt, max_tokens=tokens, eos_token_id=[], max_kv_size=max_kv_size)
    return (mx.get_peak_memory() - before) / 1e9


def memory_table(model, n: int, out):
    prompt = list(range(10, 42))
    print(f"| generated | peak above weights, unbounded (GB) | peak, --max-kv-size {n} (GB) |", file=out)
    print("|---|---|---|", file=out)
    peaks = {}
    for tokens in (2 * n, 10 * n):
        peaks[tokens] = (peak_while_generating(model, prompt, tokens, None),
                         peak_while_generating(model, prompt, tokens, n))
        print(f"| {tokens} | {peaks[tokens][0]:.4f} | {peaks[tokens][1]:.4f} |", file=out)
    grow = [peaks[10 * n][i] / peaks[2 * n][i] for i in (0, 1)]
    print(f"peak at {10 * n} tokens / peak at {2 * n}: unbounded {grow[0]:.2f}x, bounded {grow[1]:.2f}x", file=out)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m refusion_mlx.chat_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model folder or repo (default: the demo model)")
    parser.add_argument("--shape", help="random weights of a benchmark shape instead (e.g. qwen3-8b)")
    parser.add_argument("--dtype", help="weights' dtype for --shape (default bfloat16 on a GPU, float32 on a CPU)")
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--turn-tokens", type=int, default=64, help="tokens per user turn with --shape")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--memory-n", type=int, default=256, help="N of part 2 (0 skips it)")
    return parser


def run(args) -> int:
    from .benchmark import SHAPES, random_model
    from .loading import load

    if args.shape:
        if args.shape not in SHAPES:
            from .errors import RefusionError

            raise RefusionError(f"unknown shape {args.shape!r} (choose from {', '.join(sorted(SHAPES))})")
        dtype = args.dtype or ("float32" if mx.default_device() == mx.cpu else "bfloat16")
        model, tokenizer = random_model(args.shape, dtype), None
        knobs = dict(gen_length=args.max_tokens, slot_size=8, serial_num_blocks=max(1, args.max_tokens // 32),
                     slot_threshold=0.9, token_threshold=0.3)
        print(f"shape {args.shape}, {dtype}, random weights, device {mx.default_device()}")
    else:
        model, tokenizer = load(args.model)
        knobs = dict(gen_length=args.max_tokens)
        print(f"model {args.model or 'demo'}, device {mx.default_device()}")
    from .tokenizer_utils import default_eos

    knobs["eos"] = default_eos(tokenizer) if tokenizer is not None else []
    system, turns = user_turns(tokenizer, model, args.turns, args.turn_tokens)
    warm = History(tokenizer).ask(turns[0])
    for _ in range(2):  # warm-up: kernels compiled, attention plans made for the first shapes
        decode_turn(model, warm * 4, knobs)
    if system:
        print(f"system prompt: {system!r}", file=sys.stdout)
    chat_table(model, tokenizer, system, turns, knobs, sys.stdout)
    if args.memory_n:
        memory_table(model, args.memory_n, sys.stdout)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
