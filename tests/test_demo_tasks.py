"""The demo's synthetic tasks, its tokenizer and blank checkpoint, and the evaluation CLI."""

import json
import struct
import sys

import pytest

from checkpoints import tiny_config, write_checkpoint
from refusion_mlx.demo import tasks
from build_tokenizer import SPECIAL_TOKENS, init_checkpoint, token_ids, train_tokenizer
from refusion_mlx.evaluate import main as evaluate_main

SMALL = {"train": 300, "valid": 20, "test": 50}


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory):
    """The demo tokenizer trained on a small train split; returns (folder, HF tokenizer)."""
    from transformers import AutoTokenizer

    train = tasks.make_splits(0, {"train": 3000, "valid": 0, "test": 0})["train"]
    folder = train_tokenizer((x[k] for x in train for k in ("query", "response")),
                             tmp_path_factory.mktemp("demo_tokenizer"))
    return folder, AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def tiny_demo_model(tmp_path_factory, demo_tokenizer):
    """tests/checkpoints.py's tiny random Qwen3 with the demo tokenizer."""
    folder, tokenizer = demo_tokenizer
    ids = token_ids(folder)
    config = tiny_config(vocab_size=len(tokenizer), bos_token_id=ids["<|beginoftext|>"],
                         eos_token_id=ids["<|im_end|>"], mask_token_id=ids["<|mask|>"],
                         max_position_embeddings=512)
    path = write_checkpoint(tmp_path_factory.mktemp("tiny_demo"), config, head_scale=8.0)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (path / name).write_bytes((folder / name).read_bytes())
    return path


def test_generator_is_deterministic_per_seed():
    assert tasks.make_splits(3, SMALL) == tasks.make_splits(3, SMALL)
    assert tasks.make_splits(3, SMALL)["test"] != tasks.make_splits(4, SMALL)["test"]
    families = {x["family"] for x in tasks.make_splits(3, SMALL)["train"]}
    assert families == set(tasks.FAMILIES)


@pytest.mark.parametrize("family", sorted(tasks.FAMILIES))
def test_every_family_checks_its_own_answer_and_rejects_a_corrupted_one(family):
    import random

    rng = random.Random(7)
    for _ in range(30):
        x = tasks.make_example(family, rng)
        assert set(x) == {"query", "response", "family", "answer"}
        assert tasks.check(x, x["response"])
        assert tasks.check(x, "\n  " + x["response"] + " \n\n")  # surrounding whitespace is fine
        corrupted = x["response"][:-1] + ("0" if x["response"][-1] != "0" else "1")
        assert not tasks.check(x, corrupted)
        assert not tasks.check(x, "")


def test_only_the_final_answer_counts_after_the_working():
    x = tasks.make_example("addition", __import__("random").Random(1))
    assert tasks.check(x, f"some wrong working\nAnswer: {x['answer']}")
    assert not tasks.check(x, x["response"].replace("Answer:", "Result:"))
    without_answer = {k: v for k, v in x.items() if k != "answer"}  # answer taken from the response
    assert tasks.check(without_answer, f"Answer: {x['answer']}") and not tasks.check(without_answer, "1")
    foreign = {"query": "q", "response": " exact text \n"}  # no family: the whole response counts
    assert tasks.check(foreign, "exact text") and not tasks.check(foreign, "exact")


def test_splits_never_share_a_query_or_answer_and_test_ignores_the_other_sizes():
    splits = tasks.make_splits(0, SMALL)
    queries = {name: {x["query"] for x in xs} for name, xs in splits.items()}
    assert all(len(queries[n]) == SMALL[n] for n in SMALL)
    assert not queries["test"] & queries["train"] and not queries["valid"] & queries["train"]
    assert not queries["test"] & queries["valid"]
    responses = {name: {x["response"] for x in xs} for name, xs in splits.items()}
    assert not responses["test"] & responses["train"] and not responses["valid"] & responses["train"]
    bigger = tasks.make_splits(0, {"train": 600, "valid": 5, "test": 50})
    assert bigger["test"] == splits["test"] == tasks.test_split(0, 50)
    assert tasks.test_split(0, 10) == splits["test"][:10]


def test_write_splits_in_the_trainers_format(tmp_path):
    from refusion_mlx.tuner.datasets import split_record

    tasks.write_splits(tmp_path, seed=1, sizes=SMALL)
    for name, size in SMALL.items():
        records = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert len(records) == size
        messages, response = split_record(records[0], name)
        assert messages == [{"role": "user", "content": records[0]["query"]}]
        assert response == records[0]["response"]
    with pytest.raises(ValueError):
        tasks.make_splits(0, {"train": -1})


def test_tokenizer_round_trips_every_test_example_and_has_the_special_tokens(demo_tokenizer):
    folder, tokenizer = demo_tokenizer
    vocab = tokenizer.get_vocab()
    assert all(t in vocab for t in SPECIAL_TOKENS + ["<think>", "</think>"])
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    lengths = []
    for x in tasks.test_split(0, 500):
        for text in (x["query"], x["response"]):
            ids = tokenizer.encode(text, add_special_tokens=False)
            assert tokenizer.decode(ids) == text
        lengths.append(len(tokenizer.encode(x["response"], add_special_tokens=False)))
    assert 16 <= min(lengths) and max(lengths) <= 200
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("1234", add_special_tokens=False)) == list("1234")


def test_chat_template_is_qwen3s(demo_tokenizer):
    _, tokenizer = demo_tokenizer
    user = [{"role": "user", "content": "hi"}]
    on = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False,
                                       enable_thinking=True)
    off = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False,
                                        enable_thinking=False)
    assert on == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert off == on + "<think>\n\n</think>\n\n"
    thought = {"role": "assistant", "content": "<think>\nx\n</think>\n\nok"}
    chat = [{"role": "system", "content": "s"}, *user, thought, {"role": "user", "content": "again"}]
    text = tokenizer.apply_chat_template(chat, add_generation_prompt=False, tokenize=False)
    assert text.startswith("<|im_start|>system\ns<|im_end|>\n") and "<think>" not in text
    assert "<|im_start|>assistant\nok<|im_end|>\n" in text


def test_init_checkpoint_loads_like_a_real_one(tmp_path, demo_tokenizer):
    import mlx.core as mx

    from refusion_mlx import generate_ids, load

    folder, tokenizer = demo_tokenizer
    path = init_checkpoint(tmp_path / "init", folder, size="tiny", seed=1)
    config = json.loads((path / "config.json").read_text())
    ids = token_ids(folder)
    assert config["vocab_size"] == len(tokenizer) and config["tie_word_embeddings"]
    assert (config["eos_token_id"], config["mask_token_id"]) == (ids["<|im_end|>"], ids["<|mask|>"])
    model, wrapper = load(path)
    assert model.args.mask_token_id == ids["<|mask|>"] and wrapper.eos_token_ids == {ids["<|im_end|>"]}
    embed = model.model.embed_tokens.weight
    assert embed.dtype == mx.float32 and abs(embed.std().item() - 0.02) < 0.002
    assert (model.model.norm.weight == 1).all().item()
    result = generate_ids(model, wrapper.encode("What is 1 + 2?"), gen_length=8, slot_size=4)
    # A blank model stops only at its length or at an EOS, and every id is in its vocabulary.
    assert len(result.tokens) == 8 or result.tokens[-1] in wrapper.eos_token_ids
    assert all(0 <= t < config["vocab_size"] for t in result.tokens)


def test_evaluate_end_to_end_prints_the_table_and_writes_the_png(tiny_demo_model, tmp_path, capsys):
    png = tmp_path / "figure.png"
    argv = ["--model", str(tiny_demo_model), "--limit", "3", "--max-tokens", "16", "--plot", str(png),
            "--settings", "s=4,b=2,st=0.9,tt=0.9", "s=8,b=1,st=0.5,tt=0.1"]
    assert evaluate_main(argv) == 0
    out = capsys.readouterr().out
    assert "3 examples" in out and "accuracy" in out and "tok/s" in out and "calls/tok" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["0"], ["1"], ["2"])]
    assert [r[1] for r in rows[:3]] == ["left-to-right", "s=4,b=2,st=0.9,tt=0.9", "s=8,b=1,st=0.5,tt=0.1"]
    assert "accuracy by family" in out and f"plot: {png}" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100


def test_evaluate_reads_any_training_format(tiny_demo_model, tmp_path, capsys):
    records = [{"prompt": "What is 1 + 2?", "completion": "3"},
               {"messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]}]
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    argv = ["--model", str(tiny_demo_model), "--data", str(tmp_path), "--max-tokens", "8",
            "--settings", "s=4,b=1"]
    assert evaluate_main(argv) == 0
    out = capsys.readouterr().out
    assert "2 examples" in out and "accuracy by family" not in out


def test_close_points_get_labels_that_do_not_overlap():
    from refusion_mlx.plot import figure

    # Rows 3-6 of the CPU benchmark sit within a few tokens/s and a point of each other.
    points = [("0", 303.9, 100.0, True), ("1", 975.2, 95.0, False), ("2", 691.6, 95.0, False),
              ("3", 612.3, 94.0, False), ("4", 637.0, 94.0, False), ("5", 630.2, 94.0, False),
              ("6", 620.3, 93.5, False)]
    fig = figure(points)
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts]
    assert sorted(t.get_text() for t in fig.axes[0].texts) == [p[0] for p in points]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_plot_without_matplotlib_is_one_line(tiny_demo_model, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    assert evaluate_main(["--model", str(tiny_demo_model), "--plot", str(tmp_path / "f.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --plot needs matplotlib") and err.count("\n") == 1


@pytest.mark.parametrize("extra, message", [
    (["--limit", "0"], "--limit must be at least 1"),
    (["--settings", "s=4,q=2"], "bad setting"),
    (["--settings", "s=0,b=3"], "slot_size must be a positive integer"),
    (["--settings", "tt=1.5"], "token_threshold must be in [0, 1]"),
    (["--data", "/nonexistent/folder"], "no test split"),
    (["--max-tokens", "608"], "max_position_embeddings"),
    (["--max-tokens", "0"], "--max-tokens must be positive"),
    (["--limit", "x"], "invalid int value"),
])
def test_evaluate_bad_input_is_one_line_and_exit_2(tiny_demo_model, capsys, extra, message):
    try:
        code = evaluate_main(["--model", str(tiny_demo_model), *extra])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1
