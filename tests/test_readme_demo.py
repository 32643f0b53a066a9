"""Every demo-task prompt the README (and the demo's data card) shows is one the demo answers right.

The prompts are found in the documents themselves, by the task families' own query templates, so a
prompt added to the README is checked without being listed here; each expected answer is computed
by the family's own answer function (``tasks.solve``), never written down.
"""

import re

import pytest

from conftest import ROOT
from refusion_mlx.demo import tasks
from refusion_mlx.loading import DEMO_MODEL_PATH

DOCUMENTS = [ROOT / "README.md", DEMO_MODEL_PATH / "README.md"]


def demo_prompts(text: str):
    """Every stretch of ``text`` written in one of the families' query templates."""
    patterns = [tasks.template_pattern(t) for f in tasks.FAMILIES.values() for t, _ in f.queries]
    return {m.group(0) for p in patterns for m in re.finditer(p, text)}


PROMPTS = sorted({p for doc in DOCUMENTS for p in demo_prompts(doc.read_text(encoding="utf-8"))})


@pytest.fixture(scope="module")
def demo():
    from refusion_mlx import load

    return load()


def test_the_documents_show_demo_prompts_of_several_families():
    """The extraction is not vacuous: the README's own examples are found (addition, sort, reverse)."""
    readme = demo_prompts((ROOT / "README.md").read_text(encoding="utf-8"))
    families = {tasks.solve(p)["family"] for p in readme}
    assert {"addition", "sort", "reverse"} <= families, readme


@pytest.mark.parametrize("prompt", PROMPTS)
def test_the_demo_answers_every_prompt_shown(demo, prompt):
    """In range (solve raises naming the range otherwise), and answered right, greedy, with the
    demo's own knobs, as `python -m refusion_mlx.generate --prompt ...` runs it."""
    from refusion_mlx import generate

    example = tasks.solve(prompt)
    model, tokenizer = demo
    text = generate(model, tokenizer, prompt)
    assert tasks.check(example, text), (prompt, example["answer"], text)


def test_solve_refuses_what_was_never_trained():
    """The README's old examples: five numbers to sort, two words to reverse."""
    for prompt in ("Sort these numbers from smallest to largest: 512, 47, 903, 268, 131",
                   "Reverse the order of the words: red sun", "Write 7 numbers, starting from 25 and adding 3 each time."):
        with pytest.raises(ValueError, match="outside the trained range"):
            tasks.solve(prompt)
    assert tasks.solve("Write a haiku about autumn.") is None


def test_solve_agrees_with_the_generators():
    """The answer function solve uses is the one that made every test example."""
    for example in tasks.test_split(size=70):
        if example["family"] != "function":
            assert tasks.solve(example["query"])["answer"] == example["answer"], example


def test_the_data_card_lists_every_family_with_its_range():
    card = (DEMO_MODEL_PATH / "README.md").read_text(encoding="utf-8")
    for name, family in tasks.FAMILIES.items():
        assert f"| {name} | {family.scope} | `" in card, name
