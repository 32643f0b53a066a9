"""One rule each, the same wherever a user meets it: command names and their --help, defaults that
suit the device, the sampling temperature's bound, overwriting an output folder, the statistics
printed, and the model card a conversion writes."""

import fnmatch
import os
import importlib
import io
import re
import sys

import mlx.core as mx
import pytest
from conftest import ROOT

from refusion_mlx import benchmark
from refusion_mlx.__main__ import COMMANDS, MODULES
from refusion_mlx.__main__ import main as dispatch


TINY_SHAPE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=320, tie_word_embeddings=False)


def test_the_shape_benchmark_defaults_to_a_dtype_the_device_runs_well(monkeypatch):
    """float32 on the CPU, bfloat16 on a GPU, --dtype wins; the first line says which and why."""
    assert benchmark.shape_dtype(None, mx.cpu)[0] == "float32"
    assert benchmark.shape_dtype(None, mx.Device(mx.gpu))[0] == "bfloat16"
    assert benchmark.shape_dtype("bfloat16", mx.cpu) == ("bfloat16", "--dtype")
    # The real run, on a shape and settings that take seconds.
    monkeypatch.setitem(benchmark.SHAPES, "tiny", TINY_SHAPE)
    monkeypatch.setattr(benchmark, "SHAPE_SETTINGS", [dict(slot_size=4, serial_num_blocks=2, slot_threshold=0.9,
                                                           token_threshold=0.3)])
    fast = ["--shape", "tiny", "--prompt-tokens", "8", "--max-tokens", "8", "--ar-tokens", "2"]
    out = io.StringIO()
    benchmark.run_shape(benchmark.build_parser().parse_args(fast), out=out)
    first = out.getvalue().splitlines()[0]
    dtype, why = benchmark.shape_dtype(None)
    assert f"; {dtype} ({why});" in first, first

    def record(shape, dtype, *rest):  # --dtype reaches the weights; stop before the timing
        raise KeyboardInterrupt(dtype)

    monkeypatch.setattr(benchmark, "random_model", record)
    with pytest.raises(KeyboardInterrupt, match="float16"):
        benchmark.run_shape(benchmark.build_parser().parse_args(fast + ["--dtype", "float16"]), out=out)


@pytest.mark.parametrize("gen_length", [1, 5, 13])
def test_statistics_never_count_more_than_was_returned(tiny_model, gen_length):
    """--max-tokens 1 once printed "TPF 4.00" for one token: padding to whole slots was credited.
    The headline is tokens returned per model call; upstream's credit (at most half of each
    commit's tokens) never counts padding, so without an EOS it sums to at most half of what was
    returned; and the --verbose block prints the headline, not upstream's figure."""
    from refusion_mlx.decode import generate_ids
    from refusion_mlx.generate import format_stats

    r = generate_ids(tiny_model, [3, 4, 5], gen_length=gen_length, slot_size=8, serial_num_blocks=2,
                     slot_threshold=0.5, token_threshold=0.5, eos_token_id=[])
    assert len(r.tokens) == gen_length
    assert r.tokens_per_call == len(r.tokens) / r.model_calls
    assert sum(c.tpf for c in r.commits) <= len(r.tokens) / 2
    stats = format_stats(r)
    assert f"Tokens per model call: {len(r.tokens) / r.model_calls:.2f} ({gen_length} tokens returned, " \
           f"{r.model_calls} model calls" in stats
    assert "TPF" not in stats


def test_the_readmes_commands_write_outside_the_tree_or_where_git_ignores():
    """Trying the README's commands leaves no untracked folders in the checkout."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    written = set(re.findall(r"(?:--mlx-path|--save-path|--adapter-path|--out) ([\w./-]+)", readme))
    written |= set(re.findall(r"write_checkpoint\('([^']+)'", readme))
    written = {p for p in written if not p.isupper()}  # placeholders: DIR, FOLDER
    ignored = [line.strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()
               if line.startswith("/") and line.endswith("/")]
    assert {"/tmp/tiny-refusion", "/tmp/tiny-adapters", "refusion-4bit", "models/demo"} <= written, written
    for path in written:
        if not path.startswith("/"):
            top = path.split("/")[0]
            assert any(fnmatch.fnmatch(top, pattern) for pattern in ignored), path


def console_scripts() -> dict:
    """pyproject.toml's [project.scripts]: name -> "module:function"."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+) = "([\w.:]+)"', section, re.M))


def help_usage(monkeypatch, capsys, argv0: str, call) -> str:
    """The usage line a --help prints when started as ``argv0``."""
    monkeypatch.setattr(sys, "argv", [argv0])
    with pytest.raises(SystemExit) as exit_:
        call()
    assert exit_.value.code == 0
    return capsys.readouterr().out.splitlines()[0]



@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_help_shows_how_the_command_was_started(monkeypatch, capsys, command):
    module = MODULES.get(command, command)
    main = importlib.import_module(f"refusion_mlx.{module}").main
    assert help_usage(monkeypatch, capsys, "-m", lambda: dispatch([command, "--help"])).startswith(
        f"usage: python -m refusion_mlx {command} ")
    assert help_usage(monkeypatch, capsys, "/usr/bin/refusion", lambda: dispatch([command, "--help"])).startswith(
        f"usage: refusion {command} ")
    assert help_usage(monkeypatch, capsys, f"/x/refusion_mlx/{module}.py", lambda: main(["--help"])).startswith(
        f"usage: python -m refusion_mlx.{module} ")
    script = f"refusion-{command}"
    assert console_scripts()[script] == f"refusion_mlx.{module}:main"
    assert help_usage(monkeypatch, capsys, f"/venv/bin/{script}", lambda: main(["--help"])).startswith(
        f"usage: {script} ")


def test_the_dispatcher_lists_every_command_and_takes_both_spellings(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["-m"])
    assert dispatch(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(f"  {c} " in listing for c in COMMANDS)
    assert set(console_scripts()) == {"refusion"} | {f"refusion-{c}" for c in COMMANDS}
    for spelling in ("serve-bench", "serve_bench"):
        assert help_usage(monkeypatch, capsys, "-m", lambda: dispatch([spelling, "--help"])).startswith(
            "usage: python -m refusion_mlx serve-bench ")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    listed = readme.split("Every command also runs as", 1)[1].split("\n\n", 1)[0]
    assert all(f"`{c}`" in listed for c in COMMANDS), listed


def test_one_temperature_bound_for_the_api_the_command_lines_and_the_server(tiny_path, capsys):
    """[0, MAX_TEMPERATURE] everywhere: the CLI once took --temp 3 while the server refused 2.5."""
    import http.client
    import json
    import subprocess

    from conftest import with_root_on_path

    from refusion_mlx import RefusionError, generate_ar_ids, generate_ids, load_model
    from refusion_mlx.generate import main as generate_main
    from refusion_mlx.validation import MAX_TEMPERATURE

    over = MAX_TEMPERATURE + 0.5
    model = load_model(tiny_path)
    for decode in (generate_ids, lambda m, ids, **k: generate_ar_ids(m, ids, max_tokens=4, **k)):
        with pytest.raises(RefusionError, match=r"temperature must be in \[0, 2\]"):
            decode(model, [3, 4, 5], temperature=over)
        decode(model, [3, 4, 5], temperature=MAX_TEMPERATURE, seed=0)
    fast = ["--model", str(tiny_path), "--prompt", "the dog", "--max-tokens", "4", "--slot-size", "4", "--blocks", "1"]
    assert generate_main([*fast, "--temp", str(over)]) == 2
    assert capsys.readouterr().err == f"error: --temp must be in [0, 2], got {over}\n"
    assert generate_main([*fast, "--temp", str(MAX_TEMPERATURE), "--seed", "1"]) == 0

    env = {**os.environ, "PYTHONPATH": with_root_on_path()}
    server = subprocess.Popen([sys.executable, "-m", "refusion_mlx.server", "--port", "0", "--model", str(tiny_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        host, port = server.stdout.readline().split()[3].split("//")[1].split("/")[0].split(":")
        for temperature, status in ((over, 400), (MAX_TEMPERATURE, 200)):
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            conn.request("POST", "/v1/completions", json.dumps(
                {"prompt": "the dog", "max_tokens": 4, "temperature": temperature, "seed": 1}),
                {"Content-Type": "application/json"})
            reply = conn.getresponse()
            body = json.loads(reply.read())
            conn.close()
            assert reply.status == status, body
            if status == 400:
                assert body["error"]["param"] == "temperature" and "[0, 2]" in body["error"]["message"], body
    finally:
        server.terminate()
        server.communicate(timeout=30)


def test_the_card_convert_writes_describes_the_model_it_was_converted_from(tiny_path, tmp_path):
    """Not "a Qwen3-8B backbone" and a haiku for every model: its own size from its config, and for
    the demo (and a conversion of a conversion of it) prompts of its own tasks, in range."""
    from refusion_mlx.convert import convert
    from refusion_mlx.demo import tasks
    from refusion_mlx.loading import DEMO_MODEL_PATH

    demo = convert(str(DEMO_MODEL_PATH), str(tmp_path / "demo"))
    again = convert(str(demo), str(tmp_path / "demo4"), quantize=True)
    for folder, fmt in ((demo, "float16"), (again, "4-bit affine quantization")):
        card = (folder / "README.md").read_text()
        assert "demo model" in card and "4.8M parameters, 6 layers, hidden size 256, vocabulary 1024" in card, card
        assert fmt in card and "8B" not in card and "haiku" not in card
        prompts = re.findall(r'generate\(model, tokenizer, "([^"]+)"\)', card)
        assert prompts and all(tasks.solve(p) for p in prompts), prompts  # solve raises if out of range
    card = (convert(str(tiny_path), str(tmp_path / "tiny")) / "README.md").read_text()
    assert "2 layers, hidden size 64, vocabulary 320" in card and "demo" not in card and "8B" not in card


def test_the_benchmarks_demo_prompt_is_the_demos_example():
    from refusion_mlx.demo import tasks

    assert benchmark.DEMO_PROMPT == tasks.EXAMPLE_QUERIES[0]
