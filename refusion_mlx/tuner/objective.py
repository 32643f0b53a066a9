"""ReFusion's training objective: autoregressive slots plus masked-diffusion slots in one pass.

Per example (upstream ``forward_process``): pick a slot size, cut the response
into slots, mask each slot with probability ``p = (1 - eps) * t + eps`` (one
``t ~ U(0, 1)`` per example). The sequence the model sees is

    prompt | unmasked slots, shuffled | masked slots, in order, all <|mask|>

with every token at its true RoPE position. Unmasked slots learn next-token
prediction inside the slot; masked slots learn to recover their own tokens,
weighted by ``1 / p`` and divided by the response length. Attention stays
causal in sequence order, so a masked slot sees the prompt and every clean slot.

That objective never asks for a token across a slot boundary from the tokens
before it (the prompt's last token and each slot's last token have no label):
upstream starts from Qwen3-8B, which already does that. A model trained from
nothing (the demo) gets it from ``ar_fraction``: that share of examples is laid
out plainly, prompt then response in order, every response token (the first
included) the label of the token before it. 0 (the default) is upstream exactly.
"""

import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import RefusionError

SLOT_SIZES = (4, 8, 16, 32)
EPS = 1e-3
IGNORE = -100


@dataclass
class SlotPlan:
    """The random decisions for one example; enough to rebuild its layout."""

    slot_size: int
    t: float
    p_mask: float
    slot_masked: List[bool]  # one flag per response slot, in response order
    ar_order: List[int]  # the unmasked slot indices, in the (shuffled) order they are laid out
    left_to_right: bool = False  # plain next-token layout (see ar_fraction)


@dataclass
class Layout:
    """One example as the model is trained on it (lists, unpadded)."""

    inputs: List[int]
    labels: List[int]  # IGNORE where there is no target
    is_mdm: List[bool]  # True on masked-slot tokens (their label is the token itself)
    positions: List[int]  # true RoPE position of every token
    p_mask: float
    response_length: int
    plan: SlotPlan


def slot_bounds(n: int, slot_size: int) -> List[range]:
    """Index ranges of the slots a response of ``n`` tokens is cut into (the last may be short)."""
    return [range(s, min(s + slot_size, n)) for s in range(0, n, slot_size)]


def draw_plan(n_response: int, rng: random.Random, slot_sizes: Sequence[int] = SLOT_SIZES,
              eps: float = EPS, t: Optional[float] = None, ar_fraction: float = 0.0) -> SlotPlan:
    """Draw slot size, t, per-slot masks and the shuffle, in upstream's order of draws.

    A given ``t`` skips its draw (evaluation spreads t evenly to steady the estimate).
    With ``ar_fraction`` > 0 one more draw comes first: whether to lay out left to right.
    """
    if ar_fraction > 0 and rng.random() < ar_fraction:
        return SlotPlan(n_response, 0.0, 1.0, [False], [0], left_to_right=True)
    slot_size = rng.choice(list(slot_sizes))
    n_slots = len(slot_bounds(n_response, slot_size))
    t = rng.random() if t is None else t
    p_mask = (1 - eps) * t + eps
    slot_masked = [rng.random() < p_mask for _ in range(n_slots)]
    ar_order = [i for i, masked in enumerate(slot_masked) if not masked]
    rng.shuffle(ar_order)
    return SlotPlan(slot_size, t, p_mask, slot_masked, ar_order)


def arrange(prompt: Sequence[int], response: Sequence[int], mask_id: int, plan: SlotPlan) -> Layout:
    """Lay out prompt, shuffled clean slots and masked slots as ``plan`` says."""
    n_prompt = len(prompt)
    if plan.left_to_right:
        tokens = list(prompt) + list(response)
        labels = [IGNORE] * len(tokens)
        for i in range(max(n_prompt - 1, 0), len(tokens) - 1):
            labels[i] = tokens[i + 1]
        return Layout(tokens, labels, [False] * len(tokens), list(range(len(tokens))), plan.p_mask,
                      len(response), plan)
    slots = slot_bounds(len(response), plan.slot_size)
    inputs, labels = list(prompt), [IGNORE] * n_prompt
    is_mdm, positions = [False] * n_prompt, list(range(n_prompt))
    for s in plan.ar_order:
        tokens = [response[j] for j in slots[s]]
        inputs += tokens
        labels += tokens[1:] + [IGNORE]  # next token inside the slot; a slot's last token has none
        is_mdm += [False] * len(tokens)
        positions += [n_prompt + j for j in slots[s]]
    for s in (i for i, masked in enumerate(plan.slot_masked) if masked):
        tokens = [response[j] for j in slots[s]]
        inputs += [mask_id] * len(tokens)
        labels += tokens
        is_mdm += [True] * len(tokens)
        positions += [n_prompt + j for j in slots[s]]
    return Layout(inputs, labels, is_mdm, positions, plan.p_mask, len(response), plan)


def layout_example(prompt: Sequence[int], response: Sequence[int], mask_id: int, rng: random.Random,
                   slot_sizes: Sequence[int] = SLOT_SIZES, eps: float = EPS,
                   t: Optional[float] = None, ar_fraction: float = 0.0) -> Layout:
    """Draw the random decisions for one example and lay it out for training."""
    if not response:
        raise RefusionError("an example has an empty response; nothing to train on")
    plan = draw_plan(len(response), rng, slot_sizes, eps, t, ar_fraction)
    return arrange(prompt, response, mask_id, plan)


def padded_length(n: int, pad_to: int = 32) -> int:
    """Round up so that batches come in few shapes (each new shape recompiles the step)."""
    return pad_to * ((n + pad_to - 1) // pad_to)


def collate(layouts: Sequence[Layout], pad_id: int = 0, pad_to: int = 32) -> Dict[str, mx.array]:
    """Right-pad layouts into a batch of arrays: what ``hybrid_loss`` consumes.

    Padding sits after every real token, so causal attention keeps it out of
    their view; it is never a target. Its positions continue the sequence, as upstream.
    """
    B, L = len(layouts), padded_length(max(len(x.inputs) for x in layouts), pad_to)
    inputs = np.full((B, L), pad_id, np.int32)
    positions = np.tile(np.arange(L, dtype=np.int32), (B, 1))
    targets = np.zeros((B, L), np.int32)
    ar_mask = np.zeros((B, L), np.float32)
    mdm_weight = np.zeros((B, L), np.float32)
    for b, x in enumerate(layouts):
        n = len(x.inputs)
        labels = np.array(x.labels)
        labelled = labels != IGNORE
        is_mdm = np.array(x.is_mdm, bool)
        inputs[b, :n] = x.inputs
        positions[b, :n] = x.positions
        targets[b, :n] = np.where(labelled, labels, 0)
        ar_mask[b, :n] = labelled & ~is_mdm
        mdm_weight[b, :n] = (labelled & is_mdm) / (x.p_mask * x.response_length)
    arrays = dict(inputs=inputs, positions=positions, targets=targets, ar_mask=ar_mask,
                  mdm_weight=mdm_weight)
    return {k: mx.array(v) for k, v in arrays.items()}


def hybrid_loss(model, batch: Dict[str, mx.array]):
    """(loss, ar_loss, mdm_loss, ntokens) for a collated batch, reduced as upstream.

    AR: mean cross-entropy over the clean-slot tokens that have a label, all
    examples pooled. MDM: sum over masked tokens of CE / (p * response length),
    divided by the batch size. Upstream's AR mean is NaN when no token has an AR
    label; here it is 0. Logits are upcast to float32 before the loss, as upstream.
    """
    logits = model(batch["inputs"], batch["positions"]).astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, batch["targets"])
    ar_mask, mdm_weight = batch["ar_mask"], batch["mdm_weight"]
    n_ar = ar_mask.sum()
    ar_loss = (ce * ar_mask).sum() / mx.maximum(n_ar, 1)
    mdm_loss = (ce * mdm_weight).sum() / batch["inputs"].shape[0]
    ntokens = n_ar + (mdm_weight > 0).sum()
    return ar_loss + mdm_loss, ar_loss, mdm_loss, ntokens
