"""Synthetic instruction tasks with exact-match answers: the demo model's training and test data.

    python -m refusion_mlx.demo.tasks --out data/demo [--seed 0] [--train 20000 --valid 500 --test 500]

Seven families, each mixing stretches that are predictable from the template
(column-by-column working, code skeletons, list separators: where parallel slot
decoding pays off) with parts that must be read off the prompt (digits, words,
names, constants). Every example is ``{"query", "response", "family", "answer"}``;
``check(example, text)`` compares the final answer of a generated text with
``answer``. Splits come from one seeded stream, test first, then valid, then
train, skipping any example whose query or response came before: the test split
of a seed does not depend on the other sizes and shares no query and no answer
with train.
"""

import json
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..cli import ArgumentParser, run_command
from ..errors import RefusionError

DEMO_SEED = 0
DEFAULT_SIZES = {"train": 20000, "valid": 500, "test": 500}
ORDER = ("test", "valid", "train")  # generation order: test is fixed by (seed, test size) alone
ANSWER = "Answer:"
MAX_RETRIES = 1000  # duplicate queries in a row before a family counts as exhausted
# Prompts to show the demo with (the benchmark's default, a converted demo's card): in range.
EXAMPLE_QUERIES = ("What is 682 + 459? Work column by column.",
                   "Sort these numbers from smallest to largest: 512, 47, 903, 268, 131, 775, 390")

# The ranges the families draw from (inclusive): the demo model knows these and nothing beyond.
OPERAND_DIGITS = (2, 6)  # addition and subtraction operands
SORT_COUNT, SORT_VALUES = (6, 16), (0, 999)
REVERSE_COUNT = (16, 32)
SEQUENCE_TERMS, SEQUENCE_START, SEQUENCE_STEP = (10, 30), (0, 200), (-12, 12)  # the step is never 0
UPPER_COUNT = (5, 12)
FUNCTION_CONSTANT = (2, 199)

WORDS = (
    "apple river stone cloud green house light music paper table window garden bread water "
    "horse bird chair dream field glass heart night ocean plant quiet rain shadow silver smile "
    "snow spring summer sun tiger train tree voice winter yellow bright candle castle coffee "
    "copper desert eagle forest honey island jacket kettle ladder lemon marble meadow mirror "
    "needle orange pencil pepper pillow planet pocket rabbit ribbon rocket saddle salt sand "
    "shell silk skate spoon star storm sugar thunder tomato tower valley velvet wagon whale "
    "wheel wind wolf wool blue small quick lazy happy brave calm cold warm dark soft loud slow "
    "fast old new red black white round sharp sweet bitter early late gentle proud wild"
).split()

ADD_QUERIES = (
    "What is {a} + {b}? Work column by column.",
    "Add {a} and {b}, showing each column with its carry.",
    "Compute {a} plus {b} digit by digit.",
)
SUB_QUERIES = (
    "What is {a} - {b}? Work column by column.",
    "Subtract {b} from {a}, showing each column with its borrow.",
    "Compute {a} minus {b} digit by digit.",
)
SORT_QUERIES = {
    "ascending": ("Sort these numbers from smallest to largest: {items}",
                  "Put in ascending order: {items}"),
    "descending": ("Sort these numbers from largest to smallest: {items}",
                   "Put in descending order: {items}"),
}
REVERSE_QUERIES = (
    "Reverse the order of the words: {words}",
    "Write these words backwards, last word first: {words}",
)
SEQUENCE_QUERIES = (
    "List the first {n} terms of the arithmetic sequence that starts at {a} with step {d}.",
    "Write {n} numbers, starting from {a} and adding {d} each time.",
)
UPPER_QUERIES = (
    "Write these words in capital letters, numbered, one per line: {words}",
    "Number these words and write each in upper case on its own line: {words}",
)

FUNCTION_QUERIES = (
    "Write a Python function named {name} that {desc}.",
    "In Python, define {name}: it {desc}.",
)
# Per kind: function name prefix -> (what the query says, the expression in the code).
FUNCTION_OPS_BY_KIND = {
    "scalar": {
        "add": ("adds {k} to {v}", "{v} + {k}"),
        "subtract": ("subtracts {k} from {v}", "{v} - {k}"),
        "times": ("multiplies {v} by {k}", "{v} * {k}"),
        "div": ("divides {v} by {k}, rounding down", "{v} // {k}"),
        "mod": ("returns the remainder of {v} divided by {k}", "{v} % {k}"),
        "at_least": ("returns {v}, but never less than {k}", "max({v}, {k})"),
        "at_most": ("returns {v}, but never more than {k}", "min({v}, {k})"),
        "is_above": ("tells whether {v} is greater than {k}", "{v} > {k}"),
    },
    "map": {
        "add_all": ("adds {k} to every item of the list {v}", "item + {k}"),
        "scale_all": ("multiplies every item of the list {v} by {k}", "item * {k}"),
        "shift_all": ("subtracts {k} from every item of the list {v}", "item - {k}"),
        "mod_all": ("takes every item of the list {v} modulo {k}", "item % {k}"),
    },
    "filter": {
        "keep_above": ("keeps the items of the list {v} that are greater than {k}", "item > {k}"),
        "keep_below": ("keeps the items of the list {v} that are less than {k}", "item < {k}"),
        "drop_multiples": ("drops the multiples of {k} from the list {v}", "item % {k} != 0"),
    },
}
FUNCTION_OPS = [(kind, name) for kind, ops in FUNCTION_OPS_BY_KIND.items() for name in ops]
SCALAR_ARGS = ("x", "n", "value", "number")
LIST_ARGS = ("items", "values", "numbers", "data")
FUNCTION_BODIES = {
    "scalar": 'def {name}({v}):\n    """Return {expr}."""\n    return {expr}',
    "map": ('def {name}({v}):\n    """Return a new list with {expr} for each item."""\n'
            '    result = []\n    for item in {v}:\n        result.append({expr})\n    return result'),
    "filter": ('def {name}({v}):\n    """Return the items where {expr}."""\n    result = []\n'
               '    for item in {v}:\n        if {expr}:\n            result.append(item)\n'
               '    return result'),
}


def operand(rng: random.Random) -> int:
    """A 2- to 6-digit number, every length equally likely (so short sums are not rare)."""
    digits = rng.randint(*OPERAND_DIGITS)
    return rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def digits_of(n: int, width: int) -> List[int]:
    """Digits of ``n`` from the ones column up, padded with zeros to ``width``."""
    return [(n // 10 ** i) % 10 for i in range(width)]


def column_addition(a: int, b: int):
    """(response, answer) of a + b worked column by column, the carry written out on every line."""
    width = max(len(str(a)), len(str(b)))
    lines, carry = [], 0
    for i, (x, y) in enumerate(zip(digits_of(a, width), digits_of(b, width)), 1):
        total = x + y + carry
        lines.append(f"Column {i}: {x} + {y} + {carry} = {total}, write {total % 10}, carry {total // 10}")
        carry = total // 10
    if carry:
        lines.append("The last carry 1 is the leading digit.")
    answer = addition_answer(a, b)
    return marked(answer, lines), answer


def column_subtraction(a: int, b: int):
    """(response, answer) of a - b (a >= b) worked column by column, the borrow on every line."""
    width = len(str(a))
    lines, borrow = [], 0
    for i, (x, y) in enumerate(zip(digits_of(a, width), digits_of(b, width)), 1):
        top = x + 10 if x - y - borrow < 0 else x
        lines.append(f"Column {i}: {top} - {y} - {borrow} = {top - y - borrow}, borrow {int(top > x)}")
        borrow = int(top > x)
    answer = subtraction_answer(a, b)
    return marked(answer, lines), answer


def marked(answer: str, working: Sequence[str] = ()) -> str:
    """A response: the working lines (if any), then the answer after the ``ANSWER`` marker."""
    return "\n".join(list(working) + [f"{ANSWER} {answer}"])


def function_body(kind: str, name: str, op: str, k: int, v: str) -> str:
    """The Python function of a ``FUNCTION_OPS_BY_KIND`` op with constant ``k`` and argument ``v``."""
    expr = FUNCTION_OPS_BY_KIND[kind][op][1].format(k=k, v=v)
    return FUNCTION_BODIES[kind].format(name=name, v=v, expr=expr)


# Every maker returns (query, response, answer, state): ``state`` is what a follow-up turn may
# refer back to (``demo.conversations``); single-turn examples drop it.
def addition(rng: random.Random):
    """Column addition with the carry written out on every line."""
    a, b = operand(rng), operand(rng)
    response, answer = column_addition(a, b)
    return rng.choice(ADD_QUERIES).format(a=a, b=b), response, answer, {"number": a + b}


def subtraction(rng: random.Random):
    """Column subtraction (larger minus smaller) with the borrow written out on every line."""
    a, b = sorted((operand(rng), operand(rng)), reverse=True)
    response, answer = column_subtraction(a, b)
    return rng.choice(SUB_QUERIES).format(a=a, b=b), response, answer, {"number": a - b}


def sorting(rng: random.Random):
    """Sort 6-16 numbers below 1000, either way round."""
    numbers = [rng.randint(*SORT_VALUES) for _ in range(rng.randint(*SORT_COUNT))]
    order = rng.choice(sorted(SORT_QUERIES))
    answer = sort_answer(numbers, order)
    query = rng.choice(SORT_QUERIES[order]).format(items=", ".join(map(str, numbers)))
    return query, marked(answer), answer, {"numbers": numbers, "order": order}


def reversing(rng: random.Random):
    """Reverse a sentence of 16-32 words: pure copying from the prompt."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(*REVERSE_COUNT))]
    answer = reverse_answer(words)
    # The lead-in puts a space before the first word, so it is the same token as in the prompt.
    query = rng.choice(REVERSE_QUERIES).format(words=" ".join(words))
    return query, marked(answer), answer, {"words": words[::-1]}


def sequence(rng: random.Random):
    """The first n terms of an arithmetic progression (steps may be negative)."""
    n, a = rng.randint(*SEQUENCE_TERMS), rng.randint(*SEQUENCE_START)
    d = rng.choice([s for s in range(SEQUENCE_STEP[0], SEQUENCE_STEP[1] + 1) if s])
    answer = sequence_answer(n, a, d)
    return rng.choice(SEQUENCE_QUERIES).format(n=n, a=a, d=d), answer, answer, {"a": a, "d": d, "n": n}


def upper_case(rng: random.Random):
    """Number 5-12 words and write them in capitals, one per line."""
    words = [rng.choice(WORDS) for _ in range(rng.randint(*UPPER_COUNT))]
    answer = upper_answer(words)
    return rng.choice(UPPER_QUERIES).format(words=", ".join(words)), answer, answer, {"words": words}


def addition_answer(a: int, b: int) -> str:
    return str(a + b)


def subtraction_answer(a: int, b: int) -> str:
    return str(a - b)


def sort_answer(numbers: Sequence[int], order: str) -> str:
    return ", ".join(map(str, sorted(numbers, reverse=order == "descending")))


def reverse_answer(words: Sequence[str]) -> str:
    return " ".join(reversed(words))


def sequence_answer(n: int, a: int, d: int, start: int = 0) -> str:
    """Terms ``start`` .. ``start + n - 1`` of a + d k."""
    return ", ".join(str(a + d * k) for k in range(start, start + n))


def upper_answer(words: Sequence[str]) -> str:
    return "\n".join(f"{k}. {w.upper()}" for k, w in enumerate(words, 1))


def python_function(rng: random.Random):
    """A small Python function from a template: the skeleton is fixed, name and constant are not."""
    kind, name = rng.choice(FUNCTION_OPS)
    desc, expr = FUNCTION_OPS_BY_KIND[kind][name]
    k = rng.randint(*FUNCTION_CONSTANT)
    v = rng.choice(SCALAR_ARGS if kind == "scalar" else LIST_ARGS)
    query = rng.choice(FUNCTION_QUERIES).format(name=f"{name}_{k}", desc=desc.format(k=k, v=v))
    body = function_body(kind, f"{name}_{k}", name, k, v)
    return query, body, body, {"kind": kind, "op": name, "k": k, "v": v, "name": f"{name}_{k}"}


def _span(bounds: Tuple[int, int]) -> str:
    return f"{bounds[0]}-{bounds[1]}"


def _within(what: str, value: int, bounds: Tuple[int, int]):
    if not bounds[0] <= value <= bounds[1]:
        raise ValueError(f"{what} {value} is outside the trained range {_span(bounds)}")


def _known_words(words: Sequence[str]) -> List[str]:
    unknown = [w for w in words if w not in WORDS]
    if unknown:
        raise ValueError(f"{unknown[0]!r} is not one of the {len(set(WORDS))} trained words")
    return list(words)


def _solve_addition(f: dict, _order: str) -> str:
    a, b = int(f["a"]), int(f["b"])
    for x in (a, b):
        _within("digits in an operand:", len(str(x)), OPERAND_DIGITS)
    return addition_answer(a, b)


def _solve_subtraction(f: dict, _order: str) -> str:
    a, b = int(f["a"]), int(f["b"])
    for x in (a, b):
        _within("digits in an operand:", len(str(x)), OPERAND_DIGITS)
    if a < b:
        raise ValueError(f"{a} - {b}: the trained subtractions take the smaller from the larger")
    return subtraction_answer(a, b)


def _solve_sort(f: dict, order: str) -> str:
    numbers = [int(x) for x in f["items"].split(", ")]
    _within("count of numbers", len(numbers), SORT_COUNT)
    for x in numbers:
        _within("number", x, SORT_VALUES)
    return sort_answer(numbers, order)


def _solve_reverse(f: dict, _order: str) -> str:
    words = _known_words(f["words"].split(" "))
    _within("count of words", len(words), REVERSE_COUNT)
    return reverse_answer(words)


def _solve_sequence(f: dict, _order: str) -> str:
    n, a, d = int(f["n"]), int(f["a"]), int(f["d"])
    _within("count of terms", n, SEQUENCE_TERMS)
    _within("start", a, SEQUENCE_START)
    _within("step", d, SEQUENCE_STEP)
    if d == 0:
        raise ValueError("step 0 was never trained")
    return sequence_answer(n, a, d)


def _solve_upper(f: dict, _order: str) -> str:
    words = _known_words(f["words"].split(", "))
    _within("count of words", len(words), UPPER_COUNT)
    return upper_answer(words)


@dataclass(frozen=True)
class Family:
    """A task family: how to draw an example, where its final answer starts, and what it spans.

    ``scope`` states the ranges ``make`` draws from (the data card lists it); ``queries`` are its
    query templates (with the order they ask for, for sort) and ``solve`` computes the answer from
    a template's fields with the same function ``make`` uses, raising ValueError outside the ranges.
    """

    make: Callable[[random.Random], tuple]  # rng -> (query, response, answer, state)
    marker: Optional[str]  # the answer follows the last marker; None: the whole response
    scope: str
    queries: Tuple[Tuple[str, str], ...] = ()  # (template, order)
    solve: Optional[Callable[[dict, str], str]] = None  # (template fields, order) -> answer


def _plain(templates: Sequence[str]) -> Tuple[Tuple[str, str], ...]:
    return tuple((t, "") for t in templates)


FAMILIES: Dict[str, Family] = {
    "addition": Family(addition, ANSWER, f"two numbers of {_span(OPERAND_DIGITS)} digits each",
                       _plain(ADD_QUERIES), _solve_addition),
    "subtraction": Family(subtraction, ANSWER,
                          f"two numbers of {_span(OPERAND_DIGITS)} digits each, the smaller from the larger",
                          _plain(SUB_QUERIES), _solve_subtraction),
    "sort": Family(sorting, ANSWER,
                   f"{_span(SORT_COUNT)} numbers from {SORT_VALUES[0]} to {SORT_VALUES[1]}, either order",
                   tuple((t, order) for order, ts in sorted(SORT_QUERIES.items()) for t in ts), _solve_sort),
    "reverse": Family(reversing, ANSWER, f"{_span(REVERSE_COUNT)} words from its list of {len(set(WORDS))}",
                      _plain(REVERSE_QUERIES), _solve_reverse),
    "sequence": Family(sequence, None,
                       f"{_span(SEQUENCE_TERMS)} terms, starting at {_span(SEQUENCE_START)}, "
                       f"step {SEQUENCE_STEP[0]} to {SEQUENCE_STEP[1]} (not 0)",
                       _plain(SEQUENCE_QUERIES), _solve_sequence),
    "upper": Family(upper_case, None, f"{_span(UPPER_COUNT)} words from its list of {len(set(WORDS))}",
                    _plain(UPPER_QUERIES), _solve_upper),
    "function": Family(python_function, None,
                       f"{len(FUNCTION_OPS)} operations in 3 code templates, constant {_span(FUNCTION_CONSTANT)}"),
}

# A template's fields as the generators write them.
FIELD_PATTERNS = {"a": r"-?\d+", "b": r"-?\d+", "n": r"-?\d+", "d": r"-?\d+",
                  "items": r"-?\d+(?:, -?\d+)*", "words": r"[A-Za-z]+(?:,? [A-Za-z]+)*"}


def template_pattern(template: str) -> str:
    """A regular expression matching what ``template`` formats to, one named group per field."""
    parts = re.split(r"\{(\w+)\}", template)
    return "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>{FIELD_PATTERNS[p]})" for i, p in enumerate(parts))


def solve(query: str) -> Optional[dict]:
    """The example a query written in one of the families' templates asks for.

    ``{"query", "family", "answer"}`` (``check`` takes it), the answer computed by the function the
    family's generator uses; None for a query in no template (or of the function family, whose
    queries are not parsed); ValueError naming the range when the query leaves what was trained.
    """
    for name, family in FAMILIES.items():
        for template, order in family.queries:
            match = re.fullmatch(template_pattern(template), query)
            if match:
                try:
                    answer = family.solve(match.groupdict(), order)
                except ValueError as e:
                    raise ValueError(f"{query!r}: {name}: {e} ({family.scope})") from None
                return {"query": query, "family": name, "answer": answer}
    return None


def normalize(text: str) -> str:
    """Surrounding whitespace and trailing spaces on each line do not count."""
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def extract_answer(text: str, family: str) -> Optional[str]:
    """The final answer in a generated text: after the family's last marker, or the whole text."""
    marker = FAMILIES[family].marker
    if marker is None:
        return normalize(text)
    if marker not in text:
        return None
    return normalize(text.rsplit(marker, 1)[1])


def check(example: dict, generated_text: str) -> bool:
    """Whether a generated text's final answer equals the example's, up to surrounding whitespace."""
    family = example.get("family")
    if family not in FAMILIES:  # foreign data: the whole response is the answer
        return normalize(generated_text) == normalize(example.get("answer", example["response"]))
    expected = example.get("answer")
    if expected is None:  # a record without its answer: take it from the reference response
        expected = extract_answer(example["response"], family)
    return extract_answer(generated_text, family) == normalize(expected)


def make_example(family: str, rng: random.Random) -> dict:
    """One example of a family."""
    query, response, answer, _ = FAMILIES[family].make(rng)
    return {"query": query, "response": response, "family": family, "answer": answer}


def example_stream(seed: int):
    """Examples, families in turn, forever (until a family runs dry); no query and no response twice.

    Responses are deduplicated too: a rephrased query (or, for sort, a reshuffled
    list) would otherwise bring a test answer into train.
    """
    rng = random.Random(seed)
    queries, responses = set(), set()
    names = sorted(FAMILIES)
    for k in range(sys.maxsize):
        family = names[k % len(names)]
        for _ in range(MAX_RETRIES):
            example = make_example(family, rng)
            if example["query"] not in queries and example["response"] not in responses:
                break
        else:
            raise ValueError(f"family {family!r} has no new examples left after {len(queries)} examples")
        queries.add(example["query"])
        responses.add(example["response"])
        yield example


def resolve_sizes(sizes: Optional[Dict[str, int]]) -> Dict[str, int]:
    """Split sizes: the defaults, overridden by ``sizes``; each must be >= 0."""
    merged = dict(DEFAULT_SIZES, **(sizes or {}))
    unknown = set(merged) - set(ORDER)
    if unknown:
        raise ValueError(f"unknown split {sorted(unknown)[0]!r} (splits: {', '.join(ORDER)})")
    if any(not isinstance(n, int) or n < 0 for n in merged.values()):
        raise ValueError(f"split sizes must be non-negative integers, got {merged}")
    return merged


def make_splits(seed: int = DEMO_SEED, sizes: Optional[Dict[str, int]] = None) -> Dict[str, List[dict]]:
    """{"train", "valid", "test"} example lists; no query appears twice across them."""
    sizes = resolve_sizes(sizes)
    stream = example_stream(seed)
    return {name: [next(stream) for _ in range(sizes[name])] for name in ORDER}


def test_split(seed: int = DEMO_SEED, size: int = DEFAULT_SIZES["test"]) -> List[dict]:
    """The test split of ``seed`` alone (it is generated first, so nothing else is needed)."""
    return make_splits(seed, {"train": 0, "valid": 0, "test": size})["test"]


def write_splits(folder, seed: int = DEMO_SEED, sizes: Optional[Dict[str, int]] = None,
                 make: Optional[Callable[..., Dict[str, List[dict]]]] = None) -> Path:
    """Write train.jsonl, valid.jsonl and test.jsonl of ``make(seed, sizes)`` (default: this module's
    ``make_splits``, {"query","response"} plus family and answer), one JSON record a line."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, records in (make or make_splits)(seed, sizes).items():
        lines = (json.dumps(x, ensure_ascii=False) for x in records)
        (folder / f"{name}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return folder


def length_stats(examples: Sequence[dict], encode: Callable[[str], list], key: str = "response") -> dict:
    """Per family: (count, min, median, max) of ``key`` lengths in tokens."""
    lengths: Dict[str, List[int]] = {}
    for x in examples:
        lengths.setdefault(x["family"], []).append(len(encode(x[key])))
    return {f: (len(v), min(v), sorted(v)[len(v) // 2], max(v)) for f, v in sorted(lengths.items())}


def splits_command(argv, prog: str, about: str, noun: str, sizes: Dict[str, int],
                   make: Optional[Callable[..., Dict[str, List[dict]]]] = None) -> int:
    """The command line that writes a module's splits (``noun``: what a record is) to ``--out``."""
    parser = ArgumentParser(prog=prog, description=about)
    parser.add_argument("--out", required=True, help="folder for train.jsonl / valid.jsonl / test.jsonl")
    parser.add_argument("--seed", type=int, default=DEMO_SEED)
    for name in ORDER[::-1]:
        parser.add_argument(f"--{name}", type=int, default=sizes[name], help=f"{name} {noun}")

    def write(args) -> int:
        try:
            folder = write_splits(args.out, args.seed, {n: getattr(args, n) for n in ORDER}, make)
        except (ValueError, OSError) as e:
            raise RefusionError(str(e)) from None
        print(f"wrote {', '.join(f'{getattr(args, n)} {n}' for n in ORDER[::-1])} {noun} to {folder}")
        return 0

    return run_command(write, parser.parse_args(argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
    return splits_command(argv, "python -m refusion_mlx.demo.tasks", __doc__.split("\n")[0], "examples",
                          DEFAULT_SIZES)


if __name__ == "__main__":
    sys.exit(main())
