"""A forward's cost from first principles: FLOP per token, weight bytes, a roofline (bandwidth and
FLOP rate) fitted to measured forwards or taken from a device's published rates, and a measured cost
curve moved to another device. ``break_even`` uses these to estimate devices it cannot run."""

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

# Apple GPUs: memory bandwidth as Apple publishes it; FP16 FLOP rates are third-party figures
# (Apple publishes none for M3/M4), so every number derived from them is an estimate.
DEVICES: Dict[str, Tuple[float, float]] = {  # name: (GB/s, TFLOP/s)
    "M4 (10-core GPU)": (120, 4.3),
    "M4 Pro (20-core GPU)": (273, 8.6),
    "M4 Max (40-core GPU)": (546, 18.0),
    "M3 Ultra (80-core GPU)": (819, 28.0),
}


@dataclass(frozen=True)
class Roofline:
    """A forward of n tokens costs max(weights / bandwidth, n * flops per token / FLOP rate) + fixed."""

    bandwidth: float  # bytes/s
    flops: float  # FLOP/s
    fixed: float = 0.0  # seconds every call pays (host work, launches)

    def seconds(self, weight_bytes: float, flop: float) -> float:
        return max(weight_bytes / self.bandwidth, flop / self.flops) + self.fixed


def fit_roofline(times: Dict[int, float], weight_bytes: float, flop_per_token: float) -> Roofline:
    """The roofline of measured plain forwards (``times``: tokens fed -> seconds): the one-token
    forward sets the bandwidth (all of it counted as reading weights), the widest the FLOP rate (a
    lower bound of it where even the widest forward is bandwidth-bound)."""
    widest = max(times)
    return Roofline(weight_bytes / times[1], widest * flop_per_token / times[widest])


def flop_per_token(args, context: int) -> float:
    """Forward FLOP per fed token: 2 per weight of the layers and LM head, plus attention over
    ``context`` keys (scores and values)."""
    h, inter, L = args.hidden_size, args.intermediate_size, args.num_hidden_layers
    q = args.num_attention_heads * args.head_dim
    kv = args.num_key_value_heads * args.head_dim
    layer = h * (2 * q + 2 * kv) + 3 * h * inter
    return 2 * (L * layer + h * args.vocab_size) + 4 * L * q * context


def estimated_tokens_per_second(calls: Sequence[Tuple[int, int, Optional[int]]], tokens: int, args,
                                weight_bytes: float, roof: Roofline) -> float:
    """Tokens/s if each recorded call (tokens fed, context, logits kept) cost what ``roof`` says."""
    total = sum(roof.seconds(weight_bytes, n * flop_per_token(args, context + n)) for n, context, _ in calls)
    return tokens / total


def estimated_ar_tokens_per_second(args, weight_bytes: float, roof: Roofline, context: int) -> float:
    return 1 / roof.seconds(weight_bytes, flop_per_token(args, context))


@dataclass(frozen=True)
class ScaledCurve:
    """A measured cost curve moved to another device: a forward of n tokens there costs its one-token
    step times what a forward of ``n * stretch`` tokens cost here relative to one token, where
    ``stretch`` = this device's ridge / that device's (the fed tokens past which compute, not the
    weights' reading, bounds a forward). So the measured curve's soft bend is kept, at the other
    device's ridge. Linear past the widest forward measured."""

    times: Tuple[Tuple[int, float], ...]  # (tokens fed, seconds) measured here
    stretch: float
    step: float  # a one-token forward there (seconds)

    def seconds(self, n: int) -> float:
        ns, ts = np.array([p[0] for p in self.times], float), np.array([p[1] for p in self.times])
        x = n * self.stretch
        t = np.interp(x, ns, ts) if x <= ns[-1] else ts[-1] + (x - ns[-1]) * (ts[-1] - ts[-2]) / (ns[-1] - ns[-2])
        return self.step * t / ts[0]


def ridge(roof: Roofline, weight_bytes: float, flop_per_token: float) -> float:
    """Fed tokens at which a forward's FLOP take as long as reading the weights."""
    return weight_bytes / roof.bandwidth * roof.flops / flop_per_token


def shape_weight_bytes(args, bits: Optional[int], group_size: int) -> float:
    """Bytes of a shape's weights in bfloat16, or quantized (``nn.quantize``: every Linear and the
    embedding, with a bfloat16 scale and bias per group)."""
    h, inter, L, V = args.hidden_size, args.intermediate_size, args.num_hidden_layers, args.vocab_size
    q = args.num_attention_heads * args.head_dim
    kv = args.num_key_value_heads * args.head_dim
    params = L * (h * (2 * q + 2 * kv) + 3 * h * inter) + V * h * (1 if args.tie_word_embeddings else 2)
    return params * (bits / 8 + 4 / group_size if bits else 2)
