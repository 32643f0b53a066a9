"""Plan-and-infill decoding (ReFusion's ``generate_refusion``), as small named steps.

One iteration over the pending slots of the current block:

* ``plan``    one masked forward over every pending slot: a draft per slot and
              the confidence of its first token;
* ``choose_slots``  the slots above ``slot_threshold`` (or the most confident);
* ``verify``  the chosen drafts run causally after the committed cache;
              ``accepted_prefix`` says how much of them reads as left-to-right text;
* ``infill``  when less than one slot is accepted: complete the chosen slots in
              parallel rows, each seeing the committed prefix and its own slot;
* ``commit``  keep tokens, positions and the KV entries already in the cache.

Each step is a generator: it yields the ``Forward`` it needs (``forwards.py``: tokens, positions,
a cache view, the probabilities it will read) and gets ``Logits`` back, and
yields a ``Sync`` before it reads lazy results on the host. ``generate_step``
serves one sequence's requests as they come and yields a ``Commit`` after each
iteration; ``scheduler.Scheduler`` serves many sequences' together, one forward and one
synchronisation per step for all of them: the single and the batched decoder
are the same code. ``generate_ids`` collects the commits into a
``GenerationResult``. docs/decoding.md describes the semantics, and the one
upstream defect fixed here (text dropped when EOS is found while infilling).
"""

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .blas import warn_if_slow_blas
from .forwards import Forward, forward, previous_rows, request, sync, to_host
from .kv.layout import SINK
from .kv.prompt import PromptCache
from .sampling import Scores, draft_tokens, probability_of, token_logprobs
from .settings import DecodeSettings, settings_for
from .state import DecodeState, finish, start_state
from .transcript import Commit, GenerationResult, Transcript
from .validation import check_token_ids






@dataclass
class Plan:
    """What one masked forward proposes for the pending slots (host arrays)."""

    drafts: np.ndarray  # (pending, slot) drafted tokens
    confidence: np.ndarray  # (pending,) probability of each slot's first token
    scores: Optional[Scores] = None  # (pending, slot) the drafts' logprobs, when asked


@dataclass
class InfillResult:
    """Slots completed by parallel infilling."""

    tokens: np.ndarray  # (rows, slot) completed rows, rows after an EOS row dropped
    rounds: int
    eos_row: Optional[int]  # row holding the first EOS, if any
    layout_rows: int  # rows the infill began with: how the rows' entries are laid out in the cache
    scores: Optional[Scores] = None  # (rows, slot) each token's logprob where it was last drafted


# --- the steps ----------------------------------------------------------------------------

def slot_positions(state: DecodeState, starts: Sequence[int], slot_size: int) -> np.ndarray:
    """Absolute RoPE positions (slots, slot_size) of slots starting at generation offsets ``starts``."""
    starts = np.asarray(starts, dtype=np.int64)[:, None]
    return state.prompt_length + starts + np.arange(slot_size)[None]


def plan(state: DecodeState, pending: Sequence[int], settings: DecodeSettings):
    """Draft every pending slot with one masked forward; their KV is not kept."""
    S = settings.slot_size
    n = len(pending) * S
    tokens = state.uncached + [state.mask_id] * n
    positions = list(range(state.fed_from, state.prompt_length)) + slot_positions(state, pending, S).reshape(-1).tolist()
    greedy = settings.temperature == 0
    # Greedy: the probability of each slot's first drafted token (its argmax) comes with the logits.
    probe = (np.arange(0, n, S), None) if greedy else None
    answer = yield from request(state, tokens, positions, state.cache.append(len(tokens)), last=n, probe=probe)
    # The prompt's entries (first iteration only) are kept; the masked slots' are not.
    state.cache.commit(len(state.uncached))
    state.uncached = []
    if greedy:
        drafts, confidence = answer.best.reshape(len(pending), S), answer.probability
    else:
        state.key, key = mx.random.split(state.key)
        logits = answer.logits.reshape(len(pending), S, -1)
        drafts = draft_tokens(logits, settings.temperature, key, settings.top_p, settings.top_k, settings.min_p)
        confidence = probability_of(logits[:, 0], drafts[:, 0])
    scored = []
    if settings.logprobs is not None:  # read with the drafts: no synchronisation of its own
        scored = token_logprobs(answer.logits.reshape(len(pending), S, -1), drafts, settings.logprobs)
    drafts, confidence, *scored = yield from to_host(drafts, confidence, *scored)
    return Plan(drafts, confidence, Scores.from_host(scored) if scored else None)


def choose_slots(confidence: Sequence[float], slot_threshold: float) -> List[int]:
    """Slots whose first-token confidence exceeds the threshold, else the single most confident."""
    chosen = [i for i, c in enumerate(confidence) if c > slot_threshold]
    return chosen or [int(np.argmax(confidence))]


def verify(state: DecodeState, drafts: np.ndarray, positions: np.ndarray, token_threshold: float):
    """Run the chosen drafts left to right after the cache; return which tokens are accepted (host).

    A token is accepted when its left-to-right probability exceeds the
    threshold; each slot's first token is always accepted. The KV written here
    stays in place, so accepted slots can be committed without another forward.
    """
    flat = drafts.reshape(-1)
    answer = yield from request(state, flat, positions, state.cache.append(flat.size),
                                probe=(previous_rows(flat.size), flat))
    (p,) = yield from to_host(answer.probability)
    accepted = p.reshape(drafts.shape) > token_threshold
    accepted[:, 0] = True
    return accepted


def accepted_prefix(accepted: np.ndarray) -> int:
    """Length of the run of accepted tokens over the chosen slots read as one sequence."""
    flat = accepted.reshape(-1)
    return int(flat.size if flat.all() else np.argmin(flat))


def first_eos(tokens: np.ndarray, eos_ids: Iterable[int]) -> Optional[int]:
    """Index of the first EOS in a flat token array, or None."""
    hits = np.flatnonzero(np.isin(tokens, list(eos_ids)))
    return int(hits[0]) if hits.size else None


def commit(state: DecodeState, tokens: np.ndarray, layout_rows: Optional[int] = None) -> int:
    """Make the first tokens of ``tokens`` (slots, slot_size) final, up to and including the first EOS.

    Their KV entries are already in the cache right after the committed ones:
    in the same order (``layout_rows`` None, a verify pass), or as infill rows
    laid out column by column. Keeping all of them only moves the cache's
    length; keeping fewer (an EOS) gathers the kept entries first.
    Returns how many tokens were kept.
    """
    rows, slot_size = tokens.shape
    flat = tokens.reshape(-1)
    eos = first_eos(flat, state.eos_ids)
    kept = flat.size if eos is None else eos + 1
    if layout_rows is None or (rows == layout_rows and kept == flat.size):
        state.cache.commit(kept)
    else:
        state.cache.keep(state.cache.row_entries(rows, slot_size, layout_rows)[:kept])
    return kept


def infill_round(state: DecodeState, tokens: np.ndarray, tags: np.ndarray, positions: np.ndarray,
                 start: int, slot_size: int, layout_rows: int, logprobs: Optional[int] = None):
    """Re-draft the untagged tokens of every row from ``start`` on, then verify the rows left to right.

    Returns the rows' tokens from ``start``, each one's left-to-right probability (host arrays)
    and, with ``logprobs``, the re-drafts' ``Scores`` (rows, width), else None.
    Both forwards write the same row entries; the verify pass's are the ones kept. The rows'
    tails are fed offset by offset (all rows' token ``start``, then ``start+1``...), the order
    in which their entries lie in the cache. The second forward takes the first's argmax as a
    lazy array: no synchronisation between them.
    """
    rows, width = tokens.shape[0], slot_size - start
    view = state.cache.rows(rows, slot_size, start, layout_rows)
    fed_positions = positions[:, start:].T
    tagged = tags[:, start:].T == 1
    masked = np.where(tagged, tokens[:, start:].T, state.mask_id)
    drafted = yield from request(state, masked, fed_positions, view)
    fed = mx.where(mx.array(tagged), mx.array(tokens[:, start:].T), drafted.best.reshape(width, rows))
    # Each token is read under its predecessor in its own row: ``rows`` entries back.
    verified = yield from request(state, fed, fed_positions, view, probe=(previous_rows(fed.size, rows), fed))
    scored = [] if logprobs is None else token_logprobs(drafted.logits, drafted.best, logprobs)
    fed, p, *scored = yield from to_host(fed, verified.probability, *scored)
    scores = Scores.from_host(scored).reshape(width, rows).transpose() if scored else None
    return fed.T, p.reshape(width, rows).T, scores


def update_tags(tags: np.ndarray, p: np.ndarray, threshold: float) -> np.ndarray:
    """New accepted prefixes: a token is accepted if its predecessor already was, or if p > threshold."""
    forced = np.concatenate([np.ones((tags.shape[0], 1), tags.dtype), tags[:, :-1]], axis=1) == 1
    return np.cumprod((p > threshold) | forced, axis=1)


def infill(state: DecodeState, drafts: np.ndarray, positions: np.ndarray, tags: np.ndarray,
           settings: DecodeSettings, scores: Optional[Scores] = None):
    """Complete the chosen slots in parallel rows by alternating masked drafts and verification.

    Row r sees the committed prefix and its own slot only. ``tags`` marks the
    tokens already accepted (a prefix of each row). Every round accepts at least
    one more token per row, so ``slot_size`` rounds always suffice. The first row
    with an accepted EOS becomes the last row. Returns an ``InfillResult``. ``scores`` (the
    drafts', when logprobs are asked) follow each re-drafted token.
    """
    S = settings.slot_size
    tokens, tags, positions = drafts.copy(), tags.copy(), positions.copy()
    scores = scores.copy() if scores is not None else None
    start, rounds, eos_row, layout_rows = 0, 0, None, drafts.shape[0]
    while not tags.all() and rounds < S:
        rounds += 1
        redrafted = tags[:, start:] != 1  # what this round drafts again (tagged tokens are kept)
        tokens[:, start:], p, new = yield from infill_round(state, tokens, tags, positions, start, S, layout_rows,
                                                            settings.logprobs if scores is not None else None)
        if new is not None:
            scores[:, start:].put(redrafted, new)  # a view: writes into ``scores``
        tags[:, start:] = update_tags(tags[:, start:], p, settings.token_threshold)

        eos_hits = np.isin(tokens[:, start:], list(state.eos_ids)) & (tags[:, start:] == 1)
        if eos_hits.any():
            eos_row = int(np.flatnonzero(eos_hits.any(axis=1))[0])
            tokens, tags, positions = tokens[: eos_row + 1], tags[: eos_row + 1], positions[: eos_row + 1]
            scores = scores[: eos_row + 1] if scores is not None else None
            tags[eos_row] = 1  # done: whatever follows the EOS is cut at commit

        newly = int(tags[:, start:].sum(axis=1).min())
        # While some row is unfinished, the last commonly accepted token is fed again next round.
        start += newly - 1 if not tags.all() else newly
    return InfillResult(tokens, rounds, eos_row, layout_rows, scores)



def generation_tpf(slot_size: int, slots: int, rounds: Optional[int] = None, padding: int = 0) -> float:
    """Upstream's TPF credit: S*slots/2 for a verified commit, S*k/(2*(rounds+1)) for an infill.

    ``padding``: tokens of those slots past the length asked for, which are never returned and
    not credited (upstream has none: its length is whole slots in every block; ours is padded to
    that internally), so the credit never counts padding. Everything else is upstream's, tokens
    after an EOS in a credited slot included: the figure is for comparison with the paper.
    """
    if rounds is None:
        return (slot_size * slots - padding) / 2
    # Upstream derives the divisor from its loop variable, which stops at slot_size - 1.
    return (slot_size * slots - padding) / (2 * min(rounds + 1, slot_size))


def padding_in(state: DecodeState, positions: np.ndarray) -> int:
    """How many of these absolute positions lie past the generation length asked for."""
    if state.gen_length is None:
        return 0
    return int((positions >= state.prompt_length + state.gen_length).sum())


def verified_slots(drafts: np.ndarray, accepted: np.ndarray, eos_ids, slot_size: int):
    """What the verify pass commits: (slots, index of the slot holding an EOS or None), or None
    when less than one whole slot reads as left-to-right text (then the chosen slots are infilled)."""
    prefix = accepted_prefix(accepted)
    eos = first_eos(drafts.reshape(-1)[:prefix], eos_ids)
    if eos is not None:
        return eos // slot_size + 1, eos // slot_size
    if prefix >= slot_size:
        return prefix // slot_size, None
    return None


def iterate(state: DecodeState, pending: List[int], settings: DecodeSettings):
    """One plan-verify(-infill) iteration; removes what it decides from ``pending``; returns its
    ``Commit``."""
    S = settings.slot_size
    # plan_slots: only the leftmost pending slots are drafted (and so can be chosen) this time.
    candidates = pending[: settings.plan_slots] if settings.plan_slots else pending
    drafted = yield from plan(state, candidates, settings)
    chosen = choose_slots(drafted.confidence.tolist(), settings.slot_threshold)
    starts = [candidates[i] for i in chosen]
    positions = slot_positions(state, starts, S)
    drafts = drafted.drafts[chosen]
    scores = drafted.scores[chosen] if drafted.scores is not None else None
    accepted = yield from verify(state, drafts, positions, settings.token_threshold)
    verified = verified_slots(drafts, accepted, state.eos_ids, S)
    if verified is not None:
        n, eos_slot = verified
        return settle(state, pending, starts[:n], drafts[:n], positions[:n], eos_slot, "verify",
                      generation_tpf(S, n, padding=padding_in(state, positions[:n])),
                      scores=scores[:n] if scores is not None else None)

    # Nothing committed: the verify pass's entries are simply rewritten by the infill rows.
    tags = np.cumprod(accepted, axis=1).astype(np.int32)
    result = yield from infill(state, drafts, positions, tags, settings, scores)
    n = result.tokens.shape[0]
    return settle(state, pending, starts[:n], result.tokens, positions[:n], result.eos_row, "infill",
                  generation_tpf(S, len(chosen), result.rounds, padding_in(state, positions)),
                  result.layout_rows, result.scores)


def settle(state: DecodeState, pending: List[int], starts: List[int], tokens: np.ndarray,
           positions: np.ndarray, eos_slot: Optional[int], kind: str, tpf: float,
           layout_rows: Optional[int] = None, scores: Optional[Scores] = None) -> Commit:
    """Commit these slots, take them off ``pending`` and describe the commit.

    If slot ``eos_slot`` holds an EOS, every pending slot from it onward is
    dropped too (by position: upstream drops by row index while infilling and
    loses the text of slots before the EOS) and generation ends with the block.
    """
    kept = commit(state, tokens, layout_rows)
    done = set(starts)
    if eos_slot is not None:
        state.finished = True
        done |= {s for s in pending if s >= starts[eos_slot]}
    pending[:] = [s for s in pending if s not in done]
    offsets = positions.reshape(-1)[:kept] - state.prompt_length
    logprobs, top = scores.lists(kept) if scores is not None else (None, None)
    return Commit(offsets.tolist(), tokens.reshape(-1)[:kept].tolist(), kind, len(starts), tpf, logprobs, top)


def make_room(state: DecodeState, needed: int):
    """A bounded cache (``max_kv_size``) makes room before a block (or a left-to-right step) that
    needs ``needed`` entries besides the prompt tokens still to feed: a prompt too long to go with
    that forward is first fed in chunks (all but its last token), each after an eviction; then the
    oldest entries go. Entries are only ever dropped here, between blocks. Unbounded: nothing."""
    cache = state.cache
    if cache.max_size is None:
        return
    while len(state.uncached) > 1 and cache.length + len(state.uncached) + needed > cache.max_size:
        chunk = min(len(state.uncached) - 1, cache.max_size - SINK - needed - 1)
        cache.evict_for(chunk)
        start = state.fed_from
        yield from request(state, state.uncached[:chunk], range(start, start + chunk), cache.append(chunk), last=1)
        cache.commit(chunk)
        state.uncached = state.uncached[chunk:]
    cache.evict_for(len(state.uncached) + needed)


def plan_and_infill(state: DecodeState, settings: DecodeSettings, on_commit: Callable[[Commit], None]):
    """One sequence's whole decoding as steps: the blocks one after another, each iteration's
    commit handed to ``on_commit``."""
    block = settings.block_length
    S = settings.slot_size
    for b in range(settings.serial_num_blocks):
        yield from make_room(state, block)
        pending = list(range(b * block, (b + 1) * block, S))
        while pending:
            on_commit((yield from iterate(state, pending, settings)))
        if state.finished:
            break


def run_steps(model, state: DecodeState, steps):
    """Serve a step generator's requests for one sequence alone until it ends; its return value."""
    reply = None
    while True:
        try:
            need = steps.send(reply)
        except StopIteration as stop:
            return stop.value
        reply = forward(model, state.cache, need) if isinstance(need, Forward) else sync(need)


def generate_step(model, state: DecodeState, settings: DecodeSettings) -> Iterator[Commit]:
    """Decode one sequence alone, yielding each iteration's commit before the next forward runs."""
    commits: List[Commit] = []
    steps = plan_and_infill(state, settings, commits.append)
    reply = None
    while True:
        try:
            need = steps.send(reply)
        except StopIteration:
            break
        while commits:
            yield commits.pop(0)
        reply = forward(model, state.cache, need) if isinstance(need, Forward) else sync(need)
    yield from commits


def generate_ids(
    model,
    prompt_ids: Sequence[int],
    *,
    gen_length: Optional[int] = None,
    slot_size: Optional[int] = None,
    serial_num_blocks: Optional[int] = None,
    slot_threshold: Optional[float] = None,
    token_threshold: Optional[float] = None,
    temperature: float = 0.0,
    seed: Optional[int] = None,
    mask_id: Optional[int] = None,
    eos_token_id: Union[None, int, Iterable[int]] = None,
    preset: Optional[str] = None,
    top_p: Optional[float] = None,
    top_k: Optional[int] = None,
    min_p: Optional[float] = None,
    plan_slots: Optional[int] = None,
    prompt_cache: Optional[PromptCache] = None,
    max_kv_size: Optional[int] = None,
    logprobs: Optional[int] = None,
) -> GenerationResult:
    """Plan-and-infill generation from token ids (docs/decoding.md describes the algorithm).

    Knobs left as None take the preset's value, then the model's own (its
    ``generation_config.json``), then ``DecodeSettings``'s.

    Args:
        model: a model from ``load`` or ``load_model``.
        prompt_ids: the prompt's token ids (``tokenizer_utils.prompt_ids`` builds them from text).
        gen_length: most tokens to generate; padded internally to whole slots in every block,
            at most ``gen_length`` are returned. Default: the model's, fitted to its positions.
        slot_size: tokens per slot, the unit the decoder drafts, verifies and commits.
        serial_num_blocks: blocks decoded one after another; slots are picked within a block.
        slot_threshold: first-token probability a slot's draft needs to be picked (else the most
            confident slot is).
        token_threshold: left-to-right probability a drafted token needs to be accepted.
        temperature: 0 for greedy drafts, above 0 for Gumbel-max sampling.
        seed: seed for sampling (temperature > 0); None draws one.
        mask_id: the mask token; default the config's ``mask_token_id``.
        eos_token_id: an id or ids that end the generation; default the config's.
        preset: a name from ``presets.PRESETS`` (the paper's per-benchmark settings).
        top_p, top_k, min_p: with temperature > 0, draft among fewer tokens (``sampling.truncate``);
            None: all of them.
        plan_slots: most pending slots a plan call drafts, the leftmost of the block (0: all, as
            upstream). Fewer makes each plan call cheaper where compute bounds a forward, at the
            cost of some parallelism (slots further right wait for a later plan).
        prompt_cache: a ``make_prompt_cache`` cache kept across calls: only the prompt tokens it
            does not hold are fed, and it holds prompt + answer afterwards.
        max_kv_size: bound the cache to this many entries (a fresh bounded cache; a prompt
            cache brings its own bound).
        logprobs: None (default) computes none; k in [0, 20] puts each committed token's
            logprob and its k most likely alternatives in the commits (docs/decoding.md says which
            distribution a plan-and-infill token's logprob is taken from).

    Returns:
        A ``GenerationResult``: the tokens in position order, up to and including the first
        EOS, and what they cost (model calls, tokens fed, TPF, time, peak memory).
    """
    prompt_ids = check_token_ids("prompt_ids", prompt_ids)
    settings = settings_for(model, len(prompt_ids), preset=preset, gen_length=gen_length, slot_size=slot_size,
                            serial_num_blocks=serial_num_blocks, slot_threshold=slot_threshold,
                            token_threshold=token_threshold, temperature=temperature, seed=seed,
                            top_p=top_p, top_k=top_k, min_p=min_p, plan_slots=plan_slots, logprobs=logprobs)
    state = start_state(model, prompt_ids, settings, mask_id, eos_token_id, prompt_cache, max_kv_size)
    warn_if_slow_blas()  # once per process, and only for a request that proved good
    transcript = Transcript(state.eos_ids, settings.gen_length)
    mx.reset_peak_memory()
    tic = time.perf_counter()
    for commit in generate_step(model, state, settings):
        transcript.add(commit)
    return finish(state, transcript, time.perf_counter() - tic, prompt_ids, prompt_cache)
