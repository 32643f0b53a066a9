"""The demo model's data card: what it was trained on, how, and what it can and cannot do."""

import json
import random
from pathlib import Path

from refusion_mlx.demo.tasks import FAMILIES, make_example

CARD = """\
# refusion_mlx demo model

A {parameters} Qwen3-architecture masked-diffusion LM trained from scratch by
`examples/train_demo.py` with ReFusion's hybrid objective (autoregressive loss on
shuffled clean slots + masked-diffusion loss on masked slots; a share of
{ar_share:.0%} of the examples laid out plainly left to right, `ar_fraction`), so that the
plan-and-infill decoder has real confidence to work with. It ships inside the
`refusion_mlx` package ({dtype}, {size_mb:.1f} MB) and is what
`python -m refusion_mlx.generate` uses when no `--model` is given.

**It is a toy.** It knows seven synthetic task families and nothing else: no
language, no facts, {chat_note}. Ask it anything outside them and it answers with
something shaped like one of them.

## Training data

Synthetic instructions from `refusion_mlx.demo.tasks` (seed {seed}): {train} train,
{valid} valid and {test} test examples, the seven families in turn. Test and valid
share no query and no answer with train; the test split was never trained on.
Every example has an exact-match answer (`refusion_mlx.demo.tasks.check`). Each family
draws from the range below (`refusion_mlx.demo.tasks.FAMILIES`); outside it (fewer numbers
to sort, a shorter sentence to reverse, a word not in its list) the model was never trained,
and its answers are often wrong.

| family | range trained on | example query |
|---|---|---|
{examples}

{chat}## Tokenizer

Byte-level BPE, {vocab} tokens, trained on train.jsonl: Qwen's pre-tokenizer (one
token per digit), Qwen's special tokens plus `<|beginoftext|>` and `<|mask|>`
(mask_token_id {mask}), a Qwen3-style chat template.

## Recipe

{recipe_command}

```json
{recipe}
```

## What it can do

{results}
"""
CHAT = """\
### Conversations

Then fine-tuned from those weights by `examples/train_demo_chat.py` on the same single-turn
examples mixed with {conversations} conversations from `refusion_mlx.demo.conversations` (seed
{seed}; test and valid: {chat_test} and {chat_valid} conversations, never trained on), with
`max_position_embeddings` raised to {positions} so that an 8-turn chat fits. A conversation has
1-8 turns (the loss is on the last answer; the earlier ones are prompt, rendered by the chat
template as the chat command renders them); half open with one of these system prompts:

{systems}

A later turn is a fresh task ({fresh_share}), a follow-up computed from the previous answer, or a
recall of an earlier answer; every answer is in one of the seven families' formats:

| follow-up | example | answer |
|---|---|---|
{follow_ups}

"""
NO_RESULTS = ("Not measured yet: `python -m refusion_mlx.evaluate --model FOLDER` prints accuracy and "
              "speed on the test split.")


def example_queries(seed: int = 12345) -> str:
    """One made-up query per family with its range, for the card's table (not from any split)."""
    rng = random.Random(seed)
    rows = [f"| {name} | {family.scope} | `{make_example(name, rng)['query']}` |" for name, family in FAMILIES.items()]
    return "\n".join(rows)


FOLLOW_UP_ROWS = (
    ("add_to_result / subtract_from_result", "Add 5321 to that result.", "column addition from the last number"),
    ("resort", "Now sort the previous list in reverse.", "the same numbers, the other order"),
    ("upper_words", "Uppercase the words you just reversed, numbered, one per line.", "upper format"),
    ("reverse_words", "Now reverse the order of those words.", "reverse format"),
    ("continue_sequence", "Give the next 6 terms.", "the progression's next terms"),
    ("rename_function / change_constant / change_argument", "Rename that function to helper.",
     "the function, changed"),
    ("recall", "Repeat your answer to my first question.", "that answer again"),
)


def chat_section(recipe: dict, config: dict) -> str:
    """The card's conversation paragraph, for a model fine-tuned by train_demo_chat.py; else ''."""
    sizes = recipe.get("sizes_conversations")
    if not sizes:
        return ""
    from refusion_mlx.demo import conversations

    return CHAT.format(
        conversations=sizes["train"], chat_test=sizes["test"], chat_valid=sizes["valid"], seed=recipe["seed"],
        positions=config["max_position_embeddings"],
        systems="\n".join(f"- `{p}`" for p in conversations.SYSTEM_PROMPTS),
        fresh_share=f"{1 - conversations.FOLLOW_UP_SHARE - conversations.RECALL_SHARE:.0%} when a follow-up applies",
        follow_ups="\n".join(f"| {a} | `{b}` | {c} |" for a, b, c in FOLLOW_UP_ROWS))


def write_card(folder, results: str = NO_RESULTS) -> Path:
    """README.md for a trained demo folder (config.json, training.json, weights) beside them."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    recipe = json.loads((folder / "training.json").read_text())
    size_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    from build_tokenizer import parameter_count

    text = CARD.format(
        parameters=f"{parameter_count(config) / 1e6:.1f}M-parameter", dtype=config.get("torch_dtype"),
        size_mb=size_bytes / 1e6, seed=recipe["seed"], examples=example_queries(),
        vocab=config["vocab_size"], mask=config["mask_token_id"], recipe=json.dumps(recipe, indent=2),
        ar_share=recipe.get("ar_fraction", 0.0), results=results, chat=chat_section(recipe, config),
        recipe_command=("`examples/train_demo.py`, then `examples/train_demo_chat.py` once per phase, each `--from` "
                        "the model of the phase before; the last phase's recipe, the earlier ones under `from_recipe`:"
                        if recipe.get("sizes_conversations") else
                        "`python examples/train_demo.py --out models/demo --ship` with:"),
        chat_note="no chat beyond conversations made of its tasks" if recipe.get("sizes_conversations") else "no chat",
        **recipe["sizes"])
    path = folder / "README.md"
    path.write_text(text)
    return path
