"""The training loop: batches, the compiled step, validation, saving and resuming.

``train`` takes a ``TrainingArgs`` and an optional ``TrainingCallback`` (as mlx-lm's
trainer) and returns the losses it reported. Saves are atomic and record their step and
the tokens trained so far; data order, slot layouts and dropout depend only on (seed,
step), so a resumed run continues exactly where the interrupted one stopped.
"""
import math
import random
import re
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.utils import average_gradients
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from ..errors import RefusionError
from ..utils import atomic_write
from ..validation import one_line
from .objective import collate, hybrid_loss, layout_example

ADAPTER_FILE = "adapters.safetensors"
STATE_FILE = "training_state.safetensors"  # optimizer moments, so a resume continues exactly


@dataclass
class TrainingArgs:
    """How to train (mlx-lm's names where it has them)."""

    batch_size: int = 4
    iters: int = 1000
    val_batches: int = 25  # -1: all
    steps_per_report: int = 10
    steps_per_eval: int = 200
    steps_per_save: int = 100
    adapter_path: str = "adapters"
    grad_accumulation_steps: int = 1
    seed: int = 0
    ar_fraction: float = 0.0  # share of examples laid out plainly left to right (objective.py)


class TrainingCallback:
    """Hooks the loop calls with each report (dicts of plain numbers); override what you need."""

    def on_train_loss_report(self, info: dict):
        pass

    def on_val_loss_report(self, info: dict):
        pass

    def on_save(self, info: dict):
        pass


class PrintReports(TrainingCallback):
    """The command line's report lines."""

    def on_train_loss_report(self, info: dict):
        print(f"Iter {info['iteration']}/{info['iters']}: train loss {info['loss']:.3f} (AR {info['ar']:.3f}, "
              f"MDM {info['mdm']:.3f}), lr {info['learning_rate']:.3e}, it/s {info['iterations_per_second']:.3f}, "
              f"tokens/s {info['tokens_per_second']:.1f}, trained tokens {info['trained_tokens']}, "
              f"peak mem {info['peak_memory']:.3f} GB", flush=True)

    def on_val_loss_report(self, info: dict):
        print(f"Iter {info['iteration']}/{info['iters']}: val loss {info['loss']:.3f} (AR {info['ar']:.3f}, "
              f"MDM {info['mdm']:.3f}), took {info['seconds']:.2f}s", flush=True)

    def on_save(self, info: dict):
        what = "final adapters" if info["final"] else "adapters"
        where = f"Iter {info['iteration']}/{info['iters']}: saved" if not info["final"] else "Saved"
        print(f"{where} {what} to {info['path']}", flush=True)


@dataclass
class TrainingLosses:
    """What ``train`` returns: every report, in order."""

    train: List[dict] = field(default_factory=list)
    val: List[dict] = field(default_factory=list)


def save_safetensors(path: Path, arrays: dict, step: int, trained_tokens: int):
    """Written atomically, with the step and the tokens trained so far in its metadata."""
    try:
        atomic_write(path, lambda tmp: mx.save_safetensors(
            str(tmp), arrays, metadata={"step": str(step), "trained_tokens": str(trained_tokens)}))
    except (OSError, RuntimeError, ValueError) as e:  # full disk, folder gone or read-only
        raise RefusionError(f"cannot save {path}: {one_line(e)}") from None


def save_adapters(adapter_dir: Path, model, optimizer, step: int, numbered: bool, trained_tokens: int = 0):
    """adapters.safetensors (+ a numbered copy) and the training state, each written atomically."""
    weights = dict(tree_flatten(model.trainable_parameters()))
    # A finite loss can still be followed by an update to inf: such weights are never saved.
    if not all(mx.all(mx.isfinite(w)).item() for w in weights.values()):
        raise RefusionError(f"the weights are no longer finite at step {step}; stopped without saving "
                            "(a learning rate too high, or LoRA alpha/scale out of range?)")
    save_safetensors(adapter_dir / ADAPTER_FILE, weights, step, trained_tokens)
    if numbered:
        save_safetensors(adapter_dir / f"{step:07d}_{ADAPTER_FILE}", weights, step, trained_tokens)
    save_safetensors(adapter_dir / STATE_FILE, dict(tree_flatten(optimizer.state)), step, trained_tokens)


def saved_step(path: Path, metadata: dict) -> int:
    """The step an adapter file was saved at: its metadata, else a ``0000100_`` name prefix."""
    if "step" in metadata:
        return int(metadata["step"])
    found = re.match(r"(\d+)_", path.name)
    if found:
        return int(found.group(1))
    print(f"[WARNING] {path.name} does not record its step; counting from 0")
    return 0


def resume(model, optimizer, path: str) -> tuple:
    """Load adapter weights (and the training state saved with them); return (step, trained tokens)."""
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
    return step, int(metadata.get("trained_tokens", 0))


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


def stop_if_not_finite(losses: mx.array, it: int):
    """Stop at the first NaN or infinite loss: the weights are already spoilt, so nothing more is saved."""
    loss = losses[0].item()
    if not math.isfinite(loss):
        raise RefusionError(f"the training loss is {loss} at step {it}; stopped without saving "
                            "(a learning rate too high, or LoRA alpha/scale out of range?)")


def train(model, optimizer, train_set, valid_set, args: TrainingArgs, mask_id: int, pad_id: int,
          start: int = 0, trained_tokens: int = 0,
          callback: Optional[TrainingCallback] = None) -> TrainingLosses:
    """Steps ``start + 1 .. args.iters``: report, validate and save (atomically) as ``args`` asks.

    Args:
        model: the model, prepared for training (``tuner.utils.prepare_model``).
        optimizer: an mlx optimizer (``tuner.utils.build_optimizer``).
        train_set, valid_set: lists of ``datasets.Example``; ``valid_set`` may be None or empty.
        args: a ``TrainingArgs``.
        mask_id, pad_id: the mask token and the padding token.
        start: the step already done (a resumed run); ``trained_tokens`` the tokens trained by then.
        callback: receives every report and save (``PrintReports`` prints them).

    Returns:
        ``TrainingLosses``: the train and validation reports, as given to the callback.
    """
    callback = callback or TrainingCallback()
    losses = TrainingLosses()
    adapter_dir = Path(args.adapter_path)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    step, state = make_step(model, optimizer, args.grad_accumulation_steps)
    batches = length_batches(train_set, args.batch_size)
    model.train()
    sums, steps, tokens, seconds, grad = mx.zeros(3), 0, 0, 0.0, None
    for it in range(start + 1, args.iters + 1):
        due = it == start + 1 or it % args.steps_per_eval == 0 or it == args.iters
        if valid_set and args.val_batches != 0 and due:
            tic = time.perf_counter()
            loss, ar, mdm = evaluate(model, valid_set, args.batch_size, args.val_batches, mask_id, pad_id,
                                     args.seed, args.ar_fraction)
            model.train()
            report = dict(iteration=it, iters=args.iters, loss=loss, ar=ar, mdm=mdm,
                          seconds=time.perf_counter() - tic)
            losses.val.append(report)
            callback.on_val_loss_report(report)
        tic = time.perf_counter()
        mx.random.seed(args.seed * 1_000_003 + it)  # dropout masks depend on (seed, step) only: resumable
        indices = batch_for_step(batches, it, args.seed)
        rng = random.Random(f"{args.seed}:step:{it}")
        batch, ntok = make_batch(train_set, indices, mask_id, pad_id, rng, ar_fraction=args.ar_fraction)
        step_losses, _, grad = step(batch, grad, it % args.grad_accumulation_steps == 0)
        sums = sums + step_losses
        mx.eval(state, sums, grad)
        stop_if_not_finite(step_losses, it)
        seconds += time.perf_counter() - tic
        steps, tokens, trained_tokens = steps + 1, tokens + ntok, trained_tokens + ntok
        if it % args.steps_per_report == 0 or it == args.iters:
            loss, ar, mdm = (sums / steps).tolist()
            report = dict(iteration=it, iters=args.iters, loss=loss, ar=ar, mdm=mdm,
                          learning_rate=optimizer.learning_rate.item(), iterations_per_second=steps / seconds,
                          tokens_per_second=tokens / seconds, trained_tokens=trained_tokens,
                          peak_memory=mx.get_peak_memory() / 1e9)
            losses.train.append(report)
            callback.on_train_loss_report(report)
            sums, steps, tokens, seconds = mx.zeros(3), 0, 0, 0.0
        if it % args.steps_per_save == 0 and it != args.iters:
            save_adapters(adapter_dir, model, optimizer, it, True, trained_tokens)
            callback.on_save(dict(iteration=it, iters=args.iters, path=adapter_dir / ADAPTER_FILE, final=False))
    save_adapters(adapter_dir, model, optimizer, max(args.iters, start), False, trained_tokens)
    callback.on_save(dict(iteration=max(args.iters, start), iters=args.iters, path=adapter_dir / ADAPTER_FILE,
                          final=True))
    return losses
