"""The command line, end to end, and its answers to bad input."""

import io
import sys

import pytest
from conftest import run_python

from checkpoints import tiny_config, write_checkpoint
from refusion_mlx import generate, generate_ids, stream_generate
from refusion_mlx.generate import main
from refusion_mlx.tokenizer_utils import prompt_ids


FAST = ["--max-tokens", "16", "--slot-size", "4", "--blocks", "2"]


def run_cli(*args, stdin=None):
    return run_python("-m", "refusion_mlx.generate", *args, stdin=stdin)


def test_cli_end_to_end_in_a_fresh_process(tiny_path):
    proc = run_cli("--model", str(tiny_path), "--prompt", "Hello! How can I help", "--verbose", *FAST)
    assert proc.returncode == 0, proc.stderr
    assert "Tokens per model call" in proc.stdout and "model calls" in proc.stdout and "tokens/s" in proc.stdout
    assert "TPF" not in proc.stdout  # upstream's figure is for comparison with the paper, not a headline
    assert "Peak memory" in proc.stdout
    assert "Traceback" not in proc.stderr


def test_cli_text_equals_the_python_api(tiny_path, tiny_tokenizer_model, capsys):
    model, tokenizer = tiny_tokenizer_model
    assert main(["--model", str(tiny_path), "--prompt", "the lazy dog", *FAST]) == 0
    printed = capsys.readouterr().out
    text = generate(model, tokenizer, "the lazy dog", gen_length=16, slot_size=4, serial_num_blocks=2,
                    slot_threshold=0.6, token_threshold=0.3)
    assert printed == text + "\n"


def test_prompt_from_stdin(tiny_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("the lazy dog"))
    assert main(["--model", str(tiny_path), "--prompt", "-", *FAST]) == 0
    from_stdin = capsys.readouterr().out
    assert main(["--model", str(tiny_path), "--prompt", "the lazy dog", *FAST]) == 0
    assert capsys.readouterr().out == from_stdin


def test_chat_template_as_upstream_with_thinking_switch(tiny_tokenizer_model):
    _, tokenizer = tiny_tokenizer_model
    on = tokenizer.decode(prompt_ids(tokenizer, "hi"))
    off = tokenizer.decode(prompt_ids(tokenizer, "hi", enable_thinking=False))
    raw = tokenizer.decode(prompt_ids(tokenizer, "hi", use_chat_template=False))
    assert on == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert off.endswith("<think>\n\n</think>\n\n") and raw == "hi"
    with_system = tokenizer.decode(prompt_ids(tokenizer, "hi", system_prompt="be brief"))
    assert with_system.startswith("<|im_start|>system\nbe brief<|im_end|>")


def test_stream_reports_commits_in_any_order_and_ends_with_the_result(tiny_tokenizer_model):
    model, tokenizer = tiny_tokenizer_model
    knobs = dict(gen_length=32, slot_size=4, serial_num_blocks=1, slot_threshold=0.1,
                 token_threshold=0.9, eos_token_id=[])
    updates = list(stream_generate(model, tokenizer, "the quick", **knobs))
    final = updates[-1]
    assert final.finished and final.result is not None
    filled = sorted(p for u in updates for p in u.filled)
    assert filled == list(range(32))
    ids = prompt_ids(tokenizer, "the quick")
    assert final.result.tokens == generate_ids(model, ids, **knobs).tokens
    assert final.text == tokenizer.decode(final.result.tokens, skip_special_tokens=True) == final.prefix_text


def test_presets_set_the_papers_knobs():
    from refusion_mlx.generate import build_parser, settings_from_args

    args = build_parser().parse_args(["--model", "m", "--prompt", "p", "--preset", "gsm8k"])
    knobs = settings_from_args(args)
    assert (knobs["gen_length"], knobs["slot_size"], knobs["serial_num_blocks"]) == (512, 32, 4)
    assert (knobs["slot_threshold"], knobs["token_threshold"]) == (0.9, 0.4)
    args = build_parser().parse_args(["--model", "m", "--prompt", "p", "--preset", "arc",
                                      "--token-threshold", "0.5"])
    assert settings_from_args(args)["token_threshold"] == 0.5  # explicit flags win


@pytest.mark.parametrize("extra, message", [
    (["--slot-size", "0"], "--slot-size must be a positive integer"),
    (["--max-tokens", "0"], "--max-tokens must be a positive integer"),
    (["--blocks", "-1"], "--blocks must be a positive integer"),
    (["--slot-threshold", "1.5"], "--slot-threshold must be in [0, 1]"),
    (["--token-threshold", "-0.2"], "--token-threshold must be in [0, 1]"),
    (["--temp", "-1"], "--temp must be in [0, 2]"),
    (["--temp", "3"], "--temp must be in [0, 2]"),
    (["--prompt", "   "], "the prompt is empty"),
    (["--max-tokens", "1024", "--slot-size", "8", "--blocks", "1"], "max_position_embeddings"),
    (["--max-tokens", "8", "--slot-size", "1", "--blocks", "1000000000"], "--slot-size (1) x --blocks"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_path, capsys, extra, message):
    args = ["--model", str(tiny_path), "--prompt", "hi", *FAST, *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("error: ")


def test_missing_model_folder_exits_2_without_traceback(tmp_path):
    proc = run_cli("--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: model folder not found")
    assert "Traceback" not in proc.stderr


def test_missing_weights_exit_2(tmp_path, capsys):
    path = write_checkpoint(tmp_path, tiny_config())
    (path / "model.safetensors").unlink()
    assert main(["--model", str(path), "--prompt", "hi"]) == 2
    assert "no model*.safetensors" in capsys.readouterr().err
