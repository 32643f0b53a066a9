"""The model against transformers' Qwen3ForCausalLM (torch, CPU, float32) as an independent oracle."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import oracle

from checkpoints import tiny_config, write_checkpoint
from numerics import assert_close
from refusion_mlx import RefusionError, load_model
from refusion_mlx.kv import SlotCache

torch = oracle("torch")
transformers = oracle("transformers")

TOL = 1e-4  # relative (numerics.assert_close): float32 against torch's summation order


def hf_model(path):
    return transformers.Qwen3ForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def hf_logits(model, ids, positions, past=None):
    # An explicit all-ones mask: without one, transformers reads non-consecutive position ids
    # as several packed sequences and splits the attention.
    mask = torch.ones(1, len(ids), dtype=torch.long) if past is None else None
    with torch.no_grad():
        out = model(torch.tensor([ids]), position_ids=torch.tensor([positions]), attention_mask=mask,
                    past_key_values=past, use_cache=past is not None)
    return out.logits[0].numpy(), out.past_key_values


def ours(model, ids, positions, cache=None, view=None):
    return np.array(model(mx.array([ids]), mx.array([positions]), cache, view)[0])


CONFIGS = {
    "gqa": tiny_config(),
    "mha-tied": tiny_config(num_key_value_heads=4, tie_word_embeddings=True),
    "linear-rope": tiny_config(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "sharded": tiny_config(num_hidden_layers=3),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp(request.param), CONFIGS[request.param],
                            seed=3, shards=3 if request.param == "sharded" else 1)
    return load_model(path), hf_model(path)


def test_contiguous_positions_match(pair):
    model, ref = pair
    ids = np.random.default_rng(0).integers(0, 320, 24).tolist()
    pos = list(range(24))
    assert_close(ours(model, ids, pos), hf_logits(ref, ids, pos)[0], rtol=TOL)


def test_scrambled_gapped_positions_match(pair):
    model, ref = pair
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 320, 24).tolist()
    pos = rng.permutation(500)[:24].tolist()
    assert_close(ours(model, ids, pos), hf_logits(ref, ids, pos)[0], rtol=TOL)


def test_cache_continued_in_commit_order_matches(pair):
    """Chunks committed out of position order: our slot cache vs transformers' DynamicCache."""
    model, ref = pair
    rng = np.random.default_rng(2)
    chunks = [(rng.integers(0, 320, n).tolist(), start) for n, start in
              [(7, 0), (4, 15), (4, 7), (1, 11), (4, 19), (3, 12)]]
    cache = SlotCache(len(model.layers), 64)
    past = transformers.DynamicCache()
    for ids, start in chunks:
        pos = list(range(start, start + len(ids)))
        view = cache.append(len(ids))
        got = ours(model, ids, pos, cache, view)
        cache.commit(len(ids))
        want, past = hf_logits(ref, ids, pos, past)
        assert_close(got, want, rtol=TOL)


def test_uncommitted_entries_are_discarded(tiny_model):
    """A forward that is not committed leaves no trace: cropping is moving the length."""
    ids, pos = [5, 6, 7, 8], [0, 1, 2, 3]
    cache = SlotCache(len(tiny_model.layers), 32)
    ours(tiny_model, ids, pos, cache, cache.append(4))
    cache.commit(4)
    first = ours(tiny_model, [9, 10], [4, 5], cache, cache.append(2))
    ours(tiny_model, [11, 12, 13], [9, 7, 8], cache, cache.append(3))  # scratch, not committed
    again = ours(tiny_model, [9, 10], [4, 5], cache, cache.append(2))
    np.testing.assert_array_equal(first, again)


def test_dtype_is_kept_unless_asked(tmp_path):
    from safetensors.numpy import load_file

    path = write_checkpoint(tmp_path / "f32", tiny_config())
    assert load_model(path).model.embed_tokens.weight.dtype == mx.float32
    assert load_model(path, dtype="bfloat16").model.embed_tokens.weight.dtype == mx.bfloat16
    w = load_file(str(path / "model.safetensors"))
    half = tmp_path / "f16"
    write_checkpoint(half, tiny_config(), weights={k: v.astype(np.float16) for k, v in w.items()})
    assert load_model(half).model.embed_tokens.weight.dtype == mx.float16


def test_unsupported_rope_scaling_is_refused(tmp_path):
    path = write_checkpoint(tmp_path, tiny_config(rope_scaling={"rope_type": "yarn", "factor": 2.0}))
    with pytest.raises(RefusionError, match="rope_scaling type 'yarn'"):
        load_model(path)


def test_quantized_checkpoint_loads_and_stays_close(tmp_path):
    """A folder written by mlx-lm with ``quantization`` in its config loads as quantized layers."""
    import mlx.nn as nn
    from mlx_lm.utils import quantize_model, save_config, save_model

    from refusion_mlx.loading import read_config

    src = write_checkpoint(tmp_path / "src", tiny_config(), seed=0, head_scale=8.0)
    reference = load_model(src)
    model, config = quantize_model(load_model(src), read_config(src), group_size=32, bits=8)
    out = tmp_path / "q8"
    save_model(out, model)
    save_config(config, out / "config.json")
    quantized = load_model(out)
    assert isinstance(quantized.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    ids = list(range(10, 30))
    a, b = ours(reference, ids, list(range(20))), ours(quantized, ids, list(range(20)))
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9
