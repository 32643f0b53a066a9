"""Prompt cache files, the cache_prompt and chat commands, generate's cache flags."""

import re

import numpy as np
import pytest

from conftest import run_python
from refusion_mlx import RefusionError, generate_ids, make_prompt_cache
from refusion_mlx.kv import load_prompt_cache, save_prompt_cache

KNOBS = dict(gen_length=16, slot_size=4, serial_num_blocks=2, slot_threshold=0.5, token_threshold=0.5,
             eos_token_id=[])
PROMPT = [40 + i % 50 for i in range(24)]


def test_a_saved_cache_loads_back_and_decodes_the_same(tiny_model, tmp_path):
    cache = make_prompt_cache(tiny_model)
    generate_ids(tiny_model, PROMPT, prompt_cache=cache, **KNOBS)
    path = tmp_path / "cache.safetensors"
    save_prompt_cache(path, cache, tiny_model, {"prompt": "hi"})
    assert [p.name for p in tmp_path.iterdir()] == ["cache.safetensors"]  # no partial file left
    loaded = load_prompt_cache(path, tiny_model)
    assert loaded.length == cache.length and loaded.metadata["prompt"] == "hi"
    assert np.array_equal(loaded.history, cache.history)
    follow_up = PROMPT + [7, 8, 9]
    a = generate_ids(tiny_model, follow_up, prompt_cache=cache, **KNOBS)
    b = generate_ids(tiny_model, follow_up, prompt_cache=loaded, **KNOBS)
    assert a.tokens == b.tokens and a.cached_tokens == b.cached_tokens == len(PROMPT)


def test_bad_cache_files_are_one_clear_error(tiny_model, tmp_path):
    from checkpoints import tiny_config, write_checkpoint
    from refusion_mlx import load_model

    cache = make_prompt_cache(tiny_model)
    generate_ids(tiny_model, PROMPT, prompt_cache=cache, **KNOBS)
    path = tmp_path / "cache.safetensors"
    save_prompt_cache(path, cache, tiny_model)
    data = path.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    huge_header = tmp_path / "huge.safetensors"
    huge_header.write_bytes((2**60).to_bytes(8, "little") + b"{}")
    for bad, message in ((truncated, "truncated"), (garbage, "truncated or not"), (huge_header, "truncated or not"),
                         (tmp_path / "missing.safetensors", "does not exist")):
        with pytest.raises(RefusionError, match=message):
            load_prompt_cache(bad, tiny_model)

    other_path = tmp_path / "other"
    write_checkpoint(other_path, tiny_config(), seed=1)
    with pytest.raises(RefusionError, match="another model"):
        load_prompt_cache(path, load_model(other_path))


def test_cache_prompt_then_generate_feeds_only_the_new_prompt(tiny_path, tmp_path):
    path = tmp_path / "doc.safetensors"
    document = "the quick brown fox jumps over the lazy dog " * 4
    made = run_python("-m", "refusion_mlx.cache_prompt", "--model", str(tiny_path), "--prompt", document,
                      "--prompt-cache-file", str(path), "--verbose")
    assert made.returncode == 0, made.stderr
    assert path.is_file() and "cached" in made.stderr
    again = run_python("-m", "refusion_mlx.cache_prompt", "--model", str(tiny_path), "--prompt", document,
                       "--prompt-cache-file", str(path))
    assert again.returncode == 2 and again.stderr.strip().endswith("pass --force to overwrite it")

    used = run_python("-m", "refusion_mlx.generate", "--model", str(tiny_path), "--prompt", " and the cat",
                      "--prompt-cache-file", str(path), "--max-tokens", "8", "--verbose")
    assert used.returncode == 0, used.stderr
    cached = int(re.search(r"Prompt cache: (\d+) prompt tokens", used.stdout).group(1))
    assert cached > 20  # the document's tokens, not fed again

    for flags, message in ((["--prompt-cache-file", str(tmp_path / "nope")], "does not exist"),
                           (["--max-kv-size", "0"], "--max-kv-size must be a positive integer")):
        bad = run_python("-m", "refusion_mlx.generate", "--model", str(tiny_path), "--prompt", "x", *flags)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and message in bad.stderr, bad.stderr


def test_chat_is_scripted_from_stdin_and_keeps_its_cache_across_turns(tiny_path):
    script = "hello there\nand then\n/reset\nagain\n/quit\nnever read\n"
    chat = run_python("-m", "refusion_mlx.chat", "--model", str(tiny_path), "--max-tokens", "8",
                      "--slot-size", "4", "--blocks", "1", "--verbose", stdin=script)
    assert chat.returncode == 0, chat.stderr
    cached = [int(n) for n in re.findall(r"\[(\d+) prompt tokens cached", chat.stderr)]
    assert len(cached) == 3  # three turns answered, nothing after /quit
    assert cached[0] == 0 and cached[1] > 0 and cached[2] == 0  # the second turn reuses the first; reset forgets
    assert "(new conversation)" in chat.stdout

    bounded = run_python("-m", "refusion_mlx.chat", "--model", str(tiny_path), "--max-tokens", "8",
                         "--slot-size", "4", "--blocks", "1", "--max-kv-size", "3", stdin="hi\n")
    assert bounded.returncode == 2 and bounded.stderr.startswith("error: --max-kv-size 3 is too small"), bounded.stderr
