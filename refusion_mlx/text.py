"""Text in, text out: chat prompts, ``generate`` and ``stream_generate``."""

import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Union

import mlx.core as mx

from .decode import DecodeSettings, GenerationResult, generate_step, start_state, summarize
from .presets import DEFAULTS
from .errors import RefusionError


def prompt_ids(tokenizer, prompt: Union[str, Sequence[int]], system_prompt: Optional[str] = None,
               use_chat_template: bool = True, enable_thinking: bool = True) -> List[int]:
    """Token ids for a prompt, through the chat template as upstream evaluates (thinking on)."""
    if not isinstance(prompt, str):
        return [int(t) for t in prompt]
    if not prompt.strip():
        raise RefusionError("the prompt is empty")
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": prompt})
        prompt = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, enable_thinking=enable_thinking
        )
    elif system_prompt:
        prompt = system_prompt + "\n" + prompt
    return tokenizer.encode(prompt)


def default_eos(tokenizer) -> List[int]:
    """EOS ids of a tokenizer: mlx-lm's set (tokenizer + config), else the tokenizer's own."""
    ids = getattr(tokenizer, "eos_token_ids", None)
    if ids:
        return sorted(ids)
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


@dataclass
class GenerationUpdate:
    """One commit seen as text."""

    text: str  # every filled position so far, in position order (holes skipped), up to EOS
    prefix_text: str  # the gap-free start of the output: final, safe to print as a stream
    filled: List[int]  # positions (0-based, in the generation) filled by this commit
    finished: bool = False
    result: Optional[GenerationResult] = field(default=None, repr=False)  # set on the last update


def _texts(tokenizer, placed: Dict[int, int], eos_ids) -> tuple:
    """(all filled text, gap-free prefix text), both cut before the first EOS."""
    ordered, prefix, contiguous = [], [], True
    for expected, position in enumerate(sorted(placed)):
        token = placed[position]
        if token in eos_ids:
            break
        ordered.append(token)
        contiguous = contiguous and position == expected
        if contiguous:
            prefix.append(token)
    # Special tokens (chat markers) are not text; upstream decodes with skip_special_tokens too.
    return (tokenizer.decode(ordered, skip_special_tokens=True),
            tokenizer.decode(prefix, skip_special_tokens=True))


def stream_generate(model, tokenizer, prompt: Union[str, Sequence[int]], *,
                    system_prompt: Optional[str] = None, use_chat_template: bool = True,
                    enable_thinking: bool = True, **knobs) -> Iterator[GenerationUpdate]:
    """Yield a ``GenerationUpdate`` each time slots are committed; the last one carries the result.

    ``knobs`` are ``generate_ids``'s: gen_length, slot_size, serial_num_blocks,
    slot_threshold, token_threshold, temperature, seed, mask_id, eos_token_id.
    """
    ids = prompt_ids(tokenizer, prompt, system_prompt, use_chat_template, enable_thinking)
    mask_id = knobs.pop("mask_id", None)
    eos = knobs.pop("eos_token_id", None)
    settings = DecodeSettings(**{**DEFAULTS, **knobs})
    state = start_state(model, ids, settings, mask_id, eos if eos is not None else default_eos(tokenizer))
    placed: Dict[int, int] = {}
    commits = []
    mx.reset_peak_memory()
    tic = time.perf_counter()
    for commit in generate_step(model, state, settings):
        commits.append(commit)
        placed.update(zip(commit.positions, commit.tokens))
        text, prefix = _texts(tokenizer, placed, state.eos_ids)
        yield GenerationUpdate(text, prefix, list(commit.positions))
    result = summarize(commits, state, time.perf_counter() - tic)
    text, prefix = _texts(tokenizer, placed, state.eos_ids)
    yield GenerationUpdate(text, prefix, [], finished=True, result=result)


def generate(model, tokenizer, prompt: Union[str, Sequence[int]], verbose: bool = False, **kwargs) -> str:
    """Generate text with plan-and-infill; ``verbose`` prints the text and the statistics."""
    update = None
    for update in stream_generate(model, tokenizer, prompt, **kwargs):
        pass
    if verbose:
        print(update.text)
        print(format_stats(update.result))
    return update.text


def format_stats(result: GenerationResult) -> str:
    """The statistics block printed by --verbose."""
    return "\n".join([
        "==========",
        f"Generated: {len(result.tokens)} tokens in {result.wall_time:.3f} s, "
        f"{result.tokens_per_second:.2f} tokens/s",
        f"TPF (upstream's definition): {result.tpf:.2f}",
        f"Model calls: {result.model_calls} ({result.tokens_per_call:.2f} tokens per call, "
        f"{result.iterations} iterations, {result.tokens_fed} tokens fed)",
        f"Peak memory: {result.peak_memory:.3f} GB",
    ])
