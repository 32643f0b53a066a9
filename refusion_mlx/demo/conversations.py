"""Multi-turn conversations over the demo tasks: the chat half of the demo model's data.

    python -m refusion_mlx.demo.conversations --out data/chat [--seed 0] [--train 40000 --valid 200 --test 200]

A conversation chains 1-8 turns of ``refusion_mlx.demo.tasks``: each user turn is a
fresh task, a *follow-up* whose answer is computed from the previous turn's ("Add 17
to that result.", "Now sort the previous list in reverse.", "Uppercase the words you
just reversed, numbered, one per line.", "Give the next 6 terms.", "Rename that
function to helper."), or a *recall* of an earlier answer ("Repeat your answer to my
first question."). Half of the conversations open with one of ``SYSTEM_PROMPTS``.
Every assistant turn is in one of the task families' formats, so ``tasks.check``
scores it exactly.

A record is ``{"messages": [...], "turns": [{"family", "answer", "kind"}, ...],
"family", "answer"}``: the messages alternate user/assistant (after an optional
system message) and end with the assistant; ``turns`` describes each assistant
message; ``family``/``answer`` are the last turn's (what training's loss is on:
``tuner.datasets`` makes everything before the last assistant message the prompt).

Splits come from one seeded stream, test first, then valid, then train, like the
single-turn splits: the test split depends only on (seed, test size). Test
conversations have ``TEST_TURNS`` turns (so each turn index is scored), train and
valid 1-8. No fresh query appears twice across the stream, and no turn reuses a
query or a response of the single-turn test and valid splits, so no trained turn
answers a single-turn test question. A conversation stays within ``MAX_TOKENS``
(estimated) so that its last answer still fits a 2048-position model.
"""

import random
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from . import tasks

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a careful assistant: show your working, then give the answer.",
    "You are the refusion_mlx demo model. Answer in the exact format asked for.",
    "Be brief and exact.",
)
DEFAULT_SIZES = {"train": 40000, "valid": 200, "test": 200}
ORDER = ("test", "valid", "train")
MAX_TURNS = 8
TEST_TURNS = MAX_TURNS
SYSTEM_SHARE = 0.5  # conversations that open with a system prompt
FOLLOW_UP_SHARE = 0.55  # later turns that refer to the previous answer (when one applies)
RECALL_SHARE = 0.1  # later turns that repeat an answer from two or more turns back
# Conversation length cap in estimated tokens; the estimate (``approx_tokens``) never undercounts
# the demo tokenizer (its densest text, comma-separated numbers, is ~1.3 characters a token).
MAX_TOKENS = 1600
CHARS_PER_TOKEN = 1.2
TURN_OVERHEAD = 10  # the template's role markers around one user and one assistant message

ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh")
RENAMES = ("helper", "compute", "transform", "apply_rule", "process", "my_function", "solve")


def approx_tokens(*texts: str) -> int:
    """An upper estimate of the demo tokenizer's token count of ``texts`` as one turn."""
    return int(sum(len(t) for t in texts) / CHARS_PER_TOKEN) + TURN_OVERHEAD


# --- follow-ups: (query, response, answer, family, state) from the previous turn's state ---------

def add_to_result(rng: random.Random, state: dict):
    k, n = tasks.operand(rng), state["number"]
    query = rng.choice(("Add {k} to that result.", "Now add {k} to it.",
                        "Add {k} to the previous answer, column by column.")).format(k=k)
    response, answer = tasks.column_addition(n, k)
    return query, response, answer, "addition", {"number": n + k}


def subtract_from_result(rng: random.Random, state: dict):
    n = state["number"]
    k = rng.randint(10, min(n, 999999))
    query = rng.choice(("Subtract {k} from that result.", "Now take {k} away from it.",
                        "Subtract {k} from the previous answer, column by column.")).format(k=k)
    response, answer = tasks.column_subtraction(n, k)
    return query, response, answer, "subtraction", {"number": n - k}


def resort(rng: random.Random, state: dict):
    order = "ascending" if state["order"] == "descending" else "descending"
    query = rng.choice(("Now sort the previous list in reverse.", "Sort the same numbers the other way round."))
    answer = tasks.sort_answer(state["numbers"], order)
    return query, tasks.marked(answer), answer, "sort", {"numbers": state["numbers"], "order": order}


def upper_words(rng: random.Random, state: dict):
    query = rng.choice(("Uppercase the words you just reversed, numbered, one per line.",
                        "Now number those words in capitals, one per line."))
    answer = tasks.upper_answer(state["words"])
    return query, answer, answer, "upper", {"words": state["words"], "shown": "upper"}


def reverse_words(rng: random.Random, state: dict):
    query = rng.choice(("Now reverse the order of those words.", "Write those words backwards, last word first."))
    answer = tasks.reverse_answer(state["words"])
    return query, tasks.marked(answer), answer, "reverse", {"words": state["words"][::-1], "shown": "reverse"}


def continue_sequence(rng: random.Random, state: dict):
    m = rng.randint(5, 15)
    query = rng.choice(("Continue that sequence for {m} more terms.", "Give the next {m} terms.")).format(m=m)
    answer = tasks.sequence_answer(m, state["a"], state["d"], start=state["n"])
    return query, answer, answer, "sequence", dict(state, n=state["n"] + m)


def rename_function(rng: random.Random, state: dict):
    name = rng.choice([r for r in RENAMES if r != state["name"]])
    query = rng.choice(("Rename that function to {name}.", "Call that function {name} instead.")).format(name=name)
    return function_turn(query, dict(state, name=name))


def change_constant(rng: random.Random, state: dict):
    k = rng.choice([c for c in range(2, 200) if c != state["k"]])
    # A function named after its constant is renamed with it; a renamed one keeps its name.
    name = f"{state['op']}_{k}" if state["name"] == f"{state['op']}_{state['k']}" else state["name"]
    query = rng.choice(("Now make it use {k} instead of {old}.",
                        "Write the same function with {k} in place of {old}.")).format(k=k, old=state["k"])
    return function_turn(query, dict(state, k=k, name=name))


def change_argument(rng: random.Random, state: dict):
    names = tasks.SCALAR_ARGS if state["kind"] == "scalar" else tasks.LIST_ARGS
    v = rng.choice([a for a in names if a != state["v"]])
    query = rng.choice(("Name its argument {v}.", "Rename the argument to {v}.")).format(v=v)
    return function_turn(query, dict(state, v=v))


def function_turn(query: str, state: dict):
    """A follow-up whose answer is the function of ``state``."""
    body = tasks.function_body(state["kind"], state["name"], state["op"], state["k"], state["v"])
    return query, body, body, "function", state


# name -> (applies to a state, make); a state is what the previous turn's answer stands for.
FOLLOW_UPS: Dict[str, tuple] = {
    "add_to_result": (lambda s: "number" in s, add_to_result),
    "subtract_from_result": (lambda s: s.get("number", 0) >= 10, subtract_from_result),
    "resort": (lambda s: "numbers" in s, resort),
    "upper_words": (lambda s: s.get("shown") == "reverse", upper_words),
    "reverse_words": (lambda s: "words" in s, reverse_words),
    "continue_sequence": (lambda s: "d" in s, continue_sequence),
    "rename_function": (lambda s: "op" in s, rename_function),
    "change_constant": (lambda s: "op" in s, change_constant),
    "change_argument": (lambda s: "op" in s, change_argument),
}


def fresh_turn(rng: random.Random) -> dict:
    """A new task, as the single-turn data draws it."""
    family = rng.choice(sorted(tasks.FAMILIES))
    query, response, answer, state = tasks.FAMILIES[family].make(rng)
    if family in ("reverse", "upper"):
        state = dict(state, shown=family)
    return dict(query=query, response=response, answer=answer, family=family, state=state, kind="fresh")


def next_turn(rng: random.Random, turns: List[dict]) -> dict:
    """The turn after ``turns``: a follow-up, a recall or a fresh task."""
    r = rng.random()
    if turns:
        usable = [n for n, (applies, _) in FOLLOW_UPS.items() if applies(turns[-1]["state"])]
        if r < FOLLOW_UP_SHARE and usable:
            kind = rng.choice(usable)
            query, response, answer, family, state = FOLLOW_UPS[kind][1](rng, turns[-1]["state"])
            return dict(query=query, response=response, answer=answer, family=family, state=state, kind=kind)
        if r < FOLLOW_UP_SHARE + RECALL_SHARE and len(turns) >= 2:
            j = rng.randrange(len(turns) - 1)  # two or more turns back
            query = rng.choice(("Repeat your answer to my {nth} question.",
                                "What did you answer to my {nth} question? Say it again exactly.")
                               ).format(nth=ORDINALS[j])
            return dict(turns[j], query=query, kind="recall")
    return fresh_turn(rng)


def make_conversation(rng: random.Random, num_turns: int, accept: Callable[[dict], bool] = lambda t: True,
                      max_tokens: int = MAX_TOKENS) -> dict:
    """A conversation of up to ``num_turns`` turns (fewer when the next would pass ``max_tokens``);
    ``accept`` may refuse a turn (it is drawn again)."""
    system = rng.choice(SYSTEM_PROMPTS) if rng.random() < SYSTEM_SHARE else None
    used = approx_tokens(system) if system else 0
    turns: List[dict] = []
    while len(turns) < num_turns:
        for _ in range(tasks.MAX_RETRIES):
            turn = next_turn(rng, turns)
            if accept(turn):
                break
        else:
            raise ValueError("no acceptable turn left after many tries")
        cost = approx_tokens(turn["query"], turn["response"])
        if used + cost > max_tokens:
            break
        used += cost
        turns.append(turn)
    return as_record(system, turns)


def as_record(system: Optional[str], turns: Sequence[dict]) -> dict:
    """The JSONL record of a conversation (module docstring)."""
    messages = [{"role": "system", "content": system}] if system else []
    for t in turns:
        messages += [{"role": "user", "content": t["query"]}, {"role": "assistant", "content": t["response"]}]
    described = [{"family": t["family"], "answer": t["answer"], "kind": t["kind"]} for t in turns]
    return {"messages": messages, "turns": described, "family": turns[-1]["family"],
            "answer": turns[-1]["answer"]}


def single_turn_held_out(seed: int) -> tuple:
    """(queries, responses) of the single-turn test and valid splits at their default sizes."""
    splits = tasks.make_splits(seed, {"train": 0})
    held = splits["test"] + splits["valid"]
    return {x["query"] for x in held}, {x["response"] for x in held}


def conversation_stream(seed: int, turns_for: Callable[[random.Random], int]):
    """Conversations forever, each with ``turns_for(rng)`` turns at most; no fresh query twice, no
    single-turn test or valid query or response anywhere."""
    rng = random.Random(f"refusion_mlx.demo.conversations:{seed}")  # apart from the single-turn stream
    held_queries, held_responses = single_turn_held_out(seed)
    seen = set()

    def accept(turn: dict) -> bool:
        if turn["response"] in held_responses:
            return False
        return turn["kind"] != "fresh" or (turn["query"] not in held_queries and turn["query"] not in seen)

    while True:
        record = make_conversation(rng, turns_for(rng), accept)
        seen.update(m["content"] for m in record["messages"] if m["role"] == "user")
        yield record


def resolve_sizes(sizes: Optional[Dict[str, int]]) -> Dict[str, int]:
    """Split sizes: the defaults, overridden by ``sizes``; each must be >= 0."""
    merged = dict(DEFAULT_SIZES, **(sizes or {}))
    if set(merged) - set(ORDER) or any(not isinstance(n, int) or n < 0 for n in merged.values()):
        raise ValueError(f"split sizes must be non-negative integers for {', '.join(ORDER)}, got {merged}")
    return merged


def make_splits(seed: int = tasks.DEMO_SEED, sizes: Optional[Dict[str, int]] = None) -> Dict[str, List[dict]]:
    """{"train", "valid", "test"} conversation lists (test: ``TEST_TURNS`` turns; others 1-8)."""
    sizes = resolve_sizes(sizes)
    plan = {"turns": None}  # what the split being drawn asks for; the stream reads it lazily
    stream = conversation_stream(seed, lambda rng: plan["turns"] or rng.randint(1, MAX_TURNS))
    splits = {}
    for name in ORDER:  # one stream: the test conversations come first whatever the other sizes
        plan["turns"] = TEST_TURNS if name == "test" else None
        splits[name] = [next(stream) for _ in range(sizes[name])]
    return splits


def test_split(seed: int = tasks.DEMO_SEED, size: int = DEFAULT_SIZES["test"]) -> List[dict]:
    """The multi-turn test split of ``seed`` alone (generated first: nothing else is needed)."""
    return make_splits(seed, {"train": 0, "valid": 0, "test": size})["test"]


def write_splits(folder, seed: int = tasks.DEMO_SEED, sizes: Optional[Dict[str, int]] = None) -> Path:
    """Write train.jsonl, valid.jsonl and test.jsonl of conversations."""
    return tasks.write_splits(folder, seed, sizes, make_splits)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return tasks.splits_command(argv, "python -m refusion_mlx.demo.conversations", __doc__.split("\n")[0],
                                "conversations", DEFAULT_SIZES, make_splits)


if __name__ == "__main__":
    sys.exit(main())
