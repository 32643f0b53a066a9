"""Conversations scored turn by turn: ``python -m refusion_mlx.evaluate --multi-turn``.

The conversations (``refusion_mlx.demo.conversations``' test split, or ``--data`` records with
``messages`` and ``turns``) are each decoded turn by turn, every
user turn added to the model's own earlier answers, through a prompt cache that keeps the
answers' keys as decoded (``keep``), one that re-prefills them (``re-prefill``: exactly a fresh
call), and no cache (``no cache``: every turn feeds the whole conversation). Each turn is
checked against the reference answer, so an early mistake can cost the turns that refer to it.
It prints accuracy per turn and overall, how many conversations got their first 3 turns right,
tokens fed and seconds per mode, and how often ``keep`` and ``re-prefill`` answer differently.
"""

import sys
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

from .errors import RefusionError
from .evaluate import read_examples

MODES = (("keep", True), ("re-prefill", False), ("no cache", None))  # name, keep_answers (None: no cache)
HELD_TURNS = 3  # "holds a 3-turn conversation": the first 3 turns all right


@dataclass
class Conversation:
    """One mode's run of one conversation: per turn, the answer text and whether it checked."""

    texts: List[str] = field(default_factory=list)
    correct: List[bool] = field(default_factory=list)
    fed: int = 0
    cached: int = 0
    generated: int = 0
    seconds: float = 0.0
    overflowed: bool = False  # stopped early: the history outgrew the model's positions


def user_turns(record: dict, where: str) -> tuple:
    """(system messages, user texts, turn descriptions) of a conversation record."""
    messages, turns = record.get("messages"), record.get("turns")
    if not isinstance(messages, list) or not isinstance(turns, list):
        raise RefusionError(f"{where}: a multi-turn record needs 'messages' and 'turns' lists")
    system = [m for m in messages[:1] if isinstance(m, dict) and m.get("role") == "system"]
    users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users or len(users) != len(turns) or not all(isinstance(u, str) for u in users):
        raise RefusionError(f"{where}: expected one 'turns' entry per user message")
    return system, users, turns


def converse(model, tokenizer, record: dict, keep_answers: Optional[bool], knobs: dict, where: str) -> Conversation:
    """Decode a conversation turn by turn, each answer the model's own; score every turn."""
    from .decode import generate_ids
    from .demo.tasks import check
    from .kv import make_prompt_cache
    from .tokenizer_utils import default_eos, prompt_ids

    system, users, turns = user_turns(record, where)
    cache = None if keep_answers is None else make_prompt_cache(model, keep_answers=keep_answers)
    eos, out = default_eos(tokenizer), Conversation()
    messages = list(system)
    for user, turn in zip(users, turns):
        messages.append({"role": "user", "content": user})
        ids = prompt_ids(tokenizer, messages)
        if len(ids) >= model.args.max_position_embeddings:
            out.overflowed = True
            break
        result = generate_ids(model, ids, mask_id=model.args.mask_token_id, eos_token_id=eos,
                              prompt_cache=cache, **knobs)
        text = tokenizer.decode(result.tokens, skip_special_tokens=True)
        messages.append({"role": "assistant", "content": text})
        out.texts.append(text)
        out.correct.append(check(turn, text))
        out.fed += result.tokens_fed
        out.cached += result.cached_tokens
        out.generated += len(result.tokens)
        out.seconds += result.wall_time
    return out


def evaluate_conversations(model, tokenizer, records: Sequence[dict], knobs: dict, log=sys.stderr) -> dict:
    """mode name -> one ``Conversation`` per record, after one untimed warm-up."""
    converse(model, tokenizer, records[0], True, knobs, "conversation 1")  # kernels built, buffers made
    runs = {}
    for k, (name, keep) in enumerate(MODES, 1):
        print(f"[{k}/{len(MODES)}] {name}: {len(records)} conversations", file=log, flush=True)
        runs[name] = [converse(model, tokenizer, r, keep, knobs, f"conversation {i}")
                      for i, r in enumerate(records, 1)]
    return runs


def format_conversations(runs: dict, records: Sequence[dict]) -> str:
    """Per mode: accuracy by turn and overall, conversations held, cost; then keep vs re-prefill."""
    turns = max(len(r["turns"]) for r in records)
    head = "".join(f"{'turn ' + str(t + 1):>8}" for t in range(turns))
    lines = [f"{'mode':<12}{head}{'overall':>9}{'3 turns':>9}{'fed':>9}{'cached':>9}{'gen':>8}"
             f"{'seconds':>9}{'tok/s':>8}"]
    for name, convs in runs.items():
        cells = []
        for t in range(turns):  # a turn never reached (the history overflowed) counts as wrong
            hits = [t < len(c.correct) and c.correct[t] for c, r in zip(convs, records) if t < len(r["turns"])]
            cells.append(f"{100 * sum(hits) / len(hits):>7.1f}%" if hits else f"{'-':>8}")
        scored = [t < len(c.correct) and c.correct[t] for c, r in zip(convs, records) for t in range(len(r["turns"]))]
        held = [len(c.correct) >= HELD_TURNS and all(c.correct[:HELD_TURNS]) for c, r in zip(convs, records)
                if len(r["turns"]) >= HELD_TURNS]
        gen, secs = sum(c.generated for c in convs), sum(c.seconds for c in convs)
        lines.append(f"{name:<12}{''.join(cells)}{100 * sum(scored) / len(scored):>8.1f}%"
                     f"{100 * sum(held) / max(len(held), 1):>8.1f}%{sum(c.fed for c in convs):>9}"
                     f"{sum(c.cached for c in convs):>9}{gen:>8}{secs:>9.1f}{gen / secs if secs else 0:>8.1f}")
    lines.append(compare_modes(runs["keep"], runs["re-prefill"]))
    return "\n".join(lines)


def compare_modes(keep: Sequence[Conversation], exact: Sequence[Conversation]) -> str:
    """How often reusing answers' keys as decoded changes an answer, against re-prefilling them.

    ``same history`` counts only the turns both modes reached with identical answers so far:
    there the difference is the reuse itself, not a divergence inherited from an earlier turn."""
    differ = total = first = same_history = 0
    for a, b in zip(keep, exact):
        diverged = False
        for x, y in zip(a.texts, b.texts):
            total += 1
            differ += x != y
            if not diverged:
                same_history += 1
                first += x != y
                diverged = x != y
    return (f"keep vs re-prefill: answers differ in {differ} of {total} turns "
            f"({100 * differ / max(total, 1):.1f}%); with the same history so far in {first} of "
            f"{same_history} ({100 * first / max(same_history, 1):.1f}%)")


def load_conversations(data: Optional[str], limit: Optional[int], seed: int, size: int) -> List[dict]:
    """The conversations: read from ``data``, else the demo's multi-turn test split from ``seed``."""
    if data is not None:
        records = read_examples(data, limit)
    else:
        from .demo.conversations import test_split

        records = test_split(seed, min(size, limit) if limit else size)
    for k, record in enumerate(records, 1):
        user_turns(record, f"conversation {k}")
    return records


def run_multi_turn(args, model, tokenizer, settings: Sequence[dict], seed: int) -> int:
    """``--multi-turn``: the conversation table (one plan-and-infill setting: the first given)."""
    import mlx.core as mx

    from .blas import warn_if_slow_blas

    records = load_conversations(args.data, args.limit, seed, args.test_size)
    knobs = dict(settings[0] if args.settings else {}, **({"gen_length": args.max_tokens} if args.max_tokens else {}))
    warn_if_slow_blas()
    source = args.data or f"demo multi-turn test split (seed {seed})"
    print(f"model: {args.model or 'demo'}  device: {mx.default_device()}  data: {source}, {len(records)} "
          f"conversations, {sum(len(r['turns']) for r in records)} turns  setting: "
          f"{', '.join(f'{k}={v}' for k, v in knobs.items()) or 'the model defaults'}  greedy", flush=True)
    print(format_conversations(evaluate_conversations(model, tokenizer, records, knobs), records))
    return 0
