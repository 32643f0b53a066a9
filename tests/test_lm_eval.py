"""lm-evaluation-harness behind ``evaluate --tasks`` and lm-eval's own command line, on the packaged
demo model with local task files written here (nothing is downloaded).

Tests that run lm-eval need the ``eval`` extra (``conftest.eval_extra``: skipped without it,
required in CI); the bad-input ones hide lm-eval or fail before it is needed, so they always run.
"""

import io
import json
import sys
from pathlib import Path

import pytest

from conftest import eval_extra, run_python

LIMIT = 2  # examples per task: seconds, not minutes, on two shared cores
SHORT = ("reverse", "upper")  # families with short answers, one example each


def generative_examples():
    """The first test example of each short family (the demo test split, seed 0)."""
    from refusion_mlx.demo.tasks import test_split

    records = test_split(0, 40)
    return [next(r for r in records if r["family"] == f) for f in SHORT]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """demo_generate and demo_choice as lm-eval YAML (``demo.lm_eval_tasks``): under --limit 2, the
    two short examples, and the multiple choice of the two arithmetic ones after them."""
    from refusion_mlx.demo.lm_eval_tasks import write_tasks
    from refusion_mlx.demo.tasks import test_split

    arithmetic = [r for r in test_split(0, 40) if r["family"] in ("addition", "subtraction")][:2]
    return write_tasks(tmp_path_factory.mktemp("tasks"), records=generative_examples() + arithmetic)


@pytest.fixture(scope="module")
def demo():
    from refusion_mlx import load

    return load("demo")


def direct_logprob(model, tokenizer, context: str, continuation: str):
    """log P(continuation | context) from one causal forward over the whole text, split into
    context and continuation tokens as lm-eval splits them (the context's own encoding first)."""
    import mlx.core as mx
    import numpy as np

    ctx = tokenizer.encode(context, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    cont = whole[len(ctx):]
    logits = model(mx.array([whole[:-1]])).astype(mx.float32)
    logprobs = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))[0, len(ctx) - 1:]
    return float(logprobs[np.arange(len(cont)), cont].sum())


def direct_accuracy(model, tokenizer, samples) -> float:
    """Multiple-choice accuracy from direct forwards, on the (context, continuation) pairs lm-eval
    built for each sample (its chat template and delimiters are lm-eval's business)."""
    correct = []
    for sample in samples:
        pairs = [(a["arg_0"], a["arg_1"]) for _, a in sorted(sample["arguments"].items(),
                                                             key=lambda kv: int(kv[0].rsplit("_", 1)[1]))]
        scores = [direct_logprob(model, tokenizer, *pair) for pair in pairs]
        correct.append(max(range(len(scores)), key=scores.__getitem__) == sample["doc"]["label"])
    return sum(correct) / len(correct)


def read_run(out: Path, decoder: str):
    """lm-eval's results JSON and per-sample records of one decoder under --output-path."""
    results = json.loads(next((out / decoder).rglob("results_*.json")).read_text())
    samples = {}
    for path in (out / decoder).rglob("samples_*.jsonl"):
        task = path.name.split("_20")[0][len("samples_"):]
        samples[task] = sorted((json.loads(line) for line in path.read_text().splitlines()),
                               key=lambda s: s["doc_id"])
    return results, samples


def test_tasks_accuracy_equals_our_evaluation_for_both_decoders(task_dir, demo, tmp_path, capsys):
    """One ``evaluate --tasks`` command: the generative task's per-example verdicts (so its accuracy)
    are those of evaluate.py's own evaluation of the same examples, for each decoder; the
    multiple-choice accuracy is that of direct causal scoring; the table, lm-eval's JSON (with
    what each task cost) and the plot are written."""
    eval_extra()
    from refusion_mlx.evaluate import evaluate, main, make_cases

    out = tmp_path / "out"
    argv = ["--tasks", "demo_generate,demo_choice", "--include-path", str(task_dir), "--limit", str(LIMIT),
            "--apply-chat-template", "--output-path", str(out), "--log-samples", "--plot", str(tmp_path / "p.png")]
    assert main(argv) == 0
    table = capsys.readouterr().out

    model, tokenizer = demo
    cases = make_cases(tokenizer, generative_examples(), 0, model.args.max_position_embeddings)
    ours = evaluate(model, tokenizer, cases, [{}], 256, log=io.StringIO())  # left to right, then the model's knobs
    for decoder, score in zip(("left-to-right", "plan-and-infill"), ours):
        results, samples = read_run(out, decoder)
        verdicts = [bool(s["exact_match"]) for s in samples["demo_generate"]]
        assert verdicts == score.correct, decoder
        assert results["results"]["demo_generate"]["exact_match,none"] == pytest.approx(score.accuracy)
        usage = results["config"]["refusion_usage"]["demo_generate"]
        assert usage["tokens"] == score.tokens and usage["model_calls"] > 0
        row = next(line for line in table.splitlines() if f"| demo_generate | {decoder} |" in line)
        assert f"| {100 * score.accuracy:.1f}% |" in row

    results, samples = read_run(out, "left-to-right")
    assert results["results"]["demo_choice"]["acc,none"] == pytest.approx(direct_accuracy(model, tokenizer,
                                                                                          samples["demo_choice"]))
    assert not list((out / "plan-and-infill").rglob("samples_demo_choice*"))  # scored once: decoder-free
    assert "| demo_choice | (any) |" in table
    assert "speed vs left-to-right" in table and "x |" in table.split("| plan-and-infill |")[1]
    assert (tmp_path / "p.png").stat().st_size > 0


def test_loglikelihoods_equal_a_direct_forward(demo):
    """Requests of different lengths scored together (left-padded, masked) score as each alone."""
    eval_extra()
    from lm_eval.api.instance import Instance

    from refusion_mlx.lm_eval_model import RefusionLM, registered

    assert registered()
    model, tokenizer = demo
    lm = RefusionLM(model=model, tokenizer=tokenizer, batch_size=4)
    pairs = [("Compute 65125 plus 43 digit by digit.\nAnswer:", " 65168"),
             ("Sort these numbers from largest to smallest: 488, 453, 886", " 886, 488, 453"),
             ("Reverse: a b", " b a"), ("Add 20 and 9322, showing each column with its carry.", " 9342")]
    requests = [Instance("loglikelihood", {}, pair, k, ("t", k, 1)) for k, pair in enumerate(pairs)]
    scores = lm.loglikelihood(requests)
    for (context, continuation), (logprob, _) in zip(pairs, scores):
        assert logprob == pytest.approx(direct_logprob(model, tokenizer, context, continuation), rel=1e-4)

    text = "Column 1: 5 + 3 + 0 = 8, write 8, carry 0"
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0, ("r", 0, 1))])[0]
    # The whole text after the EOS token lm-eval conditions its first token on.
    eos = tokenizer.decode([tokenizer.eos_token_id], skip_special_tokens=False)
    assert rolling == pytest.approx(direct_logprob(model, tokenizer, eos, text), rel=1e-4)


def test_generate_until_cuts_at_the_first_stop_string(demo):
    eval_extra()
    from lm_eval.api.instance import Instance

    from refusion_mlx.lm_eval_model import RefusionLM, cut_at_stop

    assert cut_at_stop("a, b. c, d", [".", ","]) == "a"
    assert cut_at_stop("abc", ["x", ""]) == "abc"
    model, tokenizer = demo
    lm = RefusionLM(model=model, tokenizer=tokenizer, decoder="left-to-right")
    prompt = lm.apply_chat_template([{"role": "user", "content": "Compute 65125 plus 43 digit by digit."}])
    full, cut = lm.generate_until([Instance("generate_until", {}, (prompt, {"until": ["Question:"]}), 0, ("g", 0, 1)),
                                   Instance("generate_until", {}, (prompt, {"until": ["carry", "Column 2"]}), 1,
                                            ("g", 1, 1))])
    assert "Column 2" in full and full.index("carry") < full.index("Column 2")
    assert cut == full[: full.index("carry")]


def test_lm_eval_command_line_runs_refusion(task_dir, demo, tmp_path):
    """lm-eval's own CLI (``python -m refusion_mlx.lm_eval_cli``), model ``refusion``."""
    eval_extra()
    out = tmp_path / "out"
    done = run_python("-m", "refusion_mlx.lm_eval_cli", "--model", "refusion", "--model_args",
                      "decoder=left-to-right", "--tasks", "demo_choice", "--include_path", str(task_dir),
                      "--limit", "2", "--output_path", str(out / "run.json"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "demo_choice" in done.stdout and "acc" in done.stdout
    results = json.loads(next(out.glob("run_*.json")).read_text())
    assert results["config"]["refusion_decoder"] == "left-to-right"
    model, tokenizer = demo
    docs = [json.loads(line) for line in (task_dir / "demo_choice.jsonl").read_text().splitlines()[:2]]
    # Without a chat template lm-eval's prompt is the text itself, its continuation " " + choice.
    samples = [{"doc": d, "arguments": {f"gen_args_{k}": {"arg_0": d["query"] + "\nAnswer:", "arg_1": " " + c}
                                        for k, c in enumerate(d["choices"])}} for d in docs]
    assert results["results"]["demo_choice"]["acc,none"] == pytest.approx(direct_accuracy(model, tokenizer, samples))


def one_error_line(capsys, main, argv, *words):
    """``main(argv)`` in this process: exit status 2 and one ``error:`` line naming ``words``."""
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's own refusals
        status = e.code
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], lines[0]


@pytest.mark.parametrize("module", ["evaluate", "lm_eval_cli"])
def test_a_missing_extra_is_one_line(module, monkeypatch, capsys):
    import importlib

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an install without the extra sees
    main = importlib.import_module(f"refusion_mlx.{module}").main
    argv = ["--tasks", "demo_generate", "--limit", "2"] if module == "evaluate" else ["--model", "refusion"]
    one_error_line(capsys, main, argv, "refusion-mlx[eval]")


@pytest.mark.parametrize("argv,words", [
    (["--limit", "0"], ["--limit"]),
    (["--limit", "many"], ["--limit"]),
    (["--num-fewshot", "-1"], ["--num-fewshot"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--slot-size", "0"], ["--slot-size"]),
    (["--decoder", "sideways"], ["--decoder"]),
    (["--include-path", "/no/such/folder"], ["--include-path"]),
    (["--log-samples"], ["--output-path"]),
    (["--data", "x.jsonl"], ["--data"]),
    (["--tasks", ","], ["--tasks"]),
])
def test_bad_task_flags_are_one_line(argv, words, capsys):
    from refusion_mlx.evaluate import main

    one_error_line(capsys, main, ["--tasks", "demo_generate", *argv], *words)


def test_an_unknown_task_is_one_line(task_dir):
    """A real process (lm-eval's logging and warnings would show here), with lm-eval's whole task index."""
    eval_extra()
    done = run_python("-m", "refusion_mlx.evaluate", "--tasks", "demo_generate,no_such_task",
                      "--include-path", str(task_dir))
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no_such_task" in lines[0], done.stderr


def test_bad_model_arguments_raise_refusion_errors(demo):
    eval_extra()
    from refusion_mlx.errors import RefusionError
    from refusion_mlx.lm_eval_model import RefusionLM, preset_for

    model, tokenizer = demo
    for kwargs in ({"decoder": "sideways"}, {"preset": "nope"}, {"batch_size": 0}, {"slot_size": 0}):
        with pytest.raises(RefusionError):
            RefusionLM(model=model, tokenizer=tokenizer, **kwargs)
    assert [preset_for(t) for t in ("gsm8k_cot", "minerva_math_algebra", "arc_challenge_chat", "mmlu_pro_law",
                                    "humaneval_instruct_noprefix", "mathqa", "demo_generate")] == \
        ["gsm8k", "math", "arc", "mmlu-pro", "humaneval", None, None]


def test_table_rows_sum_groups_and_compare_with_left_to_right():
    """rows_of/format_markdown on results shaped as lm-eval returns them: a group's row sums its
    tasks' cost, a log-likelihood task's decoder is "(any)", speed is a ratio to left to right."""
    eval_extra()
    from refusion_mlx.eval_tasks import Run, format_markdown, rows_of
    from refusion_mlx.lm_eval_model import Usage

    def run(decoder, seconds):
        results = {"results": {"grp": {"alias": "grp", "acc,none": 0.5, "acc_stderr,none": 0.1},
                               "gen": {"alias": " - gen", "sample_len": 3, "exact_match,none": 0.75},
                               "mc": {"alias": " - mc", "acc,none": 0.25}},
                   "group_subtasks": {"grp": ["gen", "mc"]},
                   "configs": {"gen": {"output_type": "generate_until"}, "mc": {"output_type": "multiple_choice"}}}
        usage = {"gen": Usage(requests=3, tokens=120, model_calls=40, seconds=seconds),
                 "mc": Usage(requests=2, seconds=1.0, scored_tokens=8, forwards=1)}
        return Run(decoder, ["grp"], results, usage)

    l2r, pi = rows_of(run("left-to-right", 4.0)), rows_of(run("plan-and-infill", 1.0))
    assert [(r.task, r.decoder, r.metric, r.generative) for r in l2r] == [
        ("grp", "left-to-right", "acc,none", True), ("gen", "left-to-right", "exact_match,none", True),
        ("mc", "(any)", "acc,none", False)]
    assert (l2r[0].usage.tokens, l2r[0].usage.seconds, l2r[0].usage.scored_tokens) == (120, 5.0, 8)
    table = format_markdown(l2r + pi[:2])
    row = next(line for line in table.splitlines() if "| gen | plan-and-infill |" in line)
    assert "| 120.0 | 3.00 | 40 | 120 | 1.00 | 4.00x | +0.0 pts |" in row
