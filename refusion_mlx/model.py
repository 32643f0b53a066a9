"""ReFusion's network: Qwen3 with explicit position ids and attention causal in cache order.

The weights are plain Qwen3 (HF names kept), so a folder we save also loads with
``mlx_lm.load`` as ``qwen3``. What ReFusion adds is in how the model is called:
every token carries its own RoPE position (slots are committed out of order), and
the caller says where the new keys go in the cache and what each query may see
(``kv.CacheView``); ``kv.attention`` attends accordingly.
"""

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_linear
from mlx_lm.models.base import BaseModelArgs
from mlx_lm.models.qwen3 import MLP  # the same SwiGLU block; nothing of ours to add

from .errors import RefusionError
from .kv.attention import attention_mask, scaled_dot_product_attention

SUPPORTED_ROPE_TYPES = ("default", "linear")


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    rms_norm_eps: float
    vocab_size: int
    num_key_value_heads: Optional[int] = None
    max_position_embeddings: int = 40960
    rope_theta: float = 1000000.0
    head_dim: Optional[int] = None
    tie_word_embeddings: bool = False
    rope_scaling: Optional[Dict[str, Union[float, str]]] = None
    attention_bias: bool = False
    mask_token_id: Optional[int] = None
    eos_token_id: Optional[Union[int, list]] = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise RefusionError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple "
                f"of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise RefusionError(
                f"rope_scaling type {self.rope_type!r} is not supported "
                f"(supported: none, linear)"
            )

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type") or self.rope_scaling.get("type") or "default"

    @property
    def rope_scale(self) -> float:
        """Multiplier on positions: 1/factor for linear scaling."""
        if self.rope_type == "linear":
            return 1.0 / float(self.rope_scaling["factor"])
        return 1.0


def check_shardable(args: ModelArgs, ranks: int):
    """Raise unless ``ranks`` splits the KV heads (hence the query heads) and the MLP evenly."""
    if args.num_key_value_heads % ranks:
        raise RefusionError(
            f"{ranks} ranks cannot split the model's {args.num_key_value_heads} KV heads evenly; "
            f"run on a number of ranks that divides {args.num_key_value_heads}")
    if args.intermediate_size % ranks:
        raise RefusionError(f"{ranks} ranks cannot split the MLP's {args.intermediate_size} hidden units evenly")


class RotaryEmbedding(nn.Module):
    """RoPE for explicit per-token positions (Qwen's layout: the two halves of each head rotate).

    ``__call__`` returns the rotation to apply to queries and keys in every layer.
    Positions given as one ``int`` offset (a contiguous run, as in left-to-right
    decoding) use MLX's fused ``mx.fast.rope``. Arbitrary positions (slots
    committed out of order, with gaps) use cos/sin tables built once per forward
    and one fused kernel per rotation.
    """

    def __init__(self, head_dim: int, base: float, scale: float = 1.0):
        super().__init__()
        self.head_dim, self.base, self.scale = head_dim, base, scale
        # Underscore: a constant, not a parameter to load or train.
        self._inv_freq = scale * base ** (-mx.arange(0, head_dim, 2, dtype=mx.float32) / head_dim)

    def __call__(self, positions: Union[int, mx.array]) -> Callable[[mx.array], mx.array]:
        if isinstance(positions, int):
            return partial(mx.fast.rope, dims=self.head_dim, traditional=False, base=self.base,
                           scale=self.scale, offset=positions)
        angles = positions.astype(mx.float32)[:, None, :, None, None] * self._inv_freq  # (B, 1, L, 1, D/2)
        cos, sin = mx.cos(angles), mx.sin(angles)
        zero = mx.zeros_like(sin)
        # Tables over (first half, second half): x1*cos - x2*sin and x2*cos + x1*sin.
        sin_of_second = mx.concatenate([-sin, zero], axis=-2)
        sin_of_first = mx.concatenate([zero, sin], axis=-2)
        return partial(rotate_halves, cos=cos, sin_of_first=sin_of_first, sin_of_second=sin_of_second)


@partial(mx.compile, shapeless=True)
def _rotate(x, first, second, cos, sin_of_first, sin_of_second):
    return (x * cos + second * sin_of_second + first * sin_of_first).astype(x.dtype)


def rotate_halves(x: mx.array, cos, sin_of_first, sin_of_second) -> mx.array:
    """Rotate ``x`` (B, H, L, D) by per-token angles, in one fused elementwise kernel."""
    B, H, L, D = x.shape
    halves = x.reshape(B, H, L, 2, D // 2)
    out = _rotate(halves, halves[..., :1, :], halves[..., 1:, :], cos, sin_of_first, sin_of_second)
    return out.reshape(B, H, L, D)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim = args.hidden_size
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        head_dim = args.head_dim
        self.scale = head_dim**-0.5
        bias = args.attention_bias

        self.q_proj = nn.Linear(dim, self.n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * head_dim, dim, bias=bias)
        self.q_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(head_dim, eps=args.rms_norm_eps)

    def __call__(self, x, rope, mask=None, cache=None, view=None):
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

        q, k = rope(q), rope(k)
        if cache is not None:
            k, v = cache.store(k, v, view)
        out = scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask, view=view)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.self_attn = Attention(args)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x, rope, mask=None, cache=None, view=None):
        h = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, view)
        return h + self.mlp(self.post_attention_layernorm(h))


class Qwen3Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.rope = RotaryEmbedding(args.head_dim, args.rope_theta, args.rope_scale)

    def __call__(self, inputs, positions, cache=None, view=None):
        h = self.embed_tokens(inputs)
        mask = attention_mask(view, inputs.shape[1], h.dtype)
        rope = self.rope(positions)
        layer_caches = cache.layers if cache is not None else [None] * len(self.layers)
        for layer, layer_cache in zip(self.layers, layer_caches):
            h = layer(h, rope, mask, layer_cache, view)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Qwen3Model(args)
        self.group = None  # the tensor-parallel group once ``shard`` has split the layers
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self,
        inputs: mx.array,
        positions: Optional[mx.array] = None,
        cache: Optional[Any] = None,
        view: Optional[Any] = None,
        last: Optional[int] = None,
        wanted: Optional[mx.array] = None,
    ) -> mx.array:
        """Logits for ``inputs`` (B, L) at RoPE ``positions`` (B, L; default 0..L-1).

        ``positions`` may also be one ``int``: the tokens sit at that position and after.

        With a ``cache`` (``kv.SlotCache``, or a batch's ``kv.BatchCache``), ``view`` says where the new keys
        are written and which cached entries each query attends to. ``last``
        limits the logits to the last tokens (the vocabulary projection of a
        long prompt is costly and rarely needed); ``wanted`` limits them to the
        tokens at these indices instead.
        """
        if positions is None:
            positions = 0
        out = self.model(inputs, positions, cache, view)
        if wanted is not None:
            out = out[:, wanted]
        elif last is not None:
            out = out[:, -last:]
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(out)
        return self.lm_head(out)

    def shard(self, group: mx.distributed.Group):
        """Split every layer across ``group``'s ranks (tensor parallelism, as mlx-lm's Qwen3).

        Each rank keeps ``1/N`` of the query and KV heads and of the MLP's hidden units:
        q/k/v and gate/up become all-to-sharded linears, o_proj and down_proj
        sharded-to-all ones (one ``all_sum`` each, so two per layer per call). The
        embedding, the norms and the head stay whole on every rank, so after the sums
        every rank holds the same hidden states and computes the same logits. The slot
        cache follows: it is allocated from the keys' shape, i.e. this rank's KV heads.
        Quantized layers are split the same way (``shard_linear`` keeps them quantized).
        """
        N = group.size()
        if N == 1:
            return
        if self.group is not None:
            raise RefusionError("the model is already sharded")
        check_shardable(self.args, N)
        for layer in self.layers:
            for name, linear in (("o_proj", layer.self_attn.o_proj), ("down_proj", layer.mlp.down_proj)):
                group_size = getattr(linear, "group_size", None)  # quantized: rows cut across ranks
                inputs = linear.weight.shape[1] * 32 // linear.bits if group_size else 0
                if group_size and (inputs // N) % group_size:
                    raise RefusionError(
                        f"{N} ranks would cut {name}'s quantization groups of {group_size} "
                        f"({inputs} inputs, {inputs // N} per rank); quantize with a group size that "
                        f"divides {inputs // N}, or run on fewer ranks")
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attn, name, shard_linear(getattr(attn, name), "all-to-sharded", group=group))
            attn.o_proj = shard_linear(attn.o_proj, "sharded-to-all", group=group)
            attn.n_heads //= N
            attn.n_kv_heads //= N
            mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
            mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
            mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)
        self.group = group  # not an array: a plain attribute, not a parameter

    def sanitize(self, weights):
        """Drop what our module tree has no place for (tied heads, rotary buffers)."""
        if self.args.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        return {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}

    @property
    def layers(self):
        return self.model.layers
