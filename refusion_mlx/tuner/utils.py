"""Getting a model ready to train: LoRA/DoRA layers or unfrozen blocks, gradient checkpointing,
the optimizer. Layers, optimizers and schedules are mlx-lm's."""

from functools import lru_cache
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from ..errors import RefusionError

OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "muon": optim.Muon, "sgd": optim.SGD,
              "adafactor": optim.Adafactor}
# Upstream train.py: PEFT LoRA r=8, alpha=16, dropout 0.01 on q/k/v/o, every layer.
LORA_DEFAULTS = {"rank": 8, "alpha": 16.0, "dropout": 0.01,
                 "keys": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def resolve_keys(model, keys: Sequence[str]) -> list:
    """Turn short names (``q_proj``) into paths inside a block (``self_attn.q_proj``), as mlx-lm wants."""
    linear = (nn.Linear, nn.QuantizedLinear)
    names = [n for n, m in model.layers[0].named_modules() if isinstance(m, linear)]
    resolved = []
    for key in keys:
        matches = [n for n in names if n == key or n.endswith("." + key)]
        if not matches:
            have = ", ".join(sorted(names))
            raise RefusionError(f"LoRA key {key!r} matches no linear layer (have: {have})")
        resolved += [n for n in matches if n not in resolved]
    return resolved


def prepare_model(model, fine_tune_type: str, num_layers: int, lora_parameters: Optional[dict]) -> Optional[dict]:
    """Freeze the base, then add LoRA/DoRA layers or unfreeze blocks for full fine-tuning.

    Returns the LoRA parameters as applied (keys resolved to paths), or None for a full run
    (as mlx-lm: its adapter_config has no LoRA block).
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n = len(model.layers)
    if num_layers == 0 or num_layers < -1 or num_layers > n:
        raise RefusionError(f"--num-layers must be -1 (all) or 1..{n}, got {num_layers}")
    model.freeze()
    if fine_tune_type == "full":
        if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
            raise RefusionError("full fine-tuning needs an unquantized model (use lora or dora for QLoRA)")
        if num_layers == -1:
            model.unfreeze()  # everything, embeddings and head too: as upstream, and what training from scratch needs
        else:
            for layer in model.layers[-num_layers:]:
                layer.unfreeze()
        return None
    lora_parameters = {**lora_parameters, "keys": resolve_keys(model, lora_parameters["keys"])}
    try:
        linear_to_lora_layers(model, num_layers, lora_parameters, use_dora=fine_tune_type == "dora")
    except (ValueError, KeyError) as e:
        raise RefusionError(f"cannot add {fine_tune_type} layers: {e}") from None
    return lora_parameters


@lru_cache(maxsize=None)
def _checkpointed(cls):
    """A subclass of block class ``cls`` whose forward pass is recomputed during backprop."""

    def __call__(self, x, positions, mask=None, cache=None, view=None):
        def inner(params, x, positions):
            self.update(params)
            return cls.__call__(self, x, positions, mask, cache, view)

        return mx.checkpoint(inner)(self.trainable_parameters(), x, positions)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__})


def checkpoint_blocks(model):
    """Gradient checkpointing on this model's blocks only (mlx-lm's patches the class for everyone)."""
    for layer in model.layers:
        layer.__class__ = _checkpointed(type(layer))


def build_optimizer(name: str, learning_rate: float, lr_schedule: Optional[dict] = None,
                    optimizer_config: Optional[dict] = None):
    """The optimizer with a constant rate or an ``lr_schedule`` (mlx-lm's build_schedule)."""
    from mlx_lm.tuner.utils import build_schedule

    name = name.lower()
    try:
        lr = build_schedule(lr_schedule) if lr_schedule else learning_rate
        return OPTIMIZERS[name](learning_rate=lr, **(optimizer_config or {}).get(name, {}))
    except (AttributeError, KeyError, TypeError, IndexError) as e:
        raise RefusionError(f"bad optimizer or lr_schedule settings: {e}") from None


