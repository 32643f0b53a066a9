"""Text in, text out: ``generate`` and ``stream_generate``, and the command line around them.

    python -m refusion_mlx.generate [--model PATH_OR_REPO] --prompt "..."

As in mlx-lm's ``generate.py``: the library functions wrap the decoder's generator
(``decode.generate_step``) and ``main()`` is a thin command line over them. Without
``--model`` (or with ``--model demo``) the small demo model shipped in the package runs,
offline; ``--model GSAI-ML/ReFusion`` is the real 8B model.
"""

import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Union

import mlx.core as mx

from .blas import warn_if_slow_blas
from .cli import (ArgumentParser, add_cache_flags, add_decode_flags, add_model_flags, add_prompt_flags,
                  check_cache_flags, decode_knobs, prog, read_prompt, run_command, settings_from_args)
from .decode import generate_step
from .state import finish, start_state
from .settings import settings_for
from .transcript import GenerationResult, Transcript
from .tokenizer_utils import default_eos, prompt_ids


@dataclass
class GenerationUpdate:
    """One commit seen as text."""

    text: str  # every filled position so far, in position order (holes skipped), up to EOS
    prefix_text: str  # the gap-free start of the output: final, safe to print as a stream
    filled: List[int]  # positions (0-based, in the generation) filled by this commit
    finished: bool = False
    result: Optional[GenerationResult] = field(default=None, repr=False)  # set on the last update


def _texts(tokenizer, transcript: Transcript) -> tuple:
    """(all filled text, gap-free prefix text), both cut before the first EOS. Special tokens (chat
    markers) are not text; upstream decodes with skip_special_tokens too."""
    return (tokenizer.decode(transcript.tokens(with_eos=False), skip_special_tokens=True),
            tokenizer.decode(transcript.prefix(), skip_special_tokens=True))


def stream_generate(model, tokenizer, prompt: Union[str, Sequence[int], List[dict]], *,
                    system_prompt: Optional[str] = None, use_chat_template: bool = True,
                    enable_thinking: bool = True, **knobs) -> Iterator[GenerationUpdate]:
    """Yield a ``GenerationUpdate`` each time slots are committed; the last one carries the result.

    Slots are committed out of order, so ``prefix_text`` (the start with no holes) is what
    can be printed as it grows; ``text`` shows every filled position.

    Args:
        model, tokenizer: from ``load``.
        prompt: text (one user turn), a list of chat messages, or token ids (used as given).
        system_prompt: a system message put before the prompt.
        use_chat_template: format the prompt with the tokenizer's chat template (as upstream).
        enable_thinking: the template's thinking switch (on, as upstream evaluates).
        **knobs: ``generate_ids``'s: gen_length, slot_size, serial_num_blocks, slot_threshold,
            token_threshold, plan_slots, temperature, seed, top_p, top_k, min_p, mask_id, eos_token_id, preset,
            prompt_cache, max_kv_size. Unset ones come from the preset, then the model's own
            defaults, then the library's.
    """
    ids = prompt_ids(tokenizer, prompt, system_prompt, use_chat_template, enable_thinking)
    mask_id = knobs.pop("mask_id", None)
    eos = knobs.pop("eos_token_id", None)
    prompt_cache, max_kv_size = knobs.pop("prompt_cache", None), knobs.pop("max_kv_size", None)
    settings = settings_for(model, len(ids), **knobs)
    state = start_state(model, ids, settings, mask_id, eos if eos is not None else default_eos(tokenizer),
                        prompt_cache, max_kv_size)
    warn_if_slow_blas()  # once per process, and only for a request that proved good
    transcript = Transcript(state.eos_ids, settings.gen_length)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    for commit in generate_step(model, state, settings):
        filled = transcript.add(commit)
        yield GenerationUpdate(*_texts(tokenizer, transcript), filled)
    result = finish(state, transcript, time.perf_counter() - tic, ids, prompt_cache)
    yield GenerationUpdate(*_texts(tokenizer, transcript), [], finished=True, result=result)


def generate(model, tokenizer, prompt: Union[str, Sequence[int], List[dict]], verbose: bool = False,
             **kwargs) -> str:
    """Generate text with plan-and-infill.

    Args:
        model, tokenizer: from ``load``.
        prompt: text (one user turn), a list of chat messages, or token ids.
        verbose: print the text and the statistics (tokens per model call, tokens/s, memory).
        **kwargs: ``stream_generate``'s (prompt formatting and ``generate_ids``'s knobs).

    Returns:
        The generated text, up to the first EOS, special tokens skipped.
    """
    update = None
    for update in stream_generate(model, tokenizer, prompt, **kwargs):
        pass
    if verbose:
        print(update.text)
        print(format_stats(update.result))
    return update.text


def format_stats(result: GenerationResult) -> str:
    """The statistics block printed by --verbose."""
    iterations = f"{result.iterations} iteration{'' if result.iterations == 1 else 's'}"
    return "\n".join([
        "==========",
        f"Generated: {len(result.tokens)} tokens in {result.wall_time:.3f} s, "
        f"{result.tokens_per_second:.2f} tokens/s",
        f"Tokens per model call: {result.tokens_per_call:.2f} ({len(result.tokens)} tokens returned, "
        f"{result.model_calls} model calls, every one counted; {iterations}, {result.tokens_fed} tokens fed)",
        f"Prompt cache: {result.cached_tokens} prompt tokens reused",
        f"Peak memory: {result.peak_memory:.3f} GB",
    ])


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog=prog("generate"),
                            description="Generate text with ReFusion's plan-and-infill decoder.")
    add_model_flags(parser)
    add_prompt_flags(parser)
    add_decode_flags(parser)
    add_cache_flags(parser)
    parser.add_argument("--verbose", action="store_true", help="print tokens per model call, tokens/s, memory")
    return parser


def off_format_warning(model, args) -> Optional[str]:
    """A warning when the prompt is formatted in a way the model was never trained on, else None."""
    if not getattr(model, "prompt_formats", None):
        return None
    system = args.system_prompt and not getattr(model, "trained_system_prompts", False)
    asked = [flag for flag, on in (("--system-prompt", system), ("--no-thinking", args.no_thinking),
                                   ("--ignore-chat-template", args.ignore_chat_template)) if on]
    if not asked:
        return None
    return (f"warning: this model was trained only on prompts formatted as: {model.prompt_formats}; "
            f"with {', '.join(asked)} its output may be nonsense")


def stream_to_stdout(updates: Iterator[GenerationUpdate]) -> GenerationUpdate:
    """Print a generation as it is committed; returns the last update (with the result).

    Slots land out of order: only the start of the text that has no holes left (and no
    half-decoded character) is printed as it grows; the rest when the generation ends.
    """
    printed, update = "", None
    for update in updates:
        stable = update.prefix_text.rstrip("\ufffd")
        if stable.startswith(printed):
            print(stable[len(printed):], end="", flush=True)
            printed = stable
    print(update.text[len(printed):] if update.text.startswith(printed) else "\n" + update.text)
    return update


def cache_from_args(args, model):
    """The prompt cache a command starts from: ``--prompt-cache-file``'s, or a fresh bounded one for
    ``--max-kv-size``, or None; with the file's saved prompt and system prompt (empty if none)."""
    from .kv import load_prompt_cache, make_prompt_cache

    if getattr(args, "prompt_cache_file", None):
        cache = load_prompt_cache(args.prompt_cache_file, model)
        return cache, cache.metadata.get("prompt", ""), cache.metadata.get("system_prompt") or None
    if getattr(args, "max_kv_size", None) is not None:
        return make_prompt_cache(model, args.max_kv_size), "", None
    return None, "", None


def run(args) -> int:
    from .blas import blas_report
    from .distributed import check_stdin_unused, is_leader, load_for_command, shared_seed

    check_stdin_unused(args.prompt == "-", "--prompt -")
    prompt = read_prompt(args.prompt)
    settings_from_args(args)  # bad flags fail here, before a long load
    check_cache_flags(args)
    knobs = decode_knobs(args)
    # Launched by mlx.launch: this rank's shard; rank 0 prints, the others follow silently.
    model, tokenizer, group = load_for_command(args.model, args.adapter_path, args.dtype, args.verbose)
    knobs["seed"] = shared_seed(args.seed, group)  # every rank must sample alike
    warning = off_format_warning(model, args)
    if warning and is_leader(group):
        print(warning, file=sys.stderr)
    prompt_cache, saved_prompt, saved_system = cache_from_args(args, model)
    update = stream_to_stdout(stream_generate(
        model, tokenizer, saved_prompt + prompt, system_prompt=args.system_prompt or saved_system,
        use_chat_template=not args.ignore_chat_template, enable_thinking=not args.no_thinking,
        prompt_cache=prompt_cache, **knobs))
    if args.verbose:
        print(format_stats(update.result))
        print(blas_report())
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_command(run, build_parser().parse_args(argv), decode_flags=True)


if __name__ == "__main__":
    sys.exit(main())
