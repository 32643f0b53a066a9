"""The public API's answer to invalid arguments: ``RefusionError`` with a message naming the argument
(never a TypeError/ValueError from deep inside, never a silent reinterpretation)."""

import math

import pytest

from refusion_mlx import (DecodeSettings, RefusionError, generate_ar_ids, generate_ids, load, load_model,
                          stream_generate)
from refusion_mlx import generate

IDS = [316, 84, 82, 266]
KNOBS = dict(gen_length=8, slot_size=4, serial_num_blocks=1)


def decode(model, **bad):
    return generate_ids(model, IDS, **{**KNOBS, **bad})


def stream(model, tokenizer, prompt="hi", **bad):
    return list(stream_generate(model, tokenizer, prompt, **{**KNOBS, **bad}))


# (id, call(model, tokenizer, path), the argument the message must name)
CASES = [
    ("slot_size float", lambda m, t, p: decode(m, slot_size=4.0), "slot_size"),
    ("slot_size str", lambda m, t, p: decode(m, slot_size="x"), "slot_size"),
    ("slot_size bool", lambda m, t, p: decode(m, slot_size=True), "slot_size"),
    ("slot_size negative", lambda m, t, p: decode(m, slot_size=-4), "slot_size"),
    ("gen_length float", lambda m, t, p: decode(m, gen_length=8.5), "gen_length"),
    ("gen_length str", lambda m, t, p: decode(m, gen_length="8"), "gen_length"),
    ("gen_length 0", lambda m, t, p: decode(m, gen_length=0), "gen_length"),
    ("serial_num_blocks str", lambda m, t, p: decode(m, serial_num_blocks="1"), "serial_num_blocks"),
    ("slot_threshold str", lambda m, t, p: decode(m, slot_threshold="0.9"), "slot_threshold"),
    ("slot_threshold nan", lambda m, t, p: decode(m, slot_threshold=math.nan), "slot_threshold"),
    ("token_threshold 2", lambda m, t, p: decode(m, token_threshold=2), "token_threshold"),
    ("token_threshold negative", lambda m, t, p: decode(m, token_threshold=-0.1), "token_threshold"),
    ("temperature nan", lambda m, t, p: decode(m, temperature=math.nan), "temperature"),
    ("temperature inf", lambda m, t, p: decode(m, temperature=math.inf), "temperature"),
    ("temperature negative", lambda m, t, p: decode(m, temperature=-1.0), "temperature"),
    ("temperature str", lambda m, t, p: decode(m, temperature="hot"), "temperature"),
    ("seed negative", lambda m, t, p: decode(m, temperature=1.0, seed=-1), "seed"),
    ("seed 2**64", lambda m, t, p: decode(m, temperature=1.0, seed=2**64), "seed"),
    ("seed float", lambda m, t, p: decode(m, temperature=1.0, seed=1.5), "seed"),
    ("seed str", lambda m, t, p: decode(m, seed="1"), "seed"),
    ("mask_id str", lambda m, t, p: decode(m, mask_id="5"), "mask_id"),
    ("mask_id float", lambda m, t, p: decode(m, mask_id=5.0), "mask_id"),
    ("mask_id outside the vocabulary", lambda m, t, p: decode(m, mask_id=10_000), "mask_id"),
    ("mask_id negative", lambda m, t, p: decode(m, mask_id=-1), "mask_id"),
    ("eos_token_id str", lambda m, t, p: decode(m, eos_token_id="317"), "eos_token_id"),
    ("eos_token_id list of str", lambda m, t, p: decode(m, eos_token_id=["x"]), "eos_token_id"),
    ("eos_token_id float", lambda m, t, p: decode(m, eos_token_id=3.5), "eos_token_id"),
    ("eos_token_id list of float", lambda m, t, p: decode(m, eos_token_id=[1.0]), "eos_token_id"),
    ("prompt ids a string", lambda m, t, p: generate_ids(m, "hello", **KNOBS), "prompt_ids"),
    ("prompt ids floats", lambda m, t, p: generate_ids(m, [1.5, 2.0], **KNOBS), "prompt_ids"),
    ("prompt ids None", lambda m, t, p: generate_ids(m, None, **KNOBS), "prompt_ids"),
    ("prompt ids outside the vocabulary", lambda m, t, p: generate_ids(m, [10_000], **KNOBS), "prompt"),
    ("prompt ids empty", lambda m, t, p: generate_ids(m, [], **KNOBS), "prompt"),
    ("settings seed", lambda m, t, p: DecodeSettings(seed=-3).validate(), "seed"),
    ("ar max_tokens 0", lambda m, t, p: generate_ar_ids(m, IDS, max_tokens=0), "max_tokens"),
    ("ar max_tokens str", lambda m, t, p: generate_ar_ids(m, IDS, max_tokens="8"), "max_tokens"),
    ("ar max_tokens float", lambda m, t, p: generate_ar_ids(m, IDS, max_tokens=8.0), "max_tokens"),
    ("ar temperature negative", lambda m, t, p: generate_ar_ids(m, IDS, temperature=-0.5), "temperature"),
    ("ar temperature nan", lambda m, t, p: generate_ar_ids(m, IDS, temperature=math.nan), "temperature"),
    ("ar seed 2**64", lambda m, t, p: generate_ar_ids(m, IDS, temperature=1.0, seed=2**64), "seed"),
    ("ar eos_token_id str", lambda m, t, p: generate_ar_ids(m, IDS, eos_token_id="317"), "eos_token_id"),
    ("ar prompt ids outside the vocabulary", lambda m, t, p: generate_ar_ids(m, [10_000]), "prompt_ids"),
    ("stream unknown keyword", lambda m, t, p: stream(m, t, typical_p=0.9), "typical_p"),
    ("generate unknown keyword", lambda m, t, p: generate(m, t, "hi", max_tokens=8), "max_tokens"),
    ("stream prompt with a lone surrogate", lambda m, t, p: stream(m, t, prompt="hi \udcff"), "prompt"),
    ("stream prompt None", lambda m, t, p: stream(m, t, prompt=None), "prompt"),
    ("stream prompt a number", lambda m, t, p: stream(m, t, prompt=3), "prompt"),
    ("stream system_prompt with a lone surrogate",
     lambda m, t, p: list(stream_generate(m, t, "hi", system_prompt="\udcfe", **KNOBS)), "system_prompt"),
    ("stream gen_length str", lambda m, t, p: stream(m, t, gen_length="8"), "gen_length"),
    ("stream eos_token_id str", lambda m, t, p: stream(m, t, eos_token_id="317"), "eos_token_id"),
    ("stream temperature nan", lambda m, t, p: stream(m, t, temperature=math.nan), "temperature"),
    ("load a number", lambda m, t, p: load(123), "path_or_repo"),
    ("load dtype", lambda m, t, p: load(p, dtype="float8"), "dtype"),
    ("load adapter_path a number", lambda m, t, p: load(p, adapter_path=5), "adapter_path"),
    ("load revision a number", lambda m, t, p: load(p, revision=3), "revision"),
    ("load_model a number", lambda m, t, p: load_model(123), "path"),
    ("load_model dtype", lambda m, t, p: load_model(p, dtype="int4"), "dtype"),
]


@pytest.mark.parametrize("call, argument", [pytest.param(c, a, id=i) for i, c, a in CASES])
def test_invalid_argument_raises_refusion_error_naming_it(tiny_tokenizer_model, tiny_path, call, argument):
    model, tokenizer = tiny_tokenizer_model
    with pytest.raises(RefusionError) as caught:
        call(model, tokenizer, tiny_path)
    message = str(caught.value)
    assert "\n" not in message and argument in message, message


def test_eos_as_a_string_is_not_read_as_its_digits(tiny_model):
    """"317" once became {3, 1, 7}; ints and lists of ints keep working."""
    with pytest.raises(RefusionError, match="eos_token_id"):
        decode(tiny_model, eos_token_id="317")
    assert decode(tiny_model, eos_token_id=317).tokens == decode(tiny_model, eos_token_id=[317]).tokens


def test_numpy_and_mlx_integers_are_accepted(tiny_model):
    import mlx.core as mx
    import numpy as np

    plain = decode(tiny_model, temperature=0.5, seed=7).tokens
    assert generate_ids(tiny_model, np.array(IDS), **KNOBS, temperature=0.5, seed=np.uint64(7)).tokens == plain
    assert generate_ids(tiny_model, mx.array(IDS), **KNOBS, temperature=0.5, seed=7).tokens == plain
