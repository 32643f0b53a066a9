"""One request's state: its cache, what it has fed and decided, what it has cost; and the intake
every decoder shares (prompt, EOS and seed checks, the cache it decodes in, prompt caches and
bounded caches), and the result it ends with.
"""

import os
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Union

import mlx.core as mx

from .errors import RefusionError
from .kv import SlotCache
from .kv.layout import SINK
from .kv.prompt import PromptCache
from .transcript import GenerationResult, Transcript
from .settings import DecodeSettings
from .tokenizer_utils import resolve_mask_id
from .validation import check_eos, check_token_id, check_token_ids


@dataclass
class DecodeState:
    """What one generation has decided so far, and what it has cost."""

    cache: SlotCache  # a SlotLayout in a batch (the batch holds the buffers)
    prompt_length: int
    uncached: List[int]  # the prompt's last tokens, not yet in the cache (fed with the first plan)
    mask_id: Optional[int]  # None for left to right
    eos_ids: frozenset
    gen_length: Optional[int] = None  # tokens asked for; positions past it are padding, never returned
    key: Optional[mx.array] = None
    finished: bool = False  # an EOS was committed: stop after the current block
    model_calls: int = 0
    tokens_fed: int = 0
    cached_tokens: int = 0  # prompt tokens a prompt cache already held

    @property
    def fed_from(self) -> int:
        """Position of the first uncached prompt token."""
        return self.prompt_length - len(self.uncached)


def resolve_eos(eos_token_id: Union[None, int, Iterable[int]], config) -> frozenset:
    """EOS ids as a set: the argument, else the model config's (``model.args``; possibly none)."""
    if eos_token_id is None:
        eos_token_id = getattr(config, "eos_token_id", None)
    if eos_token_id is None:
        return frozenset()
    if isinstance(eos_token_id, int):
        return frozenset([eos_token_id])
    return frozenset(int(e) for e in eos_token_id)


def open_cache(model, prompt_ids: List[int], room: int, block: int,
               prompt_cache: Optional[PromptCache]) -> tuple:
    """(the cache a request decodes in, how many prompt tokens it already holds): a fresh one
    with room for the prompt and ``room`` more entries, or the prompt cache's, trimmed to the
    prefix it shares with this prompt. A bounded cache must hold one ``block``'s entries."""
    if prompt_cache is None:
        return SlotCache(len(model.layers), len(prompt_ids) + room), 0
    if not isinstance(prompt_cache, PromptCache):
        raise RefusionError(f"prompt_cache must come from make_prompt_cache, got {type(prompt_cache).__name__}")
    check_prompt_cache(model, prompt_cache)
    check_kv_size(prompt_cache.max_kv_size, block)
    cached = prompt_cache.reuse(prompt_ids)
    prompt_cache.cache.reserve(len(prompt_ids) + room)
    return prompt_cache.cache, cached


def check_kv_size(max_kv_size: Optional[int], block: int):
    """A bounded cache must hold one block's entries besides the first ones it never evicts."""
    least = SINK + block + 2
    if max_kv_size is not None and max_kv_size < least:
        raise RefusionError(f"max_kv_size {max_kv_size} is too small: one block of this request needs {block} "
                            f"entries beside the first {SINK} kept ones; use at least {least}")


def check_prompt_cache(model, prompt_cache: PromptCache):
    """A prompt cache made for another model (layers, KV heads, head size) is refused."""
    cache = prompt_cache.cache
    keys = next((layer.keys for layer in cache.layers if layer.keys is not None), None)
    args = model.args
    shape = (len(model.layers), model.layers[0].self_attn.n_kv_heads, args.head_dim)  # this rank's heads
    if len(cache.layers) != shape[0] or (keys is not None and (keys.shape[1], keys.shape[3]) != shape[1:]):
        have = (len(cache.layers),) + ((keys.shape[1], keys.shape[3]) if keys is not None else ())
        raise RefusionError(f"this prompt cache was made for another model ({have} layers/KV heads/head size, "
                            f"this model has {shape})")


def new_state(model, prompt_ids: List[int], gen_length: int, room: int, block: int, temperature: float,
              seed: Optional[int], eos_token_id, prompt_cache: Optional[PromptCache] = None,
              mask_id: Optional[int] = None) -> DecodeState:
    """The checks every decoder makes of a request (its knobs checked already), and its state: a
    cache with ``room`` entries after the prompt (or the prompt cache's), the sampling key."""
    prompt_ids = check_token_ids("prompt_ids", prompt_ids, model.args.vocab_size)
    if not prompt_ids:
        raise RefusionError("the prompt is empty")
    eos_token_id = check_eos("eos_token_id", eos_token_id)
    key = None
    if temperature > 0:
        key = mx.random.key(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    eos_ids = resolve_eos(eos_token_id, model.args)
    cache, cached = open_cache(model, prompt_ids, room, block, prompt_cache)
    return DecodeState(cache=cache, prompt_length=len(prompt_ids), uncached=prompt_ids[cached:], mask_id=mask_id,
                       eos_ids=eos_ids, gen_length=gen_length, key=key,
                       cached_tokens=cached)


def bounded_cache(model, prompt_cache: Optional[PromptCache], max_kv_size: Optional[int]) -> Optional[PromptCache]:
    """The prompt cache a call decodes in: the given one, or for ``max_kv_size`` a fresh bounded one."""
    if max_kv_size is None:
        return prompt_cache
    if prompt_cache is not None:
        raise RefusionError("give max_kv_size to make_prompt_cache, not beside a prompt_cache")
    from .kv.prompt import make_prompt_cache

    return make_prompt_cache(model, max_kv_size)


def start_state(model, prompt_ids: Sequence[int], settings: DecodeSettings, mask_id: Optional[int],
                eos_token_id, prompt_cache: Optional[PromptCache] = None,
                max_kv_size: Optional[int] = None) -> DecodeState:
    """Validate a plan-and-infill request and set up its cache and counters (in the prompt cache,
    when given: then only the prompt tokens it does not hold are fed; with ``max_kv_size``, in a
    fresh bounded one)."""
    settings.validate()
    prompt_ids = check_token_ids("prompt_ids", prompt_ids)
    if mask_id is not None:
        check_token_id("mask_id", mask_id, model.args.vocab_size)
    if prompt_ids:
        settings.check_fits(len(prompt_ids), model.args.max_position_embeddings)
    # The padding that makes whole slots and blocks may run past max_position_embeddings: RoPE
    # is computed for any position, and nothing placed there is returned (docs/decoding.md).
    mask_id = resolve_mask_id(mask_id, model.args)
    return new_state(model, prompt_ids, settings.gen_length, settings.padded_length, settings.block_length,
                     settings.temperature, settings.seed, eos_token_id,
                     bounded_cache(model, prompt_cache, max_kv_size), mask_id=mask_id)


def finish(state: DecodeState, transcript: Transcript, wall_time: float, prompt_ids: Sequence[int],
           prompt_cache: Optional[PromptCache], tpf: Optional[float] = None) -> GenerationResult:
    """The result of one generation; a prompt cache records what it now holds."""
    if prompt_cache is not None:
        prompt_cache.record(prompt_ids, transcript.placed)
    return transcript.result(state.model_calls, state.tokens_fed, wall_time, state.cached_tokens, tpf)
