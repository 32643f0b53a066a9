"""A stand-in model whose predictions are scripted per position, to steer the decoder's control flow.

A masked input at position p predicts ``text[p]``; a real token at position p
predicts ``text[p + 1]`` (left to right). How sure it is comes from
``mask_prob[p]`` and ``next_prob[p + 1]``. Context is ignored, so caching plays no
part: these tests are about which slots get planned, accepted, infilled, dropped.
"""

import math
from types import SimpleNamespace

import mlx.core as mx
import numpy as np


class ScriptedModel:
    def __init__(self, text, mask_prob, next_prob, vocab_size=32, mask_id=31, eos_id=30):
        self.text, self.mask_prob, self.next_prob = list(text), list(mask_prob), list(next_prob)
        self.args = SimpleNamespace(vocab_size=vocab_size, max_position_embeddings=4096,
                                    mask_token_id=mask_id, eos_token_id=eos_id)
        self.layers = []
        self.calls = 0

    def _logits(self, target, prob):
        row = np.zeros(self.args.vocab_size, dtype=np.float32)
        # softmax prob of ``target`` is exactly ``prob`` with all other logits at 0.
        row[target] = math.log(prob * (self.args.vocab_size - 1) / (1 - prob))
        return row

    def __call__(self, inputs, positions=None, cache=None, view=None, last=None):
        self.calls += 1
        tokens = np.array(inputs)[0]
        # One int: a contiguous run starting there (the model's fast RoPE path).
        pos = positions + np.arange(tokens.size) if isinstance(positions, int) else np.array(positions)[0]
        rows = []
        for t, p in zip(tokens, pos):
            if t == self.args.mask_token_id:
                rows.append(self._logits(self.text[p], self.mask_prob[p]))
            else:
                q = min(p + 1, len(self.text) - 1)
                rows.append(self._logits(self.text[q], self.next_prob[q]))
        logits = mx.array(np.stack(rows))[None]
        return logits if last is None else logits[:, -last:]
