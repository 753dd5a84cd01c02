"""What the gateway's routes accept and answer: the predict (Truss) contract and the OpenAI
completions and chat wire formats.

Requests are validated by mixtral_triton.protocol.parse_request itself (an OpenAI body is
first mapped onto the predict fields), so a bad value gets the very message, naming the
very field, whichever route or client it came through. The request schemas in the
OpenAPI document are generated from the same field table (json_schema()); responses are
pydantic models. The `Format` classes write a generation's chunks in each wire format.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from pydantic import BaseModel, Field

from mixtral_triton.client.ensemble import Chunk
from mixtral_triton.protocol import FIELDS, FIELDS_BY_NAME, PredictRequest, RequestError, json_schema, parse_request

# ---------------------------------------------------------------------------------------
# Errors


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, "
                      "rate_limit_error, server_error or service_unavailable")
    field: str | None = Field(None, description="the request field at fault, if any")
    param: str | None = Field(None, description="OpenAI routes: the same as field")
    code: str | None = Field(None, description="OpenAI routes: always null")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class GatewayError(Exception):
    """An error answered with an HTTP status and the JSON error body."""

    def __init__(self, status: int, type_: str, message: str, field: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.type, self.message, self.field = status, type_, message, field
        self.headers = dict(headers or {})

    @classmethod
    def of_request_error(cls, exc: RequestError) -> "GatewayError":
        if isinstance(exc, ModelNotFound):
            return cls(404, "not_found_error", str(exc), exc.field)
        return cls(400, "invalid_request_error", str(exc), exc.field)

    def body(self, openai: bool) -> dict:
        """The predict routes' {"message", "type", "field"}; OpenAI's routes add its own
        names, `param` (= field) and `code`, so that OpenAI clients read them."""
        error = {"message": self.message, "type": self.type, "field": self.field}
        if openai:
            error.update(param=self.field, code=None)
        return {"error": error}


# ---------------------------------------------------------------------------------------
# The predict contract


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class PredictResponse(BaseModel):
    """The answer to `stream: false`."""

    result: str
    finish_reason: str = Field(description="stop, length or cancelled")
    usage: Usage


def predict_request_schema() -> dict:
    return json_schema()


def usage_of(last: Chunk) -> dict:
    return {"prompt_tokens": last.prompt_tokens, "completion_tokens": last.completion_tokens,
            "total_tokens": last.prompt_tokens + last.completion_tokens}


# ---------------------------------------------------------------------------------------
# OpenAI requests: mapped onto the predict fields, then parse_request.

# The predict fields OpenAI's requests take under the same names and rules: OpenAI's own
# sampling fields and vLLM's extensions (ignore_eos, min_tokens, top_k, ...). Not the
# prompt, and not exclude_input_in_output, which OpenAI spells `echo`.
SAMPLING_FIELDS = tuple(spec.name for spec in FIELDS
                        if spec.name not in ("prompt", "stream", "exclude_input_in_output"))
# Where OpenAI's defaults differ from the predict API's (which are Truss's).
OPENAI_DEFAULTS = {"stream": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS = FIELDS_BY_NAME["max_tokens"].default
ROUTES = ("completions", "chat")
# The sampling fields that are vLLM's extensions of OpenAI's requests (clients send them in
# `extra_body`).
VLLM_EXTENSIONS = ("top_k", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
                   "include_stop_str_in_output", "skip_special_tokens")


@dataclass(frozen=True)
class OpenAIField:
    """A field of OpenAI's request schemas that is not a predict field. `accepts` says
    which values are served (null, "not given", always is); a field whose every value is
    served is honoured or a no-op; another value is refused naming the field, saying
    `rule`."""

    name: str
    routes: tuple[str, ...]
    treatment: str  # what the docs table says it gets
    accepts: Any = None  # value -> bool; None: any value
    rule: str = ""


def _one_of(*values):
    return lambda value: any(value == v and type(value) is type(v) for v in values)


def _is(kind):
    return lambda value: isinstance(value, kind) and not (kind is int and isinstance(value, bool))


_BOTH = ROUTES
_CHAT = ("chat",)
_COMPLETIONS = ("completions",)
OPENAI_FIELDS: tuple[OpenAIField, ...] = (
    OpenAIField("model", _BOTH, "checked: the served model's name (GET /v1/models); another "
                "name is a 404", _is(str), "must be a string"),
    OpenAIField("prompt", _COMPLETIONS, "honoured: a string, or a list of one string",
                rule="must be a string or a list of one string (one prompt per request)"),
    OpenAIField("messages", _CHAT, "honoured: rendered with the model's chat template; text "
                "content only"),
    OpenAIField("stream", _BOTH, "honoured"),
    OpenAIField("max_completion_tokens", _CHAT, "honoured: the same as max_tokens (give one)"),
    OpenAIField("echo", _COMPLETIONS, "honoured: the prompt, then the completion "
                "(the ensemble's exclude_input_in_output false)", _is(bool), "must be a boolean"),
    OpenAIField("stream_options", _BOTH, "honoured: include_usage (a last chunk with the usage), "
                "vLLM's continuous_usage_stats (usage on every chunk); include_obfuscation "
                "false only (no obfuscation padding)"),
    OpenAIField("n", _BOTH, "1 only (one completion per request)", _one_of(1),
                "must be 1 (one completion per request)"),
    OpenAIField("best_of", _COMPLETIONS, "1 only (one candidate per request)", _one_of(1),
                "must be 1 (one candidate per request)"),
    OpenAIField("logprobs", _COMPLETIONS, "null only: log probabilities are not returned",
                _one_of(), "must be null: log probabilities are not returned"),
    OpenAIField("logprobs", _CHAT, "false only: log probabilities are not returned", _one_of(False),
                "must be false: log probabilities are not returned"),
    OpenAIField("top_logprobs", _CHAT, "0 only: log probabilities are not returned", _one_of(0),
                "must be 0: log probabilities are not returned"),
    OpenAIField("logit_bias", _BOTH, "{} only: no logit bias is applied", _one_of({}),
                "must be empty: no logit bias is applied"),
    OpenAIField("suffix", _COMPLETIONS, "\"\" only: no insertion after a suffix", _one_of(""),
                "must be empty: this model does not complete text before a suffix"),
    OpenAIField("user", _BOTH, "no-op: a label of the end user, logged with the request",
                _is(str), "must be a string"),
    OpenAIField("safety_identifier", _CHAT, "no-op: a label of the end user", _is(str),
                "must be a string"),
    OpenAIField("metadata", _CHAT, "no-op: labels (nothing is stored)", _is(dict), "must be an object"),
    OpenAIField("prompt_cache_key", _CHAT, "no-op: a cache routing hint", _is(str), "must be a string"),
    OpenAIField("prompt_cache_retention", _CHAT, "no-op: a cache hint", _one_of("in_memory", "24h"),
                'must be "in_memory" or "24h"'),
    OpenAIField("prompt_cache_options", _CHAT, "no-op: a cache hint", _is(dict), "must be an object"),
    OpenAIField("prediction", _CHAT, "no-op: a latency hint; the output is the same", _is(dict),
                "must be an object"),
    OpenAIField("parallel_tool_calls", _CHAT, "no-op: no tools are served", _is(bool),
                "must be a boolean"),
    OpenAIField("store", _CHAT, "false only: nothing is stored", _one_of(False),
                "must be false: this server stores no completions"),
    OpenAIField("service_tier", _CHAT, '"auto" or "default" only', _one_of("auto", "default"),
                'must be "auto" or "default": this server has one processing tier'),
    OpenAIField("tools", _CHAT, "null only: tool calls are not served", _one_of(),
                "must be null: tool calls are not served"),
    OpenAIField("tool_choice", _CHAT, '"none" only: tool calls are not served', _one_of("none"),
                'must be "none": tool calls are not served'),
    OpenAIField("functions", _CHAT, "null only: function calls are not served", _one_of(),
                "must be null: function calls are not served"),
    OpenAIField("function_call", _CHAT, '"none" only: function calls are not served',
                _one_of("none"), 'must be "none": function calls are not served'),
    OpenAIField("response_format", _CHAT, '{"type": "text"} only: no JSON mode or schema',
                _one_of({"type": "text"}), 'must be {"type": "text"}: JSON output is not enforced'),
    OpenAIField("modalities", _CHAT, '["text"] only', _one_of(["text"]),
                'must be ["text"]: this model writes text only'),
    OpenAIField("audio", _CHAT, "null only: no audio output", _one_of(),
                "must be null: this model writes text only"),
    OpenAIField("reasoning_effort", _CHAT, '"none" only: not a reasoning model', _one_of("none"),
                'must be "none": Mixtral is not a reasoning model'),
    OpenAIField("verbosity", _CHAT, '"medium" only (the default)', _one_of("medium"),
                'must be "medium": the answer\'s length is not steered'),
    OpenAIField("web_search_options", _CHAT, "null only: no web search", _one_of(),
                "must be null: this server has no web search"),
    OpenAIField("moderation", _CHAT, "null only: no moderation is run", _one_of(),
                "must be null: this server runs no moderation"),
)
# Fields whose values the request mapping reads itself (after the checks above).
_MAPPED = ("model", "prompt", "messages", "stream", "max_completion_tokens", "echo", "stream_options")


def openai_fields(route: str) -> dict[str, OpenAIField]:
    return {f.name: f for f in OPENAI_FIELDS if route in f.routes}


class ModelNotFound(RequestError):
    """`model` names a model this gateway does not serve (404, as OpenAI answers)."""


@dataclass(frozen=True)
class OpenAIRequest:
    predict: PredictRequest  # validated by parse_request
    include_usage: bool = False  # stream_options.include_usage
    continuous_usage: bool = False  # stream_options.continuous_usage_stats (vLLM)
    user: str | None = None  # logged with the request
    # OpenAI's field names where they differ from the predict fields, for the errors the
    # server finds later (the prompt is too long, max_tokens leaves no room)
    names: dict[str, str] = field(default_factory=dict)

    def rename(self, exc: RequestError) -> RequestError:
        return rename_error(exc, self.names)


def rename_error(exc: RequestError, names: Mapping[str, str]) -> RequestError:
    """A predict field's error in the request's own field names ("prompt" is a chat's
    "messages")."""
    name = names.get(exc.field or "")
    if name is None:
        return exc
    message = str(exc)
    if message.startswith(exc.field):
        message = name + message[len(exc.field):]
    return RequestError(name, message)


def parse_completion_request(body: Any, model_name: str) -> OpenAIRequest:
    body = _check_fields(body, "completions")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    elif isinstance(prompt, list):
        raise RequestError("prompt", "prompt must be a string or a list of one string "
                           f"(one prompt per request), got a list of {len(prompt)} items")
    return _openai_request(body, model_name, prompt, COMPLETIONS_MAX_TOKENS, {})


def parse_chat_request(body: Any, model_name: str, render) -> OpenAIRequest:
    """`render(messages) -> str` is the model's chat template (mixtral_triton.gateway.chat)."""
    body = _check_fields(body, "chat")
    _check_model(body, model_name)  # a request for another model is a 404 whatever else it says
    messages = _check_messages(body.get("messages"))
    names = {"prompt": "messages"}
    if "max_completion_tokens" in body:
        if "max_tokens" in body:
            raise RequestError("max_completion_tokens", "give max_tokens or max_completion_tokens, not both")
        body = dict(body)
        body["max_tokens"] = body.pop("max_completion_tokens")
        names["max_tokens"] = "max_completion_tokens"
    return _openai_request(body, model_name, render(messages), CHAT_MAX_TOKENS, names)


def _check_fields(body: Any, route: str) -> Mapping:
    if not isinstance(body, Mapping):
        parse_request(body)  # raises parse_request's own error for a body that is no object
    own = openai_fields(route)
    for name, value in body.items():
        if name in SAMPLING_FIELDS:
            continue
        spec = own.get(name)
        if spec is None:
            raise RequestError(str(name), f"unknown field {json.dumps(name)}; the fields are "
                               f"{', '.join([*own, *SAMPLING_FIELDS])}")
        if value is not None and spec.accepts is not None and not spec.accepts(value):
            raise RequestError(name, f"{name} {spec.rule}, got {json.dumps(value)[:60]}")
    return body


def _check_model(body: Mapping, model_name: str) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError("model", f"model must be a string, got {json.dumps(model)[:60]}")
    if model is not None and model != model_name:
        raise ModelNotFound("model", f"the model {json.dumps(model)[:80]} does not exist; this "
                            f"server serves {json.dumps(model_name)}")


def _openai_request(body: Mapping, model_name: str, prompt: Any, max_tokens: int,
                    names: dict[str, str]) -> OpenAIRequest:
    _check_model(body, model_name)
    predict = {"max_tokens": max_tokens, **OPENAI_DEFAULTS}
    if prompt is not None:  # else parse_request's own "prompt is required"
        predict["prompt"] = prompt
    # null means "not given" for OpenAI's fields (`stop: null`): the default applies
    predict.update({name: body[name] for name in ("stream",) + SAMPLING_FIELDS
                    if body.get(name) is not None})
    if body.get("echo") is not None:
        predict["exclude_input_in_output"] = not body["echo"]
    try:
        request = parse_request(predict)
    except RequestError as exc:
        raise rename_error(exc, names) from None
    include_usage, continuous_usage = _stream_options(body, request.stream)
    user = body.get("user")
    return OpenAIRequest(request, include_usage, continuous_usage, user, names)


STREAM_OPTIONS = {"include_usage": None, "continuous_usage_stats": None, "include_obfuscation": False}


def _stream_options(body: Mapping, stream: bool) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats) of stream_options."""
    options = body.get("stream_options")
    if options is None:
        return False, False
    if not stream:
        raise RequestError("stream_options", "stream_options is only allowed when stream is true")
    if not isinstance(options, Mapping) or set(options) - set(STREAM_OPTIONS):
        raise RequestError("stream_options", "stream_options must be an object with only "
                           f"{', '.join(STREAM_OPTIONS)}, got {json.dumps(options)[:60]}")
    for name, only in STREAM_OPTIONS.items():
        value = options.get(name, False)
        if not isinstance(value, bool) or (only is not None and value != only):
            rule = "a boolean" if only is None else json.dumps(only)
            raise RequestError("stream_options", f"stream_options.{name} must be {rule}, "
                               f"got {json.dumps(value)[:60]}")
    return options.get("include_usage", False), options.get("continuous_usage_stats", False)


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages", "messages must be a non-empty list of {role, content} objects")
    checked = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping) or set(message) - {"role", "content", "name"}:
            raise RequestError("messages", f"{where} must be an object with role, content and "
                               "optionally name")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise RequestError("messages", f"{where}.role must be a non-empty string")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, Mapping) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise RequestError("messages", f"{where}.content parts must all be "
                                   '{"type": "text", "text": ...} (text only)')
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise RequestError("messages", f"{where}.content must be a string or a list of text parts")
        checked.append({**message, "role": role, "content": content})
    return checked


def _sampling_schema(overrides: dict[str, Any]) -> dict:
    properties = json_schema()["properties"]
    out = {}
    for name in ("stream",) + SAMPLING_FIELDS:
        schema = dict(properties[name])
        if name in overrides:
            schema["default"] = overrides[name]
        out[name] = schema
    return out


_STREAM_OPTIONS_SCHEMA = {
    "anyOf": [{"type": "object", "additionalProperties": False, "properties": {
        "include_usage": {"type": "boolean"}, "continuous_usage_stats": {"type": "boolean"},
        "include_obfuscation": {"type": "boolean", "enum": [False]}}}, {"type": "null"}]}


def _openai_field_schemas(route: str) -> dict:
    """OpenAI's own fields, described by what they get (OPENAI_FIELDS); the ones with a
    structure of their own are spelled out below."""
    return {name: {"description": spec.treatment} for name, spec in openai_fields(route).items()}


def completion_request_schema() -> dict:
    prompt = json_schema()["properties"]["prompt"]
    properties = _openai_field_schemas("completions")
    properties["prompt"] = {"anyOf": [{"type": "string", "minLength": 1},
                                      {"type": "array", "items": {"type": "string", "minLength": 1},
                                       "minItems": 1, "maxItems": 1}],
                            "description": prompt["description"]}
    properties["stream_options"].update(_STREAM_OPTIONS_SCHEMA)
    properties.update(_sampling_schema({**OPENAI_DEFAULTS, "max_tokens": COMPLETIONS_MAX_TOKENS}))
    return {"type": "object", "required": ["prompt"], "additionalProperties": False,
            "properties": properties}


def chat_request_schema() -> dict:
    text_part = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
                 "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}}}
    message = {"type": "object", "required": ["role", "content"], "additionalProperties": False,
               "properties": {"role": {"type": "string", "minLength": 1},
                              "content": {"anyOf": [{"type": "string"},
                                                    {"type": "array", "items": text_part}]},
                              "name": {"type": "string"}}}
    sampling = _sampling_schema({**OPENAI_DEFAULTS, "max_tokens": CHAT_MAX_TOKENS})
    properties = _openai_field_schemas("chat")
    properties["messages"].update({"type": "array", "items": message, "minItems": 1})
    properties["stream_options"].update(_STREAM_OPTIONS_SCHEMA)
    properties["max_completion_tokens"].update(
        {k: v for k, v in sampling["max_tokens"].items() if k != "description"})
    properties.update(sampling)
    return {"type": "object", "required": ["messages"], "additionalProperties": False,
            "properties": properties}


def openai_fields_markdown() -> str:
    """The docs table (docs/openai.md): every field of OpenAI's completions and chat
    requests and what it gets here, then vLLM's extensions."""
    rows = ["| field | from | routes | what it gets |", "| --- | --- | --- | --- |"]
    names = {spec.name for spec in OPENAI_FIELDS}
    for name in sorted(names | set(SAMPLING_FIELDS)):
        for spec in (s for s in OPENAI_FIELDS if s.name == name):
            rows.append(f"| `{name}` | OpenAI | {', '.join(spec.routes)} | {spec.treatment} |")
        if name in SAMPLING_FIELDS:
            field = FIELDS_BY_NAME[name]
            source = "vLLM" if name in VLLM_EXTENSIONS else "OpenAI"
            rows.append(f"| `{name}` | {source} | completions, chat | honoured ({field.kind}"
                        f"{'; ' + field.bounds_rule if field.bounds_rule else ''}): {field.description} |")
    return "\n".join(rows) + "\n"


# ---------------------------------------------------------------------------------------
# OpenAI responses


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = Field(description="stop, length or cancelled; null until the last chunk")


class CompletionResponse(BaseModel):
    """Also each streamed chunk (`data: {...}` events, text in pieces, then `data: [DONE]`)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mixtral-triton"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------------------------------
# Formats: how a generation's chunks are written out.


class Format:
    """One response's wire format. Streaming formats write `opening()`, then `piece()` for
    each chunk's text, then `closing()` with the last chunk; whole formats answer `whole()`
    as JSON. `openai` picks the error body's names."""

    streaming = False
    media_type = "application/json"
    openai = False
    user: str | None = None  # OpenAI's `user` label, logged with the request

    def opening(self, first: Chunk) -> bytes:
        return b""

    def piece(self, chunk: Chunk) -> bytes:
        raise NotImplementedError

    def closing(self, last: Chunk) -> bytes:
        raise NotImplementedError

    def stream_error(self, error: GatewayError) -> bytes:
        raise NotImplementedError

    def whole(self, text: str, last: Chunk) -> dict:
        raise NotImplementedError

    def rename(self, exc: RequestError) -> RequestError:
        return exc


class PredictStream(Format):
    """`stream: true`: only the completion's text, chunk by chunk."""

    streaming = True
    media_type = "text/plain; charset=utf-8"

    def piece(self, chunk: Chunk) -> bytes:
        return chunk.text.encode("utf-8")

    def closing(self, last: Chunk) -> bytes:
        return last.text.encode("utf-8")

    def stream_error(self, error: GatewayError) -> bytes:
        return f"\n[error: {error.message}]\n".encode("utf-8")


class PredictWhole(Format):
    def whole(self, text: str, last: Chunk) -> dict:
        return {"result": text, "finish_reason": last.finish_reason, "usage": usage_of(last)}


_LINE_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}


class _OpenAIFormat(Format):
    openai = True
    object = ""

    def __init__(self, request: OpenAIRequest, model: str, prefix: str):
        self.request = request
        self.model = model
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.user = request.user
        if request.predict.stream:
            self.streaming = True
            self.media_type = "text/event-stream; charset=utf-8"

    def rename(self, exc: RequestError) -> RequestError:
        return self.request.rename(exc)

    def _event(self, data: dict, chunk: Chunk | None = None) -> bytes:
        """One event; with continuous_usage_stats a chunk's event carries its usage so far."""
        if chunk is not None and self.request.continuous_usage:
            data = {**data, "usage": usage_of(chunk)}
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        # Escaped, as JSON allows: line splitters such as Python's str.splitlines (requests'
        # iter_lines) break a line at these, which would cut an event's JSON in two.
        text = text.translate(_LINE_BREAKS)
        return f"data: {text}\n\n".encode("utf-8")

    def _head(self, object_: str) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def _closing_events(self, final: dict, last: Chunk) -> bytes:
        if self.request.include_usage:  # OpenAI's shape: a last chunk with no choices
            out = self._event(final, last) + self._event({**self._head(self.object), "choices": [],
                                                          "usage": usage_of(last)})
        else:  # the usage rides on the finishing chunk (an extension OpenAI clients ignore)
            out = self._event({**final, "usage": usage_of(last)})
        return out + b"data: [DONE]\n\n"

    def stream_error(self, error: GatewayError) -> bytes:
        return self._event(error.body(openai=True))


class CompletionFormat(_OpenAIFormat):
    object = "text_completion"

    def __init__(self, request: OpenAIRequest, model: str):
        super().__init__(request, model, "cmpl")

    def _chunk(self, text: str, finish_reason: str | None) -> dict:
        return {**self._head(self.object), "choices": [
            {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

    def piece(self, chunk: Chunk) -> bytes:
        return self._event(self._chunk(chunk.text, None), chunk)

    def closing(self, last: Chunk) -> bytes:
        return self._closing_events(self._chunk(last.text, last.finish_reason), last)

    def whole(self, text: str, last: Chunk) -> dict:
        return {**self._chunk(text, last.finish_reason), "usage": usage_of(last)}


class ChatFormat(_OpenAIFormat):
    object = "chat.completion.chunk"

    def __init__(self, request: OpenAIRequest, model: str):
        super().__init__(request, model, "chatcmpl")

    def _chunk(self, delta: dict, finish_reason: str | None) -> dict:
        return {**self._head(self.object), "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    def opening(self, first: Chunk) -> bytes:
        # the usage of no completion tokens yet: the prompt's
        return self._event(self._chunk({"role": "assistant", "content": ""}, None),
                           Chunk("", None, first.prompt_tokens, 0))

    def piece(self, chunk: Chunk) -> bytes:
        return self._event(self._chunk({"content": chunk.text}, None), chunk)

    def closing(self, last: Chunk) -> bytes:
        delta = {"content": last.text} if last.text else {}
        return self._closing_events(self._chunk(delta, last.finish_reason), last)

    def whole(self, text: str, last: Chunk) -> dict:
        return {**self._head("chat.completion"), "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
             "finish_reason": last.finish_reason}], "usage": usage_of(last)}
