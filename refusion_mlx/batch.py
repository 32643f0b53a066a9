"""Many prompts decoded together: the library's batch entry points.

``batch_generate_ids`` is a thin loop over the scheduler (``scheduler.py``: which sequences
decode together, one forward per step for all of them; ``executor.py``: how that forward is
assembled), as mlx-lm's ``batch_generate`` is over its ``BatchGenerator``. At temperature 0 in
float32 every prompt decodes to the same tokens as ``generate_ids`` / ``generate_ar_ids`` give
it alone.
"""

import time
from typing import Dict, Iterable, List, Optional, Sequence, Union

import mlx.core as mx

from .state import resolve_eos
from .settings import settings_for
from .errors import RefusionError
from .kv import PromptCache
from .scheduler import DECODERS, LEFT_TO_RIGHT, PLAN_AND_INFILL, Scheduler
from .transcript import GenerationResult

__all__ = ["DECODERS", "LEFT_TO_RIGHT", "PLAN_AND_INFILL", "batch_generate", "batch_generate_ids"]


def batch_generate_ids(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    knobs: Optional[Sequence[Dict]] = None,
    decoder: str = PLAN_AND_INFILL,
    max_batch_size: int = 32,
    mask_id: Optional[int] = None,
    eos_token_id: Union[None, int, Iterable[int]] = None,
    prompt_caches: Optional[Sequence[Optional[PromptCache]]] = None,
    **common,
) -> List[GenerationResult]:
    """Decode many prompts together; one ``GenerationResult`` per prompt, in order.

    Args:
        model: from ``load`` or ``load_model``.
        prompts: token ids, one list per prompt.
        knobs: one dict per prompt of ``generate_ids``'s knobs (gen_length, slot_size,
            serial_num_blocks, slot_threshold, token_threshold, temperature, seed, preset),
            over ``common``'s; unset ones come from the preset, the model, the library, as
            for ``generate_ids``.
        decoder: ``"plan-and-infill"`` or ``"left-to-right"`` (then gen_length is the budget).
        max_batch_size: sequences decoded at once; the rest join as others finish.
        mask_id, eos_token_id, **common: as for ``generate_ids``, for every prompt.
        prompt_caches: one ``make_prompt_cache`` cache (or None) per prompt, as ``generate_ids``'s
            ``prompt_cache``: each prompt feeds only what its cache lacks, and the cache holds
            prompt + answer afterwards. Two prompts cannot share one cache.
    """
    if knobs is not None and len(knobs) != len(prompts):
        raise RefusionError(f"{len(knobs)} knob sets for {len(prompts)} prompts")
    if prompt_caches is not None:
        if len(prompt_caches) != len(prompts):
            raise RefusionError(f"{len(prompt_caches)} prompt caches for {len(prompts)} prompts")
        given = [id(c) for c in prompt_caches if c is not None]
        if len(given) != len(set(given)):
            raise RefusionError("two prompts share one prompt cache; give each its own")
    scheduler = Scheduler(model, max_batch_size)
    settings = [settings_for(model, len(p), **{**common, **(knobs[i] if knobs else {})})
                for i, p in enumerate(prompts)]
    mx.reset_peak_memory()
    # Every request is validated (added) before any decodes.
    sequences = [scheduler.add(p, s, decoder=decoder, mask_id=mask_id, eos_token_id=eos_token_id,
                               prompt_cache=prompt_caches[i] if prompt_caches else None)
                 for i, (p, s) in enumerate(zip(prompts, settings))]
    while scheduler.busy:
        scheduler.step()
    return [s.result for s in sequences]


def batch_generate(model, tokenizer, prompts: Sequence[Union[str, Sequence[int], List[dict]]], *,
                   knobs: Optional[Sequence[Dict]] = None, system_prompt: Optional[str] = None,
                   use_chat_template: bool = True, enable_thinking: bool = True, verbose: bool = False,
                   **common) -> List[str]:
    """Texts for many prompts decoded together (``batch_generate_ids`` through the chat template).

    ``prompts`` are what ``generate`` takes (text, chat messages or token ids); the other
    arguments are ``batch_generate_ids``'s and ``generate``'s.
    """
    from .tokenizer_utils import default_eos, prompt_ids

    ids = [prompt_ids(tokenizer, p, system_prompt, use_chat_template, enable_thinking) for p in prompts]
    common.setdefault("eos_token_id", default_eos(tokenizer))
    eos = resolve_eos(common["eos_token_id"], model.args)
    tic = time.perf_counter()
    results = batch_generate_ids(model, ids, knobs=knobs, **common)
    wall = time.perf_counter() - tic
    texts = [tokenizer.decode([t for t in r.tokens if t not in eos], skip_special_tokens=True)
             for r in results]
    if verbose:
        total = sum(len(r.tokens) for r in results)
        print(f"{len(prompts)} prompts, {total} tokens in {wall:.3f} s: {total / wall:.1f} tokens/s, "
              f"peak memory {mx.get_peak_memory() / 1e9:.3f} GB")
    return texts
