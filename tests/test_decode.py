"""The decoder: each step alone, the whole decoder against the plain reference, and control flow."""

import itertools

import numpy as np
import pytest

from refusion_mlx import RefusionError, generate_ids
from refusion_mlx.decode import (
    accepted_prefix,
    choose_slots,
    first_eos,
    generation_tpf,
    generate_step,
    update_tags,
)
from refusion_mlx.state import start_state
from refusion_mlx.settings import DecodeSettings, settings_for
from reference_decoder import reference_generate
from scripted_model import ScriptedModel

MASK, EOS = 319, 317


# --- the steps, alone ---------------------------------------------------------------------

def test_choose_slots_takes_confident_ones_in_position_order_or_the_best():
    assert choose_slots([0.95, 0.2, 0.91, 0.5], 0.9) == [0, 2]
    assert choose_slots([0.3, 0.6, 0.5], 0.9) == [1]
    assert choose_slots([0.9, 0.9], 0.9) == [0]  # strictly greater: none pass, the first maximum wins


def test_accepted_prefix_reads_the_chosen_slots_as_one_sequence():
    acc = np.array([[1, 1, 1], [1, 0, 1]], dtype=bool)
    assert accepted_prefix(acc) == 4
    assert accepted_prefix(np.ones((2, 3), dtype=bool)) == 6
    assert accepted_prefix(np.array([[1, 0, 1]], dtype=bool)) == 1


def test_first_eos_accepts_several_ids():
    assert first_eos(np.array([5, 6, 7, 6]), {7, 6}) == 1
    assert first_eos(np.array([5, 5]), {7}) is None


def test_update_tags_accepts_at_least_one_more_token_per_row():
    tags = np.array([[1, 0, 0, 0], [1, 1, 0, 0]])
    p = np.array([[0.0, 0.0, 0.9, 0.9], [0.0, 0.0, 0.9, 0.1]])
    # row 0: token 1 forced (its predecessor was accepted), token 2 and 3 pass; row 1: 2 forced, 3 fails
    np.testing.assert_array_equal(update_tags(tags, p, 0.5), [[1, 1, 1, 1], [1, 1, 1, 0]])
    np.testing.assert_array_equal(update_tags(tags, np.zeros((2, 4)), 0.5), [[1, 1, 0, 0], [1, 1, 1, 0]])


def test_tpf_credit_matches_upstream_formula():
    assert generation_tpf(8, 3) == 12.0  # verified commit: S * slots / 2
    assert generation_tpf(8, 2, rounds=1) == 8 * 2 / 4  # infill: S * k / (2 * (rounds + 1))
    assert generation_tpf(4, 2, rounds=4) == 4 * 2 / 8  # capped at 2 * S, like upstream's loop


@pytest.mark.parametrize("knobs, message", [
    (dict(slot_size=0), "slot_size"),
    (dict(gen_length=0), "gen_length must be a positive integer"),
    (dict(slot_threshold=1.5), "slot_threshold"),
    (dict(token_threshold=-0.1), "token_threshold"),
    (dict(temperature=-1.0), "temperature"),
    (dict(serial_num_blocks=0), "serial_num_blocks"),
])
def test_bad_knobs_are_refused(tiny_model, knobs, message):
    with pytest.raises(RefusionError, match=message):
        generate_ids(tiny_model, [1, 2, 3], mask_id=MASK, **knobs)


def test_prompt_plus_generation_must_fit_positions(tiny_model):
    with pytest.raises(RefusionError, match="max_position_embeddings"):
        generate_ids(tiny_model, list(range(100)) * 10, gen_length=64, slot_size=8)


def test_padding_knobs_are_bounded_by_the_positions_before_anything_is_allocated(tiny_model):
    """slot_size x blocks rounds gen_length up: a unit larger than the model's positions would size
    the cache to it (a billion blocks asked for 768 GB); it is refused, naming both knobs."""
    limit = tiny_model.args.max_position_embeddings
    with pytest.raises(RefusionError, match=r"slot_size \(1\) x serial_num_blocks \(1000000000\)"):
        generate_ids(tiny_model, [1, 2, 3], gen_length=8, slot_size=1, serial_num_blocks=10**9)
    with pytest.raises(RefusionError, match="max_position_embeddings"):
        settings_for(tiny_model, 3, gen_length=8, slot_size=limit + 1, serial_num_blocks=1)
    # A unit that fits is fine even when the padding runs past the positions (nothing there is returned).
    assert len(generate_ids(tiny_model, [1, 2, 3], gen_length=8, slot_size=4, serial_num_blocks=2).tokens) == 8


def test_empty_prompt_is_refused(tiny_model):
    with pytest.raises(RefusionError, match="empty"):
        generate_ids(tiny_model, [])


@pytest.mark.parametrize("gen_length", [1, 7, 13, 40])
def test_any_gen_length_is_padded_internally_and_cut_to_what_was_asked(tiny_model, gen_length):
    knobs = dict(slot_size=4, serial_num_blocks=4, slot_threshold=0.5, token_threshold=0.5, eos_token_id=[])
    r = generate_ids(tiny_model, [5, 6, 7], gen_length=gen_length, **knobs)
    assert len(r.tokens) == gen_length
    # The padding is whole slots in every block: the same decoding as the padded length, cut.
    padded = -(-gen_length // 16) * 16
    assert r.tokens == generate_ids(tiny_model, [5, 6, 7], gen_length=padded, **knobs).tokens[:gen_length]


def test_a_length_that_fits_works_even_when_its_padding_does_not(tiny_model):
    limit = tiny_model.args.max_position_embeddings
    prompt = [5] * 10
    r = generate_ids(tiny_model, prompt, gen_length=limit - 10, slot_size=8, serial_num_blocks=4,
                     eos_token_id=[], slot_threshold=0.5, token_threshold=0.5)
    assert len(r.tokens) == limit - 10


# --- the whole decoder against the reference --------------------------------------------

def grid():
    rng = np.random.default_rng(1234)
    cases = []
    combos = itertools.product([4, 8, 32], [1, 2, 4, 8], [0.1, 0.5, 0.9], [0.1, 0.5, 0.9])
    for S, B, ts, tt in combos:
        if S == 32 and B > 2:
            continue
        if rng.random() < 0.55:  # a fixed, seeded subset keeps the suite fast
            continue
        cases.append((S, B, ts, tt, int(rng.integers(0, 3))))
    return cases


def run_both(model, prompt, S, B, ts, tt, eos):
    G = S * B * (2 if S < 32 else 1)
    ours = generate_ids(model, prompt, gen_length=G, slot_size=S, serial_num_blocks=B,
                        slot_threshold=ts, token_threshold=tt, mask_id=MASK, eos_token_id=eos)
    ref, ref_tpf = reference_generate(model, prompt, G, S, B, ts, tt, MASK, eos)
    return ours, ref, ref_tpf


@pytest.fixture(scope="module")
def grid_models(tmp_path_factory):
    """Three sharpness levels, so that confidences land on both sides of every threshold."""
    from checkpoints import tiny_config, write_checkpoint
    from refusion_mlx import load_model

    models = []
    for seed, scale in [(1, 3.0), (2, 8.0), (3, 20.0)]:
        path = write_checkpoint(tmp_path_factory.mktemp(f"grid{seed}"), tiny_config(), seed=seed,
                                head_scale=scale)
        models.append(load_model(path))
    return models


GRID = grid()
_grid_commits = {}  # case -> kinds seen, shared by the per-case tests and the coverage check


def check_case(models, case):
    """Ours against the reference on one grid case, without and with an EOS; returns the commits."""
    if case in _grid_commits:
        return _grid_commits[case]
    S, B, ts, tt, which = case
    model = models[which]
    rng = np.random.default_rng(GRID.index(case))
    prompt = rng.integers(0, 315, size=int(rng.integers(3, 12))).tolist()
    # First without EOS, then with an EOS id the model really produces mid-way through.
    free, _, _ = run_both(model, prompt, S, B, ts, tt, [])
    eos = free.tokens[int(rng.integers(len(free.tokens) // 4, len(free.tokens)))]
    commits = []
    for eos_ids in ([], [eos]):
        ours, ref, ref_tpf = run_both(model, prompt, S, B, ts, tt, eos_ids)
        assert ours.tokens == ref, eos_ids
        assert ours.tpf == pytest.approx(ref_tpf), eos_ids
        commits += [(c, eos_ids) for c in ours.commits]
    _grid_commits[case] = commits
    return commits


@pytest.mark.parametrize("case", GRID, ids=lambda c: "S{}-B{}-st{}-tt{}-m{}".format(*c))
def test_decoder_equals_reference(grid_models, case):
    check_case(grid_models, case)


def test_the_grid_exercises_every_path(grid_models):
    seen = {"verify": 0, "infill": 0, "eos_verify": 0, "eos_infill": 0, "rows>1": 0}
    for case in GRID:
        for c, eos_ids in check_case(grid_models, case):
            seen[c.kind] += 1
            seen["rows>1"] += c.kind == "infill" and c.slots > 1
            if eos_ids and eos_ids[0] in c.tokens:
                seen["eos_" + c.kind] += 1
    assert all(seen.values()), seen


def test_same_seed_same_tokens_different_seed_different(tiny_model):
    def sample(seed):
        return generate_ids(tiny_model, [3, 4, 5, 6], gen_length=32, slot_size=4, serial_num_blocks=2,
                            slot_threshold=0.5, token_threshold=0.5, temperature=1.0, seed=seed,
                            eos_token_id=[]).tokens

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_greedy_ignores_seed(tiny_model):
    runs = {tuple(generate_ids(tiny_model, [3, 4, 5], gen_length=16, slot_size=4, seed=s).tokens)
            for s in (1, 2)}
    assert len(runs) == 1


# --- control flow, steered by a scripted model --------------------------------------------

def scripted(text_len, mask_prob, next_prob, eos_at=None, prompt_len=2):
    text = [(i % 25) + 1 for i in range(text_len)]
    if eos_at is not None:
        text[prompt_len + eos_at] = 30
    return ScriptedModel(text, mask_prob, next_prob)


def test_eos_found_while_infilling_keeps_the_text_before_it():
    """Upstream drops pending slots by *row index* here and loses text; we must not."""
    P, S, G = 2, 4, 16
    mask_prob = [0.05] * (P + G)
    next_prob = [0.99] * (P + G)
    mask_prob[P + 0] = mask_prob[P + 8] = 0.95  # slots 0 and 2 are chosen first
    next_prob[P + 2] = 0.01  # slot 0 fails verification at its third token -> infill
    model = scripted(P + G, mask_prob, next_prob, eos_at=9)  # EOS inside slot 2 (row 1)
    settings = DecodeSettings(G, S, 1, 0.9, 0.5)
    state = start_state(model, [1, 2], settings, None, None)
    commits = list(generate_step(model, state, settings))
    assert commits[0].kind == "infill" and commits[0].slots == 2
    assert 4 in commits[1].positions  # slot 1 (before the EOS) is still decoded
    result = generate_ids(model, [1, 2], gen_length=G, slot_size=S, serial_num_blocks=1,
                          slot_threshold=0.9, token_threshold=0.5)
    assert result.tokens == model.text[P:P + 10]  # contiguous, ending with the EOS
    ref, _ = reference_generate(model, [1, 2], G, S, 1, 0.9, 0.5, 31, [30])
    assert ref == result.tokens


def test_verified_prefix_commits_whole_slots_and_returns_the_rest():
    P, S, G = 2, 4, 12
    mask_prob = [0.95] * (P + G)
    next_prob = [0.99] * (P + G)
    next_prob[P + 6] = 0.01  # the second chosen slot breaks at its third token
    model = scripted(P + G, mask_prob, next_prob)
    settings = DecodeSettings(G, S, 1, 0.9, 0.5)
    state = start_state(model, [1, 2], settings, None, [])
    first = next(generate_step(model, state, settings))
    assert first.kind == "verify" and first.positions == [0, 1, 2, 3]
    assert first.tpf == S * 1 / 2


def test_eos_in_verified_prefix_truncates_and_drops_later_slots():
    P, S, G = 2, 4, 16
    model = scripted(P + G, [0.95] * (P + G), [0.99] * (P + G), eos_at=5)
    r = generate_ids(model, [1, 2], gen_length=G, slot_size=S, serial_num_blocks=1,
                     slot_threshold=0.9, token_threshold=0.5)
    assert r.tokens == model.text[P:P + 6]
    assert r.commits[0].kind == "verify" and r.iterations == 1


def test_blocks_are_decoded_in_order():
    P, S, G = 2, 4, 16
    model = scripted(P + G, [0.95] * (P + G), [0.01] * (P + G))
    r = generate_ids(model, [1, 2], gen_length=G, slot_size=S, serial_num_blocks=4,
                     slot_threshold=0.9, token_threshold=0.5, eos_token_id=[])
    starts = [min(c.positions) for c in r.commits]
    assert starts == sorted(starts) and len(r.commits) == 4
    assert r.tokens == model.text[P:P + G]


def test_stats_count_every_forward(tiny_model):
    r = generate_ids(tiny_model, [3, 4, 5], gen_length=32, slot_size=4, serial_num_blocks=2,
                     slot_threshold=0.5, token_threshold=0.5, eos_token_id=[])
    infill_rounds = sum(1 for c in r.commits if c.kind == "infill")
    assert r.model_calls >= 2 * r.iterations + 2 * infill_rounds
    assert r.tokens_fed >= 3 + 32 and r.wall_time > 0 and r.tokens_per_second > 0
    assert r.tokens_per_call == pytest.approx(len(r.tokens) / r.model_calls)


def test_previous_rows_reads_each_token_under_its_predecessor_in_its_row():
    from refusion_mlx.forwards import previous_rows

    assert previous_rows(4).tolist() == [0, 0, 1, 2]
    # Offset-major infill rows (2 rows): token (o, r) is read under (o - 1, r); the first offset under itself.
    assert previous_rows(6, stride=2).tolist() == [0, 1, 0, 1, 2, 3]


def test_answers_computes_every_steps_probes_at_once():
    """Two steps' forwards answered from one logits array: each gets its own rows' argmax, and the
    probabilities it probed, as if computed on its own logits."""
    import mlx.core as mx

    from refusion_mlx.forwards import Forward, answers
    from refusion_mlx.sampling import probability_of

    rng = np.random.default_rng(0)
    first, second = rng.normal(size=(3, 11)).astype(np.float32), rng.normal(size=(4, 11)).astype(np.float32)
    needs = [Forward([1, 2, 3], np.arange(3), None, probe=(np.array([0, 2]), None)),
             Forward([4, 5, 6, 7, 8], np.arange(5), None, last=4, probe=(np.array([0, 0, 1]), np.array([3, 5, 7])))]
    a, b = answers(mx.array(np.concatenate([first, second])), needs)
    assert np.array(a.best).tolist() == first.argmax(-1).tolist()
    assert np.array(b.best).tolist() == second.argmax(-1).tolist()
    expected_a = probability_of(mx.array(first[[0, 2]]), mx.array(first[[0, 2]].argmax(-1)))
    expected_b = probability_of(mx.array(second[[0, 0, 1]]), mx.array([3, 5, 7]))
    assert np.allclose(np.array(a.probability), np.array(expected_a))
    assert np.allclose(np.array(b.probability), np.array(expected_b))
