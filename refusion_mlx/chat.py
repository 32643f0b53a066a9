"""Chat with a model in the terminal; the KV cache is kept across turns.

    python -m refusion_mlx.chat [--model PATH_OR_REPO] [--system-prompt TEXT] [--max-kv-size N]

Each turn feeds only what the conversation added since the last one (the prompt cache
holds the history, answers included, as the decoder committed them). Type a message and
press Enter; ``/reset`` (or ``r``) starts a new conversation, ``/quit`` (or ``q``, Ctrl-D)
ends. When standard input is not a terminal, each line is one turn, so chats can be scripted:
``printf 'first\\nsecond\\n' | python -m refusion_mlx.chat``. mlx-lm's ``mlx_lm.chat`` is the
model for its conventions.
"""

import sys
from typing import List, Optional, Sequence

from .cli import (ArgumentParser, add_cache_flags, add_decode_flags, add_model_flags, check_cache_flags, prog,
                  decode_knobs, in_flag_names, run_command, settings_from_args)
from .state import check_kv_size
from .settings import settings_for
from .errors import RefusionError

QUIT = {"q", "/quit", "/exit"}
RESET = {"r", "/reset"}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=prog("chat"),
                            description="Chat with a ReFusion model; the KV cache is kept across turns.")
    add_model_flags(parser)
    parser.add_argument("--system-prompt", help="system message at the start of the conversation")
    parser.add_argument("--no-thinking", action="store_true", help="chat template with thinking off")
    add_decode_flags(parser)
    add_cache_flags(parser)
    parser.add_argument("--reprefill-answers", action="store_true",
                        help="feed earlier answers again as prompt instead of reusing their keys as decoded "
                             "(exactly what a fresh prefill gives; costs their prefill each turn)")
    parser.add_argument("--verbose", action="store_true", help="after each answer: cached and fed tokens, tokens/s")
    return parser


def turns(interactive: bool):
    """The user's lines: prompted on a terminal, read line by line otherwise; ends at EOF."""
    while True:
        try:
            line = input(">> ") if interactive else sys.stdin.readline()
        except EOFError:
            return
        if not interactive and not line:
            return
        yield line.strip()


class Conversation:
    """The messages so far and the prompt cache that holds them."""

    def __init__(self, model, args):
        self.model, self.args = model, args
        self.reset()

    def reset(self):
        from .generate import cache_from_args
        from .kv import make_prompt_cache

        cache, self.saved_prompt, saved_system = cache_from_args(self.args, self.model)
        if cache is None:
            cache = make_prompt_cache(self.model, keep_answers=not self.args.reprefill_answers)
        elif self.args.reprefill_answers:
            cache.keep_answers = False
        self.cache = cache
        system = self.args.system_prompt or saved_system
        self.messages: List[dict] = [{"role": "system", "content": system}] if system else []

    def ask(self, tokenizer, text: str, knobs: dict):
        """Stream the answer to one user turn; returns the final update."""
        from .generate import stream_generate, stream_to_stdout

        if not self.messages or self.messages[-1]["role"] == "system":  # the saved prompt starts the chat
            text = self.saved_prompt + text
        messages = self.messages + [{"role": "user", "content": text}]
        update = stream_to_stdout(stream_generate(self.model, tokenizer, messages, prompt_cache=self.cache,
                                                  enable_thinking=not self.args.no_thinking, **knobs))
        self.messages = messages + [{"role": "assistant", "content": update.text}]
        return update


def run(args) -> int:
    from .loading import load

    settings_from_args(args)  # bad flags fail here, before a long load
    check_cache_flags(args)
    knobs = decode_knobs(args)
    model, tokenizer = load(args.model, adapter_path=args.adapter_path, dtype=args.dtype)
    check_kv_size(args.max_kv_size, settings_for(model, **knobs).block_length)
    chat = Conversation(model, args)
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message; /reset starts over, /quit (or Ctrl-D) ends.")
    for line in turns(interactive):
        if line in QUIT:
            break
        if line in RESET:
            chat.reset()
            print("(new conversation)")
            continue
        if not line:
            continue
        try:
            update = chat.ask(tokenizer, line, knobs)
        except RefusionError as e:  # a turn that cannot run (the conversation outgrew the model): say so, go on
            print(f"error: {in_flag_names(str(e))}", file=sys.stderr)
            continue
        if args.verbose:
            r = update.result
            print(f"[{r.cached_tokens} prompt tokens cached, {r.tokens_fed} fed, {len(r.tokens)} generated, "
                  f"{r.tokens_per_second:.1f} tokens/s, cache {chat.cache.length} entries]", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command(run, build_parser().parse_args(argv), decode_flags=True)


if __name__ == "__main__":
    sys.exit(main())
