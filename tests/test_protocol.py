"""The predict request schema: every rule, its error message, defaults, and what it feeds Triton."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mixtral_triton.protocol import (
    FIELDS,
    FIELDS_BY_NAME,
    MAX_STOP_CHARS,
    MAX_STOPS,
    PredictRequest,
    RequestError,
    check_lengths,
    ensemble_inputs,
    fields_markdown,
    json_schema,
    parse_request,
)


def error_of(body) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_request(body)
    return caught.value


def test_defaults():
    request = parse_request({"prompt": "Hello"})
    assert request == PredictRequest(
        prompt="Hello", stream=True, max_tokens=128, temperature=1.0, top_p=0.95, top_k=50,
        stop=(), seed=None, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
        min_tokens=0, ignore_eos=False, stop_token_ids=(), include_stop_str_in_output=False,
        skip_special_tokens=True, exclude_input_in_output=True, response_format=None)


def test_the_request_class_has_exactly_the_fields_of_the_table():
    assert [f.name for f in dataclasses.fields(PredictRequest)] == [spec.name for spec in FIELDS]


def test_request_error_is_a_value_error_with_the_field():
    error = error_of({"prompt": "x", "top_p": 1.5})
    assert isinstance(error, ValueError)
    assert error.field == "top_p"
    assert str(error) == "top_p must be > 0 and <= 1, got 1.5"


def test_prompt_is_required():
    error = error_of({"stream": False})
    assert (error.field, str(error)) == ("prompt", "prompt is required")


@pytest.mark.parametrize("body", [[], "prompt", None, 3])
def test_the_body_must_be_an_object(body):
    error = error_of(body)
    assert error.field is None
    assert str(error).startswith("the request must be a JSON object, got ")


def test_unknown_fields_are_an_error():
    error = error_of({"prompt": "x", "n": 2})
    assert error.field == "n"
    assert str(error).startswith('unknown field "n"; the fields are prompt, stream, max_tokens')


# (body fields, field, exact message): every rule of every field.
BAD = [
    ({"prompt": ""}, "prompt", 'prompt must be a non-empty string, got ""'),
    ({"prompt": 5}, "prompt", "prompt must be a non-empty string, got 5"),
    ({"prompt": ["a"]}, "prompt", 'prompt must be a non-empty string, got ["a"]'),
    ({"prompt": None}, "prompt", "prompt must be a non-empty string, got null"),
    ({"stream": 1}, "stream", "stream must be a boolean, got 1"),
    ({"stream": "true"}, "stream", 'stream must be a boolean, got "true"'),
    ({"stream": None}, "stream", "stream must be a boolean, got null"),
    ({"max_tokens": 0}, "max_tokens", "max_tokens must be >= 1 and <= 2147483647, got 0"),
    ({"max_tokens": 2**31}, "max_tokens", "max_tokens must be >= 1 and <= 2147483647, got 2147483648"),
    ({"max_tokens": True}, "max_tokens", "max_tokens must be an integer, got true"),
    ({"max_tokens": 16.0}, "max_tokens", "max_tokens must be an integer, got 16.0"),
    ({"max_tokens": "16"}, "max_tokens", 'max_tokens must be an integer, got "16"'),
    ({"temperature": -0.1}, "temperature", "temperature must be >= 0, got -0.1"),
    ({"temperature": "0.5"}, "temperature", 'temperature must be a number, got "0.5"'),
    ({"temperature": False}, "temperature", "temperature must be a number, got false"),
    ({"temperature": math.nan}, "temperature", "temperature must be a finite number, got NaN"),
    ({"temperature": math.inf}, "temperature", "temperature must be a finite number, got Infinity"),
    ({"temperature": 1e39}, "temperature", "temperature must be a finite number, got 1e+39"),
    ({"temperature": None}, "temperature", "temperature must be a number, got null"),
    ({"top_p": 0}, "top_p", "top_p must be > 0 and <= 1, got 0"),
    ({"top_p": 1.5}, "top_p", "top_p must be > 0 and <= 1, got 1.5"),
    ({"top_p": -math.inf}, "top_p", "top_p must be a finite number, got -Infinity"),
    ({"top_k": -1}, "top_k", "top_k must be >= 0 and <= 2147483647, got -1"),
    ({"top_k": 1.0}, "top_k", "top_k must be an integer, got 1.0"),
    ({"seed": -1}, "seed", "seed must be >= 0 and <= 18446744073709551615, got -1"),
    ({"seed": 2**64}, "seed", "seed must be >= 0 and <= 18446744073709551615, got 18446744073709551616"),
    ({"seed": "42"}, "seed", 'seed must be an integer, got "42"'),
    ({"seed": True}, "seed", "seed must be an integer, got true"),
    ({"repetition_penalty": 0}, "repetition_penalty", "repetition_penalty must be > 0, got 0"),
    ({"repetition_penalty": -1.0}, "repetition_penalty", "repetition_penalty must be > 0, got -1.0"),
    ({"presence_penalty": 2.5}, "presence_penalty", "presence_penalty must be >= -2 and <= 2, got 2.5"),
    ({"presence_penalty": -3}, "presence_penalty", "presence_penalty must be >= -2 and <= 2, got -3"),
    ({"frequency_penalty": 2.01}, "frequency_penalty", "frequency_penalty must be >= -2 and <= 2, got 2.01"),
    ({"frequency_penalty": [0]}, "frequency_penalty", "frequency_penalty must be a number, got [0]"),
    ({"stop": ""}, "stop", 'stop must be a non-empty string of at most 128 characters, got ""'),
    ({"stop": ["a", ""]}, "stop", 'stop[1] must be a non-empty string of at most 128 characters, got ""'),
    ({"stop": ["a", 3]}, "stop", "stop[1] must be a non-empty string of at most 128 characters, got 3"),
    ({"stop": "x" * 129}, "stop", f'stop must be a non-empty string of at most 128 characters, got "{"x" * 59}...'),
    ({"stop": ["a"] * 17}, "stop",
     'stop must be a string or a list of at most 16 strings, got ' + '["a", ' + '"a", ' * 10 + '"a",...'),
    ({"stop": {"a": 1}}, "stop", 'stop must be a string or a list of at most 16 strings, got {"a": 1}'),
    ({"stop": 7}, "stop", "stop must be a string or a list of at most 16 strings, got 7"),
    ({"min_tokens": -1}, "min_tokens", "min_tokens must be >= 0 and <= 2147483647, got -1"),
    ({"min_tokens": 129}, "min_tokens", "min_tokens must be <= max_tokens (128), got 129"),
    ({"ignore_eos": 1}, "ignore_eos", "ignore_eos must be a boolean, got 1"),
    ({"stop_token_ids": 2}, "stop_token_ids", "stop_token_ids must be a list of at most 16 token ids, got 2"),
    ({"stop_token_ids": [2, -1]}, "stop_token_ids",
     "stop_token_ids[1] must be a token id >= 0 and <= 2147483647, got -1"),
    ({"stop_token_ids": [True]}, "stop_token_ids",
     "stop_token_ids[0] must be a token id >= 0 and <= 2147483647, got true"),
    ({"stop_token_ids": [2] * 17}, "stop_token_ids",
     "stop_token_ids must be a list of at most 16 token ids, got [" + "2, " * 16 + "2]"),
    ({"skip_special_tokens": None}, "skip_special_tokens", "skip_special_tokens must be a boolean, got null"),
    ({"exclude_input_in_output": "false"}, "exclude_input_in_output",
     'exclude_input_in_output must be a boolean, got "false"'),
]


@pytest.mark.parametrize("fields, field, message", BAD, ids=[m for _, _, m in BAD])
def test_each_rule_names_the_field_the_value_and_the_rule(fields, field, message):
    error = error_of({"prompt": "x", **fields})
    assert error.field == field
    assert str(error) == message


def test_every_bounded_field_reports_its_bounds():
    for spec in FIELDS:
        if spec.minimum is None or spec.kind == "token_ids":  # a list: see BAD
            continue
        below = spec.minimum - 1 if spec.kind == "integer" else spec.minimum - 0.5
        error = error_of({"prompt": "x", spec.name: below})
        assert error.field == spec.name
        assert str(error) == f"{spec.name} must be {spec.bounds_rule}, got {below}"


GOOD = [
    {"temperature": 0}, {"temperature": 0.0}, {"temperature": 100}, {"top_p": 1}, {"top_p": 1e-9},
    {"top_k": 0}, {"top_k": 1}, {"seed": 0}, {"seed": 2**64 - 1}, {"seed": None},
    {"max_tokens": 1}, {"max_tokens": 2**31 - 1}, {"presence_penalty": -2}, {"presence_penalty": 2},
    {"frequency_penalty": -2.0}, {"frequency_penalty": 2.0}, {"repetition_penalty": 1e-6},
    {"stream": False}, {"stop": None}, {"stop": []}, {"stop": "\n"}, {"stop": ["a"] * MAX_STOPS},
    {"stop": ["x" * MAX_STOP_CHARS]}, {"min_tokens": 128}, {"min_tokens": 0}, {"ignore_eos": True},
    {"stop_token_ids": [0, 2**31 - 1]}, {"stop_token_ids": None}, {"stop_token_ids": []},
    {"max_tokens": 5, "min_tokens": 5},
]


@pytest.mark.parametrize("fields", GOOD, ids=[repr(g) for g in GOOD])
def test_boundary_values_are_accepted(fields):
    parse_request({"prompt": "x", **fields})


def test_values_are_normalized():
    request = parse_request({"prompt": "x", "temperature": 1, "stop": "END"})
    assert isinstance(request.temperature, float) and request.temperature == 1.0
    assert request.stop == ("END",)
    assert parse_request({"prompt": "x", "stop": ["a", "b"]}).stop == ("a", "b")
    assert parse_request({"prompt": "x", "stop": None}).stop == ()


def test_huge_values_are_cut_short_in_messages():
    error = error_of({"prompt": "x", "stop": ["y" * 100_000]})
    assert len(str(error)) < 200


# Everything parse_request accepts, the published JSON Schema accepts too.
_bodies = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=20)},
    optional={
        "stream": st.booleans(),
        "max_tokens": st.integers(-5, 2**31 + 5),
        "temperature": st.floats(allow_nan=True, allow_infinity=True) | st.integers(-3, 3),
        "top_p": st.floats(-1, 2) | st.integers(-1, 2),
        "top_k": st.integers(-2, 2**31) | st.booleans(),
        "seed": st.none() | st.integers(-2, 2**64 + 2),
        "stop": st.none() | st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=MAX_STOPS + 2),
        "repetition_penalty": st.floats(-1, 3),
        "presence_penalty": st.floats(-3, 3),
        "frequency_penalty": st.floats(-3, 3) | st.text(max_size=2),
        "min_tokens": st.integers(-1, 200),
        "ignore_eos": st.booleans() | st.none(),
        "stop_token_ids": st.none() | st.lists(st.integers(-1, 2**31), max_size=MAX_STOPS + 1),
    })


@settings(max_examples=300, deadline=None)
@given(_bodies)
def test_accepted_requests_satisfy_the_json_schema(body):
    jsonschema = pytest.importorskip("jsonschema")
    try:
        request = parse_request(body)
    except RequestError as error:
        assert error.field in body
        assert error.field in str(error)
        return
    jsonschema.validate(body, json_schema())
    for spec in FIELDS:
        if spec.name not in body and spec.kind not in ("stop", "token_ids"):  # lists: ()
            assert getattr(request, spec.name) == spec.default


def test_json_schema_is_a_valid_schema_generated_from_the_table():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["required"] == ["prompt"]
    assert schema["additionalProperties"] is False
    assert list(schema["properties"]) == [spec.name for spec in FIELDS]
    assert schema["properties"]["top_p"] == {
        "type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 0.95,
        "description": FIELDS_BY_NAME["top_p"].description}
    assert schema["properties"]["seed"]["type"] == ["integer", "null"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"prompt": "x", "extra": 1}, schema)


def test_markdown_lists_every_field():
    table = fields_markdown()
    for spec in FIELDS:
        assert f"| `{spec.name}` |" in table
    assert "| `top_p` | number | `0.95` | > 0 and <= 1 | `top_p` (TYPE_FP32) |" in table


# --- lengths checked by the tokenizer model ---

def test_lengths_at_the_limits_are_accepted():
    check_lengths(100, 28, max_input_len=100, max_seq_len=128)


def test_a_prompt_over_max_input_len_names_the_prompt_and_the_limit():
    with pytest.raises(RequestError) as caught:
        check_lengths(101, 1, max_input_len=100, max_seq_len=4096)
    assert caught.value.field == "prompt"
    assert str(caught.value) == "prompt must be at most 100 tokens (the engine's max_input_len), got 101 tokens"


def test_max_tokens_over_the_room_left_names_max_tokens_and_max_seq_len():
    with pytest.raises(RequestError) as caught:
        check_lengths(100, 29, max_input_len=100, max_seq_len=128)
    assert caught.value.field == "max_tokens"
    assert str(caught.value) == ("max_tokens must be <= 28 (the engine's max_seq_len 128 minus "
                                 "the prompt's 100 tokens), got 29")


# --- ensemble inputs ---

# TensorRT-LLM triton_backend/all_models/inflight_batcher_llm/ensemble/config.pbtxt.
ENSEMBLE = {
    "text_input": "TYPE_STRING", "max_tokens": "TYPE_INT32", "stream": "TYPE_BOOL",
    "temperature": "TYPE_FP32", "top_k": "TYPE_INT32", "top_p": "TYPE_FP32", "seed": "TYPE_UINT64",
    "stop_words": "TYPE_STRING", "repetition_penalty": "TYPE_FP32", "presence_penalty": "TYPE_FP32",
    "frequency_penalty": "TYPE_FP32", "min_tokens": "TYPE_INT32", "ignore_eos": "TYPE_BOOL",
    "stop_token_ids": "TYPE_INT32", "include_stop_str_in_output": "TYPE_BOOL",
    "skip_special_tokens": "TYPE_BOOL", "exclude_input_in_output": "TYPE_BOOL",
}
NUMPY = {"TYPE_STRING": np.object_, "TYPE_INT32": np.int32, "TYPE_BOOL": np.bool_,
         "TYPE_FP32": np.float32, "TYPE_UINT64": np.uint64}


def test_every_field_feeds_an_ensemble_input_of_the_right_type():
    assert {spec.tensor: spec.tensor_dtype for spec in FIELDS if spec.tensor} == ENSEMBLE
    # response_format alone has no tensor of its own: it feeds the guided decoding pair
    assert [spec.name for spec in FIELDS if not spec.tensor] == ["response_format"]


@pytest.mark.parametrize("response_format, guide", [
    ({"type": "json_object"}, (b"json", b"")),
    ({"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "integer"}}},
     (b"json_schema", b'{"type": "integer"}')),
    ({"type": "text"}, None),
    (None, None),
])
def test_response_format_feeds_the_guided_decoding_inputs(response_format, guide):
    inputs = ensemble_inputs(parse_request({"prompt": "x", "response_format": response_format}))
    if guide is None:
        assert "guided_decoding_guide_type" not in inputs and "guided_decoding_guide" not in inputs
        return
    assert (inputs["guided_decoding_guide_type"].tolist(), inputs["guided_decoding_guide"].tolist()) \
        == ([[guide[0]]], [[guide[1]]])


def test_ensemble_inputs_have_the_ensemble_dtypes_and_a_batch_of_one():
    request = parse_request({"prompt": "Salut ☃", "stop": ["\n", "END"], "seed": 2**64 - 1,
                             "max_tokens": 7, "stream": False, "top_k": 3, "temperature": 0.5,
                             "stop_token_ids": [2, 5, 9], "min_tokens": 7})
    inputs = ensemble_inputs(request)
    assert set(inputs) == set(ENSEMBLE)
    for name, array in inputs.items():
        assert array.dtype == NUMPY[ENSEMBLE[name]], name
        lists = {"stop_words": (1, 2), "stop_token_ids": (1, 3)}
        assert array.shape == lists.get(name, (1, 1)), name
    assert inputs["stop_token_ids"].tolist() == [[2, 5, 9]] and inputs["min_tokens"][0, 0] == 7
    assert inputs["text_input"][0, 0] == "Salut ☃".encode()
    assert list(inputs["stop_words"][0]) == [b"\n", b"END"]
    assert int(inputs["seed"][0, 0]) == 2**64 - 1
    assert (inputs["max_tokens"][0, 0], inputs["stream"][0, 0], inputs["top_k"][0, 0]) == (7, False, 3)
    assert inputs["temperature"][0, 0] == np.float32(0.5)


def test_unset_optional_fields_are_not_sent():
    inputs = ensemble_inputs(parse_request({"prompt": "x"}))
    assert "seed" not in inputs and "stop_words" not in inputs and "stop_token_ids" not in inputs


def test_temperature_zero_is_sent_as_greedy_top_k():
    inputs = ensemble_inputs(parse_request({"prompt": "x", "temperature": 0, "top_k": 40}))
    assert inputs["top_k"][0, 0] == 1
    assert inputs["temperature"][0, 0] == 1.0
