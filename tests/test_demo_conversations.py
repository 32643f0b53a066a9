"""The demo's multi-turn conversations: deterministic splits, answers that follow from earlier
turns, the token budget, and the evaluation's --multi-turn table."""

import json
import re

import pytest

from refusion_mlx.demo import conversations, tasks
from refusion_mlx.evaluate import main as evaluate_main

SIZES = {"train": 60, "valid": 5, "test": 10}


@pytest.fixture(scope="module")
def splits():
    return conversations.make_splits(0, SIZES)


def test_splits_are_deterministic_and_test_ignores_the_other_sizes(splits):
    again = conversations.make_splits(0, SIZES)
    assert json.dumps(again) == json.dumps(splits)
    assert conversations.test_split(0, 4) == splits["test"][:4]
    assert conversations.make_splits(1, {"train": 0, "valid": 0, "test": 3})["test"] != splits["test"][:3]


def test_records_alternate_roles_and_describe_every_answer(splits):
    for record in splits["test"] + splits["train"]:
        messages = record["messages"]
        body = messages[1:] if messages[0]["role"] == "system" else messages
        if messages[0]["role"] == "system":
            assert messages[0]["content"] in conversations.SYSTEM_PROMPTS
        assert [m["role"] for m in body] == ["user", "assistant"] * (len(body) // 2)
        assert len(record["turns"]) == len(body) // 2
        assert 1 <= len(record["turns"]) <= conversations.MAX_TURNS
        assert (record["family"], record["answer"]) == (record["turns"][-1]["family"], record["turns"][-1]["answer"])
        for turn, answer in zip(record["turns"], body[1::2]):
            assert tasks.check(turn, answer["content"])  # each reference answer checks


def test_test_conversations_are_long_and_share_nothing_with_single_turn_held_out(splits):
    queries, responses = conversations.single_turn_held_out(0)
    assert sum(len(r["turns"]) for r in splits["test"]) >= 6 * len(splits["test"])  # mostly 8 turns
    for record in splits["test"] + splits["valid"] + splits["train"]:
        for m in record["messages"]:
            assert m["content"] not in queries and m["content"] not in responses


def numbers(text):
    return [int(n) for n in re.findall(r"-?\d+", text)]


def test_follow_ups_are_computed_from_the_previous_answer():
    """Every follow-up kind, checked against its own reading of the query and the previous answer."""
    seen = set()
    for record in conversations.make_splits(3, {"train": 200, "valid": 0, "test": 0})["train"]:
        turns, messages = record["turns"], [m for m in record["messages"] if m["role"] != "system"]
        for k in range(1, len(turns)):
            kind, query = turns[k]["kind"], messages[2 * k]["content"]
            previous, answer = turns[k - 1]["answer"], turns[k]["answer"]
            seen.add(kind)
            if kind == "add_to_result":
                assert int(answer) == int(previous) + numbers(query)[0]
            elif kind == "subtract_from_result":
                assert int(answer) == int(previous) - numbers(query)[0] >= 0
            elif kind == "resort":
                assert numbers(answer) == numbers(previous)[::-1]  # a sorted list, the other way round
            elif kind == "reverse_words":
                shown = re.findall(r"[a-z]+", previous.lower())
                assert answer.split() == shown[::-1]
            elif kind == "upper_words":
                assert [line.split(". ")[1] for line in answer.splitlines()] == [w.upper() for w in previous.split()]
            elif kind == "continue_sequence":
                prev, new = numbers(previous), numbers(answer)
                step = prev[1] - prev[0]
                assert len(new) == numbers(query)[0] and new[0] == prev[-1] + step
                assert all(b - a == step for a, b in zip(new, new[1:]))
            elif kind == "rename_function":
                new_name = query.split()[-2 if query.endswith("instead.") else -1].rstrip(".")
                assert answer == re.sub(r"def \w+\(", f"def {new_name}(", previous)
            elif kind == "change_constant":
                old, new = numbers(query)[1], numbers(query)[0]
                assert answer == re.sub(rf"(?<![0-9]){old}(?![0-9])", str(new), previous)
            elif kind == "change_argument":
                old, new = re.search(r"def \w+\((\w+)\)", previous).group(1), query.split()[-1].rstrip(".")
                assert answer == re.sub(rf"\b{old}\b", new, previous) != previous
            elif kind == "recall":
                nth = conversations.ORDINALS.index(re.search(r"my (\w+) question", query).group(1))
                assert answer == turns[nth]["answer"] and nth < k - 1
    assert seen >= set(conversations.FOLLOW_UPS) | {"recall"}


def test_every_conversation_fits_its_token_budget():
    from transformers import PreTrainedTokenizerFast

    from refusion_mlx.loading import DEMO_MODEL_PATH
    from refusion_mlx.tokenizer_utils import prompt_ids

    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(DEMO_MODEL_PATH / "tokenizer.json"))
    tokenizer.chat_template = (DEMO_MODEL_PATH / "chat_template.jinja").read_text()
    for record in conversations.test_split(0, 10):
        assert len(prompt_ids(tokenizer, record["messages"])) <= conversations.MAX_TOKENS


def test_write_splits_in_the_trainers_format(tmp_path):
    from refusion_mlx.tuner.datasets import split_record

    conversations.write_splits(tmp_path, 0, {"train": 3, "valid": 1, "test": 1})
    for name in ("train", "valid", "test"):
        for line in (tmp_path / f"{name}.jsonl").read_text().splitlines():
            record = json.loads(line)
            prompt, response = split_record(record, name)
            assert prompt == record["messages"][:-1] and response == record["messages"][-1]["content"]


def three_turns() -> dict:
    """A short 3-turn chat (fresh task, then two follow-ups) in the split's record format."""
    first, first_answer = tasks.column_addition(12, 34)
    second, second_answer = tasks.column_addition(46, 5)
    third, third_answer = tasks.column_subtraction(51, 10)
    queries = ["What is 12 + 34? Work column by column.", "Add 5 to that result.", "Subtract 10 from that result."]
    messages = []
    for query, response in zip(queries, (first, second, third)):
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": response}]
    turns = [{"family": f, "answer": a, "kind": k} for f, a, k in zip(
        ("addition", "addition", "subtraction"), (first_answer, second_answer, third_answer),
        ("fresh", "add_to_result", "subtract_from_result"))]
    return {"messages": messages, "turns": turns, "family": "subtraction", "answer": third_answer}


def test_evaluate_multi_turn_prints_every_mode(tmp_path, capsys):
    (tmp_path / "test.jsonl").write_text(json.dumps(three_turns()) + "\n")
    argv = ["--multi-turn", "--data", str(tmp_path), "--max-tokens", "8", "--settings", "s=4,b=2"]
    assert evaluate_main(argv) == 0
    out = capsys.readouterr().out
    assert "1 conversations, 3 turns" in out
    rows = {line.split("  ")[0].strip(): line.split() for line in out.splitlines()}
    assert {"keep", "re-prefill", "no cache"} <= set(rows)
    assert "turn 3" in out and "turn 4" not in out and "keep vs re-prefill: answers differ in" in out
    fed = {name: int(rows[name][-5]) for name in ("keep", "re-prefill", "no cache")}
    cached = {name: int(rows[name][-4]) for name in ("keep", "re-prefill", "no cache")}
    # The cache feeds only what each turn adds; re-prefilling feeds the answers again; no cache, all.
    assert fed["keep"] < fed["no cache"] and cached["no cache"] == 0 and cached["keep"] > 0


def test_evaluate_multi_turn_refuses_single_turn_records(tmp_path, capsys):
    (tmp_path / "test.jsonl").write_text(json.dumps({"query": "q", "response": "r"}) + "\n")
    assert evaluate_main(["--multi-turn", "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: conversation 1: a multi-turn record needs") and err.count("\n") == 1


def test_the_demo_holds_a_three_turn_chat_whose_turns_refer_back():
    """The shipped demo through the chat command (stdin scripted, its default knobs): each answer
    builds on the one before, and all three are the numbers the code computes."""
    from conftest import run_python

    first = 185 + 1442
    script = ("What is 185 + 1442? Work column by column.\n"
              "Subtract 871 from the previous answer, column by column.\n"
              "Add 903410 to that result.\n")
    chat = run_python("-m", "refusion_mlx.chat", "--verbose", stdin=script)
    assert chat.returncode == 0, chat.stderr
    assert re.findall(r"^Answer: (\d+)$", chat.stdout, re.M) == [str(first), str(first - 871),
                                                                 str(first - 871 + 903410)], chat.stdout
    cached = [int(n) for n in re.findall(r"\[(\d+) prompt tokens cached", chat.stderr)]
    assert cached[0] == 0 and cached[1] > 0 and cached[2] > cached[1]  # each turn reuses the history


def test_chat_bench_runs_a_templated_conversation_with_and_without_the_cache(tiny_path):
    from conftest import run_python

    bench = run_python("-m", "refusion_mlx.chat_bench", "--model", str(tiny_path), "--turns", "2",
                       "--max-tokens", "8", "--memory-n", "0")
    assert bench.returncode == 0, bench.stderr
    rows = re.findall(r"^\| (\d) \| (\d+) \| (\d+) \| (\d+) \|", bench.stdout, re.M)
    assert [r[0] for r in rows] == ["1", "2"], bench.stdout
    (_, p1, cached1, fresh1), (_, p2, cached2, fresh2) = [tuple(map(int, r)) for r in rows]
    assert cached1 == fresh1 == p1 and fresh2 == p2  # without a cache every turn feeds its whole prompt
    assert cached2 <= p2 - p1  # with it turn 2 feeds at most what follows turn 1's prompt
    assert "turn 2 time to first token" in bench.stdout
