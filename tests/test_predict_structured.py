"""Structured output through the predict API's one field, `response_format` (OpenAI's shape):
the gateway's /predict, streamed and not, the Python client over gRPC and client/predict.py,
against the real CPU server, whose reference engine masks the tiny random model's logits
with xgrammar, so the text follows the schema only because the guide reached the engine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import requests

from helpers import PROMPT
from test_guided_decoding import _matcher
from mixtral_triton.client import PredictClient
from mixtral_triton.protocol import RequestError

ROOT = Path(__file__).resolve().parents[1]
POINT = {"type": "object", "additionalProperties": False, "required": ["x", "y"],
         "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                        "y": {"enum": ["up", "down"]}}}
SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "point", "schema": POINT}}
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_tokens": 96}


@pytest.mark.parametrize("seed", [3, 11])
def test_predict_response_format_gives_json_valid_against_the_schema(base_gateway, seed):
    body = {"prompt": PROMPT, "response_format": SCHEMA_FORMAT, "seed": seed, **SAMPLING}
    with requests.post(f"{base_gateway.url}/predict", json=body, stream=True) as resp:
        assert resp.status_code == 200, resp.text
        streamed = "".join(resp.iter_content(chunk_size=None, decode_unicode=True))
    jsonschema.validate(json.loads(streamed), POINT)
    whole = requests.post(f"{base_gateway.url}/predict", json={**body, "stream": False}).json()
    assert whole["finish_reason"] == "stop" and whole["result"] == streamed  # the same seed


def test_predict_json_object_follows_the_json_grammar_and_text_asks_for_none(base_gateway, tiny_checkpoint):
    """Free JSON (xgrammar's built-in grammar) often runs to max_tokens on a random model: a
    cut one is a prefix the JSON grammar accepts, a finished one a JSON object."""
    body = {"prompt": PROMPT, "seed": 5, "stream": False, **SAMPLING}
    answer = requests.post(f"{base_gateway.url}/predict",
                           json={**body, "response_format": {"type": "json_object"}}).json()
    if answer["finish_reason"] == "length":
        assert _matcher(tiny_checkpoint, "json", "").accept_string(answer["result"]), answer
    else:
        assert isinstance(json.loads(answer["result"]), dict), answer
    plain = requests.post(f"{base_gateway.url}/predict", json=body).json()
    as_text = requests.post(f"{base_gateway.url}/predict",
                            json={**body, "response_format": {"type": "text"}}).json()
    assert as_text == plain != answer  # "text" asks for no guide


def test_the_python_client_and_the_cli_send_response_format(triton_server):
    text = "".join(PredictClient(triton_server.grpc_url).predict(
        PROMPT, response_format=SCHEMA_FORMAT, seed=3, **SAMPLING))
    jsonschema.validate(json.loads(text), POINT)
    cli = subprocess.run([sys.executable, str(ROOT / "client" / "predict.py"), PROMPT, "--url",
                          triton_server.grpc_url, "--response-format", json.dumps(SCHEMA_FORMAT),
                          "--seed", "3", "--max-tokens", "96", "--temperature", "1", "--top-p", "1",
                          "--top-k", "0"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout == text + "\n"


# A schema xgrammar cannot compile passes the request's own checks and is refused by the
# tokenizer model, before any engine work; the refusal still names response_format.
NOT_COMPILING = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}}


@pytest.mark.parametrize("response_format", [NOT_COMPILING, {"type": "xml"}], ids=["not-compiling", "bad-type"])
@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_a_bad_response_format_is_a_400_naming_it(base_gateway, triton_server, response_format, stream):
    body = {"prompt": PROMPT, "max_tokens": 4, "stream": stream, "response_format": response_format}
    resp = requests.post(f"{base_gateway.url}/predict", json=body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["field"] == "response_format" and error["message"].startswith("response_format")
    with pytest.raises(RequestError) as expected:  # the very message of the client
        answer = PredictClient(triton_server.grpc_url).predict(body.pop("prompt"), **body)
        if stream:  # the server's refusal comes with the stream's first read
            list(answer)
    assert expected.value.field == "response_format" and error["message"] == str(expected.value)
