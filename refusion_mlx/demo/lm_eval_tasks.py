"""The demo's test split as local lm-evaluation-harness tasks, for ``evaluate --tasks`` offline.

    python -m refusion_mlx.demo.lm_eval_tasks --out tasks/
    python -m refusion_mlx.evaluate --tasks demo_generate,demo_choice --include-path tasks/ \\
        --apply-chat-template --limit 50

- ``demo_generate``: the test split's queries, generated and scored by the demo's own check
  (``demo.tasks.check``: the final answer exactly, up to whitespace), metric ``exact_match``;
  with ``--apply-chat-template`` its prompts are exactly those of the demo evaluation.
- ``demo_choice``: multiple choice from the arithmetic examples (the answer among three near
  misses), metric ``acc``, scored by log-likelihoods.

Only data, YAML and a three-line scorer are written; nothing is downloaded.
"""

import json
from pathlib import Path
from typing import List, Optional, Sequence

from ..cli import ArgumentParser, run_command
from ..errors import RefusionError
from .tasks import DEMO_SEED, test_split

GENERATE = """task: demo_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["Question:"]
process_results: !function demo_scoring.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
SCORING = '''"""lm-eval's scorer for demo_generate: the demo's own exact-match check."""
from refusion_mlx.demo.tasks import check


def process_results(doc, results):
    return {"exact_match": float(check(doc, results[0]))}
'''
CHOICE = """task: demo_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}\\nAnswer:"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def choice_examples(records: Sequence[dict]) -> List[dict]:
    """Multiple choice from the arithmetic examples: the answer among three near misses, its place
    cycling through the four."""
    out = []
    arithmetic = [r for r in records if r["family"] in ("addition", "subtraction")]
    for k, x in enumerate(arithmetic):
        n = int(x["answer"])
        wrong = [str(n + 1), str(n + 10), str(2 * n + 3)]
        label = k % 4
        out.append({"query": x["query"], "choices": wrong[:label] + [x["answer"]] + wrong[label:], "label": label})
    return out


def write_tasks(folder, records: Optional[Sequence[dict]] = None, size: int = 500, seed: int = DEMO_SEED) -> Path:
    """Write demo_generate and demo_choice into ``folder`` (data as JSONL beside the YAML, by
    absolute path); ``records`` default to the demo test split of ``seed`` and ``size``."""
    folder = Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    records = list(records) if records is not None else test_split(seed, size)
    for name, rows in (("demo_generate.jsonl", records), ("demo_choice.jsonl", choice_examples(records))):
        (folder / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    # JSON strings are valid YAML scalars: any path is quoted safely.
    (folder / "demo_generate.yaml").write_text(GENERATE.format(data=json.dumps(str(folder / "demo_generate.jsonl"))))
    (folder / "demo_choice.yaml").write_text(CHOICE.format(data=json.dumps(str(folder / "demo_choice.jsonl"))))
    (folder / "demo_scoring.py").write_text(SCORING)
    return folder


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = ArgumentParser(prog="python -m refusion_mlx.demo.lm_eval_tasks", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the task files (pass it as --include-path)")
    parser.add_argument("--seed", type=int, default=DEMO_SEED, help="demo split seed")
    parser.add_argument("--size", type=int, default=500, help="test examples (default 500)")
    return run_command(_write, parser.parse_args(argv))


def _write(args) -> int:
    if args.size < 1:
        raise RefusionError(f"--size must be at least 1, got {args.size}")
    try:
        folder = write_tasks(args.out, size=args.size, seed=args.seed)
    except OSError as e:
        raise RefusionError(f"cannot write {args.out}: {e.strerror or e}") from None
    print(f"tasks demo_generate, demo_choice in {folder} (pass --include-path {folder})")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
