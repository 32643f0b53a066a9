"""Attention over the slot cache, dispatched in one place so the model stays plain Qwen3.

A forward's ``view`` (``layout.CacheView`` for one sequence, ``batch.BatchView`` for a batch)
says which keys each query sees. ``attention_mask`` turns it into what MLX's fused attention
takes, once per forward; ``scaled_dot_product_attention`` picks how to attend: sequences packed
in one row (each attends to its own cache row), queries padded to a mask with more rows (a
shape the backend has seen), or one plain fused call.
"""

from typing import Union

import mlx.core as mx
import numpy as np


def attention_mask(view, length: int, dtype) -> Union[None, str, mx.array]:
    """The mask for ``length`` new tokens: None, ``"causal"``, or an additive array in ``dtype``.

    Without a view the tokens attend causally to themselves (a plain forward).
    A boolean mask becomes additive here, once, not in every layer.
    """
    if view is None:
        return "causal" if length > 1 else None
    mask = view.mask
    if isinstance(mask, np.ndarray):
        mask = mx.array(mask)
    if isinstance(mask, mx.array) and mask.dtype == mx.bool_:
        mask = mx.where(mask, mx.array(0, dtype), mx.array(-mx.inf, dtype))
    return mask


def scaled_dot_product_attention(q: mx.array, k: mx.array, v: mx.array, *, scale: float, mask,
                                 view=None) -> mx.array:
    """Attention of queries (B, H, L, D) over keys/values, as ``view`` lays them out."""
    packed = getattr(view, "attend", None)
    if packed is not None:  # a batch packed in one row: each sequence attends to its own keys
        return packed(q, k, v, scale=scale)
    L = q.shape[2]
    if isinstance(mask, mx.array) and mask.shape[-2] > L:
        # More mask rows than queries: pad the queries, so attention sees a shape it has seen.
        q = mx.pad(q, [(0, 0), (0, 0), (0, mask.shape[-2] - L), (0, 0)])
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)[:, :, :L]
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
