"""Fine-tuning end to end on a tiny model: data, training, resume, adapters, fusing, QLoRA, errors."""

import json
import re
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import mlx.core as mx
import pytest

from refusion_mlx import load
from refusion_mlx.tuner.datasets import load_datasets
from refusion_mlx.errors import RefusionError
from refusion_mlx.fuse import main as fuse_main
from refusion_mlx.lora import main as lora_main

ROWS = [{"query": f"Add {a} and {b}.", "response": f"{a} + {b} = {a + b}."}
        for a, b in [(12, 34), (7, 8), (3, 1), (20, 22), (5, 9), (41, 2), (16, 16), (9, 30)]]
PROBE = mx.array([[316, 84, 82, 266, 198, 71, 72, 317, 319, 319, 319, 319]])
PROBE_POS = mx.array([[0, 1, 2, 3, 4, 5, 6, 7, 9, 8, 11, 10]])
FAST = ["--batch-size", "4", "--learning-rate", "1e-2", "--steps-per-report", "5", "--seed", "0"]


def write_jsonl(path: Path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A memorisable set: validation and test are the training examples themselves."""
    d = tmp_path_factory.mktemp("data")
    for split in ("train", "valid", "test"):
        write_jsonl(d / f"{split}.jsonl", ROWS)
    return d


def train(capsys, tiny_path, data_dir, adapters, *extra):
    """Run the CLI in-process; return its stdout."""
    code = lora_main(["--model", str(tiny_path), "--train", "--data", str(data_dir),
                      "--adapter-path", str(adapters), *FAST, *extra])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def val_losses(out: str):
    return [float(v) for v in re.findall(r"val loss ([\d.]+)", out)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_path, data_dir):
    """A LoRA run of 40 steps (shared by the loss, round-trip and fuse tests)."""
    adapters = tmp_path_factory.mktemp("lora")
    buf = StringIO()  # capsys is per test; a module fixture captures for itself
    with redirect_stdout(buf):
        code = lora_main(["--model", str(tiny_path), "--train", "--test", "--data", str(data_dir),
                          "--adapter-path", str(adapters), "--iters", "40", "--steps-per-eval", "20",
                          "--save-every", "20", *FAST])
    assert code == 0
    return adapters, buf.getvalue()


def test_loss_goes_down(trained):
    _, out = trained
    losses = val_losses(out)
    assert len(losses) == 3
    assert losses[-1] < 0.7 * losses[0], out
    line = r"Iter 40/40: train loss [\d.]+ \(AR [\d.]+, MDM [\d.]+\).*tokens/s [\d.]+.*peak mem"
    assert re.search(line, out)
    assert re.search(r"Test loss [\d.]+ \(AR", out)


def test_adapter_layout_and_atomic_saves(trained):
    adapters, _ = trained
    names = sorted(p.name for p in adapters.iterdir())
    assert names == ["0000020_adapters.safetensors", "adapter_config.json", "adapters.safetensors",
                     "training_state.safetensors"]  # no temp files left behind
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == -1
    assert config["lora_parameters"]["rank"] == 8 and config["lora_parameters"]["scale"] == 2.0
    assert config["lora_parameters"]["keys"] == [f"self_attn.{k}_proj" for k in "qkvo"]
    _, meta = mx.load(str(adapters / "adapters.safetensors"), return_metadata=True)
    assert meta["step"] == "40"


def test_adapters_equal_fused_model(trained, tiny_path, tmp_path):
    adapters, _ = trained
    with_adapters, _ = load(tiny_path, adapter_path=adapters)
    base, _ = load(tiny_path)
    assert fuse_main(["--model", str(tiny_path), "--adapter-path", str(adapters),
                      "--save-path", str(tmp_path / "fused")]) == 0
    fused, _ = load(tmp_path / "fused")
    a, b = with_adapters(PROBE, PROBE_POS), fused(PROBE, PROBE_POS)
    assert mx.allclose(a, b, rtol=1e-5, atol=1e-4).item()
    assert not mx.allclose(a, base(PROBE, PROBE_POS), rtol=1e-5, atol=1e-3).item()  # the adapters did something
    import mlx_lm

    assert mlx_lm.load(str(tmp_path / "fused"))[0] is not None  # plain mlx-lm reads it too


def test_fuse_replaces_an_existing_folder_only_with_force(trained, tiny_path, tmp_path, capsys):
    """convert's rule, the same in fuse: an existing --save-path is replaced only with --force."""
    adapters, _ = trained
    argv = ["--model", str(tiny_path), "--adapter-path", str(adapters), "--save-path", str(tmp_path / "fused")]
    assert fuse_main(argv) == 0
    (tmp_path / "fused" / "marker").write_text("first run")
    capsys.readouterr()
    assert fuse_main(argv) == 2
    assert capsys.readouterr().err == (f"error: --save-path {tmp_path / 'fused'} already exists; "
                                       "pass --force to replace it\n")
    assert (tmp_path / "fused" / "marker").exists()
    assert fuse_main(argv + ["--force"]) == 0
    assert not (tmp_path / "fused" / "marker").exists() and (tmp_path / "fused" / "config.json").exists()


def test_resume_continues_from_saved_step(capsys, tiny_path, data_dir, tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(capsys, tiny_path, data_dir, whole, "--iters", "8", "--save-every", "4")
    train(capsys, tiny_path, data_dir, parts, "--iters", "4")
    out = train(capsys, tiny_path, data_dir, parts, "--iters", "8",
                "--resume-adapter-file", str(parts / "adapters.safetensors"))
    assert "at step 4" in out and "Iter 5/8" in out and "Iter 1/8" not in out
    a, b = mx.load(str(whole / "adapters.safetensors")), mx.load(str(parts / "adapters.safetensors"))
    for k in a:  # same data, layouts, dropout and optimizer state: the same run
        assert mx.allclose(a[k], b[k], rtol=1e-5, atol=1e-6).item(), k
    assert mx.load(str(parts / "adapters.safetensors"), return_metadata=True)[1]["step"] == "8"
    out = train(capsys, tiny_path, data_dir, tmp_path / "numbered", "--iters", "6",
                "--resume-adapter-file", str(whole / "0000004_adapters.safetensors"))
    assert "at step 4" in out and "Iter 6/6" in out


@pytest.mark.parametrize("kind", ["dora", "full"])
def test_dora_and_full_round_trip(capsys, tiny_path, data_dir, tmp_path, kind):
    adapters = tmp_path / kind
    train(capsys, tiny_path, data_dir, adapters, "--iters", "3", "--fine-tune-type", kind,
          "--num-layers", "1")
    loaded, _ = load(tiny_path, adapter_path=adapters)
    assert fuse_main(["--model", str(tiny_path), "--adapter-path", str(adapters),
                      "--save-path", str(tmp_path / "fused")]) == 0
    fused, _ = load(tmp_path / "fused")
    assert mx.allclose(loaded(PROBE, PROBE_POS), fused(PROBE, PROBE_POS), rtol=1e-5, atol=1e-4).item()


def test_full_of_every_layer_trains_embeddings_and_head(capsys, tiny_path, data_dir, tmp_path):
    """Upstream's full fine-tuning (and training from scratch) updates every weight."""
    train(capsys, tiny_path, data_dir, tmp_path / "all", "--iters", "2", "--fine-tune-type", "full")
    saved = mx.load(str(tmp_path / "all" / "adapters.safetensors"))
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(saved)
    base = mx.load(str(next(tiny_path.glob("*.safetensors"))))
    assert not mx.array_equal(saved["model.embed_tokens.weight"], base["model.embed_tokens.weight"]).item()


def test_yaml_config_and_lora_keys(capsys, tiny_path, data_dir, tmp_path):
    config = tmp_path / "ft.yaml"
    config.write_text("iters: 2\nlora_parameters:\n  rank: 4\n  alpha: 8\n  keys: [q_proj, down_proj]\n")
    train(capsys, tiny_path, data_dir, tmp_path / "a", "-c", str(config), "--grad-checkpoint")
    saved = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["lora_parameters"]
    assert saved["rank"] == 4 and saved["scale"] == 2.0
    assert saved["dropout"] == 0.0  # --grad-checkpoint: recomputed blocks would redraw dropout masks
    assert saved["keys"] == ["self_attn.q_proj", "mlp.down_proj"]
    names = mx.load(str(tmp_path / "a" / "adapters.safetensors")).keys()
    assert any("down_proj.lora_a" in n for n in names) and not any("k_proj" in n for n in names)


def test_grad_checkpoint_gives_the_same_gradients(tiny_path):
    import random

    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from refusion_mlx import load_model
    from refusion_mlx.tuner.utils import LORA_DEFAULTS, checkpoint_blocks, prepare_model
    from refusion_mlx.tuner.objective import collate, hybrid_loss, layout_example

    batch = collate([layout_example(list(range(5, 12)), list(range(40, 75)), 319, random.Random(1))])
    grads = []
    for checkpointed in (False, True):
        model = load_model(tiny_path)
        mx.random.seed(0)
        prepare_model(model, "lora", -1, {**LORA_DEFAULTS, "scale": 2.0, "dropout": 0.0})
        if checkpointed:
            checkpoint_blocks(model)
        _, g = nn.value_and_grad(model, lambda m, b: hybrid_loss(m, b)[0])(model, batch)
        grads.append(dict(tree_flatten(g)))
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        assert mx.allclose(grads[0][k], grads[1][k], rtol=1e-5, atol=1e-5).item(), k


def test_trainer_takes_a_dataclass_and_returns_what_it_reports(tiny_path, data_dir, tmp_path):
    """The library path: no namespace, no stdout; a resume counts trained tokens on."""
    from refusion_mlx.tuner.trainer import TrainingArgs, TrainingCallback, resume, train
    from refusion_mlx.tuner.utils import LORA_DEFAULTS, build_optimizer, prepare_model

    _, tokenizer = load(tiny_path)
    train_set, valid_set, _ = load_datasets(str(data_dir), tokenizer, 256, True, False)

    class Collect(TrainingCallback):
        def __init__(self):
            self.train, self.val = [], []

        def on_train_loss_report(self, info):
            self.train.append(info)

        def on_val_loss_report(self, info):
            self.val.append(info)

    def run(iters, resume_from=None):
        model, tok = load(tiny_path)
        prepare_model(model, "lora", -1, {**LORA_DEFAULTS, "scale": 2.0})
        optimizer = build_optimizer("adam", 1e-2)
        start, trained = resume(model, optimizer, resume_from) if resume_from else (0, 0)
        args = TrainingArgs(batch_size=4, iters=iters, steps_per_report=2, steps_per_eval=2,
                            steps_per_save=100, adapter_path=str(tmp_path / "a"))
        callback = Collect()
        losses = train(model, optimizer, train_set, valid_set, args, model.args.mask_token_id,
                       tok.pad_token_id, start, trained, callback)
        return losses, callback

    losses, seen = run(4)
    assert losses.train == seen.train and losses.val == seen.val
    assert [r["iteration"] for r in losses.train] == [2, 4] and [r["iteration"] for r in losses.val] == [1, 2, 4]
    assert all(r["loss"] == pytest.approx(r["ar"] + r["mdm"]) for r in losses.train + losses.val)
    resumed, _ = run(6, tmp_path / "a" / "adapters.safetensors")
    assert [r["iteration"] for r in resumed.train] == [6]
    # Item 10: the counter goes on from the saved run instead of restarting at zero.
    step_tokens = losses.train[1]["trained_tokens"] - losses.train[0]["trained_tokens"]
    assert resumed.train[0]["trained_tokens"] > losses.train[1]["trained_tokens"] + step_tokens // 2


@pytest.fixture(scope="module")
def quantized_path(tmp_path_factory, tiny_path):
    """The tiny model quantized to 4 bits with mlx-lm, tokenizer alongside."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    from refusion_mlx import load_model

    path = tmp_path_factory.mktemp("q4")
    config = json.loads((tiny_path / "config.json").read_text())
    model, config = quantize_model(load_model(tiny_path), config, group_size=32, bits=4)
    save_model(path, model)
    save_config(config, config_path=path / "config.json")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_path / name, path)
    return path


def test_qlora_step_on_4bit_model(capsys, quantized_path, data_dir, tmp_path):
    out = train(capsys, quantized_path, data_dir, tmp_path / "q", "--iters", "2")
    assert "Iter 2/2: train loss" in out
    weights = mx.load(str(tmp_path / "q" / "adapters.safetensors"))
    assert any(mx.abs(w).max().item() > 0 for k, w in weights.items() if k.endswith("lora_b"))
    assert fuse_main(["--model", str(quantized_path), "--adapter-path", str(tmp_path / "q"),
                      "--save-path", str(tmp_path / "deq"), "--dequantize"]) == 0
    assert "quantization" not in json.loads((tmp_path / "deq" / "config.json").read_text())
    model, _ = load(tmp_path / "deq")
    assert mx.isfinite(model(PROBE, PROBE_POS)).all().item()


def test_data_formats(tiny_tokenizer_model, tmp_path):
    _, tok = tiny_tokenizer_model
    write_jsonl(tmp_path / "train.jsonl", [
        {"query": "hi", "response": "hello"},
        {"prompt": "hi", "completion": "hello"},
        "",
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    ])
    write_jsonl(tmp_path / "valid.jsonl", [{"query": "hi", "response": "hello"}])
    train_set, valid_set, test_set = load_datasets(str(tmp_path), tok, 2048, train=True, test=False)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False, enable_thinking=True)
    prompt = tok.encode(text, add_special_tokens=False)
    response = tok.encode("hello", add_special_tokens=False) + [tok.eos_token_id]
    assert len(train_set) == 3 and test_set is None
    for x in train_set:
        assert (x.prompt, x.response) == (prompt, response)
    short, _, _ = load_datasets(str(tmp_path), tok, len(prompt) + 2, train=True, test=False)
    assert [len(x.response) for x in short] == [2, 2, 2]  # responses cut to --max-seq-length


def test_shipped_example_data_loads(tiny_tokenizer_model):
    _, tok = tiny_tokenizer_model
    folder = Path(__file__).parent.parent / "examples" / "finetune_data"
    train_set, valid_set, test_set = load_datasets(str(folder), tok, 2048, train=True, test=True)
    assert (len(train_set), len(valid_set), len(test_set)) == (160, 20, 20)
    assert all(x.response[-1] == tok.eos_token_id for x in train_set)


@pytest.mark.parametrize("line, message", [
    ({"query": "q"}, "train.jsonl line 2: missing 'response'"),
    ("{not json", "train.jsonl line 2: not valid JSON"),
    ({"text": "x"}, "train.jsonl line 2: unknown format"),
    ({"messages": [{"role": "user", "content": "q"}]}, "train.jsonl line 2: the last message must be"),
    ({"prompt": "q", "completion": 3}, "train.jsonl line 2: 'completion' must be a string"),
])
def test_bad_lines_name_file_and_line(tiny_tokenizer_model, tmp_path, line, message):
    _, tok = tiny_tokenizer_model
    write_jsonl(tmp_path / "train.jsonl", [ROWS[0], line])
    write_jsonl(tmp_path / "valid.jsonl", ROWS[:1])
    with pytest.raises(RefusionError, match=re.escape(message)):
        load_datasets(str(tmp_path), tok, 2048, train=True, test=False)


def test_cli_errors_are_one_line(capsys, tiny_path, data_dir, tmp_path):
    (tmp_path / "nodata").mkdir()
    cases = [
        (["--data", str(tmp_path / "nodata")], "error: no train.jsonl in"),
        (["--data", str(data_dir), "--num-layers", "9"], "error: --num-layers must be -1 (all) or 1..2"),
        (["--data", str(data_dir), "--lora-keys", "nope"], "error: LoRA key 'nope' matches no linear"),
        (["--data", str(data_dir), "--resume-adapter-file", str(tmp_path / "x.safetensors")],
         "error: --resume-adapter-file not found"),
        (["--data", str(data_dir), "--batch-size", "0"], "error: --batch-size must be a positive integer"),
    ]
    for extra, message in cases:
        code = lora_main(["--model", str(tiny_path), "--train", "--adapter-path", str(tmp_path / "a"),
                          *extra])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(message) and err.count("\n") == 1, err


def test_cli_exit_status_without_traceback(tiny_path, tmp_path):
    (tmp_path / "train.jsonl").write_text('{"query": "q"}\n')
    (tmp_path / "valid.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
    proc = subprocess.run([sys.executable, "-m", "refusion_mlx.lora", "--model", str(tiny_path), "--train",
                           "--data", str(tmp_path), "--adapter-path", str(tmp_path / "a")],
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: train.jsonl line 1: missing 'response'"
