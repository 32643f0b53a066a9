"""Training mechanics for ``refusion_mlx.lora``: adapters on the model, batches, the loop, saving and resuming.

Saves are atomic (temporary file + rename) and record their step; data order,
slot layouts and dropout depend only on (seed, step), so a resumed run continues
exactly where the interrupted one stopped.
"""
import json
import os
import random
import re
import time
from functools import lru_cache, partial
from pathlib import Path
from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..errors import RefusionError
from .objective import collate, hybrid_loss, layout_example

OPTIMIZERS = {"adam": optim.Adam, "adamw": optim.AdamW, "muon": optim.Muon, "sgd": optim.SGD,
              "adafactor": optim.Adafactor}
ADAPTER_FILE = "adapters.safetensors"
STATE_FILE = "training_state.safetensors"  # optimizer moments, so a resume continues exactly


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


def prepare_model(model, args):
    """Freeze the base, then add LoRA/DoRA layers or unfreeze blocks for full fine-tuning."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n = len(model.layers)
    if args.num_layers == 0 or args.num_layers < -1 or args.num_layers > n:
        raise RefusionError(f"--num-layers must be -1 (all) or 1..{n}, got {args.num_layers}")
    model.freeze()
    if args.fine_tune_type == "full":
        if any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
            raise RefusionError("full fine-tuning needs an unquantized model (use lora or dora for QLoRA)")
        if args.num_layers == -1:
            model.unfreeze()  # everything, embeddings and head too: as upstream, and what training from scratch needs
        else:
            for layer in model.layers[-args.num_layers:]:
                layer.unfreeze()
        args.lora_parameters = None  # as mlx-lm: a full run's adapter_config has no LoRA block
        return
    args.lora_parameters["keys"] = resolve_keys(model, args.lora_parameters["keys"])
    try:
        linear_to_lora_layers(model, args.num_layers, args.lora_parameters,
                              use_dora=args.fine_tune_type == "dora")
    except (ValueError, KeyError) as e:
        raise RefusionError(f"cannot add {args.fine_tune_type} layers: {e}") from None


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


def atomic_save(path: Path, arrays: dict, step: int):
    """Write safetensors next to ``path`` then rename: a crash never leaves a torn file."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays, metadata={"step": str(step)})
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj: dict):
    """JSON written to a temp file and renamed into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=4))
    os.replace(tmp, path)


def adapter_config(args) -> dict:
    """adapter_config.json in mlx-lm's layout (what ``load_adapters`` reads) plus our run's options."""
    keep = ["model", "data", "fine_tune_type", "num_layers", "lora_parameters", "optimizer", "seed",
            "batch_size", "iters", "learning_rate", "lr_schedule", "max_seq_length", "ar_fraction",
            "grad_accumulation_steps"]
    config = {k: getattr(args, k) for k in keep}
    config["objective"] = "refusion-hybrid-ar-mdm"
    return config


def save_adapters(adapter_dir: Path, model, optimizer, step: int, numbered: bool):
    """adapters.safetensors (+ a numbered copy) and the training state, each written atomically."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    atomic_save(adapter_dir / ADAPTER_FILE, weights, step)
    if numbered:
        atomic_save(adapter_dir / f"{step:07d}_{ADAPTER_FILE}", weights, step)
    atomic_save(adapter_dir / STATE_FILE, dict(tree_flatten(optimizer.state)), step)


def saved_step(path: Path, metadata: dict) -> int:
    """The step an adapter file was saved at: its metadata, else a ``0000100_`` name prefix."""
    if "step" in metadata:
        return int(metadata["step"])
    found = re.match(r"(\d+)_", path.name)
    if found:
        return int(found.group(1))
    print(f"[WARNING] {path.name} does not record its step; counting from 0")
    return 0


def resume(model, optimizer, path: str) -> int:
    """Load adapter weights (and the training state saved with them); return their step."""
    path = Path(path)
    if not path.is_file():
        raise RefusionError(f"--resume-adapter-file not found: {path}")
    try:
        weights, metadata = mx.load(str(path), return_metadata=True)
    except (ValueError, RuntimeError, OSError) as e:
        raise RefusionError(f"cannot read {path}: {e}") from None
    trainable = dict(tree_flatten(model.trainable_parameters()))
    for name, w in weights.items():
        if name not in trainable or trainable[name].shape != w.shape:
            raise RefusionError(f"{path.name} does not fit this run ({name}); same --fine-tune-type, "
                                "--num-layers and LoRA rank/keys as the run that saved it?")
    model.load_weights(list(weights.items()), strict=False)
    step = saved_step(path, metadata)
    restore_state(optimizer, path.parent / STATE_FILE, step)
    print(f"Resuming from {path} at step {step}")
    return step


def restore_state(optimizer, state_file: Path, step: int):
    """Optimizer moments when saved at the same step; otherwise only the step count."""
    state, metadata = mx.load(str(state_file), return_metadata=True) if state_file.exists() else ({}, {})
    if metadata.get("step") != str(step):
        if state_file.exists():
            print(f"[WARNING] {state_file.name} is from another step; optimizer moments start afresh")
        optimizer.state["step"] = mx.array(step, mx.uint64)  # schedules continue where they were
        return
    restored = tree_unflatten(list(state.items()))
    # Hyper-parameters (learning_rate, ...) come from this run's flags, not the saved run's
    restored.update({k: v for k, v in optimizer.state.items() if k != "step" and isinstance(v, mx.array)})
    optimizer.state = restored


def build_optimizer(args):
    """The optimizer with a constant rate or the YAML ``lr_schedule`` (mlx-lm's build_schedule)."""
    from mlx_lm.tuner.utils import build_schedule

    name = args.optimizer.lower()
    try:
        lr = build_schedule(args.lr_schedule) if args.lr_schedule else args.learning_rate
        return OPTIMIZERS[name](learning_rate=lr, **(args.optimizer_config or {}).get(name, {}))
    except (AttributeError, KeyError, TypeError, IndexError) as e:
        raise RefusionError(f"bad optimizer or lr_schedule settings: {e}") from None


def length_batches(examples, batch_size: int) -> list:
    """Index batches of similar lengths (less padding); the last one may be smaller."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def batch_for_step(batches: list, step: int, seed: int) -> list:
    """Step ``step``'s batch: each epoch visits every batch once, in a seeded order.

    A function of (seed, step) only, so a resumed run sees exactly the data the
    uninterrupted run would have.
    """
    epoch, k = divmod(step - 1, len(batches))
    order = list(range(len(batches)))
    random.Random(f"{seed}:epoch:{epoch}").shuffle(order)
    return batches[order[k]]


def make_batch(examples, indices, mask_id: int, pad_id: int, rng: random.Random, ts=None,
               ar_fraction: float = 0.0):
    """Lay out and collate the examples at ``indices`` (at given t's, if any); count their tokens."""
    ts = ts or [None] * len(indices)
    layouts = [layout_example(examples[i].prompt, examples[i].response, mask_id, rng, t=t,
                              ar_fraction=ar_fraction)
               for i, t in zip(indices, ts)]
    return collate(layouts, pad_id), sum(len(x.inputs) for x in layouts)


def evaluate(model, examples, batch_size: int, num_batches: int, mask_id: int, pad_id: int, seed: int,
             ar_fraction: float = 0.0):
    """Mean (loss, AR, MDM) over held-out batches.

    Layouts are seeded, so evaluations compare; t is spread evenly over the
    examples ((k + 0.5) / n) rather than drawn, which estimates the same
    expected loss with far less noise on a small held-out set.
    """
    model.eval()
    batches = length_batches(examples, batch_size)
    if num_batches != -1:
        batches = batches[:num_batches]
    n = sum(len(b) for b in batches)
    if n == 0:
        raise RefusionError("no held-out batches to evaluate (--val-batches/--test-batches 0?)")
    totals, seen = mx.zeros(3), 0
    for k, indices in enumerate(batches):
        ts = [(seen + j + 0.5) / n for j in range(len(indices))]
        seen += len(indices)
        batch, _ = make_batch(examples, indices, mask_id, pad_id, random.Random(f"{seed}:eval:{k}"), ts,
                              ar_fraction)
        loss, ar, mdm, _ = hybrid_loss(model, batch)
        totals = totals + mx.stack([loss, ar, mdm])
        mx.eval(totals)
    return (totals / len(batches)).tolist()


def make_step(model, optimizer, accumulate: int):
    """One compiled training step: loss, gradients, and (every ``accumulate`` steps) an update."""
    loss_and_grad = nn.value_and_grad(model, hybrid_loss)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, prev_grad, do_update):
        (loss, ar, mdm, ntokens), grad = loss_and_grad(model, batch)
        if prev_grad is not None:
            grad = tree_map(lambda a, b: a + b, grad, prev_grad)
        if do_update:
            grad = average_gradients(grad)
            if accumulate > 1:
                grad = tree_map(lambda g: g / accumulate, grad)
            optimizer.update(model, grad)
            grad = None
        return mx.stack([loss, ar, mdm]), ntokens, grad

    return step, state


def report_train(it: int, args, sums, steps: int, tokens: int, seconds: float, optimizer, trained: int):
    """One line per report: losses, rate, throughput, memory."""
    loss, ar, mdm = (sums / steps).tolist()
    lr = optimizer.learning_rate.item()
    print(f"Iter {it}/{args.iters}: train loss {loss:.3f} (AR {ar:.3f}, MDM {mdm:.3f}), lr {lr:.3e}, "
          f"it/s {steps / seconds:.3f}, tokens/s {tokens / seconds:.1f}, trained tokens {trained}, "
          f"peak mem {mx.get_peak_memory() / 1e9:.3f} GB", flush=True)


def validate(model, it: int, args, valid_set, mask_id: int, pad_id: int):
    """Validation loss line; back to training mode afterwards."""
    tic = time.perf_counter()
    loss, ar, mdm = evaluate(model, valid_set, args.batch_size, args.val_batches, mask_id, pad_id,
                             args.seed, args.ar_fraction)
    model.train()
    print(f"Iter {it}/{args.iters}: val loss {loss:.3f} (AR {ar:.3f}, MDM {mdm:.3f}), "
          f"took {time.perf_counter() - tic:.2f}s", flush=True)


def train(model, optimizer, train_set, valid_set, args, mask_id: int, pad_id: int, start: int = 0):
    """Steps ``start + 1 .. args.iters``: report, validate, save (atomically) as asked."""
    adapter_dir = Path(args.adapter_path)
    step, state = make_step(model, optimizer, args.grad_accumulation_steps)
    batches = length_batches(train_set, args.batch_size)
    model.train()
    sums, steps, tokens, seconds, trained, grad = mx.zeros(3), 0, 0, 0.0, 0, None
    for it in range(start + 1, args.iters + 1):
        due = it == start + 1 or it % args.steps_per_eval == 0 or it == args.iters
        if valid_set and args.val_batches != 0 and due:
            validate(model, it, args, valid_set, mask_id, pad_id)
        tic = time.perf_counter()
        mx.random.seed(args.seed * 1_000_003 + it)  # dropout masks depend on (seed, step) only: resumable
        indices = batch_for_step(batches, it, args.seed)
        rng = random.Random(f"{args.seed}:step:{it}")
        batch, ntok = make_batch(train_set, indices, mask_id, pad_id, rng, ar_fraction=args.ar_fraction)
        losses, _, grad = step(batch, grad, it % args.grad_accumulation_steps == 0)
        sums = sums + losses
        mx.eval(state, sums, grad)
        seconds += time.perf_counter() - tic
        steps, tokens, trained = steps + 1, tokens + ntok, trained + ntok
        if it % args.steps_per_report == 0 or it == args.iters:
            report_train(it, args, sums, steps, tokens, seconds, optimizer, trained)
            sums, steps, tokens, seconds = mx.zeros(3), 0, 0, 0.0
        if it % args.save_every == 0 and it != args.iters:
            save_adapters(adapter_dir, model, optimizer, it, numbered=True)
            print(f"Iter {it}/{args.iters}: saved adapters to {adapter_dir / ADAPTER_FILE}", flush=True)
    save_adapters(adapter_dir, model, optimizer, max(args.iters, start), numbered=False)
    print(f"Saved final adapters to {adapter_dir / ADAPTER_FILE}", flush=True)


def run_training(model, args, train_set, valid_set, mask_id: int, pad_id: int):
    """Set up layers, optimizer, resume and the adapter folder; then train."""
    from mlx_lm.tuner.utils import print_trainable_parameters

    mx.random.seed(args.seed)
    if args.grad_checkpoint and args.lora_parameters and args.lora_parameters["dropout"] > 0:
        # The recomputed forward pass would draw new dropout masks: gradients of another network
        print("[WARNING] --grad-checkpoint sets LoRA dropout to 0 (recomputing would redraw its masks)")
        args.lora_parameters["dropout"] = 0.0
    prepare_model(model, args)
    optimizer = build_optimizer(args)
    start = resume(model, optimizer, args.resume_adapter_file) if args.resume_adapter_file else 0
    if start >= args.iters:
        print(f"Already at step {start} of --iters {args.iters}: nothing to train")
    print_trainable_parameters(model)
    if args.grad_checkpoint:
        checkpoint_blocks(model)
    adapter_dir = Path(args.adapter_path)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(adapter_dir / "adapter_config.json", adapter_config(args))
    train(model, optimizer, train_set, valid_set, args, mask_id, pad_id, start)


def run_test(model, args, test_set, mask_id: int, pad_id: int):
    """Held-out loss on test.jsonl (seeded layouts)."""
    loss, ar, mdm = evaluate(model, test_set, args.batch_size, args.test_batches, mask_id, pad_id,
                             args.seed, args.ar_fraction)
    print(f"Test loss {loss:.3f} (AR {ar:.3f}, MDM {mdm:.3f})")
    return loss
