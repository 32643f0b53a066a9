"""The hybrid AR + masked-diffusion loss against a slow, plain-Python rebuild of upstream's objective."""

import math
import random

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from refusion_mlx.tuner.objective import (
    IGNORE,
    SlotPlan,
    arrange,
    collate,
    draw_plan,
    hybrid_loss,
    layout_example,
)

MASK = 319
EPS = 1e-3


def reference_plan(n_response, rng):
    """Upstream's draws in upstream's order: slot size, t, a coin per slot, shuffle of clean slots."""
    size = rng.choice([4, 8, 16, 32])
    n_slots = -(-n_response // size)
    t = rng.random()
    p = (1 - EPS) * t + EPS
    masked = [rng.random() < p for _ in range(n_slots)]
    clean = [s for s in range(n_slots) if not masked[s]]
    rng.shuffle(clean)
    return size, t, p, masked, clean


def reference_sequence(prompt, response, size, masked, clean):
    """(tokens, positions, {index: AR target}, {index: MDM target}) built token by token."""
    seq, pos, ar, mdm = list(prompt), list(range(len(prompt))), {}, {}
    slot = lambda s: list(range(s * size, min((s + 1) * size, len(response))))  # noqa: E731
    for s in clean:
        idx = slot(s)
        for k, j in enumerate(idx):
            if k + 1 < len(idx):
                ar[len(seq)] = response[idx[k + 1]]
            seq.append(response[j])
            pos.append(len(prompt) + j)
    for s in range(len(masked)):
        if masked[s]:
            for j in slot(s):
                mdm[len(seq)] = response[j]
                seq.append(MASK)
                pos.append(len(prompt) + j)
    return seq, pos, ar, mdm


def reference_loss(model, examples, seed):
    """Upstream's reductions, one unpadded example at a time, log-softmax in float64."""
    rng = random.Random(seed)
    ar_terms, mdm_sum, plans = [], 0.0, []
    for prompt, response in examples:
        size, t, p, masked, clean = reference_plan(len(response), rng)
        plans.append((size, t, p, masked, clean))
        seq, pos, ar, mdm = reference_sequence(prompt, response, size, masked, clean)
        assert sorted(pos) == list(range(len(prompt) + len(response)))
        logits = np.array(model(mx.array([seq]), mx.array([pos]))[0].astype(mx.float32), np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        ar_terms += [-logp[i, y] for i, y in ar.items()]
        mdm_sum += sum(-logp[i, y] / p / len(response) for i, y in mdm.items())
    ar_loss = sum(ar_terms) / len(ar_terms) if ar_terms else 0.0
    return ar_loss + mdm_sum / len(examples), ar_loss, mdm_sum / len(examples), plans


def make_examples(seed=0):
    """Prompts and responses of uneven lengths, so the last slot is often short."""
    rng = np.random.default_rng(seed)
    lengths = [(3, 5), (9, 13), (6, 37), (12, 70)]
    return [(rng.integers(0, 300, p).tolist(), rng.integers(0, 300, r).tolist()) for p, r in lengths]


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4, 5])
def test_loss_matches_plain_python_reference(tiny_model, seed):
    examples = make_examples(seed)
    rng = random.Random(seed)
    layouts = [layout_example(p, r, MASK, rng) for p, r in examples]
    loss, ar, mdm, ntokens = hybrid_loss(tiny_model, collate(layouts, pad_id=7))
    ref_loss, ref_ar, ref_mdm, plans = reference_loss(tiny_model, examples, seed)
    for layout, (size, t, p, masked, clean) in zip(layouts, plans):
        assert (layout.plan.slot_size, layout.plan.t, layout.plan.slot_masked, layout.plan.ar_order) == \
            (size, t, masked, clean)
        assert layout.p_mask == pytest.approx(p)
    assert ar.item() == pytest.approx(ref_ar, rel=1e-4, abs=1e-5)
    assert mdm.item() == pytest.approx(ref_mdm, rel=1e-4, abs=1e-5)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-4)
    assert ntokens.item() == sum(sum(y != IGNORE for y in x.labels) for x in layouts)


def test_layout_rebuilt_token_by_token():
    prompt, response = [1, 2, 3], list(range(100, 123))  # 23 tokens: slots of 8 → 8, 8, 7
    plan = SlotPlan(slot_size=8, t=0.5, p_mask=0.5, slot_masked=[False, True, False], ar_order=[2, 0])
    x = arrange(prompt, response, MASK, plan)
    expect_inputs = prompt + response[16:23] + response[0:8] + [MASK] * 8
    expect_labels = [IGNORE] * 3 + response[17:23] + [IGNORE] + response[1:8] + [IGNORE] + response[8:16]
    expect_pos = [0, 1, 2] + list(range(19, 26)) + list(range(3, 11)) + list(range(11, 19))
    assert x.inputs == expect_inputs
    assert x.labels == expect_labels
    assert x.positions == expect_pos
    assert x.is_mdm == [False] * 18 + [True] * 8
    assert x.response_length == 23


def test_draws_cover_slot_sizes_and_shuffle():
    rng = random.Random(0)
    sizes, shuffled = set(), False
    for _ in range(300):
        plan = draw_plan(64, rng)
        sizes.add(plan.slot_size)
        assert plan.p_mask == pytest.approx((1 - EPS) * plan.t + EPS)
        clean = [s for s, m in enumerate(plan.slot_masked) if not m]
        assert sorted(plan.ar_order) == clean
        shuffled |= plan.ar_order != clean
    assert sizes == {4, 8, 16, 32} and shuffled


def test_batch_masks_prompt_and_padding():
    rng = random.Random(3)
    layouts = [layout_example([5] * 4, list(range(10, 20)), MASK, rng),
               layout_example([6] * 9, list(range(30, 70)), MASK, rng)]
    batch = collate(layouts, pad_id=0)
    assert batch["inputs"].shape[1] % 32 == 0
    targeted = (batch["ar_mask"] + (batch["mdm_weight"] > 0)).tolist()
    assert targeted[0][:4] == [0] * 4 and targeted[1][:9] == [0] * 9  # prompt never a target
    assert all(v == 0 for v in targeted[0][14:])  # padding never a target
    assert batch["positions"][0, 14:].tolist() == list(range(14, batch["inputs"].shape[1]))


def test_padding_does_not_change_the_loss(tiny_model):
    rng = random.Random(11)
    layouts = [layout_example(p, r, MASK, rng) for p, r in make_examples(11)]
    a = hybrid_loss(tiny_model, collate(layouts, pad_id=0, pad_to=1))
    b = hybrid_loss(tiny_model, collate(layouts, pad_id=MASK, pad_to=64))
    for x, y in zip(a, b):
        assert x.item() == pytest.approx(y.item(), rel=1e-5)


def test_all_masked_and_none_masked(tiny_model):
    prompt, response = [1, 2, 3], list(range(40, 60))
    all_masked = arrange(prompt, response, MASK, SlotPlan(4, 1.0, 1.0, [True] * 5, []))
    loss, ar, mdm, _ = hybrid_loss(tiny_model, collate([all_masked]))
    assert ar.item() == 0.0 and math.isfinite(loss.item()) and mdm.item() > 0  # upstream: NaN AR
    none_masked = arrange(prompt, response, MASK, SlotPlan(4, 0.0, EPS, [False] * 5, [4, 1, 0, 3, 2]))
    loss, ar, mdm, _ = hybrid_loss(tiny_model, collate([none_masked]))
    assert mdm.item() == 0.0 and loss.item() == pytest.approx(ar.item())


def test_gradient_flows_through_per_token_rope(tiny_path):
    """Finite differences agree with autodiff through rotate_at's per-token RoPE offsets."""
    from refusion_mlx import load_model

    model = load_model(tiny_path)
    batch = collate([layout_example(p, r, MASK, random.Random(2)) for p, r in make_examples(2)])
    loss_fn = lambda m, b: hybrid_loss(m, b)[0]  # noqa: E731
    _, grads = nn.value_and_grad(model, loss_fn)(model, batch)
    name = "model.layers.0.self_attn.q_proj.weight"
    g = dict(tree_flatten(grads))[name]
    w = dict(tree_flatten(model.parameters()))[name]
    direction = mx.random.normal(w.shape, key=mx.random.key(0))
    h = 1e-3
    values = []
    for sign in (1, -1):
        model.load_weights([(name, w + sign * h * direction)], strict=False)
        values.append(loss_fn(model, batch).item())
    model.load_weights([(name, w)], strict=False)
    numeric = (values[0] - values[1]) / (2 * h)
    assert (g * direction).sum().item() == pytest.approx(numeric, rel=2e-2)
    assert mx.abs(g).max().item() > 0


def test_left_to_right_share_is_a_plain_causal_lm_loss(tiny_path):
    """ar_fraction=1: prompt + response in order, every response token (the first too) predicted
    from the tokens before it, so the loss is the mean next-token CE over the response."""
    from refusion_mlx import load_model

    model = load_model(tiny_path)
    examples = make_examples(3)
    rng = random.Random(4)
    layouts = [layout_example(p, r, MASK, rng, ar_fraction=1.0) for p, r in examples]
    for (prompt, response), x in zip(examples, layouts):
        assert x.inputs == prompt + response and x.positions == list(range(len(x.inputs)))
        assert x.labels == [IGNORE] * (len(prompt) - 1) + response + [IGNORE]
        assert not any(x.is_mdm)
    loss, ar, mdm, n = hybrid_loss(model, collate(layouts))
    expected, count = 0.0, 0
    for prompt, response in examples:
        tokens = mx.array([prompt + response])
        logp = nn.log_softmax(model(tokens)[0].astype(mx.float32), axis=-1)
        for i in range(len(prompt) - 1, len(prompt) + len(response) - 1):
            expected -= logp[i, (prompt + response)[i + 1]].item()
            count += 1
    assert mdm.item() == 0.0 and n.item() == count
    assert ar.item() == pytest.approx(expected / count, rel=1e-4)


def test_ar_fraction_mixes_layouts_and_zero_keeps_upstream_draws():
    """A share near ar_fraction is left to right; with 0 the draws are upstream's, one for one."""
    plans = [draw_plan(40, random.Random(k), ar_fraction=0.25) for k in range(400)]
    share = sum(p.left_to_right for p in plans) / len(plans)
    assert 0.18 < share < 0.32
    a, b = random.Random(9), random.Random(9)
    for _ in range(20):
        plan = draw_plan(37, a, ar_fraction=0.0)
        size, t, _, masked, clean = reference_plan(37, b)
        assert (plan.slot_size, plan.t, plan.slot_masked, plan.ar_order) == (size, t, masked, clean)
