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

# The sampling fields OpenAI's requests share with the predict API (same names, the
# predict rules): every predict field but the prompt and `stream`.
SAMPLING_FIELDS = tuple(spec.name for spec in FIELDS if spec.name not in ("prompt", "stream"))
# Where OpenAI's defaults differ from the predict API's (which are Truss's).
OPENAI_DEFAULTS = {"stream": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS = FIELDS_BY_NAME["max_tokens"].default
# OpenAI fields this server does not implement: refused by name, with a clearer word than
# "unknown".
NOT_SUPPORTED = ("best_of", "echo", "logit_bias", "logprobs", "suffix", "top_logprobs", "user",
                 "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls",
                 "response_format", "modalities", "audio", "prediction", "store", "metadata",
                 "service_tier", "reasoning_effort", "web_search_options")
_OWN = {"completions": ("model", "prompt", "stream", "n", "stream_options"),
        "chat": ("model", "messages", "stream", "n", "stream_options", "max_completion_tokens")}


class ModelNotFound(RequestError):
    """`model` names a model this gateway does not serve (404, as OpenAI answers)."""


@dataclass(frozen=True)
class OpenAIRequest:
    predict: PredictRequest  # validated by parse_request
    include_usage: bool = False  # stream_options.include_usage
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
    allowed = _OWN[route] + SAMPLING_FIELDS
    for name in body:
        if name in allowed:
            continue
        if name in NOT_SUPPORTED:
            raise RequestError(str(name), f"{name} is not supported by this server")
        raise RequestError(str(name), f"unknown field {json.dumps(name)}; the fields are "
                           f"{', '.join(allowed)}")
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
    n = body.get("n", 1)
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n != 1):
        raise RequestError("n", f"n must be 1 (one completion per request), got {json.dumps(n)[:60]}")
    predict = {"max_tokens": max_tokens, **OPENAI_DEFAULTS}
    if prompt is not None:  # else parse_request's own "prompt is required"
        predict["prompt"] = prompt
    predict.update({name: body[name] for name in ("stream",) + SAMPLING_FIELDS if name in body})
    try:
        request = parse_request(predict)
    except RequestError as exc:
        raise rename_error(exc, names) from None
    return OpenAIRequest(request, _include_usage(body, request.stream), names)


def _include_usage(body: Mapping, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise RequestError("stream_options", "stream_options is only allowed when stream is true")
    if not isinstance(options, Mapping) or set(options) - {"include_usage"}:
        raise RequestError("stream_options", 'stream_options must be an object with only '
                           f'"include_usage", got {json.dumps(options)[:60]}')
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise RequestError("stream_options", "stream_options.include_usage must be a boolean, "
                           f"got {json.dumps(include)[:60]}")
    return include


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


_MODEL_SCHEMA = {"type": "string", "description": "The served model's name (GET /v1/models); "
                 "another name is answered with 404."}
_N_SCHEMA = {"type": "integer", "enum": [1], "default": 1, "description": "One completion per request."}
_STREAM_OPTIONS_SCHEMA = {
    "anyOf": [{"type": "object", "properties": {"include_usage": {"type": "boolean"}},
               "additionalProperties": False}, {"type": "null"}],
    "description": "With stream: include_usage adds a last chunk with the usage and no choices."}


def completion_request_schema() -> dict:
    prompt = json_schema()["properties"]["prompt"]
    return {"type": "object", "required": ["prompt"], "additionalProperties": False,
            "properties": {
                "model": _MODEL_SCHEMA,
                "prompt": {"anyOf": [{"type": "string", "minLength": 1},
                                     {"type": "array", "items": {"type": "string", "minLength": 1},
                                      "minItems": 1, "maxItems": 1}],
                           "description": prompt["description"]},
                "n": _N_SCHEMA, "stream_options": _STREAM_OPTIONS_SCHEMA,
                **_sampling_schema({**OPENAI_DEFAULTS, "max_tokens": COMPLETIONS_MAX_TOKENS})}}


def chat_request_schema() -> dict:
    text_part = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
                 "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}}}
    message = {"type": "object", "required": ["role", "content"], "additionalProperties": False,
               "properties": {"role": {"type": "string", "minLength": 1},
                              "content": {"anyOf": [{"type": "string"},
                                                    {"type": "array", "items": text_part}]},
                              "name": {"type": "string"}}}
    sampling = _sampling_schema({**OPENAI_DEFAULTS, "max_tokens": CHAT_MAX_TOKENS})
    return {"type": "object", "required": ["messages"], "additionalProperties": False,
            "properties": {
                "model": _MODEL_SCHEMA,
                "messages": {"type": "array", "items": message, "minItems": 1,
                             "description": "The conversation, rendered with the model's chat template."},
                "n": _N_SCHEMA, "stream_options": _STREAM_OPTIONS_SCHEMA,
                "max_completion_tokens": {**sampling["max_tokens"], "description":
                                          "OpenAI's newer name for max_tokens (give one of them)."},
                **sampling}}


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

    def opening(self) -> bytes:
        return b""

    def piece(self, text: str) -> bytes:
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

    def piece(self, text: str) -> bytes:
        return text.encode("utf-8")

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
        if request.predict.stream:
            self.streaming = True
            self.media_type = "text/event-stream; charset=utf-8"

    def rename(self, exc: RequestError) -> RequestError:
        return self.request.rename(exc)

    def _event(self, data: dict) -> bytes:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        # Escaped, as JSON allows: line splitters such as Python's str.splitlines (requests'
        # iter_lines) break a line at these, which would cut an event's JSON in two.
        text = text.translate(_LINE_BREAKS)
        return f"data: {text}\n\n".encode("utf-8")

    def _head(self, object_: str) -> dict:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def _closing_events(self, final: dict, last: Chunk) -> bytes:
        out = b""
        if self.request.include_usage:  # OpenAI's shape: a last chunk with no choices
            out = self._event(final) + self._event({**self._head(self.object), "choices": [],
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

    def piece(self, text: str) -> bytes:
        return self._event(self._chunk(text, None))

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

    def opening(self) -> bytes:
        return self._event(self._chunk({"role": "assistant", "content": ""}, None))

    def piece(self, text: str) -> bytes:
        return self._event(self._chunk({"content": text}, None))

    def closing(self, last: Chunk) -> bytes:
        delta = {"content": last.text} if last.text else {}
        return self._closing_events(self._chunk(delta, last.finish_reason), last)

    def whole(self, text: str, last: Chunk) -> dict:
        return {**self._head("chat.completion"), "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
             "finish_reason": last.finish_reason}], "usage": usage_of(last)}
