"""What a new user touches first: the package's names, stdin and pipes, prompt formats, the
tokenizer files the real checkpoint ships, and training and decoding agreeing on prompts."""

import json
import os
import subprocess
import sys

import pytest
from conftest import run_python, with_root_on_path

from checkpoints import CORPUS, tiny_config, write_checkpoint, write_tokenizer

FAST = ["--max-tokens", "16", "--slot-size", "4", "--blocks", "2"]


python = run_python


def test_the_package_generate_is_the_function_even_after_importing_the_module():
    code = ("import inspect, refusion_mlx.generate\n"
            "from refusion_mlx import generate, stream_generate\n"
            "import refusion_mlx\n"
            "assert inspect.isfunction(generate) and refusion_mlx.generate is generate, generate\n"
            "from refusion_mlx.generate import main, build_parser\n"
            "assert inspect.isfunction(main)\n")
    proc = python("-W", "error", "-c", code)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("command", [["-m", "refusion_mlx.generate", "--help"],
                                     ["-m", "refusion_mlx", "generate", "--help"]])
def test_both_ways_to_run_the_command_line_start_cleanly(command):
    proc = python(*command)
    assert proc.returncode == 0 and "--max-tokens" in proc.stdout
    assert proc.stderr == ""  # in particular no runpy warning about the module being imported twice


def test_the_dispatcher_lists_its_commands_and_refuses_unknown_ones():
    proc = python("-m", "refusion_mlx", "--help")
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("generate", "lora", "convert", "evaluate"))
    proc = python("-m", "refusion_mlx", "nonsense")
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown command")


def test_stdin_prompt_loses_echos_newline(tiny_path):
    with_newline = python("-m", "refusion_mlx.generate", "--model", str(tiny_path), "--prompt", "-", *FAST,
                          stdin="the lazy dog\n")
    plain = python("-m", "refusion_mlx.generate", "--model", str(tiny_path), "--prompt", "the lazy dog", *FAST)
    assert with_newline.returncode == plain.returncode == 0, with_newline.stderr
    assert with_newline.stdout == plain.stdout


def test_a_closed_pipe_ends_quietly(tiny_path):
    """As ``... | head -1`` once head has exited: every write to stdout fails with EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = dict(os.environ, PYTHONPATH=with_root_on_path())
    proc = subprocess.run([sys.executable, "-m", "refusion_mlx.generate", "--model", str(tiny_path),
                           "--prompt", "the dog", "--verbose", *FAST], stdout=write_end, stderr=subprocess.PIPE,
                          text=True, env=env, timeout=300)
    os.close(write_end)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 141


def test_any_max_tokens_works_and_errors_name_flags(tiny_path):
    ok = python("-m", "refusion_mlx.generate", "--model", str(tiny_path), "--prompt", "the dog",
                "--max-tokens", "13", "--slot-size", "8", "--blocks", "4")
    assert ok.returncode == 0, ok.stderr
    bad = python("-m", "refusion_mlx.generate", "--model", str(tiny_path), "--prompt", "the dog",
                 "--max-tokens", "2000")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "--max-tokens" in bad.stderr
    assert "gen_length" not in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_library_errors_name_arguments(tiny_model):
    from refusion_mlx import RefusionError, generate_ids

    with pytest.raises(RefusionError, match="^gen_length must be a positive integer"):
        generate_ids(tiny_model, [5, 6], gen_length=-3)
    with pytest.raises(RefusionError, match=r"gen_length \(2000\)"):
        generate_ids(tiny_model, [5, 6], gen_length=2000)


def test_off_format_prompts_on_the_demo_model_are_flagged():
    """The demo knows one prompt format; asking for another says so where the user looks."""
    warned = python("-m", "refusion_mlx.generate", "--prompt", "What is 2 + 3? Work column by column.",
                    "--no-thinking", "--max-tokens", "8")
    assert warned.returncode == 0, warned.stderr
    assert "warning: this model was trained only on prompts formatted as" in warned.stderr
    assert "--no-thinking" in warned.stderr
    plain = python("-m", "refusion_mlx.generate", "--prompt", "What is 2 + 3? Work column by column.",
                   "--max-tokens", "8")
    assert plain.returncode == 0 and "warning" not in plain.stderr
    system = python("-m", "refusion_mlx.generate", "--prompt", "What is 2 + 3? Work column by column.",
                    "--system-prompt", "Be brief and exact.", "--max-tokens", "8")  # the demo was trained with them
    assert system.returncode == 0 and "warning" not in system.stderr


def test_verbose_counts_iterations_in_english(tiny_tokenizer_model):
    from refusion_mlx.transcript import GenerationResult
    from refusion_mlx.generate import format_stats

    one = GenerationResult([1], 1.0, 2, 3, 0.1, 0.0, iterations=1)
    assert "1 iteration," in format_stats(one)
    assert "2 iterations," in format_stats(GenerationResult([1], 1.0, 2, 3, 0.1, 0.0, iterations=2))


def test_training_and_decoding_build_the_same_prompt_ids(tmp_path):
    """Even for a tokenizer that would add a BOS of its own: the chat template writes the markers."""
    from tokenizers import Tokenizer, processors

    from refusion_mlx import load
    from refusion_mlx.tokenizer_utils import prompt_ids
    from refusion_mlx.tuner.datasets import read_examples

    path = write_tokenizer(write_checkpoint(tmp_path / "bos", tiny_config()))
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    bos = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                       special_tokens=[("<|endoftext|>", bos)])
    tok.save(str(path / "tokenizer.json"))
    _, tokenizer = load(path)
    assert tokenizer.encode("hi")[0] == bos  # this tokenizer does add one by default
    data = tmp_path / "train.jsonl"
    data.write_text('{"query": "What is 2 + 2?", "response": "4"}\n')
    [example] = read_examples(data, tokenizer)
    decoding = prompt_ids(tokenizer, "What is 2 + 2?")
    assert example.prompt == decoding
    assert tokenizer.decode(decoding) == "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n"


def slow_tokenizer_folder(folder, template):
    """The files the released repo may ship: vocab.json, merges.txt, added_tokens.json and
    tokenizer_config.json (Qwen2Tokenizer, added_tokens_decoder), no tokenizer.json; the config has
    no mask_token_id, as upstream's is set only in code."""
    from tokenizers import Tokenizer

    write_tokenizer(folder)
    fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
    fast.model.save(str(folder))  # vocab.json + merges.txt
    added = {t.content: i for i, t in fast.get_added_tokens_decoder().items()}
    (folder / "added_tokens.json").write_text(json.dumps(added))
    decoder = {str(i): {"content": c, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                        "single_word": False} for c, i in added.items()}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": decoder, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "bos_token": None, "unk_token": None, "errors": "replace",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"],
        "chat_template": template, "model_max_length": 1024}))
    (folder / "tokenizer.json").unlink()
    return added


def test_a_folder_with_only_slow_tokenizer_files_loads(tmp_path):
    from transformers import AutoTokenizer

    from build_tokenizer import CHAT_TEMPLATE  # Qwen3's template (without tools), as the demo ships it
    from refusion_mlx import generate_ids, load
    from refusion_mlx.tokenizer_utils import prompt_ids

    config = tiny_config()
    del config["mask_token_id"]
    folder = write_checkpoint(tmp_path / "slow", config)
    added = slow_tokenizer_folder(folder, CHAT_TEMPLATE)
    assert not (folder / "tokenizer.json").exists()
    model, tokenizer = load(folder)
    assert model.args.mask_token_id == added["<|mask|>"]
    assert tokenizer.convert_tokens_to_ids("<|beginoftext|>") == added["<|beginoftext|>"]
    assert tokenizer.decode(tokenizer.encode(CORPUS[0])) == CORPUS[0]
    reference = AutoTokenizer.from_pretrained(str(folder))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "What is 2 + 2?"}]
    for thinking in (True, False):
        theirs = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               enable_thinking=thinking)
        theirs = theirs if isinstance(theirs, list) else theirs["input_ids"]  # newer versions: a BatchEncoding
        assert prompt_ids(tokenizer, messages, enable_thinking=thinking) == list(theirs)
    result = generate_ids(model, prompt_ids(tokenizer, "hi"), gen_length=8, slot_size=4, serial_num_blocks=1)
    assert 0 < len(result.tokens) <= 8


def test_benchmark_runs_on_the_demo_model_without_flags(capsys):
    """Item 6: no --model needed; the default prompt is one of the demo's tasks, so the decoders agree."""
    from refusion_mlx.benchmark import main

    assert main(["--max-tokens", "64"]) == 0
    out = capsys.readouterr().out
    assert "model: demo" in out and "mlx-lm generate_step" in out
    assert "same text as left-to-right: yes" in out
