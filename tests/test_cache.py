"""The slot cache: O(1) crops and commits, shared-prefix slot rows, and its memory footprint."""

import mlx.core as mx
import numpy as np
import pytest

from refusion_mlx.cache import SlotCache
from refusion_mlx.decode import DecodeSettings, generate_step, start_state


def forward(model, cache, view, ids, positions):
    return np.array(model(mx.array([ids]), mx.array([positions]), cache, view)[0])


def test_rows_share_one_prefix_and_equal_separate_copies(tiny_model):
    """k slot rows behind one prefix give exactly what k separate (copied) caches give."""
    S, prefix = 4, [11, 12, 13, 14, 15]
    rows = [[21, 22, 23, 24], [31, 32, 33, 34], [41, 42, 43, 44]]
    positions = [[9, 10, 11, 12], [5, 6, 7, 8], [17, 18, 19, 20]]

    shared = SlotCache(len(tiny_model.layers), 32)
    forward(tiny_model, shared, shared.append(5), prefix, list(range(5)))
    shared.commit(5)
    got = forward(tiny_model, shared, shared.rows(3, S, 0), sum(rows, []), sum(positions, []))

    for r in range(3):
        alone = SlotCache(len(tiny_model.layers), 32)
        forward(tiny_model, alone, alone.append(5), prefix, list(range(5)))
        alone.commit(5)
        want = forward(tiny_model, alone, alone.append(S), rows[r], positions[r])
        np.testing.assert_allclose(got[r * S:(r + 1) * S], want, atol=1e-5)

    # Later rounds feed only the tail of each row; the row entries before it are reused.
    tail = forward(tiny_model, shared, shared.rows(3, S, 2), sum([r[2:] for r in rows], []),
                   sum([p[2:] for p in positions], []))
    np.testing.assert_allclose(tail.reshape(3, 2, -1), got.reshape(3, S, -1)[:, 2:], atol=1e-5)


def test_commit_and_crop_only_move_the_length():
    cache = SlotCache(num_layers=2, capacity=16)
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
    cache = SlotCache(num_layers=1, capacity=16)
    cache.commit(2)
    view = cache.rows(num_rows=2, slot_size=3, start=1)
    mask = np.array(view.mask)
    # queries: row 0 offsets 1,2 then row 1 offsets 1,2; keys: 2 prefix + 2 rows of 3
    expected = np.array([
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0, 1, 1, 0],
        [1, 1, 0, 0, 0, 1, 1, 1],
    ], dtype=bool)
    np.testing.assert_array_equal(mask, expected)
    assert np.array(view.index).tolist() == [3, 4, 6, 7]


def test_footprint_is_prefix_plus_slots_never_k_prefixes(tiny_model):
    """After infilling several slots at once, the cache holds one buffer of prompt + generation."""
    prompt = list(range(40, 140))  # a long prefix, so k copies would show
    settings = DecodeSettings(gen_length=32, slot_size=4, serial_num_blocks=1,
                              slot_threshold=0.0, token_threshold=0.99)
    state = start_state(tiny_model, prompt, settings, None, [])
    commits = list(generate_step(tiny_model, state, settings))
    assert any(c.kind == "infill" and c.slots >= 4 for c in commits)  # k >= 4 rows infilled together
    args = tiny_model.args
    per_entry = 2 * args.num_key_value_heads * args.head_dim * 4  # keys + values, float32
    assert state.cache.nbytes == len(tiny_model.layers) * (len(prompt) + 32) * per_entry
    for layer in state.cache.layers:
        assert layer.keys.shape[0] == 1  # no batch of k rows, no copied prefixes
