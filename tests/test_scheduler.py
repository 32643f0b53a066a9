"""The scheduler: sequences join, leave and are cancelled between steps; its queue is bounded."""

import pytest

from refusion_mlx import RefusionError, generate_ids
from refusion_mlx.settings import DecodeSettings
from refusion_mlx.scheduler import QueueFull, Scheduler

KNOBS = dict(gen_length=16, slot_size=4, serial_num_blocks=2, slot_threshold=0.5, token_threshold=0.5)


def test_at_most_max_active_decode_and_the_waiting_join_as_others_leave(tiny_model):
    scheduler = Scheduler(tiny_model, max_active=2, max_waiting=4)
    prompts = [[3, 4, 5], [7, 8, 9, 10], [20, 21], [30, 31, 32]]
    seqs = [scheduler.add(p, DecodeSettings(**KNOBS), eos_token_id=[]) for p in prompts]
    assert [s.uid for s in seqs] == [0, 1, 2, 3] and not scheduler.active  # queued until a step
    with pytest.raises(QueueFull, match="queue is full"):
        scheduler.add([1, 2], DecodeSettings(**KNOBS), eos_token_id=[])  # all 4 wait until the next step
    left, most = [], 0
    while scheduler.busy:
        left += scheduler.step()
        most = max(most, len(scheduler.active))
        assert len(scheduler.active) + len(scheduler.waiting) + len(left) == len(prompts)
    assert most == 2 and sorted(s.uid for s in left) == [0, 1, 2, 3]
    for seq, prompt in zip(seqs, prompts):
        assert seq.done and seq.result.tokens == generate_ids(tiny_model, prompt, eos_token_id=[], **KNOBS).tokens


def test_cancelling_a_waiting_or_running_sequence_drops_it_at_the_next_step(tiny_model):
    scheduler = Scheduler(tiny_model, max_active=1)
    running = scheduler.add([3, 4, 5], DecodeSettings(**KNOBS), eos_token_id=[])
    waiting = scheduler.add([6, 7, 8], DecodeSettings(**KNOBS), eos_token_id=[])
    scheduler.step()
    assert scheduler.active == [running] and list(scheduler.waiting) == [waiting]
    scheduler.cancel(waiting)
    scheduler.cancel(running)
    assert sorted(s.uid for s in scheduler.step()) == [0, 1]
    assert not scheduler.busy and running.result is None and waiting.result is None
    assert scheduler.executor.cache.nbytes == 0  # the rows are freed


def test_commits_reach_the_callback_as_they_happen(tiny_model):
    seen = []
    scheduler = Scheduler(tiny_model)
    seq = scheduler.add([3, 4, 5], DecodeSettings(**KNOBS), eos_token_id=[],
                        on_commit=lambda s, c: seen.append((s.uid, len(c.tokens))))
    while scheduler.busy:
        scheduler.step()
    assert seen and all(uid == seq.uid for uid, _ in seen)
    assert sum(n for _, n in seen) == sum(len(c.tokens) for c in seq.commits)


def test_bad_requests_are_refused_when_added(tiny_model):
    scheduler = Scheduler(tiny_model)
    with pytest.raises(RefusionError, match="unknown decoder"):
        scheduler.add([1, 2], DecodeSettings(**KNOBS), decoder="sideways")
    with pytest.raises(RefusionError, match="the prompt is empty"):
        scheduler.add([], DecodeSettings(**KNOBS))
    with pytest.raises(RefusionError, match="max_batch_size must be positive"):
        Scheduler(tiny_model, max_active=0)
    assert not scheduler.busy
