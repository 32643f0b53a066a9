"""A deliberately plain plan-and-infill decoder, written from upstream's semantics (docs/decoding.md).

No KV cache at all: every forward recomputes the whole sequence from scratch, and
each infill row is its own sequence. What a cache would remember is kept as an
explicit attention mask instead: a committed token keeps seeing exactly what it
saw when its KV was made (an infilled slot saw the prefix and its own row only,
never its sibling rows). Slow and obviously right; the production decoder must
match it token for token.
"""

from types import SimpleNamespace

import mlx.core as mx
import numpy as np


class Context:
    """Committed tokens in commit order, their positions, and what each one attends to."""

    def __init__(self, prompt):
        self.tokens, self.positions = list(prompt), list(range(len(prompt)))
        self.sees = [set(range(i)) for i in range(len(prompt))]

    def add(self, token, position, sees):
        self.tokens.append(int(token))
        self.positions.append(int(position))
        self.sees.append(set(sees))


def logits_after(model, ctx, new, new_pos):
    """Logits (float64 numpy) of ``new`` tokens placed after the whole context, causal among themselves."""
    n_ctx, n = len(ctx.tokens), len(new)
    mask = np.zeros((n_ctx + n, n_ctx + n), dtype=bool)
    for i, sees in enumerate(ctx.sees):
        mask[i, list(sees) + [i]] = True
    mask[n_ctx:, :n_ctx] = True
    mask[n_ctx:, n_ctx:] = np.tril(np.ones((n, n), dtype=bool))
    tokens = mx.array(np.array(ctx.tokens + [int(t) for t in new], dtype=np.int32))[None]
    pos = mx.array(np.array(ctx.positions + [int(p) for p in new_pos], dtype=np.int32))[None]
    out = model(tokens, pos, view=SimpleNamespace(mask=mx.array(mask)))[0].astype(mx.float32)
    return np.array(out, dtype=np.float64)[n_ctx:]


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def ar_probs(logits, tokens):
    """p of each token under the previous row's logits; row 0 uses its own."""
    prev = np.concatenate([logits[:1], logits[:-1]])
    return softmax(prev)[np.arange(len(tokens)), tokens]


def reference_generate(model, prompt, gen_length, slot_size, blocks, slot_threshold,
                       token_threshold, mask_id, eos_ids):
    """Returns (generated tokens in position order cut after the first EOS, tpf)."""
    S, P = slot_size, len(prompt)
    G = -(-gen_length // S) * S
    eos_ids = set(eos_ids)
    ctx = Context(prompt)
    tpf_sum, iterations, finished = 0.0, 0, False
    block = G // blocks
    for b in range(blocks):
        pending = [P + s for s in range(b * block, (b + 1) * block, S)]  # slot start positions
        while pending:
            iterations += 1
            # plan
            plan_pos = [p + j for p in pending for j in range(S)]
            logits = logits_after(model, ctx, [mask_id] * len(plan_pos), plan_pos)
            x0 = logits.argmax(-1).reshape(len(pending), S)
            conf = softmax(logits)[np.arange(len(plan_pos)), logits.argmax(-1)].reshape(-1, S)[:, 0]
            chosen = [i for i in range(len(pending)) if conf[i] > slot_threshold] or [int(conf.argmax())]
            drafts = x0[chosen]
            starts = [pending[i] for i in chosen]
            pos = np.array([[s + j for j in range(S)] for s in starts])
            # global verify
            vlog = logits_after(model, ctx, drafts.reshape(-1), pos.reshape(-1))
            acc = (ar_probs(vlog, drafts.reshape(-1)) > token_threshold).reshape(drafts.shape)
            acc[:, 0] = True
            flat = acc.reshape(-1)
            prefix = len(flat) if flat.all() else int(np.argmin(flat))
            flat_tokens = drafts.reshape(-1)
            eos_at = next((i for i in range(prefix) if flat_tokens[i] in eos_ids), None)
            if eos_at is not None or prefix >= S:
                n = eos_at // S + 1 if eos_at is not None else prefix // S
                keep = eos_at + 1 if eos_at is not None else n * S
                for t, p in zip(flat_tokens[:keep], pos.reshape(-1)[:keep]):
                    ctx.add(t, p, range(len(ctx.tokens)))
                done = set(starts[:n])
                if eos_at is not None:
                    finished = True
                    done |= {p for p in pending if p >= starts[n - 1]}
                pending = [p for p in pending if p not in done]
                tpf_sum += S * n / 2
                continue
            # infill: each row is its own sequence after the committed one
            k = len(chosen)
            rows = drafts.copy()
            tags = np.cumprod(acc, axis=1).astype(int)
            a, rounds, eos_row = 0, 0, None
            while not tags.all() and rounds < S:
                rounds += 1
                new_rows, new_tags = rows.copy(), tags.copy()
                for r in range(len(rows)):
                    masked = np.concatenate([rows[r, :a], np.where(tags[r, a:] == 1, rows[r, a:], mask_id)])
                    d = logits_after(model, ctx, masked, pos[r])[a:].argmax(-1)
                    filled = np.concatenate([rows[r, :a], np.where(tags[r, a:] == 1, rows[r, a:], d)])
                    p = ar_probs(logits_after(model, ctx, filled, pos[r]), filled)[a:]
                    filled = filled[a:]
                    forced = np.concatenate([[1], tags[r, a:][:-1]]) == 1
                    new_rows[r, a:] = filled
                    new_tags[r, a:] = np.cumprod((p > token_threshold) | forced)
                rows, tags = new_rows, new_tags
                hit = [r for r in range(len(rows))
                       if any(t in eos_ids and g for t, g in zip(rows[r, a:], tags[r, a:]))]
                if hit:
                    eos_row = hit[0]
                    rows, tags, pos = rows[:eos_row + 1], tags[:eos_row + 1], pos[:eos_row + 1]
                    tags[eos_row] = 1
                n_new = min(tags[r, a:].sum() for r in range(len(rows)))
                a += n_new - 1 if not tags.all() else n_new
            base = len(ctx.tokens)
            stop = False
            for r in range(len(rows)):
                for j in range(S):
                    # An infilled token saw the prefix and its own row, not the rows before it.
                    ctx.add(rows[r, j], pos[r, j], list(range(base)) + [base + r * S + i for i in range(j)])
                    if rows[r, j] in eos_ids:
                        stop = True
                        break
                if stop:
                    break
            done = set(starts)
            if eos_row is not None:
                finished = True
                done |= {p for p in pending if p >= starts[eos_row]}
            pending = [p for p in pending if p not in done]
            tpf_sum += S * k / (2 * min(rounds + 1, S))
        if finished:
            break
    generated = sorted(zip(ctx.positions[P:], ctx.tokens[P:]))
    tokens = []
    for _, t in generated:
        tokens.append(t)
        if t in eos_ids:
            break
    return tokens, tpf_sum / iterations
