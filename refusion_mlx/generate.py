"""The command line: ``python -m refusion_mlx.generate [--model PATH_OR_REPO] --prompt "..."``.

Without ``--model`` (or with ``--model demo``) it runs the small demo model that ships
inside the package, offline, with knobs suited to it; ``--model GSAI-ML/ReFusion`` is
the real 8B model.
"""

import argparse
import sys
from typing import Optional, Sequence

from .decode import DecodeSettings
from .presets import DEFAULTS, DEMO_DEFAULTS, PRESET_GEN_LENGTH, PRESETS
from .errors import ArgumentParser, run_command


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m refusion_mlx.generate",
        description="Generate text with ReFusion's plan-and-infill decoder.",
    )
    parser.add_argument("--model", help="local folder or Hugging Face repo id (e.g. GSAI-ML/ReFusion); "
                        "default: the packaged demo model, offline")
    parser.add_argument("--adapter-path", help="folder with fine-tuned adapters")
    parser.add_argument("--prompt", "-p", required=True, help="the prompt; '-' reads it from stdin")
    parser.add_argument("--system-prompt", help="system message for the chat template")
    parser.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt as is")
    parser.add_argument("--no-thinking", action="store_true",
                        help="chat template with thinking off (upstream evaluates with it on)")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="the paper's settings for a benchmark")
    parser.add_argument("--max-tokens", "-m", type=int, help="generation length (padded to whole slots)")
    parser.add_argument("--slot-size", type=int, help="tokens per slot")
    parser.add_argument("--blocks", type=int, help="serial blocks the generation is cut into")
    parser.add_argument("--slot-threshold", type=float, help="first-token confidence to pick a slot")
    parser.add_argument("--token-threshold", type=float, help="probability to accept a drafted token")
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature (0: greedy)")
    parser.add_argument("--seed", type=int, help="random seed for sampling")
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], help="cast the weights")
    parser.add_argument("--verbose", action="store_true", help="print TPF, model calls, tokens/s, memory")
    return parser


def settings_from_args(args) -> dict:
    """Knobs from the CLI: defaults (the demo model's own for it), then the preset, then explicit flags."""
    from .loading import is_demo

    knobs = dict(DEMO_DEFAULTS if is_demo(args.model) else DEFAULTS)
    if args.preset:
        knobs.update(PRESETS[args.preset], gen_length=PRESET_GEN_LENGTH)
    explicit = {
        "gen_length": args.max_tokens,
        "slot_size": args.slot_size,
        "serial_num_blocks": args.blocks,
        "slot_threshold": args.slot_threshold,
        "token_threshold": args.token_threshold,
    }
    knobs.update({k: v for k, v in explicit.items() if v is not None})
    knobs.update(temperature=args.temp, seed=args.seed)
    DecodeSettings(**knobs).validate()
    return knobs


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


def run(args) -> int:
    from .blas import blas_report, warn_if_slow_blas
    from .loading import load
    from .text import format_stats, stream_generate

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    knobs = settings_from_args(args)
    model, tokenizer = load(args.model, adapter_path=args.adapter_path, dtype=args.dtype)
    printed = ""
    update = None
    for update in stream_generate(model, tokenizer, prompt, system_prompt=args.system_prompt,
                                  use_chat_template=not args.ignore_chat_template,
                                  enable_thinking=not args.no_thinking, **knobs):
        warn_if_slow_blas()  # here, once the input has proved good: bad input stays one line
        # Slots land out of order: stream only the start of the text that has no holes left
        # (and no half-decoded character).
        stable = update.prefix_text.rstrip("\ufffd")
        if stable.startswith(printed):
            print(stable[len(printed):], end="", flush=True)
            printed = stable
    print(update.text[len(printed):] if update.text.startswith(printed) else "\n" + update.text)
    if args.verbose:
        print(format_stats(update.result))
        print(blas_report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
