"""The slot cache: O(1) crops and commits, shared-prefix slot rows, and its memory footprint."""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from numerics import assert_close

from refusion_mlx.kv import SlotCache
from refusion_mlx.decode import generate_step
from refusion_mlx.state import start_state
from refusion_mlx.settings import DecodeSettings


def forward(model, cache, view, ids, positions):
    return np.array(model(mx.array([ids]), mx.array([positions]), cache, view)[0])


def offset_major(rows):
    """Rows' tokens in the order a rows view takes them: every row's first, then every row's second..."""
    return np.asarray(rows).T.reshape(-1).tolist()


def test_rows_share_one_prefix_and_equal_separate_copies(tiny_model):
    """k slot rows behind one prefix give exactly what k separate (copied) caches give."""
    S, prefix = 4, [11, 12, 13, 14, 15]
    rows = [[21, 22, 23, 24], [31, 32, 33, 34], [41, 42, 43, 44]]
    positions = [[9, 10, 11, 12], [5, 6, 7, 8], [17, 18, 19, 20]]

    shared = SlotCache(len(tiny_model.layers), 32)
    forward(tiny_model, shared, shared.append(5), prefix, list(range(5)))
    shared.commit(5)
    got = forward(tiny_model, shared, shared.rows(3, S, 0), offset_major(rows), offset_major(positions))
    got = got.reshape(S, 3, -1).transpose(1, 0, 2)  # (row, offset, vocab)

    for r in range(3):
        alone = SlotCache(len(tiny_model.layers), 32)
        forward(tiny_model, alone, alone.append(5), prefix, list(range(5)))
        alone.commit(5)
        want = forward(tiny_model, alone, alone.append(S), rows[r], positions[r])
        assert_close(got[r], want, rtol=1e-5)

    # Later rounds feed only the tail of each row; the row entries before it are reused.
    tail = forward(tiny_model, shared, shared.rows(3, S, 2), offset_major([r[2:] for r in rows]),
                   offset_major([p[2:] for p in positions]))
    assert_close(tail.reshape(2, 3, -1).transpose(1, 0, 2), got[:, 2:], rtol=1e-5)

    # Rows 0-1 kept after an EOS (row 1 cut after 3 tokens): their entries are gathered to the
    # front, and a later token sees exactly those, each as it was made (prefix + own row).
    shared.keep(shared.row_entries(2, S, 3)[:7])
    after = forward(tiny_model, shared, shared.append(1), [50], [30])
    tokens = prefix + rows[0] + rows[1][:3] + [50]
    pos = list(range(5)) + positions[0] + positions[1][:3] + [30]
    sees = np.zeros((13, 13), dtype=bool)
    sees[:5, :5] = np.tril(np.ones((5, 5), dtype=bool))
    sees[5:9, :5] = sees[9:12, :5] = True
    sees[5:9, 5:9] = np.tril(np.ones((4, 4), dtype=bool))
    sees[9:12, 9:12] = np.tril(np.ones((3, 3), dtype=bool))
    sees[12] = True
    want = tiny_model(mx.array([tokens]), mx.array([pos]), view=SimpleNamespace(mask=mx.array(sees)))
    assert_close(after, np.array(want[0, -1:]), rtol=1e-5)


@pytest.mark.parametrize("bucket", [1, 8, 256])
def test_padded_key_lengths_change_nothing(tiny_model, bucket):
    """Keys padded to a bucket (what the CUDA backend gets) give the same logits: the mask hides them."""
    def run(cache):
        forward(tiny_model, cache, cache.append(5), [11, 12, 13, 14, 15], list(range(5)))
        cache.commit(5)
        a = forward(tiny_model, cache, cache.append(3), [7, 8, 9], [6, 9, 7])
        b = forward(tiny_model, cache, cache.rows(2, 4, 1), [1, 2, 3, 4, 5, 6], [20, 24, 21, 25, 22, 26])
        return a, b

    exact, padded = run(SlotCache(len(tiny_model.layers), 29, bucket=1)), run(
        SlotCache(len(tiny_model.layers), 29, bucket=bucket))
    for x, y in zip(exact, padded):
        assert_close(x, y, rtol=1e-5)


def test_commit_and_crop_only_move_the_length():
    cache = SlotCache(num_layers=2, capacity=16, bucket=1)  # exact lengths (every backend but CUDA)
    view = cache.append(5)
    assert (view.start, view.end, view.mask) == (0, 5, "causal")
    cache.commit(3)
    assert cache.length == 3 and cache.append(1).mask is None
    cache.crop(1)
    assert cache.length == 1
    with pytest.raises(ValueError):
        cache.crop(2)
    with pytest.raises(ValueError):
        cache.append(16)


def test_rows_mask_sees_prefix_and_own_row_only():
    cache = SlotCache(num_layers=1, capacity=16, bucket=1)
    cache.commit(2)
    view = cache.rows(num_rows=2, slot_size=3, start=1)
    mask = np.array(view.mask)
    # queries: offset 1 of rows 0, 1, then offset 2 of rows 0, 1
    # keys: 2 prefix, then the rows column by column: (o0 r0) (o0 r1) (o1 r0) (o1 r1) (o2 r0) (o2 r1)
    expected = np.array([
        [1, 1, 1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 1, 0, 0],
        [1, 1, 1, 0, 1, 0, 1, 0],
        [1, 1, 0, 1, 0, 1, 0, 1],
    ], dtype=bool)
    np.testing.assert_array_equal(mask, expected)
    assert (view.start, view.index) == (4, None)  # the tails are one contiguous run of entries
    fewer = cache.rows(num_rows=1, slot_size=3, start=1, layout_rows=2)  # row 1 dropped after an EOS
    assert np.array(fewer.index).tolist() == [4, 6]
    assert np.array(cache.row_entries(2, 3, 2)).tolist() == [2, 4, 6, 3, 5, 7]


def test_infilling_k_rows_never_holds_k_copies_of_the_prefix(tmp_path, monkeypatch):
    """Measured, not computed: MLX's peak memory while k slot rows are infilled together grows
    with the prefix about once, not k times. Exact attention lengths, so that on CUDA the padded
    attention scores do not hide what the cache holds; and a model with 8 layers and 4 KV heads of
    32, so that what the cache holds per prefix token (every layer's keys and values) outweighs what
    one layer's attention makes and frees over the prefix (its scores: CUDA's allocator keeps them
    in the peak where the CPU's reuses buffers)."""
    import gc

    from checkpoints import tiny_config, write_checkpoint
    from refusion_mlx import load_model

    monkeypatch.setattr("refusion_mlx.kv.single.key_bucket", lambda: 1)
    tiny_model = load_model(write_checkpoint(
        tmp_path, tiny_config(num_hidden_layers=8, num_key_value_heads=4, head_dim=32), head_scale=8.0))
    args = tiny_model.args
    per_token = len(tiny_model.layers) * 2 * args.num_key_value_heads * args.head_dim * 4  # K + V, float32
    settings = DecodeSettings(gen_length=64, slot_size=4, serial_num_blocks=2,
                              slot_threshold=0.0, token_threshold=0.99)
    peaks, rows = {}, {}
    for prompt_length in (100, 800):
        prompt = [40 + i % 100 for i in range(prompt_length)]
        state = start_state(tiny_model, prompt, settings, None, [])
        steps = generate_step(tiny_model, state, settings)
        while state.cache.length < prompt_length + 32:  # the first block, with the prompt's forward
            next(steps)
        gc.collect()
        mx.clear_cache()
        base = mx.get_active_memory()
        mx.reset_peak_memory()
        commit = next(steps)  # the second block: k rows infilled behind the whole prefix
        peaks[prompt_length], rows[prompt_length] = mx.get_peak_memory() - base, commit.slots
        assert commit.kind == "infill"
    k = min(rows.values())
    assert k >= 4
    growth = peaks[800] - peaks[100]
    assert growth < 2 * 700 * per_token < k * 700 * per_token, (growth, per_token, k)
