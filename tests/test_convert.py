"""Converting and quantizing checkpoints: fidelity, mlx-lm compatibility, and safety on bad input."""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import types

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from conftest import ROOT, with_root_on_path

from checkpoints import CORPUS, special_ids, tiny_config, write_checkpoint, write_tokenizer
from numerics import assert_close
from refusion_mlx import generate_ids, load, load_model
from refusion_mlx import convert as convert_module
from refusion_mlx.convert import convert, main

SHARD = "100KB"  # the tiny model is ~460 KB in float32: several output shards


def make_source(path, shards=3, dtype=None, config=None):
    """A tiny HF folder (sharded, with tokenizer); ``dtype`` rewrites the shards in that dtype."""
    config = config or tiny_config()
    write_checkpoint(path, config, seed=0, shards=shards, head_scale=8.0)
    write_tokenizer(path)
    if dtype is not None:
        for file in path.glob("model*.safetensors"):
            tensors = {k: v.astype(dtype) for k, v in mx.load(str(file)).items()}
            mx.eval(tensors)  # read everything before the file is rewritten
            mx.save_safetensors(str(file), tensors, metadata={"format": "pt"})
    return path


def quiet_convert(source, target, **options):
    """convert() with mlx-lm's '[INFO] Quantized ...' line swallowed."""
    with contextlib.redirect_stdout(io.StringIO()):
        return convert(str(source), str(target), max_shard_size=SHARD, **options)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_source(tmp_path_factory.mktemp("hf") / "src")


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    """Folders converted once per module: float32 as is, 8-bit and 4-bit (group 64)."""
    root = tmp_path_factory.mktemp("mlx")
    return {
        "f32": quiet_convert(source, root / "f32"),
        "q8": quiet_convert(source, root / "q8", quantize=True, q_bits=8),
        "q4": quiet_convert(source, root / "q4", quantize=True, q_bits=4),
    }


@pytest.fixture(scope="module")
def prompt(source):
    """A fixed 158-token input: the tiny tokenizer's own corpus."""
    _, tokenizer = load(source)
    return tokenizer.encode(" ".join(CORPUS))


def logits(model, ids):
    return model(mx.array([ids])).astype(mx.float32)


def top1_agreement(a, b) -> float:
    return (a.argmax(-1) == b.argmax(-1)).astype(mx.float32).mean().item()


def test_float32_conversion_is_bit_identical_and_sharded(source, converted, prompt):
    out = converted["f32"]
    np.testing.assert_array_equal(np.array(logits(load_model(out), prompt)),
                                  np.array(logits(load_model(source), prompt)))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards == sorted(p.name for p in out.glob("model-*.safetensors"))
    for shard in shards:  # within the limit, or one tensor alone
        tensors = mx.load(str(out / shard))
        assert sum(v.nbytes for v in tensors.values()) <= 100_000 or len(tensors) == 1
    for name in ("tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (out / name).exists()
    config = json.loads((out / "config.json").read_text())
    assert config["mask_token_id"] == special_ids(source)["<|mask|>"] and "quantization" not in config


def test_bfloat16_source_and_cast_dtypes(tmp_path, source, prompt):
    bf16_src = make_source(tmp_path / "bf16", dtype=mx.bfloat16)
    kept = quiet_convert(bf16_src, tmp_path / "kept")
    np.testing.assert_array_equal(np.array(logits(load_model(kept), prompt)),
                                  np.array(logits(load_model(bf16_src), prompt)))
    assert {v.dtype for v in mx.load(str(next(kept.glob("model-*")))).values()} == {mx.bfloat16}
    reference = logits(load_model(source), prompt)
    scale = mx.abs(reference).max().item()
    # Measured relative max error: bf16 0.009, fp16 0.001 (8 and 11 mantissa bits).
    for dtype, rel in (("bfloat16", 0.03), ("float16", 0.005)):
        out = quiet_convert(source, tmp_path / dtype, dtype=dtype)
        cast = logits(load_model(out), prompt)
        assert mx.abs(cast - reference).max().item() < rel * scale
        assert top1_agreement(cast, reference) >= 0.95
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype


# Agreement with the float model on the 158-token prompt, measured (CPU): top-1 0.994 at 8 bits,
# 0.570 at 4 bits (group 64); the float top-1 is in the quantized top 5 at 1.000 and 0.962.
# Thresholds sit a little under that, for other backends' rounding. A random tiny model has small
# top-1 margins (320 near-Gaussian logits), so 4-bit noise flips many of them where a trained
# model's margins would not; chance agreement would be 1/320.
@pytest.mark.parametrize("name, bits, min_top1, min_top5", [("q8", 8, 0.95, 0.98), ("q4", 4, 0.5, 0.9)])
def test_quantized_models_agree_with_float(source, converted, prompt, name, bits, min_top1, min_top5):
    reference = logits(load_model(source), prompt)
    model = load_model(converted[name])
    assert isinstance(model.lm_head, nn.QuantizedLinear) and model.lm_head.bits == bits
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    quantized = logits(model, prompt)
    assert top1_agreement(quantized, reference) >= min_top1
    top5 = mx.argpartition(-quantized, 5, axis=-1)[..., :5]
    in_top5 = (top5 == reference.argmax(-1)[..., None]).any(-1).astype(mx.float32).mean().item()
    assert in_top5 >= min_top5
    config = json.loads((converted[name] / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": bits, "mode": "affine"}


@pytest.mark.parametrize("name", ["q8", "q4"])
def test_plan_and_infill_runs_on_quantized_models(converted, name):
    model, tokenizer = load(converted[name])
    result = generate_ids(model, tokenizer.encode("the quick brown"), gen_length=16, slot_size=4,
                          serial_num_blocks=2, slot_threshold=0.6, token_threshold=0.3)
    assert 0 < len(result.tokens) <= 16 and result.model_calls > 0


def test_mixed_recipes(tmp_path, source, prompt):
    ends = load_model(quiet_convert(source, tmp_path / "ends", quantize=True, quant_recipe="embed_head_8"))
    assert ends.lm_head.bits == 8 and ends.model.embed_tokens.bits == 8
    assert ends.layers[0].mlp.down_proj.bits == 4
    mixed_path = quiet_convert(source, tmp_path / "mixed", quantize=True, quant_recipe="mixed_4_6")
    mixed = load_model(mixed_path)
    # mlx-lm's Q4_K_M-like choice: 6 bits for lm_head and, in the last eighth of the layers (here
    # layer 1 of 2), v_proj and down_proj; the rest, embeddings included, at 4.
    assert mixed.lm_head.bits == 6 and mixed.layers[1].mlp.down_proj.bits == 6
    assert mixed.layers[1].self_attn.v_proj.bits == 6 and mixed.layers[0].mlp.down_proj.bits == 4
    assert mixed.model.embed_tokens.bits == 4 and mixed.layers[1].mlp.up_proj.bits == 4
    assert json.loads((mixed_path / "config.json").read_text())["quantization"]["lm_head"]["bits"] == 6
    reference = logits(load_model(source), prompt)
    assert top1_agreement(logits(ends, prompt), reference) >= 0.7  # measured 0.79


def test_dequantize_round_trip(tmp_path, converted, prompt):
    quantized = load_model(converted["q8"])
    out = quiet_convert(converted["q8"], tmp_path / "deq", dequantize=True)
    assert "quantization" not in json.loads((out / "config.json").read_text())
    restored = load_model(out)
    assert isinstance(restored.lm_head, nn.Linear) and isinstance(restored.model.embed_tokens, nn.Embedding)
    head = quantized.lm_head
    np.testing.assert_array_equal(
        np.array(restored.lm_head.weight),
        np.array(mx.dequantize(head.weight, head.scales, head.biases, head.group_size, head.bits)))
    np.testing.assert_allclose(np.array(logits(restored, prompt)), np.array(logits(quantized, prompt)),
                               atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("name", ["f32", "q4"])
def test_mlx_lm_loads_the_folder_with_the_same_logits(converted, prompt, name):
    import mlx_lm

    theirs, _ = mlx_lm.load(str(converted[name]))
    ours = load_model(converted[name])
    # Same weights; only RoPE differs in how it is computed (their fused kernel, our tables).
    np.testing.assert_allclose(np.array(logits(theirs, prompt)), np.array(logits(ours, prompt)),
                               atol=1e-4, rtol=1e-4)


def test_mask_token_id_is_looked_up_in_the_tokenizer(tmp_path):
    config = tiny_config()
    del config["mask_token_id"]
    src = make_source(tmp_path / "src", shards=1, config=config)
    out = quiet_convert(src, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["mask_token_id"] == special_ids(src)["<|mask|>"]


def test_hub_repo_id_as_source(tmp_path, source, monkeypatch):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--GSAI-ML--ReFusion-tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)
    offline_hub(monkeypatch, tmp_path / "hub")
    out = quiet_convert("GSAI-ML/ReFusion-tiny", tmp_path / "out")
    assert "base_model: GSAI-ML/ReFusion-tiny" in (out / "README.md").read_text()


def test_upload_pushes_the_finished_folder(tmp_path, source, monkeypatch):
    calls = []

    class FakeApi:  # no network here: record what would be sent
        def create_repo(self, repo_id, exist_ok):
            calls.append(("create", repo_id, exist_ok))

        def upload_large_folder(self, folder_path, repo_id, repo_type):
            calls.append(("upload", repo_id, sorted(os.listdir(folder_path))))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    out = quiet_convert(source, tmp_path / "out", quantize=True, upload_repo="me/refusion-tiny-4bit")
    assert calls[0] == ("create", "me/refusion-tiny-4bit", True)
    assert calls[1][:2] == ("upload", "me/refusion-tiny-4bit") and "config.json" in calls[1][2]
    assert 'load("me/refusion-tiny-4bit")' in (out / "README.md").read_text()


def offline_hub(monkeypatch, cache):
    """Point huggingface_hub at ``cache`` with the network switched off."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def leftovers(target):
    """Anything the run left beside the target: the folder itself or a temporary one."""
    return sorted(p.name for p in target.parent.iterdir() if p.name.lstrip(".").startswith(target.name))


@pytest.mark.parametrize("failure, code, message", [
    (OSError(28, "No space left on device"), 2, "error: cannot write .*No space left on device"),
    (KeyboardInterrupt(), 130, "interrupted; nothing was written"),
])
def test_interrupted_conversion_leaves_no_folder(tmp_path, source, monkeypatch, capsys, failure, code, message):
    calls = []

    def failing_save(file, tensors):
        if calls:
            raise failure
        calls.append(file)
        mx.save_safetensors(str(file), tensors)

    monkeypatch.setattr(convert_module, "save_shard", failing_save)
    target = tmp_path / "out"
    assert main(["--hf-path", str(source), "--mlx-path", str(target), "--max-shard-size", SHARD]) == code
    assert calls and leftovers(target) == []
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.match(message, err)


def test_existing_output_needs_force(tmp_path, source, capsys, prompt):
    target = tmp_path / "out"
    target.mkdir()
    (target / "config.json").write_text("{}")
    args = ["--hf-path", str(source), "--mlx-path", str(target)]
    assert main(args) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert (target / "config.json").read_text() == "{}"
    assert main(args + ["--force"]) == 0
    np.testing.assert_array_equal(np.array(logits(load_model(target), prompt)),
                                  np.array(logits(load_model(source), prompt)))
    assert leftovers(target) == ["out"]
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("mine")
    assert main(["--hf-path", str(source), "--mlx-path", str(stranger), "--force"]) == 2
    assert "not a model folder" in capsys.readouterr().err and (stranger / "notes.txt").exists()


def break_source(path, how, monkeypatch):
    """A source that fails in one particular way; returns what to pass as --hf-path."""
    if how == "missing-folder":
        return str(path / "nowhere")
    if how in ("missing-repo", "offline"):
        if how == "missing-repo":
            monkeypatch.setattr("huggingface_hub.snapshot_download", raise_not_found)
        else:
            offline_hub(monkeypatch, path / "empty-cache")
        return "GSAI-ML/not-a-repo"
    make_source(path, shards=2)
    second = path / "model-00002-of-00002.safetensors"
    if how == "missing-shard":
        second.unlink()
    elif how == "corrupt-header":
        second.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\x00" * 64)
    elif how == "truncated":
        second.write_bytes(second.read_bytes()[:-100])
    elif how == "shape":
        (path / "config.json").write_text(json.dumps(tiny_config(hidden_size=32)))
    elif how == "model-type":
        (path / "config.json").write_text(json.dumps(tiny_config(model_type="llama")))
    elif how == "pickle-only":
        for f in path.glob("model*.safetensors*"):
            f.unlink()
        (path / "pytorch_model.bin").write_bytes(b"not unpickled")
    elif how == "no-space":
        monkeypatch.setattr(convert_module.shutil, "disk_usage", lambda p: types.SimpleNamespace(free=1000))
    return str(path)


def raise_not_found(*args, **kwargs):
    from huggingface_hub.errors import RepositoryNotFoundError

    raise RepositoryNotFoundError("404", response=types.SimpleNamespace(headers={}, request=None))


@pytest.mark.parametrize("how, flags, message", [
    ("missing-folder", [], "model folder not found"),
    ("missing-repo", [], "no such model on the Hugging Face hub"),
    ("offline", [], "hub cannot be reached"),
    ("missing-shard", [], "missing weight shard listed in model.safetensors.index.json"),
    ("corrupt-header", [], "model-00002-of-00002.safetensors is not a valid safetensors file"),
    ("truncated", [], "model-00002-of-00002.safetensors is truncated"),
    ("shape", [], "cannot load weights .*Expected shape"),
    ("model-type", [], "unsupported model_type 'llama'"),
    ("pickle-only", [], "never unpickled"),
    ("ok", ["-q", "--dequantize"], "either -q/--quantize or --dequantize"),
    ("ok", ["--q-bits", "4"], "need -q/--quantize"),
    ("ok", ["-q", "--q-bits", "8", "--quant-recipe", "mixed_4_6"], "sets the body to 4 bits"),
    ("ok", ["--dequantize"], "not quantized; nothing to dequantize"),
    ("no-space", [], "not enough disk space .*free"),
    ("into-itself", ["--force"], "--mlx-path is the source folder"),
    ("ok", ["--upload-repo", "not a/repo//id"], "is not a repo id"),
    ("ok", ["--max-shard-size", "lots"], "not a size like 5GB"),
    ("ok", ["-q", "--q-bits", "7"], "argument --q-bits: invalid choice"),
])
def test_bad_input_gives_one_error_line(tmp_path, monkeypatch, capsys, how, flags, message):
    hf_path = break_source(tmp_path / "src", how, monkeypatch)
    target = tmp_path / ("src" if how == "into-itself" else "out")
    try:
        code = main(["--hf-path", hf_path, "--mlx-path", str(target), *flags])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: ")
    assert re.search(message, err), err
    assert leftovers(target) == ([] if target.name == "out" else ["src"])


def test_quantizing_a_quantized_folder_is_refused(converted, tmp_path, capsys):
    assert main(["--hf-path", str(converted["q4"]), "--mlx-path", str(tmp_path / "x"), "-q"]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_launcher_in_a_fresh_process_prints_no_traceback(tmp_path, monkeypatch):
    hf_path = break_source(tmp_path / "src", "corrupt-header", monkeypatch)
    env = dict(os.environ, PYTHONPATH=with_root_on_path())
    proc = subprocess.run([sys.executable, "-m", "convert", "--hf-path", hf_path, "--mlx-path",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: ")


def test_quantized_model_is_prepared_for_the_cpu_without_changing_its_outputs(tmp_path, source, prompt):
    """On the CPU: float16 scales become float32, several-token products go through BLAS, and the
    logits stay what the stored model gives; ``for_cpu=False`` keeps the checkpoint as stored."""
    import mlx.nn as nn
    from refusion_mlx.loading import CPUQuantizedEmbedding, CPUQuantizedLinear

    folder = quiet_convert(source, tmp_path / "q4h", quantize=True, q_bits=4, dtype="float16")
    stored = load_model(folder, for_cpu=False)
    prepared = load_model(folder)
    layer, stored_layer = prepared.layers[0].mlp.gate_proj, stored.layers[0].mlp.gate_proj
    assert type(stored_layer) is nn.QuantizedLinear and stored_layer.scales.dtype == mx.float16
    assert isinstance(layer, CPUQuantizedLinear) and layer.scales.dtype == mx.float32
    assert isinstance(prepared.model.embed_tokens, CPUQuantizedEmbedding)
    exact = load_model(folder, dtype="float32", for_cpu=False)  # the same weights, float32 math, no BLAS
    for ids in (prompt, prompt[:2]):  # BLAS for many tokens, the quantized product for few
        assert_close(np.array(logits(prepared, ids)), np.array(logits(exact, ids)), rtol=1e-4)
    assert top1_agreement(logits(prepared, prompt), logits(stored, prompt)) > 0.95
