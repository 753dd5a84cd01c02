"""The `predict` request: field table, validation, Triton ensemble inputs and length checks.

FIELDS is the single source of truth. Validation, the JSON Schema (for OpenAPI or
pydantic), the docs table and the ensemble tensors are all derived from it, so the
Python client, the HTTP gateway and the Triton tokenizer model cannot drift apart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from mixtral_triton.protocol.errors import RequestError
from mixtral_triton.protocol.guided import (
    GUIDE_FIELD, RESPONSE_FORMAT_SCHEMA, TYPE_FIELD, Guide, guide_inputs, guide_of_response_format)

# Bounds of the ensemble's tensor types, so that no accepted value overflows on the wire.
INT32_MAX = 2**31 - 1
UINT64_MAX = 2**64 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)

MAX_STOPS = 16
MAX_STOP_CHARS = 128

REQUIRED = object()  # the default of a field the request must carry


@dataclass(frozen=True)
class FieldSpec:
    name: str
    # "string", "boolean", "integer", "number", "stop" (a string or a list of them),
    # "token_ids" (a list of token ids) or "response_format" (OpenAI's, read as a guide)
    kind: str
    default: Any
    description: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    # the input of TensorRT-LLM's `ensemble` model it feeds (None: response_format, which
    # feeds the guided decoding pair, ensemble_inputs)
    tensor: str | None = None
    tensor_dtype: str | None = None  # that input's Triton data type
    # Older ensemble input names of the same field (genai-perf sends `min_length`)
    tensor_aliases: tuple[str, ...] = ()

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def bounds_rule(self) -> str | None:
        """The bounds as the error messages state them, e.g. '> 0 and <= 1'."""
        parts = []
        if self.minimum is not None:
            parts.append(f"{'>' if self.exclusive_minimum else '>='} {_number(self.minimum)}")
        if self.maximum is not None:
            parts.append(f"{'<' if self.exclusive_maximum else '<='} {_number(self.maximum)}")
        return " and ".join(parts) or None


# Tensor names and data types: triton_backend/all_models/inflight_batcher_llm/ensemble/config.pbtxt
# of TensorRT-LLM where the field is one of its inputs (dims [1], stop_words [-1]); the
# vLLM sampling extensions it lacks (ignore_eos, stop_token_ids, include_stop_str_in_output,
# skip_special_tokens) are inputs of this project's ensemble under vLLM's names.
FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("prompt", "string", REQUIRED, "The text to complete (non-empty).",
              tensor="text_input", tensor_dtype="TYPE_STRING"),
    FieldSpec("stream", "boolean", True, "Return the completion in pieces as it is generated.",
              tensor="stream", tensor_dtype="TYPE_BOOL"),
    FieldSpec("max_tokens", "integer", 128, "The most tokens to generate.",
              minimum=1, maximum=INT32_MAX, tensor="max_tokens", tensor_dtype="TYPE_INT32"),
    FieldSpec("temperature", "number", 1.0, "Sampling temperature; 0 means greedy decoding.",
              minimum=0, tensor="temperature", tensor_dtype="TYPE_FP32"),
    FieldSpec("top_p", "number", 0.95, "Nucleus sampling: keep the most likely tokens whose "
              "probabilities add up to top_p; 1 keeps all.",
              minimum=0, exclusive_minimum=True, maximum=1, tensor="top_p", tensor_dtype="TYPE_FP32"),
    FieldSpec("top_k", "integer", 50, "Sample from the top_k most likely tokens; 1 is greedy, "
              "0 means no top-k cut (the whole vocabulary, as in Hugging Face).",
              minimum=0, maximum=INT32_MAX, tensor="top_k", tensor_dtype="TYPE_INT32"),
    FieldSpec("stop", "stop", None, f"A string or a list of at most {MAX_STOPS} non-empty strings "
              f"of at most {MAX_STOP_CHARS} characters; generation ends before the first one, "
              "which is not returned (unless include_stop_str_in_output).",
              tensor="stop_words", tensor_dtype="TYPE_STRING"),
    FieldSpec("seed", "integer", None, "Random seed for sampling; omit for a random one.",
              minimum=0, maximum=UINT64_MAX, tensor="seed", tensor_dtype="TYPE_UINT64"),
    FieldSpec("repetition_penalty", "number", 1.0, "Divides the scores of tokens already seen "
              "(1 disables it).",
              minimum=0, exclusive_minimum=True, tensor="repetition_penalty", tensor_dtype="TYPE_FP32"),
    FieldSpec("presence_penalty", "number", 0.0, "Subtracted once from the score of every token "
              "already generated (as in OpenAI).",
              minimum=-2, maximum=2, tensor="presence_penalty", tensor_dtype="TYPE_FP32"),
    FieldSpec("frequency_penalty", "number", 0.0, "Subtracted from a token's score once per time "
              "it was generated (as in OpenAI).",
              minimum=-2, maximum=2, tensor="frequency_penalty", tensor_dtype="TYPE_FP32"),
    FieldSpec("min_tokens", "integer", 0, "Generate at least this many tokens before the end "
              "token may end the completion (at most max_tokens; a stop string still ends it).",
              minimum=0, maximum=INT32_MAX, tensor="min_tokens", tensor_dtype="TYPE_INT32",
              tensor_aliases=("min_length",)),
    FieldSpec("ignore_eos", "boolean", False, "Never end on the end token: generate max_tokens "
              "tokens unless a stop string or stop token ends the completion first.",
              tensor="ignore_eos", tensor_dtype="TYPE_BOOL"),
    FieldSpec("stop_token_ids", "token_ids", None, f"At most {MAX_STOPS} token ids that end the "
              "completion when generated (the token's text is returned, as in vLLM; a special "
              "token's text is empty).",
              minimum=0, maximum=INT32_MAX, tensor="stop_token_ids", tensor_dtype="TYPE_INT32"),
    FieldSpec("include_stop_str_in_output", "boolean", False, "Return the stop string that "
              "ended the completion at its end.",
              tensor="include_stop_str_in_output", tensor_dtype="TYPE_BOOL"),
    FieldSpec("skip_special_tokens", "boolean", True, "Leave special tokens (such as </s>) out "
              "of the text; false writes them as their text.",
              tensor="skip_special_tokens", tensor_dtype="TYPE_BOOL"),
    FieldSpec("exclude_input_in_output", "boolean", True, "false returns the prompt first, "
              "then the completion (OpenAI's echo).",
              tensor="exclude_input_in_output", tensor_dtype="TYPE_BOOL"),
    FieldSpec("response_format", "response_format", None, "Structured output, in OpenAI's shape: "
              '{"type": "json_object"} (a JSON object), {"type": "json_schema", "json_schema": '
              '{"name": ..., "schema": {...}}} (JSON valid against the schema) or {"type": "text"}. '
              "A schema that does not compile is refused before any generation.",
              tensor_dtype="TYPE_STRING"),
)
FIELDS_BY_NAME = {spec.name: spec for spec in FIELDS}


@dataclass(frozen=True)
class PredictRequest:
    """A validated request; build it with parse_request (the defaults live in FIELDS)."""

    prompt: str
    stream: bool
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...]
    seed: int | None
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    min_tokens: int
    ignore_eos: bool
    stop_token_ids: tuple[int, ...]
    include_stop_str_in_output: bool
    skip_special_tokens: bool
    exclude_input_in_output: bool
    # The guide response_format asks for (the OpenAI routes put here the guide of whichever of
    # their guide fields gave one).
    response_format: Guide | None


def parse_request(body: Any) -> PredictRequest:
    """Validate a decoded JSON body; raise RequestError at the first bad field."""
    if not isinstance(body, Mapping):
        raise RequestError(None, f"the request must be a JSON object, got {_show(body)}")
    for name in body:
        if name not in FIELDS_BY_NAME:
            raise RequestError(str(name), f"unknown field {_show(name)}; "
                               f"the fields are {', '.join(FIELDS_BY_NAME)}")
    values = {}
    for spec in FIELDS:
        if spec.name not in body:
            if spec.required:
                raise RequestError(spec.name, f"{spec.name} is required")
            values[spec.name] = spec.default
        else:
            values[spec.name] = _check(spec, body[spec.name])
    values["stop"] = values["stop"] or ()
    values["stop_token_ids"] = values["stop_token_ids"] or ()
    if values["min_tokens"] > values["max_tokens"]:
        raise RequestError("min_tokens", f"min_tokens must be <= max_tokens ({values['max_tokens']}), "
                           f"got {values['min_tokens']}")
    return PredictRequest(**values)


def _check(spec: FieldSpec, value: Any) -> Any:
    def fail(rule: str):
        return RequestError(spec.name, f"{spec.name} must be {rule}, got {_show(value)}")

    # null is accepted only where it is the default (it means "not given").
    if value is None and spec.default is None:
        return None
    if spec.kind == "string":
        if not isinstance(value, str) or not value:
            raise fail("a non-empty string")
        if not _is_unicode(value):
            raise fail(VALID_TEXT)
        return value
    if spec.kind == "boolean":
        if not isinstance(value, bool):
            raise fail("a boolean")
        return value
    if spec.kind == "stop":
        return _check_stop(spec, value, fail)
    if spec.kind == "token_ids":
        return _check_token_ids(spec, value, fail)
    if spec.kind == "response_format":
        return guide_of_response_format(value)
    # bool is a subclass of int in Python, but true is not a number in the API.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail("an integer" if spec.kind == "integer" else "a number")
    if spec.kind == "integer" and not isinstance(value, int):
        raise fail("an integer")
    # A number must also survive the FP32 tensor it is sent in (this rejects NaN and inf too).
    if spec.kind == "number" and not abs(value) <= FLOAT32_MAX:
        raise fail("a finite number")
    if not _within(spec, value):
        raise fail(spec.bounds_rule)
    return float(value) if spec.kind == "number" else value


def _check_stop(spec: FieldSpec, value: Any, fail) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOPS:
        raise fail(f"a string or a list of at most {MAX_STOPS} strings")
    for i, stop in enumerate(stops):
        where = spec.name if isinstance(value, str) else f"{spec.name}[{i}]"
        if not isinstance(stop, str) or not stop or len(stop) > MAX_STOP_CHARS:
            raise RequestError(spec.name, f"{where} must be a non-empty string of at most "
                               f"{MAX_STOP_CHARS} characters, got {_show(stop)}")
        if not _is_unicode(stop):
            raise RequestError(spec.name, f"{where} must be {VALID_TEXT}, got {_show(stop)}")
    return tuple(stops)


def _check_token_ids(spec: FieldSpec, value: Any, fail) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > MAX_STOPS:
        raise fail(f"a list of at most {MAX_STOPS} token ids")
    for i, token in enumerate(value):
        if isinstance(token, bool) or not isinstance(token, int) or not _within(spec, token):
            raise RequestError(spec.name, f"{spec.name}[{i}] must be a token id {spec.bounds_rule}, "
                               f"got {_show(token)}")
    return tuple(value)


# JSON can spell a lone UTF-16 surrogate ("\ud800"), and a body of invalid UTF-8 decoded
# with surrogateescape holds them too: neither is text that UTF-8 (the wire) can carry.
VALID_TEXT = "valid UTF-8 text (no lone surrogates or invalid bytes)"


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _within(spec: FieldSpec, value: float) -> bool:
    if spec.minimum is not None:
        if value < spec.minimum or (spec.exclusive_minimum and value == spec.minimum):
            return False
    if spec.maximum is not None:
        if value > spec.maximum or (spec.exclusive_maximum and value == spec.maximum):
            return False
    return True


def check_lengths(prompt_tokens: int, max_tokens: int, *, max_input_len: int, max_seq_len: int) -> None:
    """The engine's limits, checked by the tokenizer model once the prompt is tokenized."""
    if prompt_tokens > max_input_len:
        raise RequestError("prompt", f"prompt must be at most {max_input_len} tokens "
                           f"(the engine's max_input_len), got {prompt_tokens} tokens")
    room = max_seq_len - prompt_tokens
    if max_tokens > room:
        raise RequestError("max_tokens", f"max_tokens must be <= {room} (the engine's max_seq_len "
                           f"{max_seq_len} minus the prompt's {prompt_tokens} tokens), got {max_tokens}")


def ensemble_inputs(request: PredictRequest) -> dict[str, np.ndarray]:
    """The inputs of TensorRT-LLM's `ensemble` model for one request (batch of 1).

    Optional fields left unset (seed, stop, stop_token_ids) are not sent, so the server's
    default applies.
    """
    values = {spec.name: getattr(request, spec.name) for spec in FIELDS}
    if request.temperature == 0:
        # TensorRT-LLM is greedy when top_k is 1; the temperature then plays no part, and a
        # temperature of 0 would divide the logits by zero.
        values.update(temperature=1.0, top_k=1)
    inputs = {}
    for spec in FIELDS:
        value = values[spec.name]
        if value is None or value == ():
            continue
        if spec.kind == "response_format":
            inputs.update(guide_inputs(value))
        elif spec.kind == "token_ids":
            inputs[spec.tensor] = np.array([list(value)], dtype=np.int32)
        elif spec.tensor_dtype == "TYPE_STRING":
            items = [value] if isinstance(value, str) else list(value)
            inputs[spec.tensor] = np.array([[item.encode("utf-8") for item in items]], dtype=object)
        else:
            inputs[spec.tensor] = np.array([[value]], dtype=_NUMPY_DTYPES[spec.tensor_dtype])
    return inputs


_NUMPY_DTYPES = {"TYPE_BOOL": np.bool_, "TYPE_INT32": np.int32, "TYPE_UINT64": np.uint64,
                 "TYPE_FP32": np.float32}
_JSON_TYPES = {"string": "string", "boolean": "boolean", "integer": "integer", "number": "number"}


def json_schema() -> dict:
    """JSON Schema of the request body (usable as an OpenAPI 3.1 schema or for pydantic)."""
    properties = {}
    for spec in FIELDS:
        if spec.kind == "stop":
            item = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
            schema = {"anyOf": [item, {"type": "array", "items": item, "maxItems": MAX_STOPS},
                                {"type": "null"}]}
        elif spec.kind == "token_ids":
            item = {"type": "integer", "minimum": spec.minimum, "maximum": spec.maximum}
            schema = {"anyOf": [{"type": "array", "items": item, "maxItems": MAX_STOPS}, {"type": "null"}]}
        elif spec.kind == "response_format":
            schema = dict(RESPONSE_FORMAT_SCHEMA)
        else:
            schema = {"type": _JSON_TYPES[spec.kind]}
            if spec.default is None:
                schema = {"type": [schema["type"], "null"]}
        if spec.kind == "string":
            schema["minLength"] = 1
        bounds = () if spec.kind == "token_ids" else ((spec.minimum, "minimum", spec.exclusive_minimum),
                                                       (spec.maximum, "maximum", spec.exclusive_maximum))
        for bound, key, exclusive in bounds:
            if bound is not None:
                schema[f"exclusive{key.title()}" if exclusive else key] = bound
        if not spec.required:
            schema["default"] = spec.default
        schema["description"] = spec.description
        properties[spec.name] = schema
    return {"type": "object", "properties": properties,
            "required": [spec.name for spec in FIELDS if spec.required],
            "additionalProperties": False}


def fields_markdown() -> str:
    """The field table for the docs."""
    rows = ["| field | type | default | bounds | ensemble input | description |",
            "| --- | --- | --- | --- | --- | --- |"]
    for spec in FIELDS:
        default = "required" if spec.required else f"`{json.dumps(spec.default)}`"
        kind = {"stop": "string or list of strings", "token_ids": "list of integers",
                "response_format": "object"}.get(spec.kind, spec.kind)
        tensors = (spec.tensor, *spec.tensor_aliases) if spec.tensor else (TYPE_FIELD, GUIDE_FIELD)
        rows.append(f"| `{spec.name}` | {kind} | {default} | {spec.bounds_rule or ''} "
                    f"| {', '.join(f'`{name}`' for name in tensors)} "
                    f"({spec.tensor_dtype}) | {spec.description} |")
    return "\n".join(rows) + "\n"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _show(value: Any, limit: int = 60) -> str:
    """The value as JSON would spell it, cut short so that a huge prompt stays out of logs."""
    try:
        try:
            text = json.dumps(value, ensure_ascii=False)
            if not _is_unicode(text):  # lone surrogates: spelled as JSON escapes instead
                text = json.dumps(value)
        except (TypeError, ValueError):
            text = repr(value)
    except RecursionError:
        text = f"a {type(value).__name__} nested too deeply to show"
    return text if len(text) <= limit else text[:limit] + "..."
