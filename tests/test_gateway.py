"""The HTTP gateway: a real uvicorn server (in a thread of this process, or client/gateway.py
as a subprocess) in front of the real Triton server, driven by the clients people use:
the Truss example code (requests), the official `openai` package, plain HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import openai
import pytest
import requests

from mixtral_triton.client import Chunk, PredictClient, ServerError
from mixtral_triton.gateway import GatewaySettings, Serving
from mixtral_triton.gateway.chat import ChatTemplate
from mixtral_triton.gateway.metrics import Metrics
from mixtral_triton.launcher import free_ports
from mixtral_triton.protocol import json_schema
from helpers import (LONG, PROMPT, Gateway, case_id, gateway, greedy_whole, invalid_values, metric,
                     wait_active, wait_metric, wait_gateway_ready)

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "s3cret-key"


def openai_client(g: Gateway, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{g.url}/v1", api_key=api_key, max_retries=0, timeout=60)


def open_stream(g: Gateway, path: str, body: dict, headers: dict | None = None):
    """A raw connection with the response's first bytes read, to hang up on."""
    connection = http.client.HTTPConnection("127.0.0.1", g.port, timeout=30)
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json",
                                                        **(headers or {})})
    response = connection.getresponse()
    return connection, response


# ---------------------------------------------------------------------------------------
# POST /predict: the Truss contract


def test_truss_example_code_prints_the_stream(base_gateway, triton_server, capsys):
    url = f"{base_gateway.url}/predict"
    # The Truss example, with only the URL changed (and the README's iter_content arguments)
    resp = requests.post(
        url,
        json={"prompt": "What is mistral wind?", "stream": True, "max_tokens": 32, "temperature": 0.9},
        stream=True,
    )
    for content in resp.iter_content(chunk_size=None, decode_unicode=True):
        print(content, end="", flush=True)

    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/plain; charset=utf-8"
    assert resp.headers.get("transfer-encoding") == "chunked"
    printed = capsys.readouterr().out
    assert len(printed) > 20


def test_predict_stream_and_json_equal_the_ensembles_text(base_gateway, triton_server):
    whole = greedy_whole(triton_server, 24)
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    with requests.post(f"{base_gateway.url}/predict", json=body, stream=True) as resp:
        pieces = list(resp.iter_content(chunk_size=None, decode_unicode=True))
    assert len(pieces) > 1 and "".join(pieces) == whole.text

    resp = requests.post(f"{base_gateway.url}/predict", json={**body, "stream": False})
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    assert resp.json() == {"result": whole.text, "finish_reason": "length",
                           "usage": {"prompt_tokens": whole.prompt_tokens, "completion_tokens": 24,
                                     "total_tokens": whole.prompt_tokens + 24}}
    assert resp.headers["x-request-id"].startswith("mt-")


def test_default_one_byte_chunks_cannot_decode_non_ascii(base_gateway, triton_server):
    """Why the README says iter_content(chunk_size=None, decode_unicode=True)."""
    whole = greedy_whole(triton_server, 24)
    assert any(ord(c) > 127 for c in whole.text)
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    resp = requests.post(f"{base_gateway.url}/predict", json=body, stream=True)
    with pytest.raises(UnicodeDecodeError):
        for content in resp.iter_content():  # Truss's loop: one byte at a time
            content.decode("utf-8")
    resp.close()


@pytest.mark.parametrize("case", invalid_values(), ids=case_id)
def test_predict_names_the_field_of_every_rule(base_gateway, triton_server, case):
    from mixtral_triton.protocol import RequestError

    name, value = case
    body = {"prompt": PROMPT, name: value}
    resp = requests.post(f"{base_gateway.url}/predict", json=body)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["field"] == name and error["type"] == "invalid_request_error"
    with pytest.raises(RequestError) as expected:  # the very message of the client
        PredictClient(triton_server.grpc_url).predict(body.pop("prompt"), **body)
    assert error["message"] == str(expected.value)


@pytest.mark.parametrize("body, field, status", [
    ({"max_tokens": 5}, "prompt", 400),  # required
    ({"prompt": PROMPT, "max_new_tokens": 5}, "max_new_tokens", 400),  # unknown
    ([PROMPT], None, 400),  # not an object
    ({"prompt": PROMPT, "max_tokens": 2**31 - 1}, "max_tokens", 400),  # the engine's room
    ({"prompt": "wind " * 1100}, "prompt", 400),  # the engine's max_input_len
], ids=["required", "unknown", "not-object", "engine-room", "engine-input-len"])
@pytest.mark.parametrize("stream", [True, False])
def test_predict_errors_before_the_first_byte_are_json(base_gateway, body, field, status, stream):
    if isinstance(body, dict):
        body = {**body, "stream": stream}
    resp = requests.post(f"{base_gateway.url}/predict", json=body)
    assert resp.status_code == status and resp.headers["content-type"] == "application/json"
    assert resp.json()["error"]["field"] == field


def test_predict_rejects_a_body_that_is_not_json(base_gateway):
    resp = requests.post(f"{base_gateway.url}/predict", data=b"{prompt",
                         headers={"Content-Type": "application/json"})
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]["message"]


# ---------------------------------------------------------------------------------------
# The OpenAI routes, through the official client


def test_openai_completions_stream_and_not(base_gateway, triton_server):
    whole = greedy_whole(triton_server, 24)
    client = openai_client(base_gateway)
    assert [m.id for m in client.models.list().data] == ["mixtral"]

    completion = client.completions.create(model="mixtral", prompt=PROMPT, max_tokens=24, temperature=0)
    assert completion.choices[0].text == whole.text
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage.completion_tokens == 24
    assert completion.usage.total_tokens == whole.prompt_tokens + 24

    chunks = list(client.completions.create(model="mixtral", prompt=PROMPT, max_tokens=24,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

    usage_chunks = list(client.completions.create(
        model="mixtral", prompt=[PROMPT], max_tokens=24, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert usage_chunks[-1].choices == [] and usage_chunks[-1].usage.completion_tokens == 24
    assert "".join(c.choices[0].text for c in usage_chunks[:-1]) == whole.text


def test_an_openai_client_gets_exactly_max_tokens_with_usage_on_every_chunk(base_gateway, caplog):
    """Issue 17's request: `user`, `stop: null`, and vLLM's ignore_eos, min_tokens and
    continuous usage, as a benchmark tool sends them with the official client."""
    client = openai_client(base_gateway)
    caplog.set_level("INFO", logger="mixtral_triton.gateway")
    chunks = list(client.completions.create(
        model="mixtral", prompt=PROMPT, max_tokens=40, user="bench-user-7", stop=None, stream=True,
        temperature=1.0, seed=3, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "min_tokens": 40, "top_k": 5, "repetition_penalty": 1.1,
                    "stream_options": {"include_usage": True, "continuous_usage_stats": True}}))
    *text_chunks, usage_chunk = chunks
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in text_chunks]
    assert counts == sorted(counts) and all(c.usage.prompt_tokens > 0 for c in chunks)
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 40
    # logged once the response has gone out, by the gateway's thread
    deadline = time.monotonic() + 10
    while not any("user='bench-user-7'" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline, "the request's user was not logged"
        time.sleep(0.05)


def test_openai_sse_wire_format(base_gateway):
    body = {"model": "mixtral", "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}
    resp = requests.post(f"{base_gateway.url}/v1/completions", json=body, stream=True)
    assert resp.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = [line for line in resp.iter_lines(decode_unicode=True) if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: "):])
    assert last["object"] == "text_completion" and last["choices"][0]["finish_reason"] == "length"
    assert last["usage"]["completion_tokens"] == 4


def test_openai_chat_with_the_instruct_template(instruct):
    messages = [{"role": "user", "content": PROMPT}]
    prompt = ChatTemplate(instruct.app.state.serving.settings.tokenizer_dir).render(messages)
    assert prompt.startswith("[INST]") and prompt.endswith("[/INST]")  # BOS added by Triton
    expected = PredictClient(instruct.triton.grpc_url).predict(prompt, stream=False, max_tokens=20,
                                                               temperature=0)
    client = openai_client(instruct)

    chat = client.chat.completions.create(model="mixtral-instruct", messages=messages,
                                          max_tokens=20, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == expected.text
    assert chat.usage.prompt_tokens == expected.prompt_tokens and chat.usage.completion_tokens == 20

    chunks = list(client.chat.completions.create(model="mixtral-instruct", messages=messages,
                                                 max_completion_tokens=20, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_openai_chat_on_a_base_model_is_a_clear_400(base_gateway):
    with pytest.raises(openai.BadRequestError) as error:
        openai_client(base_gateway).chat.completions.create(
            model="mixtral", messages=[{"role": "user", "content": "hi"}])
    assert error.value.status_code == 400
    assert "no chat template" in error.value.message and error.value.param == "messages"


def test_openai_chat_template_refusal_is_a_400(instruct):
    with pytest.raises(openai.BadRequestError) as error:
        openai_client(instruct).chat.completions.create(
            model="mixtral-instruct", messages=[{"role": "system", "content": "be brief"}])
    assert error.value.param == "messages" and "chat template refused" in error.value.message


def test_openai_wrong_model_is_404(base_gateway):
    with pytest.raises(openai.NotFoundError) as error:
        openai_client(base_gateway).completions.create(model="gpt-4", prompt="hi")
    assert error.value.param == "model"


SAMPLING_CASES = [case for case in invalid_values() if case[0] not in ("prompt", "stream")]


@pytest.mark.parametrize("case", SAMPLING_CASES + [("stream", "yes"), ("n", 9), ("logprobs", 1),
                                                   ("prompt", None),
                                                   ("max_new_tokens", 5), ("prompt", ""),
                                                   ("prompt", [PROMPT, PROMPT]),
                                                   ("stream_options", {"include_usage": True})],
                         ids=case_id)
def test_openai_completions_name_the_field(base_gateway, case):
    name, value = case
    resp = requests.post(f"{base_gateway.url}/v1/completions",
                         json={"model": "mixtral", "prompt": PROMPT, name: value})
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == name == error["field"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("case", SAMPLING_CASES + [("messages", []), ("messages", "hi"),
                                                   ("messages", [{"role": "user"}]),
                                                   ("tools", []), ("n", 0),
                                                   ("max_completion_tokens", 0)],
                         ids=case_id)
def test_openai_chat_names_the_field(instruct, case):
    name, value = case
    body = {"model": "mixtral-instruct", "messages": [{"role": "user", "content": "hi"}], name: value}
    resp = requests.post(f"{instruct.url}/v1/chat/completions", json=body)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == name


def test_openai_the_servers_own_checks_name_openai_fields(base_gateway, instruct):
    client = openai_client(base_gateway)
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="mixtral", prompt=PROMPT, max_tokens=2**31 - 1)
    assert error.value.param == "max_tokens" and "engine" in error.value.message
    chat = openai_client(instruct)
    with pytest.raises(openai.BadRequestError) as error:
        chat.chat.completions.create(model="mixtral-instruct", max_completion_tokens=2**31 - 1,
                                     messages=[{"role": "user", "content": "hi"}])
    assert error.value.param == "max_completion_tokens"
    assert "- max_completion_tokens must be <=" in error.value.message
    with pytest.raises(openai.BadRequestError) as error:
        chat.chat.completions.create(model="mixtral-instruct", stream=True,
                                     messages=[{"role": "user", "content": "wind " * 1100}])
    assert error.value.param == "messages" and "max_input_len" in error.value.message


# ---------------------------------------------------------------------------------------
# Cancellation, the bound, the key, readiness


@pytest.mark.parametrize("path, body", [
    ("/predict", {"prompt": PROMPT, "max_tokens": LONG, "temperature": 0}),
    ("/predict", {"prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "stream": False}),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": LONG, "temperature": 0, "stream": True}),
], ids=["predict-stream", "predict-json", "completions-sse"])
def test_a_disconnect_stops_the_engine(paced_gateway, path, body):
    """On the paced server: the LONG generation (90 s at least) cannot end before the
    disconnect, so leaving the engine at all is the cancellation's doing. The request counts
    under the status it was answered with, or 499 (client closed) if none, never 500."""
    server = paced_gateway.triton
    assert wait_active(server, lambda v: v == 0) == 0
    disconnects = metric(paced_gateway, "mixtral_gateway_client_disconnects_total")
    counted = f'mixtral_gateway_requests_total{{route="{path}",status="{200 if body.get("stream", True) else 499}"}}'
    failed = f'mixtral_gateway_requests_total{{route="{path}",status="500"}}'
    before, failed_before = metric(paced_gateway, counted), metric(paced_gateway, failed)
    connection = http.client.HTTPConnection("127.0.0.1", paced_gateway.port, timeout=30)
    connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    if body.get("stream", True):
        response = connection.getresponse()
        assert response.status == 200 and response.read1(64)  # streaming has begun
    assert wait_active(server, lambda v: v >= 1) >= 1
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    assert wait_active(server, lambda v: v == 0, 30) == 0
    assert wait_metric(paced_gateway, "mixtral_gateway_client_disconnects_total",
                       lambda v: v > disconnects) == disconnects + 1
    assert wait_metric(paced_gateway, "mixtral_gateway_generations_in_flight", lambda v: v == 0) == 0
    assert wait_metric(paced_gateway, counted, lambda v: v > before, 30) == before + 1
    assert metric(paced_gateway, failed) == failed_before


def test_the_concurrency_bound_answers_429_with_retry_after(paced_server):
    """The one slot is held by a LONG generation on the paced server, which cannot end
    before the test closes it."""
    with gateway(triton_grpc_url=paced_server.grpc_url, max_concurrency=1) as g:
        connection, response = open_stream(g, "/predict", {"prompt": PROMPT, "max_tokens": LONG,
                                                           "temperature": 0})
        assert response.status == 200 and response.read1(16)
        for path in ("/predict", "/v1/completions"):
            resp = requests.post(f"{g.url}{path}", json={"prompt": PROMPT, "max_tokens": 4})
            assert resp.status_code == 429 and resp.headers["retry-after"] == "1"
            assert resp.json()["error"]["type"] == "rate_limit_error"
        with pytest.raises(openai.RateLimitError):
            openai_client(g).completions.create(model="mixtral", prompt=PROMPT, max_tokens=4)
        connection.close()
        assert wait_active(paced_server, lambda v: v == 0, 30) == 0
        deadline = time.monotonic() + 30  # the slot is free again
        while (resp := requests.post(f"{g.url}/predict", json={"prompt": PROMPT, "max_tokens": 4,
                                                                "stream": False})).status_code == 429:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert resp.status_code == 200
        assert 'mixtral_gateway_requests_total{route="/predict",status="429"} 1.0' in \
            requests.get(f"{g.url}/metrics").text


def test_the_api_key_is_required_on_generation_routes_when_set(triton_server):
    with gateway(triton_grpc_url=triton_server.grpc_url, api_key=API_KEY) as g:
        body = {"prompt": PROMPT, "max_tokens": 2, "stream": False}
        for headers in ({}, {"Authorization": "Api-Key wrong"}, {"Authorization": f"Basic {API_KEY}"},
                        {"Authorization": "Bearer"}, {"Authorization": API_KEY}):
            resp = requests.post(f"{g.url}/predict", json=body, headers=headers)
            assert resp.status_code == 401, headers
            assert resp.json()["error"]["type"] == "authentication_error"
        for scheme in ("Api-Key", "Bearer", "bearer"):
            resp = requests.post(f"{g.url}/predict", json=body,
                                 headers={"Authorization": f"{scheme} {API_KEY}"})
            assert resp.status_code == 200, scheme
        for path in ("/v1/completions", "/v1/chat/completions"):
            assert requests.post(f"{g.url}{path}", json={}).status_code == 401
        assert requests.get(f"{g.url}/v1/models").status_code == 401
        for path in ("/health", "/ready", "/metrics"):
            assert requests.get(f"{g.url}{path}").status_code == 200, path

        with pytest.raises(openai.AuthenticationError):
            openai_client(g, "wrong").completions.create(model="mixtral", prompt=PROMPT, max_tokens=2)
        completion = openai_client(g, API_KEY).completions.create(model="mixtral", prompt=PROMPT,
                                                                  max_tokens=2)
        assert completion.usage.completion_tokens == 2

        schemes = requests.get(f"{g.url}/openapi.json").json()["components"]["securitySchemes"]
        assert schemes["ApiKey"] == {"type": "apiKey", "in": "header", "name": "Authorization",
                                     "description": "`Api-Key <key>` (as Truss) or `Bearer <key>`"}


def test_ready_is_503_when_triton_is_down(base_gateway):
    assert wait_gateway_ready(base_gateway.url) == 200
    with gateway(triton_grpc_url=f"127.0.0.1:{free_ports().grpc}", timeout_s=10) as g:
        assert requests.get(f"{g.url}/health").status_code == 200
        resp = requests.get(f"{g.url}/ready")
        assert resp.status_code == 503 and resp.json() == {"ready": False}
        resp = requests.post(f"{g.url}/predict", json={"prompt": PROMPT})
        assert resp.status_code == 503 and resp.json()["error"]["type"] == "service_unavailable"


# ---------------------------------------------------------------------------------------
# Errors after streaming began: the stream ends visibly, never as if complete


class _FailingClient:
    """Streams two chunks, then the server fails (what a crashed Triton looks like)."""

    async def generate_batches(self, request, request_id=None, options=None):
        yield [Chunk("Hello", None, 3, 1)]
        await asyncio.sleep(0.05)
        yield [Chunk(" wor", None, 3, 2)]
        raise ServerError("the server closed the stream", "UNAVAILABLE")

    async def is_ready(self):
        return True

    async def answers(self):
        return True

    async def close(self):
        pass


def _failing_gateway():
    settings = GatewaySettings(triton_grpc_url="unused")
    serving = Serving(settings, Metrics(), client=_FailingClient(), chat=ChatTemplate(None))
    return Gateway(settings, serving)


def test_an_error_after_streaming_began_ends_the_stream_visibly():
    g = _failing_gateway()
    try:
        resp = requests.post(f"{g.url}/predict", json={"prompt": "hi"}, stream=True)
        assert resp.status_code == 200
        received = []
        with pytest.raises(requests.exceptions.ChunkedEncodingError):  # the body is cut
            for content in resp.iter_content(chunk_size=None, decode_unicode=True):
                received.append(content)
        assert "".join(received) == "Hello wor\n[error: the model server is unavailable: " \
                                    "the server closed the stream]\n"

        resp = requests.post(f"{g.url}/v1/completions", json={"prompt": "hi", "stream": True},
                             stream=True)
        lines = []
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for line in resp.iter_lines(decode_unicode=True):
                lines.append(line)
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert events[-1]["error"]["type"] == "service_unavailable"
        assert "data: [DONE]" not in lines
        with pytest.raises(openai.APIError):
            list(openai.OpenAI(base_url=f"{g.url}/v1", api_key="x", max_retries=0)
                 .completions.create(model="mixtral", prompt="hi", stream=True))

        resp = requests.post(f"{g.url}/predict", json={"prompt": "hi", "stream": False})
        assert resp.status_code == 503  # not streamed yet: a status of its own
    finally:
        g.stop()


def test_prompts_are_logged_only_when_asked(base_gateway, triton_server, caplog):
    secret = "my private prompt about mistral wind"
    caplog.set_level("INFO", logger="mixtral_triton.gateway")
    requests.post(f"{base_gateway.url}/predict", json={"prompt": secret, "max_tokens": 2})
    deadline = time.monotonic() + 5  # logged once the stream has closed, just after the answer
    while "finish=length" not in caplog.text and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "finish=length" in caplog.text and secret not in caplog.text
    with gateway(triton_grpc_url=triton_server.grpc_url, log_prompts=True) as g:
        requests.post(f"{g.url}/predict", json={"prompt": secret, "max_tokens": 2})
    assert secret in caplog.text


# ---------------------------------------------------------------------------------------
# Metrics and the OpenAPI document


def test_metrics_count_requests_and_latencies(base_gateway):
    requests.post(f"{base_gateway.url}/predict", json={"prompt": PROMPT, "max_tokens": 8})
    requests.post(f"{base_gateway.url}/predict", json={"prompt": PROMPT, "max_tokens": 0})
    text = requests.get(f"{base_gateway.url}/metrics").text
    assert 'mixtral_gateway_requests_total{route="/predict",status="200"}' in text
    assert 'mixtral_gateway_requests_total{route="/predict",status="400"}' in text
    assert metric(base_gateway, 'mixtral_gateway_time_to_first_token_seconds_count{route="/predict"}') >= 1
    assert metric(base_gateway, 'mixtral_gateway_inter_token_latency_seconds_count{route="/predict"}') >= 7
    assert wait_metric(base_gateway, "mixtral_gateway_generations_in_flight", lambda v: v == 0) == 0


def test_the_openapi_document_matches_what_the_routes_accept(base_gateway):
    from mixtral_triton.gateway import schemas

    document = requests.get(f"{base_gateway.url}/openapi.json").json()
    paths = document["paths"]
    assert set(paths) >= {"/predict", "/v1/completions", "/v1/chat/completions", "/v1/models",
                          "/health", "/ready", "/metrics"}

    def body_schema(path):
        return paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]

    assert body_schema("/predict") == json_schema()
    assert body_schema("/v1/completions") == schemas.completion_request_schema()
    assert body_schema("/v1/chat/completions") == schemas.chat_request_schema()
    for path in ("/predict", "/v1/completions", "/v1/chat/completions"):
        assert {"200", "400", "429"} <= set(paths[path]["post"]["responses"])

    # the documented schemas accept what the routes accept and refuse what they refuse
    # (the FP32 range of numbers is beyond JSON Schema's words)
    predict = jsonschema.Draft202012Validator(json_schema())
    completions = jsonschema.Draft202012Validator(schemas.completion_request_schema())
    predict.validate({"prompt": "x", "stop": ["a"], "seed": 3, "temperature": 0})
    completions.validate({"model": "mixtral", "prompt": ["x"], "n": 1, "stream": True,
                          "stream_options": {"include_usage": True}, "top_k": 5})
    jsonschema.Draft202012Validator(schemas.chat_request_schema()).validate(
        {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
         "max_completion_tokens": 3})
    for name, value in invalid_values():
        if isinstance(value, float) and abs(value) > 1e38:
            continue
        assert not predict.is_valid({"prompt": "x", name: value}), (name, value)
        if name != "prompt":
            assert not completions.is_valid({"prompt": "x", name: value}), (name, value)
    assert not predict.is_valid({"prompt": "x", "max_new_tokens": 1})


# ---------------------------------------------------------------------------------------
# client/gateway.py as people start it


def test_gateway_script_serves_until_ctrl_c(triton_server, tmp_path):
    port = free_ports().http
    env = {**os.environ, "MIXTRAL_TRITON_API_KEY": API_KEY}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "client" / "gateway.py"), "--triton-grpc-url",
         triton_server.grpc_url, "--port", str(port), "--max-concurrency", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        banner = process.stdout.readline()
        assert f"http://127.0.0.1:{port}" in banner and "API key required" in banner
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/ready").status_code == 200:
                    break
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)
        # One kept-alive connection, idle past uvicorn's own 5 s keep-alive between two
        # requests: the gateway (--keep-alive-timeout, default 75 s) has not closed it, so a
        # pooled client never sends on a connection that is being closed.
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        sockets = []
        for pause in (0, 6):
            time.sleep(pause)
            connection.request("POST", "/predict", json.dumps({"prompt": PROMPT, "max_tokens": 3, "stream": False}),
                               {"Authorization": f"Api-Key {API_KEY}", "Content-Type": "application/json"})
            resp = connection.getresponse()  # RemoteDisconnected had the gateway closed it
            assert resp.status == 200 and json.loads(resp.read())["usage"]["completion_tokens"] == 3
            sockets.append(connection.sock)
        connection.close()
        assert sockets[0] is sockets[1], "the second request did not go out on the first one's connection"
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
        assert process.returncode == 0, output
        assert PROMPT not in output  # no prompt text in the log without --log-prompts
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_gateway_script_errors_are_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, words in ((["--port", str(port)], "already in use"),
                            (["--max-concurrency", "0"], "--max-concurrency must be at least 1"),
                            (["--keep-alive-timeout", "0"], "--keep-alive-timeout must be positive"),
                            (["--workers", "0"], "--workers must be at least 1"),
                            (["--queue-wait", "-1"], "--queue-wait must be 0 or more seconds"),
                            (["--tokenizer-dir", str(tmp_path / "none"), "--port", str(free_ports().http)],
                             "is not a folder")):
            result = subprocess.run([sys.executable, str(ROOT / "client" / "gateway.py"), *args],
                                    capture_output=True, text=True, timeout=60)
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2 and len(lines) == 1, result.stderr
            assert lines[0].startswith("gateway.py: error: ") and words in lines[0]


# ---------------------------------------------------------------------------------------
# Every OpenAI request field gets an answer (docs/openai.md)


def test_the_field_table_covers_every_field_of_openais_requests():
    from openai.types import completion_create_params as completions
    from openai.types.chat import completion_create_params as chat

    from mixtral_triton.gateway import openai_requests as p

    for route, params in (("completions", completions.CompletionCreateParamsBase),
                          ("chat", chat.CompletionCreateParamsBase)):
        covered = set(p.openai_fields(route)) | set(p.SAMPLING_FIELDS)
        assert set(params.__annotations__) | {"stream"} <= covered, route
    docs = (ROOT / "docs" / "openai.md").read_text()
    from mixtral_triton.protocol import fields_markdown
    assert p.openai_fields_markdown() in docs and fields_markdown() in docs


def test_no_op_fields_are_accepted_and_the_rest_refused_by_name(base_gateway, instruct):
    client = openai_client(base_gateway)
    completion = client.completions.create(
        model="mixtral", prompt=PROMPT, max_tokens=3, temperature=0, user="u1", best_of=1, n=1,
        logit_bias={}, suffix="", echo=True, stop=None, logprobs=None)
    assert completion.choices[0].text.startswith(PROMPT)
    chat = openai_client(instruct)
    answer = chat.chat.completions.create(
        model="mixtral-instruct", messages=[{"role": "user", "content": "hi"}], max_completion_tokens=3,
        user="u2", safety_identifier="s", metadata={"k": "v"}, store=False, service_tier="auto",
        parallel_tool_calls=True, tool_choice="none", response_format={"type": "text"},
        modalities=["text"], prompt_cache_key="c", logprobs=False, top_logprobs=0,
        extra_body={"skip_special_tokens": False, "stop_token_ids": [2]})
    assert answer.choices[0].finish_reason in ("stop", "length")
    for name, value in (("store", True), ("service_tier", "priority"), ("response_format", {"type": "xml"}),
                        ("reasoning_effort", "high"), ("logit_bias", {"5": 1}), ("top_logprobs", 2)):
        with pytest.raises(openai.BadRequestError) as error:
            chat.chat.completions.create(model="mixtral-instruct", messages=[{"role": "user", "content": "hi"}],
                                         extra_body={name: value})
        assert error.value.param == name and name in error.value.message
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="mixtral", prompt=PROMPT, suffix="end")
    assert error.value.param == "suffix"


def test_stop_strings_can_be_kept_and_stop_tokens_end_the_text(base_gateway, triton_server):
    whole = greedy_whole(triton_server, 24)
    stop = whole.text[len(whole.text) // 2:][:3]
    assert stop.strip(), whole.text
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stream": False, "stop": [stop]}
    cut = requests.post(f"{base_gateway.url}/predict", json=body).json()
    kept = requests.post(f"{base_gateway.url}/predict",
                         json={**body, "include_stop_str_in_output": True}).json()
    assert kept["result"] == cut["result"] + stop and kept["finish_reason"] == "stop"
    stream = requests.post(f"{base_gateway.url}/predict", json={**body, "stream": True,
                                                                "include_stop_str_in_output": True})
    assert stream.text == kept["result"]
