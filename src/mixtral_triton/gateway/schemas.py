"""The gateway's schemas for its OpenAPI document: the request bodies, generated from the
field tables (mixtral_triton.protocol.FIELDS for the predict fields, OPENAI_FIELDS for
OpenAI's own), and the responses, as pydantic models."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from mixtral_triton.gateway.openai_requests import (
    CHAT_MAX_TOKENS,
    COMPLETIONS_MAX_TOKENS,
    OPENAI_DEFAULTS,
    PROMPT_FIELDS,
    SAMPLING_FIELDS,
    STREAM_OPTIONS,
    openai_fields,
)
from mixtral_triton.protocol import json_schema
from mixtral_triton.protocol.ensemble import MAX_RETURN_SEQUENCES
from mixtral_triton.protocol.guided import RESPONSE_FORMAT_SCHEMA

# ---------------------------------------------------------------------------------------
# Requests


def predict_request_schema() -> dict:
    return json_schema()


def completion_request_schema() -> dict:
    return _openai_request_schema("completions", COMPLETIONS_MAX_TOKENS)


def chat_request_schema() -> dict:
    return _openai_request_schema("chat", CHAT_MAX_TOKENS)


def _openai_request_schema(route: str, max_tokens: int) -> dict:
    """The predict fields' schemas with OpenAI's defaults; OpenAI's own fields described by
    what they get, with the values they take (OpenAIField.values), or, for the fields the
    request mapping reads itself, the schema of what it reads."""
    predict = json_schema()["properties"]
    for name, default in {**OPENAI_DEFAULTS, "max_tokens": max_tokens}.items():
        predict[name] = {**predict[name], "default": default}
    mapped = {"prompt": _one_prompt_schema(predict["prompt"]), "messages": _MESSAGES_SCHEMA,
              "stream": predict["stream"], "max_completion_tokens": _without_description(predict["max_tokens"]),
              "stream_options": _stream_options_schema(), "n": _N_SCHEMA, "logprobs": {"enum": [0, None]},
              "response_format": RESPONSE_FORMAT_SCHEMA, **_GUIDED_SCHEMAS}
    properties = {}
    for name, spec in openai_fields(route).items():
        values = spec.values.schema() if spec.values is not None else mapped[name]
        properties[name] = {"description": spec.treatment, **values}
    properties.update({name: predict[name] for name in SAMPLING_FIELDS})
    return {"type": "object", "required": [PROMPT_FIELDS[route]], "additionalProperties": False,
            "properties": properties}


def _without_description(schema: dict) -> dict:
    return {key: value for key, value in schema.items() if key != "description"}


def _one_prompt_schema(prompt: dict) -> dict:
    """The predict prompt, or a list of one (OpenAI's prompt may be a list of prompts)."""
    item = _without_description(prompt)
    return {"anyOf": [item, {"type": "array", "items": item, "minItems": 1, "maxItems": 1}],
            "description": prompt["description"]}


def _stream_options_schema() -> dict:
    properties = {name: {"type": "boolean"} if only is None else {"type": "boolean", "enum": [only]}
                  for name, only in STREAM_OPTIONS.items()}
    return {"anyOf": [{"type": "object", "additionalProperties": False, "properties": properties},
                      {"type": "null"}]}


_N_SCHEMA = {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_RETURN_SEQUENCES}
_GUIDED_SCHEMAS = {
    "guided_json": {"anyOf": [{"type": "object"}, {"type": "string"}, {"type": "null"}]},
    "guided_regex": {"type": ["string", "null"]},
    "guided_grammar": {"type": ["string", "null"]},
    "guided_choice": {"anyOf": [{"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                                {"type": "null"}]}}

# What openai_requests._check_messages accepts: role, content (text, or text parts), name.
_TEXT_PART_SCHEMA = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
                     "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}}}
_MESSAGES_SCHEMA = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["role", "content"], "additionalProperties": False,
    "properties": {"role": {"type": "string", "minLength": 1},
                   "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART_SCHEMA}]},
                   "name": {"type": "string"}}}}


# ---------------------------------------------------------------------------------------
# Responses


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, not_found_error, "
                      "rate_limit_error, server_error or service_unavailable")
    field: str | None = Field(None, description="the request field at fault, if any")
    param: str | None = Field(None, description="OpenAI routes: the same as field")
    code: str | None = Field(None, description="OpenAI routes: always null")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class PredictResponse(BaseModel):
    """The answer to `stream: false`."""

    result: str
    finish_reason: str = Field(description="stop, length or cancelled")
    usage: Usage


class CompletionLogprobs(BaseModel):
    """The sampled tokens (a token that is not whole UTF-8 is written "bytes:\\xNN..."),
    their log probabilities and their offsets in the choice's text; top alternatives are not
    served (null)."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: None = None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = Field(description="stop, length or cancelled; null until the last chunk")


class _OpenAIObject(BaseModel):
    """What every completion object starts with (the subclasses narrow `object`)."""

    id: str
    object: str
    created: int
    model: str


class CompletionResponse(_OpenAIObject):
    """Also each streamed chunk (`data: {...}` events, text in pieces, then `data: [DONE]`)."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatTokenLogprob(BaseModel):
    token: str = Field(description='the token\'s text; its bytes escaped ("\\xNN...") when it is not whole UTF-8')
    logprob: float
    bytes: list[int]
    top_logprobs: list = Field(default_factory=list, description="always empty: not served")


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletionResponse(_OpenAIObject):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_OpenAIObject):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
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
