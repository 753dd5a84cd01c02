"""Bad input through every interface, on the real CPU server (issue 7).

Interfaces: the ensemble over gRPC (raw tritonclient, past our client's checks), Triton's
HTTP generate and generate_stream, our Python client, the gateway's /predict,
/v1/completions and /v1/chat/completions, and the build and launch commands.

Every case gets a clear error that names the field (or tensor), with the right status, and
afterwards the server is still ready and a valid request succeeds. What test_serving,
test_client and test_gateway already try (every field rule through both clients and the
gateway's routes, prompts over max_input_len, max_tokens over max_seq_len, beam_width,
invalid UTF-8 in text_input over gRPC) is not repeated here. docs/reliability.md lists
what each interface answers, including where Triton's own HTTP front end, not this
project, decides (its JSON layer answers 500 without naming the field).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient

from helpers import PROMPT, ensemble_arrays, gateway, invalid_values, raw_stream, text_of, wait_gateway_ready
from mixtral_triton.client import AsyncPredictClient, PredictClient
from mixtral_triton.client.ensemble import ENSEMBLE, infer_inputs, requested_outputs, server_error
from mixtral_triton.protocol import FIELDS, FIELDS_BY_NAME, MAX_STOP_CHARS, MAX_STOPS, RequestError
from mixtral_triton.protocol.predict import INT32_MAX, UINT64_MAX

ROOT = Path(__file__).resolve().parents[1]
MAX_INPUT_LEN = 1024  # the repository's limits (build_repository's defaults)
HUGE_PROMPT = "word " * 800_000  # 4 MB: refused before tokenizing (that would take ~3 s)
_NUMPY = {"TYPE_BOOL": np.bool_, "TYPE_INT32": np.int32, "TYPE_UINT64": np.uint64,
          "TYPE_FP32": np.float32, "TYPE_STRING": object}
# How the ensemble spells the predict fields (and our messages may use either name).
_NAMES = {spec.name: {spec.name, spec.tensor} for spec in FIELDS}


def names_field(message: str, field: str) -> bool:
    return any(re.search(rf"\b{re.escape(name)}\b", message) for name in _NAMES.get(field, {field}))


@pytest.fixture(scope="module")
def gw(triton_server, tiny_instruct_checkpoint):
    """One gateway for the module, with the Instruct checkpoint's chat template (so chat
    reaches its sampling fields) in front of the session's server."""
    with gateway(triton_grpc_url=triton_server.grpc_url, tokenizer_dir=tiny_instruct_checkpoint) as g:
        yield g


@pytest.fixture(scope="module")
def still_serving(triton_server):
    """Asserts that the server is ready and answers a valid request, after a bad one."""

    def check():
        assert triton_server.is_ready()
        results, error = raw_stream(triton_server.grpc_url, ENSEMBLE, ensemble_arrays(max_tokens=2),
                                    "still-serving", requested_outputs())
        assert error is None, error.message()
        assert text_of(results)

    return check


# =======================================================================================
# 1. The ensemble over gRPC, raw tensors


def _tensor(spec, value) -> np.ndarray:
    if spec.tensor_dtype == "TYPE_STRING":
        items = [value] if isinstance(value, (str, bytes)) else list(value)
        return np.array([[v.encode() if isinstance(v, str) else v for v in items]], dtype=object)
    return np.array([[value]], _NUMPY[spec.tensor_dtype])


def _representable(spec, value) -> bool:
    if spec.tensor_dtype == "TYPE_INT32":
        return -2**31 <= value <= INT32_MAX
    if spec.tensor_dtype == "TYPE_UINT64":
        return 0 <= value <= UINT64_MAX
    return True


def grpc_refused() -> list:
    """(field, tensor) pairs the ensemble must refuse, from the field table: each bound and
    exclusive edge that the tensor's type can carry, NaN and infinities, the stop limits."""
    cases = []
    for spec in FIELDS:
        if spec.kind in ("integer", "number"):
            step = 1 if spec.kind == "integer" else 0.5
            values = []
            if spec.minimum is not None:
                values.append(spec.minimum if spec.exclusive_minimum else spec.minimum - step)
            if spec.maximum is not None:
                values.append(spec.maximum if spec.exclusive_maximum else spec.maximum + step)
            if spec.kind == "number":
                values += [float("nan"), float("inf"), float("-inf")]
            cases += [(spec.name, _tensor(spec, v)) for v in values if _representable(spec, v)]
        elif spec.kind == "string":
            cases.append((spec.name, _tensor(spec, b"")))
        elif spec.kind == "stop":
            cases += [(spec.name, _tensor(spec, [f"s{i}" for i in range(MAX_STOPS + 1)])),
                      (spec.name, _tensor(spec, "x" * (MAX_STOP_CHARS + 1))),
                      (spec.name, _tensor(spec, [b"ok", b"\xff\xfe"]))]
    return cases


GRPC_REFUSED = grpc_refused() + [
    # the ensemble's inputs beyond the predict fields (TensorRT-LLM's names)
    ("end_id", np.array([[-1]], np.int32)),
    ("end_id", np.array([[32000]], np.int32)),  # the vocabulary has 32000 tokens
    ("pad_id", np.array([[2**31 - 1]], np.int32)),
    ("min_tokens", np.array([[-1]], np.int32)),
    ("min_tokens", np.array([[5]], np.int32)),  # more than max_tokens (4)
    ("bad_words", np.array([[f"b{i}".encode() for i in range(MAX_STOPS + 1)]], dtype=object)),
    ("bad_words", np.array([[b"x" * (MAX_STOP_CHARS + 1)]], dtype=object)),
    ("bad_words", np.array([[b"\xc3"]], dtype=object)),
]


def _grpc_id(case) -> str:
    name, array = case
    flat = array.reshape(-1)
    shown = flat[0] if flat.size == 1 else f"{flat.size} items"
    return f"{name}={str(shown)[:16]}"


@pytest.mark.parametrize("case", GRPC_REFUSED, ids=_grpc_id)
def test_grpc_ensemble_refuses_each_rule_by_name(triton_server, still_serving, case):
    field, array = case
    tensor = FIELDS_BY_NAME[field].tensor if field in FIELDS_BY_NAME else field
    results, error = raw_stream(triton_server.grpc_url, ENSEMBLE, {**ensemble_arrays(), tensor: array},
                                "bad", requested_outputs())
    assert error is not None, f"accepted: {text_of(results)!r}"
    refused = server_error(error)  # what our clients make of it
    assert isinstance(refused, RequestError), error.message()
    assert refused.field == field
    still_serving()


def grpc_boundaries() -> list:
    """The inclusive bounds of every numeric field, each accepted on its own."""
    cases = []
    for spec in FIELDS:
        # max_tokens and min_tokens (at most max_tokens) are bounded by the request: see the end
        if spec.kind not in ("integer", "number") or spec.name in ("max_tokens", "min_tokens"):
            continue
        for bound, exclusive in ((spec.minimum, spec.exclusive_minimum),
                                 (spec.maximum, spec.exclusive_maximum)):
            if bound is not None and not exclusive:
                cases.append((spec.name, bound))
        if spec.exclusive_minimum:  # just above an exclusive minimum
            cases.append((spec.name, 1e-6))
    return cases + [("max_tokens", 1), ("min_tokens", 0), ("min_tokens", 2)]


@pytest.mark.parametrize("case", grpc_boundaries(), ids=lambda c: f"{c[0]}={c[1]}")
def test_grpc_ensemble_accepts_every_bound(triton_server, case):
    name, value = case
    spec = FIELDS_BY_NAME[name]
    arrays = ensemble_arrays(max_tokens=2, temperature=np.array([[1.0]], np.float32))
    arrays[spec.tensor] = _tensor(spec, value)
    results, error = raw_stream(triton_server.grpc_url, ENSEMBLE, arrays, "edge", requested_outputs())
    assert error is None, error.message()
    last = [r for r in results if r.get_response().outputs][-1]
    assert last.as_numpy("finish_reason").reshape(-1)[0] in (b"length", b"stop")


# Refused by Triton itself before any model runs: the message names the tensor.
GRPC_STRUCTURE = [
    pytest.param({"max_tokens": np.array([[4]], np.int64)}, "max_tokens", "data-type", id="int64-for-int32"),
    pytest.param({"temperature": np.array([[1.0]], np.float64)}, "temperature", "data-type", id="fp64-for-fp32"),
    pytest.param({"text_input": np.array([[1]], np.int32)}, "text_input", "data-type", id="int32-for-bytes"),
    pytest.param({"stream": np.array([[b"yes"]], dtype=object)}, "stream", "data-type", id="bytes-for-bool"),
    pytest.param({"seed": np.array([[-1]], np.int32)}, "seed", "data-type", id="int32-for-uint64"),
    pytest.param({"bogus": np.array([[1]], np.int32)}, "bogus", "unexpected inference input", id="unknown-input"),
    pytest.param({"text_input": None}, "text_input", "missing required input", id="missing-text_input"),
    pytest.param({"max_tokens": None}, "max_tokens", "missing required input", id="missing-max_tokens"),
    pytest.param({"max_tokens": np.array([[4, 5]], np.int32)}, "max_tokens", "unexpected shape", id="two-values"),
    pytest.param({"max_tokens": np.array([4], np.int32)}, "max_tokens", "unexpected shape", id="no-batch-dim"),
    # a batch of two: the ensemble serves one request per call (our models say so)
    pytest.param({"text_input": np.array([[b"a"], [b"b"]], dtype=object),
                  "max_tokens": np.array([[4], [4]], np.int32)}, "text_input", "must hold one value",
                 id="batch-of-two"),
]


@pytest.mark.parametrize("override, tensor, words", GRPC_STRUCTURE)
def test_grpc_ensemble_refuses_malformed_tensors_naming_them(triton_server, still_serving,
                                                             override, tensor, words):
    arrays = {k: v for k, v in {**ensemble_arrays(), **override}.items() if v is not None}
    _, error = raw_stream(triton_server.grpc_url, ENSEMBLE, arrays, "bad", requested_outputs())
    assert error is not None
    assert f"'{tensor}'" in error.message() or f"{tensor} " in error.message(), error.message()
    assert words in error.message()
    still_serving()


def test_grpc_unary_infer_on_the_streaming_ensemble_is_a_clear_error(triton_server, still_serving):
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    with pytest.raises(grpcclient.InferenceServerException) as error:
        client.infer(ENSEMBLE, infer_inputs(ensemble_arrays()), client_timeout=30)
    assert error.value.status() == "StatusCode.UNIMPLEMENTED"
    assert "decoupled" in error.value.message()
    still_serving()


def test_grpc_a_huge_prompt_is_refused_at_once(triton_server, still_serving):
    _, error = raw_stream(triton_server.grpc_url, ENSEMBLE, ensemble_arrays(HUGE_PROMPT), "huge",
                          requested_outputs())
    refused = server_error(error)
    assert isinstance(refused, RequestError) and refused.field == "prompt"
    # refused by its length in characters, before the tokenizer runs (4 MB would take seconds)
    assert f"at most {MAX_INPUT_LEN} tokens" in str(refused) and "characters" in str(refused)
    still_serving()


def test_grpc_nul_is_text_and_a_stop_without_a_generation_is_a_no_op(triton_server):
    """NUL (U+0000) is a character like any other: tokenized (byte fallback), generated
    from, never a terminator. A `stop` naming no running request just ends."""
    results, error = raw_stream(triton_server.grpc_url, ENSEMBLE, ensemble_arrays("a\x00b", 3),
                                "nul", requested_outputs())
    assert error is None, error.message()
    last = [r for r in results if r.get_response().outputs][-1]
    # BOS, "a", <0x00>, "b": the NUL is a token of its own, nothing after it is lost
    assert last.as_numpy("prompt_tokens").reshape(-1)[0] == 4
    results, error = raw_stream(triton_server.grpc_url, ENSEMBLE,
                                ensemble_arrays(stop=np.array([[True]], np.bool_)), "nothing-runs")
    assert error is None and not text_of(results)


# =======================================================================================
# 2. Triton's HTTP generate and generate_stream

# prompt -> text_input, stop -> stop_words; not response_format, which has no tensor of its own
# (the ensemble's guided pair is refused by name in test_client)
_JSON_KEY = {spec.name: spec.tensor for spec in FIELDS if spec.tensor}
# Triton's own JSON layer refuses a value whose JSON type does not fit the tensor (a string
# for a number, true for an integer, a seed below 0 or above 2**64 - 1) before any model
# sees it: HTTP 500 with a message that does not name the field (Triton 2.51).
_TRITON_JSON_ERROR = re.compile(r"^(Unable to parse|failed to parse|attempt to)")
# Accepted by the ensemble where the predict API refuses: an empty stop word is padding of
# the BYTES tensor, as in TensorRT-LLM's preprocessing, and is dropped.
HTTP_ACCEPTED = {("stop", ("",))}


def _http(server, body, stream: bool, raw: bytes | None = None):
    url = f"http://{server.http_url}/v2/models/ensemble/{'generate_stream' if stream else 'generate'}"
    if raw is not None:
        return requests.post(url, data=raw, headers={"Content-Type": "application/json"}, timeout=60)
    return requests.post(url, json=body, timeout=60)


def _http_error(reply) -> str:
    text = reply.text.strip().removeprefix("data: ")
    return json.loads(text)["error"]


@pytest.mark.parametrize("stream", [False, True], ids=["generate", "generate_stream"])
def test_http_generate_refuses_every_rule(triton_server, still_serving, stream):
    """The field table's cases, as JSON: 400 naming the field where the value reaches the
    tokenizer model, Triton's JSON-layer 500 where its type cannot fit the tensor."""
    outcomes = {}
    for name, value in invalid_values():
        if name not in _JSON_KEY:
            continue
        body = {"text_input": PROMPT, "max_tokens": 4, _JSON_KEY[name]: value}
        reply = _http(triton_server, body, stream)
        key = (name, tuple(value) if isinstance(value, list) else value)
        if key in HTTP_ACCEPTED:
            assert reply.status_code == 200, (name, value, reply.text)
            continue
        assert reply.status_code in (400, 500), (name, value, reply.status_code, reply.text)
        error = _http_error(reply)
        if reply.status_code == 400:
            assert names_field(error, name), (name, value, error)
        else:
            assert _TRITON_JSON_ERROR.match(error), (name, value, error)
        outcomes[reply.status_code] = outcomes.get(reply.status_code, 0) + 1
    assert outcomes[400] >= 20 and outcomes[500] >= 15, outcomes
    still_serving()


HTTP_CASES = [
    # (body, or raw bytes), expected status, words of the error ("" when accepted)
    pytest.param({"text_input": PROMPT}, 400, "missing required input(s) ['max_tokens']", id="missing-max_tokens"),
    pytest.param({"max_tokens": 4}, 400, "missing required input(s) ['text_input']", id="missing-text_input"),
    pytest.param({"text_input": ["a", "b"], "max_tokens": 4}, 400, "batch size does not match", id="two-prompts"),
    pytest.param({"text_input": "", "max_tokens": 4}, 400, "prompt must be a non-empty string", id="empty-prompt"),
    pytest.param({"text_input": HUGE_PROMPT, "max_tokens": 4}, 400, "prompt must be at most 1024 tokens",
                 id="huge-prompt"),
    pytest.param({"text_input": PROMPT, "max_tokens": 4, "bad_words": [f"w{i}" for i in range(MAX_STOPS + 1)]},
                 400, "bad_words must hold at most 16 words", id="many-bad-words"),
    pytest.param({"text_input": PROMPT, "max_tokens": 4, "min_tokens": 9}, 400, "min_tokens must be", id="min_tokens"),
    pytest.param({"text_input": PROMPT, "max_tokens": 4, "end_id": 99999}, 400, "end_id must be", id="end_id"),
    # invalid UTF-8 inside the JSON string reaches the tokenizer model, which names it
    pytest.param(b'{"text_input": "caf\xc3\x28", "max_tokens": 4}', 400, "valid UTF-8", id="invalid-utf8"),
    pytest.param(b'{"text_input": "hi", "max_tokens": 4, "stop_words": ["\xff"]}', 400, "valid UTF-8",
                 id="invalid-utf8-stop"),
    # Triton's JSON layer: 500, before any model
    pytest.param(b'{"text_input": "\\ud800", "max_tokens": 4}', 500, "surrogate", id="lone-surrogate"),
    pytest.param(b'{"text_input": "hi", "max_tokens": 4', 500, "failed to parse", id="malformed-json"),
    pytest.param(b'[1]', 500, "non-object", id="not-an-object"),
    # NUL is text; an unknown key is a request *parameter* in Triton's generate extension
    pytest.param({"text_input": "a\x00b", "max_tokens": 4}, 200, "", id="nul-is-text"),
    pytest.param({"text_input": PROMPT, "max_tokens": 4, "max_new_tokens": 9}, 200, "", id="unknown-key-ignored"),
]


@pytest.mark.parametrize("body, status, words", HTTP_CASES)
@pytest.mark.parametrize("stream", [False, True], ids=["generate", "generate_stream"])
def test_http_generate_cases(triton_server, still_serving, body, status, words, stream):
    reply = _http(triton_server, body if isinstance(body, dict) else None, stream,
                  body if isinstance(body, bytes) else None)
    assert reply.status_code == status, reply.text[:300]
    if status != 200:
        assert words in _http_error(reply), reply.text[:300]
    still_serving()


def test_http_max_tokens_wraps_in_tritons_json_layer(triton_server):
    """An upstream quirk, documented: Triton 2.51 converts a JSON integer to INT32 by
    truncation, so 2**32 + 2 arrives as 2 (accepted) and 3e9 as a negative number (refused,
    with the wrapped value). The gateway and the clients check the value itself."""
    reply = _http(triton_server, {"text_input": PROMPT, "max_tokens": 2**32 + 2}, False)
    assert reply.status_code == 200 and reply.json()["completion_tokens"] == 2
    reply = _http(triton_server, {"text_input": PROMPT, "max_tokens": 3_000_000_000}, False)
    assert reply.status_code == 400 and "max_tokens must be" in reply.json()["error"]


# =======================================================================================
# 3. Our Python client


@pytest.mark.parametrize("prompt, fields, field", [
    pytest.param("\ud800", {}, "prompt", id="lone-surrogate-prompt"),
    pytest.param(PROMPT, {"stop": "\udfff"}, "stop", id="lone-surrogate-stop"),
    pytest.param(PROMPT, {"stop": ["ok", "caf\udcc3"]}, "stop", id="escaped-byte-in-stop"),
    pytest.param(b"bytes are not text", {}, "prompt", id="bytes-prompt"),
    pytest.param(None, {}, "prompt", id="none-prompt"),
    pytest.param(PROMPT, {"stop": ("a", "b")}, "stop", id="tuple-stop"),
    pytest.param(PROMPT, {"seed": 2**64}, "seed", id="seed-over-uint64"),
])
def test_client_refuses_before_sending(triton_server, prompt, fields, field):
    """Values JSON cannot carry but Python can: refused by the client's own check, naming
    the field, before anything is sent (both clients)."""
    with pytest.raises(RequestError) as sync_error:
        PredictClient(triton_server.grpc_url).predict(prompt, stream=False, **fields)
    assert sync_error.value.field == field

    async def run():
        async with AsyncPredictClient(triton_server.grpc_url) as client:
            await client.predict(prompt, stream=False, **fields)

    with pytest.raises(RequestError) as async_error:
        asyncio.run(run())
    assert str(async_error.value) == str(sync_error.value)


def test_client_huge_prompt_and_nul(triton_server):
    client = PredictClient(triton_server.grpc_url, timeout_s=30)
    with pytest.raises(RequestError) as error:
        client.predict(HUGE_PROMPT, stream=False, max_tokens=4)
    # refused by its length in characters, before the tokenizer runs
    assert error.value.field == "prompt" and "characters" in str(error.value)
    completion = client.predict("a\x00b", stream=False, max_tokens=3, temperature=0)
    assert completion.finish_reason == "length" and completion.prompt_tokens == 4
    assert "".join(client.predict("a\x00b", max_tokens=3, temperature=0)) == completion.text


# =======================================================================================
# 4. The gateway

ROUTES = {
    "/predict": lambda prompt, **kw: {"prompt": prompt, **kw},
    "/v1/completions": lambda prompt, **kw: {"model": "mixtral", "prompt": prompt, **kw},
    "/v1/chat/completions": lambda prompt, **kw: {"model": "mixtral",
                                                  "messages": [{"role": "user", "content": prompt}], **kw},
}
PROMPT_FIELD = {"/predict": "prompt", "/v1/completions": "prompt", "/v1/chat/completions": "messages"}


def _gateway_ok(g) -> None:
    assert wait_gateway_ready(g.url) == 200
    reply = requests.post(f"{g.url}/predict", json={"prompt": PROMPT, "max_tokens": 2, "stream": False},
                          timeout=60)
    assert reply.status_code == 200, reply.text


def _raw_body(route: str, prompt_json: str, extra: str = "") -> bytes:
    """A body with the prompt spelled exactly as given (JSON text, or bytes)."""
    if route == "/v1/chat/completions":
        head = '{"model": "mixtral", "messages": [{"role": "user", "content": %s}]%s}'
    elif route == "/v1/completions":
        head = '{"model": "mixtral", "prompt": %s%s}'
    else:
        head = '{"prompt": %s%s}'
    return (head % ("\0PROMPT\0", extra)).encode().replace(b"\0PROMPT\0", prompt_json.encode("utf-8", "surrogateescape"))


@pytest.mark.parametrize("route", list(ROUTES))
def test_gateway_body_cases(gw, route):
    """Malformed, empty, deeply nested and non-object bodies; invalid UTF-8 and lone
    surrogates in the prompt (named); NUL in it (accepted)."""
    url = f"{gw.url}{route}"
    field = PROMPT_FIELD[route]
    cases = [
        (b'{"prompt": "x"', 400, None, "not valid JSON"),
        (b"", 400, None, "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, 400, None, "nested deeper than"),
        (b'{"prompt": ' + b"[" * 40 + b"]" * 40 + b"}", 400, None, "nested deeper than"),
        (b'"just a string"', 400, None, "must be a JSON object"),
        (_raw_body(route, '"caf\udcc3("'), 400, field, "valid UTF-8"),  # the raw byte 0xc3
        (_raw_body(route, '"\\ud800"'), 400, field, "valid UTF-8"),  # an escaped lone surrogate
        (_raw_body(route, '"caf\\u00e9"', ', "stop": "\\udfff"'), 400, "stop", "valid UTF-8"),
    ]
    for body, status, named, words in cases:
        reply = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=60)
        assert reply.status_code == status, (body[:60], reply.text[:300])
        error = reply.json()["error"]
        assert error["field"] == named and words in error["message"], (body[:60], error)
        if route != "/predict":
            assert error["param"] == named
    reply = requests.post(url, json=ROUTES[route]("a\x00b", max_tokens=3, stream=False), timeout=60)
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] == 3
    _gateway_ok(gw)


@pytest.mark.parametrize("route", list(ROUTES))
def test_gateway_refuses_bodies_over_the_limit_with_413(gw, route):
    limit = 1 << 20  # the default --max-body-size
    url = f"{gw.url}{route}"
    big = json.dumps(ROUTES[route]("x" * limit)).encode()
    reply = requests.post(url, data=big, headers={"Content-Type": "application/json"}, timeout=60)
    assert reply.status_code == 413, reply.text[:200]
    assert f"limit of {limit} bytes" in reply.json()["error"]["message"]

    def chunks():  # no Content-Length: counted as it is read
        for _ in range(24):
            yield b" " * (64 << 10)

    reply = requests.post(url, data=chunks(), headers={"Content-Type": "application/json"}, timeout=60)
    assert reply.status_code == 413 and "--max-body-size" in reply.json()["error"]["message"]
    # Just under the limit: read, parsed, and refused for what it says (the prompt's length),
    # at once (the tokenizer model does not tokenize a prompt that no max_input_len fits)
    near = ROUTES[route]("y" * (limit - 200), max_tokens=4, stream=False)
    reply = requests.post(url, json=near, timeout=60)
    assert reply.status_code == 400, reply.text[:200]
    assert reply.json()["error"]["field"] == PROMPT_FIELD[route] and "max_input_len" in reply.text
    assert "characters" in reply.text  # by its length in characters, not tokenized
    _gateway_ok(gw)


def test_gateway_body_limit_is_a_setting(triton_server):
    with gateway(triton_grpc_url=triton_server.grpc_url, max_body_bytes=64) as small:
        reply = requests.post(f"{small.url}/predict", json={"prompt": "x" * 64})
        assert reply.status_code == 413 and "limit of 64 bytes" in reply.text
        reply = requests.post(f"{small.url}/predict", json={"prompt": "hi", "max_tokens": 2, "stream": False})
        assert reply.status_code == 200


def test_gateway_many_stop_words_on_every_route(gw):
    stops = [f"s{i}" for i in range(MAX_STOPS + 1)]
    for route, body in ROUTES.items():
        reply = requests.post(f"{gw.url}{route}", json=body(PROMPT, stop=stops), timeout=60)
        assert reply.status_code == 400 and reply.json()["error"]["field"] == "stop", (route, reply.text)
        assert f"at most {MAX_STOPS} strings" in reply.json()["error"]["message"]
    _gateway_ok(gw)


# =======================================================================================
# 5. The build and launch commands: one line, non-zero, no traceback

CLI_CASES = [
    # build/build_model_repository.py (mixtral_triton.pipeline)
    ("pipeline", ["{ckpt}", "--work-dir", "{tmp}/w", "--max-input-len", "0"], "--max-input-len must be at least 1"),
    ("pipeline", ["{ckpt}", "--work-dir", "{tmp}/w", "--max-seq-len", "100"], "must be below --max-seq-len (100)"),
    ("pipeline", ["{ckpt}", "--work-dir", "{tmp}/w", "--max-batch-size", "-1"], "--max-batch-size must be at least 1"),
    ("pipeline", ["{ckpt}", "--work-dir", "{tmp}/w", "--tp", "3"], "must divide the 16 attention heads"),
    ("pipeline", ["{ckpt}", "--work-dir", "{tmp}/w", "--tp", "four"], "argument --tp: invalid int value"),
    ("pipeline", ["{ckpt}", "--work-dir", "{tmp}/w", "--target", "tpu"], "argument --target: invalid choice"),
    ("pipeline", ["{ckpt}"], "the following arguments are required: --work-dir"),
    ("pipeline", ["{ckpt}", "--work-dir", "/proc/no/such/folder"], "/proc/no"),
    # scripts/launch_triton.py (mixtral_triton.launcher.cli)
    ("launch", ["--model-repository", "{tmp}", "--http-port", "70000"], "--http-port must be between 1 and 65535"),
    ("launch", ["--model-repository", "{tmp}", "--metrics-port", "0"], "--metrics-port must be between 1 and 65535"),
    ("launch", ["--model-repository", "{tmp}", "--http-port", "9001", "--grpc-port", "9001"],
     "the http, grpc and metrics ports must differ"),
    ("launch", ["--model-repository", "{tmp}", "--host", "192.0.2.1", "--free-ports"],
     "--host 192.0.2.1 is not an address of this machine"),
    ("launch", ["--model-repository", "{tmp}", "--log-file", "{tmp}/no/such/x.log"], "its folder does not exist"),
    ("launch", ["--model-repository", "{tmp}", "--exit-timeout-secs", "-1"], "--exit-timeout-secs must not be negative"),
    ("launch", ["--model-repository", "{tmp}", "--target", "tpu"], "argument --target: invalid choice"),
    ("launch", ["--model-repository", "{tmp}", "--http-port", "x"], "argument --http-port: invalid int value"),
    ("launch", [], "the following arguments are required: --model-repository"),
    # build/make_fixture.py (mixtral_triton.fixture.cli)
    ("fixture", ["{tmp}/f", "--layers", "abc"], "argument --layers: invalid int value"),
    ("fixture", ["{tmp}/f", "--size", ""], "unknown size ''"),
    ("fixture", ["/proc/no/such/fixture"], "does not exist"),
    ("fixture", [], "the following arguments are required: out_dir"),
    # build/convert_checkpoint.py (mixtral_triton.convert.cli)
    ("convert", ["convert", "{ckpt}", "{tmp}/c", "--workers", "0"], "--workers must be at least 1"),
    ("convert", ["convert", "{ckpt}", "{tmp}/c", "--pp-size", "0"], "--pp-size must be at least 1"),
    ("convert", ["convert", "{ckpt}", "/proc/no/such/out"], "parent folder /proc/no/such does not exist"),
    ("convert", ["convert", "{ckpt}", "{ckpt}/config.json"], "exists and is not a folder"),
]
_MAINS = {"pipeline": "mixtral_triton.pipeline", "launch": "mixtral_triton.launcher.cli",
          "fixture": "mixtral_triton.fixture.cli", "convert": "mixtral_triton.convert.cli"}
SCRIPTS = {"pipeline": "build/build_model_repository.py", "launch": "scripts/launch_triton.py",
           "fixture": "build/make_fixture.py", "convert": "build/convert_checkpoint.py"}


def _argv(args, tiny_checkpoint, tmp_path) -> list[str]:
    return [a.format(ckpt=tiny_checkpoint, tmp=tmp_path) for a in args]


@pytest.mark.parametrize("command, args, words", CLI_CASES,
                         ids=[f"{c}:{' '.join(a)[-40:]}" for c, a, _ in CLI_CASES])
def test_commands_refuse_bad_options_in_one_line(command, args, words, tiny_checkpoint, tmp_path,
                                                 capsys, monkeypatch):
    """In process (each command's main, as its script calls it): no exception escapes,
    exit 2, one line on stderr, nothing written."""
    import importlib

    main = importlib.import_module(_MAINS[command]).main
    monkeypatch.setattr(sys, "argv", [SCRIPTS[command].rsplit("/", 1)[-1]])
    before = sorted(tmp_path.rglob("*"))
    assert main(_argv(args, tiny_checkpoint, tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{sys.argv[0]}: error: "), err
    assert words in err, err
    assert sorted(tmp_path.rglob("*")) == before


def test_the_scripts_themselves_answer_in_one_line(tiny_checkpoint, tmp_path):
    """The four scripts as people run them, concurrently: the wrappers add no traceback."""
    runs = {}
    for command, script in SCRIPTS.items():
        args = next(_argv(a, tiny_checkpoint, tmp_path) for c, a, _ in CLI_CASES if c == command)
        runs[command] = subprocess.Popen([sys.executable, str(ROOT / script), *args], text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for command, run in runs.items():
        out, err = run.communicate(timeout=120)
        assert run.returncode == 2, (command, err)
        assert "Traceback" not in err and err.count("\n") == 1, (command, err)
        assert err.startswith(f"{SCRIPTS[command].rsplit('/', 1)[-1]}: error: "), err
