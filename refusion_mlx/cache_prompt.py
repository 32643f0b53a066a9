"""Save a long prompt's KV cache to a file, to start later generations and chats from it.

    python -m refusion_mlx.cache_prompt --prompt-cache-file doc.safetensors --prompt "$(cat doc.txt)"
    python -m refusion_mlx.generate --prompt-cache-file doc.safetensors --prompt " Summarise it."

As mlx-lm's ``mlx_lm.cache_prompt``: the prompt (formatted as the first user turn) is fed once
and saved with the model's identity and its tokens; a command given the file feeds only what
follows the saved prompt (the prompt it is given is appended to the saved one).
"""

import os
import sys
from typing import Optional, Sequence

from .cli import ArgumentParser, add_model_flags, add_prompt_flags, prog, read_prompt, run_command
from .errors import RefusionError


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=prog("cache_prompt"),
                            description="Prefill a prompt and save its KV cache to a file.")
    add_model_flags(parser)
    add_prompt_flags(parser)
    parser.add_argument("--prompt-cache-file", required=True, help="the file to write (safetensors)")
    parser.add_argument("--max-kv-size", type=int, help="bound the saved cache to this many entries")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    parser.add_argument("--verbose", action="store_true", help="say how many tokens were cached")
    return parser


def run(args) -> int:
    from .autoregressive import prefill_ids
    from .kv import make_prompt_cache, save_prompt_cache
    from .loading import load
    from .tokenizer_utils import prompt_ids
    from .validation import check_int

    prompt = read_prompt(args.prompt)
    if args.max_kv_size is not None:
        check_int("--max-kv-size", args.max_kv_size, 1)
    if os.path.exists(args.prompt_cache_file) and not args.force:
        raise RefusionError(f"{args.prompt_cache_file} exists; pass --force to overwrite it")
    model, tokenizer = load(args.model, adapter_path=args.adapter_path, dtype=args.dtype)
    ids = prompt_ids(tokenizer, prompt, args.system_prompt, not args.ignore_chat_template, not args.no_thinking)
    cache = make_prompt_cache(model, args.max_kv_size)
    prefill_ids(model, ids, cache)
    save_prompt_cache(args.prompt_cache_file, cache, model,
                      {"prompt": prompt, "system_prompt": args.system_prompt or ""})
    if args.verbose:
        print(f"cached {len(ids)} prompt tokens ({cache.length} entries, {cache.nbytes / 1e6:.1f} MB) "
              f"in {args.prompt_cache_file}", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
