"""The break-even benchmark's scripted decisions and arithmetic, and the plan_slots knob."""

import pytest

import mlx.core as mx
import numpy as np

from refusion_mlx.benchmark import RecordingModel
from refusion_mlx.break_even import (Profile, ScriptedDecisions, break_even, cost_shapes, profiles,
                                     scripted_text, sweep_arguments)
from refusion_mlx.roofline import Roofline, estimated_tokens_per_second, fit_roofline, flop_per_token
from refusion_mlx.decode import generate_ids
from refusion_mlx.errors import RefusionError
from refusion_mlx.settings import KNOB_BY_NAME, DecodeSettings, settings_for

PROMPT = list(range(5, 25))


@pytest.mark.parametrize("slot_size,blocks,gen", [(8, 2, 32), (4, 2, 32), (16, 1, 64)])
def test_scripted_profiles_commit_the_stated_tokens_per_call_through_the_real_decoder(tiny_model, slot_size,
                                                                                      blocks, gen):
    block_slots = gen // blocks // slot_size
    seen = set()
    for profile in profiles(slot_size, block_slots):
        inner = RecordingModel(tiny_model)  # the real forwards, under the script
        r = generate_ids(ScriptedDecisions(inner, profile, slot_size, len(PROMPT)), PROMPT, eos_token_id=[],
                         gen_length=gen, slot_size=slot_size, serial_num_blocks=blocks,
                         slot_threshold=0.9, token_threshold=0.3)
        assert r.tokens_per_call == profile.tokens_per_call(slot_size)
        assert len(inner.calls) == r.model_calls  # every decision came after a real forward
        positions = mx.arange(len(PROMPT), len(PROMPT) + gen)
        assert r.tokens == scripted_text(positions, tiny_model.args.vocab_size).tolist()
        seen.add(r.tokens_per_call)
    # The sweep doubles tokens per call from 0.5 (one token per infill round) to whole blocks.
    assert sorted(seen) == [0.5 * 2 ** k for k in range(len(seen))]
    assert max(seen) == block_slots * slot_size / 2


def test_profile_arithmetic():
    assert Profile(1, 1).tokens_per_call(32) == 0.5  # S-1 infill rounds: 2S calls for one slot
    assert Profile(1, 8).calls_per_iteration(32) == 8
    assert Profile(4, 32).tokens_per_call(32) == 64  # 4 whole slots per plan + verify
    assert Profile(1, 3).tokens_per_call(8) == 8 / 6


def test_break_even_from_given_cost_curves():
    # A call costs 10 ms whatever it commits: tokens/s = 100 x tokens per call, exactly linear.
    flat = [(x, 100 * x) for x in (0.5, 1, 2, 4, 8)]
    assert break_even(flat, 250) == ("=", pytest.approx(2.5, rel=1e-12))
    assert break_even(flat, 100) == ("=", pytest.approx(1.0, rel=1e-12))
    assert break_even(flat, 40) == ("<", 0.5)
    assert break_even(flat, 900) == (">", 8)
    # Calls that commit more cost more (wider): tokens/s = x / (0.01 + 0.005 x); the crossing of
    # 80 tok/s is between x = 2 (100 tok/s)... and x = 1 (66.7): interpolated on that segment.
    curve = [(x, x / (0.01 + 0.005 * x)) for x in (4, 1, 2)]  # any order
    relation, value = break_even(curve, 80)
    y1, y2 = 1 / 0.015, 2 / 0.02
    assert relation == "=" and value == pytest.approx(1 + (80 - y1) / (y2 - y1), rel=1e-12)


def test_roofline_fit_recovers_the_rates_that_made_the_curve():
    from types import SimpleNamespace

    from refusion_mlx.benchmark import SHAPES

    args = SimpleNamespace(**SHAPES["qwen3-8b"])  # 256 tokens are compute-bound at these rates
    truth = Roofline(bandwidth=400e9, flops=20e12)
    weights, per_token = 8e9, flop_per_token(args, 200)
    times = {n: truth.seconds(weights, n * per_token) for n in (1, 8, 32, 128, 256)}
    fitted = fit_roofline(times, weights, per_token)
    assert fitted.bandwidth == pytest.approx(400e9, rel=1e-9) and fitted.flops == pytest.approx(20e12, rel=1e-9)
    # Two calls of 1 token (bandwidth-bound) commit 4 tokens: 4 / (2 x 20 ms).
    calls = [(1, 200, None), (1, 201, None)]
    assert estimated_tokens_per_second(calls, 4, args, weights, truth) == pytest.approx(100, rel=1e-9)


def test_presets_run_once_per_cost_shape_and_caps_are_added():
    shapes = cost_shapes(["gsm8k", "mbpp", "humaneval", "arc"], plan_slots=[1, 2])
    names = [name for name, _, _ in shapes]
    assert names == ["gsm8k", "gsm8k plan_slots=1", "gsm8k plan_slots=2", "arc"]  # arc's block is one slot
    assert sorted(shapes[0][2]) == ["humaneval", "mbpp"]
    with pytest.raises(RefusionError, match="unknown preset"):
        sweep_arguments("gsm8k,nope", None)
    with pytest.raises(RefusionError, match="positive integers"):
        sweep_arguments(None, "1,0")


# --- plan_slots ----------------------------------------------------------------------------------

def test_plan_slots_bounds():
    knob = KNOB_BY_NAME["plan_slots"]
    assert (knob.flag, knob.field, knob.low) == ("--plan-slots", "plan_slots", 0)
    assert DecodeSettings().plan_slots == 0
    with pytest.raises(RefusionError, match="plan_slots"):
        settings_for(None, plan_slots=-1)
    with pytest.raises(RefusionError, match="plan_slots"):
        settings_for(None, plan_slots=1.5)
    assert settings_for(None, plan_slots=3).plan_slots == 3


@pytest.mark.parametrize("cap", [1, 2])
def test_plan_slots_caps_what_a_plan_call_feeds(tiny_model, cap):
    S = 8
    recorder = RecordingModel(tiny_model)
    r = generate_ids(recorder, PROMPT, eos_token_id=[], gen_length=64, slot_size=S, serial_num_blocks=1,
                     slot_threshold=0.9, token_threshold=0.3, plan_slots=cap)
    plans = [n for n, _, last in recorder.calls if last is not None]  # a plan keeps only its slots' logits
    assert plans[0] == len(PROMPT) + cap * S  # the first plan also feeds the prompt
    assert max(plans[1:]) == cap * S and all(n % S == 0 for n in plans[1:])
    assert len(r.tokens) == 64
    uncapped = RecordingModel(tiny_model)
    generate_ids(uncapped, PROMPT, eos_token_id=[], gen_length=64, slot_size=S, serial_num_blocks=1,
                 slot_threshold=0.9, token_threshold=0.3)
    assert uncapped.calls[0][0] == len(PROMPT) + 64


def test_plan_slots_default_and_a_cap_above_the_block_change_no_token(tiny_model):
    knobs = dict(gen_length=48, slot_size=4, serial_num_blocks=2, slot_threshold=0.5, token_threshold=0.3)
    base = generate_ids(tiny_model, PROMPT, **knobs)
    assert generate_ids(tiny_model, PROMPT, plan_slots=0, **knobs).tokens == base.tokens
    wide = generate_ids(tiny_model, PROMPT, plan_slots=6, **knobs)  # 6 slots per block: no cap
    assert (wide.tokens, wide.model_calls) == (base.tokens, base.model_calls)


def test_plan_slots_is_a_flag_a_request_field_and_an_evaluate_key():
    from refusion_mlx.cli import ArgumentParser, add_decode_flags, settings_from_args
    from refusion_mlx.evaluate import parse_setting, setting_name
    from refusion_mlx.openai_api import CompletionRequest

    parser = ArgumentParser()
    add_decode_flags(parser)
    assert settings_from_args(parser.parse_args(["--plan-slots", "2"]))["plan_slots"] == 2
    assert CompletionRequest.model_validate({"prompt": "x", "plan_slots": 2}).plan_slots == 2
    knobs = parse_setting("s=8,b=2,st=0.9,tt=0.5,ps=1", 64)
    assert knobs["plan_slots"] == 1
    assert setting_name(dict(knobs)).endswith(",ps=1")
    assert "ps=" not in setting_name(dict(knobs, plan_slots=0))


def test_decoding_from_a_cached_prompt_keeps_the_profile_and_the_caches_come_back(tiny_model):
    from refusion_mlx.autoregressive import prefill_ids
    from refusion_mlx.benchmark import cached_prompts, mlx_lm_twin, time_mlx_lm
    from refusion_mlx.kv.prompt import make_prompt_cache

    cache = make_prompt_cache(tiny_model)
    prefill_ids(tiny_model, PROMPT, cache)
    for _ in range(2):  # the second run reuses the prompt again, the first run's answer dropped
        inner = RecordingModel(tiny_model)
        r = generate_ids(ScriptedDecisions(inner, Profile(1, 4), 8, len(PROMPT)), PROMPT, eos_token_id=[],
                         gen_length=16, slot_size=8, serial_num_blocks=1, prompt_cache=cache)
        assert r.tokens_per_call == Profile(1, 4).tokens_per_call(8)
        assert inner.calls[0][0] == 1 + 16  # the last prompt token and the block's masks
    twin = mlx_lm_twin(tiny_model)
    _, theirs_cache = cached_prompts(tiny_model, twin, PROMPT)
    _, fresh = time_mlx_lm(twin, PROMPT, 6)
    for _ in range(2):
        _, cached = time_mlx_lm(twin, PROMPT, 6, theirs_cache)
        assert cached == fresh and theirs_cache[0].offset == len(PROMPT) - 1


@pytest.mark.parametrize("bits", [None, 4])
def test_shape_weight_bytes_match_a_built_model(bits):
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from refusion_mlx.roofline import shape_weight_bytes
    from refusion_mlx.model import Model, ModelArgs

    args = ModelArgs(model_type="qwen3", rms_norm_eps=1e-6, hidden_size=128, num_hidden_layers=2,
                     intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                     vocab_size=512)
    model = Model(args)
    model.set_dtype(mx.bfloat16)
    if bits:
        nn.quantize(model, group_size=64, bits=bits)
    built = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    assert shape_weight_bytes(args, bits, 64) == pytest.approx(built, rel=0.01)  # norms left out


def test_the_estimate_mode_prints_apple_break_evens_without_the_shapes_forwards(capsys):
    from refusion_mlx.benchmark import main

    assert main(["--shape", "qwen3-8b", "--break-even", "--estimate", "--presets", "arc,gpqa",
                 "--max-tokens", "16", "--prompt-tokens", "8", "--quantize", "4"]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATES" in out and "4.61 GB" in out
    rows = [line.split() for line in out.splitlines() if line.startswith(("arc", "gpqa"))]
    # One-slot calls are narrower than any Apple GPU's ridge: each costs one weight read, a step.
    assert rows[0][0] == "arc" and all(float(v) == pytest.approx(1.0, rel=1e-6) for v in rows[0][1:])
    assert len(rows) == 2 and len(rows[1]) == 5


def test_a_cost_curve_moved_to_another_ridge():
    from refusion_mlx.roofline import ScaledCurve

    times = ((1, 0.010), (32, 0.012), (256, 0.040))
    same = ScaledCurve(times, stretch=1.0, step=0.010)
    assert [same.seconds(n) for n, _ in times] == pytest.approx([t for _, t in times], rel=1e-12)
    assert same.seconds(512) == pytest.approx(0.040 + 256 * 0.028 / 224, rel=1e-12)  # linear past 256
    # A device whose ridge is 8x lower, and whose step is 5 ms: 32 tokens there cost what 256 cost here.
    there = ScaledCurve(times, stretch=8.0, step=0.005)
    assert there.seconds(32) == pytest.approx(0.005 * 4.0, rel=1e-12)
    assert there.seconds(1) == pytest.approx(0.005 * np.interp(8, [1, 32], [0.010, 0.012]) / 0.010, rel=1e-12)


def test_each_profile_is_compared_with_left_to_right_run_beside_it(tiny_model):
    from refusion_mlx.break_even import MAX_RUNS, record_setting

    beside = []

    def left_to_right():
        beside.append(1)
        return 1000.0

    knobs = dict(gen_length=16, slot_size=8, serial_num_blocks=1, slot_threshold=0.9, token_threshold=0.3)
    rows = record_setting(tiny_model, PROMPT, knobs, min_calls=10_000, left_to_right=left_to_right)
    assert [row.profile for row in rows] == profiles(8, 2)
    assert len(beside) == MAX_RUNS * len(rows)  # one beside every run; runs stop at MAX_RUNS
    for row in rows:
        assert row.result.tokens_per_call == row.profile.tokens_per_call(8)
        assert row.vs_ar > 0 and len(row.calls) == row.result.model_calls
    one = record_setting(tiny_model, PROMPT, knobs, left_to_right=left_to_right)[0]
    assert one.vs_ar == pytest.approx(one.result.tokens_per_second / 1000.0, rel=1e-9)
