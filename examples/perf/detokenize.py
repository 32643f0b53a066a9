"""Reading an answer as text while it grows one token at a time: ms per token, the old way against
``TextTranscript``'s.

Old way (before the incremental reader): at every token the whole gap-free start is decoded again
and every stop string is looked for in the whole text; with logprobs (completions), each token's
``text_offset`` decodes every token before it. New way: ``TextTranscript.add`` (a few tokens'
window decoded per token, stops looked for where the text changed) and ``TextTranscript.offset``.
Both read the same text, checked at the end.

    python examples/perf/detokenize.py [--tokenizer FOLDER] [--lengths 256 1024 4096]

The answer is English with some multi-byte characters, committed left to right (one token per
commit: the most reads), with two stop strings that never occur (so every search runs to the end).
"""

import argparse
import time
from pathlib import Path

from refusion_mlx.loading import DEMO_MODEL_PATH
from refusion_mlx.transcript import Commit, TextTranscript, Transcript

PARAGRAPH = ("The quick brown fox jumps over the lazy dog, then naps in the café. Column by column: "
             "6 + 9 = 15, carry 1. Ünïcödé and 日本語 and 😀 too.\n")
STOPS = ["\nUser:", "<|never|>"]


def answer_ids(tokenizer, length: int) -> list:
    ids = []
    while len(ids) < length:
        ids += tokenizer.encode(PARAGRAPH, add_special_tokens=False)
    return ids[:length]


def old_way(tokenizer, ids, logprobs: bool) -> str:
    transcript, text = Transcript([], len(ids)), ""
    decode = lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True)  # noqa: E731
    for k, token in enumerate(ids):
        transcript.add(Commit([k], [token], "left-to-right", 1, 1.0))
        prefix = transcript.prefix(with_eos=True)
        text = decode(prefix)
        for stop in STOPS:
            text.find(stop)
        if logprobs:  # the new token's text_offset
            min(len(decode(prefix[:k])), len(text))
    return text


def new_way(tokenizer, ids, logprobs: bool) -> str:
    transcript = TextTranscript([], len(ids), tokenizer, STOPS)
    for k, token in enumerate(ids):
        transcript.add(Commit([k], [token], "left-to-right", 1, 1.0))
        if logprobs:
            transcript.offset(k)
    return transcript.text


def ms_per_token(read, tokenizer, ids, logprobs: bool) -> tuple:
    start = time.perf_counter()
    text = read(tokenizer, ids, logprobs)
    return (time.perf_counter() - start) * 1e3 / len(ids), text


def main():
    from mlx_lm.utils import load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", type=Path, default=DEMO_MODEL_PATH, help="a model folder (default: the demo)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 4096])
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.tokenizer)
    print(f"tokenizer: {args.tokenizer}")
    print(f"{'tokens':>6} {'logprobs':>8} {'old ms/token':>12} {'new ms/token':>12} {'old/new':>8}")
    for length in args.lengths:
        ids = answer_ids(tokenizer, length)
        for logprobs in (False, True):
            old, old_text = ms_per_token(old_way, tokenizer, ids, logprobs)
            new, new_text = ms_per_token(new_way, tokenizer, ids, logprobs)
            assert new_text == old_text, "the two ways read different text"
            print(f"{length:>6} {'yes' if logprobs else 'no':>8} {old:>12.4f} {new:>12.4f} {old / new:>7.1f}x")


if __name__ == "__main__":
    main()
