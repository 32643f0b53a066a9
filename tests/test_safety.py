"""What a hostile or unlucky folder cannot do: run its own code, silently win a race between two
conversions, leave a killed run's leftovers behind, or train to NaN; and Ctrl-C while a command
is still importing is one line."""

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import refusion_mlx  # noqa: F401  (before mlx.core: the BLAS preload)
import mlx.core as mx
from conftest import ROOT, with_root_on_path

from refusion_mlx import RefusionError, load
from refusion_mlx import convert as convert_module
from refusion_mlx.convert import convert
from refusion_mlx.lora import main as lora_main

EVIL = """
from pathlib import Path
Path(__file__).with_name("EXECUTED").write_text("checkpoint code ran")
from transformers import PretrainedConfig, PreTrainedTokenizerFast
class Config(PretrainedConfig):
    model_type = "refusion"
class Tokenizer(PreTrainedTokenizerFast):
    pass
"""


def env():
    return dict(os.environ, PYTHONPATH=with_root_on_path())


def folder_with_code(tiny_path, dest: Path, model_type: str) -> Path:
    """The tiny model plus a .py file that config.json's auto_map points transformers at."""
    shutil.copytree(tiny_path, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(model_type=model_type, auto_map={"AutoConfig": "evil.Config",
                                                   "AutoTokenizer": ["evil.Tokenizer", "evil.Tokenizer"]})
    (dest / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((dest / "tokenizer_config.json").read_text())
    del tokenizer_config["tokenizer_class"]  # so transformers looks the class up through the config
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (dest / "evil.py").write_text(EVIL)
    return dest


def test_custom_model_type_with_auto_map_never_runs_its_code_even_with_y_on_stdin(tiny_path, tmp_path):
    folder = folder_with_code(tiny_path, tmp_path / "m", "refusion")
    proc = subprocess.run([sys.executable, "-m", "refusion_mlx.generate", "--model", str(folder), "--prompt", "hi",
                           "--max-tokens", "8", "--slot-size", "4", "--blocks", "1"],
                          input="y\ny\n", capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "auto_map" in proc.stderr and "never run" in proc.stderr
    assert "[y/N]" not in proc.stdout + proc.stderr
    assert not (folder / "EXECUTED").exists()


def test_the_api_refuses_it_too_without_reading_stdin(tiny_path, tmp_path, monkeypatch):
    folder = folder_with_code(tiny_path, tmp_path / "m", "refusion")
    stdin = io.StringIO("y\n")
    monkeypatch.setattr(sys, "stdin", stdin)
    with pytest.raises(RefusionError, match="auto_map"):
        load(folder)
    assert stdin.tell() == 0 and not (folder / "EXECUTED").exists()


def test_qwen3_with_auto_map_loads_with_transformers_own_classes(tiny_path, tmp_path, monkeypatch):
    """model_type qwen3 is transformers' own: the auto_map is ignored, never followed."""
    folder = folder_with_code(tiny_path, tmp_path / "m", "qwen3")
    stdin = io.StringIO("y\n")
    monkeypatch.setattr(sys, "stdin", stdin)
    model, tokenizer = load(folder)
    assert tokenizer.encode("the lazy dog") == load(tiny_path)[1].encode("the lazy dog")
    assert stdin.tell() == 0 and not (folder / "EXECUTED").exists()


def test_tokenizer_auto_map_is_refused(tiny_path, tmp_path):
    folder = folder_with_code(tiny_path, tmp_path / "m", "qwen3")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["auto_map"] = {"AutoTokenizer": ["evil.Tokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(RefusionError, match="never run"):
        load(folder)
    assert not (folder / "EXECUTED").exists()


# --- two conversions to the same new folder ------------------------------------------------------

def leftovers(parent: Path):
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_a_folder_that_appears_during_the_conversion_is_left_alone(tiny_path, tmp_path, monkeypatch):
    """The other run finishes first (its folder appears while this one writes): this run fails with
    one line and the other run's folder is untouched."""
    target = tmp_path / "out"
    real_save = convert_module.save_shard

    def other_run_finishes_first(file, tensors):
        if not target.exists():
            target.mkdir()
            (target / "config.json").write_text('{"written by": "the other run"}')
        real_save(file, tensors)

    monkeypatch.setattr(convert_module, "save_shard", other_run_finishes_first)
    with pytest.raises(RefusionError, match="appeared while this run was writing"):
        convert(str(tiny_path), str(target))
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert json.loads((target / "config.json").read_text()) == {"written by": "the other run"}
    assert leftovers(tmp_path) == []


def test_two_real_converts_race_one_wins_one_says_so(tiny_path, tmp_path):
    target = tmp_path / "out"
    runs = {dtype: subprocess.Popen([sys.executable, "-m", "convert", "--hf-path", str(tiny_path),
                                     "--mlx-path", str(target), "--dtype", dtype],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env())
            for dtype in ("float16", "bfloat16")}
    results = {dtype: (p.wait(timeout=120), p.stderr.read()) for dtype, p in runs.items()}
    winners = [dtype for dtype, (code, _) in results.items() if code == 0]
    assert len(winners) == 1, results
    (loser_code, loser_err), = [r for dtype, r in results.items() if dtype not in winners]
    assert loser_code == 2 and loser_err.startswith("error: ") and loser_err.count("\n") == 1, loser_err
    assert json.loads((target / "config.json").read_text())["torch_dtype"] == winners[0]
    assert mx.load(str(target / "model.safetensors"))["model.norm.weight"].dtype == getattr(mx, winners[0])
    assert leftovers(tmp_path) == []


# --- what killed runs leave -------------------------------------------------------------------------

def dead_pid() -> int:
    """The id of a process that has exited (as a SIGKILLed convert has)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_folders_of_dead_runs_are_removed(tiny_path, tmp_path):
    dead = dead_pid()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for name in (f".out.tmp-{dead}", f".out.tmp-{alive.pid}", f".other.tmp-{dead}"):
            (tmp_path / name).mkdir()
            (tmp_path / name / "model.safetensors").write_bytes(b"half a shard")
        convert(str(tiny_path), str(tmp_path / "out"))
        assert leftovers(tmp_path) == [f".other.tmp-{dead}", f".out.tmp-{alive.pid}"]  # not ours / still running
        assert load(tmp_path / "out")[0] is not None
    finally:
        alive.kill()
        alive.wait()


def test_a_model_moved_aside_by_a_killed_run_is_put_back(tiny_path, tmp_path):
    """Killed between moving the old folder aside and renaming the new one in: the next run puts
    the old model back instead of deleting it, and (without --force) leaves it there."""
    dead = dead_pid()
    shutil.copytree(tiny_path, tmp_path / f".out.old-{dead}")
    with pytest.raises(RefusionError, match="already exists"):
        convert(str(tiny_path), str(tmp_path / "out"))
    assert (tmp_path / "out" / "config.json").exists() and leftovers(tmp_path) == []


# --- NaN never trains silently -------------------------------------------------------------------

def test_training_stops_at_a_non_finite_loss_and_keeps_only_finite_saves(tiny_path, tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"query": f"Add {a} and {b}.", "response": f"{a + b}"} for a, b in [(1, 2), (3, 4), (5, 6), (7, 8)]]
    for split in ("train", "valid"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    adapters = tmp_path / "adapters"
    code = lora_main(["--model", str(tiny_path), "--train", "--data", str(data), "--adapter-path", str(adapters),
                      "--iters", "6", "--batch-size", "2", "--learning-rate", "1e30", "--save-every", "1",
                      "--val-batches", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "stopped without saving" in err
    for file in adapters.glob("*.safetensors"):  # whatever was saved before is finite
        assert all(mx.all(mx.isfinite(w)).item() for w in mx.load(str(file)).values()), file.name
    assert not list(adapters.glob(".*tmp*"))


# --- Ctrl-C while a command is still importing ---------------------------------------------------

INTERRUPT_IMPORT = """
import sys
class InterruptImport:
    def find_spec(self, name, path=None, target=None):
        if name == "mlx_lm":
            raise KeyboardInterrupt  # what Ctrl-C does at that moment
        return None
sys.meta_path.insert(0, InterruptImport())
"""


@pytest.mark.parametrize("command, message", [
    (["-m", "refusion_mlx.generate", "--prompt", "hi"], "interrupted"),
    (["-m", "convert", "--hf-path", "x", "--mlx-path", "y"], "interrupted; nothing was written"),
])
def test_ctrl_c_while_importing_is_one_line(tmp_path, command, message):
    (tmp_path / "sitecustomize.py").write_text(INTERRUPT_IMPORT)
    run_env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), with_root_on_path()]))
    proc = subprocess.run([sys.executable, *command], capture_output=True, text=True, cwd=ROOT, env=run_env,
                          timeout=120)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr == message + "\n"
