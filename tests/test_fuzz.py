"""Property tests (issue 7) for what test_protocol and test_text leave open:

- parse_request and the gateway's OpenAI mappers on arbitrary JSON-like input (any
  structure, unknown keys, lone surrogates, NaN): only RequestError, with a message that
  UTF-8 can carry (it goes out in JSON and logs); what they accept satisfies the published
  JSON Schema and becomes the ensemble's tensors;
- the tokenizer model's checks (Preprocessor.prepare) on arbitrary tensors of the
  ensemble's types, invalid UTF-8 included: only RequestError, naming a field first, the
  way the clients read it;
- the C++ detokenizer's text rules (its CompletionText, compiled into a driver): the same
  text as mixtral_triton.text.TextStream given all tokens at once, whole characters in every
  piece, however the engine's tokens are chunked, with any stop strings;
- the gateway's server-sent events: one `data:` line whatever the text (found by the soak:
  a completion holding U+2028 or U+0085 was cut in two by clients that split lines there).
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixtral_triton.client.ensemble import Chunk, server_error
from mixtral_triton.cpp_detokenizer import cxx_compiler
from mixtral_triton.gateway import openai_requests, wire_formats
from mixtral_triton.protocol import FIELDS, RequestError, ensemble_inputs, json_schema, parse_request
from mixtral_triton.protocol.errors import INVALID_ARGUMENT, coded
from mixtral_triton.text import TextStream, token_table

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NAMES = [spec.name for spec in FIELDS]

# Text with everything JSON can spell, lone surrogates included.
_text = st.text(st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=12) | \
    st.text(st.sampled_from("ab \x00é日🙂\ud800\udfff\udcc3"), max_size=6)
_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | _text)
_json = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) |
                     st.dictionaries(_text, inner, max_size=4), max_leaves=12)
# Plausible values for the known fields, so that a good share of bodies is accepted.
_plausible = {
    "prompt": _text.filter(bool) | _json,
    "stream": st.booleans() | _json,
    "max_tokens": st.integers(-2, 2**31 + 2) | _json,
    "temperature": st.floats(-1, 3) | _json,
    "top_p": st.floats(-0.5, 1.5) | _json,
    "top_k": st.integers(-1, 100) | _json,
    "stop": st.lists(_text, max_size=18) | _text | _json,
    "seed": st.integers(-1, 2**64) | _json,
    "repetition_penalty": st.floats(-1, 3) | _json,
    "presence_penalty": st.floats(-3, 3) | _json,
    "frequency_penalty": st.floats(-3, 3) | _json,
}
_bodies = (st.fixed_dictionaries({}, optional=_plausible) |
           st.dictionaries(st.sampled_from(NAMES) | _text, _json, max_size=5) | _json)


def _sendable(message: str) -> None:
    message.encode("utf-8")  # strict: an error must survive JSON and the log


@FUZZ
@given(_bodies)
def test_parse_request_raises_only_request_errors_that_can_be_sent(body):
    jsonschema = pytest.importorskip("jsonschema")
    try:
        request = parse_request(body)
    except RequestError as error:
        _sendable(str(error))
        assert error.field is None or isinstance(error.field, str)
        if isinstance(body, dict) and error.field is not None:
            assert str(error).startswith(error.field) or str(error).startswith("unknown field")
        return
    # accepted: the published schema agrees, and it becomes the ensemble's tensors
    jsonschema.validate(body, json_schema())
    inputs = ensemble_inputs(request)
    assert inputs["text_input"].reshape(-1)[0].decode("utf-8") == request.prompt
    for spec in FIELDS:
        value = getattr(request, spec.name)
        if isinstance(value, float):
            assert math.isfinite(value)


def _render(messages) -> str:
    return "".join(f"[{m['role']}] {m['content']}" for m in messages)


@FUZZ
@given(_bodies, st.sampled_from(["completions", "chat"]), st.booleans())
def test_the_openai_mappers_raise_only_request_errors(body, route, as_chat_body):
    if isinstance(body, dict) and as_chat_body and "prompt" in body:
        body = {**{k: v for k, v in body.items() if k != "prompt"},
                "messages": [{"role": "user", "content": body["prompt"]}]}
    try:
        if route == "completions":
            parsed = openai_requests.parse_completion_request(body, "mixtral")
        else:
            parsed = openai_requests.parse_chat_request(body, "mixtral", _render)
    except RequestError as error:  # ModelNotFound is one
        _sendable(str(error))
        return
    ensemble_inputs(parsed.predict)


# ---------------------------------------------------------------------------------------
# The tokenizer model's checks, on raw tensors


@pytest.fixture(scope="module")
def preprocessor(tiny_checkpoint):
    from mixtral_triton.ensemble_models.preprocess import Preprocessor

    return Preprocessor(tiny_checkpoint, max_input_len=64, max_seq_len=128)


_bytes = st.binary(max_size=12) | _text.map(lambda t: t.encode("utf-8", "surrogatepass"))
_INPUTS = {  # the ensemble's optional inputs, each with its Triton type
    "stream": st.booleans().map(lambda v: np.array([[v]], np.bool_)),
    "temperature": st.floats(width=32, allow_nan=True).map(lambda v: np.array([[v]], np.float32)),
    "top_k": st.integers(-2**31, 2**31 - 1).map(lambda v: np.array([[v]], np.int32)),
    "top_p": st.floats(width=32, allow_nan=True).map(lambda v: np.array([[v]], np.float32)),
    "seed": st.integers(0, 2**64 - 1).map(lambda v: np.array([[v]], np.uint64)),
    "stop_words": st.lists(_bytes, min_size=1, max_size=18).map(lambda v: np.array([v], dtype=object)),
    "bad_words": st.lists(_bytes, min_size=1, max_size=18).map(lambda v: np.array([v], dtype=object)),
    "end_id": st.integers(-2**31, 2**31 - 1).map(lambda v: np.array([[v]], np.int32)),
    "pad_id": st.integers(-5, 40000).map(lambda v: np.array([[v]], np.int32)),
    "repetition_penalty": st.floats(width=32, allow_nan=True).map(lambda v: np.array([[v]], np.float32)),
    "presence_penalty": st.floats(-3, 3, width=32).map(lambda v: np.array([[v]], np.float32)),
    "frequency_penalty": st.floats(-3, 3, width=32).map(lambda v: np.array([[v]], np.float32)),
    "min_tokens": st.integers(-3, 300).map(lambda v: np.array([[v]], np.int32)),
    "beam_width": st.integers(-1, 3).map(lambda v: np.array([[v]], np.int32)),
    "num_return_sequences": st.integers(-1, 10).map(lambda v: np.array([[v]], np.int32)),
    "guided_decoding_guide_type": st.sampled_from([b"", b"json", b"json_schema", b"regex", b"ebnf_grammar",
                                                   b"structural_tag"]).map(lambda v: np.array([[v]], dtype=object)),
    "guided_decoding_guide": (_bytes | st.sampled_from([b'{"type": "object"}', b"[a-z]{1,4}", b'root ::= "a"']))
    .map(lambda v: np.array([[v]], dtype=object)),
    "stop": st.just(np.array([[False]], np.bool_)),
}
_tensors = st.fixed_dictionaries({
    "text_input": st.lists(_bytes, min_size=1, max_size=2).map(lambda v: np.array(v, dtype=object).reshape(-1, 1)),
    "max_tokens": st.integers(-2**31, 2**31 - 1).map(lambda v: np.array([[v]], np.int32))
    | st.integers(1, 80).map(lambda v: np.array([[v]], np.int32)),
}, optional=_INPUTS)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(_tensors)
def test_the_tokenizer_model_refuses_only_with_request_errors_naming_a_field(preprocessor, inputs):
    try:
        prepared = preprocessor.prepare(inputs)
    except RequestError as error:
        _sendable(str(error))
        # as the model sends it, the clients read it back as the same refusal
        refused = server_error(coded(INVALID_ARGUMENT, str(error), error.field))
        assert isinstance(refused, RequestError) and str(refused) == str(error), str(error)
        assert refused.field, str(error)
        return
    assert prepared["input_lengths"].reshape(-1)[0] <= 64
    assert prepared["input_lengths"].reshape(-1)[0] + prepared["request_output_len"].reshape(-1)[0] <= 128
    for name in ("temperature", "runtime_top_p", "repetition_penalty"):
        assert np.isfinite(prepared[name]).all()


# ---------------------------------------------------------------------------------------
# The C++ detokenizer's text rules

DETOKENIZER_SOURCES = Path(__file__).resolve().parents[1] / "src" / "mixtral_triton" / "cpp_detokenizer"
DRIVER = Path(__file__).resolve().parent / "cpp" / "text_rules_driver.cc"


@pytest.fixture(scope="module")
def table(tiny_checkpoint):
    from transformers import AutoTokenizer

    return token_table(AutoTokenizer.from_pretrained(str(tiny_checkpoint)))


@pytest.fixture(scope="module")
def text_rules(tmp_path_factory):
    """The driver (tests/cpp/text_rules_driver.cc) running: cases in, pieces out."""
    binary = tmp_path_factory.mktemp("text-rules") / "text_rules"
    subprocess.run([cxx_compiler(), "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-pthread",
                    "-I", str(DETOKENIZER_SOURCES), "-o", str(binary), str(DRIVER)], check=True)
    driver = subprocess.Popen([str(binary)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def run(chunks: list[bytes], stops: list[str], include_stop: bool) -> tuple[list[str], bool]:
        case = [struct.pack("<BI", include_stop, len(stops))]
        case += [struct.pack("<I", len(b)) + b for b in (stop.encode() for stop in stops)]
        case += [struct.pack("<I", len(chunks))] + [struct.pack("<I", len(chunk)) + chunk for chunk in chunks]
        driver.stdin.write(b"".join(case))
        driver.stdin.flush()
        count, = struct.unpack("<I", driver.stdout.read(4))
        pieces = []
        for _ in range(count):
            size, = struct.unpack("<I", driver.stdout.read(4))
            pieces.append(driver.stdout.read(size).decode("utf-8"))  # strict: whole characters only
        return pieces, driver.stdout.read(1) == b"\x01"

    yield run
    driver.stdin.close()
    assert driver.wait(10) == 0


_BYTE0 = 3  # <0x00> in the Mistral vocabulary: byte tokens make split characters common
_ids = st.lists(st.integers(_BYTE0 + 0x80, _BYTE0 + 0xFF) | st.integers(0, 31999), max_size=30)


def _chunks(ids, cuts):
    points = sorted({min(c, len(ids)) for c in cuts} | {0, len(ids)})
    return [ids[a:b] for a, b in zip(points, points[1:])]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(ids=_ids, cuts=st.lists(st.integers(0, 30), max_size=8),
       stops=st.lists(st.text(st.sampled_from("ab é日\n🙂"), min_size=1, max_size=3), max_size=3),
       include_stop=st.booleans())
def test_the_cpp_text_is_the_same_however_its_tokens_arrive(table, text_rules, ids, cuts, stops, include_stop):
    pieces, stopped = text_rules([b"".join(table[i] for i in chunk) for chunk in _chunks(ids, cuts)],
                                 stops, include_stop)
    for piece in pieces:
        _sendable(piece)
    stream = TextStream(table, stops, include_stop)
    expected = stream.push(ids) + stream.finish()  # all at once: the reference
    assert "".join(pieces) == expected
    assert stopped == stream.stopped


# ---------------------------------------------------------------------------------------
# The gateway's server-sent events


@FUZZ
@given(st.text(st.characters(codec="utf-8") | st.sampled_from("\u2028\u2029\x85\r\n\x0b\x0c\x1c")))
def test_an_sse_event_is_one_line_for_any_text(text):
    """Every streamed chunk is one `data:` line whatever the completion's text holds, also
    for clients that split lines at U+2028, U+0085 and the like (requests' iter_lines)."""
    request = openai_requests.OpenAIRequest(parse_request({"prompt": "x", "stream": True}))
    chunk = Chunk(text, None, 1, 1)
    event = wire_formats.CompletionFormat(request, "mixtral").piece(chunk).decode("utf-8")
    assert event.endswith("\n\n")
    lines = event[:-2].splitlines()
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0][6:])["choices"][0]["text"] == text
