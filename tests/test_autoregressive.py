"""The left-to-right baseline against a naive greedy loop that recomputes everything."""

import mlx.core as mx
import numpy as np
import pytest

from refusion_mlx import RefusionError, generate_ar_ids


def naive_greedy(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(np.array(model(mx.array([seq]))[0, -1]).argmax()))
    return seq[len(prompt):]


def test_greedy_matches_recomputing_everything(tiny_model):
    prompt = [7, 8, 9, 10]
    r = generate_ar_ids(tiny_model, prompt, max_tokens=20, eos_token_id=[])
    assert r.tokens == naive_greedy(tiny_model, prompt, 20)
    assert r.model_calls == 20 and r.tokens_per_call == 1.0


def test_stops_after_eos(tiny_model):
    prompt = [7, 8, 9, 10]
    free = naive_greedy(tiny_model, prompt, 12)
    eos = free[5]
    r = generate_ar_ids(tiny_model, prompt, max_tokens=12, eos_token_id=eos)
    assert r.tokens == free[:free.index(eos) + 1]


def test_sampling_is_seeded(tiny_model):
    def run(seed):
        return generate_ar_ids(tiny_model, [1, 2, 3], max_tokens=16, temperature=1.0, seed=seed,
                               eos_token_id=[]).tokens
    assert run(3) == run(3) and run(3) != run(4)


def test_bad_requests(tiny_model):
    with pytest.raises(RefusionError):
        generate_ar_ids(tiny_model, [], max_tokens=4)
    with pytest.raises(RefusionError):
        generate_ar_ids(tiny_model, [1], max_tokens=5000)
