"""OpenAI's completions and chat requests, mapped onto the predict fields and then validated
by mixtral_triton.protocol.parse_request itself, so that a bad value gets the very message,
naming the very field, whichever route or client it came through.

OPENAI_FIELDS says what every field of OpenAI's requests that is not a predict field gets
here; the request checks, the OpenAPI request schemas (gateway/schemas.py) and the docs
table (docs/openai.md) are all read from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from mixtral_triton.client.ensemble import GenerationOptions
from mixtral_triton.gateway.http_errors import ModelNotFound
from mixtral_triton.protocol import FIELDS, FIELDS_BY_NAME, PredictRequest, RequestError, parse_request
from mixtral_triton.protocol.ensemble import MAX_RETURN_SEQUENCES
from mixtral_triton.protocol.guided import RESPONSE_FORMAT_FIELD, Guide, guide_of_response_format, read_guide


# The predict fields OpenAI's requests take under the same names and rules: OpenAI's own
# sampling fields and vLLM's extensions (ignore_eos, min_tokens, top_k, ...). Not the
# prompt, not exclude_input_in_output, which OpenAI spells `echo`, and not response_format,
# read with vLLM's guided fields (_guide).
SAMPLING_FIELDS = tuple(spec.name for spec in FIELDS
                        if spec.name not in ("prompt", "stream", "exclude_input_in_output", "response_format"))
# Where OpenAI's defaults differ from the predict API's (which are Truss's).
OPENAI_DEFAULTS = {"stream": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0}
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_MAX_TOKENS = FIELDS_BY_NAME["max_tokens"].default
ROUTES = ("completions", "chat")
# The field each route's prompt comes in: required.
PROMPT_FIELDS = {"completions": "prompt", "chat": "messages"}
# Why only the sampled token's log probability is returned.
NO_TOP = "top alternatives are not returned (TensorRT-LLM 1.2.1's backend gives the sampled token's only)"
# The sampling fields that are vLLM's extensions of OpenAI's requests (clients send them in
# `extra_body`).
VLLM_EXTENSIONS = ("top_k", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
                   "include_stop_str_in_output", "skip_special_tokens")


@dataclass(frozen=True)
class Only:
    """These values (each of its own JSON type: 1 is neither true nor 1.0), and null."""

    values: tuple = ()

    def accepts(self, value: Any) -> bool:
        return any(value == v and type(value) is type(v) for v in self.values)

    def schema(self) -> dict:
        return {"enum": [*self.values, None]}


def only(*values: Any) -> Only:
    return Only(values)


_PYTHON_TYPES = {"string": str, "boolean": bool, "object": dict}


@dataclass(frozen=True)
class OfType:
    """Any value of one JSON type, and null."""

    json_type: str  # "string", "boolean" or "object"

    def accepts(self, value: Any) -> bool:
        return isinstance(value, _PYTHON_TYPES[self.json_type])

    def schema(self) -> dict:
        return {"type": [self.json_type, "null"]}


@dataclass(frozen=True)
class OpenAIField:
    """A field of OpenAI's request schemas that is not a predict field. `values` says which
    values are served (null, "not given", always is), for the check and the schema alike;
    a field whose every value is served is honoured or a no-op; another value is refused
    naming the field, saying `rule`. A field without `values` is read and checked by the
    request mapping itself (its schema: gateway/schemas.py)."""

    name: str
    routes: tuple[str, ...]
    treatment: str  # what the docs table says it gets
    values: Only | OfType | None = None
    rule: str = ""
    source: str = "OpenAI"  # or "vLLM": its extensions, sent in extra_body


_BOTH = ROUTES
_CHAT = ("chat",)
_COMPLETIONS = ("completions",)
OPENAI_FIELDS: tuple[OpenAIField, ...] = (
    OpenAIField("model", _BOTH, "checked: the served model's name (GET /v1/models); another "
                "name is a 404", OfType("string"), "must be a string"),
    OpenAIField("prompt", _COMPLETIONS, "honoured: a string, or a list of one string",
                rule="must be a string or a list of one string (one prompt per request)"),
    OpenAIField("messages", _CHAT, "honoured: rendered with the model's chat template; text "
                "content only"),
    OpenAIField("stream", _BOTH, "honoured"),
    OpenAIField("max_completion_tokens", _CHAT, "honoured: the same as max_tokens (give one)"),
    OpenAIField("echo", _COMPLETIONS, "honoured: the prompt, then the completion "
                "(the ensemble's exclude_input_in_output false)", OfType("boolean"), "must be a boolean"),
    OpenAIField("stream_options", _BOTH, "honoured: include_usage (a last chunk with the usage), "
                "vLLM's continuous_usage_stats (usage on every chunk); include_obfuscation "
                "false only (no obfuscation padding)"),
    OpenAIField("n", _BOTH, f"honoured: 1 to {MAX_RETURN_SEQUENCES} choices (the ensemble's "
                "num_return_sequences; choice i samples with seed + i); streamed interleaved, "
                "each chunk one choice"),
    OpenAIField("best_of", _COMPLETIONS, "1 only (one candidate per request)", only(1),
                "must be 1 (one candidate per request)"),
    OpenAIField("logprobs", _COMPLETIONS, "honoured: 0 (tokens, token_logprobs, text_offset; "
                f"top_logprobs null): {NO_TOP}; not with echo"),
    OpenAIField("logprobs", _CHAT, "honoured: choices[].logprobs.content, each token with its "
                "logprob and bytes (top_logprobs [])", OfType("boolean"), "must be a boolean"),
    OpenAIField("top_logprobs", _CHAT, f"0 only: {NO_TOP}", only(0), f"must be 0: {NO_TOP}"),
    OpenAIField("logit_bias", _BOTH, "{} only: no logit bias is applied", only({}),
                "must be empty: no logit bias is applied"),
    OpenAIField("suffix", _COMPLETIONS, "\"\" only: no insertion after a suffix", only(""),
                "must be empty: this model does not complete text before a suffix"),
    OpenAIField("user", _BOTH, "no-op: a label of the end user, logged with the request",
                OfType("string"), "must be a string"),
    OpenAIField("safety_identifier", _CHAT, "no-op: a label of the end user", OfType("string"),
                "must be a string"),
    OpenAIField("metadata", _CHAT, "no-op: labels (nothing is stored)", OfType("object"), "must be an object"),
    OpenAIField("prompt_cache_key", _CHAT, "no-op: a cache routing hint", OfType("string"), "must be a string"),
    OpenAIField("prompt_cache_retention", _CHAT, "no-op: a cache hint", only("in_memory", "24h"),
                'must be "in_memory" or "24h"'),
    OpenAIField("prompt_cache_options", _CHAT, "no-op: a cache hint", OfType("object"), "must be an object"),
    OpenAIField("prediction", _CHAT, "no-op: a latency hint; the output is the same", OfType("object"),
                "must be an object"),
    OpenAIField("parallel_tool_calls", _CHAT, "no-op: no tools are served", OfType("boolean"),
                "must be a boolean"),
    OpenAIField("store", _CHAT, "false only: nothing is stored", only(False),
                "must be false: this server stores no completions"),
    OpenAIField("service_tier", _CHAT, '"auto" or "default" only', only("auto", "default"),
                'must be "auto" or "default": this server has one processing tier'),
    OpenAIField("tools", _CHAT, "null only: tool calls are not served", only(),
                "must be null: tool calls are not served"),
    OpenAIField("tool_choice", _CHAT, '"none" only: tool calls are not served', only("none"),
                'must be "none": tool calls are not served'),
    OpenAIField("functions", _CHAT, "null only: function calls are not served", only(),
                "must be null: function calls are not served"),
    OpenAIField("function_call", _CHAT, '"none" only: function calls are not served',
                only("none"), 'must be "none": function calls are not served'),
    OpenAIField(RESPONSE_FORMAT_FIELD, _BOTH, 'honoured: {"type": "text"}; {"type": "json_object"} '
                '(guided_decoding_guide_type json); {"type": "json_schema", "json_schema": {"name", '
                '"schema", "strict"}} (json_schema; followed strictly)'),
    OpenAIField("guided_json", _BOTH, "honoured: a JSON Schema (object or string), as "
                "response_format json_schema", source="vLLM"),
    OpenAIField("guided_regex", _BOTH, "honoured: a regex the whole output matches (guide type "
                "regex)", source="vLLM"),
    OpenAIField("guided_grammar", _BOTH, "honoured: an EBNF grammar (guide type ebnf_grammar)",
                source="vLLM"),
    OpenAIField("guided_choice", _BOTH, "honoured: a list of strings; the output is one of them "
                "(a regex of the escaped choices)", source="vLLM"),
    OpenAIField("modalities", _CHAT, '["text"] only', only(["text"]),
                'must be ["text"]: this model writes text only'),
    OpenAIField("audio", _CHAT, "null only: no audio output", only(),
                "must be null: this model writes text only"),
    OpenAIField("reasoning_effort", _CHAT, '"none" only: not a reasoning model', only("none"),
                'must be "none": Mixtral is not a reasoning model'),
    OpenAIField("verbosity", _CHAT, '"medium" only (the default)', only("medium"),
                'must be "medium": the answer\'s length is not steered'),
    OpenAIField("web_search_options", _CHAT, "null only: no web search", only(),
                "must be null: this server has no web search"),
    OpenAIField("moderation", _CHAT, "null only: no moderation is run", only(),
                "must be null: this server runs no moderation"),
)


def openai_fields(route: str) -> dict[str, OpenAIField]:
    return {f.name: f for f in OPENAI_FIELDS if route in f.routes}


@dataclass(frozen=True)
class OpenAIRequest:
    predict: PredictRequest  # validated by parse_request
    include_usage: bool = False  # stream_options.include_usage
    continuous_usage: bool = False  # stream_options.continuous_usage_stats (vLLM)
    user: str | None = None  # logged with the request
    options: GenerationOptions = GenerationOptions()  # n, log probabilities
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
        raise RequestError("prompt", f"prompt {openai_fields('completions')['prompt'].rule}, "
                           f"got a list of {len(prompt)} items")
    return _openai_request(body, model_name, prompt, COMPLETIONS_MAX_TOKENS, {})


def parse_chat_request(body: Any, model_name: str, render) -> OpenAIRequest:
    """`render(messages) -> str` is the model's chat template (mixtral_triton.gateway.chat)."""
    body = _check_fields(body, "chat")
    _check_model(body, model_name)  # a request for another model is a 404 whatever else it says
    messages = _check_messages(body.get("messages"))
    names = {"prompt": PROMPT_FIELDS["chat"]}
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
        if value is not None and spec.values is not None and not spec.values.accepts(value):
            raise RequestError(name, f"{name} {spec.rule}, got {json.dumps(value)[:60]}")
    return body


def _check_model(body: Mapping, model_name: str) -> None:
    model = body.get("model")  # a string or null (_check_fields)
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
    guide, guide_field = _guide(body)
    if guide_field:  # the tokenizer model's refusal of the guide names the field it came in
        names[RESPONSE_FORMAT_FIELD] = guide_field
    # The guide goes where /predict's response_format puts it, whichever field gave it.
    request = replace(request, response_format=guide)
    options = GenerationOptions(_choices(body), _log_probs(body))
    return OpenAIRequest(request, include_usage, continuous_usage, user, names=names, options=options)


# vLLM's guided decoding fields: the guide type each gives.
GUIDED_FIELDS = {"guided_json": "json_schema", "guided_regex": "regex", "guided_grammar": "ebnf_grammar",
                 "guided_choice": "regex"}


def _guide(body: Mapping) -> tuple[Guide | None, str | None]:
    """The guide of response_format or of one vLLM guided field, and the field it came in."""
    given = [name for name in (RESPONSE_FORMAT_FIELD, *GUIDED_FIELDS) if body.get(name) is not None]
    if len(given) > 1:
        raise RequestError(given[1], f"give one of {', '.join(given)}: each is a guide for the "
                           "whole output")
    if not given:
        return None, None
    name, value = given[0], body[given[0]]
    if name == RESPONSE_FORMAT_FIELD:
        return guide_of_response_format(value), name
    if name == "guided_json" and isinstance(value, dict):
        value = json.dumps(value)
    elif name == "guided_choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise RequestError(name, f"{name} must be a non-empty list of non-empty strings, "
                               f"got {json.dumps(value)[:60]}")
        value = "|".join(_regex_literal(choice) for choice in value)
    if not isinstance(value, str):
        kind = "a JSON Schema (object or string)" if name == "guided_json" else "a string"
        raise RequestError(name, f"{name} must be {kind}, got {json.dumps(value)[:60]}")
    return read_guide(GUIDED_FIELDS[name], value, name), name


# ECMAScript's syntax characters (the regex flavour xgrammar reads): escaping any other
# character is an error there.
_REGEX_SYNTAX = frozenset("^$\\.*+?()[]{}|/")


def _regex_literal(text: str) -> str:
    """`text` as a regex that matches it alone."""
    return "".join("\\" + c if c in _REGEX_SYNTAX else c for c in text)


def _choices(body: Mapping) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_RETURN_SEQUENCES:
        raise RequestError("n", f"n must be an integer >= 1 and <= {MAX_RETURN_SEQUENCES}, got {json.dumps(n)[:60]}")
    return n


def _log_probs(body: Mapping) -> bool:
    """Whether the request asks for log probabilities: chat's logprobs true, completions'
    logprobs 0 (a count of top alternatives, which are not served)."""
    value = body.get("logprobs")
    if value is None or value is False:
        return False
    if value is not True:  # completions: an integer
        if isinstance(value, bool) or not isinstance(value, int) or value != 0:
            raise RequestError("logprobs", f"logprobs must be 0 or null: {NO_TOP}; got "
                               f"{json.dumps(value)[:60]}")
        if body.get("echo"):
            raise RequestError("logprobs", "logprobs cannot come with echo: the prompt's log "
                               "probabilities are not returned")
    return True


# stream_options' fields: any boolean (None), or only this value.
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


def openai_fields_markdown() -> str:
    """The docs table (docs/openai.md): every field of OpenAI's completions and chat
    requests and what it gets here, then vLLM's extensions."""
    rows = ["| field | from | routes | what it gets |", "| --- | --- | --- | --- |"]
    names = {spec.name for spec in OPENAI_FIELDS}
    for name in sorted(names | set(SAMPLING_FIELDS)):
        for spec in (s for s in OPENAI_FIELDS if s.name == name):
            rows.append(f"| `{name}` | {spec.source} | {', '.join(spec.routes)} | {spec.treatment} |")
        if name in SAMPLING_FIELDS:
            field = FIELDS_BY_NAME[name]
            source = "vLLM" if name in VLLM_EXTENSIONS else "OpenAI"
            rows.append(f"| `{name}` | {source} | completions, chat | honoured ({field.kind}"
                        f"{'; ' + field.bounds_rule if field.bounds_rule else ''}): {field.description} |")
    return "\n".join(rows) + "\n"
