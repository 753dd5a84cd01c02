"""Structured output, several choices and log probabilities through the OpenAI routes: the
real gateway in front of the real CPU server (the reference engine masks the tiny random
model's logits with xgrammar, so its output follows a guide only because the guide reaches
the engine). Every response is read with the `openai` package's own types."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
import requests
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from helpers import PROMPT
from test_gateway import openai_client

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120}}}
SAMPLING = {"temperature": 1.0, "seed": 7}


def _completion_text(g, stream: bool, max_tokens: int = 160, **extra) -> tuple[str, str]:
    """(text, finish_reason) of one /v1/completions request through the openai package."""
    client = openai_client(g)
    body = dict(model="mixtral", prompt=PROMPT, max_tokens=max_tokens, **SAMPLING, extra_body=extra)
    if not stream:
        completion = client.completions.create(**body)
        return completion.choices[0].text, completion.choices[0].finish_reason
    text, finish = "", None
    for chunk in client.completions.create(stream=True, **body):
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason or finish
    return text, finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_json_schema_response_format_gives_json_that_validates(base_gateway, stream):
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    text, finish = _completion_text(base_gateway, stream, response_format=response_format)
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_guided_choice_and_regex_give_what_they_allow(base_gateway, stream):
    choices = ["cat (a pet)", "dog.", "a|b"]
    text, finish = _completion_text(base_gateway, stream, guided_choice=choices)
    assert text in choices and finish == "stop"
    text, _ = _completion_text(base_gateway, stream, guided_regex=r"[a-z]{2,5}-[0-9]{2}")
    assert re.fullmatch(r"[a-z]{2,5}-[0-9]{2}", text), text


def test_guided_json_object_and_json_object_response_format(base_gateway):
    text, finish = _completion_text(base_gateway, False, guided_json=PERSON)
    jsonschema.validate(json.loads(text), PERSON)
    text, _ = _completion_text(base_gateway, False, guided_json=json.dumps(PERSON))
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_n_choices_are_each_what_their_own_seed_gives(base_gateway, stream):
    client = openai_client(base_gateway)
    body = dict(model="mixtral", prompt=PROMPT, max_tokens=12, temperature=1.0)
    alone = [client.completions.create(seed=7 + i, **body).choices[0] for i in range(3)]
    if stream:
        texts, finishes, usage = {}, {}, None
        for chunk in client.completions.create(seed=7, n=3, stream=True, stream_options={"include_usage": True},
                                               **body):
            usage = chunk.usage or usage
            for choice in chunk.choices:
                assert len(chunk.choices) == 1  # one choice a chunk, interleaved
                texts[choice.index] = texts.get(choice.index, "") + choice.text
                if choice.finish_reason:
                    finishes[choice.index] = choice.finish_reason
    else:
        completion = client.completions.create(seed=7, n=3, **body)
        texts = {c.index: c.text for c in completion.choices}
        finishes = {c.index: c.finish_reason for c in completion.choices}
        usage = completion.usage
    assert sorted(texts) == [0, 1, 2]
    assert [texts[i] for i in range(3)] == [c.text for c in alone]
    assert [finishes[i] for i in range(3)] == [c.finish_reason for c in alone]
    singles = [client.completions.create(seed=7 + i, **body).usage.completion_tokens for i in range(3)]
    assert usage.completion_tokens == sum(singles)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_completion_log_probs_are_one_per_token_and_at_most_zero(base_gateway, stream):
    body = {"model": "mixtral", "prompt": PROMPT, "max_tokens": 10, "logprobs": 0, "stream": stream,
            "ignore_eos": True, **SAMPLING}
    response = requests.post(f"{base_gateway.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    if stream:
        # (streamed chunks have no finish reason yet, which Completion's validation refuses:
        # read as the openai package reads a stream)
        chunks = list(openai_client(base_gateway).completions.create(
            model="mixtral", prompt=PROMPT, max_tokens=10, logprobs=0, stream=True,
            extra_body={"ignore_eos": True}, **SAMPLING))
        pieces = [c.choices[0] for c in chunks if c.choices and c.choices[0].logprobs]
        tokens = [t for p in pieces for t in p.logprobs.tokens]
        values = [v for p in pieces for v in p.logprobs.token_logprobs]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        completion_tokens = chunks[-1].usage.completion_tokens
    else:
        completion = Completion.model_validate(response.json())
        logprobs = completion.choices[0].logprobs
        tokens, values, text = logprobs.tokens, logprobs.token_logprobs, completion.choices[0].text
        completion_tokens = completion.usage.completion_tokens
        assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    assert len(values) == len(tokens) == completion_tokens == 10
    assert all(v <= 0 for v in values)
    if not any(t.startswith("bytes:") for t in tokens):
        assert "".join(tokens) == text


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_log_probs_tokens_join_to_the_content(instruct, stream):
    body = {"model": "mixtral-instruct", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10,
            "logprobs": True, "stream": stream, **SAMPLING}
    response = requests.post(f"{instruct.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    if stream:
        chunks = [ChatCompletionChunk.model_validate(json.loads(line[6:]))
                  for line in response.text.splitlines() if line.startswith("data: {")]
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        entries = [e for c in chunks if c.choices and c.choices[0].logprobs
                   for e in c.choices[0].logprobs.content]
        completion_tokens = chunks[-1].usage.completion_tokens
    else:
        completion = ChatCompletion.model_validate(response.json())
        content = completion.choices[0].message.content
        entries = completion.choices[0].logprobs.content
        completion_tokens = completion.usage.completion_tokens
    assert len(entries) == completion_tokens
    assert all(e.logprob <= 0 and e.top_logprobs == [] for e in entries)
    assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", "replace") == content
    for e in entries:  # a token that is part of a character: its bytes escaped, as OpenAI's
        try:
            assert e.token == bytes(e.bytes).decode("utf-8")
        except UnicodeDecodeError:
            assert e.token == "".join(f"\\x{b:02x}" for b in e.bytes)


def test_chat_response_format_and_n(instruct):
    client = openai_client(instruct)
    answer = client.chat.completions.create(
        model="mixtral-instruct", messages=[{"role": "user", "content": "a person"}], max_tokens=160, n=2,
        response_format={"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}, **SAMPLING)
    assert [c.index for c in answer.choices] == [0, 1]
    for choice in answer.choices:
        jsonschema.validate(json.loads(choice.message.content), PERSON)


@pytest.mark.parametrize("field, value, extra", [
    ("guided_regex", "(unclosed", {}),
    ("guided_grammar", "root ::= ", {}),
    ("guided_json", {"type": "object", "properties": {"a": {"type": "no-such-type"}}}, {}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}, {}),
    ("response_format", {"type": "xml"}, {}),
    ("guided_choice", [], {}),
    ("guided_regex", "a+", {"response_format": {"type": "json_object"}}),
    ("n", 9, {}),
    ("logprobs", 2, {}),
    ("logprobs", 0, {"echo": True}),
], ids=["bad-regex", "bad-grammar", "bad-schema", "bad-response-schema", "bad-type", "no-choice",
        "two-guides", "n-9", "top-2", "echo"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_bad_guides_and_counts_are_400_naming_the_field(base_gateway, field, value, extra, stream):
    client = openai_client(base_gateway)
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="mixtral", prompt=PROMPT, max_tokens=4, stream=stream,
                                  extra_body={**extra, field: value})
    assert error.value.param == field and field in error.value.message
