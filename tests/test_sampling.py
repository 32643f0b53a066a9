"""Sampling among fewer tokens (top_p, top_k, min_p): which tokens survive, and that the decoders
honour it while the defaults leave upstream's sampler untouched."""

import numpy as np
import pytest
import refusion_mlx  # noqa: F401  (before mlx.core: the BLAS preload)
import mlx.core as mx

from refusion_mlx import RefusionError, generate_ids
from refusion_mlx.sampling import draft_tokens, truncate

PROBS = [[0.5, 0.3, 0.15, 0.05], [0.25, 0.25, 0.25, 0.25], [0.05, 0.15, 0.3, 0.5]]


def kept(**knobs):
    logits = mx.log(mx.array(PROBS))
    return np.isfinite(np.array(truncate(logits, **knobs))).astype(int).tolist()


@pytest.mark.parametrize("knobs, expected", [
    (dict(), [[1, 1, 1, 1]] * 3),
    (dict(top_p=0.5), [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1]]),  # ties at the edge stay
    (dict(top_p=0.7), [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1]]),
    (dict(top_p=0.9), [[1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 1, 1]]),
    (dict(top_k=2), [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1]]),
    (dict(top_k=10), [[1, 1, 1, 1]] * 3),
    (dict(min_p=0.5), [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1]]),
    (dict(top_p=0.9, top_k=2, min_p=0.2), [[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1]]),
    (dict(top_p=1e-9), [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 1]]),  # the most likely always stays
])
def test_truncate_keeps_the_smallest_likely_set(knobs, expected):
    assert kept(**knobs) == expected


def test_samples_stay_inside_the_kept_set_and_defaults_are_upstreams():
    logits = mx.log(mx.array([PROBS[0]] * 2000))
    key = mx.random.key(3)
    picked = set(np.array(draft_tokens(logits, 1.0, key, top_p=0.7)).tolist())
    assert picked == {0, 1}  # 2000 draws: both kept tokens come up, nothing else does
    default = np.array(draft_tokens(logits, 1.0, key))
    assert set(default.tolist()) == {0, 1, 2, 3}
    assert (np.array(draft_tokens(logits, 1.0, key, top_p=1.0, top_k=0, min_p=0.0)) == default).all()


def test_the_decoders_honour_it(tiny_model):
    prompt = [3, 4, 5, 6]
    knobs = dict(gen_length=16, slot_size=4, serial_num_blocks=2, temperature=1.0)
    greedy = generate_ids(tiny_model, prompt, gen_length=16, slot_size=4, serial_num_blocks=2).tokens
    # top_k=1 leaves one token to sample: every seed drafts what greedy decoding drafts.
    assert {tuple(generate_ids(tiny_model, prompt, seed=s, top_k=1, **knobs).tokens) for s in (1, 2, 3)} \
        == {tuple(greedy)}
    assert len({tuple(generate_ids(tiny_model, prompt, seed=s, **knobs).tokens) for s in (1, 2, 3)}) > 1


@pytest.mark.parametrize("knobs, name", [(dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
                                         (dict(top_k=-1), "top_k"), (dict(min_p=2.0), "min_p")])
def test_bad_values_are_refused_by_name(tiny_model, knobs, name):
    with pytest.raises(RefusionError, match=name):
        generate_ids(tiny_model, [1, 2], gen_length=8, slot_size=4, serial_num_blocks=1, **knobs)
