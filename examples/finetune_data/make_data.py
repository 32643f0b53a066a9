"""Write the example fine-tuning set: column addition explained digit by digit (upstream's format).

    python examples/finetune_data/make_data.py    # rewrites train/valid/test.jsonl next to this file
"""

import json
import random
from pathlib import Path


def explain(a: int, b: int) -> str:
    """Column addition, right to left, with carries spelled out."""
    steps, carry, digits = [], 0, []
    x, y = str(a)[::-1], str(b)[::-1]
    for k in range(max(len(x), len(y))):
        da = int(x[k]) if k < len(x) else 0
        db = int(y[k]) if k < len(y) else 0
        total = da + db + carry
        sum_text = f"{da} + {db}" + (f" + {carry}" if carry else "")
        carry, digit = divmod(total, 10)
        digits.append(str(digit))
        steps.append(f"{sum_text} = {total}, write {digit}" + (", carry 1" if carry else ""))
    if carry:
        steps.append("write the carry 1")
    return "; ".join(steps) + f". So {a} + {b} = {a + b}."


def main():
    rng = random.Random(0)
    pairs = set()
    while len(pairs) < 200:
        pairs.add((rng.randint(10, 999), rng.randint(10, 999)))
    rows = [{"query": f"What is {a} + {b}? Add the columns.", "response": explain(a, b)}
            for a, b in sorted(pairs)]
    rng.shuffle(rows)
    here = Path(__file__).parent
    for name, part in [("train", rows[:160]), ("valid", rows[160:180]), ("test", rows[180:])]:
        (here / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


if __name__ == "__main__":
    main()
