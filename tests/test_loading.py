"""Loading folders and hub repos, and every broken checkpoint giving one clear error."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

from checkpoints import special_ids, tiny_config, write_checkpoint, write_tokenizer
from refusion_mlx import RefusionError, load, load_model


def logits(model, ids=(5, 6, 7, 8)):
    return np.array(model(mx.array([list(ids)]))[0])


def test_sharded_checkpoint_equals_single_file(tmp_path):
    one = load_model(write_checkpoint(tmp_path / "one", tiny_config(), seed=4))
    three = load_model(write_checkpoint(tmp_path / "three", tiny_config(), seed=4, shards=3))
    np.testing.assert_array_equal(logits(one), logits(three))


def test_load_gives_tokenizer_and_mask_id(tiny_path):
    model, tokenizer = load(tiny_path)
    ids = special_ids(tiny_path)
    assert model.args.mask_token_id == ids["<|mask|>"]
    assert ids["<|im_end|>"] in tokenizer.eos_token_ids
    assert tokenizer.decode(tokenizer.encode("the quick brown fox")) == "the quick brown fox"


def test_mask_id_falls_back_to_the_tokenizer(tmp_path):
    config = tiny_config()
    del config["mask_token_id"]
    path = write_checkpoint(tmp_path, config)
    write_tokenizer(path)
    model, _ = load(path)
    assert model.args.mask_token_id == special_ids(path)["<|mask|>"]


def fake_hub_cache(root, repo_id, source):
    """Lay a folder out as huggingface_hub's cache does, so the real hub code path finds it."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(source, repo / "snapshots" / commit)
    return root


def test_hub_repo_id_resolves_through_huggingface_hub_offline(tmp_path, tiny_path, monkeypatch):
    cache = fake_hub_cache(tmp_path / "hub", "GSAI-ML/ReFusion-tiny", tiny_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model, _ = load("GSAI-ML/ReFusion-tiny")
    np.testing.assert_array_equal(logits(model), logits(load_model(tiny_path)))
    with pytest.raises(RefusionError, match="not in the local hub cache"):
        load("GSAI-ML/not-downloaded")


def break_folder(tmp_path, how):
    path = write_checkpoint(tmp_path / "ck", tiny_config(), shards=2)
    write_tokenizer(path)
    if how == "no-weights":
        for f in path.glob("*.safetensors*"):
            f.unlink()
    elif how == "missing-shard":
        next(path.glob("model-00002*.safetensors")).unlink()
    elif how == "corrupt":
        for f in path.glob("model-*.safetensors"):
            f.write_bytes(b"\xff" * 64)
    elif how == "pickle-only":
        for f in path.glob("*.safetensors*"):
            f.unlink()
        (path / "pytorch_model.bin").write_bytes(b"not really")
    elif how == "bad-config":
        (path / "config.json").write_text("{nope")
    elif how == "model-type":
        (path / "config.json").write_text(json.dumps(tiny_config(model_type="llama")))
    elif how == "no-mask":
        config = tiny_config()
        del config["mask_token_id"]
        (path / "config.json").write_text(json.dumps(config))
        tok = json.loads((path / "tokenizer.json").read_text())
        tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|mask|>"]
        (path / "tokenizer.json").write_text(json.dumps(tok))
    elif how == "shape":
        (path / "config.json").write_text(json.dumps(tiny_config(hidden_size=32)))
    return path


@pytest.mark.parametrize("how, message", [
    ("no-weights", "no model.*safetensors"),
    ("missing-shard", "missing weight shard"),
    ("corrupt", "cannot (load|read) weights"),
    ("pickle-only", "never unpickled"),
    ("bad-config", "not valid JSON"),
    ("model-type", "unsupported model_type 'llama'"),
    ("no-mask", "no mask_token_id"),
    ("shape", "cannot load weights"),
])
def test_broken_checkpoints_give_one_clear_error(tmp_path, how, message):
    path = break_folder(tmp_path, how)
    with pytest.raises(RefusionError, match=message) as info:
        load(path)
    assert "\n" not in str(info.value)


def test_missing_folder(tmp_path):
    with pytest.raises(RefusionError, match="not found"):
        load_model(tmp_path / "nowhere")
